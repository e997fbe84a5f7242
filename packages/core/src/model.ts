// DeepSeek-V3, the whole graph, written once for every backend over the op set in
// backend.ts — in the spirit of DeepSeek's inference/model.py (Embed, Linear, MLA, Gate,
// MoE, MLP, Block, the MTP block, Head). Weights are read per rank straight from the HF
// checkpoint: tensor parallel for attention heads, the dense MLP and shared experts;
// expert parallel for routed experts; vocab parallel embedding and head (DeepSeek's convert.py).
import type { AttnMeta, BackendContext, DeviceSampling, ExpertSet, GateConfig, HostWeight, LatentCache, MlaDims, Tensor, Weight, WeightDType } from "./backend.js";
import { type ModelConfig, ropeFrequencies, softmaxScale } from "./config.js";
import { Checkpoint, CheckpointError, type DType, type HostTensor, type Slice2D } from "./safetensors.js";
import { checkFinite } from "./checks.js";

export interface RankInfo {
  rank: number;
  worldSize: number;
}

const DT: Partial<Record<DType, WeightDType>> = { F8_E4M3: "f8_e4m3", BF16: "bf16", F16: "f16", F32: "f32" };

/** Which dimension of which weight splits across ranks, as DeepSeek's convert.py maps it. */
export type Split = "none" | "rows" | "cols";

/** Check that `n` divides across `ws` ranks; the error names what does not divide. */
export function checkParallel(cfg: ModelConfig, ws: number): void {
  const need: Array<[string, number]> = [
    ["num_attention_heads", cfg.nHeads],
    ["n_routed_experts", cfg.nRoutedExperts],
    ["intermediate_size", cfg.interDim],
    ["moe_intermediate_size (shared experts)", cfg.moeInterDim * cfg.nSharedExperts || ws],
    ["vocab_size", cfg.vocabSize],
  ];
  for (const [what, n] of need)
    if (n % ws !== 0) throw new Error(`tensor/expert parallel size ${ws} does not divide ${what} (${n})`);
}

/** Where a rank's weights come from: a checkpoint (WeightLoader) or a synthetic source (benchmarks). */
export interface WeightSource {
  has(name: string): boolean;
  /** `name` ([rows, cols] in full, checked against `shape`), this rank's part as `split` says */
  host(name: string, shape: [number, number] | [number], split?: Split): HostWeight;
  vector(name: string, n: number): Float32Array;
}

/** Reads a rank's weights from the checkpoint, checking shapes against the config. */
export class WeightLoader implements WeightSource {
  constructor(
    readonly ck: Checkpoint,
    readonly r: RankInfo,
    /** called with the bytes of each tensor (or slice) read, for progress bars */
    readonly onRead?: (bytes: number) => void,
  ) {}

  has(name: string): boolean {
    return this.ck.has(name);
  }

  /** Read `name` ([rows, cols] in the checkpoint, checked against `shape`), split as `split` says. */
  host(name: string, shape: [number, number] | [number], split: Split = "none"): HostWeight {
    const ti = this.ck.info(name);
    const dtype = DT[ti.dtype];
    if (!dtype) throw new CheckpointError(`dtype ${ti.dtype} cannot be a weight`, ti.file, name);
    if (ti.shape.length !== shape.length || ti.shape.some((d, i) => d !== shape[i]))
      throw new CheckpointError(`shape [${ti.shape.join(", ")}] disagrees with the config, which needs [${shape.join(", ")}]`, ti.file, name);
    const R = shape.length === 1 ? 1 : shape[0];
    const C = shape.length === 1 ? shape[0] : shape[1]!;
    const { rank, worldSize: ws } = this.r;
    const slice: Slice2D = {};
    if (split === "rows" && ws > 1) slice.rows = [(rank * R) / ws, ((rank + 1) * R) / ws];
    if (split === "cols" && ws > 1) slice.cols = [(rank * C) / ws, ((rank + 1) * C) / ws];
    const t: HostTensor = shape.length === 1 ? this.ck.read(name) : this.ck.readSlice(name, slice);
    this.onRead?.(t.data.length);
    if (shape.length === 1) checkFinite(t.data, ti.dtype, ti.file, name); // norms: one NaN poisons everything
    const rows = slice.rows ? slice.rows[1] - slice.rows[0] : R;
    const cols = slice.cols ? slice.cols[1] - slice.cols[0] : C;
    const w: HostWeight = { name, dtype, shape: [rows, cols], data: t.data };
    if (dtype === "f8_e4m3") {
      const sname = `${name}_scale_inv`;
      if (!this.ck.has(sname)) throw new CheckpointError(`FP8 weight has no "${sname}"`, ti.file, name);
      const si = this.ck.info(sname);
      const want = [Math.ceil(R / 128), Math.ceil(C / 128)];
      if (si.dtype !== "F32" && si.dtype !== "BF16") throw new CheckpointError(`scale must be F32 or BF16, got ${si.dtype}`, si.file, sname);
      if (si.shape.length !== 2 || si.shape[0] !== want[0] || si.shape[1] !== want[1])
        throw new CheckpointError(`scale shape [${si.shape.join(", ")}] is wrong for weight [${R}, ${C}] in 128x128 blocks (needs [${want.join(", ")}])`, si.file, sname);
      const r0 = slice.rows?.[0] ?? 0;
      const c0 = slice.cols?.[0] ?? 0;
      const br: [number, number] = [Math.floor(r0 / 128), Math.floor((r0 + rows - 1) / 128) + 1];
      const bc: [number, number] = [Math.floor(c0 / 128), Math.floor((c0 + cols - 1) / 128) + 1];
      const s = this.ck.readSlice(sname, { rows: br, cols: bc });
      w.scale = toF32(s);
      checkFinite(w.scale, si.dtype, si.file, sname, "scale");
      w.scaleShape = [br[1] - br[0], bc[1] - bc[0]];
      w.scaleOrigin = [r0 % 128, c0 % 128];
    }
    return w;
  }

  /** A 1-D float vector (biases), converted to fp32. */
  vector(name: string, n: number): Float32Array {
    const ti = this.ck.info(name);
    if (ti.shape.length !== 1 || ti.shape[0] !== n) throw new CheckpointError(`shape [${ti.shape.join(", ")}] disagrees with the config, which needs [${n}]`, ti.file, name);
    if (ti.dtype !== "F32" && ti.dtype !== "BF16") throw new CheckpointError(`dtype ${ti.dtype} cannot be a float vector (F32 or BF16)`, ti.file, name);
    const v = toF32(this.ck.read(name));
    checkFinite(v, ti.dtype, ti.file, name); // a NaN router bias changes routing with finite output
    return v;
  }
}

export function toF32(t: HostTensor): Float32Array {
  const n = t.shape.reduce((a, b) => a * b, 1);
  const out = new Float32Array(n);
  const dv = new DataView(t.data.buffer, t.data.byteOffset, t.data.byteLength);
  if (t.dtype === "F32") for (let i = 0; i < n; i++) out[i] = dv.getFloat32(i * 4, true);
  else if (t.dtype === "BF16") {
    const u = new Uint32Array(out.buffer);
    for (let i = 0; i < n; i++) u[i] = dv.getUint16(i * 2, true) << 16;
  } else throw new CheckpointError(`cannot read ${t.dtype} as float`, undefined, t.name);
  return out;
}

// ---------------------------------------------------------------------------------------
// The modules

class MLA {
  wq?: Weight;
  wqA?: Weight;
  qNorm?: Weight;
  wqB?: Weight;
  wkvA: Weight;
  kvNorm: Weight;
  wkvB: Weight;
  wo: Weight;
  dims: MlaDims;

  constructor(
    private m: Transformer,
    p: string,
  ) {
    const c = m.cfg;
    const L = m.loader;
    const x = m.ctx;
    const qk = c.qkNopeHeadDim + c.qkRopeHeadDim;
    if (c.qLoraRank === 0) {
      this.wq = x.weight(L.host(`${p}.q_proj.weight`, [c.nHeads * qk, c.dim], "rows"));
    } else {
      this.wqA = x.weight(L.host(`${p}.q_a_proj.weight`, [c.qLoraRank, c.dim]));
      this.qNorm = x.weight(L.host(`${p}.q_a_layernorm.weight`, [c.qLoraRank]));
      this.wqB = x.weight(L.host(`${p}.q_b_proj.weight`, [c.nHeads * qk, c.qLoraRank], "rows"));
    }
    this.wkvA = x.weight(L.host(`${p}.kv_a_proj_with_mqa.weight`, [c.kvLoraRank + c.qkRopeHeadDim, c.dim]));
    this.kvNorm = x.weight(L.host(`${p}.kv_a_layernorm.weight`, [c.kvLoraRank]));
    this.wkvB = x.weight(L.host(`${p}.kv_b_proj.weight`, [c.nHeads * (c.qkNopeHeadDim + c.vHeadDim), c.kvLoraRank], "rows"));
    this.wo = x.weight(L.host(`${p}.o_proj.weight`, [c.dim, c.nHeads * c.vHeadDim], "cols"));
    this.dims = {
      heads: c.nHeads / m.rank.worldSize,
      nope: c.qkNopeHeadDim,
      rope: c.qkRopeHeadDim,
      v: c.vHeadDim,
      kvLora: c.kvLoraRank,
      scale: softmaxScale(c),
    };
  }

  forward(h: Tensor, layer: number, meta: AttnMeta): Tensor {
    const { ctx: x, cfg: c } = this.m;
    const { heads, nope, rope } = this.dims;
    const q0 = this.wq ? x.linear(h, this.wq) : x.linear(x.rmsNorm(x.linear(h, this.wqA!), this.qNorm!, c.rmsNormEps), this.wqB!);
    const q = x.rope(q0, heads, nope + rope, nope, rope, meta.positions, this.m.invFreq, this.m.attnFactor);
    const kvAll = x.linear(h, this.wkvA);
    const kv = x.rmsNorm(x.slice(kvAll, 0, c.kvLoraRank), this.kvNorm, c.rmsNormEps);
    const pe = x.rope(x.slice(kvAll, c.kvLoraRank, c.kvLoraRank + rope), 1, rope, 0, rope, meta.positions, this.m.invFreq, this.m.attnFactor);
    const o = x.mla(q, kv, pe, this.wkvB, this.m.cache!, layer, meta, this.dims);
    return x.linear(o, this.wo); // partial sum across ranks; the block all-reduces
  }
}

class MLP {
  w1: Weight;
  w2: Weight;
  w3: Weight;
  constructor(m: Transformer, p: string, inter: number) {
    const { cfg: c, loader: L, ctx: x } = m;
    this.w1 = x.weight(L.host(`${p}.gate_proj.weight`, [inter, c.dim], "rows"));
    this.w3 = x.weight(L.host(`${p}.up_proj.weight`, [inter, c.dim], "rows"));
    this.w2 = x.weight(L.host(`${p}.down_proj.weight`, [c.dim, inter], "cols"));
  }
  forward(x: BackendContext, h: Tensor): Tensor {
    return x.linear(x.siluMul(x.linear(h, this.w1), x.linear(h, this.w3)), this.w2);
  }
}

class MoE {
  gate: Weight;
  bias: Float32Array | null;
  experts: ExpertSet;
  shared: MLP | null;
  gcfg: GateConfig;

  constructor(
    private m: Transformer,
    p: string,
  ) {
    const { cfg: c, loader: L, ctx: x, rank } = m;
    this.gate = x.weight(L.host(`${p}.gate.weight`, [c.nRoutedExperts, c.dim]));
    this.bias = c.topkMethod === "noaux_tc" ? L.vector(`${p}.gate.e_score_correction_bias`, c.nRoutedExperts) : null;
    const per = c.nRoutedExperts / rank.worldSize;
    const first = rank.rank * per;
    const list = [];
    for (let e = first; e < first + per; e++) {
      const q = `${p}.experts.${e}`;
      list.push({
        w1: x.weight(L.host(`${q}.gate_proj.weight`, [c.moeInterDim, c.dim])),
        w2: x.weight(L.host(`${q}.down_proj.weight`, [c.dim, c.moeInterDim])),
        w3: x.weight(L.host(`${q}.up_proj.weight`, [c.moeInterDim, c.dim])),
      });
    }
    this.experts = x.expertSet(first, list);
    this.shared = c.nSharedExperts > 0 ? new MLP(m, `${p}.shared_experts`, c.moeInterDim * c.nSharedExperts) : null;
    this.gcfg = {
      topk: c.nActivatedExperts,
      nGroups: c.topkMethod === "greedy" ? 1 : c.nExpertGroups,
      topkGroups: c.topkMethod === "greedy" ? 1 : c.nLimitedGroups,
      scoreFunc: c.scoreFunc,
      normTopk: c.normTopkProb,
      routeScale: c.routeScale,
    };
  }

  forward(h: Tensor): Tensor {
    const x = this.m.ctx;
    const routing = x.moeGate(h, this.gate, this.bias, this.gcfg);
    const y = x.moeExperts(h, this.experts, routing, this.gcfg.topk);
    return this.shared ? x.add(y, this.shared.forward(x, h)) : y;
  }
}

class Block {
  attnNorm: Weight;
  attn: MLA;
  ffnNorm: Weight;
  ffn: MLP | MoE;
  constructor(
    private m: Transformer,
    readonly layer: number,
  ) {
    const { cfg: c, loader: L, ctx: x } = m;
    const p = `model.layers.${layer}`;
    this.attnNorm = x.weight(L.host(`${p}.input_layernorm.weight`, [c.dim]));
    this.attn = new MLA(m, `${p}.self_attn`);
    this.ffnNorm = x.weight(L.host(`${p}.post_attention_layernorm.weight`, [c.dim]));
    this.ffn = layer < c.nDenseLayers ? new MLP(m, `${p}.mlp`, c.interDim) : new MoE(m, `${p}.mlp`);
  }
  forward(h: Tensor, meta: AttnMeta): Tensor {
    const { ctx: x, cfg: c } = this.m;
    const a = x.allReduce(this.attn.forward(x.rmsNorm(h, this.attnNorm, c.rmsNormEps), this.layer, meta));
    h = x.add(h, a);
    const n = x.rmsNorm(h, this.ffnNorm, c.rmsNormEps);
    const f = x.allReduce(this.ffn instanceof MLP ? this.ffn.forward(x, n) : this.ffn.forward(n));
    return x.add(h, f);
  }
}

/** The multi-token-prediction block (`model.layers.{num_hidden_layers + k}`). */
class MTP {
  embed: Weight;
  enorm: Weight;
  hnorm: Weight;
  ehProj: Weight;
  block: Block;
  norm: Weight;
  head: Weight;
  constructor(
    private m: Transformer,
    layer: number,
  ) {
    const { cfg: c, loader: L, ctx: x } = m;
    const p = `model.layers.${layer}`;
    const embName = m.loader.has(`${p}.embed_tokens.weight`) ? `${p}.embed_tokens.weight` : "model.embed_tokens.weight";
    this.embed = x.weight(L.host(embName, [c.vocabSize, c.dim], "rows"));
    this.enorm = x.weight(L.host(`${p}.enorm.weight`, [c.dim]));
    this.hnorm = x.weight(L.host(`${p}.hnorm.weight`, [c.dim]));
    this.ehProj = x.weight(L.host(`${p}.eh_proj.weight`, [c.dim, 2 * c.dim]));
    this.block = new Block(m, layer);
    this.norm = x.weight(L.host(`${p}.shared_head.norm.weight`, [c.dim]));
    const headName = m.loader.has(`${p}.shared_head.head.weight`) ? `${p}.shared_head.head.weight` : "lm_head.weight";
    this.head = x.weight(L.host(headName, [c.vocabSize, c.dim], "rows"));
  }
}

export interface ForwardResult {
  /** [rows, vocab] logits of the rows asked for */
  logits: Float32Array;
  /** final-normed hidden states of every token of the step (feeds the MTP block) */
  hidden: Tensor;
}

export interface TransformerOptions {
  rank?: RankInfo;
  /** load the MTP block (default: when the checkpoint has one) */
  mtp?: boolean;
  /** progress of reading weights: bytes read so far */
  onRead?: (bytes: number) => void;
}

export class Transformer {
  readonly loader: WeightSource;
  readonly rank: RankInfo;
  readonly invFreq: Float32Array;
  readonly attnFactor: number;
  embed: Weight;
  layers: Block[] = [];
  norm: Weight;
  head: Weight;
  mtp: MTP | null = null;
  cache: LatentCache | null = null;
  /** per-token width of the latent cache: kv_lora_rank + qk_rope_head_dim */
  readonly cacheWidth: number;
  readonly cacheLayers: number;

  constructor(
    readonly ctx: BackendContext,
    source: Checkpoint | WeightSource,
    readonly cfg: ModelConfig,
    opts: TransformerOptions = {},
  ) {
    this.rank = opts.rank ?? { rank: 0, worldSize: 1 };
    checkParallel(cfg, this.rank.worldSize);
    this.loader = source instanceof Checkpoint ? new WeightLoader(source, this.rank, opts.onRead) : source;
    const L = this.loader;
    this.embed = ctx.weight(L.host("model.embed_tokens.weight", [cfg.vocabSize, cfg.dim], "rows"));
    for (let i = 0; i < cfg.nLayers; i++) this.layers.push(new Block(this, i));
    this.norm = ctx.weight(L.host("model.norm.weight", [cfg.dim]));
    this.head = ctx.weight(L.host(cfg.tieWordEmbeddings && !L.has("lm_head.weight") ? "model.embed_tokens.weight" : "lm_head.weight", [cfg.vocabSize, cfg.dim], "rows"));
    const wantMtp = opts.mtp ?? cfg.nMtpLayers > 0;
    if (wantMtp && cfg.nMtpLayers > 0) this.mtp = new MTP(this, cfg.nLayers);
    this.cacheWidth = cfg.kvLoraRank + cfg.qkRopeHeadDim;
    this.cacheLayers = cfg.nLayers + (this.mtp ? 1 : 0);
    // derived tables only once the checkpoint's shapes have agreed with the config
    const rf = ropeFrequencies(cfg);
    this.invFreq = rf.invFreq;
    this.attnFactor = rf.attnFactor;
  }

  /** Allocate the paged latent cache (this rank holds the whole latent: MLA's cache is shared by all heads). */
  allocCache(numBlocks: number, blockSize: number, dtype: "f32" | "bf16" = "f32"): LatentCache {
    this.cache = this.ctx.createCache(this.cacheLayers, numBlocks, blockSize, this.cacheWidth, dtype);
    return this.cache;
  }

  private checkIds(ids: Int32Array): void {
    for (let i = 0; i < ids.length; i++) {
      const t = ids[i]!;
      if (!(t >= 0 && t < this.cfg.vocabSize)) throw new RangeError(`token id ${t} at index ${i} is outside the vocabulary [0, ${this.cfg.vocabSize})`);
    }
  }

  private vocabStart(): number {
    return (this.rank.rank * this.cfg.vocabSize) / this.rank.worldSize;
  }

  /** One step over the flat tokens of several sequences; logits for `logitRows` (indices into the step's tokens). */
  forward(ids: Int32Array, meta: AttnMeta, logitRows: Int32Array): ForwardResult {
    if (!this.cache) throw new Error("allocCache() before forward()");
    this.checkIds(ids);
    const x = this.ctx;
    let h = x.allReduce(x.embed(this.embed, ids, this.vocabStart()));
    for (const b of this.layers) h = b.forward(h, meta);
    const hidden = x.rmsNorm(h, this.norm, this.cfg.rmsNormEps);
    return { logits: this.logits(this.head, hidden, logitRows), hidden };
  }

  private logits(head: Weight, hidden: Tensor, rows: Int32Array): Float32Array {
    if (rows.length === 0) return new Float32Array(0);
    return this.ctx.download(this.logitsTensor(head, hidden, rows));
  }

  private logitsTensor(head: Weight, hidden: Tensor, rows: Int32Array): Tensor {
    const x = this.ctx;
    return x.allGatherCols(x.linear(x.rows(hidden, rows), head));
  }

  /**
   * `forward`, but the rows asked for are sampled on the device (backends with `sample`): only ids
   * and their logprobs come back. Ids at or past `vocabLimit` are never sampled.
   */
  forwardSampled(
    ids: Int32Array,
    meta: AttnMeta,
    logitRows: Int32Array,
    s: { params: DeviceSampling[]; u: Float64Array; vocabLimit: number },
  ): { ids: Int32Array; logprobs: Float32Array; hidden: Tensor } {
    const x = this.ctx;
    if (!x.sample) throw new Error(`backend ${x.name} cannot sample on the device`);
    if (!this.cache) throw new Error("allocCache() before forward()");
    this.checkIds(ids);
    let h = x.allReduce(x.embed(this.embed, ids, this.vocabStart()));
    for (const b of this.layers) h = b.forward(h, meta);
    const hidden = x.rmsNorm(h, this.norm, this.cfg.rmsNormEps);
    let lt = this.logitsTensor(this.head, hidden, logitRows);
    if (s.vocabLimit < this.cfg.vocabSize) lt = x.slice(lt, 0, s.vocabLimit);
    return { ...x.sample(lt, s.params, s.u), hidden };
  }

  /**
   * The MTP block: for each token t of the step, combine the main model's final hidden state
   * `hidden[t]` with the embedding of the token that follows it (`nextIds[t]`), run the MTP
   * layer at the same position (its own cache layer), and return logits that predict the token
   * after next.
   */
  forwardMtp(hidden: Tensor, nextIds: Int32Array, meta: AttnMeta, logitRows: Int32Array): { logits: Float32Array; hidden: Tensor } {
    const m = this.mtp;
    if (!m) throw new Error("this model has no MTP block loaded");
    this.checkIds(nextIds);
    const x = this.ctx;
    const c = this.cfg;
    const e = x.rmsNorm(x.allReduce(x.embed(m.embed, nextIds, this.vocabStart())), m.enorm, c.rmsNormEps);
    let h = x.linear(x.concat(e, x.rmsNorm(hidden, m.hnorm, c.rmsNormEps)), m.ehProj);
    h = m.block.forward(h, meta);
    const out = x.rmsNorm(h, m.norm, c.rmsNormEps);
    return { logits: this.logits(m.head, out, logitRows), hidden: out };
  }
}
