// The engine: continuous batching over a paged MLA latent cache, chunked prefill, prefix
// caching, preemption by recompute, abort, and speculative decoding (MTP or any drafter).
// It runs on the caller's thread and drives an Executor (one rank in a worker or in this thread,
// or N ranks in workers) with one step description per step.
import type { Executor, StepInput, StepSampling } from "./executor.js";
import { GREEDY_EPS, Rng, Sampler, type SampleResult, type SamplingParams, validateSampling } from "./sampling.js";

export class EngineError extends Error {
  override name = "EngineError";
  constructor(
    message: string,
    readonly code: "invalid_request" | "context_length_exceeded" | "engine_closed" | "engine_failed" | "aborted" = "invalid_request",
  ) {
    super(message);
  }
}

// ---------------------------------------------------------------------------------------
// Paged blocks with prefix caching

const NO_HASH = -1n;
/** longest stretch of a step's host work (ms) before the engine lets the event loop run */
const HOST_SLICE_MS = 10;

class BlockManager {
  readonly refs: Int32Array;
  readonly hashOf: BigInt64Array;
  private free: number[] = [];
  /** cached, unreferenced blocks in LRU order (Map keeps insertion order) */
  private evictable = new Map<number, true>();
  private byHash = new Map<bigint, number>();
  hitTokens = 0;
  queriedTokens = 0;

  constructor(
    readonly numBlocks: number,
    readonly blockSize: number,
  ) {
    this.refs = new Int32Array(numBlocks);
    this.hashOf = new BigInt64Array(numBlocks).fill(NO_HASH);
    for (let i = numBlocks - 1; i >= 0; i--) this.free.push(i);
  }

  get available(): number {
    return this.free.length + this.evictable.size;
  }
  get used(): number {
    return this.numBlocks - this.available;
  }

  alloc(): number | null {
    let b = this.free.pop();
    if (b === undefined) {
      const it = this.evictable.keys().next();
      if (it.done) return null;
      b = it.value;
      this.evictable.delete(b);
      this.byHash.delete(this.hashOf[b]!);
      this.hashOf[b] = NO_HASH;
    }
    this.refs[b] = 1;
    return b;
  }

  release(b: number): void {
    if (--this.refs[b]! > 0) return;
    if (this.hashOf[b] !== NO_HASH) this.evictable.set(b, true);
    else this.free.push(b);
  }

  /** Look up a full block by its chain hash; takes a reference on a hit. */
  lookup(h: bigint): number | null {
    const b = this.byHash.get(h);
    if (b === undefined) return null;
    if (this.refs[b] === 0) this.evictable.delete(b);
    this.refs[b]!++;
    return b;
  }

  /** A block became full with known contents: make it findable. */
  register(b: number, h: bigint): void {
    if (this.hashOf[b] !== NO_HASH || this.byHash.has(h)) return;
    this.hashOf[b] = h;
    this.byHash.set(h, b);
  }
}

/** FNV-1a 64 over the parent hash and the block's token ids. */
function chainHash(parent: bigint, ids: ArrayLike<number>, from: number, to: number): bigint {
  let h = 0xcbf29ce484222325n ^ parent;
  const P = 0x100000001b3n;
  const M = (1n << 64n) - 1n;
  for (let i = from; i < to; i++) {
    h = ((h ^ BigInt(ids[i]! >>> 0)) * P) & M;
    h = ((h ^ 0x9en) * P) & M;
  }
  return BigInt.asIntN(64, h);
}

// ---------------------------------------------------------------------------------------
// Requests and sequences

export interface GenerateRequest {
  promptIds: number[];
  sampling?: SamplingParams;
  /** ids that end the sequence (EOS); default: the model's eos ids */
  eosIds?: number[];
  signal?: AbortSignal;
  id?: string;
  /**
   * Called before each token is sampled with the output ids so far and a copy of that position's
   * logits, which it may change in place (e.g. set ids to -Infinity for constrained decoding).
   * It must not throw, and must leave at least one id finite.
   */
  logitsProcessor?: (outputIds: readonly number[], logits: Float32Array) => void;
  /**
   * Prompt scoring: called with the raw logits at each prompt position (once per position, in order;
   * the view is only valid during the call). Prefix caching is skipped for such a request, and with
   * maxTokens 0 the prompt still runs. It must not throw.
   */
  onPromptLogits?: (position: number, logits: Float32Array) => void;
}

export type FinishReason = "stop" | "length" | "abort";

export interface TokenEvent {
  /** tokens produced by this step (more than one when drafts were accepted) */
  ids: number[];
  samples: SampleResult[];
  finishReason?: FinishReason;
  /** which stop token ended it */
  stopTokenId?: number;
  metrics?: RequestMetrics;
}

export interface RequestMetrics {
  promptTokens: number;
  cachedTokens: number;
  generatedTokens: number;
  /** seconds */
  timeToFirstToken: number;
  timePerOutputToken: number;
  e2eLatency: number;
  queueTime: number;
}

/** A drafter proposes up to k next tokens for a sequence; the target model verifies them. */
export interface Drafter {
  readonly name: string;
  propose(seq: { id: string; tokens: readonly number[]; promptLength: number }, k: number): number[];
}

interface Seq {
  id: string;
  tokens: number[];
  promptLen: number;
  /** tokens whose latents are in the cache */
  computed: number;
  blocks: number[];
  /** chain hashes of the full blocks registered so far */
  hashes: bigint[];
  /** validated sampling parameters */
  params: SamplingParams;
  /** the host sampler, made on first use (steps sampled by the executor never need one) */
  sampler: Sampler | null;
  rng: Rng;
  maxTokens: number;
  eos: Set<number>;
  status: "waiting" | "running" | "done";
  arrival: number;
  t0: number;
  tFirst: number;
  cachedTokens: number;
  drafts: number[];
  /** MTP proposal for the next step */
  mtpDraft: number | null;
  queue: TokenEvent[];
  wake: (() => void) | null;
  error: Error | null;
  order: number;
  processor?: GenerateRequest["logitsProcessor"];
  onPromptLogits?: GenerateRequest["onPromptLogits"];
  /** prompt positions whose logits went to onPromptLogits */
  scored: number;
}

export interface EngineOptions {
  executor: Executor;
  /** longest sequence (prompt + output) a request may have; default: what the cache holds */
  maxModelLen?: number;
  /** token budget of one step (decode tokens + prefill chunks) */
  maxBatchTokens?: number;
  /** largest prefill chunk of one sequence in one step */
  prefillChunk?: number;
  maxRunning?: number;
  /** most requests waiting for admission; beyond it `generate` throws a queue_full error */
  maxWaiting?: number;
  prefixCaching?: boolean;
  /** speculative decoding: "mtp" uses the checkpoint's MTP block; or a custom drafter */
  speculative?: { drafter: "mtp" | Drafter; k?: number };
  /** ids the sampler may emit (the tokenizer's), default all */
  allowedIds?: (id: number) => boolean;
  /**
   * The allowed ids are exactly [0, vocabLimit): then steps whose requests need no penalties,
   * logprobs or logits processors are sampled on the device by backends that can (only ids cross back).
   */
  vocabLimit?: number;
  /** let the executor sample plain steps when it can: on the device, or in its rank worker (default true) */
  deviceSampling?: boolean;
  eosIds?: number[];
}

export interface EngineStats {
  running: number;
  waiting: number;
  cacheBlocksTotal: number;
  cacheBlocksUsed: number;
  cacheUsage: number;
  prefixHitRate: number;
  prefixHitTokens: number;
  prefixQueriedTokens: number;
  specProposed: number;
  specAccepted: number;
  specAcceptance: number;
  preemptions: number;
  steps: number;
  /** steps whose tokens the executor sampled (on the device, or in its rank worker): only ids came back */
  deviceSampledSteps: number;
  promptTokens: number;
  generatedTokens: number;
  requestsFinished: number;
}

export class Engine {
  readonly blocks: BlockManager;
  readonly maxModelLen: number;
  private waiting: Seq[] = [];
  private running: Seq[] = [];
  private loopRunning = false;
  private closed = false;
  private failure: Error | null = null;
  private counter = 0;
  private allowedMask: Uint8Array | null = null;
  private stats_ = { specProposed: 0, specAccepted: 0, preemptions: 0, steps: 0, deviceSampledSteps: 0, promptTokens: 0, generatedTokens: 0, requestsFinished: 0 };
  readonly opts: Required<Omit<EngineOptions, "speculative" | "allowedIds" | "eosIds" | "vocabLimit">> &
    Pick<EngineOptions, "speculative" | "allowedIds" | "eosIds" | "vocabLimit">;

  constructor(opts: EngineOptions) {
    const ex = opts.executor;
    const bs = ex.cache.blockSize;
    const capacity = ex.cache.numBlocks * bs;
    const maxModelLen = opts.maxModelLen ?? Math.min(capacity, ex.config.maxPositionEmbeddings);
    if (!Number.isInteger(maxModelLen) || maxModelLen < 1) throw new EngineError(`max model length must be a positive integer, got ${maxModelLen}`);
    if (maxModelLen > capacity)
      throw new EngineError(`max model length ${maxModelLen} exceeds what the cache holds (${ex.cache.numBlocks} blocks x ${bs} = ${capacity} tokens)`);
    if (opts.speculative?.drafter === "mtp" && !ex.hasMtp) throw new EngineError("speculative decoding with MTP needs a checkpoint with an MTP block (num_nextn_predict_layers > 0)");
    this.opts = {
      executor: ex,
      maxModelLen,
      maxBatchTokens: opts.maxBatchTokens ?? 2048,
      prefillChunk: opts.prefillChunk ?? 512,
      maxRunning: opts.maxRunning ?? 256,
      maxWaiting: opts.maxWaiting ?? 4096,
      prefixCaching: opts.prefixCaching ?? true,
      speculative: opts.speculative,
      allowedIds: opts.allowedIds,
      eosIds: opts.eosIds,
      vocabLimit: opts.vocabLimit,
      deviceSampling: opts.deviceSampling ?? true,
    };
    if (this.opts.prefillChunk < 1 || this.opts.maxBatchTokens < 1) throw new EngineError("prefillChunk and maxBatchTokens must be >= 1");
    this.maxModelLen = maxModelLen;
    this.blocks = new BlockManager(ex.cache.numBlocks, bs);
  }

  get executor(): Executor {
    return this.opts.executor;
  }

  stats(): EngineStats {
    const s = this.stats_;
    const b = this.blocks;
    return {
      running: this.running.length,
      waiting: this.waiting.length,
      cacheBlocksTotal: b.numBlocks,
      cacheBlocksUsed: b.used,
      cacheUsage: b.used / b.numBlocks,
      prefixHitRate: b.queriedTokens ? b.hitTokens / b.queriedTokens : 0,
      prefixHitTokens: b.hitTokens,
      prefixQueriedTokens: b.queriedTokens,
      specProposed: s.specProposed,
      specAccepted: s.specAccepted,
      specAcceptance: s.specProposed ? s.specAccepted / s.specProposed : 0,
      preemptions: s.preemptions,
      steps: s.steps,
      deviceSampledSteps: s.deviceSampledSteps,
      promptTokens: s.promptTokens,
      generatedTokens: s.generatedTokens,
      requestsFinished: s.requestsFinished,
    };
  }

  /** Validate a request now (errors name the problem) and stream its tokens. */
  generate(req: GenerateRequest): AsyncIterable<TokenEvent> {
    const seq = this.admit(req);
    return this.stream(seq, req.signal);
  }

  private admit(req: GenerateRequest): Seq {
    if (this.failure) throw new EngineError(`engine failed: ${this.failure.message}`, "engine_failed");
    if (this.closed) throw new EngineError("engine is shut down", "engine_closed");
    const ids = req.promptIds;
    const V = this.executor.vocabSize;
    if (!Array.isArray(ids) || ids.length === 0) throw new EngineError("prompt must have at least one token");
    for (let i = 0; i < ids.length; i++) {
      const t = ids[i];
      if (!Number.isInteger(t) || t! < 0 || t! >= V) throw new EngineError(`prompt token id ${t} at index ${i} is outside the vocabulary [0, ${V})`);
    }
    const sp = validateSampling(req.sampling ?? {});
    const maxTokens = sp.maxTokens ?? this.maxModelLen - ids.length;
    if (ids.length >= this.maxModelLen && !(ids.length === this.maxModelLen && maxTokens === 0))
      throw new EngineError(`prompt has ${ids.length} tokens, the maximum context length is ${this.maxModelLen}`, "context_length_exceeded");
    if (ids.length + maxTokens > this.maxModelLen)
      throw new EngineError(
        `prompt (${ids.length} tokens) + max_tokens (${maxTokens}) = ${ids.length + maxTokens} exceeds the maximum context length ${this.maxModelLen}`,
        "context_length_exceeded",
      );
    if (this.waiting.length >= this.opts.maxWaiting) throw Object.assign(new EngineError("too many requests waiting", "invalid_request"), { queueFull: true });
    const eos = new Set(sp.ignoreEos ? [] : (req.eosIds ?? this.opts.eosIds ?? this.executor.config.eosTokenId));
    for (const s of sp.stopTokenIds ?? []) eos.add(s);
    const now = performance.now();
    const seq: Seq = {
      id: req.id ?? `req-${++this.counter}`,
      tokens: [...ids],
      promptLen: ids.length,
      computed: 0,
      blocks: [],
      hashes: [],
      params: sp,
      sampler: null,
      rng: new Rng(sp.seed),
      maxTokens,
      eos,
      status: "waiting",
      arrival: now,
      t0: now,
      tFirst: 0,
      cachedTokens: 0,
      drafts: [],
      mtpDraft: null,
      queue: [],
      wake: null,
      error: null,
      order: this.counter,
      processor: req.logitsProcessor,
      onPromptLogits: req.onPromptLogits,
      scored: 0,
    };
    this.stats_.promptTokens += ids.length;
    if (maxTokens === 0 && !req.onPromptLogits) {
      this.finish(seq, "length");
      return seq;
    }
    this.waiting.push(seq);
    this.kick();
    return seq;
  }

  private async *stream(seq: Seq, signal?: AbortSignal): AsyncGenerator<TokenEvent> {
    const onAbort = () => this.abortSeq(seq);
    if (signal?.aborted) onAbort();
    signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for (;;) {
        while (seq.queue.length === 0 && !seq.error) await new Promise<void>((r) => (seq.wake = r));
        if (seq.queue.length) {
          const ev = seq.queue.shift()!;
          yield ev;
          if (ev.finishReason) return;
          continue;
        }
        throw seq.error!;
      }
    } finally {
      signal?.removeEventListener("abort", onAbort);
      // the consumer stopped early (break / return / throw): abort
      if (seq.status !== "done") this.abortSeq(seq);
    }
  }

  /** Abort by request id; returns whether it was found. */
  abort(id: string): boolean {
    const s = this.running.find((x) => x.id === id) ?? this.waiting.find((x) => x.id === id);
    if (!s) return false;
    this.abortSeq(s);
    return true;
  }

  private abortSeq(seq: Seq): void {
    if (seq.status === "done") return;
    this.finish(seq, "abort");
  }

  private push(seq: Seq, ev: TokenEvent): void {
    seq.queue.push(ev);
    const w = seq.wake;
    seq.wake = null;
    w?.();
  }

  private fail(seq: Seq, err: Error): void {
    this.freeSeq(seq);
    seq.status = "done";
    seq.error = err;
    const w = seq.wake;
    seq.wake = null;
    w?.();
  }

  private freeSeq(seq: Seq): void {
    for (const b of seq.blocks) this.blocks.release(b);
    seq.blocks = [];
    seq.hashes = [];
    this.running = this.running.filter((s) => s !== seq);
    this.waiting = this.waiting.filter((s) => s !== seq);
  }

  private metrics(seq: Seq): RequestMetrics {
    const now = performance.now();
    const gen = seq.tokens.length - seq.promptLen;
    const ttft = seq.tFirst ? (seq.tFirst - seq.arrival) / 1000 : 0;
    return {
      promptTokens: seq.promptLen,
      cachedTokens: seq.cachedTokens,
      generatedTokens: gen,
      timeToFirstToken: ttft,
      timePerOutputToken: gen > 1 && seq.tFirst ? (now - seq.tFirst) / 1000 / (gen - 1) : 0,
      e2eLatency: (now - seq.arrival) / 1000,
      queueTime: (seq.t0 - seq.arrival) / 1000,
    };
  }

  private finish(seq: Seq, reason: FinishReason, ev?: Omit<TokenEvent, "finishReason">): void {
    this.freeSeq(seq);
    seq.status = "done";
    this.stats_.requestsFinished++;
    this.push(seq, { ids: ev?.ids ?? [], samples: ev?.samples ?? [], ...(ev?.stopTokenId !== undefined && { stopTokenId: ev.stopTokenId }), finishReason: reason, metrics: this.metrics(seq) });
  }

  // -------------------------------------------------------------------------------------
  // scheduling

  private kick(): void {
    if (this.loopRunning || this.closed) return;
    this.loopRunning = true;
    setImmediate(() => void this.loop());
  }

  private async loop(): Promise<void> {
    try {
      while (!this.closed && (this.running.length || this.waiting.length)) {
        await this.step();
        // let I/O (HTTP clients, aborts) through between steps
        await new Promise<void>((r) => setImmediate(r));
      }
    } catch (e) {
      const err = e instanceof Error ? e : new Error(String(e));
      this.failure = err;
      for (const s of [...this.running, ...this.waiting]) this.fail(s, new EngineError(`engine step failed: ${err.message}`, "engine_failed"));
      // shut down cleanly: release the executor (worker ranks end); later requests get the error at once
      this.closed = true;
      await this.executor.close().catch(() => {});
    } finally {
      this.loopRunning = false;
    }
  }

  /** Make sure `seq` has blocks for its first `n` tokens; false if the cache is out of blocks. */
  private ensureBlocks(seq: Seq, n: number): boolean {
    const need = Math.ceil(n / this.blocks.blockSize);
    while (seq.blocks.length < need) {
      const b = this.blocks.alloc();
      if (b === null) return false;
      seq.blocks.push(b);
    }
    return true;
  }

  /** Free blocks past what `n` tokens need (rejected drafts leave nothing behind). */
  private trimBlocks(seq: Seq, n: number): void {
    const need = Math.ceil(n / this.blocks.blockSize);
    while (seq.blocks.length > need) this.blocks.release(seq.blocks.pop()!);
  }

  private preempt(victim: Seq): void {
    for (const b of victim.blocks) this.blocks.release(b);
    victim.blocks = [];
    victim.hashes = [];
    victim.computed = 0;
    victim.drafts = [];
    victim.mtpDraft = null;
    victim.status = "waiting";
    this.running = this.running.filter((s) => s !== victim);
    this.waiting.unshift(victim);
    this.stats_.preemptions++;
  }

  /** Take prefix-cache hits for a sequence about to start (re)computing. */
  private attachPrefix(seq: Seq): void {
    if (!this.opts.prefixCaching || seq.computed > 0 || seq.onPromptLogits) return;
    const bs = this.blocks.blockSize;
    // never the block holding the last token: its logits must be computed
    const full = Math.floor((seq.tokens.length - 1) / bs);
    let h = 0n;
    this.blocks.queriedTokens += full * bs;
    for (let i = 0; i < full; i++) {
      h = chainHash(h, seq.tokens, i * bs, (i + 1) * bs);
      const b = this.blocks.lookup(h);
      if (b === null) break;
      seq.blocks.push(b);
      seq.hashes.push(h);
      seq.computed += bs;
      this.blocks.hitTokens += bs;
    }
    seq.cachedTokens = Math.max(seq.cachedTokens, seq.computed);
  }

  private registerFull(seq: Seq): void {
    if (!this.opts.prefixCaching) return;
    const bs = this.blocks.blockSize;
    while (seq.hashes.length < Math.floor(seq.computed / bs)) {
      const i = seq.hashes.length;
      const h = chainHash(i ? seq.hashes[i - 1]! : 0n, seq.tokens, i * bs, (i + 1) * bs);
      seq.hashes.push(h);
      this.blocks.register(seq.blocks[i]!, h);
    }
  }

  private async step(): Promise<void> {
    const spec = this.opts.speculative;
    const k = spec ? Math.max(1, spec.k ?? 1) : 0;
    let budget = this.opts.maxBatchTokens;
    const plan: Array<{ seq: Seq; start: number; n: number; drafts: number[] }> = [];

    // 1. running sequences, oldest first: decode (1 + drafts) or the next prefill chunk
    for (let i = 0; i < this.running.length; i++) {
      const seq = this.running[i]!;
      if (budget <= 0) break;
      const remaining = seq.tokens.length - seq.computed;
      let n: number;
      let drafts: number[] = [];
      if (remaining === 1 && spec) {
        drafts = this.propose(seq, k);
        // never draft past max tokens or the model length
        const room = Math.min(seq.promptLen + seq.maxTokens, this.maxModelLen) - seq.tokens.length;
        drafts = drafts.slice(0, Math.max(0, Math.min(room - 1, budget - 1)));
        n = 1 + drafts.length;
      } else n = Math.min(remaining, this.opts.prefillChunk, budget);
      while (!this.ensureBlocks(seq, seq.computed + n)) {
        // out of blocks: preempt the newest running sequence (possibly this one)
        const victim = this.running[this.running.length - 1]!;
        this.preempt(victim);
        if (victim === seq) break;
      }
      if (seq.status !== "running") {
        i--;
        continue;
      }
      plan.push({ seq, start: seq.computed, n, drafts });
      budget -= n;
    }
    // 2. admit waiting sequences while blocks and budget allow
    while (this.waiting.length && budget > 0 && this.running.length < this.opts.maxRunning) {
      const seq = this.waiting[0]!;
      this.attachPrefix(seq);
      const n = Math.min(seq.tokens.length - seq.computed, this.opts.prefillChunk, budget);
      if (!this.ensureBlocks(seq, seq.computed + n)) {
        this.trimBlocks(seq, 0);
        seq.blocks = [];
        seq.hashes = [];
        seq.computed = 0;
        break;
      }
      this.waiting.shift();
      seq.status = "running";
      if (seq.t0 === seq.arrival) seq.t0 = performance.now();
      this.running.push(seq);
      plan.push({ seq, start: seq.computed, n, drafts: [] });
      budget -= n;
    }
    if (plan.length === 0) {
      if (this.running.length === 0 && this.waiting.length) {
        // cannot happen for admissible requests; fail rather than spin
        const s = this.waiting.shift()!;
        this.fail(s, new EngineError("request does not fit in the cache"));
      }
      return;
    }

    // 3. one step description
    const bs = this.blocks.blockSize;
    const maxBlocks = Math.max(...plan.map((p) => Math.ceil((p.start + p.n) / bs)));
    const T = plan.reduce((a, p) => a + p.n, 0);
    const ids = new Int32Array(T);
    const positions = new Int32Array(T);
    const seqIdx = new Int32Array(T);
    const blockTables = new Int32Array(plan.length * maxBlocks).fill(-1);
    const logitRows: number[] = [];
    const rowsOf: Array<{ first: number; count: number; score: boolean }> = [];
    let r = 0;
    plan.forEach((p, si) => {
      const toks = p.drafts.length ? [p.seq.tokens[p.start]!, ...p.drafts] : p.seq.tokens.slice(p.start, p.start + p.n);
      for (let j = 0; j < p.n; j++) {
        ids[r + j] = toks[j]!;
        positions[r + j] = p.start + j;
        seqIdx[r + j] = si;
      }
      p.seq.blocks.forEach((b, j) => {
        if (j < maxBlocks) blockTables[si * maxBlocks + j] = b;
      });
      const endsPrompt = p.start + p.n === p.seq.tokens.length || p.drafts.length > 0;
      const first = logitRows.length;
      const score = !!p.seq.onPromptLogits && p.start < p.seq.promptLen && !p.drafts.length;
      if (score) for (let j = 0; j < p.n; j++) logitRows.push(r + j);
      else if (endsPrompt) for (let j = p.drafts.length ? 0 : p.n - 1; j < p.n; j++) logitRows.push(r + j);
      rowsOf.push({ first, count: logitRows.length - first, score });
      r += p.n;
    });
    const input: StepInput = { ids, positions, seqIdx, blockTables, maxBlocks, logitRows: Int32Array.from(logitRows) };
    const dev = this.deviceSampling(plan, rowsOf);
    let logits: Float32Array = new Float32Array(0);
    let picked: { ids: Int32Array; logprobs: Float32Array } | null = null;
    if (dev) {
      picked = await this.executor.stepSampled!(input, dev);
      this.stats_.deviceSampledSteps++;
    } else logits = await this.executor.step(input);
    this.stats_.steps++;
    const V = this.executor.vocabSize;

    // 4. sample, verify drafts, append, stop
    const mtpRows: number[] = [];
    const mtpNext: number[] = [];
    const mtpPos: number[] = [];
    const mtpSeq: number[] = [];
    const mtpLogitRows: number[] = [];
    const mtpOwners: Seq[] = [];
    let row0 = 0;
    const settle = (p: (typeof plan)[number], si: number): void => {
      const seq = p.seq;
      let { first, count } = rowsOf[si]!;
      const stepRow0 = row0;
      row0 += p.n;
      if (seq.status !== "running") return; // aborted while the step ran
      if (rowsOf[si]!.score) {
        for (let j = 0; j < p.n; j++) {
          const pos = p.start + j;
          if (pos < seq.scored || pos >= seq.promptLen) continue;
          seq.onPromptLogits!(pos, logits.subarray((first + j) * V, (first + j + 1) * V));
          seq.scored = pos + 1;
        }
        const ends = p.start + p.n === seq.tokens.length;
        if (ends && seq.maxTokens === 0) {
          seq.computed += p.n;
          this.finish(seq, "length");
          return;
        }
        // only the row that ends the prompt is sampled
        first += p.n - 1;
        count = ends ? 1 : 0;
      }
      if (count === 0) {
        seq.computed += p.n;
        this.registerFull(seq);
        if (this.opts.speculative?.drafter === "mtp") this.collectMtp(seq, p.start, p.n, stepRow0, si, mtpRows, mtpNext, mtpPos, mtpSeq);
        return;
      }
      const produced: number[] = [];
      const samples: SampleResult[] = [];
      let stopId: number | undefined;
      let reason: FinishReason | undefined;
      for (let j = 0; j < count; j++) {
        let s: SampleResult;
        if (picked) s = { id: picked.ids[first + j]!, logprob: picked.logprobs[first + j]! };
        else {
          let lg = logits.subarray((first + j) * V, (first + j + 1) * V);
          if (seq.processor) {
            lg = lg.slice();
            seq.processor(seq.tokens.slice(seq.promptLen), lg);
          }
          s = this.samplerOf(seq).sample(lg, { prompt: seq.tokens.slice(0, seq.promptLen), output: seq.tokens.slice(seq.promptLen) }, seq.rng);
        }
        seq.tokens.push(s.id);
        produced.push(s.id);
        samples.push(s);
        if (seq.eos.has(s.id)) {
          reason = "stop";
          stopId = s.id;
          break;
        }
        if (seq.tokens.length - seq.promptLen >= seq.maxTokens || seq.tokens.length >= this.maxModelLen) {
          reason = "length";
          break;
        }
        if (j < p.drafts.length) {
          this.stats_.specProposed++;
          if (s.id === p.drafts[j]) this.stats_.specAccepted++;
          else break; // rejected: the sampled token replaces the draft
        }
      }
      // rows whose latents are now valid: the fed token plus the accepted drafts
      const valid = p.drafts.length ? produced.length : p.n;
      seq.computed = p.start + valid;
      this.trimBlocks(seq, seq.tokens.length);
      this.registerFull(seq);
      this.stats_.generatedTokens += produced.length;
      if (!seq.tFirst) seq.tFirst = performance.now();
      if (reason) {
        this.finish(seq, reason, { ids: produced, samples, stopTokenId: stopId });
        return;
      }
      this.push(seq, { ids: produced, samples });
      if (this.opts.speculative?.drafter === "mtp") {
        this.collectMtp(seq, p.start, valid, stepRow0, si, mtpRows, mtpNext, mtpPos, mtpSeq);
        mtpLogitRows.push(mtpRows.length - 1);
        mtpOwners.push(seq);
      }
    };
    // host work per sequence (sampling over the vocabulary, logits processors, prompt scoring) adds
    // up over a big batch: let I/O through every few ms, so that the event loop (an HTTP server on
    // it) never waits for a whole step's worth of it. A sequence aborted meanwhile is skipped.
    let slice = performance.now();
    for (let si = 0; si < plan.length; si++) {
      settle(plan[si]!, si);
      if (si + 1 < plan.length && performance.now() - slice > HOST_SLICE_MS) {
        await new Promise<void>((r) => setImmediate(r));
        slice = performance.now();
      }
    }

    if (mtpRows.length) {
      const ml = await this.executor.mtp({
        rows: Int32Array.from(mtpRows),
        nextIds: Int32Array.from(mtpNext),
        positions: Int32Array.from(mtpPos),
        seqIdx: Int32Array.from(mtpSeq),
        blockTables,
        maxBlocks,
        logitRows: Int32Array.from(mtpLogitRows),
      });
      mtpOwners.forEach((seq, i) => {
        const lg = ml.subarray(i * V, (i + 1) * V);
        let best = 0;
        for (let v = 1; v < V; v++) if (lg[v]! > lg[best]!) best = v;
        seq.mtpDraft = this.opts.allowedIds && !this.opts.allowedIds(best) ? null : best;
      });
    }
  }

  /**
   * Device sampling for this step, when the backend can and every sampled row is plain: one row per
   * sequence (no drafts), no penalties, logprobs, logits processors or prompt scoring, and the allowed
   * ids are [0, vocabLimit). Each row's uniform draw comes from its request's RNG exactly as the host
   * Sampler would take it (none when greedy), so outputs do not depend on where sampling ran.
   */
  private deviceSampling(plan: Array<{ seq: Seq; drafts: number[] }>, rowsOf: Array<{ count: number; score: boolean }>): StepSampling | null {
    const ex = this.executor;
    if (!this.opts.deviceSampling || !ex.canSampleOnDevice || !ex.stepSampled) return null;
    if (this.opts.allowedIds && this.opts.vocabLimit === undefined) return null;
    const rows: Seq[] = [];
    for (let i = 0; i < plan.length; i++) {
      const { seq, drafts } = plan[i]!;
      const { count, score } = rowsOf[i]!;
      if (count === 0) continue;
      const sp = seq.params;
      if (score || drafts.length || count !== 1 || seq.processor || seq.onPromptLogits || sp.logprobs !== undefined) return null;
      if ((sp.repetitionPenalty ?? 1) !== 1 || (sp.frequencyPenalty ?? 0) !== 0 || (sp.presencePenalty ?? 0) !== 0) return null;
      rows.push(seq);
    }
    if (rows.length === 0) return null;
    const params = rows.map((q) => {
      const sp = q.params;
      return { temperature: sp.temperature ?? 1, topK: sp.topK ?? 0, topP: sp.topP ?? 1, minP: sp.minP ?? 0 };
    });
    const u = Float64Array.from(rows, (q, i) => (params[i]!.temperature < GREEDY_EPS ? 0 : q.rng.next()));
    return { params, u, vocabLimit: this.opts.vocabLimit ?? this.executor.vocabSize };
  }

  /**
   * A sequence's host sampler. Made on first use, with the allowed ids from a mask computed once:
   * making one per request at admission cost O(vocabulary) calls of `allowedIds` and three
   * vocabulary-sized buffers each, on this thread, for every request of a burst.
   */
  private samplerOf(seq: Seq): Sampler {
    if (seq.sampler) return seq.sampler;
    const V = this.executor.vocabSize;
    const allowed = this.opts.allowedIds;
    let mask = this.allowedMask;
    if (allowed && !mask) {
      mask = this.allowedMask = new Uint8Array(V);
      for (let i = 0; i < V; i++) mask[i] = allowed(i) ? 1 : 0;
    }
    return (seq.sampler = new Sampler(seq.params, { size: V, allowed: mask ? (id) => mask[id] === 1 : undefined }));
  }

  /** MTP rows for positions [start, start+n) of a sequence: hidden of row i with the token after it. */
  private collectMtp(seq: Seq, start: number, n: number, row0: number, si: number, rows: number[], next: number[], pos: number[], sidx: number[]): void {
    for (let j = 0; j < n; j++) {
      const p = start + j;
      if (p + 1 >= seq.tokens.length) break;
      rows.push(row0 + j);
      next.push(seq.tokens[p + 1]!);
      pos.push(p);
      sidx.push(si);
    }
  }

  private propose(seq: Seq, k: number): number[] {
    const spec = this.opts.speculative!;
    if (spec.drafter === "mtp") {
      const d = seq.mtpDraft;
      seq.mtpDraft = null;
      return d === null ? [] : [d];
    }
    const V = this.executor.vocabSize;
    const out = spec.drafter.propose({ id: seq.id, tokens: seq.tokens, promptLength: seq.promptLen }, k).slice(0, k);
    for (const d of out) if (!Number.isInteger(d) || d < 0 || d >= V) throw new EngineError(`drafter ${spec.drafter.name} proposed token ${d} outside the vocabulary`);
    return out;
  }

  /** Stop accepting work, abort everything in flight, and close the executor. */
  async close(): Promise<void> {
    if (this.closed) {
      while (this.loopRunning) await new Promise((r) => setTimeout(r, 5));
      return;
    }
    this.closed = true;
    for (const s of [...this.running, ...this.waiting]) this.abortSeq(s);
    while (this.loopRunning) await new Promise((r) => setTimeout(r, 5));
    await this.executor.close();
  }
}
