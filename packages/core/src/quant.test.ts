// quant.ts, the truth the conformance suite holds backends' quantizers to, checked against other
// formulations: bf16 against the integer round-to-nearest-even on fp32 bit patterns; FP8 against a
// brute-force nearest-value search over every code of the format (ties to the even code); the
// activation quantizer against its definition on hand-made blocks.
import { describe, expect, it } from "vitest";
import { fp8e4m3Decode } from "./conformance.js";
import { actQuantGrid, bf16Grid } from "./conformance-precision.js";
import { actQuantDequant, actQuantScale, E4M3FN, E4M3FNUZ, type Fp8Format, fp8Values, roundBf16, roundFp8 } from "./quant.js";
import { Rng } from "./sampling.js";

const f = new Float32Array(1);
const u = new Uint32Array(f.buffer);
/** fp32 -> bf16 by integer arithmetic on the bits (round to nearest, ties to even) */
function bf16Bits(x: number): number {
  f[0] = x;
  const b = u[0]!;
  u[0] = ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) << 16;
  return f[0]!;
}

/** the FP8 value nearest x by search over the finite values; ties to the even code (even index among |values|) */
function nearestFp8(x: number, fmt: Fp8Format): number {
  const pos = fp8Values(fmt).filter((v) => v >= 0);
  const a = Math.min(Math.abs(x), fmt.max);
  let best = 0;
  for (let i = 1; i < pos.length; i++) {
    const d = Math.abs(pos[i]! - a) - Math.abs(pos[best]! - a);
    if (d < 0 || (d === 0 && i % 2 === 0)) best = i;
  }
  return pos[best]! === 0 ? 0 : Math.sign(x) * pos[best]!;
}

describe("roundBf16", () => {
  it("equals the integer round-to-nearest-even on 200,000 fp32 bit patterns (normals, subnormals, huge) and the boundary grid", () => {
    const rng = new Rng(5);
    const xs: number[] = [...bf16Grid([-126, -100, -1, 0, 1, 100, 126], 3)];
    for (let i = 0; i < 200_000; i++) {
      u[0] = Math.floor(rng.next() * 2 ** 32);
      if ((u[0]! & 0x7f800000) === 0x7f800000) continue; // inf / NaN
      xs.push(f[0]!);
    }
    let bad = 0;
    for (const x of xs) if (roundBf16(x) !== bf16Bits(x)) bad++;
    expect(bad).toBe(0);
  });

  it("ties go to even, a tie at the top of a binade carries into the next, overflow is infinite", () => {
    expect(roundBf16(1 + 2 ** -8)).toBe(1); // tie between 1 and 1 + 2^-7: even is 1
    expect(roundBf16(1 + 3 * 2 ** -8)).toBe(1 + 2 ** -6); // tie between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6
    expect(roundBf16(2 - 2 ** -9)).toBe(2);
    expect(roundBf16(-(1 + 2 ** -8 + 2 ** -20))).toBe(-(1 + 2 ** -7));
    expect(roundBf16(2 ** 128 - 2 ** 119)).toBe(Infinity);
    expect(roundBf16(-3.3895313892515355e38)).toBe(-3.3895313892515355e38); // the largest bf16
    expect(Number.isNaN(roundBf16(NaN))).toBe(true);
  });
});

describe("FP8 formats", () => {
  it("e4m3fn's values are the decoded codes (NaN codes excluded); e4m3fnuz has 255 finite values up to 240", () => {
    const codes = new Set<number>();
    for (let b = 0; b < 256; b++) if ((b & 0x7f) !== 0x7f) codes.add(fp8e4m3Decode(b) || 0);
    expect(fp8Values(E4M3FN)).toEqual([...codes].sort((a, b) => a - b));
    expect(fp8Values(E4M3FN).length).toBe(253);
    const nuz = fp8Values(E4M3FNUZ);
    expect(nuz.length).toBe(255);
    expect([nuz[0], nuz[nuz.length - 1], nuz[128]]).toEqual([-240, 240, 2 ** -10]); // subnormal step 2^-10
    // fnuz holds fn's values halved (bias 8), and 240: half of 480, whose fn code is NaN
    const half = new Set(fp8Values(E4M3FN).map((v) => v / 2));
    expect(nuz.filter((v) => !half.has(v))).toEqual([-240, 240]);
    expect([...half].every((v) => nuz.includes(v))).toBe(true);
  });

  it.each([E4M3FN, E4M3FNUZ])("roundFp8 ($name) is the nearest value, ties to even, saturating: every midpoint, quarter point and 20,000 random values", (fmt) => {
    const vals = fp8Values(fmt);
    const xs: number[] = [];
    for (let i = 0; i + 1 < vals.length; i++) {
      const lo = vals[i]!;
      const hi = vals[i + 1]!;
      xs.push(lo, (lo + hi) / 2, lo + (hi - lo) / 4, lo + (3 * (hi - lo)) / 4, (lo + hi) / 2 + (hi - lo) * 2 ** -20, (lo + hi) / 2 - (hi - lo) * 2 ** -20);
    }
    const rng = new Rng(9);
    for (let i = 0; i < 20_000; i++) xs.push((rng.next() - 0.5) * 2 ** (rng.next() * 24 - 14));
    xs.push(fmt.max * 1.01, -fmt.max * 3, 1e30);
    let bad = 0;
    for (const x of xs) if (roundFp8(x, fmt) !== nearestFp8(x, fmt)) bad++;
    expect(bad).toBe(0);
  });
});

describe("actQuantDequant (DeepSeek's act_quant per 1x128)", () => {
  it("the scale of a block: amax / 448 (fp32), ue8m0 rounded up to a power of two, fnuz amax / 240, a 1e-4 floor", () => {
    expect(actQuantScale(448, "fp8")).toBe(1);
    expect(actQuantScale(300, "fp8")).toBe(Math.fround(300 / 448));
    expect(actQuantScale(300, "fp8-ue8m0")).toBe(1);
    expect(actQuantScale(449, "fp8-ue8m0")).toBe(2);
    expect(actQuantScale(448 * 2 ** -5, "fp8-ue8m0")).toBe(2 ** -5);
    expect(actQuantScale(240, "fp8-fnuz")).toBe(1);
    expect(actQuantScale(0, "fp8")).toBe(Math.fround(Math.fround(1e-4) / 448));
  });

  it("per token, per block of 128 channels (a shorter last block), each value rounded on its block's scale", () => {
    const K = 300;
    const x = new Float32Array(2 * K);
    x[0] = 448; // block 0 of row 0: scale 1
    x[1] = 3.3; // -> 3.25 (step 0.25 in [2, 4))
    x[128] = 4480; // block 1: scale 10
    x[129] = 33; // 3.3 on the scale 10: 32.5, in fp32
    x[256] = 1; // block 2 (44 channels): scale 1/448
    x[257] = 0.5;
    x[K + 1] = 7; // row 1, block 0: amax 7, scale 1/64: 448 exactly
    const q = actQuantDequant(x, 2, K, "fp8");
    expect([q[0], q[1], q[128], q[K + 1]]).toEqual([448, 3.25, 4480, 7]);
    const s2 = Math.fround(1 / 448); // block 2: not a power of two, every operation in fp32
    expect([q[256], q[257]]).toEqual([Math.fround(roundFp8(Math.fround(1 / s2), E4M3FN) * s2), Math.fround(roundFp8(Math.fround(0.5 / s2), E4M3FN) * s2)]);
    expect(q[257]).toBeCloseTo(0.5, 6);
    expect(q[129]).toBe(Math.fround(roundFp8(Math.fround(33 / 10), E4M3FN) * 10));
    expect(q[129]).toBeCloseTo(32.5, 5);
    const z = actQuantDequant(x, 2, K, "fp8-ue8m0");
    expect(z[128]).toBe(4608); // scale 2^ceil(log2 10) = 16: 4480 / 16 = 280 -> 288 (step 32 above 256), times 16
    expect(actQuantDequant(x, 2, K, "none")).toEqual(Float64Array.from(x));
  });

  it.each(["fp8", "fp8-ue8m0", "fp8-fnuz"] as const)("the conformance grid for %s: every block's scale is exact (x / s exact), and every value is a bf16 value", (mode) => {
    const { x, T } = actQuantGrid(mode, 512, 1);
    for (let t = 0; t < T; t++)
      for (let b = 0; b < 512; b += 128) {
        const blk = x.subarray(t * 512 + b, t * 512 + b + 128);
        const amax = Math.max(...Array.from(blk, Math.abs));
        if (amax === 0) continue;
        const s = actQuantScale(amax, mode);
        for (const v of blk) expect(Math.fround(v / s) * s).toBe(v);
        const m = Math.log2(s);
        expect(Number.isInteger(m) || Number.isInteger(Math.log2(s / 1.5))).toBe(true);
      }
    for (const v of x) expect(roundBf16(v)).toBe(v);
  });
});
