// The line editor of `ds3 chat` on a terminal: raw mode, so the terminal never echoes by itself.
//
// - A message may have several lines. Bracketed paste (the terminal wraps a paste in
//   ESC[200~ ... ESC[201~) makes a pasted block one message, newlines and all; for terminals
//   without it, a newline that arrives in the same read as more text is pasted too. By hand:
//   a line ending in "\" continues on the next line, and so does Alt-Enter.
// - While a reply streams the editor is not drawn and nothing typed is echoed; what is typed
//   (text and pastes; Enter is ignored, so nothing is sent unseen) becomes the start of the
//   next prompt. Ctrl-C then stops the reply (`onInterrupt`).
// - Up/down recall the input history (on the first/last line of a multi-line message; elsewhere
//   they move between its lines); left/right, Home/End, Ctrl-left/right, Alt-B/F and
//   Ctrl-A/E/B/F/U/K/W/L/D as in readline; Ctrl-Z suspends.
// - A message taller than the terminal is edited in a window of rows that follows the cursor
//   (a redraw never has to reach above the screen's top) and drawn whole when it is sent.
import { emitKeypressEvents } from "node:readline";
import type { ReadStream, WriteStream } from "node:tty";

export type ReadResult = { kind: "line"; text: string } | { kind: "eof" } | { kind: "interrupt" };

interface Key {
  sequence?: string;
  name?: string;
  ctrl?: boolean;
  meta?: boolean;
  shift?: boolean;
}

const PASTE_ON = "\x1b[?2004h";
const PASTE_OFF = "\x1b[?2004l";

/** Terminal columns a code point takes: 2 for East Asian wide and emoji, 0 for combining marks. */
export function charWidth(cp: number): number {
  if (cp === 0 || (cp >= 0x300 && cp <= 0x36f) || (cp >= 0x200b && cp <= 0x200f) || (cp >= 0xfe00 && cp <= 0xfe0f)) return 0;
  if (
    (cp >= 0x1100 && cp <= 0x115f) ||
    (cp >= 0x2e80 && cp <= 0xa4cf && cp !== 0x303f) ||
    (cp >= 0xac00 && cp <= 0xd7a3) ||
    (cp >= 0xf900 && cp <= 0xfaff) ||
    (cp >= 0xfe30 && cp <= 0xfe4f) ||
    (cp >= 0xff00 && cp <= 0xff60) ||
    (cp >= 0xffe0 && cp <= 0xffe6) ||
    (cp >= 0x1f300 && cp <= 0x1f64f) ||
    (cp >= 0x1f900 && cp <= 0x1f9ff) ||
    (cp >= 0x20000 && cp <= 0x3fffd)
  )
    return 2;
  return 1;
}

export class LineEditor {
  private buf = "";
  private pos = 0; // cursor, in UTF-16 units of buf
  private rowsAbove = 0; // terminal rows between the first row of the drawing and the cursor
  private top = 0; // the first row drawn of a message taller than the terminal
  private state: "idle" | "reading" | "busy" | "closed" = "idle";
  private pasting = false;
  private lastWasCR = false; // a pasted "\r\n" is one newline
  private chunkLeft = 0; // characters of the current read not yet turned into keys
  private typeAhead = "";
  private resolve: ((r: ReadResult) => void) | null = null;
  private histIndex = 0;
  private draft = "";
  private history: string[] = [];
  private readonly onData = (d: Buffer | string) => (this.chunkLeft = String(d).length);
  private readonly onKeypress = (s: string | undefined, key: Key | undefined) => this.key(s, key ?? {});
  private readonly onResize = () => this.state === "reading" && this.render();
  private readonly restore = () => this.close();
  onInterrupt: () => void = () => {};

  constructor(
    private readonly input: ReadStream,
    private readonly output: WriteStream,
    readonly prompt = "> ",
    readonly continuation = "… ",
  ) {}

  /** Take the terminal: raw mode and bracketed paste, until close(). */
  start(): void {
    this.input.on("data", this.onData); // before the keypress decoder's listener: it sees each read first
    emitKeypressEvents(this.input);
    this.input.on("keypress", this.onKeypress);
    this.input.setRawMode(true);
    this.input.resume();
    this.output.write(PASTE_ON);
    this.output.on("resize", this.onResize);
    process.once("exit", this.restore);
    this.state = "busy";
  }

  /** Give the terminal back as it was. */
  close(): void {
    if (this.state === "closed") return;
    this.state = "closed";
    process.off("exit", this.restore);
    this.input.off("data", this.onData);
    this.input.off("keypress", this.onKeypress);
    this.output.off("resize", this.onResize);
    this.output.write(PASTE_OFF);
    try {
      this.input.setRawMode(false);
    } catch {
      // the terminal is gone
    }
    this.input.pause();
    this.resolve?.({ kind: "eof" });
    this.resolve = null;
  }

  /** Read one message; what was typed during the last reply is already in it. */
  read(history: string[]): Promise<ReadResult> {
    if (this.state === "closed") return Promise.resolve({ kind: "eof" });
    this.history = history;
    this.histIndex = history.length;
    this.draft = "";
    this.buf = this.typeAhead;
    this.pos = this.buf.length;
    this.typeAhead = "";
    this.rowsAbove = 0;
    this.top = 0;
    this.pasting = false;
    this.state = "reading";
    this.render();
    return new Promise((resolve) => (this.resolve = resolve));
  }

  /** Show `text` after the prompt as if typed and sent (a --prompt message). */
  echo(text: string): void {
    const [b, p] = [this.buf, this.pos];
    this.buf = text;
    this.pos = text.length;
    this.rowsAbove = 0;
    this.render(true);
    this.output.write("\r\n");
    [this.buf, this.pos] = [b, p];
  }

  private finish(r: ReadResult): void {
    if (r.kind === "line" || r.kind === "interrupt") {
      this.pos = this.buf.length;
      this.render(r.kind === "line");
      this.output.write("\r\n");
    }
    this.state = "busy";
    const res = this.resolve;
    this.resolve = null;
    res?.(r);
  }

  // ------------------------------------------------------------------------------------
  // keys

  private key(s: string | undefined, key: Key): void {
    const seq = key.sequence ?? s ?? "";
    this.chunkLeft = Math.max(0, this.chunkLeft - seq.length);
    const more = this.chunkLeft > 0; // the rest of this read is still to come: typed too fast to be typing
    if (key.name === "paste-start") {
      this.pasting = true;
      this.lastWasCR = false;
      return;
    }
    if (key.name === "paste-end") {
      this.pasting = false;
      if (this.state === "reading") this.render();
      return;
    }
    if (key.ctrl && key.name === "c") this.pasting = false; // Ctrl-C always works, also if a paste never ended
    if (this.state === "busy") return this.busyKey(s, key, more);
    if (this.state !== "reading") return;
    if (this.pasting) {
      this.pasteText(seq);
      return; // drawn once at the paste's end
    }
    const c = key.ctrl && !key.meta ? key.name : undefined;
    if (c === "c") return this.finish({ kind: "interrupt" });
    if (c === "d") {
      if (this.buf === "") {
        this.output.write("\r\n");
        return this.finish({ kind: "eof" });
      }
      return this.edit(() => this.deleteForward());
    }
    if (c === "z") return this.suspend();
    if (key.name === "return" || key.name === "enter") {
      if (key.meta || more) return this.edit(() => this.insert("\n"));
      if (this.pos === this.buf.length && this.buf.endsWith("\\")) return this.edit(() => (this.buf = `${this.buf.slice(0, -1)}\n`));
      return this.finish({ kind: "line", text: this.buf });
    }
    const lineStart = this.buf.lastIndexOf("\n", this.pos - 1) + 1;
    const nl = this.buf.indexOf("\n", this.pos);
    const lineEnd = nl < 0 ? this.buf.length : nl;
    switch (key.meta ? undefined : c !== undefined ? `C-${c}` : key.name) {
      case "backspace":
        return this.edit(() => this.deleteBack());
      case "delete":
        return this.edit(() => this.deleteForward());
      case "left":
      case "C-b":
        return this.move(this.prevPos(this.pos));
      case "right":
      case "C-f":
        return this.move(this.nextPos(this.pos));
      case "C-left":
        return this.move(this.wordLeft(lineStart));
      case "C-right":
        return this.move(this.wordRight(lineEnd));
      case "home":
      case "C-a":
        return this.move(lineStart);
      case "end":
      case "C-e":
        return this.move(lineEnd);
      case "C-u":
        return this.edit(() => {
          this.buf = this.buf.slice(0, lineStart) + this.buf.slice(this.pos);
          this.pos = lineStart;
        });
      case "C-k":
        return this.edit(() => (this.buf = this.buf.slice(0, this.pos) + this.buf.slice(lineEnd)));
      case "C-w": {
        const i = this.wordLeft(lineStart);
        return this.edit(() => {
          this.buf = this.buf.slice(0, i) + this.buf.slice(this.pos);
          this.pos = i;
        });
      }
      case "C-l":
        this.output.write("\x1b[H\x1b[2J");
        this.rowsAbove = 0;
        return this.render();
      case "up":
      case "C-p":
        if (lineStart > 0) return this.move(this.lineMove(-1));
        return this.recall(-1);
      case "down":
      case "C-n":
        if (lineEnd < this.buf.length) return this.move(this.lineMove(1));
        return this.recall(1);
    }
    if (key.meta && key.name === "b") return this.move(this.wordLeft(lineStart));
    if (key.meta && key.name === "f") return this.move(this.wordRight(lineEnd));
    if (key.name === "tab" && !c) return this.edit(() => this.insert("\t"));
    if (s && !key.ctrl && !key.meta && !/[\x00-\x1f\x7f]/.test(s)) this.edit(() => this.insert(s));
  }

  /** A key while a reply streams: Ctrl-C stops it; text is kept (unseen) for the next prompt. */
  private busyKey(s: string | undefined, key: Key, more: boolean): void {
    if (key.ctrl && key.name === "c") return this.onInterrupt();
    if (this.pasting) return void (this.typeAhead += this.pasted(key.sequence ?? s ?? ""));
    if (key.name === "return" || key.name === "enter") {
      if (more || key.meta) this.typeAhead += "\n"; // inside a paste without brackets (or Alt-Enter); a lone Enter sends nothing
    } else if (key.name === "backspace") this.typeAhead = this.typeAhead.slice(0, this.prevPos(this.typeAhead.length, this.typeAhead));
    else if (key.name === "tab") this.typeAhead += "\t";
    else if (s && !key.ctrl && !key.meta && !/[\x00-\x1f\x7f]/.test(s)) this.typeAhead += s;
  }

  private pasted(seq: string): string {
    if (seq === "\r") {
      this.lastWasCR = true;
      return "\n";
    }
    const wasCR = this.lastWasCR;
    this.lastWasCR = false;
    if (seq === "\n") return wasCR ? "" : "\n";
    return seq.replace(/\r\n?/g, "\n");
  }

  private pasteText(seq: string): void {
    this.insert(this.pasted(seq));
  }

  private insert(t: string): void {
    this.buf = this.buf.slice(0, this.pos) + t + this.buf.slice(this.pos);
    this.pos += t.length;
  }

  private deleteBack(): void {
    if (this.pos === 0) return;
    const p = this.prevPos(this.pos);
    this.buf = this.buf.slice(0, p) + this.buf.slice(this.pos);
    this.pos = p;
  }

  private deleteForward(): void {
    if (this.pos >= this.buf.length) return;
    this.buf = this.buf.slice(0, this.pos) + this.buf.slice(this.nextPos(this.pos));
  }

  private prevPos(p: number, s = this.buf): number {
    if (p <= 0) return 0;
    const lo = s.charCodeAt(p - 1);
    return lo >= 0xdc00 && lo <= 0xdfff && p >= 2 ? p - 2 : p - 1;
  }

  private nextPos(p: number): number {
    if (p >= this.buf.length) return this.buf.length;
    const hi = this.buf.charCodeAt(p);
    return hi >= 0xd800 && hi <= 0xdbff && p + 1 < this.buf.length ? p + 2 : p + 1;
  }

  private wordLeft(lineStart: number): number {
    let i = this.pos;
    while (i > lineStart && /\s/.test(this.buf[i - 1]!)) i--;
    while (i > lineStart && !/\s/.test(this.buf[i - 1]!)) i--;
    return i;
  }

  private wordRight(lineEnd: number): number {
    let i = this.pos;
    while (i < lineEnd && /\s/.test(this.buf[i]!)) i++;
    while (i < lineEnd && !/\s/.test(this.buf[i]!)) i++;
    return i;
  }

  /** The position one line up (-1) or down (1), at the same column where that line is long enough. */
  private lineMove(dir: -1 | 1): number {
    const start = this.buf.lastIndexOf("\n", this.pos - 1) + 1;
    const col = this.pos - start;
    if (dir < 0) {
      const prevStart = this.buf.lastIndexOf("\n", start - 2) + 1;
      return Math.min(prevStart + col, start - 1);
    }
    const nextStart = this.buf.indexOf("\n", this.pos) + 1;
    const nl = this.buf.indexOf("\n", nextStart);
    return Math.min(nextStart + col, nl < 0 ? this.buf.length : nl);
  }

  private recall(dir: -1 | 1): void {
    const i = this.histIndex + dir;
    if (i < 0 || i > this.history.length) return;
    if (this.histIndex === this.history.length) this.draft = this.buf;
    this.histIndex = i;
    this.buf = i === this.history.length ? this.draft : this.history[i]!;
    // going back: the cursor on the first line, so that up goes on through the history; going forward: at the end
    const nl = this.buf.indexOf("\n");
    this.pos = dir < 0 && nl >= 0 ? nl : this.buf.length;
    this.render();
  }

  private edit(f: () => void): void {
    f();
    this.render();
  }

  private move(p: number): void {
    this.pos = p;
    this.render();
  }

  private suspend(): void {
    this.output.write(PASTE_OFF);
    this.input.setRawMode(false);
    process.once("SIGCONT", () => {
      if (this.state === "closed") return;
      this.input.setRawMode(true);
      this.output.write(PASTE_ON);
      this.rowsAbove = 0;
      this.output.write("\r\n");
      this.render();
    });
    process.kill(process.pid, "SIGTSTP");
  }

  // ------------------------------------------------------------------------------------
  // drawing: the whole message, redrawn from its first row (it may span several rows)

  /**
   * `full`: the whole message (when it is sent); otherwise a message taller than the terminal
   * shows the rows around the cursor, so that moving back up to its first row stays on screen.
   */
  private render(full = false): void {
    const cols = Math.max(8, this.output.columns || Number(process.env.COLUMNS) || 80);
    const height = Math.max(2, (this.output.rows || Number(process.env.LINES) || 24) - 1);
    const rows: string[] = [""];
    let col = 0;
    let cur: [number, number] = [0, 0];
    const put = (text: string, w: number) => {
      if (col + w > cols) {
        rows.push("");
        col = 0;
      }
      rows[rows.length - 1] += text;
      col += w;
    };
    const prefix = (p: string) => {
      for (const ch of p) put(ch, charWidth(ch.codePointAt(0)!));
    };
    prefix(this.prompt);
    let i = 0;
    for (const ch of this.buf) {
      if (i === this.pos) cur = [rows.length - 1, col];
      i += ch.length;
      if (ch === "\n") {
        rows.push("");
        col = 0;
        prefix(this.continuation);
        continue;
      }
      const cp = ch.codePointAt(0)!;
      if (ch === "\t") {
        const w = Math.min(8 - (col % 8), cols - col) || 1;
        put(" ".repeat(w), w);
      } else if (cp < 0x20 || cp === 0x7f) put(`^${String.fromCharCode(cp === 0x7f ? 63 : cp + 64)}`, 2);
      else put(ch, charWidth(cp));
    }
    if (this.pos >= this.buf.length) cur = [rows.length - 1, col];
    if (cur[1] >= cols) cur = [cur[0] + 1, 0]; // after a full row: the start of the next
    // the rows to draw: all of them, or a window that follows the cursor
    let top = 0;
    let bottom = rows.length; // exclusive
    if (!full && rows.length > height) {
      top = Math.min(Math.max(this.top, cur[0] - height + 1, 0), cur[0], rows.length - height);
      bottom = top + height;
    }
    this.top = top;
    const shown = rows.slice(top, bottom);
    let out = this.rowsAbove > 0 ? `\x1b[${this.rowsAbove}A` : "";
    out += `\r\x1b[J${shown.join("\r\n")}`;
    // where the terminal's cursor is now: a full last row leaves it waiting to wrap, so wrap it
    let end: [number, number] = [bottom - 1, bottom === rows.length ? col : cols];
    if (end[1] >= cols) {
      out += "\r\n";
      end = [end[0] + 1, 0];
    }
    if (cur[0] !== end[0] || cur[1] !== end[1]) {
      if (end[0] > cur[0]) out += `\x1b[${end[0] - cur[0]}A`;
      out += "\r";
      if (cur[1] > 0) out += `\x1b[${cur[1]}C`;
    }
    this.rowsAbove = cur[0] - top;
    this.output.write(out);
  }
}
