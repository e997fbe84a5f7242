// One node of a two-node group through the API, for the leak checks: it never calls
// process.exit, so the test sees whether anything (a socket, a timer, a worker) keeps the process
// alive after the group ended. Prints JSON lines: what happened, then the resources still active
// once it is done (process.getActiveResourcesInfo()), and how long after that it exited.
//   node multinode-api.mjs MODEL HOST:PORT RANK TP   (rank 0: DS3.load, a greedy completion, close;
//                                                     rank 1: DS3.runNode until node 0 ends)
import { cpu } from "@ds3/backend-cpu";
import { DS3 } from "@ds3/core";

const [model, addr, rank, tp] = process.argv.slice(2);
const o = { model, backend: cpu, tp: Number(tp), nnodes: 2, nodeRank: Number(rank), distInitAddr: addr, distTimeoutMs: 60_000, backendOptions: { threads: 1 }, cacheBlocks: 16 };
const say = (x) => process.stdout.write(`${JSON.stringify(x)}\n`);
try {
  if (rank !== "0") {
    await DS3.runNode(o);
    say({ ok: true });
  } else {
    const ds3 = await DS3.load(o);
    const ids = [];
    for await (const c of ds3.complete({ prompt: [0, 5, 7, 9], sampling: { temperature: 0, maxTokens: 4, ignoreEos: true } })) ids.push(...c.ids);
    await ds3.close();
    say({ ok: true, ids });
  }
} catch (e) {
  say({ ok: false, error: e.message });
  process.exitCode = 1;
}
// what is left once the group ended (after pending callbacks ran), and how long the process then
// takes to exit by itself (a socket, a timer or a worker left behind would hold it)
const done = performance.now();
setImmediate(() => say({ resources: process.getActiveResourcesInfo() }));
process.on("exit", () => say({ exitAfterMs: Math.round(performance.now() - done) }));
