// Both roles of a two-node group on the bootstrap test backend (multinode-bootstrap-backend.mjs):
//   node multinode-bootstrap.mjs MODEL HOST:PORT 0   -> loads tp 4 = 2+2, runs one step, prints
//                                                      {devices: every rank's device, logits}
//   node multinode-bootstrap.mjs MODEL HOST:PORT 1   -> DS3.runNode until node 0 ends
import { DS3 } from "@ds3/core";
import { bootstrapBackend } from "./multinode-bootstrap-backend.mjs";

const [model, addr, rank] = process.argv.slice(2);
const o = { model, backend: bootstrapBackend, tp: 4, nnodes: 2, nodeRank: Number(rank), distInitAddr: addr, distTimeoutMs: 60_000, backendOptions: { threads: 1 } };
if (rank !== "0") await DS3.runNode(o);
else {
  const ds3 = await DS3.load({ ...o, cacheBlocks: 4 });
  const logits = await ds3.executor.step({
    ids: Int32Array.from([0, 5]),
    positions: Int32Array.from([0, 1]),
    seqIdx: new Int32Array(2),
    blockTables: Int32Array.from([0]),
    maxBlocks: 1,
    logitRows: Int32Array.from([1]),
  });
  console.log(JSON.stringify({ devices: ds3.executor.rankDevices, logits: Array.from(logits.subarray(0, 8)) }));
  await ds3.close();
}
