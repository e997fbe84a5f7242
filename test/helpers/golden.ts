// Reading the golden reference files (shared/golden, copied into test/fixtures).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const FIXTURES = fileURLToPath(new URL("../fixtures/", import.meta.url));

export interface GoldenPrompt {
  ids: number[];
  logits: Float32Array; // [L, V]
  greedy: number[];
  margins: number[];
  mtp: Float32Array | null; // [L-1, V]
}

export interface Golden {
  dir: string;
  vocab: number;
  prompts: GoldenPrompt[];
}

interface RawPrompt {
  ids: number[];
  logits_offset: number;
  logits_shape: [number, number];
  greedy: number[];
  greedy_margins: number[];
  mtp_logits_offset?: number;
  mtp_logits_shape?: [number, number];
}

export function loadGolden(name: "tiny-v3" | "tiny-v3-bf16"): Golden {
  const dir = join(FIXTURES, name);
  const g = JSON.parse(readFileSync(join(dir, "golden.json"), "utf8")) as { prompts: RawPrompt[] };
  const buf = readFileSync(join(dir, "golden.f32"));
  const f32 = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
  // offsets in golden.json are byte offsets into golden.f32
  const view = (off: number, shape: [number, number]) => f32.slice(off / 4, off / 4 + shape[0] * shape[1]);
  const prompts = g.prompts.map((p) => ({
    ids: p.ids,
    logits: view(p.logits_offset, p.logits_shape),
    greedy: p.greedy,
    margins: p.greedy_margins,
    mtp: p.mtp_logits_offset !== undefined && p.mtp_logits_shape ? view(p.mtp_logits_offset, p.mtp_logits_shape) : null,
  }));
  return { dir, vocab: g.prompts[0]!.logits_shape[1], prompts };
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

export function argmax(a: ArrayLike<number>, from = 0, n = a.length - from): number {
  let best = 0;
  for (let i = 1; i < n; i++) if (a[from + i]! > a[from + best]!) best = i;
  return best;
}

/** Greedy ids must equal the reference up to the first step whose reference margin is below 1e-3. */
export function comparableGreedyPrefix(g: GoldenPrompt): number {
  const k = g.margins.findIndex((m) => m < 1e-3);
  return k < 0 ? g.greedy.length : k; // the step with the tiny margin may go either way
}

/** One sequence of L tokens at positions [start, start+L) in blocks 0.. */
export function seqStep(ids: number[], start = 0, maxBlocks = 16, logitRows?: number[]) {
  const L = ids.length;
  return {
    ids: Int32Array.from(ids),
    positions: Int32Array.from({ length: L }, (_, i) => start + i),
    seqIdx: new Int32Array(L),
    blockTables: Int32Array.from({ length: maxBlocks }, (_, i) => i),
    maxBlocks,
    logitRows: Int32Array.from(logitRows ?? Array.from({ length: L }, (_, i) => i)),
  };
}
