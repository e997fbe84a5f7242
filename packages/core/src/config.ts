// DeepSeek-V3 model configuration: Hugging Face `config.json` (and DeepSeek's own
// `configs/config_671B.json` form), validated with errors that name the field.

export class ConfigError extends Error {
  constructor(
    readonly field: string,
    /** what is wrong with the field, without the file and field prefix */
    readonly detail: string,
    readonly file?: string,
  ) {
    super(`${file ? `${file}: ` : ""}config field "${field}": ${detail}`);
    this.name = "ConfigError";
  }
}

export interface RopeScaling {
  type: "yarn" | "none";
  factor: number;
  originalMaxPositionEmbeddings: number;
  betaFast: number;
  betaSlow: number;
  mscale: number;
  mscaleAllDim: number;
}

export interface Quantization {
  method: "fp8";
  fmt: "e4m3";
  blockSize: [number, number];
  /** DeepSeek-V3.1: activation scales are powers of two (ue8m0). */
  scaleFmt: "float" | "ue8m0";
  activationScheme: "dynamic";
}

export interface ModelConfig {
  vocabSize: number;
  dim: number;
  interDim: number;
  moeInterDim: number;
  nLayers: number;
  nDenseLayers: number;
  nMtpLayers: number;
  nHeads: number;
  nRoutedExperts: number;
  nSharedExperts: number;
  nActivatedExperts: number;
  nExpertGroups: number;
  nLimitedGroups: number;
  scoreFunc: "sigmoid" | "softmax";
  topkMethod: "noaux_tc" | "greedy" | "group_limited_greedy";
  normTopkProb: boolean;
  routeScale: number;
  qLoraRank: number; // 0 = no q LoRA (q_proj)
  kvLoraRank: number;
  qkNopeHeadDim: number;
  qkRopeHeadDim: number;
  vHeadDim: number;
  ropeTheta: number;
  ropeScaling: RopeScaling;
  maxPositionEmbeddings: number;
  rmsNormEps: number;
  bosTokenId: number | null;
  eosTokenId: number[];
  tieWordEmbeddings: boolean;
  quantization: Quantization | null;
}

type Json = Record<string, unknown>;

/** transformers' DeepseekV3Config.__init__ defaults (models/deepseek_v3/configuration_deepseek_v3.py). */
export const DEEPSEEK_V3_DEFAULTS = {
  vocab_size: 129280,
  hidden_size: 7168,
  intermediate_size: 18432,
  moe_intermediate_size: 2048,
  num_hidden_layers: 61,
  num_attention_heads: 128,
  num_key_value_heads: 128,
  n_shared_experts: 1,
  n_routed_experts: 256,
  routed_scaling_factor: 2.5,
  kv_lora_rank: 512,
  q_lora_rank: 1536,
  qk_rope_head_dim: 64,
  v_head_dim: 128,
  qk_nope_head_dim: 128,
  n_group: 8,
  topk_group: 4,
  num_experts_per_tok: 8,
  first_k_dense_replace: 3,
  norm_topk_prob: true,
  hidden_act: "silu",
  max_position_embeddings: 4096,
  rms_norm_eps: 1e-6,
  bos_token_id: 0,
  eos_token_id: 1,
  tie_word_embeddings: false,
  rope_theta: 10000,
  attention_bias: false,
} as const;

/**
 * Upper bounds of the config's sizes: far above any DeepSeek-V3-family model (671B: hidden 7168,
 * 256 experts, 61 layers, rope dim 64), low enough that nothing derived from them is absurd.
 */
const LIMITS = {
  vocab: 1 << 24,
  dim: 1 << 16,
  inter: 1 << 20,
  layers: 1024,
  mtpLayers: 16,
  heads: 4096,
  experts: 1 << 16,
  sharedExperts: 1024,
  rank: 1 << 16,
  headDim: 1 << 14,
  scale: 1e6,
  ropeTheta: 1e12,
  positions: 1 << 30,
  ropeFactor: 1e6,
} as const;

function num(o: Json, key: string, file: string | undefined, opts: { int?: boolean; min?: number; max?: number; gt?: number; def?: number; alt?: string[] } = {}): number {
  let v = o[key];
  let name = key;
  if (v === undefined && opts.alt) {
    for (const a of opts.alt) if (o[a] !== undefined) { v = o[a]; name = a; break; }
  }
  if (v === undefined || v === null) {
    if (opts.def !== undefined) return opts.def;
    throw new ConfigError(key, "is missing", file);
  }
  if (typeof v !== "number" || !Number.isFinite(v)) throw new ConfigError(name, `must be a number, got ${JSON.stringify(v)}`, file);
  if (opts.int && !Number.isInteger(v)) throw new ConfigError(name, `must be an integer, got ${v}`, file);
  if (opts.min !== undefined && v < opts.min) throw new ConfigError(name, `must be >= ${opts.min}, got ${v}`, file);
  if (opts.gt !== undefined && !(v > opts.gt)) throw new ConfigError(name, `must be > ${opts.gt}, got ${v}`, file);
  // every size gets an upper bound, so that nothing absurd is allocated (or overflows) before the
  // checkpoint's shapes are compared with the config
  if (opts.max !== undefined && v > opts.max) throw new ConfigError(name, `must be <= ${opts.max}, got ${v}`, file);
  return v;
}

function str<T extends string>(o: Json, key: string, allowed: readonly T[], file: string | undefined, def?: T): T {
  const v = o[key];
  if (v === undefined || v === null) {
    if (def !== undefined) return def;
    throw new ConfigError(key, "is missing", file);
  }
  if (typeof v !== "string" || !(allowed as readonly string[]).includes(v))
    throw new ConfigError(key, `must be one of ${allowed.map((a) => JSON.stringify(a)).join(", ")}, got ${JSON.stringify(v)}`, file);
  return v as T;
}

function bool(o: Json, key: string, file: string | undefined, def: boolean): boolean {
  const v = o[key];
  if (v === undefined || v === null) return def;
  if (typeof v !== "boolean") throw new ConfigError(key, `must be true or false, got ${JSON.stringify(v)}`, file);
  return v;
}

/** Parse and validate a DeepSeek-V3 config (HF `config.json` or DeepSeek's `config_671B.json`). */
export function parseConfig(raw: unknown, file?: string): ModelConfig {
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw new ConfigError("(root)", "must be a JSON object", file);
  const o = raw as Json;
  // DeepSeek's own inference config form (`dim`, `n_layers`, ...) is mapped onto HF names.
  if (o.dim !== undefined && o.hidden_size === undefined) return parseDeepSeekForm(o, file);

  if (o.model_type === undefined || o.model_type === null)
    throw new ConfigError("model_type", `is missing (a Hugging Face config.json names its model type: "deepseek_v3")`, file);
  if (o.model_type !== "deepseek_v3") throw new ConfigError("model_type", `must be "deepseek_v3", got ${JSON.stringify(o.model_type)}`, file);
  // A field that is absent takes the default of transformers' DeepseekV3Config (as loading the
  // checkpoint with transformers would). Two routing fields are not DeepseekV3Config arguments:
  // transformers' DeepSeek-V3 model always routes with sigmoid scores and the bias-corrected
  // group-limited top-k, which is what DeepSeek-V3's own configuration_deepseek.py defaults to
  // (topk_method "noaux_tc", scoring_func "sigmoid"); the "greedy"/"softmax" defaults belong to
  // DeepSeek-V2's config and would silently drop V3's e_score_correction_bias.
  // num_nextn_predict_layers is not a DeepseekV3Config field either (transformers loads no MTP
  // block): absent, the checkpoint is taken to have none, and MTP tensors it holds anyway are
  // named in the unused-tensor warning.
  const D = DEEPSEEK_V3_DEFAULTS;
  const nLayers = num(o, "num_hidden_layers", file, { int: true, min: 1, max: LIMITS.layers, def: D.num_hidden_layers });
  const nHeads = num(o, "num_attention_heads", file, { int: true, min: 1, max: LIMITS.heads, def: D.num_attention_heads });
  const nRouted = num(o, "n_routed_experts", file, { int: true, min: 1, max: LIMITS.experts, def: D.n_routed_experts });
  // q_lora_rank: null means no q LoRA (q_proj); absent, transformers' default
  const qLora = o.q_lora_rank === null ? 0 : num(o, "q_lora_rank", file, { int: true, min: 0, max: LIMITS.rank, def: D.q_lora_rank });
  const cfg: ModelConfig = {
    vocabSize: num(o, "vocab_size", file, { int: true, min: 1, max: LIMITS.vocab, def: D.vocab_size }),
    dim: num(o, "hidden_size", file, { int: true, min: 1, max: LIMITS.dim, def: D.hidden_size }),
    interDim: num(o, "intermediate_size", file, { int: true, min: 1, max: LIMITS.inter, def: D.intermediate_size }),
    moeInterDim: num(o, "moe_intermediate_size", file, { int: true, min: 1, max: LIMITS.inter, def: D.moe_intermediate_size }),
    nLayers,
    nDenseLayers: num(o, "first_k_dense_replace", file, { int: true, min: 0, max: LIMITS.layers, def: D.first_k_dense_replace }),
    nMtpLayers: num(o, "num_nextn_predict_layers", file, { int: true, min: 0, max: LIMITS.mtpLayers, def: 0 }),
    nHeads,
    nRoutedExperts: nRouted,
    nSharedExperts: num(o, "n_shared_experts", file, { int: true, min: 0, max: LIMITS.sharedExperts, def: D.n_shared_experts }),
    nActivatedExperts: num(o, "num_experts_per_tok", file, { int: true, min: 1, max: LIMITS.experts, def: D.num_experts_per_tok }),
    nExpertGroups: num(o, "n_group", file, { int: true, min: 1, max: LIMITS.experts, def: D.n_group }),
    nLimitedGroups: num(o, "topk_group", file, { int: true, min: 1, max: LIMITS.experts, def: D.topk_group }),
    scoreFunc: str(o, "scoring_func", ["sigmoid", "softmax"] as const, file, "sigmoid"),
    topkMethod: str(o, "topk_method", ["noaux_tc", "greedy", "group_limited_greedy"] as const, file, "noaux_tc"),
    normTopkProb: bool(o, "norm_topk_prob", file, D.norm_topk_prob),
    routeScale: num(o, "routed_scaling_factor", file, { gt: 0, max: LIMITS.scale, def: D.routed_scaling_factor }),
    qLoraRank: qLora,
    kvLoraRank: num(o, "kv_lora_rank", file, { int: true, min: 1, max: LIMITS.rank, def: D.kv_lora_rank }),
    qkNopeHeadDim: num(o, "qk_nope_head_dim", file, { int: true, min: 1, max: LIMITS.headDim, def: D.qk_nope_head_dim }),
    qkRopeHeadDim: num(o, "qk_rope_head_dim", file, { int: true, min: 2, max: LIMITS.headDim, def: D.qk_rope_head_dim }),
    vHeadDim: num(o, "v_head_dim", file, { int: true, min: 1, max: LIMITS.headDim, def: D.v_head_dim }),
    ropeTheta: num(o, "rope_theta", file, { min: 1, max: LIMITS.ropeTheta, def: D.rope_theta }),
    ropeScaling: parseRopeScaling(o.rope_scaling, file),
    maxPositionEmbeddings: num(o, "max_position_embeddings", file, { int: true, min: 1, max: LIMITS.positions, def: D.max_position_embeddings }),
    rmsNormEps: num(o, "rms_norm_eps", file, { gt: 0, max: 1, def: D.rms_norm_eps }),
    bosTokenId: o.bos_token_id === null ? null : num(o, "bos_token_id", file, { int: true, min: 0, def: D.bos_token_id }),
    eosTokenId: o.eos_token_id === undefined ? [D.eos_token_id] : parseEos(o.eos_token_id, file),
    tieWordEmbeddings: bool(o, "tie_word_embeddings", file, D.tie_word_embeddings),
    quantization: parseQuant(o.quantization_config, file),
  };
  if (o.hidden_act !== undefined && o.hidden_act !== "silu") throw new ConfigError("hidden_act", `only "silu" is supported, got ${JSON.stringify(o.hidden_act)}`, file);
  if (o.moe_layer_freq !== undefined && o.moe_layer_freq !== 1) throw new ConfigError("moe_layer_freq", `only 1 is supported, got ${JSON.stringify(o.moe_layer_freq)}`, file);
  return checkConsistent(cfg, file);
}

function parseEos(v: unknown, file?: string): number[] {
  if (v === undefined || v === null) return [];
  const arr = Array.isArray(v) ? v : [v];
  for (const x of arr) if (typeof x !== "number" || !Number.isInteger(x) || x < 0) throw new ConfigError("eos_token_id", `must be a token id or a list of them, got ${JSON.stringify(v)}`, file);
  return arr as number[];
}

function parseRopeScaling(v: unknown, file?: string): RopeScaling {
  const none: RopeScaling = { type: "none", factor: 1, originalMaxPositionEmbeddings: 4096, betaFast: 32, betaSlow: 1, mscale: 1, mscaleAllDim: 0 };
  if (v === undefined || v === null) return none;
  if (typeof v !== "object" || Array.isArray(v)) throw new ConfigError("rope_scaling", "must be an object or null", file);
  const r = v as Json;
  const type = r.type ?? r.rope_type;
  if (type !== "yarn") throw new ConfigError("rope_scaling.type", `only "yarn" is supported, got ${JSON.stringify(type)}`, file);
  const f = (k: string, def?: number, min?: number, max?: number) => {
    try {
      return num(r, k, file, { def, min, max });
    } catch (e) {
      if (e instanceof ConfigError) throw new ConfigError(`rope_scaling.${k}`, e.detail, file);
      throw e;
    }
  };
  return {
    type: "yarn",
    factor: f("factor", undefined, 1, LIMITS.ropeFactor),
    originalMaxPositionEmbeddings: f("original_max_position_embeddings", 4096, 1, LIMITS.positions),
    betaFast: f("beta_fast", 32, -LIMITS.ropeFactor, LIMITS.ropeFactor),
    betaSlow: f("beta_slow", 1, -LIMITS.ropeFactor, LIMITS.ropeFactor),
    mscale: f("mscale", 1, -LIMITS.ropeFactor, LIMITS.ropeFactor),
    mscaleAllDim: f("mscale_all_dim", 0, -LIMITS.ropeFactor, LIMITS.ropeFactor),
  };
}

function parseQuant(v: unknown, file?: string): Quantization | null {
  if (v === undefined || v === null) return null;
  if (typeof v !== "object" || Array.isArray(v)) throw new ConfigError("quantization_config", "must be an object", file);
  const q = v as Json;
  if (q.quant_method !== "fp8") throw new ConfigError("quantization_config.quant_method", `only "fp8" is supported, got ${JSON.stringify(q.quant_method)}`, file);
  if (q.fmt !== undefined && q.fmt !== "e4m3") throw new ConfigError("quantization_config.fmt", `only "e4m3" is supported, got ${JSON.stringify(q.fmt)}`, file);
  const bs = q.weight_block_size ?? [128, 128];
  if (!Array.isArray(bs) || bs.length !== 2 || bs[0] !== 128 || bs[1] !== 128)
    throw new ConfigError("quantization_config.weight_block_size", `only [128, 128] is supported, got ${JSON.stringify(bs)}`, file);
  if (q.activation_scheme !== undefined && q.activation_scheme !== "dynamic")
    throw new ConfigError("quantization_config.activation_scheme", `only "dynamic" is supported, got ${JSON.stringify(q.activation_scheme)}`, file);
  const sf = q.scale_fmt;
  if (sf !== undefined && sf !== null && sf !== "ue8m0") throw new ConfigError("quantization_config.scale_fmt", `must be "ue8m0" or absent, got ${JSON.stringify(sf)}`, file);
  return { method: "fp8", fmt: "e4m3", blockSize: [128, 128], scaleFmt: sf === "ue8m0" ? "ue8m0" : "float", activationScheme: "dynamic" };
}

function parseDeepSeekForm(o: Json, file?: string): ModelConfig {
  // DeepSeek inference/configs/config_671B.json (see shared/seeds); V3.1's config_v3.1.json adds a
  // top-level `scale_fmt: "ue8m0"` (the HF form has it in quantization_config.scale_fmt).
  const dtype = str(o, "dtype", ["fp8", "bf16"] as const, file, "bf16");
  const scaleFmt = o.scale_fmt;
  if (scaleFmt !== undefined && scaleFmt !== null && scaleFmt !== "ue8m0")
    throw new ConfigError("scale_fmt", `must be "ue8m0" or absent, got ${JSON.stringify(scaleFmt)}`, file);
  const cfg: ModelConfig = {
    vocabSize: num(o, "vocab_size", file, { int: true, min: 1, max: LIMITS.vocab }),
    dim: num(o, "dim", file, { int: true, min: 1, max: LIMITS.dim }),
    interDim: num(o, "inter_dim", file, { int: true, min: 1, max: LIMITS.inter }),
    moeInterDim: num(o, "moe_inter_dim", file, { int: true, min: 1, max: LIMITS.inter }),
    nLayers: num(o, "n_layers", file, { int: true, min: 1, max: LIMITS.layers }),
    nDenseLayers: num(o, "n_dense_layers", file, { int: true, min: 0, def: 1, max: LIMITS.layers }),
    nMtpLayers: num(o, "n_mtp_layers", file, { int: true, min: 0, def: 0, max: LIMITS.mtpLayers }),
    nHeads: num(o, "n_heads", file, { int: true, min: 1, max: LIMITS.heads }),
    nRoutedExperts: num(o, "n_routed_experts", file, { int: true, min: 1, max: LIMITS.experts }),
    nSharedExperts: num(o, "n_shared_experts", file, { int: true, min: 0, def: 1, max: LIMITS.sharedExperts }),
    nActivatedExperts: num(o, "n_activated_experts", file, { int: true, min: 1, max: LIMITS.experts }),
    nExpertGroups: num(o, "n_expert_groups", file, { int: true, min: 1, def: 1, max: LIMITS.experts }),
    nLimitedGroups: num(o, "n_limited_groups", file, { int: true, min: 1, def: 1, max: LIMITS.experts }),
    scoreFunc: str(o, "score_func", ["sigmoid", "softmax"] as const, file, "softmax"),
    topkMethod: "noaux_tc",
    normTopkProb: true,
    routeScale: num(o, "route_scale", file, { gt: 0, def: 1, max: LIMITS.scale }),
    qLoraRank: num(o, "q_lora_rank", file, { int: true, min: 0, def: 0, max: LIMITS.rank }),
    kvLoraRank: num(o, "kv_lora_rank", file, { int: true, min: 1, max: LIMITS.rank }),
    qkNopeHeadDim: num(o, "qk_nope_head_dim", file, { int: true, min: 1, max: LIMITS.headDim }),
    qkRopeHeadDim: num(o, "qk_rope_head_dim", file, { int: true, min: 2, max: LIMITS.headDim }),
    vHeadDim: num(o, "v_head_dim", file, { int: true, min: 1, max: LIMITS.headDim }),
    ropeTheta: num(o, "rope_theta", file, { def: 10000, max: LIMITS.ropeTheta }),
    ropeScaling: {
      type: "yarn",
      factor: num(o, "rope_factor", file, { def: 40, max: LIMITS.ropeFactor }),
      originalMaxPositionEmbeddings: num(o, "original_seq_len", file, { def: 4096, max: LIMITS.positions }),
      betaFast: num(o, "beta_fast", file, { def: 32, max: LIMITS.ropeFactor }),
      betaSlow: num(o, "beta_slow", file, { def: 1, max: LIMITS.ropeFactor }),
      mscale: num(o, "mscale", file, { def: 1, max: LIMITS.ropeFactor }),
      mscaleAllDim: num(o, "mscale", file, { def: 1, max: LIMITS.ropeFactor }),
    },
    maxPositionEmbeddings: num(o, "max_seq_len", file, { def: 163840, max: LIMITS.positions }),
    rmsNormEps: 1e-6,
    bosTokenId: 0,
    eosTokenId: [1],
    tieWordEmbeddings: false,
    quantization:
      dtype === "fp8"
        ? { method: "fp8", fmt: "e4m3", blockSize: [128, 128], scaleFmt: scaleFmt === "ue8m0" ? "ue8m0" : "float", activationScheme: "dynamic" }
        : null,
  };
  return checkConsistent(cfg, file);
}

function checkConsistent(c: ModelConfig, file?: string): ModelConfig {
  if (c.nDenseLayers > c.nLayers) throw new ConfigError("first_k_dense_replace", `(${c.nDenseLayers}) exceeds num_hidden_layers (${c.nLayers})`, file);
  if (c.nRoutedExperts % c.nExpertGroups !== 0) throw new ConfigError("n_group", `(${c.nExpertGroups}) must divide n_routed_experts (${c.nRoutedExperts})`, file);
  if (c.nLimitedGroups > c.nExpertGroups) throw new ConfigError("topk_group", `(${c.nLimitedGroups}) exceeds n_group (${c.nExpertGroups})`, file);
  if (c.nActivatedExperts > c.nRoutedExperts) throw new ConfigError("num_experts_per_tok", `(${c.nActivatedExperts}) exceeds n_routed_experts (${c.nRoutedExperts})`, file);
  if (c.nActivatedExperts > c.nLimitedGroups * (c.nRoutedExperts / c.nExpertGroups))
    throw new ConfigError("num_experts_per_tok", `(${c.nActivatedExperts}) exceeds the experts in topk_group groups`, file);
  if (c.qkRopeHeadDim % 2 !== 0) throw new ConfigError("qk_rope_head_dim", `must be even, got ${c.qkRopeHeadDim}`, file);
  for (const e of c.eosTokenId) if (e >= c.vocabSize) throw new ConfigError("eos_token_id", `${e} is outside the vocabulary (${c.vocabSize})`, file);
  if (c.bosTokenId !== null && c.bosTokenId >= c.vocabSize) throw new ConfigError("bos_token_id", `${c.bosTokenId} is outside the vocabulary (${c.vocabSize})`, file);
  return c;
}

/** Softmax scale of MLA, with YaRN's mscale² when the context is extended. */
export function softmaxScale(c: ModelConfig): number {
  let s = 1 / Math.sqrt(c.qkNopeHeadDim + c.qkRopeHeadDim);
  if (c.ropeScaling.type === "yarn" && c.ropeScaling.mscaleAllDim) {
    const m = yarnMscale(c.ropeScaling.factor, c.ropeScaling.mscaleAllDim);
    s *= m * m;
  }
  return s;
}

function yarnMscale(scale: number, mscale: number): number {
  return scale <= 1 ? 1 : 0.1 * mscale * Math.log(scale) + 1;
}

/** YaRN inverse frequencies (as DeepSeek's `precompute_freqs_cis`, applied at every length) and the cos/sin factor. */
export function ropeFrequencies(c: ModelConfig): { invFreq: Float32Array; attnFactor: number } {
  const dim = c.qkRopeHeadDim;
  const base = c.ropeTheta;
  const half = dim / 2;
  const inv = new Float32Array(half);
  // computed in float32 as the reference does
  for (let i = 0; i < half; i++) inv[i] = Math.fround(1 / Math.fround(Math.pow(base, Math.fround((2 * i) / dim))));
  let attnFactor = 1;
  const r = c.ropeScaling;
  if (r.type === "yarn") {
    const corrDim = (rot: number) => (dim * Math.log(r.originalMaxPositionEmbeddings / (rot * 2 * Math.PI))) / (2 * Math.log(base));
    const low = Math.max(Math.floor(corrDim(r.betaFast)), 0);
    const high = Math.min(Math.ceil(corrDim(r.betaSlow)), dim - 1);
    const hi = low === high ? high + 0.001 : high;
    for (let i = 0; i < half; i++) {
      const ramp = Math.min(1, Math.max(0, Math.fround((i - low) / (hi - low))));
      const smooth = Math.fround(1 - ramp);
      const f = inv[i]!;
      inv[i] = Math.fround(Math.fround(Math.fround(f / r.factor) * Math.fround(1 - smooth)) + Math.fround(f * smooth));
    }
    attnFactor = yarnMscale(r.factor, r.mscale) / yarnMscale(r.factor, r.mscaleAllDim);
  }
  return { invFreq: inv, attnFactor };
}
