// CPU backend throughput on tiny-v3 (a benchmark that reports; nothing is asserted).
//   node bench/cpu.mjs [--model DIR] [--threads N]
// Prefill: one 300-token prompt, tokens/s. Decode: greedy, batch 1, 8, 32, tokens/s.
// Engine: 1, 8, 32 concurrent requests through continuous batching, tokens/s.
import { cpu } from "@ds3/backend-cpu";
import { Engine, LocalExecutor } from "@ds3/core";
import { availableParallelism, cpus } from "node:os";
import { parseArgs } from "node:util";
import { fileURLToPath } from "node:url";
import { mkdirSync, writeFileSync } from "node:fs";

const { values } = parseArgs({ options: { model: { type: "string" }, threads: { type: "string" } } });
const dir = values.model ?? fileURLToPath(new URL("../test/fixtures/tiny-v3", import.meta.url));
const threads = Number(values.threads ?? availableParallelism());
const ex = new LocalExecutor(dir, { backend: cpu, backendOptions: { threads }, cache: { numBlocks: 256, blockSize: 64, dtype: "f32" }, mtp: false });
const V = ex.vocabSize;
const now = () => performance.now();
const seq = (ids, start, maxBlocks, logitRows, seqIdx = 0, blocks = [...Array(maxBlocks).keys()]) => ({
  ids: Int32Array.from(ids), positions: Int32Array.from(ids.map((_, i) => start + i)), seqIdx: new Int32Array(ids.length).fill(seqIdx),
  blockTables: Int32Array.from(blocks), maxBlocks, logitRows: Int32Array.from(logitRows),
});
const results = { machine: `${cpus()[0]?.model} x${availableParallelism()}`, threads, model: dir };

// prefill
const prompt = Array.from({ length: 300 }, (_, i) => (i * 7919) % V);
await ex.step(seq(prompt, 0, 8, [299]));
let t = now();
const reps = 5;
for (let r = 0; r < reps; r++) await ex.step(seq(prompt, 0, 8, [299]));
results.prefill_300_tok_s = (reps * 300) / ((now() - t) / 1000);

// raw decode steps at batch B, context ~128
for (const B of [1, 8, 32]) {
  const maxBlocks = 4;
  const bt = [];
  for (let b = 0; b < B; b++) for (let j = 0; j < maxBlocks; j++) bt.push(b * maxBlocks + j);
  // prefill each sequence's 128-token context
  const ctx = Array.from({ length: 128 }, (_, i) => (i * 31 + 7) % V);
  const ids = [], pos = [], sidx = [];
  for (let b = 0; b < B; b++) ctx.forEach((x, i) => { ids.push(x); pos.push(i); sidx.push(b); });
  await ex.step({ ids: Int32Array.from(ids), positions: Int32Array.from(pos), seqIdx: Int32Array.from(sidx), blockTables: Int32Array.from(bt), maxBlocks, logitRows: new Int32Array(0) });
  const steps = 20;
  t = now();
  for (let s = 0; s < steps; s++) {
    await ex.step({
      ids: Int32Array.from({ length: B }, (_, b) => (b + s) % V), positions: new Int32Array(B).fill(128 + s), seqIdx: Int32Array.from({ length: B }, (_, b) => b),
      blockTables: Int32Array.from(bt), maxBlocks, logitRows: Int32Array.from({ length: B }, (_, b) => b),
    });
  }
  const sec = (now() - t) / 1000;
  results[`decode_b${B}_ctx128_tok_s`] = (B * steps) / sec;
  results[`decode_b${B}_ms_per_step`] = (sec * 1000) / steps;
}

// engine: concurrent requests (prompt 64, 32 new tokens each)
for (const C of [1, 8, 32]) {
  const e = new Engine({ executor: ex, eosIds: [], prefixCaching: false });
  t = now();
  const outs = await Promise.all(Array.from({ length: C }, async (_, i) => {
    let n = 0;
    for await (const ev of e.generate({ promptIds: Array.from({ length: 64 }, (_, j) => (i * 101 + j * 13) % V), sampling: { temperature: 0, maxTokens: 32 } })) n += ev.ids.length;
    return n;
  }));
  const sec = (now() - t) / 1000;
  results[`engine_c${C}_gen_tok_s`] = outs.reduce((a, b) => a + b, 0) / sec;
}
await ex.close();
console.log(JSON.stringify(results, null, 2));
mkdirSync(new URL("./results/", import.meta.url), { recursive: true });
writeFileSync(new URL("./results/cpu-tiny-v3.json", import.meta.url), JSON.stringify(results, null, 2) + "\n");
