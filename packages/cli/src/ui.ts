// Everything the CLI prints besides results: notices, progress bars, errors. All on stderr;
// stdout carries only results (text or JSON).

/** An error meant for the user: printed as one line, without a stack. */
export class UsageError extends Error {
  override name = "UsageError";
  constructor(
    message: string,
    readonly exitCode = 2,
  ) {
    super(message);
  }
}

export const ui = {
  quiet: false,
  verbose: false,
};

const isTTY = () => process.stderr.isTTY === true;

/** One line of information on stderr (suppressed by --quiet). */
export function notice(message: string): void {
  if (!ui.quiet) process.stderr.write(`ds3: ${message}\n`);
}

export function warn(message: string): void {
  process.stderr.write(`ds3: warning: ${message}\n`);
}

/** The first line of an error's message (errors print one clear line; --verbose adds the stack). */
export function errorLine(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  const lines = msg.split("\n").map((l) => l.trim()).filter(Boolean);
  if (lines.length === 0) return "unknown error";
  // "Invalid values:\n  Argument: to, Given: ..." reads as one line
  return lines[0]!.endsWith(":") ? lines.join(" ") : lines[0]!;
}

export function printError(e: unknown, hint = ""): void {
  process.stderr.write(`ds3: error: ${errorLine(e)}${hint}\n`);
  if (ui.verbose && e instanceof Error && e.stack) process.stderr.write(`${e.stack}\n`);
}

export function fmtBytes(n: number): string {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : n < 10 ? 2 : 1)} ${u[i]}`;
}

export function fmtCount(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} K`;
  return String(n);
}

/** A progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise. */
export class ProgressBar {
  private t0 = performance.now();
  private lastDraw = 0;
  private lastDecile = -1;
  private drawn = false;

  constructor(
    private label: string,
    private total: number,
    private unit: "bytes" | "count" = "bytes",
  ) {}

  update(done: number, detail = ""): void {
    if (ui.quiet) return;
    const frac = this.total > 0 ? Math.min(1, done / this.total) : 1;
    const now = performance.now();
    if (isTTY()) {
      if (now - this.lastDraw < 80 && frac < 1) return;
      this.lastDraw = now;
      const width = Math.max(10, Math.min(30, (process.stderr.columns ?? 80) - 60));
      const fill = Math.round(frac * width);
      const el = (now - this.t0) / 1000;
      const eta = frac > 0.01 && frac < 1 ? ` eta ${Math.ceil((el / frac) * (1 - frac))}s` : "";
      const amount = this.unit === "bytes" ? `${fmtBytes(done)}/${fmtBytes(this.total)}` : `${done}/${this.total}`;
      let line = `${this.label} [${"#".repeat(fill)}${"-".repeat(width - fill)}] ${(frac * 100).toFixed(0).padStart(3)}% ${amount}${eta}${detail ? ` ${detail}` : ""}`;
      const cols = process.stderr.columns ?? 100;
      if (line.length > cols - 1) line = line.slice(0, cols - 1);
      process.stderr.write(`\r\x1b[2K${line}`);
      this.drawn = true;
    } else {
      const decile = Math.floor(frac * 10);
      if (decile === this.lastDecile) return;
      this.lastDecile = decile;
      process.stderr.write(`ds3: ${this.label} ${decile * 10}%${detail ? ` ${detail}` : ""}\n`);
    }
  }

  finish(message?: string): void {
    if (ui.quiet) return;
    if (this.drawn) process.stderr.write("\r\x1b[2K");
    if (message) process.stderr.write(`ds3: ${message}\n`);
  }
}
