// POST /v1/chat/completions: OpenAI's chat completions over the chat pipeline (pipeline.ts):
// a chat.completion, or with stream: true chat.completion.chunk events ending in [DONE].
import type { SampleResult } from "@ds3/core";
import type { ServerContext } from "../context.js";
import { type Route, sendJson } from "../http.js";
import { type ChatChoice, runChat } from "../pipeline.js";
import { type Exchange, type SseWriter, clampLp, openChunkStream, tokenBytes, tokenName } from "../stream.js";
import { type ChatRequest, parseChatRequest } from "../validate.js";

/** OpenAI's chat logprobs: token, logprob, bytes, top_logprobs */
export function chatLogprobs(ctx: ServerContext, samples: readonly SampleResult[], asIds: boolean) {
  const t = ctx.table;
  return samples.map((s) => ({
    token: tokenName(t, s.id, asIds),
    logprob: clampLp(s.logprob),
    bytes: tokenBytes(t, s.id, asIds),
    top_logprobs: (s.top ?? []).map((x) => ({ token: tokenName(t, x.id, asIds), logprob: clampLp(x.logprob), bytes: tokenBytes(t, x.id, asIds) })),
  }));
}

/** The OpenAI chat message of a finished choice. */
export function chatMessage(c: ChatChoice) {
  return {
    role: "assistant" as const,
    content: c.content,
    ...(c.reasoning !== null && { reasoning_content: c.reasoning }),
    ...(c.toolCalls.length > 0 && { tool_calls: c.toolCalls }),
  };
}

async function chatCompletions(ctx: ServerContext, x: Exchange, body: Record<string, unknown>): Promise<void> {
  const r: ChatRequest = parseChatRequest(body, ctx.vocabSize);
  const model = ctx.modelName;
  const lp = (samples: readonly SampleResult[]) => chatLogprobs(ctx, samples, r.tokenIdNames);
  if (r.stream) {
    let out!: SseWriter;
    let chunk!: (choice: object) => object;
    let id = "";
    const outcome = await runChat(ctx, x, r, {
      onStart(info) {
        id = info.id;
        ({ out, chunk } = openChunkStream(x.res, info.id, "chat.completion.chunk", model, r.includeUsage));
      },
      async onEvent(ev) {
        if (ev.type === "start") await out.send(chunk({ index: ev.index, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }));
        else if (ev.type === "delta") {
          const delta: Record<string, unknown> = {};
          if (ev.reasoning) delta.reasoning_content = ev.reasoning;
          if (ev.content) delta.content = ev.content;
          if (ev.toolCalls.length) delta.tool_calls = ev.toolCalls;
          const logprobs = r.logprobs !== null && ev.samples.length ? { content: lp(ev.samples) } : null;
          if (Object.keys(delta).length || logprobs) await out.send(chunk({ index: ev.index, delta, logprobs, finish_reason: null }));
        } else await out.send(chunk({ index: ev.choice.index, delta: {}, logprobs: null, finish_reason: ev.choice.finishReason }));
      },
    });
    if (r.includeUsage) await out.send({ id, object: "chat.completion.chunk", created: Math.floor(Date.now() / 1000), model, choices: [], usage: outcome.usage });
    out.end();
    return;
  }
  let id = "";
  const outcome = await runChat(ctx, x, r, {
    onStart: (info) => void (id = info.id),
    onEvent: () => undefined,
  });
  if (outcome.cancelledBy === "client") return;
  const choices = outcome.choices.map((c) => ({
    index: c.index,
    message: chatMessage(c),
    logprobs: r.logprobs !== null ? { content: lp(c.samples) } : null,
    finish_reason: c.finishReason,
  }));
  sendJson(x.res, 200, { id, object: "chat.completion", created: Math.floor(Date.now() / 1000), model, choices, usage: outcome.usage });
}

export const chatRoute: Route = {
  path: "/v1/chat/completions",
  methods: ["POST"],
  auth: true,
  handle: async (ctx, x, m) => chatCompletions(ctx, x, await m.json()),
};
