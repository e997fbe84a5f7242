#!/usr/bin/env node
// @ds3/core's conformance suite (what `ds3 selftest --backend cuda --json` runs) over the bundled JS
// on a GPU machine: plain node, no node_modules (packages/backend-cuda/build/gpu, made by
// `bash bench/cuda/prepare-device.sh`). The ranks import build/gpu/cuda.js (or cpu.js) in worker threads.
//
//   node scripts/gpu-conformance.mjs --part exact|fast [--backend cuda|cpu] [--world-sizes 1,2,4] [--json out.json]
//
// --part exact: every op against float64, and the golden checkpoints (tiny-v3, tiny-v3-bf16) end to end
//   through worker ranks at world sizes 1, 2 and 4 (ranks sharing the one GPU: host collectives), with
//   the greedy ids sampled by the ranks (on the device where the backend samples).
// --part fast: bf16, fp8 and fp8-ue8m0: the quantizers exactly and every op against the float64 reference
//   emulating the same quantization, the golden drift (mean cosine floor) at --world-sizes (default 1);
//   fp8-fnuz (AMD MI300's e4m3fnuz) must be reported "not supported" by CUDA (the CPU emulates it, so
//   --backend cpu runs it).
// Exit 0 pass, 1 fail, 3 backend not available (the JSON says why), 2 usage.
import { existsSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const dir = process.env.DS3_GPU_BUNDLE ?? join(root, "packages/backend-cuda/build/gpu");
const args = process.argv.slice(2);
const opt = (k, d) => (args.includes(k) ? args[args.indexOf(k) + 1] : d);
const part = opt("--part", "exact");
const backendName = opt("--backend", "cuda");
const jsonOut = opt("--json", null);
if (!["exact", "fast"].includes(part) || !["cuda", "cpu"].includes(backendName)) {
  console.error("usage: gpu-conformance.mjs --part exact|fast [--backend cuda|cpu] [--world-sizes 1,2,4] [--json out.json]");
  process.exit(2);
}
const worldSizes = opt("--world-sizes", part === "exact" ? "1,2,4" : "1").split(",").map(Number);
for (const f of ["ds3.js", `${backendName}.js`, "rank-worker.js", "node_modules/piscina/package.json"])
  if (!existsSync(join(dir, f))) {
    console.error(`missing ${join(dir, f)}: run \`bash bench/cuda/prepare-device.sh\` first`);
    process.exit(2);
  }
const ds3 = await import(pathToFileURL(join(dir, "ds3.js")).href);
const { runConformance, formatConformance, PRECISIONS, REQUIRED_OPS } = ds3;
// the provider from its own bundle: its `entry` is what the worker ranks import
const provider = (await import(pathToFileURL(join(dir, `${backendName}.js`)).href)).default;
const goldenDirs = ["tiny-v3", "tiny-v3-bf16"].map((n) => join(root, "test/fixtures", n));

const out = { step: `conformance-${part}`, backend: backendName, worldSizes, goldenDirs: goldenDirs.map((d) => d.slice(root.length + 1)) };
const finish = (code) => {
  if (jsonOut) writeFileSync(jsonOut, JSON.stringify(out, (_k, v) => (typeof v === "number" && !Number.isFinite(v) ? String(v) : v), 1));
  process.exit(code);
};
const av = provider.available();
if (!av.ok) {
  out.status = "not available";
  out.reason = av.reason;
  console.log(`SKIP: ${av.reason}`);
  finish(3);
}
const t0 = Date.now();
let names = ["exact"];
out.notSupported = [];
if (part === "fast") {
  names = [];
  for (const n of ["bf16", "fp8", "fp8-ue8m0", "fp8-fnuz"]) {
    const unsupported = REQUIRED_OPS.filter((op) => !provider.supports(op, PRECISIONS[n]));
    if (unsupported.length === REQUIRED_OPS.length) out.notSupported.push({ precision: n, status: "not supported" });
    else names.push(n);
  }
  // CUDA computes OCP e4m3fn: fp8-fnuz must be refused, every other precision run
  const expect = backendName === "cuda" ? ["fp8-fnuz"] : [];
  const ns = out.notSupported.map((x) => x.precision);
  out.expectNotSupported = expect;
  out.notSupportedAsExpected = ns.length === expect.length && expect.every((n) => ns.includes(n));
  for (const x of out.notSupported) console.log(`precision ${x.precision}: not supported by backend "${backendName}"`);
}
const report = await runConformance(provider, {
  precision: names,
  worldSizes,
  goldenDirs,
  onCheck: (c) => console.log(`${c.kind === "info" ? "info" : c.ok ? "PASS" : "FAIL"}  [${c.precision}] ${c.name}  worst ${c.worst}${c.detail ? `  ${c.detail}` : ""}`),
});
out.seconds = (Date.now() - t0) / 1000;
out.report = report;
out.table = formatConformance(report);
console.log(`\n${out.table}`);
const ok = report.ok && (part === "exact" || out.notSupportedAsExpected);
out.status = ok ? "pass" : "fail";
if (part === "fast" && !out.notSupportedAsExpected) console.log(`FAIL  not supported: ${JSON.stringify(out.notSupported.map((x) => x.precision))}, expected ${JSON.stringify(out.expectNotSupported)}`);
console.log(`\nconformance ${part} on ${backendName}: ${ok ? "PASS" : "FAIL"} (${out.seconds.toFixed(1)} s)`);
finish(ok ? 0 : 1);
