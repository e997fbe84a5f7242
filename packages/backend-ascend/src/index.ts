// @ds3/backend-ascend — the op table of the Ascend backend: thin glue around the native addon, which
// loads CANN at run time and runs every op as aclnn operators on the NPU (see README.md).
// Tensors live in a per-step device arena: a tensor is valid until the next beginStep().
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

/** A device view as the addon describes it: base address, storage elements, offset, rows, cols, row stride, aclDataType. */
interface NT {
  p: number;
  n: number;
  o: number;
  r: number;
  c: number;
  s: number;
  dt: number;
}
interface ProbeResult {
  ok: boolean;
  reason: string;
  libDir: string;
  /** the toolkit's version ("8.1.RC1"), empty when no version file was found */
  version: string;
  /** "CANN 8.1.RC1", or "CANN version unknown (no ascend_toolkit_install.info or version.info at <dir>)" */
  versionText?: string;
  hccl: boolean;
  devices: Array<{ label: string; name: string; memoryTotal: number; memoryFree: number }>;
}
interface NativeCtx {
  weight(dtype: string, rows: number, cols: number, data: Uint8Array, scale?: Float32Array, sr?: number, sc?: number, or?: number, oc?: number): NT;
  expertSet(list: NT[][]): number;
  upload(data: Float32Array, rows: number, cols: number, kind: number): NT;
  download(t: NT): Float32Array;
  cache(layers: number, blocks: number, bs: number, width: number, bf16: boolean): number;
  readCache(id: number, layer: number, slot: number, count: number): Float32Array;
  beginStep(): void;
  embed(w: NT, ids: Int32Array, vocabStart: number): NT;
  rmsNorm(x: NT, w: NT, eps: number): NT;
  linear(x: NT, w: NT): NT;
  add(a: NT, b: NT): NT;
  siluMul(a: NT, b: NT): NT;
  concat(a: NT, b: NT): NT;
  rows(x: NT, rows: Int32Array): NT;
  rope(x: NT, heads: number, hd: number, off: number, rd: number, pos: Int32Array, inv: Float32Array, f: number): NT;
  mla(...a: unknown[]): NT;
  moeGate(x: NT, g: NT, bias: Float32Array | null, topk: number, ng: number, tg: number, sig: boolean, norm: boolean, scale: number): NT;
  moeExperts(x: NT, set: number, first: number, routing: NT, topk: number): NT;
  hcclRootInfo(): Uint8Array;
  hcclInit(info: Uint8Array, rank: number, worldSize: number): void;
  allReduce(x: NT): NT;
  allGather(x: NT): NT;
  stats(): AscendStats;
  dispose(): void;
}
interface Native {
  Context: new (o: { device: number; bf16: boolean }) => NativeCtx;
  probe(): ProbeResult;
  standinStats(): string | null;
}

/** Counters of one context (tests and benchmarks read them). */
export interface AscendStats {
  /** bytes of the grow-only operator workspace */
  workspaceBytes: number;
  /** times it grew */
  workspaceGrows: number;
  arenaBytes: number;
  arenaPeak: number;
  /** collectives run through HCCL */
  hccl: boolean;
  /** aclnnFusedInferAttentionScoreV3 present */
  fia: boolean;
  /** aclnnMoeGatingTopK present */
  gatingTopK: boolean;
}

let native: Native | null = null;
let loadError: string | null = null;
function load(): Native {
  if (native) return native;
  if (loadError) throw new Error(loadError);
  const here = dirname(fileURLToPath(import.meta.url));
  const p = join(here, "../build/Release/ds3_ascend.node");
  if (!existsSync(p)) {
    loadError = `@ds3/backend-ascend: native addon not built (${p} missing); run \`pnpm --filter @ds3/backend-ascend build\``;
    throw new Error(loadError);
  }
  try {
    native = createRequire(import.meta.url)(p) as Native;
    return native;
  } catch (e) {
    loadError = `@ds3/backend-ascend: native addon not loadable: ${(e as Error).message}`;
    throw new Error(loadError);
  }
}

/** Where CANN was looked for and what was found, without creating a context. */
export function probe(): ProbeResult {
  try {
    return load().probe();
  } catch (e) {
    return { ok: false, reason: (e as Error).message, libDir: "", version: "", hccl: false, devices: [] };
  }
}

/** Live-object counters of the CPU stand-in of CANN (standin/, tests only): live tensors, lists, executors,
 * device allocations, refused destroys and every error code returned so far. null on real CANN or without CANN. */
export interface StandinStats {
  tensors: number;
  tensorLists: number;
  intArrays: number;
  scalars: number;
  executorsPending: number;
  streams: number;
  deviceAllocs: number;
  deviceBytes: number;
  comms: number;
  eager: boolean;
  refusedDestroys: number;
  /** error code -> times returned (any library, any thread) */
  errors: Record<string, number>;
  [k: string]: unknown;
}
export function standinStats(): StandinStats | null {
  try {
    const s = load().standinStats();
    return s ? (JSON.parse(s) as StandinStats) : null;
  } catch {
    return null;
  }
}

class AscendTensor implements Tensor {
  constructor(
    readonly h: NT,
    readonly shape: readonly number[],
    readonly gen: number,
  ) {}
}
class AscendWeight implements Weight {
  constructor(
    readonly h: NT,
    readonly shape: readonly [number, number],
    readonly dtype: WeightDType,
  ) {}
}
class AscendExperts implements ExpertSet {
  constructor(
    readonly id: number,
    readonly first: number,
    readonly count: number,
  ) {}
}
class AscendCache implements LatentCache {
  constructor(
    readonly id: number,
    readonly layers: number,
    readonly numBlocks: number,
    readonly blockSize: number,
    readonly width: number,
    readonly dtype: ActDType,
  ) {}
}

const rowsOf = (shape: readonly number[]) => (shape.length === 1 ? 1 : shape.slice(0, -1).reduce((a, b) => a * b, 1));

export class AscendContext implements BackendContext {
  readonly name = "ascend";
  readonly device: string;
  readonly precision: Precision;
  private n: NativeCtx;
  private coll: Collective | null;
  private gen = 1;
  private hccl = false;
  private world = 1;

  constructor(opts: BackendOptions = {}) {
    const nat = load();
    const pr = nat.probe();
    if (!pr.ok) throw new Error(`Ascend not available: ${pr.reason}`);
    this.precision = { activations: "f32", cache: "f32", actQuant: "none", ...opts.precision };  // the contract's default (EXACT); pass bf16 for the NPU
    if (this.precision.actQuant !== "none") throw new Error(`ascend: actQuant=${this.precision.actQuant} not supported (Atlas A2/A3 have no FP8; weights run as BF16)`);
    const dev = opts.device ?? 0;
    this.n = new nat.Context({ device: dev, bf16: this.precision.activations === "bf16" });
    this.device = pr.devices[dev]?.label ?? `npu:${dev}`;
    this.coll = opts.collective && opts.collective.worldSize > 1 ? opts.collective : null;
    if (this.coll && pr.hccl && opts.deviceCollectives !== false && process.env.DS3_ASCEND_HCCL !== "0") {
      // rank 0 makes the HCCL root info; the host collective broadcasts its bytes to every rank
      const c = this.coll;
      const info = c.broadcast(c.rank === 0 ? this.n.hcclRootInfo() : undefined);
      this.n.hcclInit(info, c.rank, c.worldSize);
      this.hccl = true;
      this.world = c.worldSize;
    }
  }

  private t(x: Tensor, what: string): AscendTensor {
    if (!(x instanceof AscendTensor)) throw new TypeError(`${what}: not an Ascend tensor`);
    if (x.gen !== this.gen) throw new Error(`${what}: tensor from an earlier step (beginStep() released it)`);
    return x;
  }
  private w(x: Weight): AscendWeight {
    if (!(x instanceof AscendWeight)) throw new TypeError("not an Ascend weight");
    return x;
  }
  private out(h: NT, shape: readonly number[]): AscendTensor {
    return new AscendTensor(h, shape, this.gen);
  }

  /** context counters: workspace size and growths, arena, which fused operators are present */
  stats(): AscendStats {
    return this.n.stats();
  }

  weight(hw: HostWeight): Weight {
    const [r, c] = hw.shape;
    if (hw.dtype === "f8_e4m3") {
      if (!hw.scale || !hw.scaleShape) throw new Error(`${hw.name}: FP8 weight without block scales`);
      const o = hw.scaleOrigin ?? [0, 0];
      return new AscendWeight(this.n.weight(hw.dtype, r, c, hw.data, hw.scale, hw.scaleShape[0], hw.scaleShape[1], o[0], o[1]), hw.shape, hw.dtype);
    }
    return new AscendWeight(this.n.weight(hw.dtype, r, c, hw.data), hw.shape, hw.dtype);
  }
  private expertWidth = new Map<number, number>();
  expertSet(first: number, experts: Array<{ w1: Weight; w2: Weight; w3: Weight }>): ExpertSet {
    const e0 = experts[0];
    if (!e0) throw new RangeError("expertSet: no experts");
    const [I, D] = this.w(e0.w1).shape;
    experts.forEach((e, i) => {
      const ok = (w: Weight, r: number, c: number) => this.w(w).shape[0] === r && this.w(w).shape[1] === c;
      if (!ok(e.w1, I, D) || !ok(e.w3, I, D) || !ok(e.w2, D, I))
        throw new RangeError(`expertSet: expert ${first + i} has w1 [${e.w1.shape}], w2 [${e.w2.shape}], w3 [${e.w3.shape}]; expected [${I}, ${D}], [${D}, ${I}], [${I}, ${D}]`);
    });
    const id = this.n.expertSet(experts.map((e) => [this.w(e.w1).h, this.w(e.w2).h, this.w(e.w3).h]));
    this.expertWidth.set(id, D);
    return new AscendExperts(id, first, experts.length);
  }
  upload(data: Float32Array, shape: readonly number[]): Tensor {
    const n = shape.reduce((a, b) => a * b, 1);
    if (n !== data.length) throw new RangeError(`upload: ${data.length} values for shape [${shape.join(", ")}]`);
    const cols = shape.length ? shape[shape.length - 1]! : 1;
    return this.out(this.n.upload(data, rowsOf(shape), cols, 0), [...shape]);
  }
  download(x: Tensor): Float32Array {
    return this.n.download(this.t(x, "download").h);
  }
  createCache(layers: number, numBlocks: number, blockSize: number, width: number, dtype: ActDType): LatentCache {
    return new AscendCache(this.n.cache(layers, numBlocks, blockSize, width, dtype === "bf16"), layers, numBlocks, blockSize, width, dtype);
  }
  readCache(cache: LatentCache, layer: number, slot: number, count: number): Float32Array {
    const c = cache as AscendCache;
    if (!(Number.isInteger(layer) && layer >= 0 && layer < c.layers)) throw new RangeError(`readCache: layer ${layer} outside the cache's ${c.layers}`);
    if (!(Number.isInteger(slot) && Number.isInteger(count) && slot >= 0 && count >= 0 && slot + count <= c.numBlocks * c.blockSize))
      throw new RangeError(`readCache: slots [${slot}, ${slot + count}) outside the cache's ${c.numBlocks * c.blockSize}`);
    return this.n.readCache((cache as AscendCache).id, layer, slot, count);
  }
  beginStep(): void {
    this.n.beginStep();
    this.gen++;
  }

  embed(table: Weight, ids: Int32Array, vocabStart: number): Tensor {
    const w = this.w(table);
    return this.out(this.n.embed(w.h, ids, vocabStart), [ids.length, w.shape[1]]);
  }
  rmsNorm(x: Tensor, wt: Weight, eps: number): Tensor {
    const a = this.t(x, "rmsNorm");
    const w = this.w(wt);
    if (w.shape[0] * w.shape[1] !== a.h.c) throw new RangeError(`rmsNorm: weight [${w.shape}] for rows of width ${a.h.c}`);
    return this.out(this.n.rmsNorm(a.h, this.w(wt).h, eps), a.shape);
  }
  linear(x: Tensor, wt: Weight): Tensor {
    const a = this.t(x, "linear");
    const w = this.w(wt);
    if (a.h.c !== w.shape[1]) throw new RangeError(`linear: input width ${a.h.c} != weight in-features ${w.shape[1]}`);
    return this.out(this.n.linear(a.h, w.h), [a.h.r, w.shape[0]]);
  }
  add(x: Tensor, y: Tensor): Tensor {
    const a = this.t(x, "add");
    const b = this.t(y, "add");
    if (a.h.r !== b.h.r || a.h.c !== b.h.c) throw new RangeError(`add: shapes [${a.shape}] and [${b.shape}] differ`);
    return this.out(this.n.add(a.h, b.h), a.shape);
  }
  siluMul(g: Tensor, u: Tensor): Tensor {
    const a = this.t(g, "siluMul");
    const b = this.t(u, "siluMul");
    if (a.h.r !== b.h.r || a.h.c !== b.h.c) throw new RangeError(`siluMul: shapes [${a.shape}] and [${b.shape}] differ`);
    return this.out(this.n.siluMul(a.h, b.h), a.shape);
  }
  concat(x: Tensor, y: Tensor): Tensor {
    const a = this.t(x, "concat");
    const b = this.t(y, "concat");
    if (a.h.r !== b.h.r) throw new RangeError(`concat: ${a.h.r} rows and ${b.h.r} rows`);
    return this.out(this.n.concat(a.h, b.h), [a.h.r, a.h.c + b.h.c]);
  }
  /** a view: the same device memory, an offset and the parent's row stride (no copy) */
  slice(x: Tensor, c0: number, c1: number): Tensor {
    const a = this.t(x, "slice");
    if (!(Number.isInteger(c0) && Number.isInteger(c1) && c0 >= 0 && c1 <= a.h.c && c0 <= c1)) throw new RangeError(`slice [${c0}, ${c1}) of ${a.h.c} columns`);
    return this.out({ ...a.h, o: a.h.o + c0, c: c1 - c0 }, [a.h.r, c1 - c0]);
  }
  rows(x: Tensor, rows: Int32Array): Tensor {
    const a = this.t(x, "rows");
    for (const r of rows) if (!(r >= 0 && r < a.h.r)) throw new RangeError(`rows: row ${r} outside [0, ${a.h.r})`);
    return this.out(this.n.rows(a.h, rows), [rows.length, a.h.c]);
  }
  rope(x: Tensor, heads: number, headDim: number, ropeOffset: number, ropeDim: number, positions: Int32Array, invFreq: Float32Array, attnFactor: number): Tensor {
    const a = this.t(x, "rope");
    if (heads * headDim !== a.h.c) throw new RangeError(`rope: ${heads} heads x ${headDim} != ${a.h.c} columns`);
    if (positions.length !== a.h.r) throw new RangeError(`rope: ${positions.length} positions for ${a.h.r} rows`);
    if (ropeOffset < 0 || ropeOffset + ropeDim > headDim || ropeDim % 2 !== 0 || invFreq.length < ropeDim / 2) throw new RangeError("rope: bad rotary span");
    return this.out(this.n.rope(a.h, heads, headDim, ropeOffset, ropeDim, positions, invFreq, attnFactor), a.shape);
  }
  mla(q: Tensor, kv: Tensor, pe: Tensor, wkvB: Weight, cache: LatentCache, layer: number, m: AttnMeta, d: MlaDims): Tensor {
    const a = this.t(q, "mla q");
    const b = this.t(kv, "mla kv");
    const c = this.t(pe, "mla pe");
    const cc = cache as AscendCache;
    const T = a.h.r;
    if (b.h.r !== T || c.h.r !== T || b.h.c !== d.kvLora || c.h.c !== d.rope || a.h.c !== d.heads * (d.nope + d.rope))
      throw new RangeError("mla: q/kv/pe shapes disagree with the dims");
    const wb = this.w(wkvB);
    if (wb.shape[0] !== d.heads * (d.nope + d.v) || wb.shape[1] !== d.kvLora)
      throw new RangeError(`mla: wkv_b [${wb.shape}] is not [heads*(nope+v), kvLora] = [${d.heads * (d.nope + d.v)}, ${d.kvLora}]`);
    if (d.kvLora + d.rope !== cc.width) throw new RangeError(`mla: kvLora ${d.kvLora} + rope ${d.rope} != cache width ${cc.width}`);
    if (!(layer >= 0 && layer < cc.layers)) throw new RangeError(`mla: layer ${layer} outside the cache's ${cc.layers}`);
    if (m.positions.length < T || m.seqIdx.length < T) throw new RangeError("mla: meta shorter than the step");
    for (let t = 0; t < T; t++) {
      const s = m.seqIdx[t]!;
      const p = m.positions[t]!;
      if (p < 0 || Math.floor(p / cc.blockSize) >= m.maxBlocks || s < 0 || (s + 1) * m.maxBlocks > m.blockTables.length)
        throw new RangeError(`mla: token ${t} (sequence ${s}, position ${p}) is outside its block table`);
      for (let j = 0; j <= Math.floor(p / cc.blockSize); j++) {
        const blk = m.blockTables[s * m.maxBlocks + j]!;
        if (blk < 0 || blk >= cc.numBlocks) throw new RangeError(`mla: block table of sequence ${s} names block ${blk}, outside the cache`);
      }
    }
    const y = this.n.mla(a.h, b.h, c.h, this.w(wkvB).h, cc.id, layer, m.positions.subarray(0, T), m.seqIdx.subarray(0, T), m.blockTables, m.maxBlocks,
      d.heads, d.nope, d.rope, d.v, d.kvLora, d.scale, cc.blockSize);
    return this.out(y, [T, d.heads * d.v]);
  }
  moeGate(x: Tensor, gate: Weight, bias: Float32Array | null, c: GateConfig): Tensor {
    const a = this.t(x, "moeGate");
    const g = this.w(gate);
    if (g.shape[1] !== a.h.c) throw new RangeError(`moeGate: gate weight [${g.shape}] for inputs of width ${a.h.c}`);
    if (!(Number.isInteger(c.topk) && c.topk >= 1 && c.topk <= g.shape[0])) throw new RangeError(`moeGate: top-${c.topk} of ${g.shape[0]} experts`);
    if (!(Number.isInteger(c.topkGroups) && c.topkGroups >= 1 && c.topkGroups <= c.nGroups)) throw new RangeError(`moeGate: ${c.topkGroups} of ${c.nGroups} groups`);
    if (g.shape[0] % c.nGroups !== 0) throw new RangeError(`moeGate: ${g.shape[0]} experts in ${c.nGroups} groups`);
    if (bias && bias.length !== g.shape[0]) throw new RangeError(`moeGate: bias of ${bias.length} for ${g.shape[0]} experts`);
    const y = this.n.moeGate(a.h, g.h, bias, c.topk, c.nGroups, c.topkGroups, c.scoreFunc === "sigmoid", c.normTopk, c.routeScale);
    return this.out(y, [a.h.r, 2 * c.topk]);
  }
  moeExperts(x: Tensor, experts: ExpertSet, routing: Tensor, topk: number): Tensor {
    const a = this.t(x, "moeExperts");
    const r = this.t(routing, "moeExperts routing");
    const e = experts as AscendExperts;
    if (a.h.c !== this.expertWidth.get(e.id)) throw new RangeError(`moeExperts: input width ${a.h.c} != the experts' width ${this.expertWidth.get(e.id)}`);
    if (r.h.r !== a.h.r || r.h.c !== 2 * topk) throw new RangeError(`moeExperts: routing [${r.shape}] for ${a.h.r} tokens x top-${topk}`);
    return this.out(this.n.moeExperts(a.h, e.id, e.first, r.h, topk), a.shape);
  }
  allReduce(x: Tensor): Tensor {
    const a = this.t(x, "allReduce");
    if (this.hccl) return this.out(this.n.allReduce(a.h), a.shape);
    if (!this.coll) return x;
    return this.out(this.n.upload(this.coll.allReduceSum(this.n.download(a.h)), a.h.r, a.h.c, 0), a.shape);
  }
  allGatherCols(x: Tensor): Tensor {
    const a = this.t(x, "allGatherCols");
    if (this.hccl) return this.out(this.n.allGather(a.h), [a.h.r, a.h.c * this.world]);
    if (!this.coll) return x;
    const all = this.coll.allGatherCols(this.n.download(a.h), a.h.r);
    return this.out(this.n.upload(all, a.h.r, all.length / a.h.r, 0), [a.h.r, all.length / a.h.r]);
  }
  dispose(): void {
    this.n.dispose();
  }
}

export function ascendDevices(p: ProbeResult = probe()): DeviceInfo[] {
  if (!p.ok) return [];
  return p.devices.map((d, i) => ({ index: i, name: d.name, memoryTotal: d.memoryTotal, memoryFree: d.memoryFree }));
}

export const ascend: BackendProvider = {
  name: "ascend",
  /** the backend contract this implements (BACKEND_API_VERSION of @ds3/core) */
  apiVersion: 2,
  entry: import.meta.url,
  available() {
    const p = probe();
    return p.ok ? { ok: true, devices: p.devices.map((d) => d.label) } : { ok: false, reason: `Ascend not available: ${p.reason}` };
  },
  devices() {
    return ascendDevices();
  },
  /**
   * Every op but `sample` with BF16 activations and cache (what the NPU runs), and in the exact mode
   * (FP32 activations and cache: aclnn operators with ACL_FLOAT, for the golden 1e-3 checks); mixed
   * modes too. No FP8 activation quantization (Atlas A2/A3 have no FP8).
   */
  supports(op: OpName, p: Precision) {
    if (op === "sample") return false;
    return (p.activations === "f32" || p.activations === "bf16") && (p.cache === "f32" || p.cache === "bf16") && p.actQuant === "none";
  },
  create(opts?: BackendOptions) {
    return new AscendContext(opts);
  },
};

export default ascend;
