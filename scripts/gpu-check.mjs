#!/usr/bin/env node
// GPU checks of @ds3/backend-cuda, run with plain `node` on a GPU machine over the bundled JS
// (packages/backend-cuda/build/gpu/ds3.js, made by `pnpm --filter @ds3/backend-cuda bundle:gpu`).
//
//   node scripts/gpu-check.mjs [--quick] [--backend cuda|cpu] [--only SECTIONS] [--json out.json]
//
// --only golden,modes,graphs,variant,sampling,longk runs only those sections (default: all); e.g.
// `--only sampling` is step 2 of bench/cuda/device-check.mjs (device sampling = the core Sampler).
//
// exact mode (fp32 activations and cache, no TF32), against test/fixtures/*/golden.*:
//   logits at every position of every prompt within 1e-3; greedy continuations (up to the first
//   step whose reference margin is below 1e-3); MTP logits; incremental decode = recompute;
//   batching invariance (prefill and decode).
// every mode: each op against the CPU backend emulating the same precision on identical inputs
//   (max normwise error per op, with the bound stated below), and end-to-end cosine / KL against the
//   golden logits (reported, not gated, for the fast modes).
// cuda only: CUDA-graph replay of decode steps equals eager execution bitwise (exact and bf16+fp8, batch
//   1/2/8/32, across a context bucket); device sampling (temperature/top-k/top-p/min-p) picks the same ids
//   as @ds3/core's Sampler for the same uniform draws; long-K FP8 GEMVs (K >= 4096, every launch variant)
//   against the CPU backend.
// --backend cpu runs the same golden checks on the CPU backend (checks the harness without a GPU).
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const bundle = join(root, "packages/backend-cuda/build/gpu/ds3.js");
if (!existsSync(bundle)) {
  console.error(`missing ${bundle}: run \`pnpm --filter @ds3/backend-cuda bundle:gpu\` first`);
  process.exit(2);
}
const ds3 = await import(bundle);
const { Checkpoint, parseConfig, Transformer, cuda, cpu, Sampler, Rng } = ds3;

const args = process.argv.slice(2);
const quick = args.includes("--quick");
const backendName = args.includes("--backend") ? args[args.indexOf("--backend") + 1] : "cuda";
const jsonOut = args.includes("--json") ? args[args.indexOf("--json") + 1] : null;
const SECTIONS = ["golden", "modes", "graphs", "variant", "sampling", "longk"];
const only = new Set(args.includes("--only") ? args[args.indexOf("--only") + 1].split(",") : SECTIONS);
for (const s of only)
  if (!SECTIONS.includes(s)) {
    console.error(`--only: unknown section "${s}" (${SECTIONS.join(", ")})`);
    process.exit(2);
  }
const want = (s) => only.has(s);
const TOL = 1e-3;
// stated per-op bounds (normwise ||cuda - cpu|| / ||cpu||) on identical inputs
const OP_BOUND = { exact: 1e-5, bf16: 1e-2, "bf16+fp8": 3e-2, "f32+fp8": 3e-2 };
const MODES = {
  exact: { activations: "f32", cache: "f32", actQuant: "none" },
  bf16: { activations: "bf16", cache: "bf16", actQuant: "none" },
  "bf16+fp8": { activations: "bf16", cache: "bf16", actQuant: "fp8" },
  "f32+fp8": { activations: "f32", cache: "f32", actQuant: "fp8" },
};

const results = { backend: backendName, checks: [], ops: {}, fast: {} };
let failures = 0;
function check(name, ok, detail) {
  results.checks.push({ name, ok, ...detail });
  if (!ok) failures++;
  console.log(`${ok ? "PASS" : "FAIL"}  ${name}  ${JSON.stringify(detail)}`);
}

const provider = backendName === "cpu" ? cpu : cuda;
const av = provider.available();
console.log(`backend ${backendName}: ${JSON.stringify(av)}`);
if (!av.ok) {
  console.log(`SKIP: ${av.reason}`);
  if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ backend: backendName, status: "not available", reason: av.reason }, null, 1));
  process.exit(backendName === "cuda" ? 3 : 1);
}

// ---- helpers ----------------------------------------------------------------------------------------
function loadFixture(name) {
  const dir = join(root, "test/fixtures", name);
  const cfg = parseConfig(JSON.parse(readFileSync(join(dir, "config.json"), "utf8")), join(dir, "config.json"));
  const golden = JSON.parse(readFileSync(join(dir, "golden.json"), "utf8"));
  const buf = readFileSync(join(dir, "golden.f32"));
  const f32 = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
  return { name, dir, cfg, golden, f32 };
}
const iota = (n, s = 0) => Int32Array.from({ length: n }, (_, i) => i + s);
const BS = 16;
const MAXB = 32; // blocks per sequence (512 positions)
function meta(positions, seqIdx, nSeq) {
  const bt = new Int32Array(nSeq * MAXB);
  for (let s = 0; s < nSeq; s++) for (let j = 0; j < MAXB; j++) bt[s * MAXB + j] = s * MAXB + j;
  return { positions: Int32Array.from(positions), seqIdx: Int32Array.from(seqIdx), blockTables: bt, maxBlocks: MAXB };
}
function maxAbsDiff(a, b) {
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}
function normErr(a, b) {
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) {
    const d = a[i] - b[i];
    num += d * d;
    den += b[i] * b[i];
  }
  if (Number.isNaN(num)) return Infinity;
  return Math.sqrt(num) / Math.max(Math.sqrt(den), 1e-30);
}
function argmaxRow(a, off, n) {
  let bi = 0, bv = -Infinity;
  for (let i = 0; i < n; i++) if (a[off + i] > bv) (bv = a[off + i]), (bi = i);
  return bi;
}
function cosKl(ours, ref, rows, V) {
  let minCos = 1, sumCos = 0, maxKl = 0, sumKl = 0, agree = 0;
  for (let r = 0; r < rows; r++) {
    let dot = 0, na = 0, nb = 0, ma = -Infinity, mb = -Infinity;
    for (let i = 0; i < V; i++) {
      const a = ours[r * V + i], b = ref[r * V + i];
      dot += a * b;
      na += a * a;
      nb += b * b;
      ma = Math.max(ma, a);
      mb = Math.max(mb, b);
    }
    const cos = dot / Math.sqrt(na * nb);
    let za = 0, zb = 0;
    for (let i = 0; i < V; i++) {
      za += Math.exp(ours[r * V + i] - ma);
      zb += Math.exp(ref[r * V + i] - mb);
    }
    let kl = 0;
    for (let i = 0; i < V; i++) {
      const lp = ref[r * V + i] - mb - Math.log(zb);
      const lq = ours[r * V + i] - ma - Math.log(za);
      kl += Math.exp(lp) * (lp - lq);
    }
    minCos = Math.min(minCos, cos);
    sumCos += cos;
    maxKl = Math.max(maxKl, kl);
    sumKl += kl;
    if (argmaxRow(ours, r * V, V) === argmaxRow(ref, r * V, V)) agree++;
  }
  return { minCos, meanCos: sumCos / rows, maxKl, meanKl: sumKl / rows, top1Agree: agree / rows };
}

function newModel(fx, precision, ctxWrap, extra = {}) {
  let ctx = provider.create({ precision, ...extra });
  if (ctxWrap) ctx = ctxWrap(ctx, precision);
  const ck = Checkpoint.open(fx.dir);
  const model = new Transformer(ctx, ck, fx.cfg);
  ck.close();
  model.allocCache(2 * MAXB, BS, precision.cache);
  return { ctx, model };
}

/** prefill one sequence; returns logits of every position and the hidden states (valid until the next step) */
function prefill(m, ids, seq = 0, start = 0) {
  m.ctx.beginStep();
  const L = ids.length;
  const r = m.model.forward(Int32Array.from(ids), meta(iota(L, start), new Int32Array(L).fill(seq), seq + 1), iota(L));
  return r;
}

// ---- op-level comparison against the CPU backend ------------------------------------------------------
/** wraps a CUDA context: every op also runs on the CPU backend on the same (downloaded) inputs */
function checking(cu, precision, stats) {
  const cp = cpu.create({ precision, threads: 8 });
  const T = (x) => cp.upload(cu.download(x), x.shape);
  const rec = (name, got, ref) => {
    const a = cu.download(got);
    const b = cp.download(ref);
    const e = normErr(a, b);
    const s = (stats[name] ??= { calls: 0, maxNormErr: 0, maxAbs: 0 });
    s.calls++;
    s.maxNormErr = Math.max(s.maxNormErr, e);
    s.maxAbs = Math.max(s.maxAbs, maxAbsDiff(a, b));
    return got;
  };
  const W = new Map();
  const wrapW = (hw) => {
    const a = cu.weight(hw);
    W.set(a, cp.weight(hw));
    return a;
  };
  const caches = new Map();
  const sets = new Map();
  return {
    get name() { return cu.name; },
    get precision() { return cu.precision; },
    get device() { return cu.device; },
    weight: wrapW,
    expertSet(first, list) {
      const a = cu.expertSet(first, list);
      sets.set(a, cp.expertSet(first, list.map((e) => ({ w1: W.get(e.w1), w2: W.get(e.w2), w3: W.get(e.w3) }))));
      return a;
    },
    upload: (d, s) => cu.upload(d, s),
    download: (x) => cu.download(x),
    createCache(l, nb, bs, w, dt) {
      const a = cu.createCache(l, nb, bs, w, dt);
      caches.set(a, cp.createCache(l, nb, bs, w, dt));
      return a;
    },
    readCache: (c, l, s, n) => cu.readCache(c, l, s, n),
    beginStep() { cu.beginStep(); cp.beginStep(); },
    embed: (t, ids, vs) => rec("embed", cu.embed(t, ids, vs), cp.embed(W.get(t), ids, vs)),
    rmsNorm: (x, w, eps) => rec("rmsNorm", cu.rmsNorm(x, w, eps), cp.rmsNorm(T(x), W.get(w), eps)),
    linear: (x, w) => rec(`linear ${w.dtype} x${x.shape[0] <= 8 ? "few" : x.shape[0] <= 64 ? "some" : "many"}`, cu.linear(x, w), cp.linear(T(x), W.get(w))),
    add: (a, b) => rec("add", cu.add(a, b), cp.add(T(a), T(b))),
    siluMul: (a, b) => rec("siluMul", cu.siluMul(a, b), cp.siluMul(T(a), T(b))),
    concat: (a, b) => rec("concat", cu.concat(a, b), cp.concat(T(a), T(b))),
    slice: (x, c0, c1) => rec("slice", cu.slice(x, c0, c1), cp.slice(T(x), c0, c1)),
    rows: (x, r) => rec("rows", cu.rows(x, r), cp.rows(T(x), r)),
    rope: (x, ...a) => rec("rope", cu.rope(x, ...a), cp.rope(T(x), ...a)),
    mla(q, kv, pe, w, cache, layer, m, d) {
      const qa = T(q), kva = T(kv), pea = T(pe);
      return rec(`mla x${q.shape[0] <= 8 ? "few" : "many"}`, cu.mla(q, kv, pe, w, cache, layer, m, d), cp.mla(qa, kva, pea, W.get(w), caches.get(cache), layer, m, d));
    },
    moeGate(x, g, bias, c) {
      const got = cu.moeGate(x, g, bias, c);
      const ref = cp.moeGate(T(x), W.get(g), bias, c);
      // compare weights; ids must match exactly
      const a = cu.download(got), b = cp.download(ref);
      let idMismatch = 0;
      const k = c.topk;
      for (let r = 0; r < a.length / (2 * k); r++) {
        const sa = new Set(Array.from(a.subarray(r * 2 * k + k, r * 2 * k + 2 * k)));
        for (const v of b.subarray(r * 2 * k + k, r * 2 * k + 2 * k)) if (!sa.has(v)) idMismatch++;
      }
      const s = (stats.moeGate ??= { calls: 0, maxNormErr: 0, maxAbs: 0, idMismatch: 0 });
      s.calls++;
      s.idMismatch += idMismatch;
      if (idMismatch === 0) {
        s.maxNormErr = Math.max(s.maxNormErr, normErr(a, b));
        s.maxAbs = Math.max(s.maxAbs, maxAbsDiff(a, b));
      }
      return got;
    },
    moeExperts: (x, e, r, k) => rec(`moeExperts x${x.shape[0] <= 8 ? "few" : x.shape[0] <= 64 ? "some" : "many"}`, cu.moeExperts(x, e, r, k), cp.moeExperts(T(x), sets.get(e), T(r), k)),
    allReduce: (x) => x,
    allGatherCols: (x) => x,
    dispose() { cu.dispose(); cp.dispose(); },
  };
}

// ---- golden checks (exact mode) -------------------------------------------------------------------------
function goldenChecks(fx) {
  const V = fx.cfg.vocabSize;
  const m = newModel(fx, MODES.exact);
  const prompts = quick ? fx.golden.prompts.filter((p) => p.ids.length === 7 || p.ids.length === 40) : fx.golden.prompts;
  for (const p of prompts) {
    const L = p.ids.length;
    const ref = fx.f32.subarray(p.logits_offset / 4, p.logits_offset / 4 + L * V);
    const r = prefill(m, p.ids);
    const got = r.logits;
    check(`${fx.name} L=${L} logits (all positions)`, maxAbsDiff(got, ref) <= TOL, { maxAbs: maxAbsDiff(got, ref) });
    if (p.mtp_logits_offset !== undefined && m.model.mtp && L > 1) {
      const mref = fx.f32.subarray(p.mtp_logits_offset / 4, p.mtp_logits_offset / 4 + (L - 1) * V);
      const h = m.ctx.rows(r.hidden, iota(L - 1));
      const mm = meta(iota(L - 1), new Int32Array(L - 1), 1);
      const mg = m.model.forwardMtp(h, Int32Array.from(p.ids.slice(1)), mm, iota(L - 1)).logits;
      check(`${fx.name} L=${L} MTP logits`, maxAbsDiff(mg, mref) <= TOL, { maxAbs: maxAbsDiff(mg, mref) });
    }
    // greedy continuation with the KV cache
    let next = argmaxRow(got, (L - 1) * V, V);
    let ok = true, compared = 0, firstBad = -1;
    for (let i = 0; i < p.greedy.length; i++) {
      if (p.greedy_margins[i] < 1e-3) break;
      compared++;
      if (next !== p.greedy[i]) {
        ok = false;
        firstBad = i;
        break;
      }
      if (i + 1 === p.greedy.length) break;
      m.ctx.beginStep();
      const lg = m.model.forward(Int32Array.of(next), meta([L + i], [0], 1), Int32Array.of(0)).logits;
      next = argmaxRow(lg, 0, V);
    }
    check(`${fx.name} L=${L} greedy`, ok, { compared, of: p.greedy.length, firstBad });
  }
  // incremental decode = recompute
  {
    const p = fx.golden.prompts.find((q) => q.ids.length === 40) ?? fx.golden.prompts[fx.golden.prompts.length - 1];
    const L = p.ids.length, h = Math.floor(L / 2);
    const full = prefill(m, p.ids).logits;
    const inc = new Float32Array(L * V);
    inc.set(prefill(m, p.ids.slice(0, h)).logits);
    for (let i = h; i < L; i++) {
      m.ctx.beginStep();
      inc.set(m.model.forward(Int32Array.of(p.ids[i]), meta([i], [0], 1), Int32Array.of(0)).logits, i * V);
    }
    check(`${fx.name} incremental decode = recompute (L=${L})`, maxAbsDiff(inc, full) <= 1e-4, { maxAbs: maxAbsDiff(inc, full) });
  }
  // batching invariance: two sequences in one step vs alone (prefill, then batched decode)
  {
    const A = fx.golden.prompts.find((q) => q.ids.length === 7).ids;
    const B = fx.golden.prompts.find((q) => q.ids.length === 40).ids;
    const alone = [prefill(m, A, 0).logits, prefill(m, B, 1).logits];
    m.ctx.beginStep();
    const ids = Int32Array.from([...A, ...B]);
    const mb = meta([...iota(A.length), ...iota(B.length)], [...new Array(A.length).fill(0), ...new Array(B.length).fill(1)], 2);
    const both = m.model.forward(ids, mb, iota(ids.length)).logits;
    const e1 = Math.max(maxAbsDiff(both.subarray(0, A.length * V), alone[0]), maxAbsDiff(both.subarray(A.length * V), alone[1]));
    check(`${fx.name} batching invariance (prefill 7 + 40)`, e1 <= 1e-4, { maxAbs: e1 });
    // decode: both sequences one token each, batched vs alone
    const nA = argmaxRow(alone[0], (A.length - 1) * V, V), nB = argmaxRow(alone[1], (B.length - 1) * V, V);
    m.ctx.beginStep();
    const d2 = m.model.forward(Int32Array.of(nA, nB), meta([A.length, B.length], [0, 1], 2), iota(2)).logits;
    m.ctx.beginStep();
    const dA = m.model.forward(Int32Array.of(nA), meta([A.length], [0], 2), iota(1)).logits;
    m.ctx.beginStep();
    const dB = m.model.forward(Int32Array.of(nB), meta([B.length], [1], 2), iota(1)).logits;
    const e2 = Math.max(maxAbsDiff(d2.subarray(0, V), dA), maxAbsDiff(d2.subarray(V), dB));
    check(`${fx.name} batching invariance (decode 2 sequences)`, e2 <= 1e-4, { maxAbs: e2 });
  }
  m.ctx.dispose();
}

// ---- all modes: op level vs CPU, end to end vs golden -----------------------------------------------------
function modeChecks(fx, modeName) {
  const precision = MODES[modeName];
  const V = fx.cfg.vocabSize;
  const stats = {};
  const opCheck = backendName === "cuda" || args.includes("--selfcheck");
  const m = newModel(fx, precision, opCheck ? (c, pr) => checking(c, pr, stats) : undefined);
  const p = fx.golden.prompts.find((q) => q.ids.length === 40);
  const long = fx.golden.prompts.find((q) => q.ids.length === 300);
  if (long) prefill(m, long.ids); // many rows: the tiled/tensor-core kernels and grouped experts
  const r = prefill(m, p.ids);
  // a few decode steps exercise the few-row kernels
  let next = argmaxRow(r.logits, (p.ids.length - 1) * V, V);
  for (let i = 0; i < 3; i++) {
    m.ctx.beginStep();
    next = argmaxRow(m.model.forward(Int32Array.of(next), meta([p.ids.length + i], [0], 1), Int32Array.of(0)).logits, 0, V);
  }
  if (m.model.mtp) {
    m.ctx.beginStep();
    const rr = prefill(m, p.ids);
    const L = p.ids.length;
    m.model.forwardMtp(m.ctx.rows(rr.hidden, iota(L - 1)), Int32Array.from(p.ids.slice(1)), meta(iota(L - 1), new Int32Array(L - 1), 1), iota(L - 1));
  }
  m.ctx.dispose();
  const bound = OP_BOUND[modeName];
  const worst = Object.entries(stats).reduce((a, [k, s]) => (s.maxNormErr > a[1] ? [k, s.maxNormErr] : a), ["", 0]);
  const gateIds = stats.moeGate?.idMismatch ?? 0;
  results.ops[`${fx.name} ${modeName}`] = stats;
  if (opCheck)
    check(`${fx.name} ${modeName}: every op within ${bound} (normwise) of the CPU backend on identical inputs`, worst[1] <= bound && gateIds === 0, {
      worstOp: worst[0],
      worst: worst[1],
      routingIdMismatches: gateIds,
    });
  // end to end vs golden (all prompts, all positions)
  const m2 = newModel(fx, precision);
  const agg = [];
  for (const q of quick ? [p] : fx.golden.prompts) {
    const L = q.ids.length;
    const got = prefill(m2, q.ids).logits;
    agg.push({ L, ...cosKl(got, fx.f32.subarray(q.logits_offset / 4, q.logits_offset / 4 + L * V), L, V), maxAbs: maxAbsDiff(got, fx.f32.subarray(q.logits_offset / 4, q.logits_offset / 4 + L * V)) });
  }
  m2.ctx.dispose();
  results.fast[`${fx.name} ${modeName}`] = agg;
  console.log(`INFO  ${fx.name} ${modeName} vs golden: ${agg.map((a) => `L=${a.L} minCos=${a.minCos.toFixed(5)} meanKL=${a.meanKl.toExponential(2)} maxKL=${a.maxKl.toExponential(2)} top1=${(100 * a.top1Agree).toFixed(1)}% maxAbs=${a.maxAbs.toFixed(4)}`).join(" | ")}`);
  if (modeName === "exact") check(`${fx.name} exact: golden within ${TOL}`, agg.every((a) => a.maxAbs <= TOL), { maxAbs: Math.max(...agg.map((a) => a.maxAbs)) });
}

// ---- CUDA graphs: replayed steps equal eager steps bitwise --------------------------------------------------
function graphChecks(fx, modeName) {
  const precision = MODES[modeName];
  const V = fx.cfg.vocabSize;
  const p40 = fx.golden.prompts.find((q) => q.ids.length === 40).ids;
  const p7 = fx.golden.prompts.find((q) => q.ids.length === 7).ids;
  const run = (graphs) => {
    const m = newModel(fx, precision, undefined, { graphs });
    const logs = [];
    const idsOut = [];
    prefill(m, p40, 0);
    prefill(m, p7, 1);
    // one sequence, 14 steps from position 120: crosses the 128-position context bucket
    let next = 3;
    for (let i = 0; i < 14; i++) {
      m.ctx.beginStep();
      const lg = m.model.forward(Int32Array.of(next), meta([120 + i], [0], 2), Int32Array.of(0)).logits;
      logs.push(lg);
      next = argmaxRow(lg, 0, V);
    }
    // two sequences per step, 6 steps
    for (let i = 0; i < 6; i++) {
      m.ctx.beginStep();
      logs.push(m.model.forward(Int32Array.of(5 + i, 9 + i), meta([40 + i, 7 + i], [0, 1], 2), iota(2)).logits);
    }
    // batch 8 and 32 (tensor-core paths in the fast modes), sequences spread over both block tables;
    // greedy ids on the device (argmax is recorded with the step)
    for (const B of [8, 32]) {
      for (let i = 0; i < 5; i++) {
        m.ctx.beginStep();
        const ids = Int32Array.from({ length: B }, (_, j) => (17 * j + 3 * i) % V);
        const mm = meta(Array.from({ length: B }, (_, j) => 200 + 4 * j + i), Array.from({ length: B }, (_, j) => j % 2), 2);
        let h = m.ctx.embed(m.model.embed, ids, 0);
        for (const b of m.model.layers) h = b.forward(h, mm);
        const logits = m.ctx.linear(m.ctx.rmsNorm(h, m.model.norm, fx.cfg.rmsNormEps), m.model.head);
        idsOut.push(m.ctx.argmax(logits));
        logs.push(m.ctx.download(logits));
      }
    }
    const stats = m.ctx.graphStats();
    m.ctx.dispose();
    return { logs, idsOut, stats };
  };
  const g = run(true);
  const e = run(false);
  let maxAbs = 0, idsDiff = 0;
  for (let i = 0; i < e.logs.length; i++) maxAbs = Math.max(maxAbs, maxAbsDiff(g.logs[i], e.logs[i]));
  for (let i = 0; i < e.idsOut.length; i++) for (let j = 0; j < e.idsOut[i].length; j++) if (g.idsOut[i][j] !== e.idsOut[i][j]) idsDiff++;
  // device argmax = argmax of the downloaded logits
  let argBad = 0;
  const off = e.logs.length - e.idsOut.length;
  for (let i = 0; i < e.idsOut.length; i++) for (let j = 0; j < e.idsOut[i].length; j++) if (argmaxRow(e.logs[off + i], j * V, V) !== e.idsOut[i][j]) argBad++;
  check(`${fx.name} ${modeName}: CUDA-graph replay = eager, bitwise (decode b1 across a bucket, b2, b8, b32)`, maxAbs === 0 && idsDiff === 0 && g.stats.replays >= 20 && g.stats.captures >= 4, {
    maxAbs,
    idsDiff,
    graphStats: g.stats,
  });
  check(`${fx.name} ${modeName}: device argmax = argmax of the logits`, argBad === 0, { mismatches: argBad });
}

// ---- device sampling vs @ds3/core's Sampler ----------------------------------------------------------------
function samplingChecks() {
  const ctx = cuda.create({ precision: MODES.exact });
  const rng = new Rng(777);
  const gauss = () => Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next());
  const PARAMS = [
    { temperature: 0 },
    { temperature: 1 },
    { temperature: 0.7, topK: 50 },
    { temperature: 1, topP: 0.9 },
    { temperature: 0.8, topK: 40, topP: 0.95 },
    { temperature: 1, minP: 0.05 },
    { temperature: 1.3, topK: 1000, topP: 0.8, minP: 0.01 },
    { temperature: 1, topP: 0.5 },
    { temperature: 2, topK: 1 },
  ];
  const res = { compared: 0, mismatches: 0, maxLogprobDiff: 0, examples: [] };
  const t0 = Date.now();
  for (const V of quick ? [1024] : [1024, 129280]) {
    const T = V > 5000 ? 4 : 8;
    const logits = new Float32Array(T * V);
    for (let r = 0; r < T; r++) {
      const scale = [0.5, 2, 6, 12, 1, 3, 8, 4][r];
      for (let i = 0; i < V; i++) {
        let v = gauss() * scale;
        if (r === 1) v = Math.round(v * 2) / 2; // many exact ties
        if (r === 2 && i % 7 === 0) v = -Infinity; // masked ids
        logits[r * V + i] = v;
      }
    }
    for (const params of PARAMS) {
      const cpuS = new Sampler(params, { size: V });
      for (let d = 0; d < 6; d++) {
        ctx.beginStep();
        const x = ctx.upload(logits, [T, V]);
        const u = Float64Array.from({ length: T }, () => rng.next());
        const got = ctx.sample(x, params, u);
        for (let r = 0; r < T; r++) {
          const ref = cpuS.sample(logits.subarray(r * V, (r + 1) * V), { prompt: [], output: [] }, { next: () => u[r] });
          res.compared++;
          if (ref.id !== got.ids[r]) {
            res.mismatches++;
            if (res.examples.length < 5) res.examples.push({ V, params, row: r, u: u[r], cpu: ref.id, cuda: got.ids[r] });
          }
          res.maxLogprobDiff = Math.max(res.maxLogprobDiff, Math.abs(ref.logprob - got.logprobs[r]));
        }
      }
    }
  }
  res.seconds = (Date.now() - t0) / 1000;
  ctx.dispose();
  check(`device sampling = @ds3/core Sampler for the same draws (temperature/top-k/top-p/min-p, V=${quick ? "1024" : "1024 and 129280"})`, res.mismatches === 0 && res.maxLogprobDiff < 1e-3, res);
}

// ---- long-K FP8 linear (K >= 4096: paths the tiny models never reach), every GEMV launch variant -------------
function longKChecks() {
  const rng = new Rng(4242);
  const N = 384, K = 8192;
  const data = new Uint8Array(N * K);
  for (let i = 0; i < data.length; i++) {
    let b = Math.floor(rng.next() * 256);
    if ((b & 0x7f) === 0x7f) b ^= 1; // no NaN codes
    data[i] = b;
  }
  const scale = Float32Array.from({ length: (N / 128) * (K / 128) }, () => 1e-3 * (0.5 + rng.next()));
  const hw = { name: "longk", dtype: "f8_e4m3", shape: [N, K], data, scale, scaleShape: [N / 128, K / 128], scaleOrigin: [0, 0] };
  const out = {};
  let worst = 0;
  for (const modeName of ["exact", "bf16+fp8"]) {
    const precision = MODES[modeName];
    const cu = cuda.create({ precision });
    const cp = cpu.create({ precision, threads: 8 });
    const wc = cu.weight(hw), wp = cp.weight(hw);
    for (const variant of [{ gemvKs: 0 }, { gemvKs: 1 }]) {
      cu.tune(variant);
      for (const M of [1, 2, 4, 8]) {
        const x = Float32Array.from({ length: M * K }, () => rng.next() * 2 - 1);
        cu.beginStep();
        cp.beginStep();
        const a = cu.download(cu.linear(cu.upload(x, [M, K]), wc));
        const b = cp.download(cp.linear(cp.upload(x, [M, K]), wp));
        const e = normErr(a, b);
        out[`${modeName} ks=${variant.gemvKs} M=${M}`] = e;
        worst = Math.max(worst, e / OP_BOUND[modeName]);
      }
    }
    cu.tune({ gemvKs: 0 });
    cu.dispose();
    cp.dispose();
  }
  check("long-K FP8 linear (384x8192, M=1..8) within the per-op bound of the CPU backend, every GEMV variant", worst <= 1, { normErr: out });
}

// ---- run ----------------------------------------------------------------------------------------------------
const t0 = Date.now();
const tuned = backendName === "cuda" ? cuda.create({ precision: MODES.exact }) : null;
const defaultTune = tuned ? tuned.tune() : null;
if (tuned) console.log(`GEMV launch settings: ${JSON.stringify(defaultTune)}; CUDA graphs ${process.env.DS3_CUDA_GRAPHS === "0" ? "off" : "on"} by default`);
for (const name of want("golden") || want("modes") || want("graphs") ? ["tiny-v3", "tiny-v3-bf16"] : []) {
  const fx = loadFixture(name);
  if (want("golden"))
    try {
      goldenChecks(fx);
    } catch (e) {
      check(`${name} golden checks ran`, false, { error: String(e?.stack ?? e) });
    }
  for (const mode of !want("modes") ? [] : quick ? ["exact", "bf16+fp8"] : Object.keys(MODES)) {
    try {
      modeChecks(fx, mode);
    } catch (e) {
      check(`${name} ${mode} checks ran`, false, { error: String(e?.stack ?? e) });
    }
  }
  if (backendName === "cuda" && !args.includes("--no-graphs") && want("graphs")) {
    for (const mode of ["exact", "bf16+fp8"]) {
      try {
        graphChecks(fx, mode);
      } catch (e) {
        check(`${name} ${mode} graph checks ran`, false, { error: String(e?.stack ?? e) });
      }
    }
  }
}
if (backendName === "cuda") {
  // the other GEMV launch variants on the tiny models' op checks (tuning is process-wide)
  if (!quick && want("variant")) {
    const alt = { gemvKs: defaultTune.gemvKs ? 0 : 1, gemvDualU: defaultTune.gemvDualU === 2 ? 1 : 2 };
    tuned.tune(alt);
    const fx = loadFixture("tiny-v3");
    for (const mode of ["exact", "bf16+fp8"]) {
      try {
        const before = results.checks.length;
        modeChecks(fx, mode);
        for (const c of results.checks.slice(before)) c.name += ` [GEMV variant ${JSON.stringify(alt)}]`;
      } catch (e) {
        check(`tiny-v3 ${mode} checks with GEMV variant ran`, false, { error: String(e?.stack ?? e) });
      }
    }
    tuned.tune(defaultTune);
  }
  for (const [name, fn] of [["sampling", samplingChecks], ["long-K linear", longKChecks]].filter(([n]) => want(n === "sampling" ? "sampling" : "longk"))) {
    try {
      fn();
    } catch (e) {
      check(`${name} checks ran`, false, { error: String(e?.stack ?? e) });
    }
  }
  tuned.dispose();
}
results.seconds = (Date.now() - t0) / 1000;
console.log("\nper-op normwise error vs the CPU backend (max over calls):");
for (const [k, st] of Object.entries(results.ops)) {
  console.log(`  ${k}: ${Object.entries(st).map(([op, s]) => `${op}=${s.maxNormErr.toExponential(1)}${s.idMismatch ? `(ids!${s.idMismatch})` : ""}`).join(" ")}`);
}
console.log(`\n${failures === 0 ? "ALL PASS" : `${failures} FAILED`} (${results.checks.length} checks, ${results.seconds.toFixed(1)} s)`);
results.sections = [...only];
results.status = failures === 0 && results.checks.length > 0 ? "pass" : "fail";
if (jsonOut) writeFileSync(jsonOut, JSON.stringify(results, null, 1));
process.exit(results.status === "pass" ? 0 : 1);
