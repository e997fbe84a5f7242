// Drive a command through a pseudo-terminal, as a person at a keyboard would: util-linux
// `script` allocates the pty (no native module needed); bytes written to it are typed keys
// (so "\x03" is Ctrl-C, delivered by the terminal), and everything the command prints
// comes back on one stream.
import { type ChildProcessWithoutNullStreams, spawn } from "node:child_process";

const quote = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

export class Pty {
  private p: ChildProcessWithoutNullStreams;
  out = "";
  readonly exited: Promise<number | null>;

  constructor(argv: string[], opts: { env?: NodeJS.ProcessEnv; cwd?: string } = {}) {
    // -q quiet, -f flush at once, -e pass the exit code on, -c the command
    this.p = spawn("script", ["-qfec", argv.map(quote).join(" "), "/dev/null"], {
      cwd: opts.cwd,
      env: { ...process.env, COLUMNS: "120", LINES: "40", TERM: "xterm", ...opts.env },
    });
    this.p.stdout.on("data", (d: Buffer) => (this.out += d.toString("utf8")));
    this.p.stderr.on("data", (d: Buffer) => (this.out += d.toString("utf8")));
    this.exited = new Promise((resolve) => this.p.on("exit", (code) => resolve(code)));
  }

  type(s: string): void {
    this.p.stdin.write(s);
  }

  /** Wait until the output after `from` matches `re`; returns the index where the match ends. */
  async waitFor(re: RegExp, from = 0, timeoutMs = 30_000): Promise<number> {
    const t0 = Date.now();
    for (;;) {
      const m = re.exec(this.out.slice(from));
      if (m) return from + m.index + m[0].length;
      if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${re}; output so far:\n${this.out}`);
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  kill(): void {
    this.p.kill("SIGKILL");
  }
}
