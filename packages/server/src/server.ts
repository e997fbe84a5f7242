// The embeddable OpenAI-compatible server. createServer() returns a request handler that any
// node:http stack can mount, plus listen()/close() for running it on its own. No globals:
// several servers (on one model or several) can live in one process.
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { type IncomingMessage, type Server, type ServerResponse, createServer as createHttpServer } from "node:http";
import type { AddressInfo } from "node:net";
import type { ChatMessage, Engine, SamplingParams, Tokenizer } from "@ds3/core";
import { ApiError, invalid } from "./errors.js";
import { type ChoiceResult, ChoiceRun, type ChoiceSpec, type Delta } from "./generate.js";
import { JsonMasker } from "./json.js";
import { ServerMetrics } from "./metrics.js";
import { type Processor, ToolCallGrammar, compose, forbid, logitBias, toolMarkers } from "./constraints.js";
import { type ReasoningMode, ReasoningStreamParser, promptOpensThink, splitReasoning } from "./reasoning.js";
import { type TokenTable, tokenTable } from "./tokens.js";
import { type ParsedToolCall, T, type ToolCallDelta, ToolCallStreamParser, parseToolCalls, renderToolChat } from "./tools.js";
import { type ChatRequest, type CommonRequest, type CompletionRequestBody, isObject, parseChatRequest, parseCompletionRequest } from "./validate.js";

/** What the server needs of a loaded model: @ds3/core's DS3 has all of it. */
export interface ServerModel {
  readonly engine: Engine;
  readonly tokenizer: Tokenizer | null;
  readonly modelName: string;
  resolveSampling(p?: SamplingParams): SamplingParams;
  renderChat(messages: ChatMessage[], opts?: { tools?: unknown[]; addGenerationPrompt?: boolean }): { text: string; ids: number[] };
}

export interface ServerOptions {
  /** the loaded model (a DS3 from @ds3/core) */
  ds3: ServerModel;
  /** accepted API keys; default: $DS3_API_KEY (comma-separated); none: no authentication */
  apiKeys?: string | string[];
  /** largest request body (bytes); default 4 MiB */
  maxBodyBytes?: number;
  /** CORS: off by default; true allows any origin, or give the allowed origins */
  cors?: boolean | string | string[];
  /** the model id clients send and /v1/models lists; default the model's name */
  modelName?: string;
  /** most sequences (choices) in flight before new requests get 429; default 1024 */
  maxQueue?: number;
  /** how long close() lets in-flight requests finish before cancelling them (ms); default 10000 */
  shutdownGraceMs?: number;
  /** Retry-After seconds sent with 429; default 1 */
  retryAfterSeconds?: number;
  /** reasoning_content parsing (see reasoning.ts); default "auto" */
  reasoning?: ReasoningMode;
  /** listen() installs SIGINT/SIGTERM handlers that close() the server and then call onSignal (default: exit) */
  handleSignals?: boolean;
  onSignal?: (signal: NodeJS.Signals) => void | Promise<void>;
  /** one line per request and lifecycle event; default silent */
  log?: (line: string) => void;
}

export interface Ds3Server {
  /** mount in any node:http stack: (req, res) => void */
  readonly handler: (req: IncomingMessage, res: ServerResponse) => void;
  listen(port?: number, host?: string): Promise<{ host: string; port: number; url: string }>;
  /** stop accepting, let in-flight requests finish within the grace period, cancel the rest */
  close(opts?: { graceMs?: number }): Promise<void>;
  /** the node:http server once listen() was called */
  readonly httpServer: Server | null;
  readonly metrics: ServerMetrics;
  /** sequences in flight */
  readonly inFlight: number;
  readonly modelName: string;
}

const MiB = 1024 * 1024;
const LOGPROB_FLOOR = -9999;

class ActiveRequest {
  readonly ac = new AbortController();
  cancelledBy: "client" | "shutdown" | null = null;
  constructor(readonly done: Promise<void>) {}
}

export function createServer(opts: ServerOptions): Ds3Server {
  const ds3 = opts.ds3;
  if (!ds3?.engine) throw new TypeError("createServer: ds3 (a loaded model) is required");
  const engine = ds3.engine;
  const modelName = opts.modelName ?? ds3.modelName;
  const maxBody = opts.maxBodyBytes ?? 4 * MiB;
  const maxQueue = opts.maxQueue ?? 1024;
  const graceDefault = opts.shutdownGraceMs ?? 10_000;
  const retryAfter = String(opts.retryAfterSeconds ?? 1);
  const reasoningMode = opts.reasoning ?? "auto";
  const log = opts.log ?? (() => {});
  const created = Math.floor(Date.now() / 1000);
  const vocabSize = engine.executor.vocabSize;
  const maxModelLen = engine.maxModelLen;
  const eosIds = [...new Set([...(engine.opts.eosIds ?? engine.executor.config.eosTokenId)])];
  const tok = ds3.tokenizer;
  const table: TokenTable | null = tok ? tokenTable(tok, vocabSize) : null;
  let jsonMasker: JsonMasker | null = null;
  let toolGrammar: ToolCallGrammar | null | undefined;
  const getJsonMasker = () => (jsonMasker ??= new JsonMasker(table!, eosIds));
  const getToolGrammar = () => {
    if (toolGrammar === undefined) {
      const m = table ? toolMarkers(table) : null;
      toolGrammar = m ? new ToolCallGrammar(table!, m, getJsonMasker(), eosIds) : null;
    }
    return toolGrammar;
  };

  // API keys: compared in constant time (hashes of equal length, every key checked)
  const keySource = opts.apiKeys ?? (process.env.DS3_API_KEY ? process.env.DS3_API_KEY.split(",") : []);
  const keyHashes = (typeof keySource === "string" ? [keySource] : keySource).filter((k) => k.length > 0).map((k) => sha256(k));
  const corsOrigins = opts.cors === true ? "*" : opts.cors ? (typeof opts.cors === "string" ? [opts.cors] : opts.cors) : null;

  let inFlight = 0;
  const active = new Set<ActiveRequest>();
  let closing = false;
  let closed: Promise<void> | null = null;
  let httpServer: Server | null = null;
  const signalHandlers: Array<[NodeJS.Signals, () => void]> = [];

  const metrics = new ServerMetrics(engine, () => inFlight);

  // ---------------------------------------------------------------------------------------
  // plumbing

  function sha256(s: string): Buffer {
    return createHash("sha256").update(s, "utf8").digest();
  }

  function checkAuth(req: IncomingMessage): void {
    if (keyHashes.length === 0) return;
    const h = req.headers.authorization;
    const m = typeof h === "string" ? /^Bearer\s+(.+)$/i.exec(h.trim()) : null;
    if (!m) throw new ApiError(401, "Missing API key: send it as 'Authorization: Bearer <key>'", null, "invalid_api_key", "invalid_request_error");
    const got = sha256(m[1]!.trim());
    let ok = 0;
    for (const k of keyHashes) ok |= timingSafeEqual(got, k) ? 1 : 0;
    if (!ok) throw new ApiError(401, "Incorrect API key provided", null, "invalid_api_key", "invalid_request_error");
  }

  function setCors(req: IncomingMessage, res: ServerResponse): void {
    if (!corsOrigins) return;
    const origin = req.headers.origin;
    if (corsOrigins === "*") res.setHeader("Access-Control-Allow-Origin", "*");
    else if (typeof origin === "string" && corsOrigins.includes(origin)) {
      res.setHeader("Access-Control-Allow-Origin", origin);
      res.setHeader("Vary", "Origin");
    }
  }

  function sendJson(res: ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
    if (res.headersSent) {
      if (!res.writableEnded) res.end();
      return;
    }
    const data = JSON.stringify(body);
    res.writeHead(status, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(data), ...headers });
    res.end(data);
  }

  function sendError(res: ServerResponse, e: unknown): void {
    const err =
      e instanceof ApiError
        ? e
        : new ApiError(500, `internal error: ${e instanceof Error ? e.message : String(e)}`, null, "internal_error");
    if (err.status >= 500) log(`error: ${err.message}`);
    if (res.headersSent) {
      // mid-stream: an SSE error event, then the end
      if (!res.writableEnded && !res.destroyed) {
        res.write(`data: ${JSON.stringify(err.body())}\n\n`);
        res.end();
      }
      return;
    }
    sendJson(res, err.status, err.body(), err.headers);
  }

  async function readBody(req: IncomingMessage): Promise<Buffer> {
    const declared = Number(req.headers["content-length"]);
    const chunks: Buffer[] = [];
    let size = 0;
    let over = Number.isFinite(declared) && declared > maxBody;
    const hardCap = Math.max(maxBody * 4, 16 * MiB);
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > maxBody) over = true;
      if (over) {
        // keep draining (so the client reads our answer) unless it is far too large
        if (size > hardCap) {
          req.destroy();
          break;
        }
        continue;
      }
      chunks.push(chunk);
    }
    if (over) throw new ApiError(413, `request body is larger than the limit of ${maxBody} bytes`, null, "request_too_large");
    return Buffer.concat(chunks);
  }

  async function readJson(req: IncomingMessage): Promise<Record<string, unknown>> {
    const buf = await readBody(req);
    let v: unknown;
    try {
      v = JSON.parse(buf.toString("utf8"));
    } catch (e) {
      throw new ApiError(400, `request body is not valid JSON: ${(e as Error).message}`, null, "invalid_json");
    }
    if (!isObject(v)) throw new ApiError(400, "request body must be a JSON object", null, "invalid_json");
    return v;
  }

  /** Start a server-sent-events response; `chunk` wraps one choice in the OpenAI chunk envelope. */
  function openStream(res: ServerResponse, id: string, object: string, model: string, includeUsage: boolean | undefined) {
    res.writeHead(200, { "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", Connection: "keep-alive", "X-Accel-Buffering": "no" });
    res.flushHeaders();
    const out = sse(res);
    const chunk = (choice: object) => ({ id, object, created: Math.floor(Date.now() / 1000), model, choices: [choice], ...(includeUsage && { usage: null }) });
    return { out, chunk };
  }

  /** An SSE writer that respects backpressure and goes quiet once the client is gone. */
  function sse(res: ServerResponse) {
    let open = true;
    res.on("close", () => (open = false));
    return {
      get open() {
        return open && !res.destroyed && !res.writableEnded;
      },
      async send(obj: unknown): Promise<void> {
        if (!this.open) return;
        if (!res.write(`data: ${JSON.stringify(obj)}\n\n`))
          await new Promise<void>((resolve) => {
            const done = () => {
              res.off("drain", done);
              res.off("close", done);
              resolve();
            };
            res.on("drain", done);
            res.on("close", done);
          });
      },
      end(): void {
        if (!this.open) return;
        res.write("data: [DONE]\n\n");
        res.end();
      },
    };
  }

  // ---------------------------------------------------------------------------------------
  // shared request pieces

  function checkModel(r: CommonRequest): void {
    if (r.model !== undefined && r.model !== modelName && r.model !== ds3.modelName)
      throw new ApiError(400, `The model '${r.model}' does not exist; this server serves '${modelName}'`, "model", "model_not_found");
  }

  function checkContext(promptLen: number, r: CommonRequest, promptParam: string): void {
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
  }

  function samplingFor(r: CommonRequest, choice: number): SamplingParams {
    const s: SamplingParams = { ...r.sampling };
    if (s.seed !== undefined && choice > 0) s.seed = s.seed + choice;
    if (r.logprobs !== null) s.logprobs = r.logprobs;
    return ds3.resolveSampling(s);
  }

  /** Admit every sequence of a request at once (or none): 429 when the queue is full. */
  function admit(specs: ChoiceSpec[], req: ActiveRequest, t0: number): ChoiceRun[] {
    if (closing) throw new ApiError(503, "server is shutting down", null, "shutting_down");
    if (inFlight + specs.length > maxQueue) {
      metrics.rejected.inc({ reason: "queue_full" });
      throw new ApiError(429, `server is at capacity (${inFlight} sequences in flight, limit ${maxQueue}); retry later`, null, "queue_full", "rate_limit_error", {
        "Retry-After": retryAfter,
      });
    }
    const runs: ChoiceRun[] = [];
    try {
      for (const s of specs) runs.push(new ChoiceRun(engine, s, table, req.ac.signal, t0));
    } catch (e) {
      req.ac.abort();
      for (const r of runs) r.discard();
      throw engineError(e);
    }
    inFlight += runs.length;
    return runs;
  }

  function engineError(e: unknown): ApiError {
    if (e instanceof ApiError) return e;
    const err = e as Error & { code?: string; queueFull?: boolean; field?: string };
    if (err.queueFull) {
      metrics.rejected.inc({ reason: "engine_queue_full" });
      return new ApiError(429, "the engine's queue is full; retry later", null, "queue_full", "rate_limit_error", { "Retry-After": retryAfter });
    }
    if (err.name === "SamplingError") {
      const snake = (err.field ?? "").replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
      return invalid(snake || "sampling", err.message);
    }
    if (err.name === "EngineError") {
      if (err.code === "context_length_exceeded") return new ApiError(400, err.message, "max_tokens", "context_length_exceeded");
      if (err.code === "engine_closed") return new ApiError(503, err.message, null, "engine_closed");
      if (err.code === "engine_failed") return new ApiError(500, err.message, null, "engine_failed");
      return new ApiError(400, err.message, "prompt", "invalid_request");
    }
    return new ApiError(500, `internal error: ${err?.message ?? String(e)}`, null, "internal_error");
  }

  function finishMetrics(r: ChoiceResult, reason: string): void {
    metrics.requestSuccess.inc({ finished_reason: reason });
    metrics.promptTokens.inc({}, r.promptTokens);
    metrics.generationTokens.inc({}, r.ids.length);
    if (r.ttft !== null) metrics.ttft.observe(r.ttft);
    if (r.tpot !== null) metrics.tpot.observe(r.tpot);
    metrics.e2e.observe(r.e2e);
    if (r.queueTime !== null) metrics.queueTime.observe(r.queueTime);
    metrics.promptLen.observe(r.promptTokens);
    metrics.generationLen.observe(r.ids.length);
  }

  /** Runs a request's sequences; tracks them for shutdown and client disconnects. */
  async function runAll(
    req: IncomingMessage,
    res: ServerResponse,
    runs: ChoiceRun[],
    active: ActiveRequest,
    each: (run: ChoiceRun) => Promise<void>,
  ): Promise<void> {
    const onClose = () => {
      if (!res.writableFinished) {
        if (!active.cancelledBy) {
          active.cancelledBy = "client";
          metrics.clientDisconnects.inc();
        }
        active.ac.abort();
      }
    };
    res.on("close", onClose);
    try {
      const settled = await Promise.allSettled(
        runs.map((r) =>
          each(r).catch((e) => {
            active.ac.abort(); // one sequence failed: end its siblings too
            throw e;
          }),
        ),
      );
      const failed = settled.find((x): x is PromiseRejectedResult => x.status === "rejected");
      if (failed) throw failed.reason;
    } finally {
      res.off("close", onClose);
    }
  }

  function track(fn: (a: ActiveRequest) => Promise<void>): Promise<void> {
    let resolve!: () => void;
    const a = new ActiveRequest(new Promise<void>((r) => (resolve = r)));
    active.add(a);
    return fn(a).finally(() => {
      active.delete(a);
      resolve();
    });
  }

  function tokenName(id: number, asIds: boolean): string {
    return asIds || !table ? `token_id:${id}` : table.tokenString(id);
  }
  function tokenBytes(id: number, asIds: boolean): number[] {
    if (asIds || !table) return [...Buffer.from(`token_id:${id}`)];
    const b = table.bytes[id]!;
    return b.length ? [...b] : [...Buffer.from(table.tokenString(id))];
  }
  const clampLp = (x: number) => (Number.isFinite(x) ? x : LOGPROB_FLOOR);

  function usage(promptTokens: number, results: ChoiceResult[]) {
    const completion = results.reduce((a, r) => a + r.ids.length, 0);
    const cached = results.reduce((a, r) => Math.max(a, r.cachedTokens), 0);
    return {
      prompt_tokens: promptTokens,
      completion_tokens: completion,
      total_tokens: promptTokens + completion,
      ...(cached > 0 && { prompt_tokens_details: { cached_tokens: cached } }),
    };
  }

  // ---------------------------------------------------------------------------------------
  // /v1/chat/completions

  interface ChatState {
    reasoning: ReasoningStreamParser | null;
    tools: ToolCallStreamParser | null;
    content: string;
    reasoningText: string;
  }

  function chatPipe(st: ChatState, text: string, final: boolean): { reasoning: string; content: string; calls: ToolCallDelta[] } {
    let r = st.reasoning ? st.reasoning.push(text) : { reasoning: "", content: text };
    if (final && st.reasoning) {
      const f = st.reasoning.finish();
      r = { reasoning: r.reasoning + f.reasoning, content: r.content + f.content };
    }
    let out = { content: r.content, calls: [] as ToolCallDelta[] };
    if (st.tools) {
      out = st.tools.push(r.content);
      if (final) {
        const f = st.tools.finish();
        out = { content: out.content + f.content, calls: [...out.calls, ...f.calls] };
      }
    }
    st.content += out.content;
    st.reasoningText += r.reasoning;
    return { reasoning: r.reasoning, content: out.content, calls: out.calls };
  }

  async function chatCompletions(req: IncomingMessage, res: ServerResponse, t0: number): Promise<void> {
    const body = await readJson(req);
    const r: ChatRequest = parseChatRequest(body, vocabSize);
    checkModel(r);
    if (!tok || !table) throw invalid("messages", `model ${modelName} has no tokenizer, so it cannot chat: use /v1/completions with token-id prompts`);

    // render the prompt
    const toolsOn = r.tools !== null && r.toolChoice !== "none";
    const involvesTools = toolsOn || r.messages.some((m) => m.role === "tool" || (m.tool_calls?.length ?? 0) > 0);
    let promptText: string;
    let promptIds: number[];
    try {
      if (involvesTools) {
        promptText = renderToolChat(r.messages, r.tools, r.toolChoice, tok.bosToken ?? "");
        promptIds = tok.encode(promptText, { addSpecial: false });
      } else ({ text: promptText, ids: promptIds } = ds3.renderChat(r.messages));
    } catch (e) {
      throw invalid("messages", `cannot render the chat template: ${(e as Error).message}`);
    }
    checkContext(promptIds.length, r, "messages");

    // constraints
    const base: Processor[] = [];
    if (r.logitBias) base.push(logitBias(r.logitBias));
    let grammarNames: string[] | null = null;
    if (toolsOn && (r.toolChoice === "required" || typeof r.toolChoice === "object") && getToolGrammar())
      grammarNames = typeof r.toolChoice === "object" ? [r.toolChoice.name] : r.tools!.map((t) => t.function.name);
    const callsBegin = table.idOf(T.callsBegin);
    // tool_choice "none" beside tools: the model must not call any
    if (r.tools && r.toolChoice === "none" && callsBegin !== undefined) base.push(forbid([callsBegin]));

    const specs: ChoiceSpec[] = [];
    for (let j = 0; j < r.n; j++) {
      const ps = [...base];
      if (grammarNames) ps.push(getToolGrammar()!.processor(grammarNames, r.parallelToolCalls && typeof r.toolChoice !== "object"));
      else if (r.jsonMode) ps.push(getJsonMasker().processor().process);
      specs.push({ index: j, promptIds, sampling: samplingFor(r, j), processor: compose(ps) });
    }

    const id = `chatcmpl-${randomBytes(12).toString("hex")}`;
    const opensThink = promptOpensThink(promptText);
    const newState = (): ChatState => ({
      reasoning: reasoningMode === "none" ? null : new ReasoningStreamParser(reasoningMode, opensThink),
      tools: toolsOn ? new ToolCallStreamParser() : null,
      content: "",
      reasoningText: "",
    });
    const asIds = r.tokenIdNames;
    const lpContent = (samples: Delta["samples"]) =>
      samples.map((s) => ({
        token: tokenName(s.id, asIds),
        logprob: clampLp(s.logprob),
        bytes: tokenBytes(s.id, asIds),
        top_logprobs: (s.top ?? []).map((t) => ({ token: tokenName(t.id, asIds), logprob: clampLp(t.logprob), bytes: tokenBytes(t.id, asIds) })),
      }));
    const finishReason = (res: ChoiceResult, st: ChatState) =>
      res.finishReason === "abort" ? "abort" : st.tools && st.tools.toolCalls.length > 0 && res.finishReason === "stop" ? "tool_calls" : res.finishReason;

    await track(async (active) => {
      const runs = admit(specs, active, t0);
      const results: ChoiceResult[] = [];
      try {
        if (r.stream) {
          const { out, chunk } = openStream(res, id, "chat.completion.chunk", modelName, r.includeUsage);
          await runAll(req, res, runs, active, async (run) => {
            const st = newState();
            const index = run.spec.index;
            await out.send(chunk({ index, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }));
            const emit = async (p: { reasoning: string; content: string; calls: ToolCallDelta[] }, samples: Delta["samples"]) => {
              const delta: Record<string, unknown> = {};
              if (p.reasoning) delta.reasoning_content = p.reasoning;
              if (p.content) delta.content = p.content;
              if (p.calls.length) delta.tool_calls = p.calls;
              const lp = r.logprobs !== null && samples.length ? { content: lpContent(samples) } : null;
              if (Object.keys(delta).length || lp) await out.send(chunk({ index, delta, logprobs: lp, finish_reason: null }));
            };
            const result = await run.run(async (d) => emit(chatPipe(st, d.text, false), d.samples));
            await emit(chatPipe(st, "", true), []);
            const fr = finishReason(result, st);
            await out.send(chunk({ index, delta: {}, logprobs: null, finish_reason: fr }));
            results.push(result);
            finishMetrics(result, fr);
          });
          if (r.includeUsage)
            await out.send({ id, object: "chat.completion.chunk", created: Math.floor(Date.now() / 1000), model: modelName, choices: [], usage: usage(promptIds.length, results) });
          out.end();
          return;
        }
        const choices: unknown[] = new Array(r.n);
        await runAll(req, res, runs, active, async (run) => {
          const st = newState();
          const result = await run.run((d) => void chatPipe(st, d.text, false));
          chatPipe(st, "", true);
          let reasoning = st.reasoning?.hadReasoning ? st.reasoningText : null;
          let content = st.content;
          if (reasoning === null && reasoningMode === "auto" && content.includes("</think>")) {
            const s = splitReasoning(content);
            reasoning = s.reasoning;
            content = s.content;
          }
          const calls: ParsedToolCall[] = st.tools?.toolCalls ?? [];
          const fr = finishReason(result, st);
          choices[run.spec.index] = {
            index: run.spec.index,
            message: {
              role: "assistant",
              content: calls.length && content === "" ? null : content,
              ...(reasoning !== null && { reasoning_content: reasoning }),
              ...(calls.length > 0 && { tool_calls: calls }),
            },
            logprobs: r.logprobs !== null ? { content: lpContent(result.samples) } : null,
            finish_reason: fr,
          };
          results.push(result);
          finishMetrics(result, fr);
        });
        if (active.cancelledBy === "client") return;
        sendJson(res, 200, { id, object: "chat.completion", created: Math.floor(Date.now() / 1000), model: modelName, choices, usage: usage(promptIds.length, results) });
      } finally {
        inFlight -= runs.length;
      }
    });
  }

  // ---------------------------------------------------------------------------------------
  // /v1/completions

  async function completions(req: IncomingMessage, res: ServerResponse, t0: number): Promise<void> {
    const body = await readJson(req);
    const r: CompletionRequestBody = parseCompletionRequest(body, vocabSize);
    checkModel(r);
    const prompts: number[][] = r.prompts.map((p, i) => {
      if (typeof p !== "string") return p;
      if (!tok) throw invalid(r.prompts.length > 1 ? `prompt[${i}]` : "prompt", `model ${modelName} has no tokenizer: give token ids`);
      const ids = tok.encode(p, { addSpecial: true });
      if (ids.length === 0) throw invalid(r.prompts.length > 1 ? `prompt[${i}]` : "prompt", "the prompt has no tokens");
      return ids;
    });
    prompts.forEach((p, i) => checkContext(p.length, r, r.prompts.length > 1 ? `prompt[${i}]` : "prompt"));
    const base: Processor[] = [];
    if (r.logitBias) base.push(logitBias(r.logitBias));
    if (r.jsonMode && !table) throw invalid("response_format", `model ${modelName} has no tokenizer, so JSON mode cannot apply`);
    const scoring = r.echo && r.logprobs !== null;
    const specs: ChoiceSpec[] = [];
    prompts.forEach((ids, pi) => {
      for (let j = 0; j < r.n; j++) {
        const ps = [...base];
        if (r.jsonMode) ps.push(getJsonMasker().processor().process);
        specs.push({ index: pi * r.n + j, promptIds: ids, sampling: samplingFor(r, j), processor: compose(ps), ...(scoring && { scorePrompt: r.logprobs! }) });
      }
    });
    const id = `cmpl-${randomBytes(12).toString("hex")}`;
    const asIds = r.tokenIdNames;
    const promptTokens = prompts.reduce((a, p) => a + p.length, 0);
    const promptText = (ids: number[]) => (tok ? tok.decode(ids, { skipSpecial: true }) : "");

    // legacy logprobs: tokens, token_logprobs, top_logprobs (dicts), text_offset
    interface LegacyLp {
      tokens: string[];
      token_logprobs: (number | null)[];
      top_logprobs: (Record<string, number> | null)[];
      text_offset: number[];
    }
    const newLp = (): LegacyLp => ({ tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] });
    const tokenText = (id: number) => (table ? table.tokenString(id) : "");
    const addSamples = (lp: LegacyLp, samples: Delta["samples"], offset: number) => {
      let off = offset;
      for (const s of samples) {
        lp.tokens.push(tokenName(s.id, asIds));
        lp.token_logprobs.push(clampLp(s.logprob));
        const top: Record<string, number> = {};
        for (const t of s.top ?? []) top[tokenName(t.id, asIds)] = clampLp(t.logprob);
        top[tokenName(s.id, asIds)] = clampLp(s.logprob);
        lp.top_logprobs.push(top);
        lp.text_offset.push(off);
        off += tokenText(s.id).length;
      }
      return off;
    };
    const promptLp = (ids: number[], score: NonNullable<ChoiceRun["score"]>): { lp: LegacyLp; end: number } => {
      const lp = newLp();
      let off = 0;
      ids.forEach((tid, t) => {
        lp.tokens.push(tokenName(tid, asIds));
        lp.text_offset.push(off);
        off += table && !table.special[tid] ? tokenText(tid).length : 0;
        if (t === 0) {
          lp.token_logprobs.push(null);
          lp.top_logprobs.push(null);
          return;
        }
        const top: Record<string, number> = {};
        for (const x of score.top[t - 1] ?? []) top[tokenName(x.id, asIds)] = clampLp(x.logprob);
        const v = clampLp(score.logprobs[t - 1] ?? -Infinity);
        top[tokenName(tid, asIds)] = v;
        lp.token_logprobs.push(v);
        lp.top_logprobs.push(top);
      });
      return { lp, end: off };
    };

    await track(async (active) => {
      const runs = admit(specs, active, t0);
      const results: ChoiceResult[] = [];
      try {
        if (r.stream) {
          const { out, chunk } = openStream(res, id, "text_completion", modelName, r.includeUsage);
          await runAll(req, res, runs, active, async (run) => {
            const index = run.spec.index;
            const pIds = run.spec.promptIds;
            let offset = 0;
            let echoed = !r.echo;
            const sendEcho = async () => {
              if (echoed) return;
              echoed = true;
              let lp: LegacyLp | null = null;
              if (r.logprobs !== null) {
                const score = run.score;
                if (score) {
                  const p = promptLp(pIds, score);
                  lp = p.lp;
                  offset = p.end;
                }
              }
              const text = promptText(pIds);
              if (lp === null) offset = text.length;
              await out.send(chunk({ index, text, logprobs: lp, finish_reason: null }));
            };
            const result = await run.run(async (d) => {
              await sendEcho();
              let lp: LegacyLp | null = null;
              if (r.logprobs !== null) {
                lp = newLp();
                offset = addSamples(lp, d.samples, offset);
              }
              if (d.text || lp || !table) await out.send(chunk({ index, text: d.text, logprobs: lp, finish_reason: null }));
            });
            await sendEcho();
            await out.send(chunk({ index, text: "", logprobs: null, finish_reason: result.finishReason }));
            results.push(result);
            finishMetrics(result, result.finishReason);
          });
          if (r.includeUsage)
            await out.send({ id, object: "text_completion", created: Math.floor(Date.now() / 1000), model: modelName, choices: [], usage: usage(promptTokens, results) });
          out.end();
          return;
        }
        const choices: unknown[] = new Array(specs.length);
        await runAll(req, res, runs, active, async (run) => {
          const result = await run.run(() => undefined);
          const index = run.spec.index;
          const pIds = run.spec.promptIds;
          let text = result.text;
          let lp: LegacyLp | null = null;
          if (r.logprobs !== null) {
            let offset = 0;
            if (r.echo) {
              const score = run.score;
              if (score) {
                const p = promptLp(pIds, score);
                lp = p.lp;
                offset = p.end;
              }
            }
            lp ??= newLp();
            addSamples(lp, result.samples, offset);
          }
          if (r.echo) text = promptText(pIds) + text;
          choices[index] = { index, text, logprobs: lp, finish_reason: result.finishReason };
          results.push(result);
          finishMetrics(result, result.finishReason);
        });
        if (active.cancelledBy === "client") return;
        sendJson(res, 200, { id, object: "text_completion", created: Math.floor(Date.now() / 1000), model: modelName, choices, usage: usage(promptTokens, results) });
      } finally {
        inFlight -= runs.length;
      }
    });
  }

  // ---------------------------------------------------------------------------------------
  // health, models, metrics

  async function deepHealth(res: ServerResponse): Promise<void> {
    if (closing) return sendJson(res, 503, { status: "shutting_down" });
    const t = performance.now();
    const ac = new AbortController();
    const timer = setTimeout(() => ac.abort(), 30_000);
    try {
      let n = 0;
      let finish = "";
      const prompt = [tok?.bosId ?? engine.executor.config.bosTokenId ?? 0];
      for await (const ev of engine.generate({ promptIds: prompt, sampling: { maxTokens: 1, temperature: 0, ignoreEos: true }, signal: ac.signal })) {
        n += ev.ids.length;
        if (ev.finishReason) finish = ev.finishReason;
      }
      if (n !== 1) throw new Error(`expected one token, got ${n} (${finish})`);
      sendJson(res, 200, { status: "ok", model: modelName, tokens: n, latency_ms: Math.round((performance.now() - t) * 10) / 10 });
    } catch (e) {
      sendJson(res, 503, { status: "error", model: modelName, error: (e as Error).message });
    } finally {
      clearTimeout(timer);
    }
  }

  function modelCard() {
    return { id: modelName, object: "model", created, owned_by: "ds3", root: modelName, max_model_len: maxModelLen };
  }

  // ---------------------------------------------------------------------------------------
  // routing

  const ROUTES = new Set(["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/health/deep", "/metrics"]);

  async function route(req: IncomingMessage, res: ServerResponse, t0: number): Promise<void> {
    const url = new URL(req.url ?? "/", "http://localhost");
    const path = url.pathname.length > 1 ? url.pathname.replace(/\/+$/, "") : url.pathname;
    const method = req.method ?? "GET";
    setCors(req, res);
    if (method === "OPTIONS" && corsOrigins) {
      res.writeHead(204, {
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": String(req.headers["access-control-request-headers"] ?? "authorization, content-type"),
        "Access-Control-Max-Age": "600",
      });
      res.end();
      return;
    }
    if (closing) throw new ApiError(503, "server is shutting down", null, "shutting_down", "service_unavailable", { Connection: "close" });
    const allow = (methods: string) => {
      if (!methods.split(",").includes(method)) throw new ApiError(405, `method ${method} is not allowed on ${path}`, null, "method_not_allowed", "invalid_request_error", { Allow: methods });
    };
    if (path === "/health" || path === "/health/deep") {
      allow("GET,HEAD");
      const deep = path === "/health/deep" || ["1", "true"].includes(url.searchParams.get("deep") ?? "");
      if (deep) return deepHealth(res);
      return sendJson(res, 200, { status: "ok", model: modelName });
    }
    if (path === "/metrics") {
      allow("GET,HEAD");
      const text = metrics.render();
      res.writeHead(200, { "Content-Type": "text/plain; version=0.0.4; charset=utf-8", "Content-Length": Buffer.byteLength(text) });
      res.end(method === "HEAD" ? undefined : text);
      return;
    }
    if (path.startsWith("/v1/")) {
      checkAuth(req);
      if (path === "/v1/models") {
        allow("GET");
        return sendJson(res, 200, { object: "list", data: [modelCard()] });
      }
      if (path.startsWith("/v1/models/")) {
        allow("GET");
        const name = decodeURIComponent(path.slice("/v1/models/".length));
        if (name !== modelName && name !== ds3.modelName) throw new ApiError(404, `The model '${name}' does not exist`, "model", "model_not_found");
        return sendJson(res, 200, modelCard());
      }
      if (path === "/v1/chat/completions") {
        allow("POST");
        return chatCompletions(req, res, t0);
      }
      if (path === "/v1/completions") {
        allow("POST");
        return completions(req, res, t0);
      }
    }
    throw new ApiError(404, `no route for ${method} ${path}`, null, "not_found");
  }

  function handler(req: IncomingMessage, res: ServerResponse): void {
    const t0 = performance.now();
    const path = (req.url ?? "/").split("?")[0]!.replace(/(.)\/+$/, "$1");
    const endpoint = ROUTES.has(path) ? path : path.startsWith("/v1/models/") ? "/v1/models/{id}" : "other";
    res.setHeader("X-Content-Type-Options", "nosniff");
    res.once("close", () => {
      metrics.httpRequests.inc({ endpoint, method: req.method ?? "GET", code: String(res.statusCode) });
      log(`${req.method} ${req.url} ${res.statusCode} ${(performance.now() - t0).toFixed(1)}ms`);
    });
    route(req, res, t0).catch((e) => {
      // a request whose body we did not read keeps the connection busy: close it after answering
      if (e instanceof ApiError && e.status === 413) res.setHeader("Connection", "close");
      sendError(res, e);
    });
  }

  // ---------------------------------------------------------------------------------------
  // lifecycle

  async function listen(port = 8000, host = "127.0.0.1") {
    if (httpServer) throw new Error("listen() was already called");
    if (closing) throw new Error("server is closed");
    const srv = createHttpServer({ keepAliveTimeout: 5000 }, handler);
    httpServer = srv;
    await new Promise<void>((resolve, reject) => {
      srv.once("error", reject);
      srv.listen(port, host, () => {
        srv.off("error", reject);
        resolve();
      });
    });
    const a = srv.address() as AddressInfo;
    if (opts.handleSignals) {
      for (const sig of ["SIGINT", "SIGTERM"] as NodeJS.Signals[]) {
        const h = () => {
          log(`${sig}: shutting down`);
          void close().then(async () => {
            if (opts.onSignal) await opts.onSignal(sig);
            else process.exit(0);
          });
        };
        process.once(sig, h);
        signalHandlers.push([sig, h]);
      }
    }
    const shownHost = a.family === "IPv6" ? `[${a.address}]` : a.address;
    return { host: a.address, port: a.port, url: `http://${shownHost}:${a.port}` };
  }

  function close(o: { graceMs?: number } = {}): Promise<void> {
    if (closed) return closed;
    closing = true;
    const grace = o.graceMs ?? graceDefault;
    closed = (async () => {
      for (const [sig, h] of signalHandlers) process.off(sig, h);
      const srv = httpServer;
      const stopped = srv ? new Promise<void>((r) => srv.close(() => r())) : Promise.resolve();
      srv?.closeIdleConnections();
      const all = () => Promise.all([...active].map((a) => a.done));
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<"timeout">((r) => (timer = setTimeout(() => r("timeout"), grace)));
      const outcome = await Promise.race([all().then(() => "done" as const), timeout]);
      clearTimeout(timer);
      if (outcome === "timeout") {
        log(`shutdown: cancelling ${active.size} request(s) after ${grace} ms`);
        for (const a of active) {
          a.cancelledBy ??= "shutdown";
          a.ac.abort();
        }
        await Promise.race([all(), new Promise((r) => setTimeout(r, 5000))]);
      }
      srv?.closeAllConnections();
      await stopped;
    })();
    return closed;
  }

  return {
    handler,
    listen,
    close,
    get httpServer() {
      return httpServer;
    },
    metrics,
    get inFlight() {
      return inFlight;
    },
    modelName,
  };
}
