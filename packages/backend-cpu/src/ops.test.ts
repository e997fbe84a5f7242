// Op-level checks of the native CPU kernels against plain float64 JS formulas: FP8 block
// scales (including slices that start inside a block), the bf16 and FP8 activation modes
// that GPU kernels are checked against, rope, routing.
import { describe, expect, it } from "vitest";
import { type HostWeight, Rng } from "@ds3/core";
import { CpuContext, availableIsas } from "./index.js";

const rng = new Rng(42);
const randn = () => {
  const u = Math.max(rng.next(), 1e-12);
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng.next());
};

function fp8Decode(v: number): number {
  const s = v >> 7, e = (v >> 3) & 15, m = v & 7;
  const f = e === 0 ? (m / 8) * 2 ** -6 : (1 + m / 8) * 2 ** (e - 7);
  return s ? -f : f;
}
/** all finite e4m3fn values, for nearest-value rounding in the reference */
const FP8_VALUES = Array.from({ length: 256 }, (_, i) => i).filter((i) => (i & 0x7f) !== 0x7f).map(fp8Decode);
function fp8Round(x: number): number {
  const a = Math.min(Math.abs(x), 448);
  let best = 0, bd = Infinity, bi = 0;
  FP8_VALUES.forEach((v, i) => {
    if (v < 0) return;
    const d = Math.abs(v - a);
    // ties to even mantissa (even index in the positive half)
    if (d < bd || (d === bd && (i & 1) === 0 && (bi & 1) === 1)) { bd = d; best = v; bi = i; }
  });
  return Math.sign(x) * best;
}
function bf16Round(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer);
  u[0] = (u[0]! + 0x7fff + ((u[0]! >> 16) & 1)) & 0xffff0000;
  return f[0]!;
}

function fp8Weight(rows: number, cols: number, origin: [number, number]): { hw: HostWeight; dense: Float64Array } {
  const data = new Uint8Array(rows * cols);
  for (let i = 0; i < data.length; i++) {
    let b = Math.floor(rng.next() * 256);
    if ((b & 0x7f) === 0x7f) b = 0x10; // no NaN
    data[i] = b;
  }
  const sr = Math.floor((rows - 1 + origin[0]) / 128) + 1;
  const sc = Math.floor((cols - 1 + origin[1]) / 128) + 1;
  const scale = Float32Array.from({ length: sr * sc }, () => 0.001 + rng.next() * 0.01);
  const dense = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++)
      dense[r * cols + c] = fp8Decode(data[r * cols + c]!) * scale[Math.floor((r + origin[0]) / 128) * sc + Math.floor((c + origin[1]) / 128)]!;
  return { hw: { name: "w", dtype: "f8_e4m3", shape: [rows, cols], data, scale, scaleShape: [sr, sc], scaleOrigin: origin }, dense };
}

function refLinear(x: Float64Array | Float32Array, T: number, w: Float64Array, N: number, K: number): Float64Array {
  const y = new Float64Array(T * N);
  for (let t = 0; t < T; t++) for (let n = 0; n < N; n++) {
    let s = 0;
    for (let k = 0; k < K; k++) s += x[t * K + k]! * w[n * K + k]!;
    y[t * N + n] = s;
  }
  return y;
}

function actQuant(x: Float32Array, T: number, K: number, ue8m0: boolean): Float64Array {
  const out = new Float64Array(x.length);
  for (let t = 0; t < T; t++)
    for (let b = 0; b < K; b += 128) {
      const e = Math.min(K, b + 128);
      let amax = 1e-4;
      for (let i = b; i < e; i++) amax = Math.max(amax, Math.abs(x[t * K + i]!));
      let s = Math.fround(amax / 448);
      if (ue8m0) s = 2 ** Math.ceil(Math.log2(s));
      for (let i = b; i < e; i++) out[t * K + i] = fp8Round(Math.fround(x[t * K + i]! / s)) * s;
    }
  return out;
}

const maxRel = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let m = 0, scale = 0;
  for (let i = 0; i < a.length; i++) scale = Math.max(scale, Math.abs(b[i]!));
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m / scale;
};

describe("CPU kernels vs float64 formulas", () => {
  const T = 5, N = 200, K = 300;
  const x = Float32Array.from({ length: T * K }, randn);

  it("FP8 linear with a slice that starts inside a 128x128 scale block", () => {
    const ctx = new CpuContext({ threads: 2 });
    const { hw, dense } = fp8Weight(N, K, [100, 50]);
    const y = ctx.download(ctx.linear(ctx.upload(x, [T, K]), ctx.weight(hw)));
    expect(maxRel(y, refLinear(x, T, dense, N, K))).toBeLessThan(1e-6);
    ctx.dispose();
  });

  for (const mode of ["fp8", "fp8-ue8m0"] as const) {
    it(`FP8 activations per token per 128 channels (${mode}) as DeepSeek's act_quant`, () => {
      const ctx = new CpuContext({ threads: 2, precision: { actQuant: mode } });
      const { hw, dense } = fp8Weight(N, K, [0, 0]);
      const y = ctx.download(ctx.linear(ctx.upload(x, [T, K]), ctx.weight(hw)));
      const ref = refLinear(actQuant(x, T, K, mode === "fp8-ue8m0"), T, dense, N, K);
      expect(maxRel(y, ref)).toBeLessThan(1e-6);
      // and it really quantizes: the exact product differs
      expect(maxRel(y, refLinear(x, T, dense, N, K))).toBeGreaterThan(1e-4);
      ctx.dispose();
    });
  }

  it("bf16 activations: op outputs are rounded to bf16 (round to nearest even)", () => {
    const ctx = new CpuContext({ threads: 1, precision: { activations: "bf16" } });
    const { hw, dense } = fp8Weight(N, K, [0, 0]);
    const y = ctx.download(ctx.linear(ctx.upload(x, [T, K]), ctx.weight(hw)));
    const ref = refLinear(x, T, dense, N, K);
    // each output is the bf16 value nearest the exact result (up to fp32 summation error)
    for (let i = 0; i < y.length; i++) expect(Math.abs(y[i]! - ref[i]!)).toBeLessThanOrEqual(Math.abs(bf16Round(Math.fround(ref[i]!)) - ref[i]!) + 1e-5 * Math.abs(ref[i]!) + 1e-6);
    // every output is exactly representable in bf16
    for (const v of y) expect(bf16Round(v)).toBe(v);
    expect(maxRel(y, ref)).toBeLessThan(8e-3);
    ctx.dispose();
  });

  it("rmsNorm and rope (interleaved pairs)", () => {
    const ctx = new CpuContext({ threads: 2 });
    const D = 64;
    const xs = Float32Array.from({ length: 3 * D }, randn);
    const g = Float32Array.from({ length: D }, () => 0.5 + rng.next());
    const w = ctx.weight({ name: "g", dtype: "f32", shape: [1, D], data: new Uint8Array(g.buffer) });
    const y = ctx.download(ctx.rmsNorm(ctx.upload(xs, [3, D]), w, 1e-6));
    for (let t = 0; t < 3; t++) {
      let ss = 0;
      for (let i = 0; i < D; i++) ss += xs[t * D + i]! ** 2;
      const inv = 1 / Math.sqrt(ss / D + 1e-6);
      for (let i = 0; i < D; i++) expect(y[t * D + i]).toBeCloseTo(g[i]! * xs[t * D + i]! * inv, 5);
    }
    // rope on heads of width 48 with the rotary part at [16, 48)
    const H = 2, hd = 48, off = 16, rd = 32;
    const q = Float32Array.from({ length: 3 * H * hd }, randn);
    const inv = Float32Array.from({ length: rd / 2 }, (_, i) => 1 / 10000 ** ((2 * i) / rd));
    const pos = Int32Array.of(0, 5, 4000);
    const r = ctx.download(ctx.rope(ctx.upload(q, [3, H * hd]), H, hd, off, rd, pos, inv, 1));
    for (let t = 0; t < 3; t++)
      for (let h = 0; h < H; h++)
        for (let i = 0; i < hd; i++) {
          const at = t * H * hd + h * hd + i;
          if (i < off) expect(r[at]).toBe(q[at]);
          else {
            const j = i - off, p = j >> 1;
            const ang = Math.fround(pos[t]! * inv[p]!);
            const a = q[t * H * hd + h * hd + off + 2 * p]!, b = q[t * H * hd + h * hd + off + 2 * p + 1]!;
            const want = j % 2 === 0 ? a * Math.cos(ang) - b * Math.sin(ang) : a * Math.sin(ang) + b * Math.cos(ang);
            expect(r[at]).toBeCloseTo(want, 4);
          }
        }
    ctx.dispose();
  });

  it("noaux_tc routing: correction bias chooses, group limit applies, weights renormalized and scaled", () => {
    const ctx = new CpuContext({ threads: 1 });
    const E = 16, D = 32, G = 4, TG = 2, K = 4;
    const gw = Float32Array.from({ length: E * D }, () => randn() * 0.3);
    const bias = Float32Array.from({ length: E }, () => randn() * 0.2);
    const xs = Float32Array.from({ length: 6 * D }, randn);
    const out = ctx.download(
      ctx.moeGate(ctx.upload(xs, [6, D]), ctx.weight({ name: "gate", dtype: "f32", shape: [E, D], data: new Uint8Array(gw.buffer) }), bias, {
        topk: K, nGroups: G, topkGroups: TG, scoreFunc: "sigmoid", normTopk: true, routeScale: 2.5,
      }),
    );
    for (let t = 0; t < 6; t++) {
      const sc = Array.from({ length: E }, (_, e) => {
        let s = 0;
        for (let i = 0; i < D; i++) s += xs[t * D + i]! * gw[e * D + i]!;
        return 1 / (1 + Math.exp(-s));
      });
      const ch = sc.map((s, e) => s + bias[e]!);
      const gs = Array.from({ length: G }, (_, g) => ch.slice(g * 4, g * 4 + 4).sort((a, b) => b - a).slice(0, 2).reduce((a, b) => a + b, 0));
      const groups = [...gs.keys()].sort((a, b) => gs[b]! - gs[a]!).slice(0, TG);
      const cand = [...ch.keys()].filter((e) => groups.includes(Math.floor(e / 4))).sort((a, b) => ch[b]! - ch[a]!).slice(0, K);
      const sum = cand.reduce((a, e) => a + sc[e]!, 0);
      expect(Array.from(out.subarray(t * 2 * K + K, t * 2 * K + 2 * K))).toEqual(cand);
      cand.forEach((e, k) => expect(out[t * 2 * K + k]).toBeCloseTo((sc[e]! / sum) * 2.5, 5));
    }
    ctx.dispose();
  });
});

/** a context whose kernels are those of `isa` (DS3_CPU_ISA is read when a context is made) */
function withIsa(isa: string, threads = 2): CpuContext {
  const prev = process.env.DS3_CPU_ISA;
  process.env.DS3_CPU_ISA = isa;
  try {
    return new CpuContext({ threads });
  } finally {
    if (prev === undefined) delete process.env.DS3_CPU_ISA;
    else process.env.DS3_CPU_ISA = prev;
  }
}

function bf16Weight(rows: number, cols: number): { hw: HostWeight; dense: Float64Array } {
  const v = new Uint16Array(rows * cols);
  const dense = new Float64Array(rows * cols);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < v.length; i++) {
    f[0] = randn() * 0.05;
    v[i] = u[0]! >>> 16;
    u[0] = v[i]! << 16;
    dense[i] = f[0];
  }
  return { hw: { name: "wb", dtype: "bf16", shape: [rows, cols], data: new Uint8Array(v.buffer) }, dense };
}

function f16Weight(rows: number, cols: number): { hw: HostWeight; dense: Float64Array } {
  const v = new Uint16Array(rows * cols);
  const dense = new Float64Array(rows * cols);
  for (let i = 0; i < v.length; i++) {
    // every bit pattern but inf/NaN, subnormals included
    let h = Math.floor(rng.next() * 65536);
    if (((h >> 10) & 31) === 31) h &= 0x83ff;
    v[i] = h;
    const s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    const f = e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15);
    dense[i] = s ? -f : f;
  }
  return { hw: { name: "wh", dtype: "f16", shape: [rows, cols], data: new Uint8Array(v.buffer) }, dense };
}

describe.each(availableIsas())("SIMD kernels (%s)", (isa) => {
  // 203 rows (not a multiple of the 4-row register tile), 300 columns (a tail after the 16/8/4 lanes)
  const T = 40, N = 203, K = 300;
  const x = Float32Array.from({ length: T * K }, randn);
  const weights = () => {
    const a = fp8Weight(N, K, [0, 0]); // decoded in registers for short batches
    const b = fp8Weight(N, K, [40, 32]); // a slice inside a block, lane-aligned
    const c = fp8Weight(N, K, [0, 50]); // not lane-aligned: the decoded-tile path
    const big = fp8Weight(N, K, [0, 0]); // scales >= 2^8: the two-step exact decode
    big.hw.scale = big.hw.scale!.map((s, i) => (i % 2 ? s * 1e5 : s));
    for (let r = 0; r < N; r++) for (let k = 0; k < K; k++) big.dense[r * K + k] = fp8Decode(big.hw.data[r * K + k]!) * big.hw.scale[Math.floor(r / 128) * big.hw.scaleShape![1] + Math.floor(k / 128)]!;
    return { "fp8": a, "fp8 slice": b, "fp8 unaligned slice": c, "fp8 large scales": big, "bf16": bf16Weight(N, K), "f16": f16Weight(N, K) };
  };

  it("linear matches the float64 formula for FP8 (aligned, sliced, unaligned, large scales) and BF16 weights", () => {
    const ctx = withIsa(isa);
    expect(ctx.isa).toBe(isa);
    expect(ctx.device).toContain(isa);
    for (const [name, { hw, dense }] of Object.entries(weights())) {
      for (const n of [1, 3, T]) {
        const y = ctx.download(ctx.linear(ctx.upload(x.subarray(0, n * K), [n, K]), ctx.weight(hw)));
        expect(maxRel(y, refLinear(x, n, dense, N, K)), `${name}, ${n} tokens`).toBeLessThan(2e-6);
      }
    }
    ctx.dispose();
  });

  it("batch invariance: a token's outputs are bit-identical alone and in batches of every size (register and tiled paths)", () => {
    const ctx = withIsa(isa);
    for (const [name, { hw }] of Object.entries(weights())) {
      const w = ctx.weight(hw);
      const all = ctx.download(ctx.linear(ctx.upload(x, [T, K]), w));
      for (const n of [1, 2, 3, 5, 6, 7, 13]) {
        const y = ctx.download(ctx.linear(ctx.upload(x.subarray((T - n) * K), [n, K]), w));
        expect(y, `${name}, the last ${n} tokens alone`).toEqual(all.subarray((T - n) * N));
      }
    }
    ctx.dispose();
  });
});

describe.each(availableIsas())("absorbed MLA (%s)", (isa) => {
  it("a token's attention output is bit-identical prefilled in a batch of 12 (fp32 wkv_b copy) and decoded alone (FP8 rows in registers)", () => {
    const ctx = withIsa(isa);
    const d = { heads: 3, nope: 16, rope: 8, v: 16, kvLora: 150, scale: 0.2 };
    const { hw } = fp8Weight(d.heads * (d.nope + d.v), d.kvLora, [0, 0]);
    const wkvB = ctx.weight(hw);
    const T = 12, qw = d.nope + d.rope;
    const q = Float32Array.from({ length: T * d.heads * qw }, randn);
    const kv = Float32Array.from({ length: T * d.kvLora }, randn);
    const pe = Float32Array.from({ length: T * d.rope }, randn);
    const meta = (pos: number[]) => ({ positions: Int32Array.from(pos), seqIdx: new Int32Array(pos.length), blockTables: Int32Array.of(0, 1, 2), maxBlocks: 3 });
    const batch = ctx.createCache(1, 3, 8, d.kvLora + d.rope, "f32");
    const all = ctx.download(
      ctx.mla(ctx.upload(q, [T, d.heads * qw]), ctx.upload(kv, [T, d.kvLora]), ctx.upload(pe, [T, d.rope]), wkvB, batch, 0, meta([...Array(T).keys()]), d),
    );
    const alone = ctx.createCache(1, 3, 8, d.kvLora + d.rope, "f32");
    for (let t = 0; t < T; t++) {
      const row = (a: Float32Array, w: number) => ctx.upload(a.slice(t * w, (t + 1) * w), [1, w]);
      const y = ctx.download(ctx.mla(row(q, d.heads * qw), row(kv, d.kvLora), row(pe, d.rope), wkvB, alone, 0, meta([t]), d));
      expect(y, `token ${t}`).toEqual(all.subarray(t * d.heads * d.v, (t + 1) * d.heads * d.v));
    }
    expect(ctx.readCache(alone, 0, 0, T)).toEqual(ctx.readCache(batch, 0, 0, T));
    ctx.dispose();
  });
});

describe("SIMD kernel choice", () => {
  it("the best ISA is the default; an unknown or unsupported one is refused by name", () => {
    const isas = availableIsas();
    expect(isas).toContain("generic");
    const ctx = new CpuContext({ threads: 1 });
    expect(ctx.isa).toBe(process.env.DS3_CPU_ISA || isas[0]);
    ctx.dispose();
    expect(() => withIsa("sse9")).toThrow(/"sse9" are not available on this machine \(available: .*generic/);
  });
});
