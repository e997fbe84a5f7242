#!/usr/bin/env node
// The GPU check, in one command (packages/backend-cuda/NOTES.md): runs, in order, each step in its own
// process with its own time limit, inside one total budget, and writes every result as JSON:
//   1. conformance-exact  @ds3/core's conformance suite on CUDA, exact: every op vs float64, golden
//                         tiny-v3 + tiny-v3-bf16 through worker ranks at world size 1, 2, 4 (sharing the GPU)
//   1. conformance-fast   bf16 / fp8 / fp8-ue8m0 vs the emulating reference; fp8-fnuz reported not supported
//   2. sampling           device sampling (ctx.sample) = @ds3/core's Sampler, ids and logprobs
//   3. nccl               NCCL at world size 1 (init, allReduce/allGather, in graphs, golden logits), with
//                         the addon build-device.sh builds on the machine in the background from the start
//   +  gpu-check          the previous sessions' GPU checks (golden, every mode vs the CPU, graphs bitwise, long-K)
//   4. bench              ds3-4L, only if the time left allows it
//
//   node bench/cuda/device-check.mjs [--out DIR] [--budget SECONDS] [--steps a,b,...] [--limit-scale F] [--backend cpu]
//
// --backend cpu runs the conformance and gpu-check steps on the CPU backend (the harness itself, on a
// machine without a GPU; sampling, NCCL and the bench stay CUDA-only); --limit-scale multiplies every
// step's time limit (a slower GPU; or a tiny value to see a step killed at its limit).
//
// DIR (default $OUT, else /tmp/ds3-out) receives gpu-check.json (every step: status, seconds, exit code,
// reason, its JSON), gpu-check.log (every step's output) and ds3-4L-<gpu>.json (the bench, when it ran).
// gpu-check.json is rewritten after every step, so a run cut short still returns what it did.
// Status per step: pass | fail | not available (the backend's reason) | timeout | skipped (budget) | error.
// Without a GPU every step says "not available" with CUDA's reason and the command exits 3.
import { spawn, spawnSync } from "node:child_process";
import { appendFileSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "../..");
const args = process.argv.slice(2);
const opt = (k, d) => (args.includes(k) ? args[args.indexOf(k) + 1] : d);
const outDir = opt("--out", process.env.OUT || "/tmp/ds3-out");
const budget = Number(opt("--budget", "420"));
const scale = Number(opt("--limit-scale", "1"));
const harness = opt("--backend", "cuda");
if (!(budget > 0) || !(scale > 0) || !["cuda", "cpu"].includes(harness)) {
  console.error("usage: device-check.mjs [--out DIR] [--budget SECONDS > 0] [--steps a,b,...] [--limit-scale F > 0] [--backend cuda|cpu]");
  process.exit(2);
}
const B = ["--backend", harness];
const STEP_NAMES = ["conformance-exact", "conformance-fast", "sampling", "nccl", "gpu-check", "bench"];
const only = opt("--steps", null)?.split(",");
for (const n of only ?? [])
  if (!STEP_NAMES.includes(n)) {
    console.error(`--steps: unknown step "${n}" (${STEP_NAMES.join(", ")})`);
    process.exit(2);
  }
const tmp = "/tmp/ds3-device-check";
rmSync(tmp, { recursive: true, force: true });
mkdirSync(tmp, { recursive: true });
mkdirSync(outDir, { recursive: true });
const jsonPath = join(outDir, "gpu-check.json");
const logPath = join(outDir, "gpu-check.log");
writeFileSync(logPath, "");
const log = (s) => {
  process.stdout.write(s);
  appendFileSync(logPath, s);
};
const t0 = Date.now();
const elapsed = () => (Date.now() - t0) / 1000;
const left = () => budget - elapsed();

const smi = spawnSync("nvidia-smi", ["--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"], { encoding: "utf8" });
const gpu = smi.status === 0 ? smi.stdout.trim() : `nvidia-smi: ${smi.error ? smi.error.message : smi.stderr.trim()}`;
const gpuTag = /H200/i.test(gpu) ? "h200" : /H100/i.test(gpu) ? "h100" : /B200/i.test(gpu) ? "b200" : smi.status === 0 ? "gpu" : "none";
const addon = process.env.DS3_CUDA_ADDON ?? "";
const summary = {
  what: "bench/cuda/device-check.mjs: the GPU check in one command",
  gpu,
  node: process.version,
  addon: addon || "(the bundle's default lookup)",
  budget_s: budget,
  harness_backend: harness,
  limit_scale: scale,
  started: new Date().toISOString(),
  steps: [],
};
const save = () => {
  summary.elapsed_s = +elapsed().toFixed(1);
  writeFileSync(jsonPath, JSON.stringify(summary, null, 1));
};
log(`device-check: ${gpu}; node ${process.version}; budget ${budget} s; addon ${summary.addon}\n`);

// [name, command, args, time limit (s), least time worth starting it with (s), JSON it writes]
const J = (n) => join(tmp, `${n}.json`);
const benchOut = join(tmp, `ds3-4L-${gpuTag}.json`);
const STEPS = [
  ["conformance-exact", "scripts/gpu-conformance.mjs", [...B, "--part", "exact", "--world-sizes", "1,2,4", "--json", J("conformance-exact")], 150, 20],
  ["conformance-fast", "scripts/gpu-conformance.mjs", [...B, "--part", "fast", "--world-sizes", "1", "--json", J("conformance-fast")], 150, 20],
  ["sampling", "scripts/gpu-check.mjs", ["--only", "sampling", "--json", J("sampling")], 90, 15],
  ["nccl", "bench/cuda/nccl-check.mjs", ["--json", J("nccl")], 90, 15],
  ["gpu-check", "scripts/gpu-check.mjs", [...B, "--quick", "--only", "golden,modes,graphs,variant,longk", "--json", J("gpu-check")].filter((a) => harness === "cpu" || a !== "--quick"), 170, 40],
  ["bench", "bench/cuda/ds3-4L.mjs", ["--out", benchOut], 200, 90],
];

// NCCL variant of the addon, built on this machine (CMake + nvcc + NCCL here) while the GPU steps run
let ncclBuild = null;
const cudaUp = smi.status === 0 && harness === "cuda";
if (cudaUp && (!only || only.includes("nccl"))) {
  const start = Date.now();
  ncclBuild = new Promise((resolve) => {
    const p = spawn("timeout", ["300", "bash", join(root, "bench/cuda/build-device.sh"), "/tmp/ds3-nccl"], { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
    let so = "", se = "";
    p.stdout.on("data", (d) => (so += d));
    p.stderr.on("data", (d) => (se += d));
    p.on("close", (code) => resolve({ code, addon: so.trim().split("\n").pop() || "", stderr: se, seconds: (Date.now() - start) / 1000 }));
  });
}

function runStep(name, script, sargs, limit, env) {
  return new Promise((resolve) => {
    const start = Date.now();
    log(`\n=== ${name} (limit ${limit} s, ${left().toFixed(0)} s of the budget left) ${new Date().toISOString().slice(11, 19)}\n`);
    const p = spawn(process.execPath, [join(root, script), ...sargs], { cwd: root, env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"], detached: true });
    let tail = "";
    const onData = (d) => {
      const s = d.toString();
      log(s);
      tail = (tail + s).slice(-4000);
    };
    p.stdout.on("data", onData);
    p.stderr.on("data", onData);
    let timedOut = false;
    const kill = (sig) => {
      try {
        process.kill(-p.pid, sig); // the step and whatever it started (its process group)
      } catch {
        /* gone */
      }
    };
    const timer = setTimeout(() => {
      timedOut = true;
      kill("SIGTERM");
      setTimeout(() => kill("SIGKILL"), 3000).unref();
    }, limit * 1000);
    p.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, timedOut, tail, seconds: (Date.now() - start) / 1000 });
    });
  });
}

const readJson = (p) => {
  try {
    return existsSync(p) ? JSON.parse(readFileSync(p, "utf8")) : null;
  } catch (e) {
    return { unreadable: String(e) };
  }
};

for (const [name, script, sargs, limit, least] of STEPS) {
  if (only && !only.includes(name)) continue;
  const rec = { name, command: `node ${script} ${sargs.map((a) => a.replace(tmp + "/", "")).join(" ")}` };
  summary.steps.push(rec);
  let env = {};
  if (name === "nccl") {
    if (ncclBuild) {
      log(`\n=== nccl: waiting for the NCCL build (started at 0 s; ${left().toFixed(0)} s of the budget left)\n`);
      const b = await Promise.race([ncclBuild, new Promise((r) => setTimeout(() => r(null), Math.max(0, Math.min(150, left() - least)) * 1000))]);
      if (!b) {
        Object.assign(rec, { status: "skipped", reason: "the NCCL build did not finish in time (waited at most 150 s, within the budget)" });
        log(`${rec.reason}\n`);
        save();
        continue;
      }
      rec.build = { exitCode: b.code, seconds: b.seconds, addon: b.addon, log: b.stderr.slice(-3000) };
      log(`NCCL build: exit ${b.code} in ${b.seconds.toFixed(0)} s -> ${b.addon}\n${b.stderr.slice(-1500)}\n`);
      if (b.code === 0 && existsSync(b.addon)) env = { DS3_CUDA_ADDON: b.addon };
      else {
        Object.assign(rec, { status: "fail", reason: `the NCCL variant of the addon did not build (exit ${b.code}): see build.log` });
        save();
        continue;
      }
    }
  }
  if (left() < least * scale) {
    Object.assign(rec, { status: "skipped", reason: `${left().toFixed(0)} s of the ${budget} s budget left, ${least * scale} s needed` });
    log(`\n=== ${name}: skipped (${rec.reason})\n`);
    save();
    continue;
  }
  const lim = Math.max(1, Math.round(Math.min(limit * scale, Math.max(least * scale, Math.floor(left())))));
  rec.limit_s = lim;
  const r = await runStep(name, script, sargs, lim, env);
  const json = readJson(name === "bench" ? benchOut : J(name));
  const skipLine = /^SKIP: (.*)$/m.exec(r.tail);
  rec.seconds = +r.seconds.toFixed(1);
  rec.exitCode = r.code;
  if (r.timedOut) Object.assign(rec, { status: "timeout", reason: `killed after ${lim} s` });
  else if (r.code === 0) rec.status = "pass";
  else if (r.code === 3) Object.assign(rec, { status: "not available", reason: json?.reason ?? skipLine?.[1] ?? "the backend is not available" });
  else if (r.code === 1 && json) rec.status = "fail";
  else Object.assign(rec, { status: "error", reason: r.signal ? `killed by ${r.signal}` : `exit ${r.code}`, tail: r.tail.slice(-1500) });
  if (json) rec.result = json;
  if (name === "bench" && json) writeFileSync(join(outDir, `ds3-4L-${gpuTag}.json`), JSON.stringify(json, null, 1));
  log(`=== ${name}: ${rec.status}${rec.reason ? ` (${rec.reason})` : ""} in ${rec.seconds} s\n`);
  save();
}
const counts = {};
for (const s of summary.steps) counts[s.status] = (counts[s.status] ?? 0) + 1;
summary.counts = counts;
summary.ok = summary.steps.every((s) => s.status === "pass" || (s.name === "bench" && s.status === "skipped"));
save();
log(`\n=== device-check: ${summary.steps.map((s) => `${s.name} ${s.status}`).join(", ")} (${elapsed().toFixed(0)} s)\n`);
log(`results: ${jsonPath}, ${logPath}\n`);
const allNa = summary.steps.length > 0 && summary.steps.every((s) => s.status === "not available" || s.status === "skipped");
process.exit(summary.ok ? 0 : allNa ? 3 : 1);
