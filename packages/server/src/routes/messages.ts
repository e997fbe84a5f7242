// POST /v1/messages: Anthropic's Messages API over the chat pipeline (pipeline.ts), as
// DeepSeek's own platform and vLLM offer it. A `message` object, or with stream: true the events
// message_start, ping, content_block_start/delta/stop per block, message_delta (stop_reason,
// usage), message_stop. Errors have Anthropic's shape {"type": "error", "error": {type, message}};
// the key may come as x-api-key (Anthropic's clients) or as a Bearer token.
import type { ServerContext } from "../context.js";
import { ApiError, backendLost } from "../errors.js";
import { type Route, sendJson } from "../http.js";
import { type ChatChoice, type ChatOutcome, runChat } from "../pipeline.js";
import { type Exchange, type SseWriter, cutError, openSse } from "../stream.js";
import type { ChatRequest } from "../validate.js";
import { MessageOutput, anthropicError, messageId } from "./messages-output.js";
import { type MessagesRequest, parseMessagesRequest } from "./messages-request.js";

export function toChatRequest(r: MessagesRequest): ChatRequest {
  return {
    model: r.model,
    n: 1,
    stream: r.stream,
    includeUsage: false,
    sampling: r.sampling,
    logprobs: null,
    logitBias: null,
    jsonMode: false,
    maxTokens: r.maxTokens,
    messages: r.messages,
    tokenIdNames: false,
    tools: r.tools,
    toolChoice: r.toolChoice,
    parallelToolCalls: r.parallelToolCalls,
  };
}

/** stop_reason and stop_sequence of a finished choice */
export function stopReason(ctx: ServerContext, r: MessagesRequest, c: ChatChoice): { stop_reason: string; stop_sequence: string | null } {
  if (c.finishReason === "tool_calls") return { stop_reason: "tool_use", stop_sequence: null };
  if (c.finishReason === "length") return { stop_reason: "max_tokens", stop_sequence: null };
  if (r.stopSequences.length && ctx.tok) {
    // the output text is cut before the stop string; the sampled tokens still hold it
    const full = ctx.tok.decode(c.result.ids, { skipSpecial: false });
    const from = Math.max(0, c.result.text.length - Math.max(...r.stopSequences.map((s) => s.length)));
    let best: string | null = null;
    let bestEnd = Infinity;
    for (const s of r.stopSequences) {
      const i = full.indexOf(s, from);
      if (i >= 0 && i + s.length < bestEnd) {
        best = s;
        bestEnd = i + s.length;
      }
    }
    if (best !== null) return { stop_reason: "stop_sequence", stop_sequence: best };
  }
  return { stop_reason: "end_turn", stop_sequence: null };
}

function usageOf(c: ChatChoice) {
  const cached = c.result.cachedTokens;
  return {
    input_tokens: c.result.promptTokens - cached,
    cache_creation_input_tokens: 0,
    cache_read_input_tokens: cached,
    output_tokens: c.result.ids.length,
  };
}

/** A choice cut before its end (finish "abort"): by shutdown, or by the engine. */
const cutOf = (ctx: ServerContext): ApiError => cutError({ cancelledBy: ctx.closing ? "shutdown" : null } as Parameters<typeof cutError>[0]);

async function messages(ctx: ServerContext, x: Exchange, body: Record<string, unknown>): Promise<void> {
  const r = parseMessagesRequest(body);
  const id = messageId();
  let out: SseWriter | null = null;
  const emit = async (type: string, fields: Record<string, unknown>) => {
    if (out) await out.event(type, { type, ...fields });
  };
  /** mid-stream: Anthropic's error event, then the end */
  const fail = async (e: unknown) => {
    const err = e instanceof ApiError ? e : (backendLost(e, ctx.engine.executor.failed) ?? new ApiError(500, `internal error: ${(e as Error)?.message ?? String(e)}`, null, "internal_error"));
    if (err.status >= 500) ctx.log(`error: ${err.message}`);
    await emit("error", { error: anthropicError(err.status, err.message).error });
    out?.close();
  };
  const output = new MessageOutput(emit);
  let choice: ChatChoice | undefined;
  let outcome: ChatOutcome;
  try {
    outcome = await runChat(ctx, x, toChatRequest(r), {
      async onStart(info) {
        if (!r.stream) return;
        out = openSse(x.res);
        await emit("message_start", {
          message: {
            id,
            type: "message",
            role: "assistant",
            model: ctx.modelName,
            content: [],
            stop_reason: null,
            stop_sequence: null,
            usage: { input_tokens: info.promptTokens, cache_creation_input_tokens: 0, cache_read_input_tokens: 0, output_tokens: 0 },
          },
        });
        await emit("ping", {});
      },
      async onEvent(ev) {
        if (ev.type === "delta") await output.delta(ev.reasoning, ev.content, ev.toolCalls);
        else if (ev.type === "done") {
          choice = ev.choice;
          // the stream ends here, while the request is still tracked (shutdown waits for it)
          if (ev.choice.finishReason === "abort") return void (out && (await fail(cutOf(ctx))));
          await output.finish();
          if (out) {
            await emit("message_delta", { delta: stopReason(ctx, r, ev.choice), usage: usageOf(ev.choice) });
            await emit("message_stop", {});
            out.close();
          }
        }
      },
    });
  } catch (e) {
    if (!out) throw e;
    await fail(e);
    return;
  }
  if (out || outcome.cancelledBy === "client") return;
  // cut by shutdown (or the engine): a 503 to retry, never a partial message
  if (!choice || choice.finishReason === "abort") throw cutOf(ctx);
  sendJson(x.res, 200, { id, type: "message", role: "assistant", model: ctx.modelName, content: output.blocks, ...stopReason(ctx, r, choice), usage: usageOf(choice) });
}

export const messagesRoute: Route = {
  path: "/v1/messages",
  methods: ["POST"],
  auth: true,
  handle: async (ctx, x, m) => messages(ctx, x, await m.json()),
  errorBody: (e) => anthropicError(e.status, e.message),
};
