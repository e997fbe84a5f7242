// One node of a two-node group (tp 2 = 1+1) on the tiny-memory test backend
// (multinode-tinymem-backend.mjs; DS3_TEST_DEVICE_MEMORY sets this node's device memory): node 0
// loads (DS3.load) and closes, node 1 runs its rank (DS3.runNode). Prints one JSON line:
// {ok} or {ok: false, name, message}, and exits 1 on an error.
//   node multinode-fit.mjs MODEL HOST:PORT RANK
import { DS3 } from "@ds3/core";
import { tinyMemoryBackend } from "./multinode-tinymem-backend.mjs";

const [model, addr, rank] = process.argv.slice(2);
const o = { model, backend: tinyMemoryBackend, tp: 2, nnodes: 2, nodeRank: Number(rank), distInitAddr: addr, distTimeoutMs: 60_000, backendOptions: { threads: 1 }, cacheBlocks: 4 };
try {
  if (rank !== "0") await DS3.runNode(o);
  else await (await DS3.load(o)).close();
  console.log(JSON.stringify({ ok: true }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, name: e.name, message: e.message }));
  process.exitCode = 1;
}
