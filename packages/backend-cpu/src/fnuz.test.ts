// The CPU backend's "fp8-fnuz" precision mode: what AMD MI300 (gfx942) computes, emulated exactly so
// the ROCm kernels have a reference. Checked against float64 formulas built from the format's
// definition, not from the kernels:
// - e4m3fnuz: 1 sign, 4 exponent (bias 8), 3 mantissa bits; no infinity, no -0 (0x80 is the one NaN);
//   subnormals m/8 * 2^-7; largest 0x7f = 1.875 * 2^7 = 240;
// - activations per token per 128 channels: s = max(amax, 1e-4) / 240, x -> round_fnuz(x / s) * s with
//   round-to-nearest-even on that grid, saturating at 240 (as DeepSeek's act_quant with fnuz's max);
// - FP8 weights (OCP e4m3fn in the checkpoint) held as fnuz: byte 0x80 -> 0x00, other bytes unchanged,
//   block scales doubled; the dequantized weights are bit-identical to the e4m3fn ones.
import { describe, expect, it } from "vitest";
import { type HostWeight, Rng } from "@ds3/core";
import { CpuContext, cpu } from "./index.js";

const rng = new Rng(7);
const randn = () => {
  const u = Math.max(rng.next(), 1e-12);
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng.next());
};
const f32 = Math.fround;

/** e4m3fnuz code -> value (NaN for 0x80), from the definition */
function fnuzDecode(b: number): number {
  if (b === 0x80) return NaN;
  const s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  const f = e === 0 ? (m / 8) * 2 ** (1 - 8) : (1 + m / 8) * 2 ** (e - 8);
  return s ? -f : f;
}
/** OCP e4m3fn code -> value (NaN for 0x7f / 0xff) */
function fnDecode(b: number): number {
  if ((b & 0x7f) === 0x7f) return NaN;
  const s = b >> 7, e = (b >> 3) & 15, m = b & 7;
  const f = e === 0 ? (m / 8) * 2 ** -6 : (1 + m / 8) * 2 ** (e - 7);
  return s ? -f : f;
}
/** the non-negative fnuz grid: codes 0x00..0x7f, increasing */
const GRID = Array.from({ length: 128 }, (_, c) => fnuzDecode(c));

/** nearest fnuz value, ties to the even code (= even mantissa), saturating at 240; never -0 */
function fnuzRound(x: number): number {
  if (Number.isNaN(x)) return x;
  const a = Math.min(Math.abs(x), 240);
  let best = 0;
  for (let c = 1; c < 128; c++) {
    const lo = GRID[c - 1]!, hi = GRID[c]!;
    if (a < lo || a > hi) continue;
    const dl = a - lo, dh = hi - a;
    best = dl < dh ? c - 1 : dh < dl ? c : (c - 1) % 2 === 0 ? c - 1 : c;
    break;
  }
  const v = GRID[best]!;
  return v === 0 ? 0 : Math.sign(x) * v;
}

/** activation quantization reference, in the kernels' float steps: q = fround(fnuzRound(fround(x / s)) * s) */
function actQuantFnuz(x: Float32Array, T: number, K: number): Float32Array {
  const out = new Float32Array(x.length);
  for (let t = 0; t < T; t++)
    for (let b = 0; b < K; b += 128) {
      const e = Math.min(K, b + 128);
      let amax = f32(1e-4);
      for (let i = b; i < e; i++) amax = Math.max(amax, Math.abs(x[t * K + i]!));
      const s = f32(amax / 240);
      for (let i = b; i < e; i++) out[t * K + i] = f32(fnuzRound(f32(x[t * K + i]! / s)) * s);
    }
  return out;
}

/** an FP8 identity weight (code 0x38 = 1.0 in e4m3fn, scale 1): a linear through it returns its input */
function identity(K: number): HostWeight {
  const data = new Uint8Array(K * K);
  for (let i = 0; i < K; i++) data[i * K + i] = 0x38;
  const sb = Math.ceil(K / 128);
  return { name: "eye", dtype: "f8_e4m3", shape: [K, K], data, scale: new Float32Array(sb * sb).fill(1), scaleShape: [sb, sb] };
}

const bits = (a: Float32Array) => new Uint32Array(a.buffer, a.byteOffset, a.length);

describe("the e4m3fnuz grid (from its definition)", () => {
  it("255 finite values, 0x80 the only NaN, max 240, smallest subnormal 2^-10, no -0; every fn value halves onto it", () => {
    const vals = Array.from({ length: 256 }, (_, c) => fnuzDecode(c));
    expect(vals.filter(Number.isNaN).length).toBe(1);
    expect(new Set(vals.filter((v) => !Number.isNaN(v))).size).toBe(255);
    expect(Math.max(...vals.filter((v) => !Number.isNaN(v)))).toBe(240);
    expect(GRID[1]).toBe(2 ** -10);
    expect(vals.some((v) => Object.is(v, -0))).toBe(false);
    for (let c = 0; c < 256; c++) if (c !== 0x80 && (c & 0x7f) !== 0x7f) expect(fnuzDecode(c)).toBe(fnDecode(c) / 2);
  });
});

describe("fp8-fnuz activation quantization (per token per 128 channels, max 240) vs the float64 grid", () => {
  it("bit-identical to the reference on random rows, ties, subnormals, saturation, zeros and an all-small block", () => {
    const K = 300; // blocks of 128, 128 and 44 channels
    const rows: number[][] = [];
    // random rows at several magnitudes (each block its own amax)
    for (const mag of [1e-3, 0.1, 1, 37, 3e4]) rows.push(Array.from({ length: K }, () => randn() * mag));
    // block amax 240 -> s = 1 exactly, so these are the rounding cases themselves: midpoints between
    // neighbours (ties to even), subnormals (spacing 2^-10), values just off a midpoint, zero and -0
    const ties = [240, 232, 2 ** -11, 3 * 2 ** -11, 1.5 * 2 ** -10, 1.0625, 1.1875, 7.5 * 2 ** -10, 2 ** -7 + 2 ** -11, 17, 19, 0, -0, -232, -1.1875, 0.99, 2 ** -12, 228.0001];
    rows.push(Array.from({ length: K }, (_, i) => (i < 128 ? (ties[i % ties.length]! * (i >= ties.length ? -1 : 1)) : randn())));
    // an all-small block: amax clamps to 1e-4
    rows.push(Array.from({ length: K }, (_, i) => (i >= 128 && i < 256 ? randn() * 1e-6 : randn())));
    const T = rows.length;
    const x = Float32Array.from(rows.flat());
    const ref = actQuantFnuz(x, T, K);

    const ctx = new CpuContext({ threads: 2, precision: { actQuant: "fp8-fnuz" } });
    const y = ctx.download(ctx.linear(ctx.upload(x, [T, K]), ctx.weight(identity(K))));
    ctx.dispose();
    // the identity (fnuz: 0x38 is 0.5, scale doubled to 2) passes the quantized activations through exactly
    const bad: string[] = [];
    for (let i = 0; i < y.length; i++) if (bits(y)[i] !== bits(ref)[i]) bad.push(`[${Math.floor(i / K)}, ${i % K}] x=${x[i]} got ${y[i]} want ${ref[i]}`);
    expect(bad.slice(0, 10)).toEqual([]);
    // the tie row (s = 1): 232 -> 224, 2^-11 -> 0, 1.0625 -> 1, 1.1875 -> 1.25, -0 -> +0 (no -0 in fnuz)
    const r = (T - 2) * K;
    expect([y[r]!, y[r + 1]!, y[r + 2]!, y[r + 5]!, y[r + 6]!]).toEqual([240, 224, 0, 1, 1.25]);
    expect(Object.is(y[r + 12], 0)).toBe(true);
    // every value of a block with amax 240 is on the fnuz grid
    for (let i = 0; i < 128; i++) expect(GRID).toContain(Math.abs(y[r + i]!));
  });

  it("is not the e4m3fn quantization (max 448), and a linear through real FP8 weights matches the float64 product", () => {
    const T = 4, N = 96, K = 256;
    const x = Float32Array.from({ length: T * K }, randn);
    const data = new Uint8Array(N * K).map(() => {
      const b = Math.floor(rng.next() * 256);
      return (b & 0x7f) === 0x7f ? 0x21 : b;
    });
    const scale = Float32Array.from({ length: 2 }, () => 0.001 + rng.next() * 0.01);
    const hw: HostWeight = { name: "w", dtype: "f8_e4m3", shape: [N, K], data, scale, scaleShape: [1, 2] };
    const before = { data: data.slice(), scale: scale.slice() };
    const run = (actQuant: "fp8" | "fp8-fnuz") => {
      const ctx = new CpuContext({ threads: 2, precision: { actQuant } });
      const y = ctx.download(ctx.linear(ctx.upload(x, [T, K]), ctx.weight(hw)));
      ctx.dispose();
      return y;
    };
    const yz = run("fp8-fnuz");
    const xq = actQuantFnuz(x, T, K);
    let worst = 0, mag = 0;
    for (let t = 0; t < T; t++)
      for (let n = 0; n < N; n++) {
        let s = 0;
        for (let k = 0; k < K; k++) s += xq[t * K + k]! * fnDecode(data[n * K + k]!) * scale[k >> 7]!;
        worst = Math.max(worst, Math.abs(yz[t * N + n]! - s));
        mag = Math.max(mag, Math.abs(s));
      }
    expect(worst / mag).toBeLessThan(1e-6);
    const yf = run("fp8");
    let diff = 0;
    for (let i = 0; i < yz.length; i++) diff = Math.max(diff, Math.abs(yz[i]! - yf[i]!));
    expect(diff / mag).toBeGreaterThan(1e-4);
    // the conversion works on the backend's copy: the caller's bytes and scales are unchanged
    expect(data).toEqual(before.data);
    expect(scale).toEqual(before.scale);
  });
});

describe("fp8-fnuz weights: e4m3fn bytes held as e4m3fnuz (0x80 -> 0, scales doubled)", () => {
  // every code of a 256 x 256 weight, 2 x 2 scale blocks; one-hot activations of 240 (fnuz: s = 1,
  // kept exactly) read each dequantized weight w back as fround(240 * w): y[t, n] = 240 * W[n, t]
  const N = 256, K = 256;
  const data = new Uint8Array(N * K);
  for (let n = 0; n < N; n++) for (let k = 0; k < K; k++) data[n * K + k] = (n * 7 + k) & 0xff;
  for (let i = 0; i < data.length; i++) if ((data[i]! & 0x7f) === 0x7f) data[i] = 0x80; // no fn NaN: more -0
  const x = new Float32Array(K * K);
  for (let t = 0; t < K; t++) x[t * K + t] = 240;

  for (const [label, scale] of [
    ["power-of-two scales (read back exactly)", Float32Array.from([2 ** -8, 2 ** -3, 1, 2 ** 6])],
    ["random scales", Float32Array.from({ length: 4 }, () => f32(1e-4 + rng.next() * 0.02))],
  ] as const) {
    it(`dequantized weights are bit-identical to the fnuz decoding of the converted bytes and to the fn decoding (${label})`, () => {
      const ctx = new CpuContext({ threads: 2, precision: { actQuant: "fp8-fnuz" } });
      const y = ctx.download(ctx.linear(ctx.upload(x, [K, K]), ctx.weight({ name: "w", dtype: "f8_e4m3", shape: [N, K], data: data.slice(), scale: scale.slice(), scaleShape: [2, 2] })));
      ctx.dispose();
      const bad: string[] = [];
      let zeros = 0;
      for (let t = 0; t < K; t++)
        for (let n = 0; n < N; n++) {
          const b = data[n * K + t]!;
          const sc = scale[(n >> 7) * 2 + (t >> 7)]!;
          const bz = b === 0x80 ? 0x00 : b; // the fnuz byte
          const wz = f32(fnuzDecode(bz) * (2 * sc)); // fnuz value times the doubled scale, rounded once
          const wf = f32(fnDecode(b) * sc); // the checkpoint's e4m3fn value times its scale
          const got = y[t * N + n]!;
          if (!Object.is(got, f32(240 * wz))) bad.push(`code 0x${b.toString(16)} scale ${sc}: got ${got}, fnuz ${f32(240 * wz)}`);
          if (got !== f32(240 * wf)) bad.push(`code 0x${b.toString(16)} scale ${sc}: got ${got}, fn ${f32(240 * wf)}`);
          if (label.startsWith("power") && got / 240 !== wf) bad.push(`code 0x${b.toString(16)}: read back ${got / 240} != ${wf}`);
          if (b === 0x80) zeros += Object.is(got, 0) ? 1 : 0;
        }
      expect(bad.slice(0, 10)).toEqual([]);
      expect(zeros).toBe(data.filter((b) => b === 0x80).length); // every fn -0 became +0
    });
  }

  it("an FP8 weight with e4m3fn NaN codes (0x7f/0xff) is refused by name: fnuz cannot represent them", () => {
    const ctx = new CpuContext({ threads: 1, precision: { actQuant: "fp8-fnuz" } });
    const d = new Uint8Array(128 * 128);
    d[5] = 0x7f;
    d[9] = 0xff;
    expect(() => ctx.weight({ name: "layers.3.w", dtype: "f8_e4m3", shape: [128, 128], data: d, scale: new Float32Array(1).fill(1), scaleShape: [1, 1] })).toThrow(
      /^layers\.3\.w: FP8 weight has 2 NaN codes \(0x7f\/0xff\), which e4m3fnuz cannot represent/,
    );
    ctx.dispose();
  });

  it("the provider supports fp8-fnuz at both activation dtypes; an unknown actQuant is refused by name", () => {
    for (const activations of ["f32", "bf16"] as const) expect(cpu.supports("linear", { activations, cache: "bf16", actQuant: "fp8-fnuz" })).toBe(true);
    expect(cpu.supports("linear", { activations: "f32", cache: "f32", actQuant: "fp8-e5m2" as never })).toBe(false);
    expect(() => new CpuContext({ threads: 1, precision: { actQuant: "fp8-e5m2" as never } })).toThrow(/unknown actQuant "fp8-e5m2"/);
  });
});
