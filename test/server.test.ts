// @ds3/server through the official `openai` npm client, on a real server at 127.0.0.1:
// chat and completions (streaming and not), n > 1, usage, logprobs, JSON mode, tool calls
// round trip; completions echo + logprobs reproducing the golden logits of tiny-v3; and the
// server's parsers (tool calls, reasoning, JSON prefixes) on their own.
import { cpu } from "@ds3/backend-cpu";
import { DS3, logSoftmax, topN } from "@ds3/core";
import {
  type Ds3Server,
  ReasoningStreamParser,
  ToolCallStreamParser,
  createServer,
  parseToolCalls,
  renderToolChat,
  splitReasoning,
  tokenTable,
} from "@ds3/server";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadGolden } from "./helpers/golden.js";
import { completesToJson } from "./helpers/json-prefix.js";

const g = loadGolden("tiny-v3");

describe("server parsers", () => {
  it("parses DeepSeek-V3 tool calls, whole and streamed in any split", () => {
    const out =
      "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n" +
      '{"city": "Paris", "unit": "c"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{"tz": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>';
    const whole = parseToolCalls(out);
    expect(whole.content).toBe("Let me check.");
    expect(whole.calls.map((c) => [c.function.name, JSON.parse(c.function.arguments)])).toEqual([
      ["get_weather", { city: "Paris", unit: "c" }],
      ["get_time", { tz: "CET" }],
    ]);
    for (const step of [1, 3, 7, 1000]) {
      const p = new ToolCallStreamParser();
      let content = "";
      const args: string[] = [];
      const names: string[] = [];
      const feed = (r: ReturnType<ToolCallStreamParser["push"]>) => {
        content += r.content;
        for (const d of r.calls) {
          if (d.function.name !== undefined) names[d.index] = d.function.name;
          args[d.index] = (args[d.index] ?? "") + (d.function.arguments ?? "");
        }
      };
      for (let i = 0; i < out.length; i += step) feed(p.push(out.slice(i, i + step)));
      feed(p.finish());
      expect(content).toBe("Let me check.");
      expect(names).toEqual(["get_weather", "get_time"]);
      expect(args.map((a) => JSON.parse(a))).toEqual([{ city: "Paris", unit: "c" }, { tz: "CET" }]);
    }
    // no tool call: everything is content
    expect(parseToolCalls("just text")).toEqual({ content: "just text", calls: [] });
    const p = new ToolCallStreamParser();
    const a = p.push("a <｜tool");
    const b = p.finish();
    expect(a.content + b.content).toBe("a <｜tool");
  });

  it("renders tools, tool calls and tool results in DeepSeek-V3's format", () => {
    const tools = [{ type: "function" as const, function: { name: "get_weather", description: "Weather now", parameters: { type: "object", properties: { city: { type: "string" } } } } }];
    const text = renderToolChat(
      [
        { role: "system", content: "Be brief." },
        { role: "user", content: "Weather in Paris?" },
        { role: "assistant", content: null, tool_calls: [{ type: "function", id: "c1", function: { name: "get_weather", arguments: '{"city":"Paris"}' } }] },
        { role: "tool", content: '{"temp": 21}', tool_call_id: "c1" },
      ],
      tools,
      "auto",
      "<｜begin▁of▁sentence｜>",
    );
    expect(text.startsWith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools")).toBe(true);
    expect(text).toContain('"properties":{"city":{"type":"string"}}');
    expect(text).toContain(
      '<｜User｜>Weather in Paris?<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city":"Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>',
    );
    expect(text.endsWith('<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{"temp": 21}<｜tool▁output▁end｜><｜tool▁outputs▁end｜>')).toBe(true);
  });

  it("splits reasoning_content, with or without the opening tag", () => {
    const run = (mode: "auto" | "deepseek-r1", text: string, opens = false, step = 1) => {
      const p = new ReasoningStreamParser(mode, opens);
      let r = "";
      let c = "";
      for (let i = 0; i < text.length; i += step) {
        const o = p.push(text.slice(i, i + step));
        r += o.reasoning;
        c += o.content;
      }
      const o = p.finish();
      return { reasoning: r + o.reasoning, content: c + o.content, had: p.hadReasoning };
    };
    for (const step of [1, 2, 5, 100]) {
      expect(run("auto", "<think>\nplan it\n</think>\n\nThe answer.", false, step)).toEqual({ reasoning: "\nplan it\n", content: "The answer.", had: true });
      // missing opening tag: R1 mode, or a prompt that opened <think>
      expect(run("deepseek-r1", "plan it</think>The answer.", false, step)).toEqual({ reasoning: "plan it", content: "The answer.", had: true });
      expect(run("auto", "plan it</think>The answer.", true, step)).toEqual({ reasoning: "plan it", content: "The answer.", had: true });
      expect(run("auto", "No thinking here.", false, step)).toEqual({ reasoning: "", content: "No thinking here.", had: false });
    }
    expect(splitReasoning("plan</think>\n\nanswer")).toEqual({ reasoning: "plan", content: "answer" });
  });

  it("the JSON-prefix check the tests rely on accepts prefixes and refuses non-prefixes", () => {
    for (const ok of ['{"a": [1, 2', '{"k": "v', '{"k": tr', '{"x": {"y": 1e', '{"a": "x\\u00e9\\n"', "{"]) expect(completesToJson(ok), ok).toBe(true);
    for (const bad of ["[1]", '"a"', "{a", '{"a" 1', '{"a": 1,}', '{"a": tru e', "{}x", '{"a": [1}']) expect(completesToJson(bad), bad).toBe(false);
  });
});

describe("server on tiny-v3 (token ids) through the openai client", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let client: OpenAI;

  beforeAll(async () => {
    // small prefill chunks: the 300-token golden prompt is scored across several engine steps
    ds3 = await DS3.load({ model: g.dir, backend: cpu, prefillChunk: 32 });
    srv = createServer({ ds3, apiKeys: ["sk-test-1", "sk-test-2"] });
    const { url } = await srv.listen(0, "127.0.0.1");
    client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "sk-test-2", maxRetries: 0 });
  });
  afterAll(async () => {
    await srv?.close();
    await ds3?.close();
  });

  it("lists the model", async () => {
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual(["tiny-v3"]);
    expect((await client.models.retrieve("tiny-v3")).id).toBe("tiny-v3");
  });

  it("echo + logprobs + return_tokens_as_token_ids reproduce the golden log-softmax (1e-3)", async () => {
    const N = 5;
    const res = await client.completions.create({
      model: "tiny-v3",
      prompt: g.prompts.map((p) => p.ids),
      max_tokens: 0,
      echo: true,
      logprobs: N,
      // vLLM's extension: tokens named token_id:<id>
      ...({ return_tokens_as_token_ids: true } as object),
    });
    expect(res.choices).toHaveLength(g.prompts.length);
    let worst = 0;
    g.prompts.forEach((p, i) => {
      const c = res.choices.find((x) => x.index === i)!;
      const lp = c.logprobs!;
      const L = p.ids.length;
      expect(lp.tokens).toEqual(p.ids.map((id) => `token_id:${id}`));
      expect(lp.token_logprobs![0]).toBeNull();
      expect(lp.top_logprobs![0]).toBeNull();
      expect(c.finish_reason).toBe("length");
      for (let t = 1; t < L; t++) {
        const ref = logSoftmax(p.logits.subarray((t - 1) * g.vocab, t * g.vocab));
        worst = Math.max(worst, Math.abs(lp.token_logprobs![t]! - ref[p.ids[t]!]!));
        const top = lp.top_logprobs![t]!;
        const want = topN(ref, N);
        for (const w of want) {
          const got = top[`token_id:${w.id}`];
          expect(got, `prompt ${i} position ${t} token ${w.id}`).toBeDefined();
          worst = Math.max(worst, Math.abs(got! - w.logprob));
        }
        // the top-N plus the prompt's own token, nothing else
        const allowed = new Set([...want.map((w) => `token_id:${w.id}`), `token_id:${p.ids[t]}`]);
        for (const k of Object.keys(top)) expect(allowed.has(k)).toBe(true);
      }
    });
    expect(worst).toBeLessThan(1e-3);
    expect(res.usage).toMatchObject({ prompt_tokens: g.prompts.reduce((a, p) => a + p.ids.length, 0), completion_tokens: 0 });
  });

  it("streamed echo + logprobs: the prompt's entries come first, identical to the non-streamed ones", async () => {
    const p = g.prompts[2]!;
    const body = { model: "tiny-v3", prompt: p.ids, max_tokens: 3, temperature: 0, echo: true, logprobs: 3, ...({ return_tokens_as_token_ids: true } as object) };
    const whole = await client.completions.create(body);
    const stream = await client.completions.create({ ...body, stream: true });
    const tokens: string[] = [];
    const lps: (number | null)[] = [];
    for await (const chunk of stream)
      for (const c of chunk.choices)
        if (c.logprobs) {
          tokens.push(...c.logprobs.tokens!);
          lps.push(...c.logprobs.token_logprobs!);
        }
    expect(tokens).toEqual(whole.choices[0]!.logprobs!.tokens);
    expect(tokens.slice(p.ids.length)).toEqual(p.greedy.slice(0, 3).map((id) => `token_id:${id}`));
    lps.forEach((x, i) => {
      const w = whole.choices[0]!.logprobs!.token_logprobs![i]!;
      if (x === null) expect(w).toBeNull();
      else expect(Math.abs(x - w)).toBeLessThan(1e-6);
    });
  });

  it("greedy completions from token ids match the golden greedy tokens, with logprobs", async () => {
    const p = g.prompts[1]!;
    const res = await client.completions.create({ model: "tiny-v3", prompt: p.ids, max_tokens: 6, temperature: 0, logprobs: 2, echo: true, ...({ return_tokens_as_token_ids: true } as object) });
    const lp = res.choices[0]!.logprobs!;
    expect(lp.tokens!.slice(p.ids.length)).toEqual(p.greedy.slice(0, 6).map((id) => `token_id:${id}`));
    // generated tokens: greedy → the chosen token is the top-1
    for (let t = p.ids.length; t < lp.tokens!.length; t++) {
      const top = Object.entries(lp.top_logprobs![t]!).sort((a, b) => b[1] - a[1]);
      expect(top[0]![0]).toBe(lp.tokens![t]);
      expect(Math.abs(top[0]![1] - lp.token_logprobs![t]!)).toBeLessThan(1e-6);
    }
    expect(res.usage).toMatchObject({ prompt_tokens: p.ids.length, completion_tokens: 6, total_tokens: p.ids.length + 6 });
  });

  it("streams completions for a batch of prompts with n > 1 and usage", async () => {
    const stream = await client.completions.create({ model: "tiny-v3", prompt: [[5, 6, 7], [8, 9]], n: 2, max_tokens: 4, seed: 11, stream: true, stream_options: { include_usage: true } });
    const finish = new Map<number, string>();
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of stream) {
      for (const c of chunk.choices) if (c.finish_reason) finish.set(c.index, c.finish_reason);
      if (chunk.usage) usage = chunk.usage;
    }
    expect([...finish.keys()].sort()).toEqual([0, 1, 2, 3]);
    expect([...finish.values()].every((f) => f === "length")).toBe(true);
    expect(usage).toEqual({ prompt_tokens: 5, completion_tokens: 16, total_tokens: 21 });
  });

  it("refuses a text prompt on a model without tokenizer, and chat", async () => {
    await expect(client.completions.create({ model: "tiny-v3", prompt: "hello", max_tokens: 2 })).rejects.toMatchObject({ status: 400, param: "prompt" });
    await expect(client.chat.completions.create({ model: "tiny-v3", messages: [{ role: "user", content: "hi" }] })).rejects.toMatchObject({ status: 400, param: "messages" });
  });

  it("needs the API key", async () => {
    const bad = new OpenAI({ baseURL: client.baseURL, apiKey: "sk-wrong", maxRetries: 0 });
    await expect(bad.models.list()).rejects.toMatchObject({ status: 401, code: "invalid_api_key" });
  });
});

describe("server on the built-in model (tokenizer) through the openai client", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let client: OpenAI;
  const tools: OpenAI.ChatCompletionTool[] = [
    {
      type: "function",
      function: { name: "get_weather", description: "Current weather of a city", parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } },
    },
    { type: "function", function: { name: "get_time", description: "Local time of a city", parameters: { type: "object", properties: { city: { type: "string" } } } } },
  ];

  beforeAll(async () => {
    ds3 = await DS3.load({ backend: cpu });
    srv = createServer({ ds3, apiKeys: [] });
    const { url } = await srv.listen(0, "127.0.0.1");
    client = new OpenAI({ baseURL: `${url}/v1`, apiKey: "unused", maxRetries: 0 });
  });
  afterAll(async () => {
    await srv?.close();
    await ds3?.close();
  });

  const model = () => ds3.modelName;
  // The model is noise: inside a JSON string almost any token is allowed, so strings rarely end.
  // A client-side logit_bias on the closing characters makes the constrained output finish.
  const closers = () => Object.fromEntries(['"', "}", '"}'].map((t) => [String(ds3.tokenizer!.tokenToId(t)), 40]));

  it("chat: non-streaming and streaming agree (greedy), usage adds up", async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [
      { role: "system", content: "You are terse." },
      { role: "user", content: "Say something." },
    ];
    const a = await client.chat.completions.create({ model: model(), messages, max_tokens: 6, temperature: 0 });
    expect(a.object).toBe("chat.completion");
    expect(a.choices[0]!.message.role).toBe("assistant");
    expect(typeof a.choices[0]!.message.content).toBe("string");
    const promptTokens = ds3.renderChat(messages as never).ids.length;
    expect(a.usage).toMatchObject({ prompt_tokens: promptTokens, total_tokens: promptTokens + a.usage!.completion_tokens });
    if (a.choices[0]!.finish_reason === "length") expect(a.usage!.completion_tokens).toBe(6);

    const stream = await client.chat.completions.create({ model: model(), messages, max_tokens: 6, temperature: 0, stream: true, stream_options: { include_usage: true } });
    let text = "";
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of stream) {
      for (const c of chunk.choices) {
        text += c.delta.content ?? "";
        finish = c.finish_reason ?? finish;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe(a.choices[0]!.message.content);
    expect(finish).toBe(a.choices[0]!.finish_reason);
    expect(usage).toEqual(a.usage);
  });

  it("chat: n > 1 with a seed, logprobs with top_logprobs", async () => {
    const r = await client.chat.completions.create({
      model: model(),
      messages: [{ role: "user", content: "Hello" }],
      n: 3,
      seed: 5,
      temperature: 1,
      max_tokens: 5,
      logprobs: true,
      top_logprobs: 3,
    });
    expect(r.choices.map((c) => c.index)).toEqual([0, 1, 2]);
    let total = 0;
    for (const c of r.choices) {
      const content = c.logprobs!.content!;
      total += content.length;
      for (const e of content) {
        expect(e.top_logprobs).toHaveLength(3);
        expect(e.logprob).toBeLessThanOrEqual(0);
        expect(e.top_logprobs[0]!.logprob).toBeGreaterThanOrEqual(e.top_logprobs[1]!.logprob);
        expect(e.logprob).toBeLessThanOrEqual(e.top_logprobs[0]!.logprob + 1e-6);
        expect(e.bytes!.length).toBeGreaterThan(0);
      }
      // the tokens' bytes, concatenated, are exactly the UTF-8 of the message (tokens may split a character)
      expect(Buffer.from(content.flatMap((e) => e.bytes!)).toString("utf8")).toBe(c.message.content);
    }
    expect(r.usage!.completion_tokens).toBe(total);
    // the same seed gives the same choices
    const again = await client.chat.completions.create({ model: model(), messages: [{ role: "user", content: "Hello" }], n: 3, seed: 5, temperature: 1, max_tokens: 5 });
    expect(again.choices.map((c) => c.message.content)).toEqual(r.choices.map((c) => c.message.content));
  });

  it("completions with a text prompt and a stop string cut before the stop", async () => {
    const base = await client.completions.create({ model: model(), prompt: "Once upon a time", max_tokens: 12, temperature: 0 });
    const text = base.choices[0]!.text;
    expect(text.length).toBeGreaterThan(4);
    const stop = text.slice(Math.floor(text.length / 2), Math.floor(text.length / 2) + 2);
    const cut = await client.completions.create({ model: model(), prompt: "Once upon a time", max_tokens: 12, temperature: 0, stop: [stop] });
    expect(cut.choices[0]!.text).toBe(text.slice(0, text.indexOf(stop)));
    expect(cut.choices[0]!.finish_reason).toBe("stop");
  });

  it("json_object: outputs that stop parse, outputs cut by max_tokens are JSON prefixes", async () => {
    for (let seed = 1; seed <= 6; seed++) {
      const r = await client.chat.completions.create({
        model: model(),
        messages: [{ role: "user", content: "Answer in JSON." }],
        response_format: { type: "json_object" },
        temperature: 1,
        seed,
        max_tokens: seed % 2 ? 48 : 12,
      });
      const c = r.choices[0]!;
      const text = c.message.content!;
      if (c.finish_reason === "stop") {
        const v = JSON.parse(text);
        expect(typeof v === "object" && v !== null && !Array.isArray(v)).toBe(true);
      } else {
        expect(c.finish_reason).toBe("length");
        expect(completesToJson(text), text).toBe(true);
      }
    }
    // streamed too: the concatenated deltas obey the same rule
    const s = await client.chat.completions.create({ model: model(), messages: [{ role: "user", content: "JSON" }], response_format: { type: "json_object" }, temperature: 1, seed: 3, max_tokens: 30, stream: true });
    let text = "";
    let finish = "";
    for await (const chunk of s) for (const c of chunk.choices) (text += c.delta.content ?? ""), (finish = c.finish_reason ?? finish);
    if (finish === "stop") JSON.parse(text);
    else expect(completesToJson(text), text).toBe(true);
  });

  it("tool calls round trip: required call parsed into tool_calls, the tool result accepted in a follow-up", async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: "user", content: "What is the weather in Paris?" }];
    const r = await client.chat.completions.create({ model: model(), messages, tools, tool_choice: "required", temperature: 1, seed: 7, max_tokens: 120, logit_bias: closers() });
    const c = r.choices[0]!;
    expect(c.finish_reason).toBe("tool_calls");
    expect(c.message.content).toBeNull();
    const call = c.message.tool_calls![0]!;
    expect(call.type).toBe("function");
    expect(call.id).toMatch(/^call_/);
    expect(["get_weather", "get_time"]).toContain((call as OpenAI.ChatCompletionMessageFunctionToolCall).function.name);
    const args = JSON.parse((call as OpenAI.ChatCompletionMessageFunctionToolCall).function.arguments);
    expect(typeof args).toBe("object");

    // a named tool_choice forces that function
    const named = await client.chat.completions.create({ model: model(), messages, tools, tool_choice: { type: "function", function: { name: "get_time" } }, temperature: 1, seed: 8, max_tokens: 120, logit_bias: closers() });
    expect((named.choices[0]!.message.tool_calls![0] as OpenAI.ChatCompletionMessageFunctionToolCall).function.name).toBe("get_time");

    // follow-up: the assistant's calls (content "" → null) and the tool's result
    const follow = await client.chat.completions.create({
      model: model(),
      messages: [
        ...messages,
        { role: "assistant", content: "", tool_calls: c.message.tool_calls },
        { role: "tool", tool_call_id: call.id, content: '{"temperature_c": 21, "sky": "clear"}' },
      ],
      tools,
      tool_choice: "none",
      max_tokens: 5,
      temperature: 0,
    });
    expect(follow.choices[0]!.message.role).toBe("assistant");
    expect(follow.choices[0]!.message.tool_calls ?? []).toHaveLength(0);
    expect(typeof follow.choices[0]!.message.content).toBe("string");
    // the follow-up's prompt holds the call and the tool output in DeepSeek-V3's format
    const prompt = renderToolChat(
      [
        { role: "user", content: "What is the weather in Paris?" },
        { role: "assistant", content: null, tool_calls: c.message.tool_calls as never },
        { role: "tool", content: '{"temperature_c": 21, "sky": "clear"}' },
      ],
      tools as never,
      "none",
      "<｜begin▁of▁sentence｜>",
    );
    expect(follow.usage!.prompt_tokens).toBe(ds3.tokenizer!.encode(prompt).length);
    expect(prompt).toContain("<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>{\"temperature_c\": 21");
  });

  it("tool calls stream as deltas", async () => {
    const s = await client.chat.completions.create({
      model: model(),
      messages: [{ role: "user", content: "Time in Tokyo?" }],
      tools,
      tool_choice: "required",
      temperature: 1,
      seed: 9,
      max_tokens: 120,
      logit_bias: closers(),
      stream: true,
    });
    const calls: Array<{ id?: string; name?: string; args: string }> = [];
    let finish = "";
    for await (const chunk of s)
      for (const c of chunk.choices) {
        for (const d of c.delta.tool_calls ?? []) {
          calls[d.index] ??= { args: "" };
          if (d.id) calls[d.index]!.id = d.id;
          if (d.function?.name) calls[d.index]!.name = d.function.name;
          calls[d.index]!.args += d.function?.arguments ?? "";
        }
        finish = c.finish_reason ?? finish;
      }
    expect(finish).toBe("tool_calls");
    expect(calls.length).toBeGreaterThan(0);
    for (const call of calls) {
      expect(call.id).toMatch(/^call_/);
      expect(["get_weather", "get_time"]).toContain(call.name);
      expect(typeof JSON.parse(call.args)).toBe("object");
    }
  });

  it("tool_choice auto renders the tools and parses whatever the model says", async () => {
    const r = await client.chat.completions.create({ model: model(), messages: [{ role: "user", content: "hi" }], tools, max_tokens: 8, temperature: 0 });
    const c = r.choices[0]!;
    expect(["stop", "length", "tool_calls"]).toContain(c.finish_reason);
    // the tool section made the prompt longer than the plain chat template
    expect(r.usage!.prompt_tokens).toBeGreaterThan(ds3.renderChat([{ role: "user", content: "hi" }]).ids.length + 20);
  });

  it("deep health runs one token", async () => {
    const base = client.baseURL.replace(/\/v1$/, "");
    const h = await fetch(`${base}/health/deep`);
    expect(h.status).toBe(200);
    expect(await h.json()).toMatchObject({ status: "ok", tokens: 1 });
  });
});
