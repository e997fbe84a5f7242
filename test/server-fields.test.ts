// The request fields of issue 11 on a real server at 127.0.0.1 (the built-in model: random
// weights, the real DeepSeek-V3 tokenizer): structured outputs through the grammar engine
// (the `openai` client's chat.completions.parse with a zod schema; vLLM's structured_outputs /
// guided_*; SGLang's regex / ebnf), tool arguments that follow the tool's schema, min_tokens,
// include_stop_str_in_output, continue_final_message / prefix, chat_template_kwargs and
// reasoning_effort (on a copy of the model with a DeepSeek-V3.1-style thinking switch),
// /tokenize, /detokenize, /version, completions' default max_tokens, unknown model → 404, and
// every field the server does not implement → 400 naming it.
import { mkdtempSync, readFileSync, readdirSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { cpu } from "@ds3/backend-cpu";
import { DS3, builtinModelDir, ensureBuiltinModel } from "@ds3/core";
import { type Ds3Server, createServer } from "@ds3/server";
import OpenAI from "openai";
import { zodResponseFormat } from "openai/helpers/zod";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { completesToJson } from "./helpers/json-prefix.js";

// a schema with an enum, a boolean, a required nested object and an array
const Report = z.object({
  mood: z.enum(["happy", "sad", "calm"]),
  ok: z.boolean(),
  owner: z.object({ name: z.string().max(12), age: z.number().int().min(0).max(150) }),
  tags: z.array(z.string().max(8)).max(3),
});

// biome-ignore lint: JSON replies
type Json = any;

describe("server: request fields (built-in model)", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let url: string;
  let client: OpenAI;
  let model: string;
  const post = async (path: string, body: unknown): Promise<{ status: number; json: Json }> => {
    const r = await fetch(`${url}${path}`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    return { status: r.status, json: await r.json() };
  };
  const chat = (body: Record<string, unknown>) => post("/v1/chat/completions", { model, messages: [{ role: "user", content: "hello" }], ...body });
  const expect400 = async (body: Record<string, unknown>, param: string, path = "/v1/chat/completions") => {
    const r = path === "/v1/chat/completions" ? await chat(body) : await post(path, body);
    expect(r.status, JSON.stringify(r.json)).toBe(400);
    expect(r.json.error.param).toBe(param);
    expect(r.json.error.message).toContain(param);
    return r.json.error;
  };

  beforeAll(async () => {
    ds3 = await DS3.load({ backend: cpu });
    model = ds3.modelName;
    srv = createServer({ ds3, apiKeys: [] });
    ({ url } = await srv.listen(0, "127.0.0.1"));
    client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0 });
  });
  afterAll(async () => {
    await srv?.close();
    await ds3?.close();
  });

  it("openai chat.completions.parse with a zod schema: every output validates against the schema", async () => {
    for (let seed = 0; seed < 3; seed++) {
      const r = await client.chat.completions.parse({
        model,
        messages: [{ role: "user", content: "Report, please." }],
        response_format: zodResponseFormat(Report, "report"),
        max_tokens: 300,
        temperature: 1,
        seed,
      });
      const c = r.choices[0]!;
      expect(c.finish_reason).toBe("stop");
      expect(Report.safeParse(JSON.parse(c.message.content!)).success, c.message.content!).toBe(true);
      expect(c.message.parsed).toEqual(JSON.parse(c.message.content!));
    }
  });

  it("json_schema cut by max_tokens: a JSON prefix with finish_reason length; a bad schema → 400 naming it", async () => {
    const rf = zodResponseFormat(Report, "report");
    for (const max_tokens of [3, 9, 17]) {
      const r = await chat({ response_format: rf, max_tokens, temperature: 1, seed: max_tokens });
      expect(r.status).toBe(200);
      const c = r.json.choices[0];
      expect(c.finish_reason).toBe("length");
      expect(completesToJson(c.message.content), c.message.content).toBe(true);
    }
    await expect400({ response_format: { type: "json_schema", json_schema: { name: "x", schema: { type: "object", properties: { a: { type: "nonsense" } } } } } }, "response_format.json_schema.schema");
    await expect400({ response_format: { type: "json_schema", json_schema: { name: "x", schema: "{not json" } } }, "response_format.json_schema.schema");
  });

  it("vLLM structured_outputs / guided_* and SGLang regex / ebnf constrain the output; bad ones → 400 naming the field", async () => {
    const re = /^[a-z]{3}-[0-9]{2}$/;
    const choices = ["yes", "no", "maybe"];
    const cases: Array<[Record<string, unknown>, (s: string) => boolean]> = [
      [{ structured_outputs: { regex: "[a-z]{3}-[0-9]{2}" } }, (s) => re.test(s)],
      [{ structured_outputs: { choice: choices } }, (s) => choices.includes(s)],
      [{ structured_outputs: { grammar: 'root ::= ("ab" | "cd")+ "!"' } }, (s) => /^(ab|cd)+!$/.test(s)],
      [{ structured_outputs: { json: { type: "object", properties: { n: { type: "integer", minimum: -50, maximum: 50 } }, required: ["n"], additionalProperties: false } } }, (s) => Number.isInteger(JSON.parse(s).n)],
      [{ guided_regex: "[a-z]{3}-[0-9]{2}" }, (s) => re.test(s)],
      [{ guided_choice: choices }, (s) => choices.includes(s)],
      [{ guided_grammar: 'root ::= ("ab" | "cd")+ "!"' }, (s) => /^(ab|cd)+!$/.test(s)],
      [{ guided_json: JSON.stringify({ type: "object", properties: { b: { type: "boolean" } }, required: ["b"] }) }, (s) => typeof JSON.parse(s).b === "boolean"],
      [{ regex: "(yes|no)[.!]" }, (s) => /^(yes|no)[.!]$/.test(s)],
      [{ ebnf: 'root ::= "x" [0-9] [0-9]' }, (s) => /^x[0-9]{2}$/.test(s)],
    ];
    for (const [patch, ok] of cases) {
      for (const seed of [1, 2]) {
        const r = await chat({ ...patch, max_tokens: 60, temperature: 1, seed });
        expect(r.status, JSON.stringify(r.json)).toBe(200);
        const text = r.json.choices[0].message.content;
        expect(r.json.choices[0].finish_reason, `${JSON.stringify(patch)} → ${text}`).toBe("stop");
        expect(ok(text), `${JSON.stringify(patch)} → ${JSON.stringify(text)}`).toBe(true);
      }
    }
    // completions take the same fields
    const c = await post("/v1/completions", { model, prompt: "The answer:", guided_choice: choices, max_tokens: 10, temperature: 1, seed: 3 });
    expect(c.status).toBe(200);
    expect(choices).toContain(c.json.choices[0].text);
    await expect400({ structured_outputs: { regex: "[a-" } }, "structured_outputs.regex");
    await expect400({ guided_grammar: "root ::= " }, "guided_grammar");
    await expect400({ structured_outputs: { structural_tag: "x" } }, "structured_outputs.structural_tag");
    await expect400({ structured_outputs: { regex: "a", choice: ["a"] } }, "structured_outputs.choice");
    await expect400({ guided_regex: "a", regex: "b" }, "regex");
    await expect400({ guided_choice: [] }, "guided_choice");
  });

  it("tool_choice required / named: the arguments follow the tool's schema (required fields present)", async () => {
    const Args = z.object({ city: z.string().max(10), unit: z.enum(["c", "f"]), days: z.number().int().min(1).max(7) });
    const tools = [
      { type: "function" as const, function: { name: "get_weather", parameters: z.toJSONSchema(Args) as Record<string, unknown> } },
      { type: "function" as const, function: { name: "get_time", parameters: { type: "object", properties: { tz: { type: "string", maxLength: 6 } }, required: ["tz"] } } },
    ];
    for (const [tool_choice, seed] of [
      ["required", 1],
      [{ type: "function", function: { name: "get_weather" } }, 3],
      [{ type: "function", function: { name: "get_time" } }, 4],
    ] as const) {
      const r = await client.chat.completions.create({ model, messages: [{ role: "user", content: "weather?" }], tools, tool_choice, max_tokens: 400, temperature: 1, top_p: 1, seed });
      const c = r.choices[0]!;
      expect(c.finish_reason).toBe("tool_calls");
      const calls = c.message.tool_calls!;
      expect(calls.length).toBeGreaterThan(0);
      for (const call of calls) {
        if (call.type !== "function") throw new Error("not a function call");
        const args = JSON.parse(call.function.arguments);
        if (typeof tool_choice === "object") expect(call.function.name).toBe(tool_choice.function.name);
        if (call.function.name === "get_weather") expect(Args.safeParse(args).success, call.function.arguments).toBe(true);
        else {
          expect(call.function.name).toBe("get_time");
          expect(typeof args.tz).toBe("string");
        }
      }
    }
    // auto: free text, and any call the model opens follows the schema
    for (const seed of [5, 6]) {
      const r = await client.chat.completions.create({ model, messages: [{ role: "user", content: "weather?" }], tools, max_tokens: 60, temperature: 1, top_p: 1, seed });
      for (const call of r.choices[0]!.message.tool_calls ?? []) if (call.type === "function" && call.function.name === "get_weather") expect(Args.safeParse(JSON.parse(call.function.arguments)).success).toBe(true);
    }
    // a tool schema the engine rejects → 400 naming tools
    await expect400({ tools: [{ type: "function", function: { name: "f", parameters: { type: "object", properties: { a: { type: "nonsense" } } } } }], tool_choice: "required" }, "tools");
    // a response format beside tools is ambiguous → 400
    await expect400({ tools, response_format: { type: "json_object" } }, "response_format");
  }, 400_000);

  it("min_tokens holds EOS back; include_stop_str_in_output keeps the stop string", async () => {
    const eos = ds3.tokenizer!.tokenToId("<｜end▁of▁sentence｜>")!;
    const bias = { [eos]: 100 };
    const plain = await chat({ logit_bias: bias, max_tokens: 20, temperature: 0 });
    expect(plain.json.usage.completion_tokens).toBe(1); // EOS at once
    for (const min_tokens of [4, 9]) {
      const r = await chat({ logit_bias: bias, max_tokens: 20, min_tokens, temperature: 0 });
      expect(r.json.choices[0].finish_reason).toBe("stop");
      expect(r.json.usage.completion_tokens).toBe(min_tokens + 1); // then EOS
    }
    await expect400({ min_tokens: 30, max_tokens: 20 }, "min_tokens");
    const c = await post("/v1/completions", { model, prompt: "x", logit_bias: bias, min_tokens: 5, max_tokens: 20, temperature: 0 });
    expect(c.json.usage.completion_tokens).toBe(6);

    const free = await chat({ max_tokens: 40, temperature: 0 });
    const text: string = free.json.choices[0].message.content;
    const stop = text.slice(10, 14);
    const before = text.slice(0, text.indexOf(stop));
    const cut = await chat({ max_tokens: 40, temperature: 0, stop: [stop] });
    expect(cut.json.choices[0].message.content).toBe(before);
    const kept = await chat({ max_tokens: 40, temperature: 0, stop: [stop], include_stop_str_in_output: true });
    expect(kept.json.choices[0].message.content).toBe(before + stop);
    expect(kept.json.choices[0].finish_reason).toBe("stop");
    // streamed the same
    let streamed = "";
    const s = await client.chat.completions.create({ model, messages: [{ role: "user", content: "hello" }], max_tokens: 40, temperature: 0, stream: true, stop: [stop], include_stop_str_in_output: true } as never);
    for await (const ch of s as unknown as AsyncIterable<Json>) streamed += ch.choices[0]?.delta?.content ?? "";
    expect(streamed).toBe(before + stop);
  });

  it("continue_final_message and DeepSeek's prefix: true continue the last assistant message", async () => {
    const messages = [
      { role: "user", content: "Count with me." },
      { role: "assistant", content: "One, two," },
    ];
    const closed = ds3.tokenizer!.applyChatTemplate(messages, { addGenerationPrompt: false });
    expect(closed.endsWith("One, two,<｜end▁of▁sentence｜>")).toBe(true); // the template closes it
    const t1 = await post("/tokenize", { model, messages, continue_final_message: true, add_generation_prompt: false });
    expect(t1.status, JSON.stringify(t1.json)).toBe(200);
    const open1 = (await post("/detokenize", { tokens: t1.json.tokens })).json.prompt as string;
    expect(open1.endsWith("<｜Assistant｜>One, two,")).toBe(true);
    const t2 = await post("/tokenize", { model, messages: [messages[0], { ...messages[1], prefix: true }] });
    expect(t2.json.tokens).toEqual(t1.json.tokens);
    // the chat output continues exactly that prompt: greedy, equal to a completion of those ids
    const a = await chat({ messages, continue_final_message: true, add_generation_prompt: false, max_tokens: 8, temperature: 0 });
    const b = await chat({ messages: [messages[0], { ...messages[1], prefix: true }], max_tokens: 8, temperature: 0 });
    const ref = await post("/v1/completions", { model, prompt: t1.json.tokens, max_tokens: 8, temperature: 0 });
    expect(a.json.choices[0].message.content).toBe(ref.json.choices[0].text);
    expect(b.json.choices[0].message.content).toBe(ref.json.choices[0].text);
    expect(a.json.usage.prompt_tokens).toBe(t1.json.count);
    await expect400({ messages: [{ role: "user", content: "x" }], continue_final_message: true }, "continue_final_message");
    await expect400({ messages, continue_final_message: true, add_generation_prompt: true }, "add_generation_prompt");
    await expect400({ messages: [{ role: "assistant", content: "a", prefix: true }, { role: "user", content: "x" }] }, "messages[0].prefix");
  });

  it("chat_template_kwargs and reasoning_effort: 400 naming them on a template without a thinking switch", async () => {
    await expect400({ chat_template_kwargs: { thinking: true } }, "chat_template_kwargs.thinking");
    await expect400({ reasoning_effort: "high" }, "reasoning_effort");
    await expect400({ reasoning_effort: "extreme" }, "reasoning_effort");
    await expect400({ chat_template_kwargs: { messages: [] } }, "chat_template_kwargs.messages");
    await expect400({ chat_template_kwargs: 5 }, "chat_template_kwargs");
  });

  it("fields the server does not implement → 400 naming them; clients' defaults pass", async () => {
    for (const [k, v] of [
      ["foo", 1],
      ["web_search_options", {}],
      ["audio", { voice: "alloy", format: "mp3" }],
      ["prediction", { type: "content", content: "x" }],
      ["store", true],
      ["service_tier", "flex"],
      ["modalities", ["text", "audio"]],
      ["functions", [{ name: "f" }]],
      ["echo", true],
      ["guided_decoding_backend", "xgrammar"],
      ["skip_special_tokens", false],
    ] as const)
      await expect400({ [k]: v }, k);
    for (const [k, v] of [
      ["suffix", "x"],
      ["max_completion_tokens", 5],
      ["tools", []],
      ["foo", 1],
    ] as const)
      await expect400({ model, prompt: "x", [k]: v }, k, "/v1/completions");
    const ok = await chat({ store: false, metadata: {}, service_tier: "auto", modalities: ["text"], user: "u1", audio: null, prediction: null, max_tokens: 2, functions: null });
    expect(ok.status, JSON.stringify(ok.json)).toBe(200);
  });

  it("completions without max_tokens: 16 tokens; unknown model → 404 model_not_found", async () => {
    const r = await post("/v1/completions", { model, prompt: "Once upon a time", ignore_eos: true, temperature: 0 });
    expect(r.json.usage.completion_tokens).toBe(16);
    expect(r.json.choices[0].finish_reason).toBe("length");
    for (const [path, body] of [
      ["/v1/chat/completions", { messages: [{ role: "user", content: "x" }] }],
      ["/v1/completions", { prompt: "x" }],
    ] as const) {
      const e = await post(path, { model: "gpt-4o", ...body });
      expect(e.status).toBe(404);
      expect(e.json.error.code).toBe("model_not_found");
      expect(e.json.error.param).toBe("model");
    }
    await expect(client.chat.completions.create({ model: "nope", messages: [{ role: "user", content: "x" }] })).rejects.toBeInstanceOf(OpenAI.NotFoundError);
  });

  it("/tokenize and /detokenize (vLLM's shapes) round trip; /version", async () => {
    const text = "Hello, 世界! ds3 tokenizes.";
    const t = await post("/tokenize", { model, prompt: text, return_token_strs: true });
    expect(t.status).toBe(200);
    expect(t.json.tokens).toEqual(ds3.tokenizer!.encode(text, { addSpecial: true }));
    expect(t.json.count).toBe(t.json.tokens.length);
    expect(t.json.max_model_len).toBe(ds3.engine.maxModelLen);
    expect(t.json.token_strs).toEqual(t.json.tokens.map((id: number) => ds3.tokenizer!.idToToken(id)));
    const noSpecial = await post("/tokenize", { prompt: text, add_special_tokens: false });
    expect(noSpecial.json.tokens).toEqual(ds3.tokenizer!.encode(text));
    expect(noSpecial.json.token_strs).toBeNull();
    const d = await post("/detokenize", { model, tokens: noSpecial.json.tokens });
    expect(d.json).toEqual({ prompt: text });
    const msgs = [{ role: "user", content: "hi" }];
    const tc = await post("/tokenize", { messages: msgs });
    expect(tc.json.tokens).toEqual(ds3.renderChat(msgs).ids);
    expect((await post("/tokenize", { prompt: "x", bogus: 1 })).json.error.param).toBe("bogus");
    expect((await post("/detokenize", { tokens: [-1] })).json.error.param).toBe("tokens");
    expect((await post("/tokenize", { model: "other", prompt: "x" })).status).toBe(404);
    const v = await fetch(`${url}/version`);
    const pkg = JSON.parse(readFileSync(new URL("../packages/server/package.json", import.meta.url), "utf8"));
    expect(await v.json()).toEqual({ version: pkg.version });
  });
});

// A copy of the built-in model whose chat template has DeepSeek-V3.1's thinking switch: after
// the last user turn, `<｜Assistant｜><think>` with thinking, `<｜Assistant｜></think>` without
// (V3.1's template does exactly this; the weights are symlinked, only tokenizer_config.json differs).
const V31_TEMPLATE =
  "{% if not thinking is defined %}{% set thinking = false %}{% endif %}{{ bos_token }}" +
  "{% for m in messages %}{% if m.role == 'system' %}{{ m.content }}{% elif m.role == 'user' %}{{ '<｜User｜>' + m.content }}" +
  "{% elif m.role == 'assistant' %}{{ '<｜Assistant｜></think>' + m.content + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}" +
  "{% if add_generation_prompt %}{% if thinking %}{{ '<｜Assistant｜><think>' }}{% else %}{{ '<｜Assistant｜></think>' }}{% endif %}{% endif %}";

describe("server: chat_template_kwargs on a template with DeepSeek-V3.1's thinking switch", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let url: string;
  let dir: string;
  const post = async (path: string, body: unknown): Promise<{ status: number; json: Json }> => {
    const r = await fetch(`${url}${path}`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    return { status: r.status, json: await r.json() };
  };
  const promptOf = async (body: Record<string, unknown>) => {
    const t = await post("/tokenize", { messages: [{ role: "user", content: "2+2?" }], ...body });
    expect(t.status, JSON.stringify(t.json)).toBe(200);
    return (await post("/detokenize", { tokens: t.json.tokens })).json.prompt as string;
  };

  beforeAll(async () => {
    await ensureBuiltinModel();
    const src = builtinModelDir();
    dir = mkdtempSync(join(tmpdir(), "ds3-v31-"));
    for (const f of readdirSync(src)) if (f !== "tokenizer_config.json") symlinkSync(join(src, f), join(dir, f));
    const cfg = JSON.parse(readFileSync(join(src, "tokenizer_config.json"), "utf8"));
    cfg.chat_template = V31_TEMPLATE;
    writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify(cfg));
    ds3 = await DS3.load({ model: dir, backend: cpu });
    srv = createServer({ ds3, apiKeys: [] });
    ({ url } = await srv.listen(0, "127.0.0.1"));
  });
  afterAll(async () => {
    await srv?.close();
    await ds3?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("thinking on/off reaches the template; reasoning_effort switches it; the reply's reasoning is parsed", async () => {
    expect((await promptOf({})).endsWith("<｜Assistant｜></think>")).toBe(true);
    expect((await promptOf({ chat_template_kwargs: { thinking: true } })).endsWith("<｜Assistant｜><think>")).toBe(true);
    expect((await promptOf({ chat_template_kwargs: { thinking: false } })).endsWith("<｜Assistant｜></think>")).toBe(true);
    const body = { model: ds3.modelName, messages: [{ role: "user", content: "2+2?" }], max_tokens: 6, temperature: 0 };
    const on = await post("/v1/chat/completions", { ...body, chat_template_kwargs: { thinking: true } });
    const high = await post("/v1/chat/completions", { ...body, reasoning_effort: "high" });
    const off = await post("/v1/chat/completions", { ...body, reasoning_effort: "none" });
    const plain = await post("/v1/chat/completions", body);
    expect(on.status, JSON.stringify(on.json)).toBe(200);
    // thinking: the prompt opened <think>, so the output is reasoning (cut by max_tokens)
    expect(on.json.usage.prompt_tokens).toBe(plain.json.usage.prompt_tokens);
    expect(typeof on.json.choices[0].message.reasoning_content).toBe("string");
    expect(high.json.choices[0].message).toEqual(on.json.choices[0].message);
    expect(off.json.choices[0].message).toEqual(plain.json.choices[0].message);
    expect(plain.json.choices[0].message.reasoning_content).toBeUndefined();
    // a variable the template never reads is still a 400
    const e = await post("/v1/chat/completions", { ...body, chat_template_kwargs: { enable_thinking: true } });
    expect(e.status).toBe(400);
    expect(e.json.error.param).toBe("chat_template_kwargs.enable_thinking");
  });
});
