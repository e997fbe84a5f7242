// The conformance suite at a non-exact precision (bf16 activations and cache, FP8 activation
// quantization): each op of the contract on random inputs against a float64 reference that
// emulates the same quantization (quant.ts), with bounds that fit bf16/FP8; and the quantizers
// themselves on grids of their rounding boundaries, exactly.
//
// Why a float64 reference and not the CPU backend: in CI the backend under test *is* the CPU
// backend, and comparing it with itself checks nothing; the float64 reference is independent of
// every backend (the CPU's emulation is checked against it like any other backend's kernels),
// needs no native addon on the user's machine (a ROCm or Ascend box), and states the semantics of
// each precision in one readable place. It is not bitwise what an fp32 kernel computes, so the
// bounds below allow fp32 accumulation (OP_TOL, as in exact mode) plus U = 2^-8 per bf16 rounding.
//
// The bounds (normwise: max |got - ref| / max |ref|, the reference unrounded at the op's output):
//   one rounding of a result computed in fp32 (linear, add, embed): relative error <= U per
//   element, so <= U normwise. Ops whose usual bf16 implementations round more than once are
//   allowed that many: rmsNorm 2 (normalized x, then times the weight, as transformers does),
//   siluMul 2 (silu, then the product), rope 4 (bf16 cos/sin tables, products and sum), the
//   router's weights 2; mla and moeExperts 4 (tensor-core kernels round the absorbed query, the
//   probabilities, the latent output / h1, h3, silu*up and the expert outputs; the reference
//   rounds where the CPU backend does, and a rounding error of relative size U passed through a
//   linear map of random signs stays of size U relative to its output). Copies are exact.
//   FP8 activation quantization adds no allowance: the reference quantizes the op's inputs exactly
//   as quant.ts defines it (the quantizer grids hold each backend's quantizer to that, bit for bit).
// Inputs and weights are drawn on the bf16 grid, so a backend that stores uploads and f32
// weights in bf16 loses nothing; the router's inputs are redrawn until every choice has a margin
// of 0.02, so that no bound-respecting rounding can flip an expert.
import type { ActQuant, BackendContext, BackendProvider, HostWeight, OpName, Precision, PrecisionName, Tensor } from "./backend.js";
import { bound, type CheckDraft, f32Weight, fp8e4m3Decode, GATE, Inputs, OpSuite, refLinear, routeRef, silu, U_BF16 } from "./conformance-common.js";
import { actQuantDequant, actQuantFormat, E4M3FN, exponentOf, type Fp8Format, fp8Values, roundBf16, roundFp8 } from "./quant.js";

export { U_BF16 };

/** the FP8 e4m3fn byte of a value e4m3fn represents exactly (the checkpoints' weight format) */
const FN_CODE = new Map<number, number>();
for (let b = 0; b < 256; b++) if ((b & 0x7f) !== 0x7f && !FN_CODE.has(fp8e4m3Decode(b))) FN_CODE.set(fp8e4m3Decode(b), b);
function fnCode(v: number): number {
  const c = FN_CODE.get(v === 0 ? 0 : v);
  if (c === undefined) throw new Error(`${v} is not an e4m3fn value`);
  return c;
}

/** FP8 weight of normal values (std `sigma`) quantized per 128x128 block as a checkpoint stores them */
function fp8NormalWeight(inp: Inputs, rows: number, cols: number, sigma: number, origin: [number, number] = [0, 0]): { hw: HostWeight; dense: Float64Array } {
  const sr = Math.floor((rows - 1 + origin[0]) / 128) + 1;
  const sc = Math.floor((cols - 1 + origin[1]) / 128) + 1;
  // about 4 sigma onto 448, a little different per block
  const scale = Float32Array.from({ length: sr * sc }, () => ((4 * sigma) / 448) * (0.75 + 0.5 * inp.u()));
  const data = new Uint8Array(rows * cols);
  const dense = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++) {
      const s = scale[Math.floor((r + origin[0]) / 128) * sc + Math.floor((c + origin[1]) / 128)]!;
      const v = roundFp8((inp.randn() * sigma) / s, E4M3FN);
      data[r * cols + c] = fnCode(v);
      dense[r * cols + c] = v * s;
    }
  return { hw: { name: "w.fp8", dtype: "f8_e4m3", shape: [rows, cols], data, scale, scaleShape: [sr, sc], scaleOrigin: origin }, dense };
}

function bf16HostWeight(inp: Inputs, rows: number, cols: number, sigma: number): { hw: HostWeight; dense: Float64Array } {
  const bits = new Uint16Array(rows * cols);
  const dense = new Float64Array(rows * cols);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < bits.length; i++) {
    f[0] = roundBf16(inp.randn() * sigma);
    bits[i] = u[0]! >>> 16;
    dense[i] = f[0]!;
  }
  return { hw: { name: "w.bf16", dtype: "bf16", shape: [rows, cols], data: new Uint8Array(bits.buffer) }, dense };
}

const onGrid = (v: Float32Array): Float32Array => v.map(roundBf16);

/** The op checks on one context at a non-exact precision. */
export function precisionOpChecks(ctx: BackendContext, provider: BackendProvider, p: Precision, seed: number): CheckDraft[] {
  const inp = new Inputs(seed);
  const bf = p.activations === "bf16";
  const aq: ActQuant = p.actQuant;
  /** rounding of an activation the CPU backend rounds (the reference's intermediates) */
  const rA = (v: number) => (bf ? roundBf16(v) : v);
  /** activations as a bf16 backend holds them */
  const act = (v: Float32Array) => (bf ? onGrid(v) : v);
  const vec = (n: number, scale = 1) => act(inp.vec(n, scale));
  const s = new OpSuite(ctx, provider, p, inp, `at activations=${p.activations} cache=${p.cache} actQuant=${p.actQuant}`, vec, onGrid);
  const { run, T } = s;
  const up = (x: Float32Array, shape: number[]): Tensor => s.up(x, shape);
  const quantNote = aq === "none" ? "" : `, activations quantized per 1x128 (${aq})`;
  const a = s.basicOps([
    { name: "linear (bf16 weight)", make: (N, K) => bf16HostWeight(inp, N, K, 0.1) },
    { name: `linear (fp8 weight, 128x128 block scales, slice inside a block${quantNote})`, make: (N, K) => fp8NormalWeight(inp, N, K, 0.06, [100, 50]), x: (x, T, K) => actQuantDequant(x, T, K, aq) },
  ]);

  // routing (noaux_tc), inputs with a margin at every choice
  const { E, topk, Dg } = GATE;
  const gw = onGrid(inp.vec(E * Dg, 0.3));
  const bias = inp.vec(E, 0.2);
  const xg = new Float32Array(6 * Dg);
  for (let t = 0; t < 6; t++)
    for (let tries = 0; ; tries++) {
      const x = vec(Dg);
      if (routeRef(x, gw, bias).margin >= 0.02) {
        xg.set(x, t * Dg);
        break;
      }
      if (tries > 1000) throw new Error("conformance: no router input with a 0.02 margin found"); // never with this seed
    }
  s.moeGate("moeGate (sigmoid, correction bias, group limit; inputs with a 0.02 margin at every choice)", xg, gw, bias);

  run(`moeExperts (FP8 experts 4..11 of 16 on this rank${quantNote})`, "moeExperts", () => {
    const Dm = 256;
    const I = 192;
    const first = 4;
    const count = 8;
    const x = vec(T * Dm);
    const ws = Array.from({ length: count }, () => ({
      w1: fp8NormalWeight(inp, I, Dm, 1 / Math.sqrt(Dm)),
      w2: fp8NormalWeight(inp, Dm, I, 1 / Math.sqrt(I)),
      w3: fp8NormalWeight(inp, I, Dm, 1 / Math.sqrt(Dm)),
    }));
    const set = ctx.expertSet(first, ws.map((e) => ({ w1: ctx.weight(e.w1.hw), w2: ctx.weight(e.w2.hw), w3: ctx.weight(e.w3.hw) })));
    const routing = s.routing(topk);
    const got = ctx.download(ctx.moeExperts(up(x, [T, Dm]), set, up(routing, [T, 2 * topk]), topk));
    // the reference rounds where the CPU backend does: h1, h3, silu(h1) * h3 and each expert's output
    const ref = new Float64Array(T * Dm);
    for (let t = 0; t < T; t++) {
      const xq = actQuantDequant(x.subarray(t * Dm, (t + 1) * Dm), 1, Dm, aq);
      for (let k = 0; k < topk; k++) {
        const e = routing[t * 2 * topk + topk + k]! - first;
        if (e < 0 || e >= count) continue;
        const h1 = refLinear(xq, 1, ws[e]!.w1.dense, I, Dm).map(rA);
        const h3 = refLinear(xq, 1, ws[e]!.w3.dense, I, Dm).map(rA);
        const g = actQuantDequant(Float64Array.from(h1, (v, i) => rA(silu(v) * h3[i]!)), 1, I, aq);
        const y = refLinear(g, 1, ws[e]!.w2.dense, Dm, I).map(rA);
        for (let i = 0; i < Dm; i++) ref[t * Dm + i]! += routing[t * 2 * topk + k]! * y[i]!;
      }
    }
    return { got, ref };
  }, bound(p, 4));
  return s.lastOps(`mla (absorbed, paged ${p.cache} cache, two sequences, prefill then decode)`, a);
}

// ---- the quantizers on their grids, exactly ----------------------------------------------------

/** fp32 values around every kind of bf16 rounding boundary: neighbours, ties (both parities), ties +- 1 fp32 ulp, carries into the next binade */
export function bf16Grid(exponents: number[], seed: number): Float32Array {
  const inp = new Inputs(seed);
  const v: number[] = [0];
  for (const e of exponents) {
    const ulp = 2 ** (e - 7);
    const f32ulp = 2 ** (e - 23);
    for (const m of [128, 129, 130, 131, 170, 200, 201, 254, 255]) {
      const base = m * ulp;
      for (const x of [base, base + f32ulp, base + ulp / 2 - f32ulp, base + ulp / 2, base + ulp / 2 + f32ulp, base + ulp / 4, base + (3 * ulp) / 4, base + ulp - f32ulp]) v.push(x, -x);
    }
    for (let i = 0; i < 12; i++) v.push((1 + inp.u()) * 2 ** e * (inp.u() < 0.5 ? -1 : 1));
  }
  return Float32Array.from(v);
}

/**
 * Rows for the activation quantizer: blocks of 128 whose largest magnitude makes the block's
 * scale exact however a kernel computes it (amax / max, or a reciprocal max / amax), so the
 * result depends on the FP8 rounding alone:
 * - scale 2^k (amax = max * 2^k): every FP8 value, every midpoint (ties to even), midpoints +- one
 *   bf16 step, quarter points, subnormals;
 * - fp8 / fp8-fnuz, scale 1.5 * 2^k (not a power of two, so power-of-two scales give other
 *   values): FP8 values and quarter points (no ties: a reciprocal scale may move a tie by an ulp);
 * - fp8-ue8m0, every other block amax = c * 2^k with c in (max / 2, max): scale 2^k, although
 *   amax / max is not a power of two.
 * Every value is on the bf16 grid (upload loses nothing).
 */
export function actQuantGrid(mode: Exclude<ActQuant, "none">, K: number, seed: number): { x: Float32Array; T: number } {
  const inp = new Inputs(seed);
  const fmt = actQuantFormat(mode);
  const vals = fp8Values(fmt).filter((x) => x >= 0);
  const ties: number[] = [];
  const offTies: number[] = [];
  for (let i = 0; i < vals.length; i++) {
    ties.push(vals[i]!);
    offTies.push(vals[i]!);
    if (i + 1 === vals.length) continue;
    const lo = vals[i]!;
    const hi = vals[i + 1]!;
    const mid = (lo + hi) / 2;
    const step = 2 ** (exponentOf(mid) - 7); // one bf16 step at mid (a normal float)
    const quarters = [lo + (hi - lo) / 4, lo + (3 * (hi - lo)) / 4];
    ties.push(mid, mid - step, mid + step, ...quarters);
    offTies.push(...quarters); // 6 significant bits: times 1.5 still a bf16 value
  }
  const exps = [-8, -3, 0, 2, 5, -1, 1, 7];
  const blocks: number[][] = [];
  /** blocks of 127 values of `pool` times `mult` (those within the block's amax), plus the amax itself */
  const pack = (pool: number[], mult: number, amaxOf: (bi: number) => number) => {
    let queue = pool.map((x, i) => (i % 2 ? -x : x));
    for (let bi = 0; queue.length; bi++) {
      const k = exps[blocks.length % exps.length]!;
      const c = amaxOf(bi);
      const take: number[] = [];
      const keep: number[] = [];
      for (const x of queue) (Math.abs(x) * mult <= c && take.length < 127 ? take : keep).push(x);
      queue = keep;
      const block = take.map((x) => x * mult * 2 ** k);
      while (block.length < 127) block.push(0);
      block.splice(blocks.length % 128, 0, (blocks.length % 2 ? -c : c) * 2 ** k);
      for (const x of block) if (roundBf16(x) !== x) throw new Error(`conformance: grid value ${x} is not a bf16 value`);
      blocks.push(block);
    }
  };
  if (mode === "fp8-ue8m0") pack(ties, 1, (bi) => (bi % 2 ? roundBf16(fmt.max * (0.55 + 0.4 * inp.u())) : fmt.max));
  else {
    pack(ties, 1, () => fmt.max);
    pack(offTies, 1.5, () => 1.5 * fmt.max);
  }
  const T = Math.ceil(blocks.length / (K / 128));
  const x = new Float32Array(T * K);
  blocks.forEach((b, i) => x.set(b, i * 128));
  // blocks left over at the end of the last row are zeros (scale from the 1e-4 floor, all 0)
  return { x, T };
}

function firstMismatch(x: ArrayLike<number>, got: ArrayLike<number>, want: ArrayLike<number>): { n: number; detail?: string } {
  let n = 0;
  let detail: string | undefined;
  for (let i = 0; i < want.length; i++)
    if (!(got[i] === want[i])) {
      n++;
      detail ??= `first at ${i}: input ${x[i]}, got ${got[i]}, want ${want[i]}`;
    }
  return { n, detail };
}

/** The backend's own quantizers against quant.ts on their grids; exact (0 mismatches). */
export function quantizerChecks(ctx: BackendContext, provider: BackendProvider, p: Precision, seed: number): CheckDraft[] {
  const out: CheckDraft[] = [];
  const guard = (name: string, op: OpName, f: () => CheckDraft) => {
    if (!provider.supports(op, p)) return; // the op check names the missing op
    try {
      ctx.beginStep();
      out.push(f());
    } catch (e) {
      out.push({ name, op, ok: false, worst: NaN, tolerance: 0, detail: e instanceof Error ? e.message : String(e) });
    }
  };
  const exact = (name: string, op: OpName, x: ArrayLike<number>, got: ArrayLike<number>, want: ArrayLike<number>): CheckDraft => {
    const m = got.length === want.length ? firstMismatch(x, got, want) : { n: Infinity, detail: `${got.length} values for ${want.length}` };
    return { name, op, ok: m.n === 0, worst: m.n, tolerance: 0, detail: m.detail ?? `${want.length} values` };
  };
  if (p.activations === "bf16") {
    const name = "bf16 rounding of activations (add x + 0 on a grid of rounding boundaries, exact)";
    guard(name, "add", () => {
      const x = bf16Grid([-120, -60, -20, -8, -1, 0, 1, 7, 20, 60, 126], seed);
      const n = Math.ceil(x.length / 128) * 128;
      const xs = new Float32Array(n);
      xs.set(x);
      const got = ctx.download(ctx.add(ctx.upload(xs, [n / 128, 128]), ctx.upload(new Float32Array(n), [n / 128, 128])));
      return exact(name, "add", xs, got, Array.from(xs, roundBf16));
    });
  }
  if (p.cache === "bf16") {
    const name = "bf16 latent cache (mla writes, readCache; a grid of rounding boundaries, exact)";
    guard(name, "mla", () => {
      const kvLora = 96;
      const rope = 32;
      const W = kvLora + rope;
      const x = bf16Grid([-60, -20, -8, -1, 0, 1, 7, 20, 60], seed + 1);
      const Tn = Math.ceil(x.length / W);
      const bs = 16;
      const nb = Math.ceil(Tn / bs);
      const xs = new Float32Array(Tn * W);
      xs.set(x);
      const kv = new Float32Array(Tn * kvLora);
      const pe = new Float32Array(Tn * rope);
      for (let t = 0; t < Tn; t++) {
        kv.set(xs.subarray(t * W, t * W + kvLora), t * kvLora);
        pe.set(xs.subarray(t * W + kvLora, (t + 1) * W), t * rope);
      }
      const cache = ctx.createCache(1, nb, bs, W, "bf16");
      const heads = 1;
      const nope = 16;
      const v = 16;
      const wkvB = new Float32Array(heads * (nope + v) * kvLora);
      const meta = { positions: Int32Array.from({ length: Tn }, (_, i) => i), seqIdx: new Int32Array(Tn), blockTables: Int32Array.from({ length: nb }, (_, i) => i), maxBlocks: nb };
      ctx.mla(ctx.upload(new Float32Array(Tn * heads * (nope + rope)), [Tn, heads * (nope + rope)]), ctx.upload(kv, [Tn, kvLora]), ctx.upload(pe, [Tn, rope]), ctx.weight(f32Weight("wkv_b", wkvB, heads * (nope + v), kvLora)), cache, 0, meta, { heads, nope, rope, v, kvLora, scale: 0.1 });
      const got = ctx.readCache(cache, 0, 0, Tn);
      return exact(name, "mla", xs, got, Array.from(xs, roundBf16));
    });
  }
  if (p.actQuant !== "none") {
    const fmt: Fp8Format = actQuantFormat(p.actQuant);
    const name = `FP8 activation quantization (${p.actQuant}: ${fmt.name}, max ${fmt.max}${p.actQuant === "fp8-ue8m0" ? ", power-of-two scales" : ""}) through an identity FP8 weight, on a grid of rounding boundaries, exact`;
    guard(name, "linear", () => {
      const K = 512;
      const { x, T } = actQuantGrid(p.actQuant as Exclude<ActQuant, "none">, K, seed + 2);
      const data = new Uint8Array(K * K);
      for (let i = 0; i < K; i++) data[i * K + i] = fnCode(1);
      const sb = K / 128;
      const eye = ctx.weight({ name: "identity.fp8", dtype: "f8_e4m3", shape: [K, K], data, scale: new Float32Array(sb * sb).fill(1), scaleShape: [sb, sb], scaleOrigin: [0, 0] });
      const got = ctx.download(ctx.linear(ctx.upload(x, [T, K]), eye));
      return exact(name, "linear", x, got, actQuantDequant(x, T, K, p.actQuant));
    });
  }
  return out;
}

// ---- end to end: how far the golden logits move ------------------------------------------------

/**
 * Floors on the mean cosine similarity (over every position of every golden prompt) between a
 * precision's logits and the float32 golden logits. Measured on the CPU backend (world sizes 1,
 * 2, 4): bf16 0.9947-0.9962 on tiny-v3, 0.9981-0.9987 on tiny-v3-bf16; on tiny-v3 fp8
 * 0.9585-0.9634, fp8-ue8m0 0.9572-0.9635, fp8-fnuz 0.9601-0.9613. Each floor lets the shortfall
 * from 1 grow 2.3 to 4 times (another backend's roundings flip other routing decisions on these random
 * models) and still fails a model with one of the usual mistakes (rope without positions 0.78 /
 * 0.84, routing without the correction bias 0.84 / 0.89, without the group limit 0.85 / 0.90).
 * A checkpoint without FP8 weights (tiny-v3-bf16) computes the same at every FP8 mode as at bf16,
 * so it is held to the bf16 floor (goldenFloor).
 */
export const COSINE_FLOOR: Record<Exclude<PrecisionName, "exact">, number> = { bf16: 0.98, fp8: 0.9, "fp8-ue8m0": 0.9, "fp8-fnuz": 0.9 };

/** the floor for one checkpoint: activation quantization changes nothing where no weight is FP8 */
export function goldenFloor(p: Exclude<PrecisionName, "exact">, hasFp8Weights: boolean): number {
  return hasFp8Weights ? COSINE_FLOOR[p] : COSINE_FLOOR.bf16;
}

export interface DriftStats {
  /** mean over rows of the cosine similarity of the logits */
  meanCos: number;
  minCos: number;
  /** KL(golden || got) of the softmax distributions, mean and max over rows */
  meanKl: number;
  maxKl: number;
  /** rows whose argmax agrees with the golden argmax */
  top1: number;
  rows: number;
  maxAbs: number;
}

export function drift(got: ArrayLike<number>, ref: ArrayLike<number>, rows: number, V: number): DriftStats {
  const s = { meanCos: 0, minCos: 1, meanKl: 0, maxKl: 0, top1: 0, rows, maxAbs: 0 };
  for (let r = 0; r < rows; r++) {
    let dot = 0;
    let na = 0;
    let nb = 0;
    let ma = -Infinity;
    let mb = -Infinity;
    let ia = 0;
    let ib = 0;
    for (let i = 0; i < V; i++) {
      const x = got[r * V + i]!;
      const y = ref[r * V + i]!;
      dot += x * y;
      na += x * x;
      nb += y * y;
      if (x > ma) (ma = x), (ia = i);
      if (y > mb) (mb = y), (ib = i);
      const d = Math.abs(x - y);
      if (!(d <= s.maxAbs)) s.maxAbs = Number.isNaN(d) ? Infinity : d;
    }
    const cos = na && nb ? dot / Math.sqrt(na * nb) : na === nb ? 1 : 0;
    let za = 0;
    let zb = 0;
    for (let i = 0; i < V; i++) {
      za += Math.exp(got[r * V + i]! - ma);
      zb += Math.exp(ref[r * V + i]! - mb);
    }
    let kl = 0;
    for (let i = 0; i < V; i++) {
      const lp = ref[r * V + i]! - mb - Math.log(zb);
      const lq = got[r * V + i]! - ma - Math.log(za);
      kl += Math.exp(lp) * (lp - lq);
    }
    s.meanCos += (Number.isFinite(cos) ? cos : 0) / rows;
    s.minCos = Math.min(s.minCos, Number.isFinite(cos) ? cos : 0);
    s.meanKl += kl / rows;
    s.maxKl = Math.max(s.maxKl, Number.isFinite(kl) ? kl : Infinity);
    if (ia === ib) s.top1++;
  }
  return s;
}
