// Inputs, float64 references and the op checks shared by the exact and the precision checks of
// the conformance suite (conformance.ts, conformance-precision.ts).
import type { BackendContext, BackendProvider, HostWeight, OpName, Precision, PrecisionName, Tensor } from "./backend.js";
import { roundBf16 } from "./quant.js";
import { Rng } from "./sampling.js";

export interface ConformanceCheck {
  /** what was checked: an op (`linear (fp8 weight)`), a collective or an end-to-end run */
  name: string;
  /** the contract op it covers, if any */
  op?: OpName;
  /** the precision it ran at (the backend context's `precision`) */
  precision: PrecisionName;
  /**
   * "gate": decides the verdict; "info": reported, never fails (end-to-end drift at a non-exact
   * precision, which no fixed bound meets on the random test models); "not supported": a precision
   * the backend's supports() refuses, not asked for by name
   */
  kind: "gate" | "info" | "not supported";
  /** passed its gate (always true for "info" and "not supported") */
  ok: boolean;
  /**
   * worst error seen: normwise relative (max |got - ref| / max |ref|) for ops, max abs for logits,
   * mismatches for ids and quantizer grids, the mean cosine similarity for end-to-end floors
   */
  worst: number;
  /** the bound `worst` is held to (NaN where nothing is gated) */
  tolerance: number;
  /** "max" (the default): ok when worst <= tolerance; "min": ok when worst >= tolerance (a cosine floor) */
  bound?: "max" | "min";
  detail?: string;
  /** informational numbers (end to end: minCos, meanKl, maxKl, top1, maxAbs) */
  metrics?: Record<string, number>;
}

/** A check as the check functions make it; the runner stamps the precision (and "gate" unless told). */
export type CheckDraft = Omit<ConformanceCheck, "precision" | "kind"> & { kind?: ConformanceCheck["kind"] };

/** normwise relative error: max |a - b| / max |b| (0 for two empty or all-zero arrays that agree) */
export function normErr(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Infinity;
  let m = 0;
  let s = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - b[i]!);
    if (!(d <= m)) m = Number.isNaN(d) ? Infinity : d;
    s = Math.max(s, Math.abs(b[i]!));
  }
  return m === 0 ? 0 : m / (s || 1);
}

export class Inputs {
  private rng: Rng;
  constructor(seed: number) {
    this.rng = new Rng(seed);
  }
  randn(): number {
    const u = Math.max(this.rng.next(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.rng.next());
  }
  vec(n: number, scale = 1): Float32Array {
    return Float32Array.from({ length: n }, () => this.randn() * scale);
  }
  int(n: number): number {
    return Math.floor(this.rng.next() * n);
  }
  u(): number {
    return this.rng.next();
  }
}

export function f32Weight(name: string, data: Float32Array, rows: number, cols: number): HostWeight {
  return { name, dtype: "f32", shape: [rows, cols], data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

export function bf16Weight(inp: Inputs, rows: number, cols: number): { hw: HostWeight; dense: Float64Array } {
  const bits = new Uint16Array(rows * cols);
  const dense = new Float64Array(rows * cols);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < bits.length; i++) {
    f[0] = inp.randn() * 0.1;
    bits[i] = u[0]! >>> 16;
    u[0] = bits[i]! << 16;
    dense[i] = f[0]!;
  }
  return { hw: { name: "w.bf16", dtype: "bf16", shape: [rows, cols], data: new Uint8Array(bits.buffer) }, dense };
}

export function fp8e4m3Decode(v: number): number {
  const s = v >> 7;
  const e = (v >> 3) & 15;
  const m = v & 7;
  const f = e === 0 ? (m / 8) * 2 ** -6 : (1 + m / 8) * 2 ** (e - 7);
  return s ? -f : f;
}

/** FP8 e4m3 weight with 128x128 block scales; the slice starts at `origin` inside its first block */
export function fp8Weight(inp: Inputs, rows: number, cols: number, origin: [number, number]): { hw: HostWeight; dense: Float64Array } {
  const data = new Uint8Array(rows * cols);
  for (let i = 0; i < data.length; i++) {
    let b = inp.int(256);
    if ((b & 0x7f) === 0x7f) b = 0x10; // no NaN
    data[i] = b;
  }
  const sr = Math.floor((rows - 1 + origin[0]) / 128) + 1;
  const sc = Math.floor((cols - 1 + origin[1]) / 128) + 1;
  const scale = Float32Array.from({ length: sr * sc }, () => 0.001 + inp.u() * 0.01);
  const dense = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++)
      dense[r * cols + c] = fp8e4m3Decode(data[r * cols + c]!) * scale[Math.floor((r + origin[0]) / 128) * sc + Math.floor((c + origin[1]) / 128)]!;
  return { hw: { name: "w.fp8", dtype: "f8_e4m3", shape: [rows, cols], data, scale, scaleShape: [sr, sc], scaleOrigin: origin }, dense };
}

export function refLinear(x: ArrayLike<number>, T: number, w: ArrayLike<number>, N: number, K: number): Float64Array {
  const y = new Float64Array(T * N);
  for (let t = 0; t < T; t++)
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += x[t * K + k]! * w[n * K + k]!;
      y[t * N + n] = s;
    }
  return y;
}

export const silu = (v: number) => v / (1 + Math.exp(-v));

/** fp32 slack of an op computed in fp32 against its float64 reference (exact mode's bound) */
export const OP_TOL = 1e-5;
/** bf16's unit roundoff: the largest relative error of one rounding to nearest */
export const U_BF16 = 2 ** -8;

/** the bound of an op: fp32 slack plus `roundings` bf16 roundings when activations are bf16 (just `base` in exact mode) */
export function bound(p: Precision, roundings: number, base = OP_TOL): number {
  return base + (p.activations === "bf16" ? roundings * U_BF16 : 0);
}

/** what an op check returns: the op's output and its reference (held normwise to the bound), or a finished check */
export type OpResult = { got: ArrayLike<number>; ref: ArrayLike<number> } | CheckDraft;
export type RunOp = (name: string, op: OpName, f: () => OpResult, tol: number) => void;

/** the router of the moeGate checks: 16 experts in 4 groups, the 2 best groups kept, top-4, inputs of width 32 */
export const GATE = { E: 16, G: 4, TG: 2, topk: 4, Dg: 32 } as const;

/**
 * noaux_tc routing of one token in float64 (sigmoid scores, the bias chooses, group limit by the sum
 * of each group's top 2, weights renormalized and scaled by 2.5), and the margin of its closest
 * choice (the group and expert choices' smallest gap to the first one left out).
 */
export function routeRef(x: ArrayLike<number>, gw: ArrayLike<number>, bias: ArrayLike<number>): { ids: number[]; wts: number[]; margin: number } {
  const { E, G, TG, topk, Dg } = GATE;
  const sc = Array.from({ length: E }, (_, e) => {
    let s = 0;
    for (let i = 0; i < Dg; i++) s += x[i]! * gw[e * Dg + i]!;
    return 1 / (1 + Math.exp(-s));
  });
  const ch = sc.map((s, e) => s + bias[e]!);
  const per = E / G;
  const gs = Array.from({ length: G }, (_, g) =>
    ch
      .slice(g * per, (g + 1) * per)
      .sort((u, v) => v - u)
      .slice(0, 2)
      .reduce((u, v) => u + v, 0),
  );
  const order = [...gs.keys()].sort((u, v) => gs[v]! - gs[u]!);
  const groups = order.slice(0, TG);
  const cand = [...ch.keys()].filter((e) => groups.includes(Math.floor(e / per))).sort((u, v) => ch[v]! - ch[u]!);
  const margin = Math.min(gs[order[TG - 1]!]! - gs[order[TG]!]!, ch[cand[topk - 1]!]! - ch[cand[topk]!]!);
  const ids = cand.slice(0, topk);
  const sum = ids.reduce((u, e) => u + sc[e]!, 0);
  return { ids, wts: ids.map((e) => (sc[e]! / sum) * 2.5), margin };
}

/**
 * The op checks of one context at one precision, as both suites draw them: `run` turns each into
 * a check (an op the backend does not support, or one that throws, fails with the reason);
 * `vec` draws an activation as the backend holds it, `grid` puts a weight's values where the
 * backend stores them (both the identity in exact mode).
 */
export class OpSuite {
  readonly out: CheckDraft[] = [];
  readonly T = 5;
  readonly D = 96;
  constructor(
    readonly ctx: BackendContext,
    readonly provider: BackendProvider,
    readonly p: Precision,
    readonly inp: Inputs,
    /** where the precision is named in "does not support op X ..." */
    private readonly where: string,
    readonly vec: (n: number, scale?: number) => Float32Array,
    readonly grid: (v: Float32Array) => Float32Array,
  ) {}

  readonly run: RunOp = (name, op, f, tol) => {
    if (!this.provider.supports(op, this.p)) {
      this.out.push({ name, op, ok: false, worst: NaN, tolerance: tol, detail: `backend "${this.provider.name}" does not support op ${op} ${this.where}` });
      return;
    }
    try {
      this.ctx.beginStep();
      const r = f();
      if ("ok" in r) this.out.push(r);
      else {
        const worst = normErr(r.got, r.ref);
        this.out.push({ name, op, ok: worst <= tol, worst, tolerance: tol });
      }
    } catch (e) {
      this.out.push({ name, op, ok: false, worst: NaN, tolerance: tol, detail: e instanceof Error ? e.message : String(e) });
    }
  };

  up(x: Float32Array, shape: number[]): Tensor {
    return this.ctx.upload(x, shape);
  }

  /**
   * embed, rmsNorm, linear (an f32 weight, then each of `weights` on the same input), add,
   * siluMul, concat, slice, rows, rope; returns `a`, the activations the identity collectives
   * take later. `weights[i].x` is what the reference multiplies (the input as the precision
   * quantizes it; the input itself if absent).
   */
  basicOps(weights: Array<{ name: string; make: (N: number, K: number) => { hw: HostWeight; dense: Float64Array }; x?: (x: Float32Array, T: number, K: number) => ArrayLike<number> }>): Float32Array {
    const { ctx, inp, p, run, vec, grid, T, D } = this;
    const up = (x: Float32Array, shape: number[]) => this.up(x, shape);
    run("embed", "embed", () => {
      const V = 40;
      const tab = grid(inp.vec(V * D));
      const ids = Int32Array.from({ length: 7 }, () => 100 + inp.int(V));
      const got = ctx.download(ctx.embed(ctx.weight(f32Weight("emb", tab, V, D)), ids, 100));
      const ref = new Float64Array(ids.length * D);
      ids.forEach((id, t) => ref.set(tab.subarray((id - 100) * D, (id - 99) * D), t * D));
      return { got, ref };
    }, bound(p, 1));
    run("rmsNorm", "rmsNorm", () => {
      const x = vec(T * D);
      const g = grid(Float32Array.from({ length: D }, () => 0.5 + inp.u()));
      const got = ctx.download(ctx.rmsNorm(up(x, [T, D]), ctx.weight(f32Weight("g", g, 1, D)), 1e-6));
      const ref = new Float64Array(T * D);
      for (let t = 0; t < T; t++) {
        let ss = 0;
        for (let i = 0; i < D; i++) ss += x[t * D + i]! ** 2;
        const r = 1 / Math.sqrt(ss / D + 1e-6);
        for (let i = 0; i < D; i++) ref[t * D + i] = g[i]! * x[t * D + i]! * r;
      }
      return { got, ref };
    }, bound(p, 2));
    const N = 200;
    const K = 300;
    const xl = vec(T * K);
    run("linear (f32 weight)", "linear", () => {
      const w = grid(inp.vec(N * K, 0.1));
      return { got: ctx.download(ctx.linear(up(xl, [T, K]), ctx.weight(f32Weight("w", w, N, K)))), ref: refLinear(xl, T, w, N, K) };
    }, bound(p, 1));
    for (const w of weights)
      run(w.name, "linear", () => {
        const { hw, dense } = w.make(N, K);
        return { got: ctx.download(ctx.linear(up(xl, [T, K]), ctx.weight(hw))), ref: refLinear(w.x ? w.x(xl, T, K) : xl, T, dense, N, K) };
      }, bound(p, 1));
    const a = vec(T * D);
    const b = vec(T * D);
    run("add", "add", () => ({ got: ctx.download(ctx.add(up(a, [T, D]), up(b, [T, D]))), ref: Float64Array.from(a, (v, i) => v + b[i]!) }), bound(p, 1));
    run("siluMul", "siluMul", () => ({ got: ctx.download(ctx.siluMul(up(a, [T, D]), up(b, [T, D]))), ref: Float64Array.from(a, (v, i) => silu(v) * b[i]!) }), bound(p, 2));
    run("concat", "concat", () => {
      const c = vec(T * 32);
      const ref = new Float64Array(T * (D + 32));
      for (let t = 0; t < T; t++) {
        ref.set(a.subarray(t * D, (t + 1) * D), t * (D + 32));
        ref.set(c.subarray(t * 32, (t + 1) * 32), t * (D + 32) + D);
      }
      return { got: ctx.download(ctx.concat(up(a, [T, D]), up(c, [T, 32]))), ref };
    }, OP_TOL); // copies are exact
    run("slice", "slice", () => {
      const ref = new Float64Array(T * 40);
      for (let t = 0; t < T; t++) ref.set(a.subarray(t * D + 17, t * D + 57), t * 40);
      return { got: ctx.download(ctx.slice(up(a, [T, D]), 17, 57)), ref };
    }, OP_TOL);
    run("rows", "rows", () => {
      const rows = Int32Array.of(4, 0, 2, 2);
      const ref = new Float64Array(rows.length * D);
      rows.forEach((r, i) => ref.set(a.subarray(r * D, (r + 1) * D), i * D));
      return { got: ctx.download(ctx.rows(up(a, [T, D]), rows)), ref };
    }, OP_TOL);
    run("rope (interleaved pairs, rotary part inside the head)", "rope", () => {
      const H = 2;
      const hd = 48;
      const off = 16;
      const rd = 32;
      const q = vec(3 * H * hd);
      const inv = Float32Array.from({ length: rd / 2 }, (_, i) => 1 / 10000 ** ((2 * i) / rd));
      const pos = Int32Array.of(0, 5, 4000);
      const got = ctx.download(ctx.rope(up(q, [3, H * hd]), H, hd, off, rd, pos, inv, 1));
      const ref = Float64Array.from(q);
      for (let t = 0; t < 3; t++)
        for (let h = 0; h < H; h++)
          for (let i = 0; i < rd / 2; i++) {
            const base = t * H * hd + h * hd + off + 2 * i;
            const ang = Math.fround(pos[t]! * inv[i]!);
            const x0 = q[base]!;
            const x1 = q[base + 1]!;
            ref[base] = x0 * Math.cos(ang) - x1 * Math.sin(ang);
            ref[base + 1] = x0 * Math.sin(ang) + x1 * Math.cos(ang);
          }
      return { got, ref };
    }, bound(p, 4, 1e-4)); // float32 angles of position 4000
    return a;
  }

  /** moeGate on 6 tokens `xg` (gate `gw`, correction `bias`; GATE's router) against routeRef: the ids per token as sets (the order of equal picks is free), the weights matched to their ids */
  moeGate(name: string, xg: Float32Array, gw: Float32Array, bias: Float32Array): void {
    const { ctx, p } = this;
    const { E, G, TG, topk, Dg } = GATE;
    const tol = bound(p, 2);
    this.run(name, "moeGate", () => {
      const cfg = { topk, nGroups: G, topkGroups: TG, scoreFunc: "sigmoid" as const, normTopk: true, routeScale: 2.5 };
      const got = ctx.download(ctx.moeGate(this.up(xg, [6, Dg]), ctx.weight(f32Weight("gate", gw, E, Dg)), bias, cfg));
      const gotW: number[] = [];
      const refW: number[] = [];
      let idErr = 0;
      for (let t = 0; t < 6; t++) {
        const r = routeRef(xg.subarray(t * Dg, (t + 1) * Dg), gw, bias);
        const g = Array.from({ length: topk }, (_, k) => ({ id: got[t * 2 * topk + topk + k]!, w: got[t * 2 * topk + k]! })).sort((u, v) => u.id - v.id);
        const f = r.ids.map((id, k) => ({ id, w: r.wts[k]! })).sort((u, v) => u.id - v.id);
        g.forEach((x, k) => {
          if (x.id !== f[k]!.id) idErr++;
          gotW.push(x.w);
          refW.push(f[k]!.w);
        });
      }
      const worst = idErr ? Infinity : normErr(gotW, refW);
      return { name, op: "moeGate", ok: worst <= tol, worst, tolerance: tol, ...(idErr && { detail: `${idErr} routed expert ids differ` }) };
    }, tol);
  }

  /** moeExperts' routing [T, 2 * topk]: per token `topk` distinct experts of 16, weights in [0.1, 1.1) */
  routing(topk: number): Float32Array {
    const { inp, T } = this;
    const routing = new Float32Array(T * 2 * topk);
    for (let t = 0; t < T; t++) {
      const picked = new Set<number>();
      while (picked.size < topk) picked.add(inp.int(16));
      [...picked].forEach((e, k) => ((routing[t * 2 * topk + k] = 0.1 + inp.u()), (routing[t * 2 * topk + topk + k] = e)));
    }
    return routing;
  }

  /** mla (see mlaCheck), the identity collectives at world size 1 on `a`, and greedy sampling where the backend samples */
  lastOps(mlaName: string, a: Float32Array): CheckDraft[] {
    const { ctx, provider, inp, p, run, vec, T, D } = this;
    run(mlaName, "mla", () => mlaCheck(ctx, inp, p, vec, this.grid), bound(p, 4));
    run("allReduce (world size 1: identity)", "allReduce", () => ({ got: ctx.download(ctx.allReduce(this.up(a, [T, D]))), ref: a }), 0);
    run("allGatherCols (world size 1: identity)", "allGatherCols", () => ({ got: ctx.download(ctx.allGatherCols(this.up(a, [T, D]))), ref: a }), 0);
    if (provider.supports("sample", p))
      run("sample (greedy: argmax and its log-softmax)", "sample", () => {
        if (!ctx.sample) throw new Error(`backend "${provider.name}" says it supports op sample but its context has no sample()`);
        const V = 1000;
        const l = vec(3 * V, 3);
        const r = ctx.sample(this.up(l, [3, V]), Array.from({ length: 3 }, () => ({ temperature: 0, topK: 0, topP: 1, minP: 0 })), new Float64Array(3));
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
    return this.out;
  }
}

/**
 * MLA (absorbed, paged cache, two sequences, prefill then decode) against the non-absorbed
 * float64 formula over the latents as the cache stores them; also what the op wrote into the cache.
 * `vec` draws q and the latents as the backend holds activations, `grid` the wkv_b weight.
 */
export function mlaCheck(ctx: BackendContext, inp: Inputs, p: Precision, vec: (n: number, scale?: number) => Float32Array, grid: (v: Float32Array) => Float32Array): { got: ArrayLike<number>; ref: ArrayLike<number> } {
  const heads = 2;
  const nope = 16;
  const rope = 8;
  const v = 12;
  const kvLora = 32;
  const scale = 1 / Math.sqrt(nope + rope);
  const bs = 4;
  const maxBlocks = 3;
  const stored = (x: number) => (p.cache === "bf16" ? roundBf16(x) : x);
  const cache = ctx.createCache(1, 8, bs, kvLora + rope, p.cache);
  const wkvB = grid(inp.vec(heads * (nope + v) * kvLora, 0.2));
  const W = ctx.weight(f32Weight("wkv_b", wkvB, heads * (nope + v), kvLora));
  // sequence 0 in blocks 5, 1, 6; sequence 1 in blocks 2, 7
  const tables = Int32Array.of(5, 1, 6, 2, 7, -1);
  const lat: Array<Map<number, Float64Array>> = [new Map(), new Map()];
  const got: number[] = [];
  const ref: number[] = [];
  const step = (seqs: number[], positions: number[]) => {
    const Tn = seqs.length;
    const q = vec(Tn * heads * (nope + rope));
    const kv = vec(Tn * kvLora);
    const pe = vec(Tn * rope);
    ctx.beginStep();
    const meta = { positions: Int32Array.from(positions), seqIdx: Int32Array.from(seqs), blockTables: tables, maxBlocks };
    const y = ctx.download(ctx.mla(ctx.upload(q, [Tn, heads * (nope + rope)]), ctx.upload(kv, [Tn, kvLora]), ctx.upload(pe, [Tn, rope]), W, cache, 0, meta, { heads, nope, rope, v, kvLora, scale }));
    for (let t = 0; t < Tn; t++) {
      const c = new Float64Array(kvLora + rope);
      for (let i = 0; i < kvLora; i++) c[i] = stored(kv[t * kvLora + i]!);
      for (let i = 0; i < rope; i++) c[kvLora + i] = stored(pe[t * rope + i]!);
      lat[seqs[t]!]!.set(positions[t]!, c);
    }
    for (let t = 0; t < Tn; t++) {
      const s = seqs[t]!;
      const ctxPos = [...lat[s]!.keys()].filter((x) => x <= positions[t]!).sort((x, z) => x - z);
      for (let h = 0; h < heads; h++) {
        const qh = q.subarray((t * heads + h) * (nope + rope), (t * heads + h + 1) * (nope + rope));
        const scores = ctxPos.map((pos) => {
          const c = lat[s]!.get(pos)!;
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
          ctxPos.forEach((pos, j) => {
            const c = lat[s]!.get(pos)!;
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
    for (const [pos, c] of m) {
      const slot = tables[s * maxBlocks + Math.floor(pos / bs)]! * bs + (pos % bs);
      const row = ctx.readCache(cache, 0, slot, 1);
      for (let i = 0; i < c.length; i++) (got.push(row[i]!), ref.push(c[i]!));
    }
  return { got, ref };
}
