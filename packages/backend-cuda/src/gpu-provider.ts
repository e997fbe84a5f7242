// The GPU backends' TypeScript layer, written once: the op table around the native addon that
// nvcc builds for NVIDIA (ds3_cuda.node, @ds3/backend-cuda) and hipcc builds for AMD (ds3_rocm.node,
// @ds3/backend-rocm) from the same kernel sources, with the same native surface (native.ts). What
// differs between the two is data, in a `GpuVendor`: the addon's name and where to look for it, the
// words in messages, how a device string reads, and which precisions a device runs.
// Published as `@ds3/backend-cuda/gpu`. Tensors live on the device in a per-step arena: a tensor is
// valid until the next beginStep().
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
import type { GemvTuning, GraphStats, Native, NativeCtx, ProbeResult, ProfileEntry } from "./native.js";

export type { GemvTuning, GraphStats, Native, NativeCtx, ProbeResult, ProfileEntry } from "./native.js";
export { SyntheticSource, type SyntheticHostWeight } from "./synthetic.js";

/** One device as the addon's probe names it, with what the TS layer needs to know of it. */
export interface GpuDevice extends DeviceInfo {
  /** the probe's line, e.g. "cuda:0 NVIDIA H100 80GB HBM3 (compute capability 9.0, 79.1 GiB, 132 SMs)" */
  label: string;
  /** the device's architecture: "sm_90" (CUDA), "gfx942" (ROCm); "" when the probe does not say */
  arch: string;
}

/** What differs between the GPU vendors; everything else is GpuContext / gpuBackend. */
export interface GpuVendor {
  /** provider and context name, and the device prefix of the probe's lines: "cuda", "rocm" */
  readonly name: string;
  /** the platform's name in messages: reasons read "<label> not available: ..." */
  readonly label: string;
  /** the package, in messages ("run `pnpm --filter <pkg> build`") */
  readonly pkg: string;
  /** the addon's file name (ds3_cuda.node) */
  readonly addon: string;
  /** environment variable that names the addon's path (DS3_CUDA_ADDON) */
  readonly addonEnv: string;
  /** import.meta.url of the vendor's module: the addon is looked for next to it (see candidates()) */
  readonly base: string;
  /** environment variable that turns device graphs off ("0") (DS3_CUDA_GRAPHS) */
  readonly graphsEnv: string;
  /** the variable that turns the device collectives (NCCL, RCCL) off: DS3_NCCL, DS3_RCCL */
  readonly collEnv: string;
  /** a probe line as a device (index: what BackendOptions.device takes) */
  device(line: string, i: number): GpuDevice;
  /**
   * null when device `d` runs every op at `p`, or why not (one sentence naming the device and the
   * mode). `d` is null when the vendor's precisions do not depend on the device (`perDevice` unset):
   * then supports() answers without probing, whether or not a device is there.
   */
  precisionError(d: GpuDevice | null, p: Precision): string | null;
  /** the precisions differ between this vendor's devices (ROCm: gfx90a / gfx942 / gfx950) */
  readonly perDevice?: boolean;
  /** a device the addon has no code for (e.g. a gfx target it was not compiled for), or null */
  deviceError?(d: GpuDevice, nat: Native): string | null;
  /** what the user can do about a probe's "not available" reason (appended in parentheses), or null */
  hint?(reason: string): string | null;
}

/** the native code of each activation-quantization mode (the same for every build of the addon) */
export const ACT_QUANT_CODE: Readonly<Record<Precision["actQuant"], number>> = { none: 0, fp8: 1, "fp8-ue8m0": 2, "fp8-fnuz": 3 };

/** "<n> GiB" in a probe line, in bytes (NaN when absent) */
export function gibOf(line: string): number {
  const m = /([\d.]+) GiB/.exec(line);
  return m ? Math.round(Number(m[1]) * 2 ** 30) : NaN;
}

class GpuTensor implements Tensor {
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
class GpuWeight implements Weight {
  constructor(
    readonly id: number,
    readonly shape: readonly [number, number],
    readonly dtype: WeightDType,
    /** bytes on the device (data + scales) */
    readonly bytes: number,
  ) {}
}
class GpuExperts implements ExpertSet {
  constructor(
    readonly id: number,
    readonly first: number,
    readonly count: number,
    readonly bytesPerExpert: number,
  ) {}
}
class GpuCache implements LatentCache {
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

export interface GpuBackendOptions extends BackendOptions {
  /**
   * Capture repeated step segments (decode steps per batch size) as device graphs (CUDA graphs, HIP
   * graphs) and replay them (default: on; the vendor's graphs variable = 0 turns it off). Results are
   * identical either way.
   */
  graphs?: boolean;
  /** collectives through NCCL/RCCL when the addon has it and there is more than one rank (default: on; $DS3_NCCL=0 / $DS3_RCCL=0: host) */
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

/** Where the addon may be: $<addonEnv>, next to dist/ or src/ (package), next to a bundle in build/<dir>/. */
function candidates(v: GpuVendor): string[] {
  const here = dirname(fileURLToPath(v.base));
  const list = [process.env[v.addonEnv] ?? "", join(here, "../build/Release", v.addon), join(here, "../Release", v.addon), join(here, v.addon)];
  return list.filter((p) => p !== "");
}

/** a probe's "not available" reason with the vendor's hint, as available() and create() both give it */
function withHint(v: GpuVendor, reason: string | undefined): string {
  const r = reason ?? `${v.label} not available`;
  const h = v.hint?.(r);
  return h ? `${r} (${h})` : r;
}

/** The addon (loaded once per vendor), or the reason it cannot be loaded. */
export type NativeLoader = () => Native;

function addonLoader(v: GpuVendor): NativeLoader {
  let native: Native | null = null;
  let loadError: string | null = null;
  return () => {
    if (native) return native;
    if (loadError) throw new Error(loadError);
    const require = createRequire(v.base);
    const tried: string[] = [];
    for (const p of candidates(v)) {
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
    loadError = `${v.pkg}: native addon not built or not loadable; run \`pnpm --filter ${v.pkg} build\` (tried: ${tried.join("; ")})`;
    throw new Error(loadError);
  };
}

/** The op table of a GPU backend: the contract's ops, each a call into the addon. */
export class GpuContext implements BackendContext {
  readonly name: string;
  readonly device: string;
  readonly precision: Precision;
  /** the device this context runs on, as its provider's devices() lists it */
  readonly gpu: GpuDevice;
  private n: NativeCtx;
  private coll: Collective | null;
  private gen = 1;
  private i32 = new WeakMap<Int32Array, { gen: number; ptr: number; copy: Int32Array }>();
  private f32 = new WeakMap<Float32Array, { ptr: number; copy: Float32Array }>();
  private checked: { gen: number; pos: number; seq: number; bt: number; cache: number; maxPos: number } | null = null;
  private readonly label: string;
  /** bytes of all weights on the device */
  weightBytes = 0;

  /** collectives run through NCCL/RCCL (ncclInit done) */
  private ncclOn = false;
  private ncclWorld = 1;
  /** NCCL (CUDA) or RCCL (ROCm) version compiled into the addon (0: none) */
  readonly ncclVersion: number;

  constructor(vendor: GpuVendor, opts: GpuBackendOptions = {}, loadNative: NativeLoader = loaderOf(vendor)) {
    this.name = vendor.name;
    this.label = vendor.label;
    // the same reason available() gives, whether the addon is missing, a stub, or finds no device
    let nat: Native;
    try {
      nat = loadNative();
    } catch (e) {
      throw new Error(`${vendor.label} not available: ${(e as Error).message}`);
    }
    const pr = nat.probe();
    if (!pr.ok) throw new Error(withHint(vendor, pr.reason));
    this.precision = { activations: "f32", cache: "f32", actQuant: "none", ...opts.precision };
    const devs = (pr.devices ?? []).map((l, i) => vendor.device(l, i));
    const dev = opts.device ?? 0;
    const d = devs.find((x) => x.index === dev);
    if (!d) throw new RangeError(`${vendor.name}: no device ${dev} (devices: ${devs.map((x) => x.label).join("; ") || "none"})`);
    const why = vendor.deviceError?.(d, nat) ?? vendor.precisionError(d, this.precision);
    if (why) throw new Error(why);
    this.gpu = d;
    this.n = new nat.Context({
      device: dev,
      actBf16: this.precision.activations === "bf16",
      actQuant: ACT_QUANT_CODE[this.precision.actQuant],
      graphs: opts.graphs ?? envFlag(vendor.graphsEnv) ?? true,
    });
    this.coll = opts.collective && opts.collective.worldSize > 1 ? opts.collective : null;
    this.device = d.label;
    this.ncclVersion = nat.nccl ?? 0;
    if (this.coll && this.ncclVersion > 0 && opts.deviceCollectives !== false && (opts.nccl ?? envFlag(vendor.collEnv) ?? true)) {
      // rank 0 makes the unique id; the host collective broadcasts its bytes to every rank
      const c = this.coll;
      const id = c.broadcast(c.rank === 0 ? this.n.ncclUniqueId() : undefined);
      this.initNccl(id, c.rank, c.worldSize);
    }
  }

  /** join an NCCL/RCCL communicator (every rank calls it with the same id); collectives then run on the device */
  initNccl(id: Uint8Array, rank: number, worldSize: number): { version: number; rank: number; worldSize: number } {
    const r = this.n.ncclInit(id, rank, worldSize);
    this.ncclOn = true;
    this.ncclWorld = worldSize;
    return r;
  }
  /** a fresh NCCL/RCCL unique id (rank 0) */
  ncclUniqueId(): Uint8Array {
    return this.n.ncclUniqueId();
  }

  // ---- helpers ----------------------------------------------------------------------------------
  private t(x: Tensor, what: string): GpuTensor {
    const c = x as GpuTensor;
    if (!(c instanceof GpuTensor)) throw new TypeError(`${what}: not a ${this.label} tensor`);
    if (c.gen !== this.gen) throw new Error(`${what}: tensor from an earlier step (beginStep() released it)`);
    return c;
  }
  private w(x: Weight): GpuWeight {
    if (!(x instanceof GpuWeight)) throw new TypeError(`not a ${this.label} weight`);
    return x;
  }
  private out(ptr: number, shape: readonly number[]): GpuTensor {
    return new GpuTensor(ptr, shape, this.gen);
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
    return new GpuWeight(nw.id, hw.shape, hw.dtype, nw.bytes);
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
    return new GpuExperts(this.n.expertSet(ids), first, experts.length, per);
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
    return new GpuCache(this.n.cache(layers, numBlocks, blockSize, width, dtype === "bf16"), layers, numBlocks, blockSize, width, dtype);
  }
  readCache(cache: LatentCache, layer: number, slot: number, count: number): Float32Array {
    return this.n.readCache((cache as GpuCache).id, layer, slot, count);
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
    const cc = cache as GpuCache;
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
    const e = experts as GpuExperts;
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
  /** device graphs of repeated step segments on or off (results are identical either way) */
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
    this.n.fillCacheRandom((cache as GpuCache).id, seed);
  }
  /** record device events around every op from now on (true) or stop (false); both clear the record */
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

const loaders = new WeakMap<GpuVendor, NativeLoader>();
/** the vendor's addon loader (one per vendor object: the addon is loaded once) */
function loaderOf(v: GpuVendor): NativeLoader {
  let l = loaders.get(v);
  if (!l) loaders.set(v, (l = addonLoader(v)));
  return l;
}

/** A GPU backend: its probe, devices, provider and context constructor, from the vendor's data. */
export interface GpuBackend {
  /** the driver and devices, without creating a context; never throws */
  probe(): ProbeResult;
  /** the probe's devices (empty when not available); `p` defaults to a fresh probe */
  devices(p?: ProbeResult): GpuDevice[];
  /** whether device `d` (default: every device) runs `op` at `precision`, or why not */
  precisionError(precision: Precision, d?: number): string | null;
  provider: BackendProvider & { supports(op: OpName, p: Precision, device?: number): boolean };
  create(opts?: GpuBackendOptions): GpuContext;
}

/**
 * The backend of one vendor. `load` replaces the addon (tests drive the TS layer with a stand-in
 * addon that reports chosen devices); by default the vendor's addon is looked for as candidates() says.
 */
export function gpuBackend(v: GpuVendor, load: NativeLoader = loaderOf(v), create?: (opts?: GpuBackendOptions) => GpuContext): GpuBackend {
  const na = `${v.label} not available`;
  const probe = (): ProbeResult => {
    let nat: Native;
    try {
      nat = load();
    } catch (e) {
      return { ok: false, reason: `${na}: ${(e as Error).message}` };
    }
    let p: ProbeResult;
    try {
      p = nat.probe();
    } catch (e) {
      return { ok: false, reason: `${na}: ${(e as Error).message}` };
    }
    if (!p.ok) return { ...p, reason: withHint(v, p.reason) };
    // devices the addon has no code for are listed but do not make the backend available
    if (v.deviceError) {
      const devs = (p.devices ?? []).map((l, i) => v.device(l, i));
      const bad = devs.map((d) => v.deviceError!(d, nat));
      if (devs.length && bad.every((b) => b !== null)) return { ok: false, devices: p.devices, reason: `${na}: ${bad.join("; ")}` };
    }
    return p;
  };
  const devices = (p: ProbeResult = probe()): GpuDevice[] => (p.ok || p.devices ? (p.devices ?? []).map((l, i) => v.device(l, i)) : []);
  // supports() is asked once per op and precision: the devices are probed once for it (the runtime
  // fixes the visible devices at process start)
  let probed: ProbeResult | null = null;
  const precisionError = (precision: Precision, d?: number): string | null => {
    if (!v.perDevice) return v.precisionError(null, precision);
    const p = (probed ??= probe());
    if (!p.ok) return p.reason ?? na;
    const all = devices(p);
    const list = d === undefined ? all : all.filter((x) => x.index === d);
    if (!list.length) return `${v.name}: no device ${d}`;
    let nat: Native | null = null;
    try {
      nat = load();
    } catch {
      /* probe() succeeded, so the addon loads */
    }
    for (const x of list) {
      const why = (nat && v.deviceError?.(x, nat)) ?? v.precisionError(x, precision);
      if (why) return why;
    }
    return null;
  };
  const make = create ?? ((opts?: GpuBackendOptions) => new GpuContext(v, opts, load));
  const provider = {
    name: v.name,
    /** the backend contract this implements (BACKEND_API_VERSION of @ds3/core) */
    apiVersion: 2,
    entry: v.base,
    available() {
      const p = probe();
      return p.ok ? { ok: true as const, devices: p.devices ?? [] } : { ok: false as const, reason: p.reason ?? na };
    },
    devices(): DeviceInfo[] {
      const p = probe();
      return p.ok ? devices(p).map(({ index, name, memoryTotal, memoryFree }) => ({ index, name, memoryTotal, memoryFree })) : [];
    },
    /**
     * Every op of the contract, `sample` included, at the precisions the device runs (`device`: one
     * device; default: every device, since ranks may be placed on any of them; with per-device
     * precisions, false when no device is there).
     */
    supports(_op: OpName, p: Precision, device?: number): boolean {
      return precisionError(p, device) === null;
    },
    create(opts?: BackendOptions) {
      return make(opts);
    },
  };
  return { probe, devices, precisionError, provider, create: make };
}
