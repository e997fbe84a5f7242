// Node 0 of a multi-node group, through the API (the test's child process): loads tiny-v3 with
// `{ nnodes, nodeRank: 0, distInitAddr }`, runs every golden prompt through the executor (one
// prefill step, the logits of every position) and writes them, prompt after prompt, as raw
// float32 to OUT. With --one-node it then loads the same tp in this one process and writes
// those logits to OUT.one (the test compares them bit for bit).
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
    const all = new Float32Array(parts.reduce((n, x) => n + x.length, 0));
    let off = 0;
    for (const x of parts) all.set(x, (off += x.length) - x.length);
    return all;
  } finally {
    await ds3.close();
  }
}

const multi = await logits({ nnodes: Number(nnodes), nodeRank: 0, distInitAddr: addr, distTimeoutMs: 60_000 });
writeFileSync(out, multi);
if (flag === "--one-node") writeFileSync(`${out}.one`, await logits({}));
