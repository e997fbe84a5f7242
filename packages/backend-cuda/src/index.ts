// @ds3/backend-cuda — the op table of the CUDA backend: thin glue around the native addon.
// Tensors live on the GPU in a per-step arena: a tensor is valid until the next beginStep().
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type {
  ActDType,
  AttnMeta,
  BackendContext,
  BackendOptions,
  BackendProvider,
  Collective,
  ExpertSet,
  GateConfig,
  HostWeight,
  LatentCache,
  MlaDims,
  Precision,
  Tensor,
  Weight,
  WeightDType,
  DeviceInfo,
  OpName,
} from "@ds3/core";
import type { GemvTuning, GraphStats, Native, NativeCtx, ProfileEntry, ProbeResult } from "./native.js";

export type { GemvTuning, GraphStats, ProfileEntry, ProbeResult } from "./native.js";
export { SyntheticSource, type SyntheticHostWeight } from "./synthetic.js";

let native: Native | null = null;
let loadError: string | null = null;

/** Where the addon may be: $DS3_CUDA_ADDON, next to dist/ or src/ (package), next to a bundle in build/<dir>/. */
function candidates(): string[] {
  const here = dirname(fileURLToPath(import.meta.url));
  const list = [
    process.env.DS3_CUDA_ADDON ?? "",
    join(here, "../build/Release/ds3_cuda.node"),
    join(here, "../Release/ds3_cuda.node"),
    join(here, "ds3_cuda.node"),
  ];
  return list.filter((p) => p !== "");
}

function load(): Native {
  if (native) return native;
  if (loadError) throw new Error(loadError);
  const require = createRequire(import.meta.url);
  const tried: string[] = [];
  for (const p of candidates()) {
    if (!existsSync(p)) {
      tried.push(`${p} (missing)`);
      continue;
    }
    try {
      native = require(p) as Native;
      return native;
    } catch (e) {
      tried.push(`${p} (${(e as Error).message})`);
    }
  }
  loadError = `@ds3/backend-cuda: native addon not built or not loadable; run \`pnpm --filter @ds3/backend-cuda build\` (tried: ${tried.join("; ")})`;
  throw new Error(loadError);
}

class CudaTensor implements Tensor {
  constructor(
    readonly ptr: number,
    readonly shape: readonly number[],
    readonly gen: number,
  ) {}
  get rows(): number {
    return this.shape.length === 1 ? 1 : this.shape.slice(0, -1).reduce((a, b) => a * b, 1);
  }
  get cols(): number {
    return this.shape[this.shape.length - 1]!;
  }
}
class CudaWeight implements Weight {
  constructor(
    readonly id: number,
    readonly shape: readonly [number, number],
    readonly dtype: WeightDType,
    /** bytes on the device (data + scales) */
    readonly bytes: number,
  ) {}
}
class CudaExperts implements ExpertSet {
  constructor(
    readonly id: number,
    readonly first: number,
    readonly count: number,
    readonly bytesPerExpert: number,
  ) {}
}
class CudaCache implements LatentCache {
  constructor(
    readonly id: number,
    readonly layers: number,
    readonly numBlocks: number,
    readonly blockSize: number,
    readonly width: number,
    readonly dtype: ActDType,
  ) {}
}

function sameI32(a: Int32Array, b: Int32Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}
function sameF32(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return false;
  return true;
}

export interface CudaBackendOptions extends BackendOptions {
  /**
   * Capture repeated step segments (decode steps per batch size) as CUDA graphs and replay them
   * (default: on; $DS3_CUDA_GRAPHS=0 turns it off). Results are identical either way.
   */
  graphs?: boolean;
  /** collectives through NCCL when the addon has it and there is more than one rank (default: on; $DS3_NCCL=0: host) */
  nccl?: boolean;
}

/** Device sampling parameters of one row (the subset of SamplingParams the device implements). */
export interface DeviceSampling {
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
}

function envFlag(name: string): boolean | undefined {
  const v = process.env[name];
  if (v === undefined || v === "") return undefined;
  return !(v === "0" || v.toLowerCase() === "false" || v.toLowerCase() === "off");
}

export class CudaContext implements BackendContext {
  readonly name = "cuda";
  readonly device: string;
  readonly precision: Precision;
  private n: NativeCtx;
  private coll: Collective | null;
  private gen = 1;
  private i32 = new WeakMap<Int32Array, { gen: number; ptr: number; copy: Int32Array }>();
  private f32 = new WeakMap<Float32Array, { ptr: number; copy: Float32Array }>();
  private checked: { gen: number; pos: number; seq: number; bt: number; cache: number; maxPos: number } | null = null;
  /** bytes of all weights on the device */
  weightBytes = 0;

  /** collectives run through NCCL (ncclInit done) */
  private ncclOn = false;
  /** NCCL version compiled into the addon (0: none) */
  readonly ncclVersion: number;

  constructor(opts: CudaBackendOptions = {}) {
    const nat = load();
    const pr = nat.probe();
    if (!pr.ok) throw new Error(pr.reason ?? "CUDA not available");
    this.precision = { activations: "f32", cache: "f32", actQuant: "none", ...opts.precision };
    const dev = opts.device ?? 0;
    this.n = new nat.Context({
      device: dev,
      actBf16: this.precision.activations === "bf16",
      actQuant: this.precision.actQuant === "fp8" ? 1 : this.precision.actQuant === "fp8-ue8m0" ? 2 : 0,
      graphs: opts.graphs ?? envFlag("DS3_CUDA_GRAPHS") ?? true,
    });
    this.coll = opts.collective && opts.collective.worldSize > 1 ? opts.collective : null;
    this.device = pr.devices?.find((d) => d.startsWith(`cuda:${dev} `)) ?? `cuda:${dev}`;
    this.ncclVersion = nat.nccl ?? 0;
    if (this.coll && this.ncclVersion > 0 && opts.deviceCollectives !== false && (opts.nccl ?? envFlag("DS3_NCCL") ?? true)) {
      // rank 0 makes the unique id; the host collective broadcasts its bytes to every rank
      const c = this.coll;
      const id = c.broadcast(c.rank === 0 ? this.n.ncclUniqueId() : undefined);
      this.initNccl(id, c.rank, c.worldSize);
    }
  }

  /** join an NCCL communicator (every rank calls it with the same id); collectives then run on the device */
  initNccl(id: Uint8Array, rank: number, worldSize: number): { version: number; rank: number; worldSize: number } {
    const r = this.n.ncclInit(id, rank, worldSize);
    this.ncclOn = true;
    this.ncclWorld = worldSize;
    return r;
  }
  /** a fresh NCCL unique id (rank 0) */
  ncclUniqueId(): Uint8Array {
    return this.n.ncclUniqueId();
  }
  private ncclWorld = 1;

  // ---- helpers ----------------------------------------------------------------------------------
  private t(x: Tensor, what: string): CudaTensor {
    const c = x as CudaTensor;
    if (!(c instanceof CudaTensor)) throw new TypeError(`${what}: not a CUDA tensor`);
    if (c.gen !== this.gen) throw new Error(`${what}: tensor from an earlier step (beginStep() released it)`);
    return c;
  }
  private w(x: Weight): CudaWeight {
    if (!(x instanceof CudaWeight)) throw new TypeError("not a CUDA weight");
    return x;
  }
  private out(ptr: number, shape: readonly number[]): CudaTensor {
    return new CudaTensor(ptr, shape, this.gen);
  }
  /** device copy of a host Int32Array for this step (uploaded once per step and content) */
  private devI32(a: Int32Array): number {
    const e = this.i32.get(a);
    if (e && e.gen === this.gen && sameI32(e.copy, a)) return e.ptr;
    const ptr = this.n.uploadI32(a);
    this.i32.set(a, { gen: this.gen, ptr, copy: a.slice() });
    return ptr;
  }
  /** device copy of a constant Float32Array (rope frequencies, gate biases), kept for the context's life */
  private devConst(a: Float32Array): number {
    const e = this.f32.get(a);
    if (e && sameF32(e.copy, a)) return e.ptr;
    const ptr = this.n.persist(a);
    this.f32.set(a, { ptr, copy: a.slice() });
    return ptr;
  }

  // ---- memory -------------------------------------------------------------------------------------
  weight(hw: HostWeight): Weight {
    const [r, c] = hw.shape;
    const init = (hw as HostWeight & { init?: { seed: number; amp: number } }).init;
    let nw;
    if (hw.data.byteLength === 0 && init) {
      nw = this.n.weight(hw.dtype, r, c, null, null, 0, 0, 0, 0, init.seed, init.amp);
    } else if (hw.dtype === "f8_e4m3") {
      if (!hw.scale || !hw.scaleShape) throw new Error(`${hw.name}: FP8 weight without block scales`);
      const o = hw.scaleOrigin ?? [0, 0];
      nw = this.n.weight(hw.dtype, r, c, hw.data, hw.scale, hw.scaleShape[0], hw.scaleShape[1], o[0], o[1], 0, 0);
    } else {
      nw = this.n.weight(hw.dtype, r, c, hw.data, null, 0, 0, 0, 0, 0, 0);
    }
    this.weightBytes += nw.bytes;
    return new CudaWeight(nw.id, hw.shape, hw.dtype, nw.bytes);
  }
  expertSet(first: number, experts: Array<{ w1: Weight; w2: Weight; w3: Weight }>): ExpertSet {
    const ids = new Int32Array(experts.length * 3);
    experts.forEach((e, i) => {
      ids[3 * i] = this.w(e.w1).id;
      ids[3 * i + 1] = this.w(e.w2).id;
      ids[3 * i + 2] = this.w(e.w3).id;
    });
    const e0 = experts[0];
    const per = e0 ? this.w(e0.w1).bytes + this.w(e0.w2).bytes + this.w(e0.w3).bytes : 0;
    return new CudaExperts(this.n.expertSet(ids), first, experts.length, per);
  }
  upload(data: Float32Array, shape: readonly number[]): Tensor {
    const n = shape.reduce((a, b) => a * b, 1);
    if (n !== data.length) throw new RangeError(`upload: ${data.length} values for shape [${shape.join(", ")}]`);
    return this.out(this.n.upload(data), [...shape]);
  }
  download(x: Tensor): Float32Array {
    const a = this.t(x, "download");
    return this.n.download(a.ptr, a.rows * a.cols);
  }
  createCache(layers: number, numBlocks: number, blockSize: number, width: number, dtype: ActDType): LatentCache {
    return new CudaCache(this.n.cache(layers, numBlocks, blockSize, width, dtype === "bf16"), layers, numBlocks, blockSize, width, dtype);
  }
  readCache(cache: LatentCache, layer: number, slot: number, count: number): Float32Array {
    return this.n.readCache((cache as CudaCache).id, layer, slot, count);
  }
  beginStep(): void {
    this.n.beginStep();
    this.gen++;
    this.checked = null;
  }

  // ---- ops ------------------------------------------------------------------------------------------
  embed(table: Weight, ids: Int32Array, vocabStart: number): Tensor {
    const w = this.w(table);
    return this.out(this.n.embed(w.id, this.devI32(ids), ids.length, vocabStart), [ids.length, w.shape[1]]);
  }
  rmsNorm(x: Tensor, wt: Weight, eps: number): Tensor {
    const a = this.t(x, "rmsNorm");
    return this.out(this.n.rmsNorm(a.ptr, a.rows, a.cols, this.w(wt).id, eps), a.shape);
  }
  linear(x: Tensor, wt: Weight): Tensor {
    const a = this.t(x, "linear");
    const w = this.w(wt);
    if (a.cols !== w.shape[1]) throw new RangeError(`linear: input width ${a.cols} != weight in-features ${w.shape[1]}`);
    return this.out(this.n.linear(a.ptr, a.rows, a.cols, w.id), [a.rows, w.shape[0]]);
  }
  add(x: Tensor, y: Tensor): Tensor {
    const a = this.t(x, "add");
    const b = this.t(y, "add");
    if (a.rows * a.cols !== b.rows * b.cols) throw new RangeError(`add: shapes [${a.shape}] and [${b.shape}] differ`);
    return this.out(this.n.add(a.ptr, b.ptr, a.rows * a.cols), a.shape);
  }
  siluMul(g: Tensor, u: Tensor): Tensor {
    const a = this.t(g, "siluMul");
    const b = this.t(u, "siluMul");
    if (a.rows * a.cols !== b.rows * b.cols) throw new RangeError(`siluMul: shapes [${a.shape}] and [${b.shape}] differ`);
    return this.out(this.n.siluMul(a.ptr, b.ptr, a.rows * a.cols), a.shape);
  }
  concat(x: Tensor, y: Tensor): Tensor {
    const a = this.t(x, "concat");
    const b = this.t(y, "concat");
    if (a.rows !== b.rows) throw new RangeError(`concat: ${a.rows} rows and ${b.rows} rows`);
    return this.out(this.n.concat(a.ptr, b.ptr, a.rows, a.cols, b.cols), [a.rows, a.cols + b.cols]);
  }
  slice(x: Tensor, c0: number, c1: number): Tensor {
    const a = this.t(x, "slice");
    if (!(c0 >= 0 && c1 <= a.cols && c0 <= c1)) throw new RangeError(`slice [${c0}, ${c1}) of ${a.cols} columns`);
    return this.out(this.n.slice(a.ptr, a.rows, a.cols, c0, c1), [a.rows, c1 - c0]);
  }
  rows(x: Tensor, rows: Int32Array): Tensor {
    const a = this.t(x, "rows");
    for (let i = 0; i < rows.length; i++) {
      const r = rows[i]!;
      if (!(r >= 0 && r < a.rows)) throw new RangeError(`rows: row ${r} outside [0, ${a.rows})`);
    }
    return this.out(this.n.rows(a.ptr, a.cols, this.devI32(rows), rows.length), [rows.length, a.cols]);
  }
  rope(x: Tensor, heads: number, headDim: number, ropeOffset: number, ropeDim: number, positions: Int32Array, invFreq: Float32Array, attnFactor: number): Tensor {
    const a = this.t(x, "rope");
    if (heads * headDim !== a.cols) throw new RangeError(`rope: ${heads} heads x ${headDim} != ${a.cols} columns`);
    if (positions.length !== a.rows) throw new RangeError(`rope: ${positions.length} positions for ${a.rows} rows`);
    if (ropeOffset + ropeDim > headDim || ropeDim % 2 !== 0 || invFreq.length < ropeDim / 2) throw new RangeError("rope: bad rotary span");
    return this.out(
      this.n.rope(a.ptr, a.rows, heads, headDim, ropeOffset, ropeDim, this.devI32(positions), this.devConst(invFreq), attnFactor),
      a.shape,
    );
  }
  mla(q: Tensor, kv: Tensor, pe: Tensor, wkvB: Weight, cache: LatentCache, layer: number, m: AttnMeta, d: MlaDims): Tensor {
    const a = this.t(q, "mla q");
    const b = this.t(kv, "mla kv");
    const c = this.t(pe, "mla pe");
    const cc = cache as CudaCache;
    const T = a.rows;
    if (b.rows !== T || c.rows !== T || b.cols !== d.kvLora || c.cols !== d.rope || a.cols !== d.heads * (d.nope + d.rope))
      throw new RangeError("mla: q/kv/pe shapes disagree with the dims");
    if (m.positions.length < T || m.seqIdx.length < T) throw new RangeError("mla: meta shorter than the step");
    const pos = this.devI32(m.positions);
    const seq = this.devI32(m.seqIdx);
    const bt = this.devI32(m.blockTables);
    let maxPos: number;
    const ck = this.checked;
    if (ck && ck.gen === this.gen && ck.pos === pos && ck.seq === seq && ck.bt === bt && ck.cache === cc.id) {
      maxPos = ck.maxPos;
    } else {
      maxPos = 0;
      for (let t = 0; t < T; t++) {
        const s = m.seqIdx[t]!;
        const p = m.positions[t]!;
        if (p < 0 || Math.floor(p / cc.blockSize) >= m.maxBlocks || s < 0 || (s + 1) * m.maxBlocks > m.blockTables.length)
          throw new RangeError(`mla: token ${t} (sequence ${s}, position ${p}) is outside its block table`);
        for (let j = 0; j <= Math.floor(p / cc.blockSize); j++) {
          const blk = m.blockTables[s * m.maxBlocks + j]!;
          if (blk < 0 || blk >= cc.numBlocks) throw new RangeError(`mla: block table of sequence ${s} names block ${blk}, outside the cache`);
        }
        if (p > maxPos) maxPos = p;
      }
      this.checked = { gen: this.gen, pos, seq, bt, cache: cc.id, maxPos };
    }
    const y = this.n.mla(a.ptr, b.ptr, c.ptr, T, this.w(wkvB).id, cc.id, layer, pos, seq, bt, m.maxBlocks, maxPos, d.heads, d.nope, d.rope, d.v, d.kvLora, d.scale);
    return this.out(y, [T, d.heads * d.v]);
  }
  moeGate(x: Tensor, gate: Weight, bias: Float32Array | null, c: GateConfig): Tensor {
    const a = this.t(x, "moeGate");
    const y = this.n.moeGate(a.ptr, a.rows, this.w(gate).id, bias ? this.devConst(bias) : 0, c.topk, c.nGroups, c.topkGroups, c.scoreFunc === "sigmoid", c.normTopk, c.routeScale);
    return this.out(y, [a.rows, 2 * c.topk]);
  }
  moeExperts(x: Tensor, experts: ExpertSet, routing: Tensor, topk: number): Tensor {
    const a = this.t(x, "moeExperts");
    const r = this.t(routing, "moeExperts routing");
    const e = experts as CudaExperts;
    return this.out(this.n.moeExperts(a.ptr, a.rows, a.cols, e.id, e.first, r.ptr, topk), a.shape);
  }
  allReduce(x: Tensor): Tensor {
    if (this.ncclOn) {
      const a = this.t(x, "allReduce");
      return this.out(this.n.allReduce(a.ptr, a.rows * a.cols), a.shape);
    }
    if (!this.coll) return x;
    const a = this.t(x, "allReduce");
    const sum = this.coll.allReduceSum(this.n.download(a.ptr, a.rows * a.cols));
    return this.out(this.n.upload(sum), a.shape);
  }
  allGatherCols(x: Tensor): Tensor {
    if (this.ncclOn) {
      const a = this.t(x, "allGatherCols");
      return this.out(this.n.allGather(a.ptr, a.rows, a.cols), [a.rows, a.cols * this.ncclWorld]);
    }
    if (!this.coll) return x;
    const a = this.t(x, "allGatherCols");
    const all = this.coll.allGatherCols(this.n.download(a.ptr, a.rows * a.cols), a.rows);
    return this.out(this.n.upload(all), [a.rows, all.length / a.rows]);
  }
  dispose(): void {
    this.n.dispose();
  }

  // ---- extras (not in the op contract): device sampling, benchmarks, profiling ------------------------
  /** greedy ids of each row, computed on the device (only the ids cross back) */
  argmax(x: Tensor): Int32Array {
    const a = this.t(x, "argmax");
    return this.n.argmax(a.ptr, a.rows, a.cols);
  }
  /**
   * Sample one id per row on the device (temperature, top-k, top-p, min-p with the semantics and walk
   * order of @ds3/core's Sampler; penalties and masks are not applied here). `u` holds one uniform draw
   * in [0, 1) per row (an Rng's next()); rows at temperature < 1e-5 are greedy and ignore it. Returns the
   * ids and the log-softmax of the raw logits at each id; only these cross back.
   */
  sample(x: Tensor, params: DeviceSampling | DeviceSampling[], u: Float64Array): { ids: Int32Array; logprobs: Float32Array } {
    const a = this.t(x, "sample");
    const T = a.rows;
    if (u.length < T) throw new RangeError(`sample: ${u.length} draws for ${T} rows`);
    const p = new Float64Array(4 * T);
    for (let r = 0; r < T; r++) {
      const q = Array.isArray(params) ? params[r] : params;
      if (!q) throw new RangeError(`sample: no parameters for row ${r}`);
      const { temperature = 1, topK = 0, topP = 1, minP = 0 } = q;
      if (!(temperature >= 0) || !(topP > 0 && topP <= 1) || !(minP >= 0 && minP <= 1) || !Number.isInteger(topK) || topK < -1)
        throw new RangeError(`sample: bad parameters for row ${r}: ${JSON.stringify(q)}`);
      p.set([temperature, topK, topP, minP], 4 * r);
    }
    const r = this.n.sample(a.ptr, T, a.cols, this.n.upload(p), this.n.upload(u.subarray(0, T)));
    for (let i = 0; i < T; i++)
      if (r.ids[i]! < 0) throw new Error(`sample: row ${i} has no token to sample (NaN or +Infinity logits, or all -Infinity)`);
    return r;
  }
  /** CUDA graphs of repeated step segments on or off (results are identical either way) */
  setGraphs(on: boolean, opts?: { earlyLaunch?: boolean; minOps?: number }): void {
    this.n.setGraphs(on, opts);
  }
  graphStats(): GraphStats {
    return this.n.graphStats();
  }
  /** GEMV launch heuristics (benchmarks compare them); returns the settings in force */
  tune(t?: Partial<GemvTuning>): GemvTuning {
    return this.n.tune(t);
  }
  /** fill a cache with uniform noise in [-1, 1) (benchmarks at a given context without a prefill) */
  fillCacheRandom(cache: LatentCache, seed: number): void {
    this.n.fillCacheRandom((cache as CudaCache).id, seed);
  }
  /** record CUDA events around every op from now on (true) or stop (false); both clear the record */
  profile(on: boolean): void {
    this.n.profile(on);
  }
  /** per-op device time since profile(true), summed by op name and path */
  profileReport(): ProfileEntry[] {
    return this.n.profileReport();
  }
  /** wait for the device */
  sync(): void {
    this.n.sync();
  }
  memInfo(): { free: number; total: number; arena: number; arenaPeak: number } {
    return this.n.memInfo();
  }
}

/** Probe the driver and devices without creating a context. */
export function probe(): ProbeResult {
  let nat: Native;
  try {
    nat = load();
  } catch (e) {
    return { ok: false, reason: `CUDA not available: ${(e as Error).message}` };
  }
  try {
    return nat.probe();
  } catch (e) {
    return { ok: false, reason: `CUDA not available: ${(e as Error).message}` };
  }
}

export function createCudaBackend(opts?: BackendOptions): CudaContext {
  return new CudaContext(opts);
}

/**
 * The probe's devices as DeviceInfo. The CUDA runtime applies CUDA_VISIBLE_DEVICES itself: the
 * indices here are the visible devices, renumbered from 0, which is what `device` takes. Free
 * memory needs a context on each device, so it is NaN here (unknown).
 */
export function cudaDevices(p: ProbeResult = probe()): DeviceInfo[] {
  if (!p.ok) return [];
  return (p.devices ?? []).map((d, i) => {
    const m = /^cuda:(\d+) (.*?) \(.*?([\d.]+) GiB/.exec(d);
    return { index: m ? Number(m[1]) : i, name: m ? m[2]! : d, memoryTotal: m ? Math.round(Number(m[3]) * 2 ** 30) : NaN, memoryFree: NaN };
  });
}

export const cuda: BackendProvider = {
  name: "cuda",
  /** the backend contract this implements (BACKEND_API_VERSION of @ds3/core) */
  apiVersion: 2,
  entry: import.meta.url,
  available() {
    const p = probe();
    return p.ok ? { ok: true, devices: p.devices ?? [] } : { ok: false, reason: p.reason ?? "CUDA not available" };
  },
  devices() {
    return cudaDevices();
  },
  /** every op of the contract, `sample` included, at every precision of the contract */
  supports(_op: OpName, p: Precision) {
    return (p.activations === "f32" || p.activations === "bf16") && (p.cache === "f32" || p.cache === "bf16") && ["none", "fp8", "fp8-ue8m0"].includes(p.actQuant);
  },
  create(opts?: BackendOptions) {
    return new CudaContext(opts);
  },
};

export default cuda;
