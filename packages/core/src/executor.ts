// The executor runs the model for the engine: one step description in, logits out.
// LocalExecutor runs one rank in this thread; RankExecutor (ranks.ts) runs N ranks in
// worker threads with the same interface. The engine never knows which it has.
import { type BackendContext, type BackendOptions, type BackendProvider, checkProvider, type DeviceSampling, requireOps, resolvePrecision, type Tensor } from "./backend.js";
import { placeRanks } from "./devices.js";
import { checkRanksFit } from "./fit.js";
import { type ModelConfig, parseConfig } from "./config.js";
import { Transformer } from "./model.js";
import { Checkpoint } from "./safetensors.js";
import { type Rng, Sampler } from "./sampling.js";
import { readFileSync } from "node:fs";
import { join } from "node:path";

/** One step: the flat tokens of every scheduled sequence, where they sit, and what to return. */
export interface StepInput {
  ids: Int32Array;
  positions: Int32Array;
  seqIdx: Int32Array;
  /** per sequence: maxBlocks block ids (row-major), -1 past the end */
  blockTables: Int32Array;
  maxBlocks: number;
  /** rows (indices into ids) whose logits are returned, in order */
  logitRows: Int32Array;
}

/**
 * MTP draft step, run right after a target step: for the given rows of that step's tokens,
 * combine their final hidden states with `nextIds` (the token that follows each), write the
 * MTP layer's cache at the same positions, and return logits predicting the token after.
 */
export interface MtpInput {
  rows: Int32Array;
  nextIds: Int32Array;
  positions: Int32Array;
  seqIdx: Int32Array;
  blockTables: Int32Array;
  maxBlocks: number;
  logitRows: Int32Array;
}

export interface CacheSpec {
  numBlocks: number;
  blockSize: number;
  dtype: "f32" | "bf16";
}

/** Device sampling for a step: one parameter set and one uniform draw per logit row. */
export interface StepSampling {
  params: DeviceSampling[];
  u: Float64Array;
  /** ids at or past this are never sampled (the tokenizer's vocabulary ends there) */
  vocabLimit: number;
}

/**
 * Samples logit rows on the host with the given uniform draws, exactly as the engine's Sampler
 * samples them (same code, same draw): what a backend's `sample` op does on a device, for
 * executors whose backend has none. RankExecutor's rank 0 runs it in its worker, so neither the
 * full logits nor the sampling work reach the engine's thread.
 */
export class RowSampler {
  private readonly samplers = new Map<string, Sampler>();

  sample(logits: Float32Array, vocabSize: number, s: StepSampling): { ids: Int32Array; logprobs: Float32Array } {
    const rows = s.params.length;
    const lim = s.vocabLimit;
    if (!(Number.isInteger(lim) && lim > 0 && lim <= vocabSize)) throw new RangeError(`vocabLimit ${lim} outside [1, ${vocabSize}]`);
    if (logits.length !== rows * vocabSize) throw new RangeError(`${logits.length} logits are not ${rows} rows of ${vocabSize}`);
    if (s.u.length < rows) throw new RangeError(`${s.u.length} draws for ${rows} rows`);
    const ids = new Int32Array(rows);
    const logprobs = new Float32Array(rows);
    for (let r = 0; r < rows; r++) {
      const q = s.params[r]!;
      const key = `${lim} ${q.temperature} ${q.topK} ${q.topP} ${q.minP}`;
      let sampler = this.samplers.get(key);
      if (!sampler) {
        // a sampler holds vocabulary-sized buffers: keep the few parameter sets in use
        if (this.samplers.size >= 32) this.samplers.delete(this.samplers.keys().next().value!);
        sampler = new Sampler({ temperature: q.temperature, topK: q.topK, topP: q.topP, minP: q.minP }, { size: lim });
        this.samplers.set(key, sampler);
      }
      const u = s.u[r]!;
      const res = sampler.sample(logits.subarray(r * vocabSize, r * vocabSize + lim), NO_HISTORY, { next: () => u } as Rng);
      ids[r] = res.id;
      logprobs[r] = res.logprob;
    }
    return { ids, logprobs };
  }
}

const NO_HISTORY = { prompt: [], output: [] };

export interface Executor {
  readonly config: ModelConfig;
  readonly vocabSize: number;
  readonly hasMtp: boolean;
  readonly cache: CacheSpec;
  readonly worldSize: number;
  readonly backendName: string;
  step(input: StepInput): Promise<Float32Array>;
  /** whether `stepSampled` is there: the backend samples on the device */
  readonly canSampleOnDevice?: boolean;
  /** `step`, with the logit rows sampled on the device: only ids and logprobs cross back */
  stepSampled?(input: StepInput, sampling: StepSampling): Promise<{ ids: Int32Array; logprobs: Float32Array }>;
  mtp(input: MtpInput): Promise<Float32Array>;
  /** latent cache rows of rank 0 (tests: cache contents) */
  readCache(layer: number, slot: number, count: number): Promise<Float32Array>;
  /** set once a rank failed or a node was lost (RankExecutor): every further step fails with it; /health reports it */
  readonly failed?: Error | null;
  close(): Promise<void>;
}

export interface ModelLoadOptions {
  backend: BackendProvider;
  backendOptions?: BackendOptions;
  cache: CacheSpec;
  mtp?: boolean;
  /** progress of reading this rank's weights: (bytes read, bytes of the whole checkpoint) */
  onWeights?: (done: number, total: number) => void;
}

export function loadConfig(dir: string): ModelConfig {
  const p = join(dir, "config.json");
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(p, "utf8"));
  } catch (e) {
    throw new Error(`${p}: ${(e as NodeJS.ErrnoException).code === "ENOENT" ? "not found" : (e as Error).message}`);
  }
  return parseConfig(raw, p);
}

/** Bytes of the latent cache per block (all layers, this rank). */
export function cacheBytesPerBlock(cfg: ModelConfig, blockSize: number, dtype: "f32" | "bf16", mtp: boolean): number {
  return (cfg.nLayers + (mtp ? 1 : 0)) * blockSize * (cfg.kvLoraRank + cfg.qkRopeHeadDim) * (dtype === "f32" ? 4 : 2);
}

/** One rank in the calling thread. */
export class LocalExecutor implements Executor {
  readonly model: Transformer;
  readonly ctx: BackendContext;
  readonly worldSize = 1;
  private last: Tensor | null = null;

  constructor(
    dir: string,
    readonly opts: ModelLoadOptions,
  ) {
    const cfg = loadConfig(dir);
    checkProvider(opts.backend);
    requireOps(opts.backend, resolvePrecision(opts.backendOptions?.precision));
    if (opts.backendOptions?.device !== undefined) placeRanks(opts.backend, 1, { devices: [opts.backendOptions.device] });
    const ck = Checkpoint.open(dir);
    // weights + cache must fit the device: checked from the headers, before any weight is read
    try {
      checkRanksFit({ provider: opts.backend, ck, cfg, worldSize: 1, devices: [opts.backendOptions?.device ?? 0], cache: opts.cache, mtp: opts.mtp });
    } catch (e) {
      ck.close();
      throw e;
    }
    const total = opts.onWeights ? ck.names().reduce((a, n) => a + ck.info(n).nbytes, 0) : 0;
    let done = 0;
    const onRead = opts.onWeights ? (b: number) => opts.onWeights!((done += b), total) : undefined;
    try {
      this.ctx = opts.backend.create(opts.backendOptions);
    } catch (e) {
      ck.close();
      throw e;
    }
    // a load that fails part way releases what the backend holds (weights uploaded so far)
    try {
      this.model = new Transformer(this.ctx, ck, cfg, { mtp: opts.mtp, onRead });
      this.model.allocCache(opts.cache.numBlocks, opts.cache.blockSize, opts.cache.dtype);
    } catch (e) {
      this.ctx.dispose();
      throw e;
    } finally {
      ck.close();
    }
  }
  get config() {
    return this.model.cfg;
  }
  get vocabSize() {
    return this.model.cfg.vocabSize;
  }
  get hasMtp() {
    return this.model.mtp !== null;
  }
  get cache() {
    return this.opts.cache;
  }
  get backendName() {
    return this.ctx.name;
  }
  async step(s: StepInput): Promise<Float32Array> {
    this.ctx.beginStep();
    const r = this.model.forward(s.ids, s, s.logitRows);
    this.last = r.hidden;
    return r.logits;
  }
  get canSampleOnDevice(): boolean {
    return typeof this.ctx.sample === "function";
  }
  async stepSampled(s: StepInput, sampling: StepSampling): Promise<{ ids: Int32Array; logprobs: Float32Array }> {
    this.ctx.beginStep();
    const r = this.model.forwardSampled(s.ids, s, s.logitRows, sampling);
    this.last = r.hidden;
    return { ids: r.ids, logprobs: r.logprobs };
  }
  async mtp(s: MtpInput): Promise<Float32Array> {
    if (!this.last) throw new Error("mtp() needs a target step first");
    const h = this.ctx.rows(this.last, s.rows);
    return this.model.forwardMtp(h, s.nextIds, s, s.logitRows).logits;
  }
  async readCache(layer: number, slot: number, count: number): Promise<Float32Array> {
    return this.ctx.readCache(this.model.cache!, layer, slot, count);
  }
  async close(): Promise<void> {
    this.ctx.dispose();
  }
}
