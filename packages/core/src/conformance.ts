// The conformance suite of the backend contract, parameterized by provider: every op on random
// inputs against a float64 reference (exact mode), the collectives and the golden checkpoints end
// to end through worker ranks at world size 1, 2 and 4, and rank placement. The vitest file
// (test/conformance/) and `ds3 selftest` both run this code, so what CI checks on the CPU is what a
// user with other hardware runs and sends back.
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { type BackendContext, type BackendProvider, checkProvider, EXACT, type HostWeight, OPS, type OpName, type Tensor } from "./backend.js";
import { placeRanks } from "./devices.js";
import { RankExecutor } from "./ranks.js";
import { Rng } from "./sampling.js";

export interface ConformanceCheck {
  /** what was checked: an op (`linear (fp8 weight)`), a collective or an end-to-end run */
  name: string;
  /** the contract op it covers, if any */
  op?: OpName;
  ok: boolean;
  /** worst error seen: normwise relative (max |got - ref| / max |ref|) for ops, max abs for logits, mismatches for ids */
  worst: number;
  tolerance: number;
  detail?: string;
}

export interface ConformanceReport {
  backend: string;
  device: string;
  ok: boolean;
  checks: ConformanceCheck[];
}

export interface ConformanceOptions {
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

class Inputs {
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

function f32Weight(name: string, data: Float32Array, rows: number, cols: number): HostWeight {
  return { name, dtype: "f32", shape: [rows, cols], data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength) };
}

function bf16Weight(inp: Inputs, rows: number, cols: number): { hw: HostWeight; dense: Float64Array } {
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
function fp8Weight(inp: Inputs, rows: number, cols: number, origin: [number, number]): { hw: HostWeight; dense: Float64Array } {
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

function refLinear(x: ArrayLike<number>, T: number, w: ArrayLike<number>, N: number, K: number): Float64Array {
  const y = new Float64Array(T * N);
  for (let t = 0; t < T; t++)
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += x[t * K + k]! * w[n * K + k]!;
      y[t * N + n] = s;
    }
  return y;
}

const silu = (v: number) => v / (1 + Math.exp(-v));

/** The op checks on one context (exact mode). */
function opChecks(ctx: BackendContext, provider: BackendProvider, seed: number): ConformanceCheck[] {
  const inp = new Inputs(seed);
  const out: ConformanceCheck[] = [];
  const run = (name: string, op: OpName, f: () => { got: ArrayLike<number>; ref: ArrayLike<number> } | ConformanceCheck, tol = OP_TOL) => {
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
async function goldenCheck(provider: BackendProvider, dir: string, ws: number): Promise<ConformanceCheck[]> {
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
function placementCheck(p: BackendProvider): ConformanceCheck {
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

/** Run the whole suite on one provider. Never throws for a failing backend: failures are checks. */
export async function runConformance(provider: BackendProvider, opts: ConformanceOptions = {}): Promise<ConformanceReport> {
  checkProvider(provider);
  const checks: ConformanceCheck[] = [];
  const add = (c: ConformanceCheck) => {
    checks.push(c);
    opts.onCheck?.(c);
  };
  const av = provider.available();
  if (!av.ok) {
    add({ name: "available()", ok: false, worst: NaN, tolerance: 0, detail: av.reason });
    return { backend: provider.name, device: "", ok: false, checks };
  }
  add(placementCheck(provider));
  let device = "";
  let ctx: BackendContext | null = null;
  try {
    ctx = provider.create({ precision: EXACT });
    device = ctx.device;
    for (const c of opChecks(ctx, provider, opts.seed ?? 1)) add(c);
  } catch (e) {
    add({ name: "create() in exact mode", ok: false, worst: NaN, tolerance: 0, detail: e instanceof Error ? e.message : String(e) });
  } finally {
    ctx?.dispose();
  }
  const missing = OPS.filter((o) => o !== "sample" && !checks.some((c) => c.op === o));
  if (missing.length) add({ name: "every op of the contract checked", ok: false, worst: missing.length, tolerance: 0, detail: `not checked: ${missing.join(", ")}` });
  const dirs = opts.goldenDirs ?? [];
  if (dirs.length && !provider.entry)
    add({ name: "golden checkpoints through worker ranks", ok: false, worst: NaN, tolerance: 0, detail: `backend "${provider.name}" has no entry (BackendProvider.entry): ranks cannot import it` });
  else
    for (const dir of dirs) {
      if (!existsSync(join(dir, "golden.json"))) {
        add({ name: `golden checkpoint ${dir}`, ok: false, worst: NaN, tolerance: 0, detail: "no golden.json there" });
        continue;
      }
      for (const ws of opts.worldSizes ?? [1, 2, 4]) for (const c of await goldenCheck(provider, dir, ws)) add(c);
    }
  return { backend: provider.name, device, ok: checks.every((c) => c.ok), checks };
}

/** The report as a table: check, result, worst error, tolerance. */
export function formatConformance(r: ConformanceReport): string {
  const fmt = (x: number) => (Number.isNaN(x) ? "-" : x === 0 ? "0" : Number.isFinite(x) ? (Number.isInteger(x) ? String(x) : x.toExponential(2)) : "inf");
  const w = Math.max(5, ...r.checks.map((c) => c.name.length));
  const lines = [`backend ${r.backend}${r.device ? ` on ${r.device}` : ""}`, `${"check".padEnd(w)}  result  worst     tolerance`];
  for (const c of r.checks) lines.push(`${c.name.padEnd(w)}  ${(c.ok ? "pass" : "FAIL").padEnd(6)}  ${fmt(c.worst).padEnd(8)}  ${fmt(c.tolerance)}${c.detail ? `  ${c.detail}` : ""}`);
  lines.push(`${r.checks.filter((c) => c.ok).length} of ${r.checks.length} checks passed: ${r.ok ? "PASS" : "FAIL"}`);
  return lines.join("\n");
}
