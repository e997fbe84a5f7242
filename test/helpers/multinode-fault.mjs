// Node 0 of two, with one rank on node 1 made to fail (the ranks' test hook): joins node 1
// through NodeHub, runs step 0 (fine) and step 1 (rank 1 throws, exits or hangs there), and
// prints one JSON line: step 0's logit count, step 1's error, the executor's failure (what
// /health reports), and how long step 1 took.
//   node multinode-fault.mjs MODEL HOST:PORT throw|exit|hang
import { RankExecutor, NodeHub, ds3Version, modelIdentity, resolvePrecision } from "@ds3/core";

const [dir, addr, kind] = process.argv.slice(2);
const hub = await NodeHub.listen({
  addr,
  timeoutMs: 60_000,
  me: { version: ds3Version(), nnodes: 2, nodeRank: 0, worldSize: 2, model: modelIdentity(dir), backend: "cpu", precision: resolvePrecision({}) },
});
const ex = await RankExecutor.create(dir, {
  backendPackage: "@ds3/backend-cpu",
  cache: { numBlocks: 16, blockSize: 64, dtype: "f32" },
  worldSize: 2,
  threadsPerRank: 1,
  nodes: hub,
  stepTimeoutMs: 3_000,
  faultInjection: { rank: 1, kind, atStep: 1 },
});
const step = (ids, start) => ({
  ids: Int32Array.from(ids),
  positions: Int32Array.from(ids, (_, i) => start + i),
  seqIdx: new Int32Array(ids.length),
  blockTables: Int32Array.from({ length: 4 }, (_, i) => i),
  maxBlocks: 4,
  logitRows: Int32Array.from([ids.length - 1]),
});
const first = await ex.step(step([0, 5, 7], 0));
const t0 = performance.now();
let error = null;
try {
  await ex.step(step([9], 3));
} catch (e) {
  error = e.message;
}
const ms = Math.round(performance.now() - t0);
const failed = ex.failed?.message ?? null;
await ex.close();
console.log(JSON.stringify({ logits: first.length, error, failed, ms }));
