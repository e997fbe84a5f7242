// POST /v1/messages (Anthropic Messages API) through the official `@anthropic-ai/sdk` client and
// raw HTTP, on a real server at 127.0.0.1 with the built-in model (random weights: the text is
// noise, so the tests check the protocol): plain and streaming messages (the event sequence, the
// deltas adding up to the final message), system and multi-turn rendered as the chat template
// renders them, stop_sequences → stop_reason stop_sequence, a tool round trip (tool_use under
// tool_choice any/tool with input valid for the schema, then tool_result), thinking blocks from
// DeepSeek's thinking output, x-api-key and Bearer auth, Anthropic's error shape, and a 400
// naming every unsupported field.
import Anthropic from "@anthropic-ai/sdk";
import { cpu } from "@ds3/backend-cpu";
import { DS3 } from "@ds3/core";
import { type Ds3Server, createServer, renderToolChat } from "@ds3/server";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { namedEvents, readStream } from "./helpers/sse.js";

const KEY = "sk-messages";
type Ev = Anthropic.MessageStreamEvent;

/** The documented event order; returns the message the events build. */
function checkEvents(events: Ev[]): Anthropic.Message {
  expect(events[0]!.type).toBe("message_start");
  expect(events[events.length - 1]!.type).toBe("message_stop");
  const delta = events[events.length - 2]!;
  expect(delta.type).toBe("message_delta");
  const msg = structuredClone((events[0] as Anthropic.RawMessageStartEvent).message);
  expect(msg.content).toEqual([]);
  expect(msg.stop_reason).toBeNull();
  const raw: string[] = [];
  let open = -1;
  for (const e of events.slice(1, -2)) {
    if (e.type === "content_block_start") {
      expect(open).toBe(-1);
      expect(e.index).toBe(msg.content.length);
      open = e.index;
      msg.content.push(structuredClone(e.content_block));
      raw[open] = "";
    } else if (e.type === "content_block_delta") {
      expect(e.index).toBe(open);
      const b = msg.content[open]!;
      if (e.delta.type === "text_delta") {
        expect(b.type).toBe("text");
        (b as Anthropic.TextBlock).text += e.delta.text;
      } else if (e.delta.type === "thinking_delta") {
        expect(b.type).toBe("thinking");
        (b as Anthropic.ThinkingBlock).thinking += e.delta.thinking;
      } else if (e.delta.type === "input_json_delta") {
        expect(b.type).toBe("tool_use");
        raw[open] += e.delta.partial_json;
      } else throw new Error(`unexpected delta ${e.delta.type}`);
    } else if (e.type === "content_block_stop") {
      expect(e.index).toBe(open);
      const b = msg.content[open]!;
      if (b.type === "tool_use") b.input = JSON.parse(raw[open] || "{}");
      open = -1;
    } else throw new Error(`unexpected event ${e.type}`);
  }
  expect(open).toBe(-1);
  const d = delta as Anthropic.RawMessageDeltaEvent;
  msg.stop_reason = d.delta.stop_reason;
  msg.stop_sequence = d.delta.stop_sequence;
  msg.usage = { ...msg.usage, ...(d.usage as object) } as Anthropic.Usage;
  return msg;
}

describe("/v1/messages on the built-in model", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let r1: Ds3Server;
  let base: string;
  let client: Anthropic;
  const model = () => ds3.modelName;
  const post = (body: unknown, headers: Record<string, string> = { "x-api-key": KEY }) =>
    fetch(`${base}/v1/messages`, { method: "POST", headers: { "Content-Type": "application/json", "anthropic-version": "2023-06-01", ...headers }, body: JSON.stringify(body) });
  const weather: Anthropic.Tool = {
    name: "get_weather",
    description: "Current weather of a city",
    input_schema: { type: "object", properties: { city: { type: "string", enum: ["Paris", "Tokyo"] }, unit: { type: "string", enum: ["c", "f"] } }, required: ["city", "unit"] },
  };
  const WeatherArgs = z.object({ city: z.enum(["Paris", "Tokyo"]), unit: z.enum(["c", "f"]) }).strict();

  beforeAll(async () => {
    ds3 = await DS3.load({ backend: cpu });
    srv = createServer({ ds3, apiKeys: [KEY] });
    base = (await srv.listen(0, "127.0.0.1")).url;
    client = new Anthropic({ baseURL: base, apiKey: KEY, maxRetries: 0 });
    r1 = createServer({ ds3, apiKeys: [KEY], reasoning: "deepseek-r1" });
    await r1.listen(0, "127.0.0.1");
  });
  afterAll(async () => {
    await srv?.close();
    await r1?.close();
    await ds3?.close();
  });

  it("plain: a message whose usage counts the chat template's tokens; streaming builds the same message", async () => {
    const params = { model: model(), max_tokens: 8, temperature: 0, system: "Be terse.", messages: [{ role: "user" as const, content: "Say something." }] };
    const m = await client.messages.create(params);
    expect(m.type).toBe("message");
    expect(m.role).toBe("assistant");
    expect(m.id).toMatch(/^msg_/);
    expect(m.model).toBe(model());
    expect(m.content).toHaveLength(1);
    expect(m.content[0]!.type).toBe("text");
    const promptTokens = ds3.renderChat([
      { role: "system", content: "Be terse." },
      { role: "user", content: "Say something." },
    ]).ids.length;
    expect(m.usage.input_tokens + (m.usage.cache_read_input_tokens ?? 0)).toBe(promptTokens);
    expect(m.usage.output_tokens).toBeGreaterThan(0);
    if (m.usage.output_tokens === 8) expect(["max_tokens", "end_turn"]).toContain(m.stop_reason);
    else expect(m.stop_reason).toBe("end_turn");
    if (m.stop_reason === "max_tokens") expect(m.usage.output_tokens).toBe(8);
    expect(m.stop_sequence).toBeNull();

    const events: Ev[] = [];
    for await (const e of await client.messages.create({ ...params, stream: true })) events.push(e);
    const built = checkEvents(events);
    expect(built.content).toEqual(m.content);
    expect(built.stop_reason).toBe(m.stop_reason);
    expect(built.usage.output_tokens).toBe(m.usage.output_tokens);
    // the SDK's own accumulator agrees
    const final = await client.messages.stream(params).finalMessage();
    expect(final.content).toEqual(m.content);
    expect(final.stop_reason).toBe(m.stop_reason);
    // system as text blocks, multi-turn with content blocks
    const multi = await client.messages.create({
      model: model(),
      max_tokens: 2,
      temperature: 0,
      system: [{ type: "text", text: "Be " }, { type: "text", text: "terse." }],
      messages: [
        { role: "user", content: [{ type: "text", text: "Hi" }] },
        { role: "assistant", content: [{ type: "text", text: "Hello." }] },
        { role: "user", content: "How are you?" },
      ],
    });
    const expected = ds3.renderChat([
      { role: "system", content: "Be \nterse." },
      { role: "user", content: "Hi" },
      { role: "assistant", content: "Hello." },
      { role: "user", content: "How are you?" },
    ]).ids.length;
    expect(multi.usage.input_tokens + (multi.usage.cache_read_input_tokens ?? 0)).toBe(expected);
  });

  it("stop_sequences: the text is cut before it and stop_reason is stop_sequence", async () => {
    const params = { model: model(), max_tokens: 16, temperature: 0, messages: [{ role: "user" as const, content: "Once upon a time" }] };
    const m = await client.messages.create(params);
    const text = (m.content[0] as Anthropic.TextBlock).text;
    expect(text.length).toBeGreaterThan(4);
    const stop = text.slice(Math.floor(text.length / 2), Math.floor(text.length / 2) + 2);
    const cut = await client.messages.create({ ...params, stop_sequences: ["zzzq-never", stop] });
    expect(cut.stop_reason).toBe("stop_sequence");
    expect(cut.stop_sequence).toBe(stop);
    expect((cut.content[0] as Anthropic.TextBlock).text).toBe(text.slice(0, text.indexOf(stop)));
    const events: Ev[] = [];
    for await (const e of await client.messages.create({ ...params, stop_sequences: [stop], stream: true })) events.push(e);
    const built = checkEvents(events);
    expect(built.stop_reason).toBe("stop_sequence");
    expect(built.stop_sequence).toBe(stop);
  });

  it("tools: tool_use under tool_choice any with input valid for the schema, then a tool_result round trip", async () => {
    const messages: Anthropic.MessageParam[] = [{ role: "user", content: "Weather in Paris?" }];
    const m = await client.messages.create({ model: model(), max_tokens: 60, temperature: 1, messages, tools: [weather], tool_choice: { type: "any", disable_parallel_tool_use: true } });
    expect(m.stop_reason).toBe("tool_use");
    const uses = m.content.filter((b): b is Anthropic.ToolUseBlock => b.type === "tool_use");
    expect(uses.length).toBeGreaterThan(0);
    const use = uses[0]!;
    expect(use.id).toMatch(/^toolu_/);
    expect(use.name).toBe("get_weather");
    WeatherArgs.parse(use.input);

    const result = '{"temperature": 21}';
    const follow = await client.messages.create({
      model: model(),
      max_tokens: 4,
      temperature: 0,
      tools: [weather],
      tool_choice: { type: "none" },
      messages: [...messages, { role: "assistant", content: m.content }, { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: result }] }],
    });
    expect(follow.content.every((b) => b.type === "text")).toBe(true);
    const prompt = renderToolChat(
      [
        { role: "user", content: "Weather in Paris?" },
        { role: "assistant", content: null, tool_calls: uses.map((u) => ({ type: "function" as const, id: u.id, function: { name: u.name, arguments: JSON.stringify(u.input) } })) },
        { role: "tool", content: result, tool_call_id: use.id },
      ],
      [{ type: "function", function: { name: weather.name, description: weather.description!, parameters: weather.input_schema as Record<string, unknown> } }],
      "none",
      ds3.tokenizer!.bosToken ?? "",
    );
    expect(follow.usage.input_tokens + (follow.usage.cache_read_input_tokens ?? 0)).toBe(ds3.tokenizer!.encode(prompt, { addSpecial: false }).length);
  });

  it("tools stream as input_json_delta; tool_choice tool forces that tool", async () => {
    const time: Anthropic.Tool = { name: "get_time", input_schema: { type: "object", properties: { zone: { type: "string", enum: ["UTC", "CET"] } }, required: ["zone"] } };
    const events: Ev[] = [];
    for await (const e of await client.messages.create({
      model: model(),
      max_tokens: 60,
      temperature: 1,
      messages: [{ role: "user", content: "Time?" }],
      tools: [weather, time],
      tool_choice: { type: "tool", name: "get_time", disable_parallel_tool_use: true },
      stream: true,
    }))
      events.push(e);
    const built = checkEvents(events);
    expect(built.stop_reason).toBe("tool_use");
    const uses = built.content.filter((b) => b.type === "tool_use") as Anthropic.ToolUseBlock[];
    expect(uses).toHaveLength(1);
    expect(uses[0]!.name).toBe("get_time");
    expect(["UTC", "CET"]).toContain((uses[0]!.input as { zone: string }).zone);
    expect(events.some((e) => e.type === "content_block_delta" && e.delta.type === "input_json_delta")).toBe(true);
  });

  it("thinking blocks carry DeepSeek's thinking output (R1 parsing)", async () => {
    const port = (r1.httpServer!.address() as { port: number }).port;
    const c1 = new Anthropic({ baseURL: `http://127.0.0.1:${port}`, apiKey: KEY, maxRetries: 0 });
    const m = await c1.messages.create({ model: model(), max_tokens: 6, temperature: 0, messages: [{ role: "user", content: "Think." }] });
    const chat = await (
      await fetch(`http://127.0.0.1:${port}/v1/chat/completions`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${KEY}` },
        body: JSON.stringify({ model: model(), max_tokens: 6, temperature: 0, messages: [{ role: "user", content: "Think." }] }),
      })
    ).json();
    expect(m.content[0]).toEqual({ type: "thinking", thinking: chat.choices[0].message.reasoning_content, signature: "" });
    const events: Ev[] = [];
    for await (const e of await c1.messages.create({ model: model(), max_tokens: 6, temperature: 0, messages: [{ role: "user", content: "Think." }], stream: true })) events.push(e);
    expect(checkEvents(events).content).toEqual(m.content);
  });

  it("a client hanging up mid-stream ends the generation; the server keeps serving", async () => {
    const before = srv.metrics.clientDisconnects.get();
    const res = await post({ model: model(), max_tokens: 4000, temperature: 1, stream: true, messages: [{ role: "user", content: "Talk." }] }, { "x-api-key": KEY });
    const reader = res.body!.getReader();
    let seen = "";
    while (!seen.includes("text_delta")) {
      const { done, value } = await reader.read();
      if (done) throw new Error(`the stream ended early: ${seen}`);
      seen += new TextDecoder().decode(value);
    }
    await reader.cancel();
    const t = Date.now();
    while (srv.inFlight > 0 && Date.now() - t < 30_000) await new Promise((r) => setTimeout(r, 20));
    expect(srv.inFlight).toBe(0);
    expect(srv.metrics.clientDisconnects.get()).toBe(before + 1);
    expect((await client.messages.create({ model: model(), max_tokens: 1, messages: [{ role: "user", content: "hi" }] })).type).toBe("message");
  });

  it("shutdown mid-stream ends the stream with Anthropic's error event, never message_stop", async () => {
    const other = createServer({ ds3, apiKeys: [KEY] });
    const url = (await other.listen(0, "127.0.0.1")).url;
    const res = await fetch(`${url}/v1/messages`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "x-api-key": KEY },
      body: JSON.stringify({ model: model(), max_tokens: 4000, temperature: 1, stream: true, messages: [{ role: "user", content: "Talk." }] }),
    });
    let closing: Promise<void> | null = null;
    const text = await readStream(res, (t) => {
      if (!closing && t.includes("text_delta")) closing = other.close({ graceMs: 50 });
    });
    await closing;
    expect(text.split("\n\n").filter((b) => b.trim() && !b.startsWith("event: "))).toEqual([]); // every block is named
    const events = namedEvents(text);
    expect(events.every((e) => e.name === e.data.type)).toBe(true);
    expect(events[events.length - 1]).toEqual({ name: "error", data: { type: "error", error: { type: "overloaded_error", message: expect.stringMatching(/shut down/) } } });
    expect(events.some((e) => e.name === "message_stop" || e.name === "message_delta")).toBe(false);
  });

  it("auth by x-api-key or Bearer; errors in Anthropic's shape; every unsupported field is a 400 naming it", async () => {
    const ok = { model: model(), max_tokens: 1, messages: [{ role: "user", content: "hi" }] };
    expect((await post(ok)).status).toBe(200);
    expect((await post(ok, { Authorization: `Bearer ${KEY}` })).status).toBe(200);
    for (const headers of [{}, { "x-api-key": "wrong" }]) {
      const r = await post(ok, headers);
      expect(r.status).toBe(401);
      expect(await r.json()).toEqual({ type: "error", error: { type: "authentication_error", message: expect.any(String) } });
    }
    await expect(new Anthropic({ baseURL: base, apiKey: "wrong", maxRetries: 0 }).messages.create(ok as never)).rejects.toBeInstanceOf(Anthropic.AuthenticationError);

    const cases: Array<[Record<string, unknown>, string]> = [
      [{ max_tokens: undefined }, "max_tokens"],
      [{ model: undefined }, "model"],
      [{ messages: [] }, "messages"],
      [{ messages: [{ role: "system", content: "x" }] }, "messages[0].role"],
      [{ messages: [{ role: "user", content: [{ type: "image", source: { type: "base64", media_type: "image/png", data: "" } }] }] }, "messages[0].content[0].type"],
      [{ thinking: { type: "enabled", budget_tokens: 1024 } }, "thinking"],
      [{ mcp_servers: [] }, "mcp_servers"],
      [{ service_tier: "auto" }, "service_tier"],
      [{ tools: [{ type: "web_search_20250305", name: "web_search" }] }, "tools[0].type"],
      [{ tools: [{ name: "f" }] }, "tools[0].input_schema"],
      [{ tool_choice: { type: "any" } }, "tool_choice"],
      [{ tools: [weather], tool_choice: { type: "tool", name: "nope" } }, "tool_choice.name"],
      [{ temperature: 1.5 }, "temperature"],
      [{ stop_sequences: [""] }, "stop_sequences[0]"],
      [{ top_k: -1 }, "top_k"],
    ];
    for (const [patch, param] of cases) {
      const res = await post({ ...ok, ...patch });
      const body = await res.json();
      expect([res.status, body.type, body.error?.type], JSON.stringify(patch)).toEqual([400, "error", "invalid_request_error"]);
      expect(body.error.message.startsWith(`${param}:`), `${JSON.stringify(patch)}: ${body.error.message}`).toBe(true);
    }
    await expect(client.messages.create({ ...ok, thinking: { type: "enabled", budget_tokens: 1024 } } as never)).rejects.toBeInstanceOf(Anthropic.BadRequestError);
    // an unknown model
    const m = await post({ ...ok, model: "claude-nope" });
    expect([400, 404]).toContain(m.status);
    expect((await m.json()).type).toBe("error");
    // a body that is not JSON
    const bad = await fetch(`${base}/v1/messages`, { method: "POST", headers: { "x-api-key": KEY, "Content-Type": "application/json" }, body: "{" });
    expect(bad.status).toBe(400);
    expect((await bad.json()).error.type).toBe("invalid_request_error");
  });
});
