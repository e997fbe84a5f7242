// POST /tokenize and /detokenize, in vLLM's shapes:
//   /tokenize {prompt, add_special_tokens = true} or {messages, add_generation_prompt = true,
//   continue_final_message, chat_template_kwargs, tools, add_special_tokens = false}, and
//   return_token_strs → {count, max_model_len, tokens, token_strs}
//   /detokenize {tokens} → {prompt}
import type { ServerContext } from "../context.js";
import { invalid } from "../errors.js";
import { type Route, sendJson } from "../http.js";
import { renderPrompt } from "../pipeline.js";
import { isObject, parseChatRequest, rejectUnknownFields } from "../validate.js";

const PROMPT_FIELDS = new Set(["model", "prompt", "add_special_tokens", "return_token_strs"]);
const CHAT_FIELDS = new Set(["model", "messages", "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools", "add_special_tokens", "return_token_strs"]);

function flag(o: Record<string, unknown>, k: string, dflt: boolean): boolean {
  const v = o[k];
  if (v == null) return dflt;
  if (typeof v !== "boolean") throw invalid(k, `must be a boolean, got ${JSON.stringify(v)}`);
  return v;
}

function checkModel(ctx: ServerContext, o: Record<string, unknown>): void {
  if (o.model != null && typeof o.model !== "string") throw invalid("model", "must be a string");
  ctx.checkModel({ model: (o.model as string | undefined) ?? undefined } as never);
}

function tokenize(ctx: ServerContext, o: Record<string, unknown>) {
  const tok = ctx.tok;
  checkModel(ctx, o);
  if (!tok || !ctx.table) throw invalid(o.messages != null ? "messages" : "prompt", `model ${ctx.modelName} has no tokenizer`);
  let ids: number[];
  if (o.messages != null) {
    if (o.prompt != null) throw invalid("prompt", "give either prompt or messages, not both");
    rejectUnknownFields(o, CHAT_FIELDS, "/tokenize (chat)");
    const { add_special_tokens: _a, return_token_strs: _r, ...chat } = o;
    const r = parseChatRequest(chat, ctx.vocabSize);
    const { text } = renderPrompt(ctx, r);
    ids = tok.encode(text, { addSpecial: flag(o, "add_special_tokens", false) });
  } else {
    rejectUnknownFields(o, PROMPT_FIELDS, "/tokenize");
    if (typeof o.prompt !== "string") throw invalid("prompt", o.prompt == null ? "is required (or give messages)" : "must be a string");
    ids = tok.encode(o.prompt, { addSpecial: flag(o, "add_special_tokens", true) });
  }
  const strs = flag(o, "return_token_strs", false);
  return { count: ids.length, max_model_len: ctx.maxModelLen, tokens: ids, token_strs: strs ? ids.map((id) => tok.idToToken(id) ?? null) : null };
}

function detokenize(ctx: ServerContext, o: Record<string, unknown>) {
  rejectUnknownFields(o, new Set(["model", "tokens"]), "/detokenize");
  checkModel(ctx, o);
  const ids = o.tokens;
  if (!Array.isArray(ids)) throw invalid("tokens", ids == null ? "is required" : "must be an array of token ids");
  ids.forEach((x, i) => {
    if (!Number.isSafeInteger(x) || (x as number) < 0 || (x as number) >= ctx.vocabSize) throw invalid("tokens", `tokens[${i}] must be a token id in [0, ${ctx.vocabSize}), got ${JSON.stringify(x)}`);
  });
  if (!ctx.tok) throw invalid("tokens", `model ${ctx.modelName} has no tokenizer`);
  return { prompt: ctx.tok.decode(ids as number[]) };
}

export const tokenizeRoute: Route = {
  path: "/tokenize",
  methods: ["POST"],
  auth: true,
  async handle(ctx, x, m) {
    const o = await m.json();
    if (!isObject(o)) throw invalid("body", "must be a JSON object");
    sendJson(x.res, 200, tokenize(ctx, o));
  },
};

export const detokenizeRoute: Route = {
  path: "/detokenize",
  methods: ["POST"],
  auth: true,
  handle: async (ctx, x, m) => sendJson(x.res, 200, detokenize(ctx, await m.json())),
};
