// The text-level API that the CLI and the server share: load a model (a checkpoint directory
// or the built-in tiny model), then stream completions and chats as text + tokens.
import { existsSync, readFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { type BackendOptions, type BackendProvider, checkProvider, type Precision, resolvePrecision } from "./backend.js";
import { placeRanks } from "./devices.js";
import { Engine, type EngineOptions, type FinishReason, type RequestMetrics, type Drafter } from "./engine.js";
import { type CacheSpec, type Executor, LocalExecutor, cacheBytesPerBlock, loadConfig } from "./executor.js";
import { checkParallel } from "./model.js";
import { checkNodeOptions, DEFAULT_DIST_TIMEOUT_MS, ds3Version, modelIdentity, NodeHub, type NodeOptions, runNode } from "./nodes.js";
import { RankExecutor } from "./ranks.js";
import { type SampleResult, type SamplingParams, StopMatcher } from "./sampling.js";
import { type ChatMessage, Tokenizer } from "./tokenizer.js";
import { ensureBuiltinModel } from "./builtin.js";
import { warnUnusedTensors } from "./checks.js";

export interface LoadOptions {
  /** checkpoint directory; default: the built-in tiny model (generated on first use) */
  model?: string;
  backend: BackendProvider;
  backendOptions?: BackendOptions;
  /** tensor/expert parallel ranks (worker threads, one per rank) */
  tp?: number;
  /**
   * Where the model runs at `tp` 1. "worker" (the default when the backend says where its module
   * is, `BackendProvider.entry`): in a worker thread of its own (a RankExecutor of one rank), so the
   * steps never block this thread's event loop — an HTTP server on it keeps answering (/health,
   * new connections, streams) while a step runs. "thread": in this thread (LocalExecutor; also the
   * default for providers without `entry`), for tests and debugging: one call stack, no worker, and
   * the executor's model and backend context at hand; every step blocks the event loop while it runs.
   * With `tp` > 1 the ranks always run in workers.
   */
  executor?: "worker" | "thread";
  /** device per rank (indices into the backend's `devices()`, `--devices 0,1`); default: rank r on device r */
  devices?: number[];
  /** allow ranks to share a device (testing on one accelerator; `--share-devices`): device collectives off */
  shareDevices?: boolean;
  /**
   * ranks over several nodes (processes or machines; `--nnodes --node-rank --dist-init-addr`):
   * `tp` is the total, tp/nnodes ranks per node, numbered node-major; `devices` is per node.
   * DS3.load is node 0 (the engine); the other nodes run `DS3.runNode` with the same options.
   */
  nnodes?: number;
  /** this node's rank (0: the engine and the server); default 0 */
  nodeRank?: number;
  /** HOST:PORT where node 0 listens for the other nodes */
  distInitAddr?: string;
  /** how long node 0 waits for the other nodes, and they retry reaching it (ms, default 300 000) */
  distTimeoutMs?: number;
  /**
   * the node group's shared secret (`--dist-token` / DS3_DIST_TOKEN): the same on every node; each
   * proves it knows it in the handshake (HMAC-SHA256 challenge-response), it never travels
   */
  distToken?: string;
  /**
   * heartbeat interval between nodes (ms; default $DS3_DIST_HEARTBEAT_MS, else 2000): a node
   * silent for 15 intervals is lost and the requests in flight fail naming it. Node 0's value
   * holds for the group.
   */
  distHeartbeatMs?: number;
  /** a step that a rank does not answer within this many ms fails (default 300 000) */
  stepTimeoutMs?: number;
  /** cache: block count or byte budget; block size 64; dtype fp32 unless given */
  cacheBlocks?: number;
  cacheBytes?: number;
  cacheDtype?: "f32" | "bf16";
  maxModelLen?: number;
  maxBatchTokens?: number;
  prefillChunk?: number;
  maxWaiting?: number;
  prefixCaching?: boolean;
  speculative?: { drafter: "mtp" | Drafter; k?: number };
  precision?: Partial<Precision>;
  onProgress?: (message: string) => void;
  /** weights read so far (bytes) of the whole checkpoint; at tp 1 only (ranks load in parallel workers) */
  onWeights?: (done: number, total: number) => void;
  /** warnings about the checkpoint (e.g. tensors the model never reads); default: process.emitWarning */
  onWarning?: (message: string) => void;
}

export interface CompletionRequest {
  /** text (tokenized as is, no template) or token ids */
  prompt: string | number[];
  sampling?: SamplingParams;
  signal?: AbortSignal;
}

export interface CompletionChunk {
  text: string;
  ids: number[];
  samples: SampleResult[];
  finishReason?: FinishReason;
  metrics?: RequestMetrics;
}

const DEFAULT_BLOCK = 64;

export class DS3 {
  private constructor(
    readonly engine: Engine,
    readonly tokenizer: Tokenizer | null,
    readonly modelDir: string,
    readonly modelName: string,
    readonly builtin: boolean,
    /** sampling defaults from generation_config.json */
    readonly generationDefaults: SamplingParams,
  ) {}

  get executor(): Executor {
    return this.engine.executor;
  }

  static async load(o: LoadOptions): Promise<DS3> {
    const builtin = o.model === undefined;
    const dir = builtin ? await ensureBuiltinModel({ onProgress: o.onProgress }) : resolve(o.model!);
    if (!existsSync(join(dir, "config.json"))) throw new Error(`${dir}: not a model directory (no config.json)`);
    const cfg = loadConfig(dir);
    const tp = o.tp ?? 1;
    if (!Number.isInteger(tp) || tp < 1) throw new Error(`--tp must be a positive integer, got ${o.tp}`);
    if (o.executor !== undefined && o.executor !== "worker" && o.executor !== "thread") throw new Error(`executor must be "worker" or "thread", got ${JSON.stringify(o.executor)}`);
    if (o.executor === "thread" && tp > 1) throw new Error(`executor "thread" runs one rank; tp ${tp} needs worker ranks`);
    const nnodes = o.nnodes ?? 1;
    const multi = nnodes > 1 || (o.nodeRank ?? 0) > 0;
    if (multi) {
      checkNodeOptions(nodeOptions(o), tp);
      if ((o.nodeRank ?? 0) > 0) throw new Error(`node rank ${o.nodeRank} runs only its ranks, not the engine: call DS3.runNode with these options (ds3 serve/generate --node-rank ${o.nodeRank} do)`);
      if (o.executor === "thread") throw new Error(`executor "thread" runs one rank in this process; --nnodes ${nnodes} needs worker ranks`);
    }
    if (o.executor === "worker" && !o.backend.entry) throw new Error(`backend ${o.backend.name} cannot run in a worker thread (it does not say where its module is: BackendProvider.entry)`);
    const inThread = !multi && tp === 1 && (o.executor === "thread" || (o.executor === undefined && !o.backend.entry));
    // the placement, before any weight is read (the ranks check it again where they import the backend)
    checkProvider(o.backend);
    const placement = placeRanks(o.backend, tp / nnodes, { devices: o.devices, shareDevices: o.shareDevices });
    const mtp = o.speculative?.drafter === "mtp";
    const dtype = o.cacheDtype ?? "f32";
    const perBlock = cacheBytesPerBlock(cfg, DEFAULT_BLOCK, dtype, cfg.nMtpLayers > 0 && mtp);
    const maxLen = o.maxModelLen ?? Math.min(cfg.maxPositionEmbeddings, 4096);
    const numBlocks = o.cacheBlocks ?? (o.cacheBytes ? Math.floor(o.cacheBytes / perBlock) : Math.max(16, Math.ceil(maxLen / DEFAULT_BLOCK) * 4));
    if (numBlocks < 1) throw new Error(`the cache budget holds no block (one block needs ${perBlock} bytes)`);
    if (o.maxModelLen !== undefined && o.maxModelLen > numBlocks * DEFAULT_BLOCK)
      throw new Error(`max model length ${o.maxModelLen} exceeds what the cache holds (${numBlocks} blocks x ${DEFAULT_BLOCK} = ${numBlocks * DEFAULT_BLOCK} tokens): raise the cache budget or lower the max model length`);
    const cache: CacheSpec = { numBlocks, blockSize: DEFAULT_BLOCK, dtype };
    o.onProgress?.(`loading ${builtin ? "the built-in tiny model" : dir} on ${o.backend.name}${tp > 1 ? ` x${tp} ranks` : ""}`);
    const backendOptions = { ...o.backendOptions, precision: { ...o.backendOptions?.precision, ...o.precision, cache: dtype } };
    let nodes: NodeHub | undefined;
    if (multi) {
      checkParallel(cfg, tp); // before waiting for anyone
      const timeoutMs = o.distTimeoutMs ?? DEFAULT_DIST_TIMEOUT_MS;
      nodes = await NodeHub.listen({
        addr: o.distInitAddr!,
        timeoutMs,
        ...(o.distToken !== undefined && { token: o.distToken }),
        ...(o.distHeartbeatMs !== undefined && { heartbeatMs: o.distHeartbeatMs }),
        onProgress: o.onProgress,
        me: { version: ds3Version(), nnodes, nodeRank: 0, worldSize: tp, model: modelIdentity(dir), backend: o.backend.name, precision: resolvePrecision(backendOptions.precision) },
      });
      o.onProgress?.(`all ${nnodes} nodes joined: loading ${tp} ranks (${tp / nnodes} per node)`);
    }
    const executor: Executor = inThread
      ? new LocalExecutor(dir, { backend: o.backend, backendOptions: { ...backendOptions, device: placement.devices[0]! }, cache, mtp, onWeights: o.onWeights })
      : await RankExecutor.create(dir, {
          backendPackage: backendEntry(o.backend),
          backendOptions,
          devices: placement.devices,
          shareDevices: o.shareDevices,
          cache,
          mtp,
          worldSize: tp,
          ...(o.stepTimeoutMs !== undefined && { stepTimeoutMs: o.stepTimeoutMs }),
          // one rank has no collective to hang in: no step deadline, as in this thread
          ...(tp === 1 && { stepTimeoutMs: Infinity, onWeights: o.onWeights }),
          ...(nodes && { nodes }),
        }).catch(async (e: unknown) => {
          await nodes?.close(e instanceof Error ? e.message : String(e)); // the other nodes exit with the reason
          throw e;
        });
    warnUnusedTensors(dir, cfg, o.onWarning);
    let tokenizer: Tokenizer | null = null;
    // a checkpoint without tokenizer files gets the DeepSeek-V3 tokenizer only if the vocabularies fit
    if (existsSync(join(dir, "tokenizer.json")) || cfg.vocabSize >= 128815) tokenizer = await Tokenizer.load(dir);
    const eos = [...cfg.eosTokenId];
    if (tokenizer && !eos.includes(tokenizer.eosId)) eos.push(tokenizer.eosId);
    // the tokenizer's ids are [0, vocabLimit) when it has no holes: then the device may sample
    let vocabLimit: number | undefined;
    if (tokenizer) {
      vocabLimit = tokenizer.vocabSize;
      for (let i = 0; i < tokenizer.vocabSize; i++)
        if (tokenizer.isTextless(i)) {
          vocabLimit = undefined;
          break;
        }
    }
    const eo: EngineOptions = {
      executor,
      maxModelLen: Math.min(maxLen, numBlocks * DEFAULT_BLOCK),
      maxBatchTokens: o.maxBatchTokens,
      prefillChunk: o.prefillChunk,
      maxWaiting: o.maxWaiting,
      prefixCaching: o.prefixCaching,
      speculative: o.speculative,
      eosIds: eos,
      allowedIds: tokenizer ? (id) => !tokenizer!.isTextless(id) : undefined,
      vocabLimit,
    };
    let engine: Engine;
    try {
      engine = new Engine(eo);
    } catch (e) {
      await executor.close();
      throw e;
    }
    const name = builtin ? "ds3-builtin-tiny" : dir.split(/[\\/]/).filter(Boolean).pop()!;
    return new DS3(engine, tokenizer, dir, name, builtin, readGenerationConfig(dir));
  }

  /**
   * Run the ranks of node `nodeRank` > 0 for node 0's engine (the same options as node 0's
   * DS3.load: model, backend, tp, nnodes, distInitAddr, devices, precision): joins node 0, loads
   * this node's ranks when node 0 loads, runs their steps; resolves when node 0 ends normally,
   * rejects when it ended after a failure, went away, or refused this node (a mismatch).
   */
  static async runNode(o: LoadOptions): Promise<void> {
    const tp = o.tp ?? 1;
    if (!Number.isInteger(tp) || tp < 1) throw new Error(`--tp must be a positive integer, got ${o.tp}`);
    const n = nodeOptions(o);
    checkNodeOptions(n, tp);
    if (n.nodeRank === 0) throw new Error("node 0 runs the engine: DS3.load (DS3.runNode is for node ranks 1 and up)");
    const dir = o.model === undefined ? await ensureBuiltinModel({ onProgress: o.onProgress }) : resolve(o.model);
    if (!existsSync(join(dir, "config.json"))) throw new Error(`${dir}: not a model directory (no config.json)`);
    checkProvider(o.backend);
    const precision = { ...o.backendOptions?.precision, ...o.precision, cache: o.cacheDtype ?? "f32" };
    await runNode({
      ...n,
      dir,
      backendPackage: backendEntry(o.backend),
      backendOptions: { ...o.backendOptions, precision },
      worldSize: tp,
      ...(o.devices && { devices: o.devices }),
      ...(o.shareDevices !== undefined && { shareDevices: o.shareDevices }),
      onProgress: o.onProgress,
    });
  }

  /** Sampling: explicit fields win, then generation_config.json, then greedy. */
  resolveSampling(p: SamplingParams = {}): SamplingParams {
    const d = this.generationDefaults;
    return { temperature: d.temperature ?? 0, ...(d.topP !== undefined && { topP: d.topP }), ...(d.topK !== undefined && { topK: d.topK }), ...stripUndefined(p) };
  }

  encode(text: string): number[] {
    if (!this.tokenizer) throw new Error(`model ${this.modelName} has no tokenizer: give token ids`);
    return this.tokenizer.encode(text, { addSpecial: true });
  }

  renderChat(messages: ChatMessage[], opts: { tools?: unknown[]; addGenerationPrompt?: boolean; variables?: Record<string, unknown> } = {}): { text: string; ids: number[] } {
    if (!this.tokenizer) throw new Error(`model ${this.modelName} has no tokenizer: chat needs one`);
    const text = this.tokenizer.applyChatTemplate(messages, { addGenerationPrompt: opts.addGenerationPrompt ?? true, tools: opts.tools as never, variables: opts.variables });
    // the template already starts with BOS
    return { text, ids: this.tokenizer.encode(text, { addSpecial: false }) };
  }

  /** Stream a completion: text deltas never split a UTF-8 character nor pass a stop string. */
  async *complete(req: CompletionRequest): AsyncGenerator<CompletionChunk> {
    const ids = typeof req.prompt === "string" ? this.encode(req.prompt) : req.prompt;
    const sampling = this.resolveSampling(req.sampling);
    const dec = this.tokenizer?.streamDecoder({ skipSpecial: true }) ?? null;
    const stop = new StopMatcher(sampling.stop ?? []);
    for await (const ev of this.engine.generate({ promptIds: ids, sampling, signal: req.signal })) {
      let text = "";
      let stopped = false;
      if (dec) {
        for (const id of ev.ids) text += dec.push(id);
        if (ev.finishReason) text += dec.flush();
        const r = stop.push(text);
        text = r.emit;
        stopped = r.stopped;
        if (ev.finishReason && !stopped) text += stop.flush();
      }
      if (stopped) {
        yield { text, ids: ev.ids, samples: ev.samples, finishReason: "stop", metrics: ev.metrics };
        return; // leaving the loop aborts the sequence in the engine
      }
      yield { text, ids: ev.ids, samples: ev.samples, ...(ev.finishReason && { finishReason: ev.finishReason }), ...(ev.metrics && { metrics: ev.metrics }) };
    }
  }

  /** Stream a chat reply (the chat template renders the conversation). */
  chat(messages: ChatMessage[], opts: { sampling?: SamplingParams; signal?: AbortSignal; tools?: unknown[] } = {}): AsyncGenerator<CompletionChunk> {
    const { ids } = this.renderChat(messages, { tools: opts.tools });
    return this.complete({ prompt: ids, sampling: opts.sampling, signal: opts.signal });
  }

  async close(): Promise<void> {
    await this.engine.close();
  }
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

function readGenerationConfig(dir: string): SamplingParams {
  const p = join(dir, "generation_config.json");
  if (!existsSync(p)) return {};
  try {
    const g = JSON.parse(readFileSync(p, "utf8")) as Record<string, unknown>;
    if (g.do_sample === false) return { temperature: 0 };
    const out: SamplingParams = {};
    if (typeof g.temperature === "number") out.temperature = g.temperature;
    if (typeof g.top_p === "number") out.topP = g.top_p;
    if (typeof g.top_k === "number" && g.top_k > 0) out.topK = g.top_k;
    return out;
  } catch (e) {
    throw new Error(`${p}: ${(e as Error).message}`);
  }
}

function nodeOptions(o: LoadOptions): NodeOptions {
  return {
    nnodes: o.nnodes ?? 1,
    nodeRank: o.nodeRank ?? 0,
    distInitAddr: o.distInitAddr!,
    ...(o.distTimeoutMs !== undefined && { distTimeoutMs: o.distTimeoutMs }),
    ...(o.distToken !== undefined && { distToken: o.distToken }),
    ...(o.distHeartbeatMs !== undefined && { heartbeatMs: o.distHeartbeatMs }),
  };
}

function backendEntry(b: BackendProvider): string {
  if (!b.entry) throw new Error(`backend ${b.name} cannot run in worker ranks (it does not say where its module is)`);
  return b.entry;
}
