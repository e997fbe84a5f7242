// The input history of `ds3 chat` (what up/down recall): one JSON file in ds3's cache
// directory (where the built-in model goes: $DS3_CACHE_DIR, else $XDG_CACHE_HOME/ds3, else
// ~/.cache/ds3), so it is per user. Bounded (the newest MAX_ENTRIES entries, at most
// MAX_BYTES of file), written atomically (a temporary file renamed over it), private (0600).
// A missing file is an empty history; a corrupt or unreadable one is a warning, never a crash.
import { mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { builtinModelDir } from "@ds3/core";
import { warn } from "./ui.js";

export const MAX_ENTRIES = 1000;
export const MAX_BYTES = 1 << 20;
const VERSION = 1;

/** <cache dir>/chat-history.json: the cache root is the built-in model's parent directory. */
export function historyPath(): string {
  return join(dirname(builtinModelDir()), "chat-history.json");
}

type Read = { ok: true; entries: string[] } | { ok: false; why: string; missing?: boolean };

function readEntries(file: string): Read {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ENOENT") return { ok: false, why: "no such file", missing: true };
    return { ok: false, why: code === "EISDIR" ? "it is a directory" : (e as Error).message };
  }
  let o: unknown;
  try {
    o = JSON.parse(text);
  } catch (e) {
    return { ok: false, why: `not valid JSON (${(e as Error).message})` };
  }
  const entries = (o as { entries?: unknown })?.entries;
  if ((o as { version?: unknown })?.version !== VERSION || !Array.isArray(entries) || !entries.every((x) => typeof x === "string"))
    return { ok: false, why: `not a ds3 chat history (expected {"version":${VERSION},"entries":[strings]})` };
  return { ok: true, entries: entries as string[] };
}

/** The newest entries that fit the bounds. */
export function bound(entries: string[]): string[] {
  let out = entries.slice(-MAX_ENTRIES);
  let bytes = Buffer.byteLength(JSON.stringify({ version: VERSION, entries: out }));
  let i = 0;
  while (bytes > MAX_BYTES && i < out.length) bytes -= Buffer.byteLength(JSON.stringify(out[i++])) + 1;
  if (i > 0) out = out.slice(i);
  return out;
}

export class InputHistory {
  /** Oldest first. */
  entries: string[] = [];
  private saveWarned = false;

  /** `file` null: a history for this session only (--no-history). */
  constructor(readonly file: string | null) {
    if (!file) return;
    const r = readEntries(file);
    if (r.ok) this.entries = bound(r.entries);
    else if (!r.missing) warn(`chat history ${file} is unreadable (${r.why}): starting with an empty history; it is replaced when you send a message`);
  }

  /** Record an entry (not a repeat of the last one) and save: merged with what other sessions saved meanwhile. */
  add(entry: string): void {
    if (entry.trim() === "" || this.entries[this.entries.length - 1] === entry) return;
    let base = this.entries;
    if (this.file) {
      const r = readEntries(this.file);
      if (r.ok) base = r.entries;
    }
    this.entries = bound(base[base.length - 1] === entry ? base : [...base, entry]);
    if (this.file) this.write(this.entries);
  }

  /** Forget every entry, on disk too. */
  clear(): void {
    this.entries = [];
    if (!this.file) return;
    try {
      rmSync(this.file, { force: true });
    } catch (e) {
      warn(`cannot remove the chat history ${this.file}: ${(e as Error).message}`);
    }
  }

  private write(entries: string[]): void {
    const file = this.file!;
    const tmp = `${file}.tmp-${process.pid}-${Math.random().toString(36).slice(2, 8)}`;
    try {
      mkdirSync(dirname(file), { recursive: true });
      writeFileSync(tmp, `${JSON.stringify({ version: VERSION, entries })}\n`, { mode: 0o600 });
      renameSync(tmp, file);
    } catch (e) {
      rmSync(tmp, { force: true });
      if (!this.saveWarned) warn(`cannot save the chat history to ${file}: ${(e as Error).message}`);
      this.saveWarned = true;
    }
  }
}
