#!/usr/bin/env node
// The ds3-4L benchmark on one GPU (../../../shared/bench/README.md): DeepSeek-V3 at full width cut to
// 4 layers (1 dense + 3 MoE), random FP8 weights generated on the GPU from a seed, BF16 embedding,
// head and router. Precision: DeepSeek-V3's FP8 recipe (bf16 activations and latent cache, activations
// quantized to FP8 per token per 128 channels in front of every FP8 linear).
//
//   node bench/cuda/ds3-4L.mjs [--out bench/results/ds3-4L-h100.json] [--steps 20]
//
// Decode is measured with CUDA graphs on and off (alternating rounds, best median of each), and at batch 1
// with each GEMV launch variant (ctx.tune); the headline numbers are the backend's defaults.
//
// Runs over the bundled JS (packages/backend-cuda/build/gpu/ds3.js); plain node, no node_modules.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "../..");
const ds3 = await import(join(root, "packages/backend-cuda/build/gpu/ds3.js"));
const { parseConfig, Transformer, SyntheticSource, cuda } = ds3;

const args = process.argv.slice(2);
const opt = (k, d) => (args.includes(k) ? args[args.indexOf(k) + 1] : d);
const outPath = opt("--out", join(root, "bench/results/ds3-4L-h100.json"));
const STEPS = Number(opt("--steps", "20"));
const only = opt("--only", "");
const REPS = Number(opt("--reps", "10"));
const HBM = 3.35e12;
const CTX = 512;

const av = cuda.available();
if (!av.ok) {
  console.log(`SKIP: ${av.reason}`);
  process.exit(3);
}
const cfg = parseConfig(JSON.parse(readFileSync(join(here, "ds3-4L.config.json"), "utf8")), "ds3-4L.config.json");
const precision = { activations: "bf16", cache: "bf16", actQuant: "fp8" };
const ctx = cuda.create({ precision });
console.log(`device: ${ctx.device}`);
let t = performance.now();
const model = new Transformer(ctx, new SyntheticSource(cfg, 1234), cfg, { mtp: false });
ctx.sync();
const loadS = (performance.now() - t) / 1000;
console.log(`weights: ${(ctx.weightBytes / 2 ** 30).toFixed(2)} GiB generated on the GPU in ${loadS.toFixed(1)} s`);

const BS = 64;
const MAXB = 17; // 1088 positions per sequence
const NSEQ = 64;
model.allocCache(NSEQ * MAXB, BS, "bf16");
ctx.fillCacheRandom(model.cache, 99);

let seed = 12345;
const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) / 2 ** 32);
const randIds = (n) => Int32Array.from({ length: n }, () => Math.floor(rnd() * cfg.vocabSize));
function meta(positions, seqIdx) {
  const bt = new Int32Array(NSEQ * MAXB);
  for (let i = 0; i < bt.length; i++) bt[i] = i;
  return { positions: Int32Array.from(positions), seqIdx: Int32Array.from(seqIdx), blockTables: bt, maxBlocks: MAXB };
}
/** one step as an engine runs it, with greedy sampling on the device (only ids cross back) */
function step(ids, m, logitRows) {
  ctx.beginStep();
  let h = ctx.embed(model.embed, ids, 0);
  for (const b of model.layers) h = b.forward(h, m);
  const hid = ctx.rmsNorm(h, model.norm, cfg.rmsNormEps);
  const rows = logitRows.length === ids.length ? hid : ctx.rows(hid, logitRows);
  return ctx.argmax(ctx.linear(rows, model.head));
}
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
function time(fn, warm, n) {
  for (let i = 0; i < warm; i++) fn();
  const ts = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    fn();
    ts.push(performance.now() - t0);
  }
  return { median: median(ts), min: Math.min(...ts), max: Math.max(...ts) };
}
function profileOf(fn) {
  fn();
  ctx.profile(true);
  const t0 = performance.now();
  fn();
  const wall = performance.now() - t0;
  const rep = ctx.profileReport();
  ctx.profile(false);
  const total = rep.filter((r) => !r.name.startsWith(".")).reduce((a, r) => a + r.ms, 0); // ".x" = part of the op before it
  return { wall_ms: wall, gpu_ms_sum: total, ops: rep.sort((a, b) => b.ms - a.ms).map((r) => ({ op: r.name, ms: +r.ms.toFixed(4), count: r.count, pct: +((100 * r.ms) / total).toFixed(1) })) };
}

const res = { device: ctx.device, precision, config: "ds3-4L", weights_gib: ctx.weightBytes / 2 ** 30, weight_init_s: loadS };

// ---- micro: single ops at decode sizes (bytes moved / time) ----------------------------------------------------
if (args.includes("--micro")) {
  const moe = model.layers[1].ffn;
  const att = model.layers[1].attn;
  const micro = {};
  const timeOp = (name, T, bytes, fn, width = cfg.dim) => {
    const host = Float32Array.from({ length: T * width }, () => rnd() * 2 - 1);
    const tt = time(() => {
      ctx.beginStep();
      fn(ctx.upload(host, [T, width]));
      ctx.sync();
    }, REPS > 1 ? 2 : 0, REPS);
    micro[`${name} T=${T}`] = { ms: +tt.median.toFixed(4), GBps: bytes ? +(bytes / tt.median / 1e6).toFixed(0) : undefined };
  };
  for (const T of [1, 8, 64]) {
    const per = moe.experts.bytesPerExpert;
    const d = distinctExpertsFor(T, moe);
    timeOp("moeGate+moeExperts", T, d * per, (x) => ctx.moeExperts(x, moe.experts, ctx.moeGate(x, moe.gate, moe.bias, moe.gcfg), moe.gcfg.topk));
    timeOp("linear wo 7168x16384", T, att.wo.bytes, (x) => ctx.linear(x, att.wo), att.wo.shape[1]);
    timeOp("mla (absorb+attn+vproj) ctx512", T, 0, (x) => {
      const m = meta(new Array(T).fill(CTX), Array.from({ length: T }, (_, i) => i));
      const q = ctx.linear(ctx.rmsNorm(ctx.linear(x, att.wqA), att.qNorm, 1e-6), att.wqB);
      const kvA = ctx.linear(x, att.wkvA);
      ctx.mla(q, ctx.slice(kvA, 0, cfg.kvLoraRank), ctx.slice(kvA, cfg.kvLoraRank, cfg.kvLoraRank + cfg.qkRopeHeadDim), att.wkvB, model.cache, 1, m, att.dims);
    });
    timeOp("linear head", T, model.head.bytes, (x) => ctx.linear(x, model.head));
    timeOp("linear wq_a 1536x7168", T, att.wqA.bytes, (x) => ctx.linear(x, att.wqA));
  }
  res.micro = micro;
  console.log(JSON.stringify(micro, null, 1));
  if (only === "micro") process.exit(0);
}
function distinctExpertsFor(T, moe) {
  ctx.beginStep();
  const x = ctx.upload(Float32Array.from({ length: T * cfg.dim }, () => rnd() * 2 - 1), [T, cfg.dim]);
  const r = ctx.download(ctx.moeGate(x, moe.gate, moe.bias, moe.gcfg));
  const k = moe.gcfg.topk;
  const s = new Set();
  for (let t = 0; t < T; t++) for (let j = 0; j < k; j++) s.add(r[t * 2 * k + k + j]);
  return s.size;
}

// ---- prefill 1 x 1024 -------------------------------------------------------------------------------
const P = 1024;
const pIds = randIds(P);
const pMeta = meta(Array.from({ length: P }, (_, i) => i), new Array(P).fill(0));
const pRows = Int32Array.of(P - 1);
if (!only || only === "prefill") {
  const tp = time(() => step(pIds, pMeta, pRows), 1, Math.max(3, Math.min(STEPS, 5)));
  res.prefill_1x1024_ms = tp.median;
  res.prefill_1x1024_tok_s = P / (tp.median / 1000);
  console.log(`prefill 1x1024: ${tp.median.toFixed(2)} ms (min ${tp.min.toFixed(2)}), ${res.prefill_1x1024_tok_s.toFixed(0)} tok/s`);
  ctx.fillCacheRandom(model.cache, 99);
}

// ---- decode at context 512 ----------------------------------------------------------------------------------
function decodeCase(B) {
  const ids = randIds(B);
  const m = meta(new Array(B).fill(CTX), Array.from({ length: B }, (_, i) => i));
  const rows = Int32Array.from({ length: B }, (_, i) => i);
  return { ids, m, rows, run: () => step(ids, m, rows) };
}
const graphsDefault = ctx.graphStats().enabled;
const tuneDefault = ctx.tune();
res.defaults = { cuda_graphs: graphsDefault, gemv: tuneDefault };
const BATCHES = [1, 8, 32, 64].filter((B) => !only || only === `b${B}`);
const cases = Object.fromEntries(BATCHES.map((B) => [B, decodeCase(B)]));
/** median ms per step at each batch size, in the current graph / tuning settings */
function decodeRound(batches = BATCHES) {
  const out = {};
  for (const B of batches) out[B] = time(cases[B].run, 3, STEPS);
  return out;
}
const rounds = { graphs: [], eager: [] };
for (let r = 0; r < 2; r++)
  for (const g of r % 2 ? [false, true] : [true, false]) {
    ctx.setGraphs(g);
    rounds[g ? "graphs" : "eager"].push(decodeRound());
  }
ctx.setGraphs(graphsDefault);
const best = (rs, B) => Math.min(...rs.map((x) => x[B].median));
res.decode_graphs_vs_eager = {};
for (const B of BATCHES) {
  const g = best(rounds.graphs, B), e = best(rounds.eager, B);
  res.decode_graphs_vs_eager[`b${B}`] = {
    graphs_ms: g,
    eager_ms: e,
    graphs_tok_s: B / (g / 1000),
    eager_tok_s: B / (e / 1000),
    rounds_graphs_ms: rounds.graphs.map((x) => x[B].median),
    rounds_eager_ms: rounds.eager.map((x) => x[B].median),
  };
  const ms = graphsDefault ? g : e;
  res[`decode_b${B}_ctx512_ms`] = ms;
  res[`decode_b${B}_ctx512_tok_s`] = B / (ms / 1000);
  console.log(
    `decode b${B} ctx${CTX}: ${ms.toFixed(3)} ms/step, ${res[`decode_b${B}_ctx512_tok_s`].toFixed(1)} tok/s  (graphs ${g.toFixed(3)} ms = ${(B / (g / 1000)).toFixed(1)} tok/s, eager ${e.toFixed(3)} ms = ${(B / (e / 1000)).toFixed(1)} tok/s)`,
  );
}
res.graph_stats = ctx.graphStats();

// GEMV launch variants at batch 1 (the only batch they touch), graphs as by default
if (BATCHES.includes(1)) {
  const variants = [
    { gemvKs: 0, gemvDualU: 1 },
    { gemvKs: 1, gemvDualU: 1 },
    { gemvKs: 0, gemvDualU: 2 },
    { gemvKs: 1, gemvDualU: 2 },
  ];
  res.decode_b1_gemv_variants = [];
  for (let r = 0; r < 2; r++)
    for (const v of r % 2 ? [...variants].reverse() : variants) {
      ctx.tune(v);
      const t = decodeRound([1])[1];
      res.decode_b1_gemv_variants.push({ ...v, ms: t.median, tok_s: 1 / (t.median / 1000) });
    }
  ctx.tune(tuneDefault);
  for (const v of variants) {
    const ms = Math.min(...res.decode_b1_gemv_variants.filter((x) => x.gemvKs === v.gemvKs && x.gemvDualU === v.gemvDualU).map((x) => x.ms));
    console.log(`decode b1, GEMV ${JSON.stringify(v)}: ${ms.toFixed(3)} ms, ${(1000 / ms).toFixed(1)} tok/s`);
  }
  // the variants compute the same function: outputs of the real shapes on the same input
  const att = model.layers[1].attn, dense = model.layers[0].ffn, moe = model.layers[1].ffn;
  const shapes = [
    ["wo 7168x16384", att.wo],
    ["dense w1 18432x7168", dense.w1],
    ["dense w2 7168x18432", dense.w2],
    ["wq_b 24576x1536", att.wqB],
    ["wq_a 1536x7168", att.wqA],
  ];
  const agree = {};
  const runVariant = (v, fn, width) => {
    ctx.tune(v);
    ctx.beginStep();
    const x = ctx.upload(Float32Array.from({ length: width }, (_, i) => Math.sin(i * 0.37) * 0.8), [1, width]);
    return ctx.download(fn(x));
  };
  const nerr = (a, b) => {
    let n = 0, d = 0;
    for (let i = 0; i < a.length; i++) {
      n += (a[i] - b[i]) ** 2;
      d += b[i] ** 2;
    }
    return Math.sqrt(n / Math.max(d, 1e-30));
  };
  for (const [name, w] of shapes) {
    const a = runVariant({ gemvKs: 0, gemvDualU: 1 }, (x) => ctx.linear(x, w), w.shape[1]);
    const b = runVariant({ gemvKs: 1, gemvDualU: 1 }, (x) => ctx.linear(x, w), w.shape[1]);
    agree[`linear ${name}: ks 1 vs 0`] = nerr(b, a);
  }
  {
    const f = (x) => ctx.moeExperts(x, moe.experts, ctx.moeGate(x, moe.gate, moe.bias, moe.gcfg), moe.gcfg.topk);
    const a = runVariant({ gemvKs: 0, gemvDualU: 1 }, f, cfg.dim);
    const b = runVariant({ gemvKs: 0, gemvDualU: 2 }, f, cfg.dim);
    agree["moeExperts T=1: dualU 2 vs 1"] = nerr(b, a);
  }
  ctx.tune(tuneDefault);
  res.gemv_variant_agreement_normwise = agree;
  res.gemv_variants_agree = Object.values(agree).every((e) => e <= 1e-2);
  console.log(`GEMV variants agree (normwise, bound 1e-2): ${res.gemv_variants_agree} ${JSON.stringify(agree)}`);
}

// host time to issue one step (JS + Node-API + launches) against the whole step: is the GPU fed fast enough?
for (const B of [1, 64]) {
  if (only && only !== `b${B}`) continue;
  const c = cases[B];
  for (const g of [true, false]) {
    ctx.setGraphs(g);
    const enq = [], tot = [];
    for (let i = 0; i < 12; i++) {
      // the bench step; "issued" = every op up to the head issued (or checked against the recording)
      ctx.beginStep();
      const t0 = performance.now();
      let h = ctx.embed(model.embed, c.ids, 0);
      for (const b of model.layers) h = b.forward(h, c.m);
      const lg = ctx.linear(ctx.rmsNorm(h, model.norm, cfg.rmsNormEps), model.head);
      const t1 = performance.now();
      ctx.argmax(lg);
      if (i >= 2) {
        enq.push(t1 - t0);
        tot.push(performance.now() - t0);
      }
    }
    res[`decode_b${B}_host_issue_ms${g ? "_graphs" : "_eager"}`] = median(enq);
    console.log(`decode b${B} (${g ? "graphs" : "eager"}): host issues a step in ${median(enq).toFixed(3)} ms of ${median(tot).toFixed(3)} ms`);
  }
  ctx.setGraphs(graphsDefault);
}

// device sampling (top-k/top-p) instead of greedy: cost at b1 and b64
for (const B of [1, 64]) {
  if (only && only !== `b${B}`) continue;
  const c = cases[B];
  const u = new Float64Array(B).fill(0.5);
  const sp = { temperature: 0.8, topK: 50, topP: 0.95 };
  const t = time(() => {
    ctx.beginStep();
    let h = ctx.embed(model.embed, c.ids, 0);
    for (const b of model.layers) h = b.forward(h, c.m);
    ctx.sample(ctx.linear(ctx.rmsNorm(h, model.norm, cfg.rmsNormEps), model.head), sp, u);
  }, 3, Math.min(STEPS, 10));
  res[`decode_b${B}_ctx512_tok_s_device_topk_topp`] = B / (t.median / 1000);
  console.log(`decode b${B} with device top-k/top-p sampling: ${t.median.toFixed(3)} ms/step, ${(B / (t.median / 1000)).toFixed(1)} tok/s`);
}

// ---- routing spread and bytes per step -------------------------------------------------------------------------
function distinctExperts(B) {
  const c = decodeCase(B);
  const caught = [];
  const orig = ctx.moeGate;
  ctx.moeGate = function (...a) {
    const r = orig.apply(ctx, a);
    caught.push(r);
    return r;
  };
  try {
    c.run();
  } finally {
    delete ctx.moeGate;
  }
  const k = cfg.nActivatedExperts;
  return caught.map((r) => {
    const d = ctx.download(r);
    const s = new Set();
    for (let t = 0; t < B; t++) for (let j = 0; j < k; j++) s.add(d[t * 2 * k + k + j]);
    return s.size;
  });
}
const d64 = distinctExperts(64);
const d1 = distinctExperts(1);
res.distinct_experts_per_moe_layer_b64 = d64.reduce((a, b) => a + b, 0) / d64.length;
res.distinct_experts_per_moe_layer_b64_each = d64;
let routedAll = 0, routedB1 = 0;
let li = 0;
for (const b of model.layers) {
  const ex = b.ffn.experts;
  if (!ex) continue;
  routedAll += ex.count * ex.bytesPerExpert;
  routedB1 += d1[li++] * ex.bytesPerExpert;
}
const embRow = model.embed.bytes / model.embed.shape[0];
res.weight_bytes_per_step_b1 = ctx.weightBytes - routedAll - model.embed.bytes + embRow + routedB1;
res.kv_cache_bytes_per_step_b1 = cfg.nLayers * (CTX + 1) * (cfg.kvLoraRank + cfg.qkRopeHeadDim) * 2;
if (res.decode_b1_ctx512_ms) {
  res.decode_b1_roofline_fraction = (res.weight_bytes_per_step_b1 + res.kv_cache_bytes_per_step_b1) / (res.decode_b1_ctx512_ms / 1000) / HBM;
  res.decode_b1_achieved_GBps = (res.weight_bytes_per_step_b1 + res.kv_cache_bytes_per_step_b1) / (res.decode_b1_ctx512_ms / 1000) / 1e9;
}
console.log(`distinct experts per MoE layer at b64: ${d64.join(", ")}; weight bytes per b1 step: ${(res.weight_bytes_per_step_b1 / 1e9).toFixed(3)} GB; roofline fraction b1: ${res.decode_b1_roofline_fraction?.toFixed(3)}`);

// with the full logits downloaded, as Transformer.forward returns them
{
  const c = decodeCase(64);
  const tf = time(() => {
    ctx.beginStep();
    model.forward(c.ids, c.m, c.rows);
  }, 2, Math.min(STEPS, 10));
  res.decode_b64_ctx512_tok_s_full_logits_download = 64 / (tf.median / 1000);
}

// ---- kernel-level profiles (CUDA events per op) --------------------------------------------------------------------
res.profile = {};
if (!only || only === "prefill") res.profile.prefill_1x1024 = profileOf(() => step(pIds, pMeta, pRows));
for (const B of [64, 1]) {
  const c = decodeCase(B);
  res.profile[`decode_b${B}_ctx512`] = profileOf(c.run);
}
res.profile_note = "CUDA events per op, graphs off while profiling (events between ops); '.x' rows are parts of the op above";
for (const [k, p] of Object.entries(res.profile)) {
  console.log(`\nprofile ${k}: wall ${p.wall_ms.toFixed(2)} ms, sum of op times ${p.gpu_ms_sum.toFixed(2)} ms`);
  for (const o of p.ops.slice(0, 18)) console.log(`  ${o.ms.toFixed(3).padStart(9)} ms ${String(o.pct).padStart(5)}%  x${o.count}  ${o.op}`);
}
res.memory = ctx.memInfo();
res.note =
  "tok/s from the median step time (decode: best of 2 alternating rounds per setting); decode steps sample greedily on the device; prefill returns the last row only; headline numbers use the defaults in `defaults`";
mkdirSync(dirname(outPath), { recursive: true });
writeFileSync(outPath, JSON.stringify(res, null, 1));
if (process.env.OUT) writeFileSync(join(process.env.OUT, "ds3-4L-h100.json"), JSON.stringify(res, null, 1));
console.log(`\n${JSON.stringify(Object.fromEntries(Object.entries(res).filter(([k]) => /tok_s|fraction|distinct_experts_per_moe_layer_b64$|weight_bytes|defaults|agree$/.test(k))))}`);
ctx.dispose();
