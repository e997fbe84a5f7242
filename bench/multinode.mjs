// Per-step overhead of ranks across nodes (a benchmark that reports; nothing is asserted):
// tiny-v3 decode steps/s at tp 2 with both ranks in this process (one node) and with rank 1 in a
// second process (two nodes, 1+1, on loopback: the init connection carries every step's input
// and the host collective). Batch 1 and batch 8, context 64, greedy-shaped steps straight
// through the executor (no engine, no sampling), and prefill of one 300-token prompt.
//   node bench/multinode.mjs [--steps 200] [--tag NAME]
import { spawn } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { availableParallelism, cpus, loadavg } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { cpu } from "@ds3/backend-cpu";
import { DS3 } from "@ds3/core";

const { values } = parseArgs({ options: { steps: { type: "string" }, tag: { type: "string" } } });
const ROOT = fileURLToPath(new URL("..", import.meta.url));
const MODEL = join(ROOT, "test/fixtures/tiny-v3");
const STEPS = Number(values.steps ?? 200);
const load = () => loadavg().map((x) => Number(x.toFixed(2)));

const freePort = () =>
  new Promise((resolve) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });

/** steps/s of `n` decode steps at batch B (each sequence at its own position from 64 on) */
async function decode(ex, B, n) {
  const maxBlocks = 4;
  const step = (i) => ({
    ids: Int32Array.from({ length: B }, (_, b) => (7 * b + i) % 1000),
    positions: Int32Array.from({ length: B }, () => 64 + (i % 128)),
    seqIdx: Int32Array.from({ length: B }, (_, b) => b),
    blockTables: Int32Array.from({ length: B * maxBlocks }, (_, j) => j % (B * maxBlocks)),
    maxBlocks,
    logitRows: Int32Array.from({ length: B }, (_, b) => b),
  });
  for (let i = 0; i < 10; i++) await ex.step(step(i)); // warm up
  const t0 = performance.now();
  for (let i = 0; i < n; i++) await ex.step(step(i));
  return n / ((performance.now() - t0) / 1000);
}

async function prefill(ex, L) {
  const s = {
    ids: Int32Array.from({ length: L }, (_, i) => (i * 13) % 1000),
    positions: Int32Array.from({ length: L }, (_, i) => i),
    seqIdx: new Int32Array(L),
    blockTables: Int32Array.from({ length: 8 }, (_, i) => i),
    maxBlocks: 8,
    logitRows: Int32Array.from([L - 1]),
  };
  await ex.step(s);
  const t0 = performance.now();
  const reps = 5;
  for (let i = 0; i < reps; i++) await ex.step(s);
  return (reps * L) / ((performance.now() - t0) / 1000);
}

async function measure(ds3) {
  const ex = ds3.executor;
  const r = { decode_b1_steps_per_s: await decode(ex, 1, STEPS), decode_b8_steps_per_s: await decode(ex, 8, STEPS), prefill_300_tok_per_s: await prefill(ex, 300), load: load() };
  return Object.fromEntries(Object.entries(r).map(([k, v]) => [k, typeof v === "number" ? Number(v.toFixed(1)) : v]));
}

// same threads per rank in both runs: one each (this machine has few cores; two processes of one node's threads would oversubscribe)
const base = { model: MODEL, backend: cpu, tp: 2, cacheBlocks: 64, backendOptions: { threads: 1 } };

const one = await DS3.load(base);
const oneNode = await measure(one);
await one.close();
console.error("one node (tp 2 in this process):", oneNode);

const addr = `127.0.0.1:${await freePort()}`;
// node 1 through the API (as `ds3 generate --node-rank 1` runs it), with the same one thread per rank
const node1 = spawn(
  process.execPath,
  [
    "--input-type=module",
    "-e",
    `import { cpu } from "@ds3/backend-cpu"; import { DS3 } from "@ds3/core";
     await DS3.runNode({ model: ${JSON.stringify(MODEL)}, backend: cpu, tp: 2, backendOptions: { threads: 1 }, nnodes: 2, nodeRank: 1, distInitAddr: ${JSON.stringify(addr)} });`,
  ],
  { cwd: join(ROOT, "bench"), stdio: ["ignore", "ignore", "inherit"] },
);
const two = await DS3.load({ ...base, nnodes: 2, nodeRank: 0, distInitAddr: addr, distTimeoutMs: 60_000 });
const twoNodes = await measure(two);
await two.close();
await new Promise((r) => node1.on("exit", r));
console.error("two nodes (1+1, loopback):", twoNodes);

// the machine's own round trip on loopback, for scale: 2,000 ping-pongs of a step-sized message
// (a 1-token decode step's StepInput, v8-serialized as the init connection sends it) with a child
async function loopbackRttMs() {
  const port = await freePort();
  const child = spawn(
    process.execPath,
    ["-e", `const s = require("node:net").createServer((c) => { c.setNoDelay(true); c.on("data", (d) => c.write(d)); }); s.listen(${port}, "127.0.0.1", () => console.log("up"));`],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  await new Promise((r) => child.stdout.once("data", r));
  const { connect } = await import("node:net");
  const { serialize } = await import("node:v8");
  const sock = connect({ host: "127.0.0.1", port });
  sock.setNoDelay(true);
  await new Promise((r) => sock.once("connect", r));
  const msg = serialize({ t: "task", id: 1, rank: 1, task: { kind: "step", step: 1, input: { ids: new Int32Array(1), positions: new Int32Array(1), seqIdx: new Int32Array(1), blockTables: new Int32Array(4), maxBlocks: 4, logitRows: new Int32Array(1) } } });
  const once = () => new Promise((r) => { let got = 0; const f = (d) => { got += d.length; if (got >= msg.length) { sock.off("data", f); r(); } }; sock.on("data", f); sock.write(msg); });
  for (let i = 0; i < 200; i++) await once();
  const N = 2000;
  const t0 = performance.now();
  for (let i = 0; i < N; i++) await once();
  const ms = (performance.now() - t0) / N;
  sock.destroy();
  child.kill();
  return Number(ms.toFixed(3));
}
const rtt = await loopbackRttMs();
console.error("loopback round trip (ms):", rtt);

const perStepMs = (a, b) => Number((1000 / b - 1000 / a).toFixed(3));
const result = {
  what: "tiny-v3 at tp 2: both ranks in one process vs rank 1 in a second process (1+1 nodes, 127.0.0.1); executor steps without engine or sampling; 1 backend thread per rank",
  machine: { cpus: cpus()[0]?.model, cores: availableParallelism() },
  steps: STEPS,
  one_node: oneNode,
  two_nodes: twoNodes,
  overhead_ms_per_step: { decode_b1: perStepMs(oneNode.decode_b1_steps_per_s, twoNodes.decode_b1_steps_per_s), decode_b8: perStepMs(oneNode.decode_b8_steps_per_s, twoNodes.decode_b8_steps_per_s) },
  // a tiny-v3 step is 10 host collectives (embedding, 2 per layer x 4, the head) plus the step's task and reply:
  // each a round trip between the nodes (node 1 -> node 0 -> node 1 for a collective)
  round_trips_per_step: 11,
  overhead_ms_per_round_trip_b1: Number((perStepMs(oneNode.decode_b1_steps_per_s, twoNodes.decode_b1_steps_per_s) / 11).toFixed(3)),
  loopback_rtt_ms: rtt,
  date: new Date().toISOString(),
};
console.log(JSON.stringify(result, null, 2));
mkdirSync(join(ROOT, "bench/results"), { recursive: true });
writeFileSync(join(ROOT, `bench/results/multinode${values.tag ? `-${values.tag}` : ""}.json`), JSON.stringify(result, null, 2) + "\n");
