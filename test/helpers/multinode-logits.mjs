// Node 0 of a multi-node group, through the API (the test's child process): loads tiny-v3 with
// `{ nnodes, nodeRank: 0, distInitAddr }`, runs every golden prompt through the executor (one
// prefill step, the logits of every position) and writes them, prompt after prompt, as raw
// float32 to OUT, then all prompts as one batch (one step, one sequence each) to OUT.batch. With
// --one-node it then loads the same tp in this one process and writes those logits to OUT.one and
// OUT.one.batch (the test compares them bit for bit).
//   node multinode-logits.mjs MODEL TP NNODES HOST:PORT OUT [--one-node]
import { writeFileSync } from "node:fs";
import { cpu } from "@ds3/backend-cpu";
import { DS3 } from "@ds3/core";

const [model, tp, nnodes, addr, out, flag] = process.argv.slice(2);
const golden = JSON.parse((await import("node:fs")).readFileSync(`${model}/golden.json`, "utf8"));

async function logits(opts) {
  const ds3 = await DS3.load({ model, backend: cpu, tp: Number(tp), cacheBlocks: 16, ...opts });
  try {
    const parts = [];
    for (const p of golden.prompts) {
      const L = p.ids.length;
      parts.push(
        await ds3.executor.step({
          ids: Int32Array.from(p.ids),
          positions: Int32Array.from({ length: L }, (_, i) => i),
          seqIdx: new Int32Array(L),
          blockTables: Int32Array.from({ length: 8 }, (_, i) => i),
          maxBlocks: 8,
          logitRows: Int32Array.from({ length: L }, (_, i) => i),
        }),
      );
    }
    // then all of them as one batch: one step, every prompt its own sequence (its own blocks), every position's logits
    const L = golden.prompts.map((p) => p.ids.length);
    const maxBlocks = Math.max(...L.map((n) => Math.ceil(n / 64)));
    const tables = new Int32Array(L.length * maxBlocks).fill(-1);
    let block = 0;
    L.forEach((n, s) => {
      for (let b = 0; b < Math.ceil(n / 64); b++) tables[s * maxBlocks + b] = block++;
    });
    const total = L.reduce((a, n) => a + n, 0);
    const batch = await ds3.executor.step({
      ids: Int32Array.from(golden.prompts.flatMap((p) => p.ids)),
      positions: Int32Array.from(L.flatMap((n) => Array.from({ length: n }, (_, i) => i))),
      seqIdx: Int32Array.from(L.flatMap((n, s) => Array.from({ length: n }, () => s))),
      blockTables: tables,
      maxBlocks,
      logitRows: Int32Array.from({ length: total }, (_, i) => i),
    });
    const all = new Float32Array(parts.reduce((n, x) => n + x.length, 0));
    let off = 0;
    for (const x of parts) all.set(x, (off += x.length) - x.length);
    return { all, batch };
  } finally {
    await ds3.close();
  }
}

const multi = await logits({ nnodes: Number(nnodes), nodeRank: 0, distInitAddr: addr, distTimeoutMs: 60_000 });
writeFileSync(out, multi.all);
writeFileSync(`${out}.batch`, multi.batch);
if (flag === "--one-node") {
  const one = await logits({});
  writeFileSync(`${out}.one`, one.all);
  writeFileSync(`${out}.one.batch`, one.batch);
}
