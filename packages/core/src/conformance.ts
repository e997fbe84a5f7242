// The conformance suite of the backend contract, parameterized by provider: every op on random
// inputs against a float64 reference (exact mode), the collectives and the golden checkpoints end
// to end through worker ranks at world size 1, 2 and 4, and rank placement. The vitest file
// (test/conformance/) and `ds3 selftest` both run this code, so what CI checks on the CPU is what a
// user with other hardware runs and sends back.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { type BackendContext, type BackendProvider, checkProvider, EXACT, OPS, type OpName, type Precision, PRECISION_NAMES, type PrecisionName, PRECISIONS, REQUIRED_OPS, type Tensor } from "./backend.js";
import { drift, goldenFloor, precisionOpChecks, quantizerChecks } from "./conformance-precision.js";
import { loadConfig } from "./executor.js";
import { placeRanks } from "./devices.js";
import { RankExecutor } from "./ranks.js";
import { bf16Weight, type CheckDraft, type ConformanceCheck, f32Weight, fp8e4m3Decode, fp8Weight, Inputs, normErr, refLinear, silu } from "./conformance-common.js";

export { type ConformanceCheck, fp8e4m3Decode, normErr };

export interface ConformanceReport {
  backend: string;
  device: string;
  /** every gating check passed */
  ok: boolean;
  /** the precisions asked for, in order, and what became of each */
  precisions: Array<{ name: PrecisionName; precision: Precision; status: "ran" | "not supported" }>;
  checks: ConformanceCheck[];
}

export interface ConformanceOptions {
  /**
   * which precisions to run: a name, a list, or "all" (the default): every precision at which the
   * backend supports at least one op; the others are reported as not supported. A precision asked
   * for by name that the backend does not support is a failure.
   */
  precision?: PrecisionName | "all" | readonly PrecisionName[];
  /** golden checkpoint directories (golden.json + golden.f32 next to the weights) for the end-to-end checks */
  goldenDirs?: string[];
  /** world sizes of the end-to-end rank checks (default 1, 2, 4) */
  worldSizes?: number[];
  /** random seed of the op inputs */
  seed?: number;
  /** progress lines */
  onCheck?: (c: ConformanceCheck) => void;
}

const OP_TOL = 1e-5;
const GOLDEN_TOL = 1e-3;


/** The op checks on one context (exact mode). */
function opChecks(ctx: BackendContext, provider: BackendProvider, seed: number): CheckDraft[] {
  const inp = new Inputs(seed);
  const out: CheckDraft[] = [];
  const run = (name: string, op: OpName, f: () => { got: ArrayLike<number>; ref: ArrayLike<number> } | CheckDraft, tol = OP_TOL) => {
    if (!provider.supports(op, EXACT)) {
      out.push({ name, op, ok: false, worst: NaN, tolerance: tol, detail: `backend "${provider.name}" does not support op ${op} in exact mode` });
      return;
    }
    try {
      ctx.beginStep();
      const r = f();
      if ("ok" in r) out.push(r);
      else {
        const worst = normErr(r.got, r.ref);
        out.push({ name, op, ok: worst <= tol, worst, tolerance: tol });
      }
    } catch (e) {
      out.push({ name, op, ok: false, worst: NaN, tolerance: tol, detail: e instanceof Error ? e.message : String(e) });
    }
  };
  const up = (x: Float32Array, shape: number[]): Tensor => ctx.upload(x, shape);
  const T = 5;
  const D = 96;

  run("embed", "embed", () => {
    const V = 40;
    const tab = inp.vec(V * D);
    const ids = Int32Array.from({ length: 7 }, () => 100 + inp.int(V));
    const got = ctx.download(ctx.embed(ctx.weight(f32Weight("emb", tab, V, D)), ids, 100));
    const ref = new Float64Array(ids.length * D);
    ids.forEach((id, t) => ref.set(tab.subarray((id - 100) * D, (id - 99) * D), t * D));
    return { got, ref };
  });
  run("rmsNorm", "rmsNorm", () => {
    const x = inp.vec(T * D);
    const g = Float32Array.from({ length: D }, () => 0.5 + inp.u());
    const got = ctx.download(ctx.rmsNorm(up(x, [T, D]), ctx.weight(f32Weight("g", g, 1, D)), 1e-6));
    const ref = new Float64Array(T * D);
    for (let t = 0; t < T; t++) {
      let ss = 0;
      for (let i = 0; i < D; i++) ss += x[t * D + i]! ** 2;
      const r = 1 / Math.sqrt(ss / D + 1e-6);
      for (let i = 0; i < D; i++) ref[t * D + i] = g[i]! * x[t * D + i]! * r;
    }
    return { got, ref };
  });
  const N = 200;
  const K = 300;
  const xl = inp.vec(T * K);
  run("linear (f32 weight)", "linear", () => {
    const w = inp.vec(N * K, 0.1);
    return { got: ctx.download(ctx.linear(up(xl, [T, K]), ctx.weight(f32Weight("w", w, N, K)))), ref: refLinear(xl, T, w, N, K) };
  });
  run("linear (bf16 weight)", "linear", () => {
    const { hw, dense } = bf16Weight(inp, N, K);
    return { got: ctx.download(ctx.linear(up(xl, [T, K]), ctx.weight(hw))), ref: refLinear(xl, T, dense, N, K) };
  });
  run("linear (fp8 weight, 128x128 block scales, slice inside a block)", "linear", () => {
    const { hw, dense } = fp8Weight(inp, N, K, [100, 50]);
    return { got: ctx.download(ctx.linear(up(xl, [T, K]), ctx.weight(hw))), ref: refLinear(xl, T, dense, N, K) };
  });
  const a = inp.vec(T * D);
  const b = inp.vec(T * D);
  run("add", "add", () => ({ got: ctx.download(ctx.add(up(a, [T, D]), up(b, [T, D]))), ref: Float64Array.from(a, (v, i) => v + b[i]!) }));
  run("siluMul", "siluMul", () => ({ got: ctx.download(ctx.siluMul(up(a, [T, D]), up(b, [T, D]))), ref: Float64Array.from(a, (v, i) => silu(v) * b[i]!) }));
  run("concat", "concat", () => {
    const c = inp.vec(T * 32);
    const ref = new Float64Array(T * (D + 32));
    for (let t = 0; t < T; t++) {
      ref.set(a.subarray(t * D, (t + 1) * D), t * (D + 32));
      ref.set(c.subarray(t * 32, (t + 1) * 32), t * (D + 32) + D);
    }
    return { got: ctx.download(ctx.concat(up(a, [T, D]), up(c, [T, 32]))), ref };
  });
  run("slice", "slice", () => {
    const ref = new Float64Array(T * 40);
    for (let t = 0; t < T; t++) ref.set(a.subarray(t * D + 17, t * D + 57), t * 40);
    return { got: ctx.download(ctx.slice(up(a, [T, D]), 17, 57)), ref };
  });
  run("rows", "rows", () => {
    const rows = Int32Array.of(4, 0, 2, 2);
    const ref = new Float64Array(rows.length * D);
    rows.forEach((r, i) => ref.set(a.subarray(r * D, (r + 1) * D), i * D));
    return { got: ctx.download(ctx.rows(up(a, [T, D]), rows)), ref };
  });
  run("rope (interleaved pairs, rotary part inside the head)", "rope", () => {
    const H = 2;
    const hd = 48;
    const off = 16;
    const rd = 32;
    const q = inp.vec(3 * H * hd);
    const inv = Float32Array.from({ length: rd / 2 }, (_, i) => 1 / 10000 ** ((2 * i) / rd));
    const pos = Int32Array.of(0, 5, 4000);
    const got = ctx.download(ctx.rope(up(q, [3, H * hd]), H, hd, off, rd, pos, inv, 1));
    const ref = Float64Array.from(q);
    for (let t = 0; t < 3; t++)
      for (let h = 0; h < H; h++)
        for (let p = 0; p < rd / 2; p++) {
          const base = t * H * hd + h * hd + off + 2 * p;
          const ang = Math.fround(pos[t]! * inv[p]!);
          const x0 = q[base]!;
          const x1 = q[base + 1]!;
          ref[base] = x0 * Math.cos(ang) - x1 * Math.sin(ang);
          ref[base + 1] = x0 * Math.sin(ang) + x1 * Math.cos(ang);
        }
    return { got, ref };
  }, 1e-4); // float32 angles of position 4000

  // routing: noaux_tc (sigmoid scores, the bias chooses, groups limit, weights renormalized and scaled)
  const E = 16;
  const G = 4;
  const TG = 2;
  const topk = 4;
  const Dg = 32;
  const xg = inp.vec(6 * Dg);
  const gw = inp.vec(E * Dg, 0.3);
  const bias = inp.vec(E, 0.2);
  const gateRef = () => {
    const wts: number[] = [];
    const ids: number[] = [];
    for (let t = 0; t < 6; t++) {
      const sc = Array.from({ length: E }, (_, e) => {
        let s = 0;
        for (let i = 0; i < Dg; i++) s += xg[t * Dg + i]! * gw[e * Dg + i]!;
        return 1 / (1 + Math.exp(-s));
      });
      const ch = sc.map((s, e) => s + bias[e]!);
      const per = E / G;
      const gs = Array.from({ length: G }, (_, g) =>
        ch
          .slice(g * per, (g + 1) * per)
          .sort((x, y) => y - x)
          .slice(0, 2)
          .reduce((x, y) => x + y, 0),
      );
      const groups = [...gs.keys()].sort((x, y) => gs[y]! - gs[x]!).slice(0, TG);
      const cand = [...ch.keys()].filter((e) => groups.includes(Math.floor(e / per))).sort((x, y) => ch[y]! - ch[x]!).slice(0, topk);
      const sum = cand.reduce((x, e) => x + sc[e]!, 0);
      cand.forEach((e) => (wts.push((sc[e]! / sum) * 2.5), ids.push(e)));
    }
    return { wts, ids };
  };
  const gateCfg = { topk, nGroups: G, topkGroups: TG, scoreFunc: "sigmoid" as const, normTopk: true, routeScale: 2.5 };
  run("moeGate (sigmoid, correction bias, group limit)", "moeGate", () => {
    const got = ctx.download(ctx.moeGate(up(xg, [6, Dg]), ctx.weight(f32Weight("gate", gw, E, Dg)), bias, gateCfg));
    const r = gateRef();
    // ids per token as sets (order of equal picks is free), weights matched to their ids
    const gotW: number[] = [];
    const refW: number[] = [];
    let idErr = 0;
    for (let t = 0; t < 6; t++) {
      const g = Array.from({ length: topk }, (_, k) => ({ id: got[t * 2 * topk + topk + k]!, w: got[t * 2 * topk + k]! })).sort((x, y) => x.id - y.id);
      const f = Array.from({ length: topk }, (_, k) => ({ id: r.ids[t * topk + k]!, w: r.wts[t * topk + k]! })).sort((x, y) => x.id - y.id);
      g.forEach((x, k) => {
        if (x.id !== f[k]!.id) idErr++;
        gotW.push(x.w);
        refW.push(f[k]!.w);
      });
    }
    const worst = idErr ? Infinity : normErr(gotW, refW);
    return { name: "moeGate (sigmoid, correction bias, group limit)", op: "moeGate", ok: worst <= OP_TOL, worst, tolerance: OP_TOL, ...(idErr && { detail: `${idErr} routed expert ids differ` }) };
  });
  run("moeExperts (experts 4..11 of 16 on this rank)", "moeExperts", () => {
    const Dm = 64;
    const I = 48;
    const first = 4;
    const count = 8;
    const x = inp.vec(T * Dm);
    const ws = Array.from({ length: count }, () => ({ w1: inp.vec(I * Dm, 0.1), w2: inp.vec(Dm * I, 0.1), w3: inp.vec(I * Dm, 0.1) }));
    const set = ctx.expertSet(
      first,
      ws.map((e, i) => ({ w1: ctx.weight(f32Weight(`e${i}.w1`, e.w1, I, Dm)), w2: ctx.weight(f32Weight(`e${i}.w2`, e.w2, Dm, I)), w3: ctx.weight(f32Weight(`e${i}.w3`, e.w3, I, Dm)) })),
    );
    const routing = new Float32Array(T * 2 * topk);
    for (let t = 0; t < T; t++) {
      const picked = new Set<number>();
      while (picked.size < topk) picked.add(inp.int(16));
      [...picked].forEach((e, k) => ((routing[t * 2 * topk + k] = 0.1 + inp.u()), (routing[t * 2 * topk + topk + k] = e)));
    }
    const got = ctx.download(ctx.moeExperts(up(x, [T, Dm]), set, up(routing, [T, 2 * topk]), topk));
    const ref = new Float64Array(T * Dm);
    for (let t = 0; t < T; t++)
      for (let k = 0; k < topk; k++) {
        const e = routing[t * 2 * topk + topk + k]! - first;
        if (e < 0 || e >= count) continue;
        const xt = x.subarray(t * Dm, (t + 1) * Dm);
        const h1 = refLinear(xt, 1, ws[e]!.w1, I, Dm);
        const h3 = refLinear(xt, 1, ws[e]!.w3, I, Dm);
        const y = refLinear(Float64Array.from(h1, (v, i) => silu(v) * h3[i]!), 1, ws[e]!.w2, Dm, I);
        for (let i = 0; i < Dm; i++) ref[t * Dm + i]! += routing[t * 2 * topk + k]! * y[i]!;
      }
    return { got, ref };
  });
  run("mla (absorbed, paged cache, two sequences, prefill then decode)", "mla", () => mlaCheck(ctx, inp));
  run("allReduce (world size 1: identity)", "allReduce", () => ({ got: ctx.download(ctx.allReduce(up(a, [T, D]))), ref: a }), 0);
  run("allGatherCols (world size 1: identity)", "allGatherCols", () => ({ got: ctx.download(ctx.allGatherCols(up(a, [T, D]))), ref: a }), 0);
  if (provider.supports("sample", EXACT))
    run("sample (greedy: argmax and its log-softmax)", "sample", () => {
      if (!ctx.sample) throw new Error(`backend "${provider.name}" says it supports op sample but its context has no sample()`);
      const V = 1000;
      const l = inp.vec(3 * V, 3);
      const r = ctx.sample(up(l, [3, V]), Array.from({ length: 3 }, () => ({ temperature: 0, topK: 0, topP: 1, minP: 0 })), new Float64Array(3));
      const refIds: number[] = [];
      const refLp: number[] = [];
      for (let t = 0; t < 3; t++) {
        const row = l.subarray(t * V, (t + 1) * V);
        let best = 0;
        for (let i = 1; i < V; i++) if (row[i]! > row[best]!) best = i;
        let z = 0;
        for (let i = 0; i < V; i++) z += Math.exp(row[i]! - row[best]!);
        refIds.push(best);
        refLp.push(-Math.log(z));
      }
      const bad = refIds.filter((id, t) => r.ids[t] !== id).length;
      const worst = bad ? Infinity : normErr(r.logprobs, refLp);
      return { name: "sample (greedy: argmax and its log-softmax)", op: "sample", ok: worst <= 1e-4, worst, tolerance: 1e-4, ...(bad && { detail: `${bad} of 3 ids differ from the argmax` }) };
    }, 1e-4);
  return out;
}

/** MLA against the non-absorbed float64 formula; also checks what the op wrote into the cache. */
function mlaCheck(ctx: BackendContext, inp: Inputs): { got: ArrayLike<number>; ref: ArrayLike<number> } {
  const heads = 2;
  const nope = 16;
  const rope = 8;
  const v = 12;
  const kvLora = 32;
  const scale = 1 / Math.sqrt(nope + rope);
  const bs = 4;
  const maxBlocks = 3;
  const cache = ctx.createCache(1, 8, bs, kvLora + rope, "f32");
  const wkvB = inp.vec(heads * (nope + v) * kvLora, 0.2);
  const W = ctx.weight(f32Weight("wkv_b", wkvB, heads * (nope + v), kvLora));
  // sequence 0 in blocks 5, 1, 6; sequence 1 in blocks 2, 7
  const tables = Int32Array.of(5, 1, 6, 2, 7, -1);
  const lat: Array<Map<number, Float64Array>> = [new Map(), new Map()];
  const got: number[] = [];
  const ref: number[] = [];
  const step = (seqs: number[], positions: number[]) => {
    const Tn = seqs.length;
    const q = inp.vec(Tn * heads * (nope + rope));
    const kv = inp.vec(Tn * kvLora);
    const pe = inp.vec(Tn * rope);
    ctx.beginStep();
    const meta = { positions: Int32Array.from(positions), seqIdx: Int32Array.from(seqs), blockTables: tables, maxBlocks };
    const y = ctx.download(ctx.mla(ctx.upload(q, [Tn, heads * (nope + rope)]), ctx.upload(kv, [Tn, kvLora]), ctx.upload(pe, [Tn, rope]), W, cache, 0, meta, { heads, nope, rope, v, kvLora, scale }));
    for (let t = 0; t < Tn; t++) {
      const c = new Float64Array(kvLora + rope);
      c.set(kv.subarray(t * kvLora, (t + 1) * kvLora));
      c.set(pe.subarray(t * rope, (t + 1) * rope), kvLora);
      lat[seqs[t]!]!.set(positions[t]!, c);
    }
    for (let t = 0; t < Tn; t++) {
      const s = seqs[t]!;
      const ctxPos = [...lat[s]!.keys()].filter((p) => p <= positions[t]!).sort((x, z) => x - z);
      for (let h = 0; h < heads; h++) {
        const qh = q.subarray((t * heads + h) * (nope + rope), (t * heads + h + 1) * (nope + rope));
        const scores = ctxPos.map((p) => {
          const c = lat[s]!.get(p)!;
          let sc = 0;
          for (let i = 0; i < nope; i++) {
            let k = 0; // k_nope = W_uk c
            for (let j = 0; j < kvLora; j++) k += wkvB[(h * (nope + v) + i) * kvLora + j]! * c[j]!;
            sc += qh[i]! * k;
          }
          for (let i = 0; i < rope; i++) sc += qh[nope + i]! * c[kvLora + i]!;
          return sc * scale;
        });
        const mx = Math.max(...scores);
        const e = scores.map((x) => Math.exp(x - mx));
        const z = e.reduce((x, w) => x + w, 0);
        for (let i = 0; i < v; i++) {
          let o = 0;
          ctxPos.forEach((p, j) => {
            const c = lat[s]!.get(p)!;
            let val = 0; // v = W_uv c
            for (let k = 0; k < kvLora; k++) val += wkvB[(h * (nope + v) + nope + i) * kvLora + k]! * c[k]!;
            o += (e[j]! / z) * val;
          });
          ref.push(o);
          got.push(y[t * heads * v + h * v + i]!);
        }
      }
    }
  };
  step([0, 0, 0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 4, 0, 1, 2]); // prefill across a block boundary
  step([1, 0], [3, 5]); // decode both
  step([0], [6]);
  // the cache holds every token's [latent, rope key] at its slot
  for (const [s, m] of lat.entries())
    for (const [p, c] of m) {
      const slot = tables[s * maxBlocks + Math.floor(p / bs)]! * bs + (p % bs);
      const row = ctx.readCache(cache, 0, slot, 1);
      for (let i = 0; i < c.length; i++) (got.push(row[i]!), ref.push(c[i]!));
    }
  return { got, ref };
}

interface GoldenPrompt {
  ids: number[];
  logits: Float32Array;
  greedy: number[];
}

function readGolden(dir: string): GoldenPrompt[] {
  const g = JSON.parse(readFileSync(join(dir, "golden.json"), "utf8")) as {
    prompts: Array<{ ids: number[]; logits_offset: number; logits_shape: [number, number]; greedy: number[] }>;
  };
  const buf = readFileSync(join(dir, "golden.f32"));
  const f32 = new Float32Array(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength));
  return g.prompts.map((p) => ({ ids: p.ids, greedy: p.greedy, logits: f32.slice(p.logits_offset / 4, p.logits_offset / 4 + p.logits_shape[0] * p.logits_shape[1]) }));
}

/** Golden logits (every position) and the first greedy id through worker ranks at world size N. */
async function goldenCheck(provider: BackendProvider, dir: string, ws: number): Promise<CheckDraft[]> {
  const name = `${dir.split(/[\\/]/).filter(Boolean).pop()} at world size ${ws}`;
  const prompts = readGolden(dir);
  const maxLen = Math.max(...prompts.map((p) => p.ids.length));
  const blockSize = 64;
  const maxBlocks = Math.ceil(maxLen / blockSize);
  let ex: RankExecutor | null = null;
  try {
    ex = await RankExecutor.create(dir, { backendPackage: provider.entry!, cache: { numBlocks: maxBlocks, blockSize, dtype: "f32" }, worldSize: ws, threadsPerRank: 1, ...(ws > 1 && { shareDevices: placeNeedsSharing(provider, ws) }) });
    let worst = 0;
    let wrongIds = 0;
    for (const p of prompts) {
      const L = p.ids.length;
      const input = {
        ids: Int32Array.from(p.ids),
        positions: Int32Array.from({ length: L }, (_, i) => i),
        seqIdx: new Int32Array(L),
        blockTables: Int32Array.from({ length: maxBlocks }, (_, i) => i),
        maxBlocks,
      };
      const logits = await ex.step({ ...input, logitRows: Int32Array.from({ length: L }, (_, i) => i) });
      worst = Math.max(worst, logits.length === p.logits.length ? maxAbs(logits, p.logits) : Infinity);
      // the same step, sampled by the ranks (on the device where the backend samples, else rank 0)
      const s = await ex.stepSampled({ ...input, logitRows: Int32Array.of(L - 1) }, { params: [{ temperature: 0, topK: 0, topP: 1, minP: 0 }], u: new Float64Array(1), vocabLimit: logits.length / L });
      if (s.ids[0] !== p.greedy[0]) wrongIds++;
    }
    return [
      { name: `${name}: golden logits, every position`, ok: worst <= GOLDEN_TOL, worst, tolerance: GOLDEN_TOL },
      { name: `${name}: greedy ids sampled by the ranks`, ok: wrongIds === 0, worst: wrongIds, tolerance: 0, ...(wrongIds && { detail: `${wrongIds} of ${prompts.length} prompts` }) },
    ];
  } catch (e) {
    return [{ name: `${name}: golden logits, every position`, ok: false, worst: NaN, tolerance: GOLDEN_TOL, detail: e instanceof Error ? e.message : String(e) }];
  } finally {
    await ex?.close();
  }
}

/**
 * At a non-exact precision: how far the golden logits move through worker ranks at world size N.
 * Gates on the mean cosine similarity floor (COSINE_FLOOR); min cosine, KL, top-1 agreement and
 * the greedy id only inform (no fixed bound meets these random models: routing flips).
 */
async function goldenDrift(provider: BackendProvider, dir: string, ws: number, pname: Exclude<PrecisionName, "exact">): Promise<CheckDraft[]> {
  const name = `${dir.split(/[\\/]/).filter(Boolean).pop()} at world size ${ws}`;
  const precision = PRECISIONS[pname];
  let floor = goldenFloor(pname, true);
  const prompts = readGolden(dir);
  const maxLen = Math.max(...prompts.map((p) => p.ids.length));
  const blockSize = 64;
  const maxBlocks = Math.ceil(maxLen / blockSize);
  let ex: RankExecutor | null = null;
  try {
    floor = goldenFloor(pname, loadConfig(dir).quantization !== null);
    ex = await RankExecutor.create(dir, {
      backendPackage: provider.entry!,
      backendOptions: { precision },
      cache: { numBlocks: maxBlocks, blockSize, dtype: precision.cache },
      worldSize: ws,
      threadsPerRank: 1,
      ...(ws > 1 && { shareDevices: placeNeedsSharing(provider, ws) }),
    });
    let rows = 0;
    const acc = { meanCos: 0, minCos: 1, meanKl: 0, maxKl: 0, top1: 0, maxAbs: 0 };
    let wrongIds = 0;
    for (const p of prompts) {
      const L = p.ids.length;
      const input = { ids: Int32Array.from(p.ids), positions: Int32Array.from({ length: L }, (_, i) => i), seqIdx: new Int32Array(L), blockTables: Int32Array.from({ length: maxBlocks }, (_, i) => i), maxBlocks };
      const logits = await ex.step({ ...input, logitRows: Int32Array.from({ length: L }, (_, i) => i) });
      if (logits.length !== p.logits.length) throw new Error(`${logits.length} logits for ${p.logits.length} golden values`);
      const d = drift(logits, p.logits, L, logits.length / L);
      acc.meanCos += d.meanCos * L;
      acc.meanKl += d.meanKl * L;
      acc.minCos = Math.min(acc.minCos, d.minCos);
      acc.maxKl = Math.max(acc.maxKl, d.maxKl);
      acc.top1 += d.top1;
      acc.maxAbs = Math.max(acc.maxAbs, d.maxAbs);
      rows += L;
      const s = await ex.stepSampled({ ...input, logitRows: Int32Array.of(L - 1) }, { params: [{ temperature: 0, topK: 0, topP: 1, minP: 0 }], u: new Float64Array(1), vocabLimit: logits.length / L });
      if (s.ids[0] !== p.greedy[0]) wrongIds++;
    }
    const meanCos = acc.meanCos / rows;
    const metrics = { meanCos, minCos: acc.minCos, meanKl: acc.meanKl / rows, maxKl: acc.maxKl, top1: acc.top1 / rows, maxAbs: acc.maxAbs };
    const f = (x: number) => x.toPrecision(4);
    return [
      { name: `${name}: golden logits, mean cosine similarity over every position`, ok: meanCos >= floor, worst: meanCos, tolerance: floor, bound: "min", metrics },
      {
        name: `${name}: golden logits, drift`,
        kind: "info",
        ok: true,
        worst: metrics.meanKl,
        tolerance: NaN,
        metrics,
        detail: `mean KL ${f(metrics.meanKl)}, max KL ${f(metrics.maxKl)}, min cosine ${f(metrics.minCos)}, top-1 agreement ${(100 * metrics.top1).toFixed(1)}% of ${rows} positions, max |logit - golden| ${f(metrics.maxAbs)}`,
      },
      { name: `${name}: greedy ids sampled by the ranks`, kind: "info", ok: true, worst: wrongIds, tolerance: NaN, detail: `${prompts.length - wrongIds} of ${prompts.length} prompts give the golden first greedy id` },
    ];
  } catch (e) {
    return [{ name: `${name}: golden logits, mean cosine similarity over every position`, ok: false, worst: NaN, tolerance: floor, bound: "min", detail: e instanceof Error ? e.message : String(e) }];
  } finally {
    await ex?.close();
  }
}

function maxAbs(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
  }
  return m;
}

/** whether `ws` ranks need shareDevices on this provider (fewer non-shareable devices than ranks) */
function placeNeedsSharing(p: BackendProvider, ws: number): boolean {
  try {
    placeRanks(p, ws);
    return false;
  } catch {
    return true;
  }
}

/** Rank placement as the contract says: devices listed, distinct per rank unless shareable. */
function placementCheck(p: BackendProvider): CheckDraft {
  const name = "devices() and rank placement";
  try {
    const d = p.devices();
    const bad = d.filter((x, i) => x.index !== i || typeof x.name !== "string" || !(x.memoryTotal > 0) || !(x.memoryFree >= 0 || Number.isNaN(x.memoryFree)));
    if (!d.length || bad.length) return { name, ok: false, worst: bad.length, tolerance: 0, detail: d.length ? `malformed devices: ${JSON.stringify(bad)}` : "no devices" };
    const pl = placeRanks(p, Math.min(d.length, 2) || 1);
    const distinct = d[0]!.shareable || new Set(pl.devices).size === pl.devices.length;
    let dupRefused = false;
    if (!d[0]!.shareable && d.length >= 1) {
      try {
        placeRanks(p, 2, { devices: [0, 0] });
      } catch {
        dupRefused = true;
      }
    } else dupRefused = true;
    return { name, ok: distinct && dupRefused, worst: 0, tolerance: 0, detail: `${d.length} device${d.length === 1 ? "" : "s"}: ${d.map((x) => x.name).join("; ")}` };
  } catch (e) {
    return { name, ok: false, worst: NaN, tolerance: 0, detail: e instanceof Error ? e.message : String(e) };
  }
}

/** the precisions `opts.precision` names, in the suite's order, and whether each was named explicitly */
function precisionsAsked(o: ConformanceOptions["precision"]): { names: PrecisionName[]; explicit: boolean } {
  if (o === undefined || o === "all") return { names: [...PRECISION_NAMES], explicit: false };
  const list = typeof o === "string" ? [o] : [...o];
  for (const n of list)
    if (!(PRECISION_NAMES as readonly string[]).includes(n)) throw new RangeError(`unknown precision "${n}" (one of ${PRECISION_NAMES.join(", ")}, or "all")`);
  return { names: PRECISION_NAMES.filter((n) => list.includes(n)), explicit: true };
}

const describePrecision = (p: Precision) => `activations ${p.activations}, cache ${p.cache}, ${p.actQuant === "none" ? "no activation quantization" : `activations quantized ${p.actQuant} in front of FP8 weights`}`;

/** Run the whole suite on one provider. Never throws for a failing backend: failures are checks. */
export async function runConformance(provider: BackendProvider, opts: ConformanceOptions = {}): Promise<ConformanceReport> {
  checkProvider(provider);
  const asked = precisionsAsked(opts.precision);
  const checks: ConformanceCheck[] = [];
  const precisions: ConformanceReport["precisions"] = [];
  let current: PrecisionName = "exact";
  const add = (c: CheckDraft) => {
    const full: ConformanceCheck = { ...c, precision: current, kind: c.kind ?? "gate" };
    checks.push(full);
    opts.onCheck?.(full);
  };
  const report = (device: string): ConformanceReport => ({ backend: provider.name, device, ok: checks.every((c) => c.ok), precisions, checks });
  current = asked.names[0]!;
  const av = provider.available();
  if (!av.ok) {
    add({ name: "available()", ok: false, worst: NaN, tolerance: 0, detail: av.reason });
    return report("");
  }
  add(placementCheck(provider));
  let device = "";
  const dirs = opts.goldenDirs ?? [];
  for (const pname of asked.names) {
    current = pname;
    const precision: Precision = PRECISIONS[pname];
    const supported = REQUIRED_OPS.filter((o) => provider.supports(o, precision)).length;
    if (!supported) {
      precisions.push({ name: pname, precision, status: "not supported" });
      if (asked.explicit) add({ name: `precision ${pname} (${describePrecision(precision)})`, ok: false, worst: NaN, tolerance: NaN, detail: `backend "${provider.name}" supports no op at this precision` });
      else add({ name: `precision ${pname} (${describePrecision(precision)})`, kind: "not supported", ok: true, worst: NaN, tolerance: NaN, detail: `not supported by backend "${provider.name}"` });
      continue;
    }
    precisions.push({ name: pname, precision, status: "ran" });
    const first = checks.length;
    let ctx: BackendContext | null = null;
    try {
      ctx = provider.create({ precision });
      device ||= ctx.device;
      if (pname === "exact") for (const c of opChecks(ctx, provider, opts.seed ?? 1)) add(c);
      else {
        for (const c of quantizerChecks(ctx, provider, precision, opts.seed ?? 1)) add(c);
        for (const c of precisionOpChecks(ctx, provider, precision, opts.seed ?? 1)) add(c);
      }
    } catch (e) {
      add({ name: `create() ${pname === "exact" ? "in exact mode" : `at precision ${pname}`}`, ok: false, worst: NaN, tolerance: 0, detail: e instanceof Error ? e.message : String(e) });
    } finally {
      ctx?.dispose();
    }
    const mine = checks.slice(first);
    const missing = OPS.filter((o) => o !== "sample" && !mine.some((c) => c.op === o));
    if (missing.length) add({ name: "every op of the contract checked", ok: false, worst: missing.length, tolerance: 0, detail: `not checked: ${missing.join(", ")}` });
    if (dirs.length && !provider.entry)
      add({ name: "golden checkpoints through worker ranks", ok: false, worst: NaN, tolerance: 0, detail: `backend "${provider.name}" has no entry (BackendProvider.entry): ranks cannot import it` });
    else if (supported < REQUIRED_OPS.length && dirs.length)
      add({ name: "golden checkpoints through worker ranks", ok: false, worst: NaN, tolerance: 0, detail: `not run: the backend lacks ops at this precision` });
    else
      for (const dir of dirs) {
        if (!existsSync(join(dir, "golden.json"))) {
          add({ name: `golden checkpoint ${dir}`, ok: false, worst: NaN, tolerance: 0, detail: "no golden.json there" });
          continue;
        }
        for (const ws of opts.worldSizes ?? [1, 2, 4]) for (const c of await (pname === "exact" ? goldenCheck(provider, dir, ws) : goldenDrift(provider, dir, ws, pname))) add(c);
      }
  }
  return report(device);
}

/** The report as tables, one per precision: check, result, worst error, bound. */
export function formatConformance(r: ConformanceReport): string {
  const fmt = (x: number) => (Number.isNaN(x) ? "-" : x === 0 ? "0" : Number.isFinite(x) ? (Number.isInteger(x) ? String(x) : x.toExponential(2)) : "inf");
  const w = Math.max(5, ...r.checks.map((c) => c.name.length));
  const head = `${"check".padEnd(w)}  result  worst     tolerance`;
  const row = (c: ConformanceCheck) => {
    const result = c.kind === "info" ? "info" : c.kind === "not supported" ? "n/s" : c.ok ? "pass" : "FAIL";
    const b = Number.isNaN(c.tolerance) ? "-" : `${c.bound === "min" ? ">= " : ""}${fmt(c.tolerance)}`;
    return `${c.name.padEnd(w)}  ${result.padEnd(6)}  ${fmt(c.worst).padEnd(8)}  ${b}${c.detail ? `  ${c.detail}` : ""}`;
  };
  const lines = [`backend ${r.backend}${r.device ? ` on ${r.device}` : ""}`, head];
  // the backend-wide checks (availability, placement) come first, then one section per precision
  const general = new Set(["available()", "devices() and rank placement"]);
  for (const c of r.checks.filter((x) => general.has(x.name))) lines.push(row(c));
  for (const { name } of r.precisions) {
    const p = PRECISIONS[name];
    const mine = r.checks.filter((c) => c.precision === name && !general.has(c.name));
    if (mine.length === 1 && mine[0]!.kind === "not supported") {
      lines.push("", `precision ${name}: not supported by backend "${r.backend}" (${describePrecision(p)})`);
      continue;
    }
    const gates =
      name === "exact"
        ? "gates: every op within its float64 bound, golden logits within 1e-3"
        : "gates: the quantizers exactly, every op within its bound of the float64 reference emulating this precision, the mean cosine of the golden logits; informs: KL, min cosine, top-1, greedy ids";
    lines.push("", `precision ${name}: ${describePrecision(p)}; ${gates}`, head, ...mine.map(row));
  }
  const gating = r.checks.filter((c) => c.kind === "gate");
  const info = r.checks.filter((c) => c.kind === "info").length;
  const ns = r.precisions.filter((p) => p.status === "not supported").map((p) => p.name);
  lines.push("");
  lines.push(`precisions run: ${r.precisions.filter((p) => p.status === "ran").map((p) => p.name).join(", ") || "none"}${ns.length ? `; not supported: ${ns.join(", ")}` : ""}; ${info} informational row${info === 1 ? "" : "s"}`);
  lines.push(`${gating.filter((c) => c.ok).length} of ${gating.length} checks passed: ${r.ok ? "PASS" : "FAIL"}`);
  return lines.join("\n");
}
