#!/usr/bin/env node
// NCCL collectives of @ds3/backend-cuda on ONE GPU (world size 1: a communicator of one rank). Checks that
// the communicator initializes, that allReduce / allGatherCols round-trip exactly, that they can be
// captured into CUDA graphs with the rest of a step, and that the tiny-v3 golden logits still match with
// every allReduce/allGather of the model going through NCCL. Multi-GPU (world size > 1) is NOT exercised.
//
//   DS3_CUDA_ADDON=<the .node built with NCCL> node bench/cuda/nccl-check.mjs [--json out.json]
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "../..");
const ds3 = await import(join(root, "packages/backend-cuda/build/gpu/ds3.js"));
const { cuda, Checkpoint, parseConfig, Transformer } = ds3;
const args = process.argv.slice(2);
const jsonOut = args.includes("--json") ? args[args.indexOf("--json") + 1] : null;

const results = { addon: process.env.DS3_CUDA_ADDON ?? "(default)", checks: [] };
let failures = 0;
function check(name, ok, detail) {
  results.checks.push({ name, ok, ...detail });
  if (!ok) failures++;
  console.log(`${ok ? "PASS" : "FAIL"}  ${name}  ${JSON.stringify(detail)}`);
}
const av = cuda.available();
if (!av.ok) {
  console.log(`SKIP: ${av.reason}`);
  if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ ...results, status: "not available", reason: av.reason }, null, 1));
  process.exit(3);
}
const EXACT = { activations: "f32", cache: "f32", actQuant: "none" };
const probeCtx = cuda.create({ precision: EXACT });
results.ncclVersion = probeCtx.ncclVersion;
console.log(`addon NCCL version: ${probeCtx.ncclVersion || "none (built without NCCL)"}`);
probeCtx.dispose();
if (!results.ncclVersion) {
  // not a failure of the backend: this addon was built where CMake found no NCCL
  const reason = `NCCL not available: ${results.addon} was built without NCCL (build it with bench/cuda/build-device.sh on a machine with nccl.h and libnccl)`;
  console.log(`SKIP: ${reason}`);
  if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ ...results, status: "not available", reason }, null, 1));
  process.exit(3);
}

const maxAbs = (a, b) => a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), a.length === b.length ? 0 : Infinity);

// 1. a world-size-1 communicator; allReduce and allGatherCols round-trip
{
  const ctx = cuda.create({ precision: EXACT });
  const t0 = performance.now();
  const info = ctx.initNccl(ctx.ncclUniqueId(), 0, 1);
  check("ncclCommInitRank (world size 1)", info.worldSize === 1 && info.version > 0, { ...info, ms: +(performance.now() - t0).toFixed(1) });
  ctx.beginStep();
  const x = Float32Array.from({ length: 5 * 33 }, (_, i) => Math.sin(i) * 3);
  const t = ctx.upload(x, [5, 33]);
  const r = ctx.download(ctx.allReduce(t));
  check("allReduce (sum over 1 rank) = input", maxAbs(r, x) === 0, { maxAbs: maxAbs(r, x) });
  const g = ctx.allGatherCols(t);
  const gd = ctx.download(g);
  check("allGatherCols (1 rank) = input, shape [5, 33]", maxAbs(gd, x) === 0 && g.shape[0] === 5 && g.shape[1] === 33, { maxAbs: maxAbs(gd, x), shape: g.shape });
  // a step of collectives and adds, repeated: captured and replayed as CUDA graphs
  const stepRun = () => {
    ctx.beginStep();
    let h = ctx.upload(x, [5, 33]);
    for (let i = 0; i < 12; i++) h = ctx.add(ctx.allReduce(h), ctx.allGatherCols(h));
    return ctx.download(h);
  };
  ctx.setGraphs(false);
  const ref = stepRun();
  ctx.setGraphs(true);
  let worst = 0;
  for (let i = 0; i < 5; i++) worst = Math.max(worst, maxAbs(stepRun(), ref));
  const st = ctx.graphStats();
  check("NCCL collectives inside CUDA graphs: replay = eager", worst === 0 && st.replays >= 3, { maxAbs: worst, graphStats: st });
  ctx.dispose();
}

// 2. tiny-v3 golden logits with every model collective through NCCL (world size 1)
{
  const dir = join(root, "test/fixtures/tiny-v3");
  const cfg = parseConfig(JSON.parse(readFileSync(join(dir, "config.json"), "utf8")), join(dir, "config.json"));
  const golden = JSON.parse(readFileSync(join(dir, "golden.json"), "utf8"));
  const buf = readFileSync(join(dir, "golden.f32"));
  const f32 = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
  const ctx = cuda.create({ precision: EXACT });
  ctx.initNccl(ctx.ncclUniqueId(), 0, 1);
  const ck = Checkpoint.open(dir);
  const model = new Transformer(ctx, ck, cfg);
  ck.close();
  model.allocCache(32, 16, "f32");
  const p = golden.prompts.find((q) => q.ids.length === 40);
  const L = p.ids.length, V = cfg.vocabSize;
  ctx.beginStep();
  const bt = Int32Array.from({ length: 32 }, (_, i) => i);
  const lg = model.forward(Int32Array.from(p.ids), { positions: Int32Array.from({ length: L }, (_, i) => i), seqIdx: new Int32Array(L), blockTables: bt, maxBlocks: 32 }, Int32Array.from({ length: L }, (_, i) => i)).logits;
  const ref = f32.subarray(p.logits_offset / 4, p.logits_offset / 4 + L * V);
  const e = maxAbs(lg, ref);
  check("tiny-v3 L=40 golden logits with model collectives through NCCL (exact mode)", e <= 1e-3, { maxAbs: e });
  ctx.dispose();
}
results.note = "one GPU: world size 1 only; multi-GPU tensor/expert parallel through NCCL was not run";
console.log(`\n${failures === 0 ? "NCCL ALL PASS" : `NCCL ${failures} FAILED`} (${results.checks.length} checks; world size 1 only, multi-GPU not run)`);
results.status = failures === 0 ? "pass" : "fail";
if (jsonOut) writeFileSync(jsonOut, JSON.stringify(results, null, 1));
process.exit(failures === 0 ? 0 : 1);
