// POST /v1/responses: OpenAI's Responses API, stateless, over the chat pipeline (pipeline.ts).
// The request (responses-request.ts) becomes a chat request; the pipeline's events become output
// items (responses-output.ts): a `response` object, or with stream: true the event sequence
// response.created, response.in_progress, the items' events, response.completed (or
// response.incomplete when max_output_tokens cut it), each with a sequence_number.
import type { SampleResult } from "@ds3/core";
import type { ServerContext } from "../context.js";
import { ApiError, backendLost } from "../errors.js";
import { type Route, sendJson } from "../http.js";
import { type ChatChoice, type ChatOutcome, runChat } from "../pipeline.js";
import { type Exchange, type SseWriter, clampLp, cutError, openSse, tokenBytes, tokenName } from "../stream.js";
import type { ChatRequest, ToolChoice } from "../validate.js";
import { type OutputLogprob, ResponseOutput, newId } from "./responses-output.js";
import { RecentItems, type ResponsesRequest, parseResponsesRequest } from "./responses-request.js";

const recentByServer = new WeakMap<ServerContext, RecentItems>();
const recentItems = (ctx: ServerContext): RecentItems => {
  let r = recentByServer.get(ctx);
  if (!r) recentByServer.set(ctx, (r = new RecentItems()));
  return r;
};

/** The chat request the pipeline runs for a Responses request. */
export function toChatRequest(r: ResponsesRequest): ChatRequest {
  return {
    ...(r.model !== undefined && { model: r.model }),
    n: 1,
    stream: r.stream,
    includeUsage: false,
    sampling: r.sampling,
    logprobs: r.logprobs,
    logitBias: null,
    jsonMode: r.format?.type === "json_object",
    grammar: r.format ? { spec: r.format, param: "text.format" } : null,
    ...(r.maxOutputTokens !== undefined && { maxTokens: r.maxOutputTokens }),
    messages: r.messages,
    tokenIdNames: false,
    tools: r.tools,
    toolChoice: r.toolChoice,
    parallelToolCalls: r.parallelToolCalls,
  };
}

const toolChoiceEcho = (c: ToolChoice) => (typeof c === "object" ? { type: "function", name: c.name } : c);

function outputLogprobs(ctx: ServerContext) {
  const t = ctx.table;
  return (samples: readonly SampleResult[]): OutputLogprob[] =>
    samples.map((s) => ({
      token: tokenName(t, s.id, false),
      logprob: clampLp(s.logprob),
      bytes: tokenBytes(t, s.id, false),
      top_logprobs: (s.top ?? []).map((x) => ({ token: tokenName(t, x.id, false), logprob: clampLp(x.logprob), bytes: tokenBytes(t, x.id, false) })),
    }));
}

function usageOf(ctx: ServerContext, c: ChatChoice) {
  const input = c.result.promptTokens;
  const output = c.result.ids.length;
  // tokens of the <think> section: the reasoning text and its closing tag, as the tokenizer counts them
  const reasoning = c.reasoning !== null && ctx.tok ? Math.min(output, ctx.tok.encode(`${c.reasoning}</think>`, { addSpecial: false }).length) : 0;
  return {
    input_tokens: input,
    input_tokens_details: { cached_tokens: c.result.cachedTokens },
    output_tokens: output,
    output_tokens_details: { reasoning_tokens: reasoning },
    total_tokens: input + output,
  };
}

/** A choice cut before its end (finish "abort"): by shutdown, or by the engine. */
const cutOf = (ctx: ServerContext): ApiError => cutError({ cancelledBy: ctx.closing ? "shutdown" : null } as Parameters<typeof cutError>[0]);

/** The pipeline names chat fields; this route's clients sent input and max_output_tokens. */
function renamed(e: unknown): unknown {
  if (!(e instanceof ApiError) || (e.param !== "max_tokens" && e.param !== "messages")) return e;
  const to = e.param === "max_tokens" ? "max_output_tokens" : "input";
  const message = e.message.replace(e.param === "max_tokens" ? /\bmax_tokens\b/g : /^messages\b/, to);
  return new ApiError(e.status, message, to, e.code, e.type, e.headers);
}

async function responses(ctx: ServerContext, x: Exchange, body: Record<string, unknown>): Promise<void> {
  const recent = recentItems(ctx);
  const r = parseResponsesRequest(body, recent);
  const resolved = ctx.ds3.resolveSampling(r.sampling);
  const id = newId("resp");
  const createdAt = Math.floor(Date.now() / 1000);
  const base = (status: string): Record<string, unknown> => ({
    id,
    object: "response",
    created_at: createdAt,
    status,
    background: false,
    error: null,
    incomplete_details: null,
    instructions: r.instructions,
    max_output_tokens: r.maxOutputTokens ?? null,
    max_tool_calls: null,
    model: ctx.modelName,
    output: [],
    parallel_tool_calls: r.parallelToolCalls,
    previous_response_id: null,
    reasoning: { effort: null, summary: null },
    service_tier: "default",
    store: false,
    temperature: resolved.temperature ?? null,
    text: { format: r.formatEcho },
    tool_choice: toolChoiceEcho(r.toolChoice),
    tools: r.toolsEcho,
    top_logprobs: r.logprobs ?? 0,
    top_p: resolved.topP ?? null,
    truncation: "disabled",
    usage: null,
    user: r.user,
    metadata: r.metadata,
  });

  let seq = 0;
  let out: SseWriter | null = null;
  const emit = async (type: string, fields: Record<string, unknown>) => {
    if (out) await out.event(type, { type, sequence_number: seq++, ...fields });
  };
  const output = new ResponseOutput(emit, r.logprobs !== null ? outputLogprobs(ctx) : null);
  /** mid-stream: an error event and response.failed, then the end */
  const fail = async (e: unknown) => {
    const err = e instanceof ApiError ? e : (backendLost(e, ctx.engine.executor.failed) ?? new ApiError(500, `internal error: ${(e as Error)?.message ?? String(e)}`, null, "internal_error"));
    if (err.status >= 500) ctx.log(`error: ${err.message}`);
    await emit("error", { code: err.code, message: err.message, param: err.param });
    await emit("response.failed", { response: { ...base("failed"), output: output.items, error: { code: err.code ?? "server_error", message: err.message } } });
    out?.close();
  };
  /** the finished response; cut by max_output_tokens: incomplete */
  const finalResponse = (c: ChatChoice) => {
    const cut = c.finishReason === "length";
    return {
      ...base(cut ? "incomplete" : "completed"),
      ...(cut && { incomplete_details: { reason: "max_output_tokens" } }),
      output: output.items,
      usage: usageOf(ctx, c),
    };
  };
  let choice: ChatChoice | undefined;
  let outcome: ChatOutcome;
  try {
    outcome = await runChat(ctx, x, toChatRequest(r), {
      async onStart() {
        if (!r.stream) return;
        out = openSse(x.res);
        await emit("response.created", { response: base("in_progress") });
        await emit("response.in_progress", { response: base("in_progress") });
      },
      async onEvent(ev) {
        if (ev.type === "delta") await output.delta(ev.reasoning, ev.content, ev.toolCalls, ev.samples);
        else if (ev.type === "done") {
          choice = ev.choice;
          // the stream ends here, while the request is still tracked (shutdown waits for it)
          if (ev.choice.finishReason === "abort") return void (out && (await fail(cutOf(ctx))));
          await output.finish(ev.choice.finishReason === "length" ? "incomplete" : "completed");
          for (const item of output.items) recent.add(item);
          if (out) {
            const final = finalResponse(ev.choice);
            await emit(ev.choice.finishReason === "length" ? "response.incomplete" : "response.completed", { response: final });
            out.close();
          }
        }
      },
    });
  } catch (e) {
    if (!out) throw renamed(e);
    await fail(e);
    return;
  }
  if (out || outcome.cancelledBy === "client") return;
  // cut by shutdown (or the engine): a 503 to retry, never a partial "completed"
  if (!choice || choice.finishReason === "abort") throw cutOf(ctx);
  sendJson(x.res, 200, finalResponse(choice));
}

export const responsesRoute: Route = {
  path: "/v1/responses",
  methods: ["POST"],
  auth: true,
  handle: async (ctx, x, m) => responses(ctx, x, await m.json()),
};
