// The backend contract: the op set every backend implements (DESIGN.md, "Op set v1").
// The model (model.ts) is written once against this interface; a backend is a table of
// these functions around native kernels, with no model logic of its own.

/** Stored weight dtypes a backend accepts as they are in the checkpoint. */
export type WeightDType = "f8_e4m3" | "bf16" | "f16" | "f32";

/** A weight (or a rank's slice of one) as read from the checkpoint: raw bytes, row-major [rows, cols]. */
export interface HostWeight {
  name: string;
  dtype: WeightDType;
  shape: [number, number];
  data: Uint8Array;
  /** FP8 only: the 128x128 block scales (`weight_scale_inv`) that cover this slice, row-major [sr, sc]. */
  scale?: Float32Array;
  scaleShape?: [number, number];
  /** FP8 only: where the slice starts inside its first scale block (row, col), for slices not aligned to 128. */
  scaleOrigin?: [number, number];
}

/** Activation precision: fp32 (exact, the golden bound needs it) or bf16 (what accelerators use). */
export type ActDType = "f32" | "bf16";
/** Activation quantization in front of FP8 linear layers (DeepSeek's `act_quant`, per token per 128 channels). */
export type ActQuant = "none" | "fp8" | "fp8-ue8m0" | "fp8-fnuz";

export interface Precision {
  activations: ActDType;
  cache: ActDType;
  actQuant: ActQuant;
}

export const EXACT: Precision = { activations: "f32", cache: "f32", actQuant: "none" };

/**
 * The named precisions (`ds3 selftest --precision`, the conformance suite). What a backend computes
 * at each, as the CPU backend emulates it and the suite's float64 reference defines it
 * (conformance-precision.ts):
 * - `activations: "bf16"`: every op's activation output is rounded to bf16 once (nearest even),
 *   computed from its inputs in fp32 or better; composite ops (mla, moeExperts) may round their
 *   intermediates as tensor-core kernels do.
 * - `cache: "bf16"`: the latent cache stores bf16.
 * - `actQuant`: the input of a linear layer with FP8 weights (and of the FP8 experts) is quantized
 *   per token per 128 channels, s = max(amax, 1e-4) / 448 (e4m3fn; `fp8-ue8m0`: s rounded up to a
 *   power of two; `fp8-fnuz`: / 240 onto e4m3fnuz, AMD MI300).
 */
export const PRECISIONS = {
  exact: EXACT,
  bf16: { activations: "bf16", cache: "bf16", actQuant: "none" },
  fp8: { activations: "bf16", cache: "bf16", actQuant: "fp8" },
  "fp8-ue8m0": { activations: "bf16", cache: "bf16", actQuant: "fp8-ue8m0" },
  "fp8-fnuz": { activations: "bf16", cache: "bf16", actQuant: "fp8-fnuz" },
} as const satisfies Record<string, Precision>;
export type PrecisionName = keyof typeof PRECISIONS;
export const PRECISION_NAMES = Object.keys(PRECISIONS) as PrecisionName[];

/** Opaque device tensor of activations (logically fp32, row-major). */
export interface Tensor {
  readonly shape: readonly number[];
}
/** Opaque device weight. */
export interface Weight {
  readonly shape: readonly [number, number];
  readonly dtype: WeightDType;
}
/** Opaque set of routed experts held by this rank (w1=gate, w2=down, w3=up per expert). */
export interface ExpertSet {
  readonly first: number;
  readonly count: number;
}
/** Opaque paged latent cache: `layers` x `numBlocks*blockSize` slots x `width` values. */
export interface LatentCache {
  readonly layers: number;
  readonly numBlocks: number;
  readonly blockSize: number;
  readonly width: number;
  readonly dtype: ActDType;
}

/** Where each token of a step sits: which sequence, which position, and the block tables. */
export interface AttnMeta {
  /** per token: its position in its sequence */
  positions: Int32Array;
  /** per token: index of its sequence in `blockTables` */
  seqIdx: Int32Array;
  /** per sequence: `maxBlocks` block ids (row-major), -1 past the end */
  blockTables: Int32Array;
  maxBlocks: number;
}

export interface MlaDims {
  heads: number; // heads on this rank
  nope: number;
  rope: number;
  v: number;
  kvLora: number;
  scale: number;
}

export interface GateConfig {
  topk: number;
  nGroups: number;
  topkGroups: number;
  scoreFunc: "sigmoid" | "softmax";
  normTopk: boolean;
  routeScale: number;
}

/** Sampling parameters a backend may apply on the device (no penalties, no masks: those stay on the host). */
export interface DeviceSampling {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
}

/** Cross-rank collectives; world size 1 needs none. Synchronous: ranks block until all arrive (worker threads use Atomics; GPUs use NCCL/RCCL/HCCL). */
export interface Collective {
  readonly rank: number;
  readonly worldSize: number;
  allReduceSum(data: Float32Array): Float32Array;
  /** gather equal-size row-major [rows, cols_r] blocks into [rows, sum cols_r] */
  allGatherCols(data: Float32Array, rows: number): Float32Array;
  /**
   * Rank 0's bytes, of any length, to every rank (bootstrap data such as an NCCL unique id or
   * HCCL root info). Every rank calls it; the argument of ranks other than 0 is ignored.
   */
  broadcast(bytes?: Uint8Array): Uint8Array;
}

/** One backend context: a device (or the CPU), its weights, its cache, and the op set. */
export interface BackendContext {
  readonly name: string;
  readonly precision: Precision;
  readonly device: string;

  // memory
  weight(w: HostWeight): Weight;
  expertSet(first: number, experts: Array<{ w1: Weight; w2: Weight; w3: Weight }>): ExpertSet;
  upload(data: Float32Array, shape: readonly number[]): Tensor;
  download(t: Tensor): Float32Array;
  createCache(layers: number, numBlocks: number, blockSize: number, width: number, dtype: ActDType): LatentCache;
  /** copy cache slots (used by the engine's prefix cache and tests) */
  readCache(cache: LatentCache, layer: number, slot: number, count: number): Float32Array;
  /** step boundary: temporaries of the previous step may be released */
  beginStep(): void;

  // ops
  embed(table: Weight, ids: Int32Array, vocabStart: number): Tensor;
  rmsNorm(x: Tensor, w: Weight, eps: number): Tensor;
  linear(x: Tensor, w: Weight): Tensor;
  add(a: Tensor, b: Tensor): Tensor;
  siluMul(gate: Tensor, up: Tensor): Tensor;
  concat(a: Tensor, b: Tensor): Tensor;
  slice(x: Tensor, c0: number, c1: number): Tensor;
  rows(x: Tensor, rows: Int32Array): Tensor;
  rope(x: Tensor, heads: number, headDim: number, ropeOffset: number, ropeDim: number, positions: Int32Array, invFreq: Float32Array, attnFactor: number): Tensor;
  /** MLA in the absorbed form over the paged latent cache: writes this step's latents, then attends. */
  mla(q: Tensor, kv: Tensor, pe: Tensor, wkvB: Weight, cache: LatentCache, layer: number, meta: AttnMeta, dims: MlaDims): Tensor;
  /** routing: returns [T, 2*topk] = topk weights then topk expert ids (as floats) */
  moeGate(x: Tensor, gate: Weight, bias: Float32Array | null, cfg: GateConfig): Tensor;
  /** sum over the routed experts this rank holds, weighted by the gate */
  moeExperts(x: Tensor, experts: ExpertSet, routing: Tensor, topk: number): Tensor;
  allReduce(x: Tensor): Tensor;
  allGatherCols(x: Tensor): Tensor;
  /**
   * Optional: sample one id per row on the device with @ds3/core's Sampler semantics, given each row's
   * uniform draw `u` (ignored when greedy), so only ids and their log-softmax values cross back.
   */
  sample?(logits: Tensor, params: DeviceSampling[], u: Float64Array): { ids: Int32Array; logprobs: Float32Array };
  dispose(): void;
}

export interface BackendOptions {
  precision?: Partial<Precision>;
  collective?: Collective;
  threads?: number;
  /** index into the provider's `devices()` (default 0) */
  device?: number;
  /**
   * false: collectives go through the host `Collective` even when the backend has device
   * collectives (NCCL, ...); set when ranks share a device (`shareDevices`). Default: true.
   */
  deviceCollectives?: boolean;
}

/** The version of the backend contract this core implements; a provider states the one it implements. */
export const BACKEND_API_VERSION = 2;

/** One device a backend can place a rank on (after the vendor's visibility variable, e.g. CUDA_VISIBLE_DEVICES). */
export interface DeviceInfo {
  /** what `BackendOptions.device` takes */
  index: number;
  name: string;
  /** bytes */
  memoryTotal: number;
  /** bytes free now */
  memoryFree: number;
  /**
   * the device may hold any number of ranks without the `shareDevices` option (the host CPU: ranks
   * split its threads and meet in shared memory); accelerators leave this unset
   */
  shareable?: boolean;
}

/** The ops of the contract (the methods of BackendContext that the model calls), for `supports`. */
export const OPS = [
  "embed",
  "rmsNorm",
  "linear",
  "add",
  "siluMul",
  "concat",
  "slice",
  "rows",
  "rope",
  "mla",
  "moeGate",
  "moeExperts",
  "allReduce",
  "allGatherCols",
  "sample",
] as const;
export type OpName = (typeof OPS)[number];
/** Ops a model cannot run without; `sample` is optional (the host samples instead). */
export const REQUIRED_OPS: readonly OpName[] = OPS.filter((o) => o !== "sample");

/** What a backend package exports. */
export interface BackendProvider {
  readonly name: string;
  /** the contract version it implements: BACKEND_API_VERSION of the @ds3/core it was written against */
  readonly apiVersion: number;
  /** URL of the module that exports this provider as `default` (worker ranks import it by this) */
  readonly entry?: string;
  /** probe without side effects: is the driver/device there? */
  available(): { ok: true; devices: string[] } | { ok: false; reason: string };
  /** the devices ranks can be placed on (empty when not available), index 0.. */
  devices(): DeviceInfo[];
  /** whether `op` runs at `precision` (a backend can come up op by op) */
  supports(op: OpName, precision: Precision): boolean;
  create(opts?: BackendOptions): BackendContext;
}

export class BackendError extends Error {
  override name = "BackendError";
}

/** The provider states this core's contract version (and has the v2 methods), or a clear error. */
export function checkProvider(p: BackendProvider): BackendProvider {
  const v = (p as { apiVersion?: unknown }).apiVersion;
  if (v !== BACKEND_API_VERSION)
    throw new BackendError(
      `backend "${p.name}" implements backend contract version ${v === undefined ? "1 (no apiVersion)" : String(v)}, this @ds3/core needs version ${BACKEND_API_VERSION}; install matching versions of @ds3/core and the backend`,
    );
  for (const m of ["available", "devices", "supports", "create"] as const)
    if (typeof (p as unknown as Record<string, unknown>)[m] !== "function") throw new BackendError(`backend "${p.name}" states contract version ${BACKEND_API_VERSION} but has no ${m}()`);
  return p;
}

/** Every op in `ops` runs at `precision` on this backend, or an error naming the op and the backend. */
export function requireOps(p: BackendProvider, precision: Precision, ops: readonly OpName[] = REQUIRED_OPS): void {
  const missing = ops.filter((o) => !p.supports(o, precision));
  if (missing.length)
    throw new BackendError(
      `backend "${p.name}" does not support op${missing.length > 1 ? "s" : ""} ${missing.join(", ")} at precision activations=${precision.activations} cache=${precision.cache} actQuant=${precision.actQuant}`,
    );
}

/** `BackendOptions.precision` filled in with the exact defaults. */
export function resolvePrecision(p?: Partial<Precision>): Precision {
  return { ...EXACT, ...p };
}
