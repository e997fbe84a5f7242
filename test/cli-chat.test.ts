// `ds3 chat` as a person uses it: the built bundle in a pseudo-terminal (test/helpers/pty.ts)
// typing keys, or with stdin a pipe. Replies are checked against `ds3 generate` on the same
// message (greedy: the same text), the context fitting against the real tokenizer.
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { type ChatMessage, Tokenizer } from "@ds3/core";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ContextError, fitContext } from "../packages/cli/src/chat-context.js";
import { Pty } from "./helpers/pty.js";
import { screenOf } from "./helpers/screen.js";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const BIN = join(ROOT, "packages/cli/dist/ds3.js");

let tmp: string;
let cache: string; // where the built-in model is generated once; each test gets its own cache dir linking to it
let dirs = 0;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

function ds3(args: string[], opts: { env?: NodeJS.ProcessEnv; input?: string } = {}): Promise<Run> {
  return new Promise((resolve) => {
    const child = execFile(
      process.execPath,
      [BIN, ...args],
      { cwd: ROOT, env: { ...process.env, DS3_CACHE_DIR: cache, HTTP_PROXY: "http://127.0.0.1:9", HTTPS_PROXY: "http://127.0.0.1:9", ...opts.env }, maxBuffer: 64 << 20, encoding: "utf8" },
      (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stdout, stderr }),
    );
    child.stdin!.end(opts.input ?? "");
  });
}

function ok(r: Run): Run {
  if (r.code !== 0) throw new Error(`ds3 exited ${r.code}:\n${r.stderr}`);
  return r;
}

/** A fresh DS3_CACHE_DIR (no chat history) that already holds the built-in model. */
function freshCache(): string {
  const d = join(tmp, `cache-${++dirs}`);
  mkdirSync(d);
  symlinkSync(join(cache, "builtin-v1"), join(d, "builtin-v1"));
  return d;
}

const chat = (args: string[], cacheDir: string) => new Pty([process.execPath, BIN, "chat", ...args], { cwd: ROOT, env: { DS3_CACHE_DIR: cacheDir } });

/** What a terminal shows of a reply: newlines as CR LF, control characters as U+FFFD (as chat prints them). */
const onScreen = (s: string) => s.replace(/[\x00-\x08\x0b-\x1f\x7f-\x9f]/g, "\ufffd");
const screen = (p: Pty) => p.out.replace(/\r*\n/g, "\n");
const count = (s: string, sub: string) => s.split(sub).length - 1;

async function until(what: string, f: () => boolean, p: Pty, timeoutMs = 20_000): Promise<void> {
  const t0 = Date.now();
  while (!f()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}; screen:\n${screenOf(p.out, 120).join("\n")}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** The greedy reply of `ds3 generate` to one user message: what chat must answer to it as the first turn. */
async function generated(message: string, maxTokens: number): Promise<string> {
  const r = ok(await ds3(["generate", message, "--temperature", "0", "--max-tokens", String(maxTokens), "--ignore-eos", "--json"]));
  return JSON.parse(r.stdout).text as string;
}

const LOAD_MS = 90_000; // to the first prompt: loading the model on a busy 2-core machine can be slow
const GREEDY = ["--temperature", "0", "--max-tokens", "8", "--ignore-eos"];
const CUT = "ds3: (reply cut at 8 tokens)";

let tok: Tokenizer; // DeepSeek-V3's, as the built-in model has it
/** Prompt ids of a conversation, rendered by the reference chat template. */
const render = (m: ChatMessage[]) => tok.encode(tok.applyChatTemplate(m, { addGenerationPrompt: true }), { addSpecial: false });

beforeAll(async () => {
  tok = await Tokenizer.load();
  if (!existsSync(BIN)) throw new Error(`${BIN} is missing: build the CLI first (pnpm build)`);
  tmp = mkdtempSync(join(tmpdir(), "ds3-chat-"));
  cache = join(tmp, "cache");
  ok(await ds3(["generate", "--raw", "x", "--max-tokens", "1"])); // the built-in model, once
});

afterAll(() => {
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

describe("chat in a terminal", () => {
  it("answers; Ctrl-C stops the reply, not the program; /reset; /exit exits 0", async () => {
    const pty = chat(["--seed", "3", "--max-tokens", "3000", "--ignore-eos"], freshCache());
    try {
      let at = await pty.waitFor(/> /, 0, LOAD_MS);
      pty.type("Hello there\r");
      at = await pty.waitFor(/Hello there\r*\n/, at);
      await pty.waitFor(/[^]{40}/, at); // the reply streams
      pty.type("\x03");
      at = await pty.waitFor(/\(stopped\)[^]*> /, at);
      // the program is alive: a second turn, with the history, answers too
      pty.type("And now?\r");
      at = await pty.waitFor(/And now\?\r*\n/, at);
      await pty.waitFor(/[^]{40}/, at);
      pty.type("\x03");
      at = await pty.waitFor(/\(stopped\)[^]*> /, at);
      pty.type("/reset\r");
      at = await pty.waitFor(/history cleared[^]*> /, at);
      pty.type("/exit\r");
      expect(await pty.exited).toBe(0);
    } finally {
      pty.kill();
    }
  });

  it("a pasted multi-line message is one turn (bracketed paste, a paste without it, and lines ending in \\)", async () => {
    const message = "line one\nline two\nline three";
    const want = await generated(message, 8);
    expect(want).not.toBe(await generated("line three", 8)); // the test tells one turn from three
    const pty = chat(GREEDY, freshCache());
    try {
      let at = await pty.waitFor(/> /, 0, LOAD_MS);
      pty.type("\x1b[200~line one\rline two\rline three\x1b[201~"); // a terminal's bracketed paste, CR per line
      at = await pty.waitFor(/line three/, at);
      await new Promise((r) => setTimeout(r, 300));
      expect(screen(pty)).not.toContain(CUT); // the paste alone sends nothing
      pty.type("\r");
      at = await pty.waitFor(/reply cut at 8 tokens[^]*> /, at);
      pty.type("/reset\r"); // each message starts a new conversation: its reply is generate's
      at = await pty.waitFor(/history cleared[^]*> /, at);
      // a terminal without bracketed paste: the lines arrive in one read
      pty.type("line one\rline two\rline three\r");
      at = await pty.waitFor(/reply cut at 8 tokens[^]*> /, at);
      pty.type("/reset\r");
      at = await pty.waitFor(/history cleared[^]*> /, at);
      // by hand: a trailing backslash continues the message
      for (const l of ["line one\\\r", "line two\\\r"]) {
        pty.type(l);
        at = await pty.waitFor(/… /, at);
      }
      pty.type("line three\r");
      at = await pty.waitFor(/reply cut at 8 tokens[^]*> /, at);
      pty.type("/exit\r");
      expect(await pty.exited).toBe(0);
      const out = screen(pty);
      expect(count(out, CUT)).toBe(3); // three turns, not nine
      expect(count(out, "> line one\n… line two\n… line three\n")).toBe(3); // each shown as one message
      expect(count(out, `${onScreen(want)}\n${CUT}`)).toBe(3); // each answered as the three-line message
    } finally {
      pty.kill();
    }
  });

  it("edits as readline does; the screen shows the message as edited, wrapped and on several lines", async () => {
    const pty = chat(GREEDY, freshCache()); // the pty is 120 columns wide (COLUMNS)
    const rows = () => screenOf(pty.out, 120);
    const last = (n: number) => rows().slice(-n).join("\n");
    try {
      await pty.waitFor(/> /, 0, LOAD_MS);
      pty.type("hello world");
      await until("hello world", () => last(1) === "> hello world", pty);
      pty.type("\x1b[D".repeat(5)); // left x5
      pty.type("big ");
      pty.type("\x01>>"); // Ctrl-A: start of line
      pty.type("\x05!"); // Ctrl-E: end of line
      await until("the edited line", () => last(1) === "> >>hello big world!", pty);
      pty.type("\x17"); // Ctrl-W: the word before the cursor
      await until("Ctrl-W", () => last(1) === "> >>hello big", pty);
      pty.type("\x1b[1;5D\x1bb<"); // Ctrl-Left, Alt-B: a word back each
      await until("word moves", () => last(1) === "> <>>hello big", pty);
      pty.type("\x1b[1;5C\x0b"); // Ctrl-Right, Ctrl-K: the rest of the line
      await until("Ctrl-K", () => last(1) === "> <>>hello", pty);
      pty.type("\x15"); // Ctrl-U: the line
      await until("Ctrl-U", () => last(1) === ">", pty);
      // a long line wraps; inserting at its start reflows both rows
      pty.type("x".repeat(150));
      await until("a wrapped line", () => last(2) === `> ${"x".repeat(118)}\n${"x".repeat(32)}`, pty);
      pty.type("\x01AB");
      await until("an insert in a wrapped line", () => last(2) === `> AB${"x".repeat(116)}\n${"x".repeat(34)}`, pty);
      pty.type("\x1b[3~\x1b[3~\x08"); // Delete twice, then Backspace
      await until("Delete and Backspace", () => last(2) === `> A${"x".repeat(117)}\n${"x".repeat(31)}`, pty);
      pty.type("\x05\x15");
      await until("Ctrl-U", () => last(1) === ">", pty);
      // a pasted message, edited on its first line: up moves there, End to its end
      pty.type("\x1b[200~first\rsecond\x1b[201~");
      await until("the paste", () => last(2) === "> first\n… second", pty);
      pty.type("\x1b[A\x1b[FZ");
      await until("the edit", () => last(2) === "> firstZ\n… second", pty);
      pty.type("\r");
      await pty.waitFor(/reply cut at 8 tokens[^]*> /);
      pty.type("/history\r");
      await until("/history", () => rows().some((r) => r === "    1  firstZ") && rows().some((r) => r === "       second") && last(1) === ">", pty);
      pty.type("/exit\r");
      expect(await pty.exited).toBe(0);
    } finally {
      pty.kill();
    }
  });

  it("a message taller than the terminal is edited in a window that follows the cursor, and sent whole", async () => {
    const pty = chat(GREEDY, freshCache()); // 120 x 40 (COLUMNS, LINES)
    const rows = () => screenOf(pty.out, 120, 40);
    const lines = Array.from({ length: 60 }, (_, i) => `l${i + 1}`);
    try {
      await pty.waitFor(/> /, 0, LOAD_MS);
      pty.type(`\x1b[200~${lines.join("\r")}\x1b[201~`);
      await until("the paste", () => rows().at(-1) === "… l60", pty);
      for (let i = 0; i < 59; i++) pty.type("\x1b[A"); // up to the first line
      pty.type("\x01X"); // and edit it
      await until("the edit at the top", () => rows().at(-39) === "> Xl1", pty);
      expect(rows().slice(-39)).toEqual(["> Xl1", ...lines.slice(1, 39).map((l) => `… ${l}`)]);
      pty.type("\r");
      await pty.waitFor(/reply cut at 8 tokens[^]*> /);
      // on the terminal and in its scrollback: the message once, whole, as sent
      const all = rows();
      const at = all.indexOf("> Xl1");
      expect(at).toBeGreaterThanOrEqual(0);
      expect(all.slice(at, at + 60)).toEqual(["> Xl1", ...lines.slice(1).map((l) => `… ${l}`)]);
      expect(all.filter((r) => r === "… l30")).toHaveLength(1);
      pty.type("/exit\r");
      expect(await pty.exited).toBe(0);
    } finally {
      pty.kill();
    }
  });

  it("what is typed during a reply is not echoed into it; it starts the next message", async () => {
    const dir = freshCache();
    const pty = chat(["--seed", "3", "--max-tokens", "3000", "--ignore-eos"], dir);
    try {
      let at = await pty.waitFor(/> /, 0, LOAD_MS);
      pty.type("Hello there\r");
      at = await pty.waitFor(/Hello there\r*\n/, at);
      const replyStart = at;
      at = await pty.waitFor(/[^]{40}/, at);
      pty.type("zq7");
      await new Promise((r) => setTimeout(r, 200));
      pty.type("xkq\x7f\r"); // Backspace works; Enter during a reply sends nothing
      await new Promise((r) => setTimeout(r, 200));
      pty.type("\x1b[200~ pq9\rvw8\x1b[201~"); // a paste too
      at = await pty.waitFor(/[^]{80}/, at); // the reply goes on
      pty.type("\x03");
      at = await pty.waitFor(/\(stopped\)/, at);
      expect(pty.out.slice(replyStart, at)).not.toMatch(/zq7|xk|pq9|vw8/);
      at = await pty.waitFor(/> zq7xk pq9\r*\n… vw8/, at); // the next prompt starts with it
      pty.type(" more\r");
      at = await pty.waitFor(/> zq7xk pq9\r*\n… vw8 more\r*\n/, at);
      await pty.waitFor(/[^]{40}/, at);
      pty.type("\x03");
      at = await pty.waitFor(/\(stopped\)[^]*> /, at);
      pty.type("/exit\r");
      expect(await pty.exited).toBe(0);
      const saved = JSON.parse(readFileSync(join(dir, "chat-history.json"), "utf8")) as { entries: string[] };
      expect(saved.entries).toEqual(["Hello there", "zq7xk pq9\nvw8 more", "/exit"]);
    } finally {
      pty.kill();
    }
  });

  it("/help lists every command; an unknown one says so; Ctrl-C twice at the prompt quits", async () => {
    const pty = chat(GREEDY, freshCache());
    try {
      let at = await pty.waitFor(/> /, 0, LOAD_MS);
      pty.type("/help\r");
      at = await pty.waitFor(/Ctrl-C[^]*> /, at);
      const help = pty.out.slice(0, at);
      for (const c of ["/help", "/reset", "/history", "/clear-history", "/exit", "/quit"]) expect(help).toMatch(new RegExp(`\\n  (/\\w+, )?${c}\\b`));
      pty.type("/bogus\r");
      at = await pty.waitFor(/unknown command \/bogus: \/help lists the commands[^]*> /, at);
      pty.type("\x03");
      at = await pty.waitFor(/Ctrl-C again[^]*> /, at);
      pty.type("\x03");
      expect(await pty.exited).toBe(0);
      expect(screen(pty)).not.toContain(CUT); // no command reached the model
    } finally {
      pty.kill();
    }
  });

  it("keeps the input history across runs in DS3_CACHE_DIR: up recalls, bounded, atomic, private", async () => {
    const dir = freshCache();
    const file = join(dir, "chat-history.json");
    const one = chat(GREEDY, dir);
    try {
      let at = await one.waitFor(/> /, 0, LOAD_MS);
      one.type("first zq1\r");
      at = await one.waitFor(/reply cut at 8 tokens[^]*> /, at);
      one.type("\x1b[200~two\rlines\x1b[201~\r");
      at = await one.waitFor(/reply cut at 8 tokens[^]*> /, at);
      one.type("/exit\r");
      expect(await one.exited).toBe(0);
    } finally {
      one.kill();
    }
    expect(JSON.parse(readFileSync(file, "utf8"))).toEqual({ version: 1, entries: ["first zq1", "two\nlines", "/exit"] });
    expect(statSync(file).mode & 0o777).toBe(0o600);
    expect(readdirSync(dir).sort()).toEqual(["builtin-v1", "chat-history.json"]); // no temporary left

    const two = chat(GREEDY, dir);
    try {
      let at = await two.waitFor(/> /, 0, LOAD_MS);
      two.type("\x1b[A");
      at = await two.waitFor(/\/exit/, at);
      two.type("\x1b[A");
      at = await two.waitFor(/two\r*\n… lines/, at);
      two.type("\x1b[A");
      at = await two.waitFor(/first zq1/, at);
      two.type("\r");
      at = await two.waitFor(/reply cut at 8 tokens[^]*> /, at);
      two.type("/history\r");
      at = await two.waitFor(/\/history\r*\n[^]*\/history[^]*> /, at);
      expect(two.out.slice(0, at)).toMatch(/ 1 {2}first zq1\r?\n\s+2 {2}two\r?\n {7}lines\r?\n\s+3 {2}\/exit\r?\n\s+4 {2}first zq1/);
      two.type("/exit\r");
      expect(await two.exited).toBe(0);
    } finally {
      two.kill();
    }
    expect((JSON.parse(readFileSync(file, "utf8")) as { entries: string[] }).entries).toEqual(["first zq1", "two\nlines", "/exit", "first zq1", "/history", "/exit"]);

    // bounded: the newest 1000 entries
    writeFileSync(file, JSON.stringify({ version: 1, entries: Array.from({ length: 1200 }, (_, i) => `old ${i}`) }));
    const three = chat(GREEDY, dir);
    try {
      await three.waitFor(/> /, 0, LOAD_MS);
      three.type("/exit\r");
      expect(await three.exited).toBe(0);
    } finally {
      three.kill();
    }
    const bounded = (JSON.parse(readFileSync(file, "utf8")) as { entries: string[] }).entries;
    expect(bounded.length).toBe(1000);
    expect(bounded[0]).toBe("old 201");
    expect(bounded[999]).toBe("/exit");

    // /clear-history forgets it, on disk too; --no-history writes nothing
    const four = chat([...GREEDY, "--no-history"], dir);
    try {
      let at = await four.waitFor(/> /, 0, LOAD_MS);
      four.type("/clear-history\r");
      at = await four.waitFor(/input history cleared[^]*> /, at);
      four.type("/exit\r");
      expect(await four.exited).toBe(0);
    } finally {
      four.kill();
    }
    expect(readFileSync(file, "utf8")).toContain("old 201"); // --no-history: the file is not touched
    const five = chat(GREEDY, dir);
    try {
      let at = await five.waitFor(/> /, 0, LOAD_MS);
      five.type("/clear-history\r");
      at = await five.waitFor(/input history cleared[^]*> /, at);
      five.type("\x04"); // Ctrl-D on an empty line quits
      expect(await five.exited).toBe(0);
    } finally {
      five.kill();
    }
    expect(existsSync(file)).toBe(false);
  });

  it("two sessions at once keep each other's messages in the history, in the order sent", async () => {
    const dir = freshCache();
    const [a, b] = [chat(GREEDY, dir), chat(GREEDY, dir)];
    try {
      const at = [await a.waitFor(/> /, 0, LOAD_MS), await b.waitFor(/> /, 0, LOAD_MS)];
      const send = async (p: Pty, i: number, text: string) => {
        p.type(`${text}\r`);
        at[i] = await p.waitFor(/unknown command[^]*> /, at[i]); // commands: no model call
      };
      await send(a, 0, "/a1");
      await send(b, 1, "/b1");
      await send(a, 0, "/a2");
      a.type("\x1b[A\x1b[A"); // a sees b's message in its history
      at[0] = await a.waitFor(/> \/b1/, at[0]);
      a.type("\x15/exit\r");
      expect(await a.exited).toBe(0);
      b.type("/exit\r");
      expect(await b.exited).toBe(0);
    } finally {
      a.kill();
      b.kill();
    }
    expect(JSON.parse(readFileSync(join(dir, "chat-history.json"), "utf8")).entries).toEqual(["/a1", "/b1", "/a2", "/exit"]);
  });

  it("a corrupt or unreadable history file is a warning, not a crash", async () => {
    const dir = freshCache();
    const file = join(dir, "chat-history.json");
    for (const [bad, why] of [
      ["{not json", /not valid JSON/],
      [JSON.stringify({ version: 1, entries: [1, 2] }), /not a ds3 chat history/],
    ] as const) {
      writeFileSync(file, bad);
      const pty = chat(GREEDY, dir);
      try {
        let at = await pty.waitFor(/> /, 0, LOAD_MS);
        expect(pty.out).toMatch(new RegExp(`warning: chat history ${file.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")} is unreadable \\(${why.source}`));
        pty.type("hi\r");
        at = await pty.waitFor(/reply cut at 8 tokens[^]*> /, at);
        pty.type("/exit\r");
        expect(await pty.exited).toBe(0);
      } finally {
        pty.kill();
      }
      expect(JSON.parse(readFileSync(file, "utf8"))).toEqual({ version: 1, entries: ["hi", "/exit"] });
    }
    // a directory where the file should be: a warning at start and at the first save, and the chat works
    rmSync(file);
    mkdirSync(file);
    const pty = chat(GREEDY, dir);
    try {
      let at = await pty.waitFor(/> /, 0, LOAD_MS);
      expect(pty.out).toMatch(/warning: chat history .* is unreadable \(it is a directory\)/);
      pty.type("hi\r");
      at = await pty.waitFor(/reply cut at 8 tokens[^]*> /, at);
      expect(pty.out).toMatch(/warning: cannot save the chat history/);
      pty.type("/exit\r");
      expect(await pty.exited).toBe(0);
    } finally {
      pty.kill();
    }
  });

  it("--prompt sends a first message, then stays interactive", async () => {
    const want = await generated("Hello from the flag", 8);
    const pty = chat([...GREEDY, "--prompt", "Hello from the flag"], freshCache());
    try {
      let at = await pty.waitFor(/> Hello from the flag\r*\n/, 0, LOAD_MS);
      at = await pty.waitFor(/reply cut at 8 tokens[^]*> /, at);
      pty.type("/exit\r");
      expect(await pty.exited).toBe(0);
      expect(screen(pty)).toContain(`> Hello from the flag\n${onScreen(want)}\n${CUT}`);
    } finally {
      pty.kill();
    }
  });
});

describe("chat with stdin not a terminal", () => {
  it("reads one message per line (a trailing \\ continues), commands too; no escape codes", async () => {
    const r = ok(await ds3(["chat", ...GREEDY], { input: "line one\\\nline two\\\nline three\n/reset\n/help\nHello again\n/exit\nnever sent\n" }));
    const want = await generated("line one\nline two\nline three", 8);
    expect(r.stdout.startsWith(`${want}\n`)).toBe(true);
    expect(count(r.stderr, CUT)).toBe(2);
    expect(r.stderr).toMatch(/history cleared/);
    expect(r.stderr).toContain("/clear-history");
    expect(r.stdout + r.stderr).not.toContain("\x1b");
  });

  it("--prompt with stdin not a terminal answers it and reads the rest; with nothing at all it says what it needs", async () => {
    const want = await generated("Hello from the flag", 8);
    const r = ok(await ds3(["chat", ...GREEDY, "--prompt", "Hello from the flag"]));
    expect(r.stdout).toBe(`${want}\n`);
    const more = ok(await ds3(["chat", ...GREEDY, "--prompt", "Hello from the flag"], { input: "And a second one\n" }));
    expect(more.stdout.startsWith(`${want}\n`)).toBe(true);
    expect(count(more.stderr, CUT)).toBe(2);
    const none = ok(await ds3(["chat", ...GREEDY]));
    expect(none.stdout).toBe("");
    expect(none.stderr).toMatch(/stdin is not a terminal and gave no message: pipe one message per line .*or give --prompt/);
    const empty = await ds3(["chat", "--prompt", " "]);
    expect(empty.code).not.toBe(0);
    expect(empty.stderr).toMatch(/ds3: error: --prompt is empty/);
  });

  it("a full context drops the oldest exchanges with a one-line notice, the system prompt kept", async () => {
    const system = "Be brief.";
    const lines = Array.from({ length: 6 }, (_, i) => `message number ${i + 1} of the conversation`);
    // replies end at a newline (a stop string, never printed): stdout is then one reply per line
    const args = ["--max-model-len", "96", "--max-tokens", "16", "--ignore-eos", "--temperature", "0", "--stop", "\n"];
    const r = ok(await ds3(["chat", ...args, "--system", system], { input: `${lines.join("\n")}\n` }));
    expect(r.stderr).not.toMatch(/error/);
    const replies = r.stdout.split("\n").slice(0, -1);
    expect(replies).toHaveLength(6); // every message answered
    const notices = r.stderr.split("\n").filter((l) => /context full/.test(l));
    // the same conversation replayed with the reference template: which exchanges fit in 96 - 16 tokens
    let kept: ChatMessage[] = [];
    const shifts: Array<{ turn: number; dropped: number; ids: number[] }> = [];
    lines.forEach((line, turn) => {
      let turns: ChatMessage[] = [...kept, { role: "user", content: line }];
      let dropped = 0;
      while (render([{ role: "system", content: system }, ...turns]).length + 16 > 96) {
        turns = turns.slice(2);
        dropped++;
      }
      if (dropped) shifts.push({ turn, dropped, ids: render([{ role: "system", content: system }, ...turns]) });
      kept = [...turns, { role: "assistant", content: replies[turn]! }];
    });
    expect(shifts.length).toBeGreaterThan(0);
    expect(notices).toEqual(shifts.map((x) => `ds3: context full: dropped the oldest ${x.dropped === 1 ? "exchange" : `${x.dropped} exchanges`} to fit the 96-token context (--max-model-len); the system prompt is kept`));
    // each reply after a shift is generate's greedy reply to that prompt: system prompt first, then the newest exchanges
    for (const x of shifts) {
      const g = ok(await ds3(["generate", "--prompt-ids", x.ids.join(","), ...args, "--json"]));
      expect(JSON.parse(g.stdout).text, `turn ${x.turn + 1}`).toBe(replies[x.turn]);
    }
    // a message that cannot fit at all is refused with the reason; the chat goes on
    const long = ok(await ds3(["chat", "--max-model-len", "64", "--max-tokens", "8", "--ignore-eos", "--temperature", "0"], { input: `${"word ".repeat(100)}\nshort\n` }));
    expect(long.stderr).toMatch(/error: the message is too long: with the chat template it is \d+ tokens, and the context holds 64 \(--max-model-len\)/);
    expect(count(long.stderr, "(reply cut at 8 tokens)")).toBe(1);
  });
});

describe("fitting the conversation into the context", () => {
  it("drops whole exchanges, oldest first, just as many as needed; keeps the system prompt and the new message", () => {
    const conv: ChatMessage[] = [{ role: "system", content: "You are a careful assistant." }];
    for (let i = 0; i < 6; i++) conv.push({ role: "user", content: `question ${i}: what is ${i} times ${i}?` }, { role: "assistant", content: `It is ${i * i}, as ${i} x ${i} = ${i * i}.` });
    conv.push({ role: "user", content: "and the next one?" });
    const full = render(conv).length;
    const maxTokens = 20;
    expect(fitContext(conv, render, full + maxTokens, maxTokens)).toMatchObject({ dropped: 0, maxTokens, messages: conv });
    for (const maxLen of [full + maxTokens - 1, full, Math.floor(full / 2) + maxTokens]) {
      const f = fitContext(conv, render, maxLen, maxTokens);
      expect(f.dropped).toBeGreaterThan(0);
      expect(f.messages).toEqual([conv[0], ...conv.slice(1 + 2 * f.dropped)]);
      expect(f.ids).toEqual(render(f.messages));
      expect(f.ids.length + maxTokens).toBeLessThanOrEqual(maxLen);
      // one exchange fewer dropped would not fit
      expect(render([conv[0]!, ...conv.slice(1 + 2 * (f.dropped - 1))]).length + maxTokens).toBeGreaterThan(maxLen);
    }
  });

  it("gives the reply the room left when the new message alone leaves less than max tokens, and refuses one that cannot fit", () => {
    const conv: ChatMessage[] = [
      { role: "user", content: "an old question" },
      { role: "assistant", content: "an old answer" },
      { role: "user", content: "a new question" },
    ];
    const alone = render(conv.slice(2)).length;
    const f = fitContext(conv, render, alone + 5, 100);
    expect(f).toMatchObject({ dropped: 1, maxTokens: 5, messages: conv.slice(2) });
    expect(() => fitContext(conv, render, alone, 100)).toThrow(ContextError);
    expect(() => fitContext(conv, render, alone, 100)).toThrow(/the message is too long: with the chat template it is \d+ tokens, and the context holds \d+/);
  });
});
