// The number formats of the non-exact precisions, written from their definitions (value-domain
// arithmetic in float64, no bit tricks shared with any backend): the independent truth the
// conformance suite checks a backend's bf16 rounding and FP8 activation quantization against.
//
//   bf16       8 significant bits, exponent range of fp32, round to nearest, ties to even
//   e4m3fn     4 significant bits, exponent bias 7, subnormal step 2^-9, max 448, no infinities (OCP FP8)
//   e4m3fnuz   4 significant bits, exponent bias 8, subnormal step 2^-10, max 240, one zero (AMD MI300)
//   act quant  DeepSeek's `act_quant`: per token per 128 channels, s = max(amax, 1e-4) / max (fp32),
//              ue8m0: s rounded up to a power of two; x -> round_fp8(x / s) * s (fp32 operations)
import type { ActQuant } from "./backend.js";

/** round half to even of a float64 value to an integer */
function rne(v: number): number {
  const f = Math.floor(v);
  const d = v - f;
  if (d < 0.5) return f;
  if (d > 0.5) return f + 1;
  return f % 2 === 0 ? f : f + 1;
}

/** floor(log2(a)) for a finite a > 0, exact (Math.log2 can be off by one next to a power of two) */
export function exponentOf(a: number): number {
  let e = Math.floor(Math.log2(a));
  while (2 ** e > a) e--;
  while (2 ** (e + 1) <= a) e++;
  return e;
}

/** round x to the nearest value with `bits` significant bits and exponent >= minExp (below it: fixed step 2^(minExp - bits + 1)) */
function roundSignificand(x: number, bits: number, minExp: number): number {
  const a = Math.abs(x);
  if (a === 0 || !Number.isFinite(a)) return x;
  const e = Math.max(exponentOf(a), minExp);
  const step = 2 ** (e - bits + 1);
  return Math.sign(x) * rne(a / step) * step;
}

/** x rounded to bfloat16 (round to nearest even; overflow to +-Infinity as an IEEE conversion does) */
export function roundBf16(x: number): number {
  if (Number.isNaN(x)) return x;
  const r = roundSignificand(x, 8, -126);
  return Math.abs(r) >= 2 ** 128 ? Math.sign(r) * Infinity : r;
}

export interface Fp8Format {
  name: "e4m3fn" | "e4m3fnuz";
  /** exponent bias */
  bias: number;
  /** the largest finite value */
  max: number;
}
export const E4M3FN: Fp8Format = { name: "e4m3fn", bias: 7, max: 448 };
export const E4M3FNUZ: Fp8Format = { name: "e4m3fnuz", bias: 8, max: 240 };

/** x rounded to the FP8 format (nearest, ties to even, saturating at +-max; NaN stays NaN) */
export function roundFp8(x: number, f: Fp8Format): number {
  if (Number.isNaN(x)) return x;
  if (Math.abs(x) >= f.max) return Math.sign(x) * f.max;
  const r = roundSignificand(x, 4, 1 - f.bias);
  const v = Math.sign(r) * Math.min(Math.abs(r), f.max);
  return v === 0 ? 0 : v; // e4m3fnuz has no -0; -0 and 0 are the same number here anyway
}

/** Every finite value of the format, ascending (for grids and tests). */
export function fp8Values(f: Fp8Format): number[] {
  const pos = new Set<number>([0]);
  for (let e = 0; e < 16; e++)
    for (let m = 0; m < 8; m++) {
      const v = e === 0 ? (m / 8) * 2 ** (1 - f.bias) : (1 + m / 8) * 2 ** (e - f.bias);
      if (v <= f.max) pos.add(v);
    }
  const p = [...pos].sort((a, b) => a - b);
  return [...p.slice(1).map((v) => -v).reverse(), ...p];
}

/** the FP8 format and the largest value an activation-quantization mode maps the block's amax to */
export function actQuantFormat(mode: Exclude<ActQuant, "none">): Fp8Format {
  return mode === "fp8-fnuz" ? E4M3FNUZ : E4M3FN;
}

const f32 = Math.fround;
const AMAX_FLOOR = f32(1e-4);

/**
 * The scale of one 128-channel block with largest magnitude `amax` (fp32 arithmetic, as DeepSeek's
 * kernel). ue8m0: the exact 2^ceil(log2 s); a kernel that takes log2 in fp32 (DeepSeek's, the CPU
 * backend's) can round s just above a power of two down to it, where it then saturates the block's
 * largest values: a band of relative width around 1e-6 above each power of two that the conformance
 * grids stay clear of.
 */
export function actQuantScale(amax: number, mode: Exclude<ActQuant, "none">): number {
  const s = f32(Math.max(AMAX_FLOOR, amax) / actQuantFormat(mode).max);
  return mode === "fp8-ue8m0" ? 2 ** (exponentOf(s) + (2 ** exponentOf(s) === s ? 0 : 1)) : s;
}

/**
 * DeepSeek's `act_quant` followed by the dequantization a kernel applies: each row of the
 * row-major [T, K] `x` in blocks of 128 channels (the last one shorter when K is not a multiple
 * of 128). Returns the fp32 values the FP8 GEMM effectively multiplies.
 */
export function actQuantDequant(x: ArrayLike<number>, T: number, K: number, mode: ActQuant): Float64Array {
  const out = Float64Array.from({ length: T * K }, (_, i) => x[i]!);
  if (mode === "none") return out;
  const fmt = actQuantFormat(mode);
  for (let t = 0; t < T; t++)
    for (let b = 0; b < K; b += 128) {
      const e = Math.min(K, b + 128);
      let amax = 0;
      for (let i = b; i < e; i++) amax = Math.max(amax, Math.abs(out[t * K + i]!));
      const s = actQuantScale(amax, mode);
      for (let i = b; i < e; i++) out[t * K + i] = f32(roundFp8(f32(out[t * K + i]! / s), fmt) * s);
    }
  return out;
}
