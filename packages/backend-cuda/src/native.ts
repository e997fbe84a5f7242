// The native boundary of @ds3/backend-cuda, typed in one place. Device tensors cross as device
// addresses (plain numbers; every address fits in 53 bits), weights/caches/expert sets as small ids.

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
  upload(a: Float32Array): number;
  uploadI32(a: Int32Array): number;
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
  profile(on: boolean): void;
  profileReport(): ProfileEntry[];
  memInfo(): { free: number; total: number; arena: number; arenaPeak: number };
  dispose(): void;
}

export interface Native {
  Context: new (o: { device: number; actBf16: boolean; actQuant: number }) => NativeCtx;
  probe(): ProbeResult;
  built: "cuda" | "stub";
}
