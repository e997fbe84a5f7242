// Inputs and float64 references shared by the exact and the precision checks of the conformance
// suite (conformance.ts, conformance-precision.ts).
import type { HostWeight, OpName, PrecisionName } from "./backend.js";
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
