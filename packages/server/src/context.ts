// What every route shares: the model and its facts (vocabulary, context length, tokenizer),
// the request checks common to all generating routes, the grammar engine, the metrics and
// the admission queue. createServer() builds one per server; routes get it as their first argument.
import type { ChatMessage, Engine, SamplingParams, Tokenizer } from "@ds3/core";
import { ApiError, invalid } from "./errors.js";
import { type CompiledGrammar, GrammarError, type Grammars, createGrammars } from "./grammar.js";
import type { ServerMetrics } from "./metrics.js";
import type { ReasoningMode } from "./reasoning.js";
import { Admission } from "./stream.js";
import { type TokenTable, tokenTable } from "./tokens.js";
import type { CommonRequest, GrammarRequest } from "./validate.js";

/** What the server needs of a loaded model: @ds3/core's DS3 has all of it. */
export interface ServerModel {
  readonly engine: Engine;
  readonly tokenizer: Tokenizer | null;
  readonly modelName: string;
  resolveSampling(p?: SamplingParams): SamplingParams;
  renderChat(messages: ChatMessage[], opts?: { tools?: unknown[]; addGenerationPrompt?: boolean; variables?: Record<string, unknown> }): { text: string; ids: number[] };
}

export interface ServerContext {
  readonly ds3: ServerModel;
  readonly engine: Engine;
  /** the id clients send and /v1/models lists */
  readonly modelName: string;
  readonly tok: Tokenizer | null;
  readonly table: TokenTable | null;
  readonly vocabSize: number;
  readonly maxModelLen: number;
  readonly eosIds: number[];
  readonly reasoningMode: ReasoningMode;
  /** unix seconds the server was created (the model card's `created`) */
  readonly created: number;
  readonly metrics: ServerMetrics;
  readonly admission: Admission;
  readonly log: (line: string) => void;
  /** true once close() began */
  readonly closing: boolean;
  /** the grammar engine over this vocabulary (null without a tokenizer) */
  grammars(): Grammars | null;
  /** compile a request's constraint: GrammarError → 400 naming the field */
  compileGrammar(g: GrammarRequest): Promise<CompiledGrammar>;
  /** 404 model_not_found unless `model` is unset or names this server's model */
  checkModel(r: CommonRequest): void;
  /** 400 context_length_exceeded when prompt (+ max_tokens) does not fit */
  checkContext(promptLen: number, r: CommonRequest, promptParam: string): void;
  /** the request's sampling for choice `choice` (seeds differ per choice), defaults resolved */
  samplingFor(r: CommonRequest, choice: number): SamplingParams;
}

export function createContext(o: {
  ds3: ServerModel;
  modelName: string;
  reasoningMode: ReasoningMode;
  metrics: ServerMetrics;
  maxQueue: number;
  retryAfter: string;
  log: (line: string) => void;
  isClosing: () => boolean;
}): ServerContext {
  const { ds3, modelName } = o;
  const engine = ds3.engine;
  const vocabSize = engine.executor.vocabSize;
  const maxModelLen = engine.maxModelLen;
  const eosIds = [...new Set([...(engine.opts.eosIds ?? engine.executor.config.eosTokenId)])];
  const tok = ds3.tokenizer;
  const table: TokenTable | null = tok ? tokenTable(tok, vocabSize) : null;
  let grammars: Grammars | null = null;
  const getGrammars = () => (table ? (grammars ??= createGrammars(table, eosIds)) : null);
  const admission = new Admission(engine, table, o.metrics, o.maxQueue, o.retryAfter, o.isClosing);

  return {
    ds3,
    engine,
    modelName,
    tok,
    table,
    vocabSize,
    maxModelLen,
    eosIds,
    reasoningMode: o.reasoningMode,
    created: Math.floor(Date.now() / 1000),
    metrics: o.metrics,
    admission,
    log: o.log,
    get closing() {
      return o.isClosing();
    },
    grammars: getGrammars,
    async compileGrammar(g) {
      const gs = getGrammars();
      if (!gs) throw invalid(g.param, `model ${modelName} has no tokenizer, so structured output cannot apply`);
      try {
        return await gs.compile(g.spec);
      } catch (e) {
        if (e instanceof GrammarError) throw invalid(g.param, e.message, "invalid_grammar");
        throw e;
      }
    },
    checkModel(r) {
      if (r.model !== undefined && r.model !== modelName && r.model !== ds3.modelName)
        throw new ApiError(404, `The model '${r.model}' does not exist; this server serves '${modelName}'`, "model", "model_not_found");
    },
    checkContext(promptLen, r, promptParam) {
      const mt = r.maxTokens;
      if (promptLen > maxModelLen || (promptLen === maxModelLen && mt !== 0))
        throw new ApiError(
          400,
          `${promptParam}: This model's maximum context length is ${maxModelLen} tokens. However, your ${promptParam === "messages" ? "messages result" : "prompt results"} in ${promptLen} tokens.`,
          promptParam,
          "context_length_exceeded",
        );
      if (mt !== undefined && promptLen + mt > maxModelLen)
        throw new ApiError(
          400,
          `max_tokens is too large: ${mt}. This model's maximum context length is ${maxModelLen} tokens and your request has ${promptLen} input tokens (${promptLen} + ${mt} > ${maxModelLen}).`,
          "max_tokens",
          "context_length_exceeded",
        );
    },
    samplingFor(r, choice) {
      const s: SamplingParams = { ...r.sampling };
      if (s.seed !== undefined && choice > 0) s.seed = s.seed + choice;
      if (r.logprobs !== null) s.logprobs = r.logprobs;
      return ds3.resolveSampling(s);
    },
  };
}

/** A request without a tokenizer cannot use text: `param` names the field. */
export function needTokenizer(ctx: ServerContext, param: string, what: string): void {
  if (!ctx.tok || !ctx.table) throw invalid(param, `model ${ctx.modelName} has no tokenizer, so ${what}`);
}
