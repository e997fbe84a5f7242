// The native boundary of the GPU backends, typed in one place: ds3_cuda.node (@ds3/backend-cuda,
// nvcc) and ds3_rocm.node (@ds3/backend-rocm, hipcc) are built from the same sources with this same
// surface. Device tensors cross as device addresses (plain numbers; every address fits in 53 bits),
// weights/caches/expert sets as small ids.

export interface ProbeResult {
  ok: boolean;
  devices?: string[];
  reason?: string;
  driver?: number;
  runtime?: number;
}

export interface NativeWeight {
  id: number;
  /** dtype as kept on the device (FP8 slices that start inside a scale-block column become f32) */
  dtype: "f8_e4m3" | "bf16" | "f16" | "f32";
  bytes: number;
}

export interface ProfileEntry {
  name: string;
  ms: number;
  count: number;
}

export interface NativeCtx {
  /** weight(dtype, rows, cols, data|null, scale|null, sr, sc, o0, o1, seed, amp): data null/empty = generate on the device */
  weight(
    dtype: string,
    rows: number,
    cols: number,
    data: Uint8Array | null,
    scale: Float32Array | null,
    sr: number,
    sc: number,
    o0: number,
    o1: number,
    seed: number,
    amp: number,
  ): NativeWeight;
  expertSet(ids: Int32Array): number;
  cache(layers: number, blocks: number, bs: number, width: number, bf16: boolean): number;
  readCache(cache: number, layer: number, slot: number, count: number): Float32Array;
  fillCacheRandom(cache: number, seed: number): void;
  /** any typed array: its bytes (an op: recorded into CUDA graphs through the pinned staging buffer) */
  upload(a: ArrayBufferView): number;
  uploadI32(a: ArrayBufferView): number;
  persist(a: Float32Array): number;
  download(ptr: number, n: number): Float32Array;
  beginStep(): void;
  sync(): void;
  embed(w: number, ids: number, T: number, vocabStart: number): number;
  rmsNorm(x: number, T: number, D: number, w: number, eps: number): number;
  linear(x: number, T: number, K: number, w: number): number;
  add(a: number, b: number, n: number): number;
  siluMul(g: number, u: number, n: number): number;
  concat(a: number, b: number, T: number, ca: number, cb: number): number;
  slice(x: number, T: number, C: number, c0: number, c1: number): number;
  rows(x: number, C: number, rows: number, n: number): number;
  rope(x: number, T: number, H: number, hd: number, off: number, rd: number, pos: number, inv: number, attn: number): number;
  mla(
    q: number,
    kv: number,
    pe: number,
    T: number,
    w: number,
    cache: number,
    layer: number,
    pos: number,
    seq: number,
    bt: number,
    maxBlocks: number,
    maxPos: number,
    heads: number,
    nope: number,
    rope: number,
    v: number,
    kvLora: number,
    scale: number,
  ): number;
  moeGate(x: number, T: number, w: number, bias: number, topk: number, ng: number, tg: number, sigmoid: boolean, norm: boolean, scale: number): number;
  moeExperts(x: number, T: number, D: number, set: number, first: number, routing: number, topk: number): number;
  argmax(x: number, T: number, N: number): Int32Array;
  /** params: device float64 [T, 4] (temperature, top_k, top_p, min_p); u: device float64 [T]; ids -1: bad row */
  sample(x: number, T: number, N: number, params: number, u: number): { ids: Int32Array; logprobs: Float32Array };
  setGraphs(on: boolean, opts?: { earlyLaunch?: boolean; minOps?: number }): void;
  graphStats(): GraphStats;
  tune(t?: Partial<GemvTuning>): GemvTuning;
  ncclUniqueId(): Uint8Array;
  ncclInit(id: Uint8Array, rank: number, worldSize: number): { version: number; rank: number; worldSize: number };
  allReduce(x: number, n: number): number;
  allGather(x: number, rows: number, cols: number): number;
  profile(on: boolean): void;
  profileReport(): ProfileEntry[];
  memInfo(): { free: number; total: number; arena: number; arenaPeak: number };
  dispose(): void;
}

export interface GraphStats {
  enabled: boolean;
  /** recordings held (captured or seen once) */
  graphs: number;
  eagerSegments: number;
  captures: number;
  replays: number;
  fallbacks: number;
  captureFailures: number;
  earlyLaunches: number;
  evictions: number;
}

export interface GemvTuning {
  /** FP8 GEMV, one token, K >= 4096: split K over the warps of a block (0/1) */
  gemvKs: number;
  /** fused MoE gate/up GEMV, one token: 16-byte chunks in flight per lane and row (1/2) */
  gemvDualU: number;
}

export interface Native {
  /** actQuant: 0 none, 1 fp8 (e4m3fn, max 448), 2 fp8 with ue8m0 scales, 3 fp8-fnuz (e4m3fnuz, max 240) */
  Context: new (o: { device: number; actBf16: boolean; actQuant: number; graphs: boolean }) => NativeCtx;
  probe(): ProbeResult;
  /** what the kernels were compiled for: NVIDIA ("cuda", nvcc), AMD ("rocm", HIP), nothing ("stub": probe() says why) */
  built: "cuda" | "rocm" | "stub";
  /** NCCL (CUDA) or RCCL (ROCm) version the addon was built with (0: built without it) */
  nccl?: number;
  /** HIP builds: the gfx targets the kernels were compiled for (comma separated, e.g. "gfx90a,gfx942") */
  targets?: string | string[];
}
