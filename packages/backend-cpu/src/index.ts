// @ds3/backend-cpu — the op table of the CPU backend: thin glue around the native addon.
import { createRequire } from "node:module";
import { availableParallelism, freemem, totalmem } from "node:os";
import type {
  ActDType,
  AttnMeta,
  BackendContext,
  BackendOptions,
  BackendProvider,
  Collective,
  DeviceInfo,
  ExpertSet,
  GateConfig,
  HostWeight,
  LatentCache,
  MlaDims,
  OpName,
  Precision,
  Tensor,
  Weight,
  WeightDType,
} from "@ds3/core";

interface Native {
  Context: new (o: { threads: number; actBf16: boolean; actQuant: number; isa?: string }) => NativeCtx;
  hardwareThreads: number;
  /** the kernel ISAs this build has and this CPU runs, best first, comma separated */
  isas: string;
  readBandwidth(mib: number, threads: number, reps: number): number;
}
type H = object; // opaque native handle
interface NativeCtx {
  weight(dtype: string, rows: number, cols: number, data: Uint8Array, scale?: Float32Array, sr?: number, sc?: number, or?: number, oc?: number): H;
  expertSet(list: H[][]): H;
  cache(layers: number, blocks: number, bs: number, width: number, bf16: boolean): H;
  readCache(c: H, layer: number, slot: number, count: number): Float32Array;
  embed(w: H, ids: Int32Array, vocabStart: number): Float32Array;
  rmsNorm(x: Float32Array, T: number, D: number, w: H, eps: number): Float32Array;
  linear(x: Float32Array, T: number, w: H): Float32Array;
  add(a: Float32Array, b: Float32Array): Float32Array;
  siluMul(a: Float32Array, b: Float32Array): Float32Array;
  rope(x: Float32Array, T: number, H: number, hd: number, off: number, rd: number, pos: Int32Array, inv: Float32Array, f: number): Float32Array;
  mla(...a: unknown[]): Float32Array;
  moeGate(x: Float32Array, T: number, g: H, bias: Float32Array | null, topk: number, ng: number, tg: number, sig: boolean, norm: boolean, scale: number): Float32Array;
  moeExperts(x: Float32Array, T: number, D: number, set: H, first: number, routing: Float32Array, topk: number): Float32Array;
  threads(): number;
  isa(): string;
  dispose(): void;
}

let native: Native | null = null;
let loadError: string | null = null;
function load(): Native {
  if (native) return native;
  try {
    const require = createRequire(import.meta.url);
    native = require("../build/Release/ds3_cpu.node") as Native;
    return native;
  } catch (e) {
    loadError = (e as Error).message;
    throw new Error(`@ds3/backend-cpu: native addon not built or not loadable (${loadError}); run \`pnpm --filter @ds3/backend-cpu build\``);
  }
}

class CpuTensor implements Tensor {
  constructor(
    readonly data: Float32Array,
    readonly shape: readonly number[],
  ) {}
  get rows(): number {
    return this.shape.length === 1 ? 1 : this.shape[0]!;
  }
  get cols(): number {
    return this.shape[this.shape.length - 1]!;
  }
}
class CpuWeight implements Weight {
  constructor(
    readonly h: H,
    readonly shape: readonly [number, number],
    readonly dtype: WeightDType,
  ) {}
}
class CpuExperts implements ExpertSet {
  constructor(
    readonly h: H,
    readonly first: number,
    readonly count: number,
  ) {}
}
class CpuCache implements LatentCache {
  constructor(
    readonly h: H,
    readonly layers: number,
    readonly numBlocks: number,
    readonly blockSize: number,
    readonly width: number,
    readonly dtype: ActDType,
  ) {}
}

/** the native code of each activation-quantization mode */
const ACT_QUANT_CODE: Record<Precision["actQuant"], number> = { none: 0, fp8: 1, "fp8-ue8m0": 2, "fp8-fnuz": 3 };

const t = (x: Tensor) => x as CpuTensor;
const w = (x: Weight) => x as CpuWeight;

export class CpuContext implements BackendContext {
  readonly name = "cpu";
  readonly device: string;
  readonly precision: Precision;
  /** the instruction set of this context's kernels (avx512, avx2, generic) */
  readonly isa: string;
  private n: NativeCtx;
  private coll: Collective | null;

  constructor(opts: BackendOptions = {}) {
    const nat = load();
    this.precision = { activations: "f32", cache: "f32", actQuant: "none", ...opts.precision };
    const threads = opts.threads ?? Math.max(1, availableParallelism());
    if (!Object.hasOwn(ACT_QUANT_CODE, this.precision.actQuant))
      throw new RangeError(`unknown actQuant "${String(this.precision.actQuant)}" (${Object.keys(ACT_QUANT_CODE).join(", ")})`);
    this.n = new nat.Context({
      threads,
      actBf16: this.precision.activations === "bf16",
      // fp8-fnuz: e4m3fnuz activations (max 240) and FP8 weights held as fnuz (0x80 -> 0, scales doubled), as AMD MI300 computes
      actQuant: ACT_QUANT_CODE[this.precision.actQuant],
      // the kernels' instruction set: the best this CPU runs, or DS3_CPU_ISA=avx512|avx2|generic
      isa: process.env.DS3_CPU_ISA ?? "",
    });
    this.coll = opts.collective && opts.collective.worldSize > 1 ? opts.collective : null;
    this.isa = this.n.isa();
    this.device = `cpu (${threads} threads, ${this.isa})`;
  }

  weight(hw: HostWeight): Weight {
    const [r, c] = hw.shape;
    if (hw.dtype === "f8_e4m3") {
      if (!hw.scale || !hw.scaleShape) throw new Error(`${hw.name}: FP8 weight without block scales`);
      const o = hw.scaleOrigin ?? [0, 0];
      try {
        return new CpuWeight(this.n.weight(hw.dtype, r, c, hw.data, hw.scale, hw.scaleShape[0], hw.scaleShape[1], o[0], o[1]), hw.shape, hw.dtype);
      } catch (e) {
        throw new (e instanceof RangeError ? RangeError : Error)(`${hw.name}: ${(e as Error).message}`);
      }
    }
    return new CpuWeight(this.n.weight(hw.dtype, r, c, hw.data), hw.shape, hw.dtype);
  }
  expertSet(first: number, experts: Array<{ w1: Weight; w2: Weight; w3: Weight }>): ExpertSet {
    return new CpuExperts(this.n.expertSet(experts.map((e) => [w(e.w1).h, w(e.w2).h, w(e.w3).h])), first, experts.length);
  }
  upload(data: Float32Array, shape: readonly number[]): Tensor {
    const n = shape.reduce((a, b) => a * b, 1);
    if (n !== data.length) throw new RangeError(`upload: ${data.length} values for shape [${shape.join(", ")}]`);
    return new CpuTensor(Float32Array.from(data), [...shape]);
  }
  download(x: Tensor): Float32Array {
    return t(x).data;
  }
  createCache(layers: number, numBlocks: number, blockSize: number, width: number, dtype: ActDType): LatentCache {
    return new CpuCache(this.n.cache(layers, numBlocks, blockSize, width, dtype === "bf16"), layers, numBlocks, blockSize, width, dtype);
  }
  readCache(cache: LatentCache, layer: number, slot: number, count: number): Float32Array {
    return this.n.readCache((cache as CpuCache).h, layer, slot, count);
  }
  beginStep(): void {}

  embed(table: Weight, ids: Int32Array, vocabStart: number): Tensor {
    return new CpuTensor(this.n.embed(w(table).h, ids, vocabStart), [ids.length, table.shape[1]]);
  }
  rmsNorm(x: Tensor, wt: Weight, eps: number): Tensor {
    const a = t(x);
    return new CpuTensor(this.n.rmsNorm(a.data, a.rows, a.cols, w(wt).h, eps), a.shape);
  }
  linear(x: Tensor, wt: Weight): Tensor {
    const a = t(x);
    if (a.cols !== wt.shape[1]) throw new RangeError(`linear: input width ${a.cols} != weight in-features ${wt.shape[1]}`);
    return new CpuTensor(this.n.linear(a.data, a.rows, w(wt).h), [a.rows, wt.shape[0]]);
  }
  add(a: Tensor, b: Tensor): Tensor {
    return new CpuTensor(this.n.add(t(a).data, t(b).data), a.shape);
  }
  siluMul(g: Tensor, u: Tensor): Tensor {
    return new CpuTensor(this.n.siluMul(t(g).data, t(u).data), g.shape);
  }
  concat(a: Tensor, b: Tensor): Tensor {
    const x = t(a);
    const y = t(b);
    const ca = x.cols;
    const cb = y.cols;
    const out = new Float32Array(x.rows * (ca + cb));
    for (let r = 0; r < x.rows; r++) {
      out.set(x.data.subarray(r * ca, (r + 1) * ca), r * (ca + cb));
      out.set(y.data.subarray(r * cb, (r + 1) * cb), r * (ca + cb) + ca);
    }
    return new CpuTensor(out, [x.rows, ca + cb]);
  }
  slice(a: Tensor, c0: number, c1: number): Tensor {
    const x = t(a);
    const C = x.cols;
    const out = new Float32Array(x.rows * (c1 - c0));
    for (let r = 0; r < x.rows; r++) out.set(x.data.subarray(r * C + c0, r * C + c1), r * (c1 - c0));
    return new CpuTensor(out, [x.rows, c1 - c0]);
  }
  rows(a: Tensor, rows: Int32Array): Tensor {
    const x = t(a);
    const C = x.cols;
    const out = new Float32Array(rows.length * C);
    rows.forEach((r, i) => {
      if (r < 0 || r >= x.rows) throw new RangeError(`rows: row ${r} outside [0, ${x.rows})`);
      out.set(x.data.subarray(r * C, (r + 1) * C), i * C);
    });
    return new CpuTensor(out, [rows.length, C]);
  }
  rope(x: Tensor, heads: number, headDim: number, ropeOffset: number, ropeDim: number, positions: Int32Array, invFreq: Float32Array, attnFactor: number): Tensor {
    const a = t(x);
    return new CpuTensor(this.n.rope(a.data, a.rows, heads, headDim, ropeOffset, ropeDim, positions, invFreq, attnFactor), a.shape);
  }
  mla(q: Tensor, kv: Tensor, pe: Tensor, wkvB: Weight, cache: LatentCache, layer: number, m: AttnMeta, d: MlaDims): Tensor {
    const T = t(q).rows;
    const y = this.n.mla(
      t(q).data, t(kv).data, t(pe).data, T, w(wkvB).h, (cache as CpuCache).h, layer,
      m.positions, m.seqIdx, m.blockTables, m.maxBlocks, d.heads, d.nope, d.rope, d.v, d.kvLora, d.scale,
    );
    return new CpuTensor(y, [T, d.heads * d.v]);
  }
  moeGate(x: Tensor, gate: Weight, bias: Float32Array | null, c: GateConfig): Tensor {
    const a = t(x);
    const y = this.n.moeGate(a.data, a.rows, w(gate).h, bias, c.topk, c.nGroups, c.topkGroups, c.scoreFunc === "sigmoid", c.normTopk, c.routeScale);
    return new CpuTensor(y, [a.rows, 2 * c.topk]);
  }
  moeExperts(x: Tensor, experts: ExpertSet, routing: Tensor, topk: number): Tensor {
    const a = t(x);
    const e = experts as CpuExperts;
    return new CpuTensor(this.n.moeExperts(a.data, a.rows, a.cols, e.h, e.first, t(routing).data, topk), a.shape);
  }
  allReduce(x: Tensor): Tensor {
    if (!this.coll) return x;
    const a = t(x);
    return new CpuTensor(this.coll.allReduceSum(a.data), a.shape);
  }
  allGatherCols(x: Tensor): Tensor {
    if (!this.coll) return x;
    const a = t(x);
    const out = this.coll.allGatherCols(a.data, a.rows);
    return new CpuTensor(out, [a.rows, out.length / a.rows]);
  }
  dispose(): void {
    this.n.dispose();
  }
}

/**
 * Streaming-read bandwidth of this machine in bytes/s (best of `reps` sums over a `mib` MiB
 * buffer on `threads` threads): the memory roofline a weight-streaming decode step is bounded by.
 */
/** The kernel instruction sets this build has and this CPU runs, best first. */
export function availableIsas(): string[] {
  return load().isas.split(",").filter(Boolean);
}

export function readBandwidth(opts: { mib?: number; threads?: number; reps?: number } = {}): number {
  return load().readBandwidth(opts.mib ?? 1024, opts.threads ?? Math.max(1, availableParallelism()), opts.reps ?? 5);
}

export const cpu: BackendProvider = {
  name: "cpu",
  /** the backend contract this implements (BACKEND_API_VERSION of @ds3/core) */
  apiVersion: 2,
  entry: import.meta.url,
  available() {
    try {
      const n = load();
      return { ok: true, devices: [`cpu (${n.hardwareThreads} hardware threads)`] };
    } catch (e) {
      return { ok: false, reason: (e as Error).message };
    }
  },
  /** one device, the host: ranks share it (they split its threads and meet in shared memory) */
  devices(): DeviceInfo[] {
    let n: Native;
    try {
      n = load();
    } catch {
      return [];
    }
    return [{ index: 0, name: `cpu (${n.hardwareThreads} hardware threads, ${n.isas.split(",")[0] || "generic"})`, memoryTotal: totalmem(), memoryFree: freemem(), shareable: true }];
  },
  /** every op at every precision of the contract but `sample` (rank 0 samples on the host) */
  supports(op: OpName, p: Precision): boolean {
    if (op === "sample") return false;
    return (p.activations === "f32" || p.activations === "bf16") && (p.cache === "f32" || p.cache === "bf16") && Object.hasOwn(ACT_QUANT_CODE, p.actQuant);
  },
  create(opts?: BackendOptions) {
    return new CpuContext(opts);
  },
};

export default cpu;
