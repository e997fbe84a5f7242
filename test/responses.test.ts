// POST /v1/responses through the official `openai` client (7.x) and raw HTTP, on a real server
// at 127.0.0.1 with the built-in model (random weights: the text is noise, so the tests check
// the protocol): plain and streaming responses (the documented event sequence, sequence numbers,
// deltas adding up to the final items), instructions and input items rendered as the chat
// template renders the same conversation, a function-tool round trip (function_call item, then
// function_call_output), text.format json_schema validated by an independent validator (zod),
// max_output_tokens → incomplete, logprobs equal to /v1/chat/completions', reasoning items from
// DeepSeek's thinking output, item_reference, and a 400 naming every unsupported field.
import { cpu } from "@ds3/backend-cpu";
import { DS3 } from "@ds3/core";
import { type Ds3Server, createServer, renderToolChat } from "@ds3/server";
import OpenAI from "openai";
import { zodTextFormat } from "openai/helpers/zod";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { RecentItems } from "../packages/server/src/routes/responses-request.js";
import { namedEvents, readStream } from "./helpers/sse.js";

const KEY = "sk-responses";
type Ev = { type: string; sequence_number: number; [k: string]: any };

/**
 * The stream's structure, checked against the documented sequence: created, in_progress, then
 * per item output_item.added … output_item.done (content_part.added / text deltas / text done /
 * content_part.done inside messages and reasoning, argument deltas / done inside function
 * calls), then response.completed or response.incomplete. Returns the items and the final response.
 */
function checkEvents(events: Ev[]): { items: any[]; final: any } {
  expect(events.map((e) => e.sequence_number)).toEqual(events.map((_, i) => i));
  expect(events[0]!.type).toBe("response.created");
  expect(events[0]!.response.status).toBe("in_progress");
  expect(events[1]!.type).toBe("response.in_progress");
  const last = events[events.length - 1]!;
  expect(["response.completed", "response.incomplete"]).toContain(last.type);
  const id = events[0]!.response.id;
  const items: any[] = [];
  let open: { item: any; text: string; part: boolean; textDone: boolean } | null = null;
  for (const e of events.slice(2, -1)) {
    switch (e.type) {
      case "response.output_item.added":
        expect(open).toBeNull();
        expect(e.output_index).toBe(items.length);
        expect(e.item.status).toBe("in_progress");
        open = { item: e.item, text: "", part: false, textDone: false };
        break;
      case "response.content_part.added":
        expect(open && !open.part && e.item_id === open.item.id && e.content_index === 0).toBe(true);
        open!.part = true;
        break;
      case "response.output_text.delta":
      case "response.reasoning_text.delta":
        expect(open?.part && e.item_id === open.item.id && e.output_index === items.length).toBe(true);
        expect(open!.item.type).toBe(e.type === "response.output_text.delta" ? "message" : "reasoning");
        open!.text += e.delta;
        break;
      case "response.output_text.done":
      case "response.reasoning_text.done":
        expect(e.text).toBe(open!.text);
        open!.textDone = true;
        break;
      case "response.content_part.done":
        expect(open!.textDone).toBe(true);
        expect(e.part.text).toBe(open!.text);
        break;
      case "response.function_call_arguments.delta":
        expect(open?.item.type).toBe("function_call");
        expect(e.item_id).toBe(open!.item.id);
        open!.text += e.delta;
        break;
      case "response.function_call_arguments.done":
        expect(e.arguments).toBe(open!.text);
        open!.textDone = true;
        break;
      case "response.output_item.done":
        expect(open?.textDone).toBe(true);
        expect(e.item.id).toBe(open!.item.id);
        expect(["completed", "incomplete"]).toContain(e.item.status);
        if (e.item.type === "function_call") expect(e.item.arguments).toBe(open!.text);
        else expect(e.item.content[0].text).toBe(open!.text);
        items.push(e.item);
        open = null;
        break;
      default:
        throw new Error(`unexpected event ${e.type}`);
    }
  }
  expect(open).toBeNull();
  expect(last.response.id).toBe(id);
  expect(last.response.output).toEqual(items);
  return { items, final: last.response };
}

async function collect(stream: AsyncIterable<unknown>): Promise<Ev[]> {
  const out: Ev[] = [];
  for await (const e of stream) out.push(e as Ev);
  return out;
}

describe("item_reference memory", () => {
  it("keeps the newest items within its count and size bounds", () => {
    const r = new RecentItems(3, 260); // an empty item is 37 characters of JSON, the big one 189
    const item = (id: string, text = "") => ({ id, type: "message", text });
    for (const id of ["a", "b", "c", "d"]) r.add(item(id));
    expect(["a", "b", "c", "d"].map((id) => r.get(id)?.id ?? null)).toEqual([null, "b", "c", "d"]);
    r.add(item("big", "x".repeat(150))); // over the size budget with the rest: the oldest go first
    expect(["b", "c", "d", "big"].map((id) => r.get(id)?.id ?? null)).toEqual([null, null, "d", "big"]);
    r.add(item("huge", "x".repeat(500))); // larger than the whole budget: not kept, nothing else lost
    expect([r.get("huge"), r.get("d")?.id, r.get("big")?.id]).toEqual([undefined, "d", "big"]);
  });
});

describe("/v1/responses on the built-in model", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let r1: Ds3Server; // same model, DeepSeek-R1 reasoning parsing
  let base: string;
  let client: OpenAI;
  const model = () => ds3.modelName;
  const post = (body: unknown, key = KEY) =>
    fetch(`${base}/v1/responses`, { method: "POST", headers: { "Content-Type": "application/json", Authorization: `Bearer ${key}` }, body: JSON.stringify(body) });
  const weather = {
    type: "function" as const,
    name: "get_weather",
    description: "Current weather of a city",
    parameters: { type: "object", properties: { city: { type: "string", enum: ["Paris", "Tokyo"] }, unit: { type: "string", enum: ["c", "f"] } }, required: ["city", "unit"], additionalProperties: false },
    strict: true,
  };

  beforeAll(async () => {
    ds3 = await DS3.load({ backend: cpu });
    srv = createServer({ ds3, apiKeys: [KEY] });
    base = (await srv.listen(0, "127.0.0.1")).url;
    client = new OpenAI({ baseURL: `${base}/v1`, apiKey: KEY, maxRetries: 0 });
    r1 = createServer({ ds3, apiKeys: [KEY], reasoning: "deepseek-r1" });
    await r1.listen(0, "127.0.0.1");
  });
  afterAll(async () => {
    await srv?.close();
    await r1?.close();
    await ds3?.close();
  });

  it("plain: a response object whose usage counts the chat template's tokens; streaming gives the same text", async () => {
    const r = await client.responses.create({ model: model(), input: "Say something.", max_output_tokens: 8, temperature: 0 });
    expect(r.object).toBe("response");
    expect(r.id).toMatch(/^resp_/);
    expect(r.model).toBe(model());
    expect(r.output).toHaveLength(1);
    const msg = r.output[0] as OpenAI.Responses.ResponseOutputMessage;
    expect(msg.type).toBe("message");
    expect(msg.role).toBe("assistant");
    expect(msg.id).toMatch(/^msg_/);
    expect(msg.content[0]!.type).toBe("output_text");
    const text = (msg.content[0] as OpenAI.Responses.ResponseOutputText).text;
    expect(r.output_text).toBe(text);
    const promptTokens = ds3.renderChat([{ role: "user", content: "Say something." }]).ids.length;
    expect(r.usage).toMatchObject({ input_tokens: promptTokens, total_tokens: promptTokens + r.usage!.output_tokens, output_tokens_details: { reasoning_tokens: 0 } });
    expect(r.usage!.output_tokens).toBeGreaterThan(0);
    expect(r.usage!.output_tokens).toBeLessThanOrEqual(8);
    if (r.status === "incomplete") {
      expect(r.usage!.output_tokens).toBe(8);
      expect(r.incomplete_details).toEqual({ reason: "max_output_tokens" });
      expect(msg.status).toBe("incomplete");
    } else expect(r.status).toBe("completed");
    expect(r.store).toBe(false);
    expect(r.max_output_tokens).toBe(8);
    expect(r.temperature).toBe(0);

    const events = await collect(await client.responses.create({ model: model(), input: "Say something.", max_output_tokens: 8, temperature: 0, stream: true }));
    const { items, final } = checkEvents(events);
    expect(items).toHaveLength(1);
    expect(items[0].content[0].text).toBe(text);
    expect(final.status).toBe(r.status);
    expect(final.usage).toEqual(r.usage);
  });

  it("max_output_tokens cuts: status incomplete, response.incomplete event", async () => {
    // ignore nothing: 3 tokens of noise rarely end on EOS; check the rule either way
    const r = await client.responses.create({ model: model(), input: "Go on.", max_output_tokens: 3, temperature: 1 });
    if (r.usage!.output_tokens === 3 && r.status !== "completed") {
      expect(r.status).toBe("incomplete");
      expect(r.incomplete_details?.reason).toBe("max_output_tokens");
    }
    const events = await collect(await client.responses.create({ model: model(), input: "Go on.", max_output_tokens: 1, temperature: 0, stream: true }));
    const { final } = checkEvents(events);
    expect(final.usage.output_tokens).toBe(1);
    expect(events[events.length - 1]!.type).toBe(final.status === "incomplete" ? "response.incomplete" : "response.completed");
  });

  it("instructions and input items render like the same chat", async () => {
    const r = await client.responses.create({
      model: model(),
      instructions: "Be terse.",
      input: [
        { role: "user", content: "Hi" },
        { role: "assistant", content: [{ type: "output_text", text: "Hello.", annotations: [] }] } as never,
        { type: "message", role: "user", content: [{ type: "input_text", text: "How " }, { type: "input_text", text: "are you?" }] },
      ],
      max_output_tokens: 2,
      temperature: 0,
    });
    const expected = ds3.renderChat([
      { role: "system", content: "Be terse." },
      { role: "user", content: "Hi" },
      { role: "assistant", content: "Hello." },
      { role: "user", content: "How are you?" },
    ]).ids.length;
    expect(r.usage!.input_tokens).toBe(expected);
    expect(r.instructions).toBe("Be terse.");
  });

  it("function tools: a function_call item under tool_choice required, args valid for the schema, then function_call_output", async () => {
    const input: OpenAI.Responses.ResponseInput = [{ role: "user", content: "Weather in Paris?" }];
    const r = await client.responses.create({ model: model(), input, tools: [weather], tool_choice: "required", parallel_tool_calls: false, temperature: 1, max_output_tokens: 60 });
    const calls = r.output.filter((o): o is OpenAI.Responses.ResponseFunctionToolCall => o.type === "function_call");
    expect(calls.length).toBeGreaterThan(0);
    const call = calls[0]!;
    expect(call.name).toBe("get_weather");
    expect(call.call_id).toMatch(/^call_/);
    expect(call.id).toMatch(/^fc_/);
    expect(call.status).toBe("completed");
    const args = z.object({ city: z.enum(["Paris", "Tokyo"]), unit: z.enum(["c", "f"]) }).strict().parse(JSON.parse(call.arguments));
    expect(["Paris", "Tokyo"]).toContain(args.city);
    expect(r.tools).toEqual([{ type: "function", name: "get_weather", description: weather.description, parameters: weather.parameters, strict: true }]);
    expect(r.tool_choice).toBe("required");

    // the round trip: the call and its output as input items
    const output = '{"temperature": 21, "sky": "clear"}';
    const follow = await client.responses.create({
      model: model(),
      input: [...input, { type: "function_call", call_id: call.call_id, name: call.name, arguments: call.arguments }, { type: "function_call_output", call_id: call.call_id, output }],
      tools: [weather],
      tool_choice: "none",
      max_output_tokens: 4,
      temperature: 0,
    });
    expect(follow.output.every((o) => o.type === "message")).toBe(true);
    const prompt = renderToolChat(
      [
        { role: "user", content: "Weather in Paris?" },
        { role: "assistant", content: null, tool_calls: [{ type: "function", id: call.call_id, function: { name: call.name, arguments: call.arguments } }] },
        { role: "tool", content: output, tool_call_id: call.call_id },
      ],
      [{ type: "function", function: { name: weather.name, description: weather.description, parameters: weather.parameters } }],
      "none",
      ds3.tokenizer!.bosToken ?? "",
    );
    expect(follow.usage!.input_tokens).toBe(ds3.tokenizer!.encode(prompt, { addSpecial: false }).length);
  });

  it("function calls stream as argument deltas; a named tool_choice forces that function", async () => {
    const time = { type: "function" as const, name: "get_time", parameters: { type: "object", properties: { zone: { type: "string", enum: ["UTC", "CET"] } }, required: ["zone"] }, strict: false };
    const events = await collect(
      await client.responses.create({ model: model(), input: "Time?", tools: [weather, time], tool_choice: { type: "function", name: "get_time" }, temperature: 1, max_output_tokens: 60, stream: true }),
    );
    const { items, final } = checkEvents(events);
    const calls = items.filter((i) => i.type === "function_call");
    expect(calls.length).toBe(1);
    expect(calls[0].name).toBe("get_time");
    expect(["UTC", "CET"]).toContain(JSON.parse(calls[0].arguments).zone);
    expect(events.some((e) => e.type === "response.function_call_arguments.delta")).toBe(true);
    expect(final.status).toBe("completed");
  });

  it("tool_choice auto: the tools are rendered and whatever the model says comes back as items", async () => {
    const r = await client.responses.create({ model: model(), input: "hi", tools: [weather], max_output_tokens: 12, temperature: 0 });
    expect(r.tool_choice).toBe("auto");
    expect(r.output.length).toBeGreaterThan(0);
    for (const o of r.output) expect(["message", "function_call"]).toContain(o.type);
    for (const o of r.output) if (o.type === "function_call" && o.status === "completed") z.object({ city: z.enum(["Paris", "Tokyo"]), unit: z.enum(["c", "f"]) }).parse(JSON.parse(o.arguments));
    // the tool section made the prompt longer than the plain chat template
    expect(r.usage!.input_tokens).toBeGreaterThan(ds3.renderChat([{ role: "user", content: "hi" }]).ids.length + 20);
  });

  it("text.format json_schema: the output validates (enum, boolean, required nested object, array)", async () => {
    const Answer = z
      .object({
        mood: z.enum(["happy", "sad", "calm"]),
        ok: z.boolean(),
        place: z.object({ zone: z.enum(["north", "south"]), open: z.boolean() }).strict(),
        tags: z.array(z.enum(["a", "b", "c"])).max(3),
      })
      .strict();
    const schema = z.toJSONSchema(Answer) as Record<string, unknown>;
    for (const stream of [false, true]) {
      const params = { model: model(), input: "Describe it as JSON.", text: { format: { type: "json_schema" as const, name: "answer", schema, strict: true } }, temperature: 0, max_output_tokens: 200 };
      let text: string;
      let status: string;
      if (stream) {
        const { items, final } = checkEvents(await collect(await client.responses.create({ ...params, stream: true })));
        text = items.find((i) => i.type === "message").content[0].text;
        status = final.status;
        expect(final.text.format).toMatchObject({ type: "json_schema", name: "answer", strict: true });
      } else {
        const r = await client.responses.create(params);
        text = r.output_text;
        status = r.status!;
      }
      expect(status).toBe("completed");
      Answer.parse(JSON.parse(text));
    }
    // the client's own parse() helper with zodTextFormat
    const parsed = await client.responses.parse({ model: model(), input: "Describe it.", text: { format: zodTextFormat(Answer, "answer") }, temperature: 0, max_output_tokens: 200 });
    expect(Answer.parse(parsed.output_parsed)).toEqual(parsed.output_parsed);
    // cut by max_output_tokens: a valid prefix and status incomplete
    const cut = await client.responses.create({ model: model(), input: "JSON", text: { format: { type: "json_schema", name: "answer", schema } }, temperature: 0, max_output_tokens: 4 });
    expect(cut.status).toBe("incomplete");
    expect(cut.output_text.startsWith("{")).toBe(true);
  });

  it("text.format json_object gives a JSON object", async () => {
    const r = await client.responses.create({ model: model(), input: "JSON please", text: { format: { type: "json_object" } }, temperature: 1, max_output_tokens: 24 });
    const t = r.output_text.trimStart();
    expect(t.startsWith("{")).toBe(true);
    if (r.status === "completed") expect(typeof JSON.parse(t)).toBe("object");
  });

  it("logprobs: the same tokens and logprobs as /v1/chat/completions for the same greedy request", async () => {
    const r = await client.responses.create({ model: model(), input: "Hello", max_output_tokens: 5, temperature: 0, top_logprobs: 2, include: ["message.output_text.logprobs"] });
    const lps = (r.output[0] as OpenAI.Responses.ResponseOutputMessage).content[0] as OpenAI.Responses.ResponseOutputText;
    const c = await client.chat.completions.create({ model: model(), messages: [{ role: "user", content: "Hello" }], max_tokens: 5, temperature: 0, logprobs: true, top_logprobs: 2 });
    expect(lps.text).toBe(c.choices[0]!.message.content);
    const want = c.choices[0]!.logprobs!.content!;
    expect(lps.logprobs!.length).toBe(r.usage!.output_tokens);
    expect(lps.logprobs!.map((l) => [l.token, l.logprob, l.top_logprobs.map((t) => t.token)])).toEqual(want.map((l) => [l.token, l.logprob, l.top_logprobs.map((t) => t.token)]));
  });

  it("reasoning items carry DeepSeek's thinking output (R1 parsing: the output starts inside <think>)", async () => {
    const url = `http://127.0.0.1:${(r1.httpServer!.address() as { port: number }).port}/v1`;
    const c1 = new OpenAI({ baseURL: url, apiKey: KEY, maxRetries: 0 });
    const r = await c1.responses.create({ model: model(), input: "Think.", max_output_tokens: 6, temperature: 0 });
    const chat = await c1.chat.completions.create({ model: model(), messages: [{ role: "user", content: "Think." }], max_tokens: 6, temperature: 0 });
    const reasoning = (chat.choices[0]!.message as unknown as { reasoning_content: string }).reasoning_content;
    const item = r.output[0] as OpenAI.Responses.ResponseReasoningItem;
    expect(item.type).toBe("reasoning");
    expect(item.id).toMatch(/^rs_/);
    expect(item.summary).toEqual([]);
    expect(item.content).toEqual([{ type: "reasoning_text", text: reasoning }]);
    expect(r.usage!.output_tokens_details.reasoning_tokens).toBeGreaterThan(0);
    const { items } = checkEvents(await collect(await c1.responses.create({ model: model(), input: "Think.", max_output_tokens: 6, temperature: 0, stream: true })));
    expect(items[0].type).toBe("reasoning");
    expect(items[0].content[0].text).toBe(reasoning);
  });

  it("item_reference names an earlier output item; unknown ones are a 400", async () => {
    const a = await client.responses.create({ model: model(), input: "Hi", max_output_tokens: 3, temperature: 0 });
    const msg = a.output[0]!;
    const text = a.output_text;
    const b = await client.responses.create({
      model: model(),
      input: [{ role: "user", content: "Hi" }, { type: "item_reference", id: msg.id! }, { role: "user", content: "More" }],
      max_output_tokens: 2,
      temperature: 0,
    });
    const expected = ds3.renderChat([
      { role: "user", content: "Hi" },
      { role: "assistant", content: text },
      { role: "user", content: "More" },
    ]).ids.length;
    expect(b.usage!.input_tokens).toBe(expected);
    const bad = await post({ model: model(), input: [{ type: "item_reference", id: "msg_nope" }] });
    expect(bad.status).toBe(400);
    expect((await bad.json()).error).toMatchObject({ param: "input[0].id", code: "item_not_found" });
  });

  it("a client hanging up mid-stream ends the generation; the server keeps serving", async () => {
    const before = srv.metrics.clientDisconnects.get();
    const ac = new AbortController();
    const res = await fetch(`${base}/v1/responses`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${KEY}` },
      body: JSON.stringify({ model: model(), input: "Talk.", max_output_tokens: 4000, temperature: 1, stream: true }),
      signal: ac.signal,
    });
    const reader = res.body!.getReader();
    let seen = "";
    while (!seen.includes("response.output_text.delta")) {
      const { done, value } = await reader.read();
      if (done) throw new Error(`the stream ended early: ${seen}`);
      seen += new TextDecoder().decode(value);
    }
    ac.abort();
    const t = Date.now();
    while (srv.inFlight > 0 && Date.now() - t < 30_000) await new Promise((r) => setTimeout(r, 20));
    expect(srv.inFlight).toBe(0);
    expect(srv.metrics.clientDisconnects.get()).toBe(before + 1);
    expect((await client.responses.create({ model: model(), input: "hi", max_output_tokens: 1 })).status).not.toBe("failed");
  });

  it("shutdown mid-stream ends the stream with an error event and response.failed, never response.completed", async () => {
    const other = createServer({ ds3, apiKeys: [KEY] });
    const url = (await other.listen(0, "127.0.0.1")).url;
    const res = await fetch(`${url}/v1/responses`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${KEY}` },
      body: JSON.stringify({ model: model(), input: "Talk.", max_output_tokens: 4000, temperature: 1, stream: true }),
    });
    let closing: Promise<void> | null = null;
    const text = await readStream(res, (t) => {
      if (!closing && t.includes("response.output_text.delta")) closing = other.close({ graceMs: 50 });
    });
    await closing;
    expect(text.split("\n\n").filter((b) => b.trim() && !b.startsWith("event: "))).toEqual([]); // every block is named
    const events = namedEvents(text);
    expect(events.every((e) => e.name === e.data.type)).toBe(true);
    expect(events.map((e) => e.data.sequence_number)).toEqual(events.map((_, i) => i));
    expect(events.slice(-2).map((e) => e.name)).toEqual(["error", "response.failed"]);
    expect(events[events.length - 2]!.data).toMatchObject({ code: "shutting_down", message: expect.stringMatching(/shut down/) });
    expect(events[events.length - 1]!.data.response.status).toBe("failed");
    expect(events.some((e) => e.name === "response.completed")).toBe(false);
  });

  it("every unsupported field is a 400 naming it; store and previous_response_id say there is no storage", async () => {
    const ok = { model: model(), input: "hi", max_output_tokens: 1 };
    const cases: Array<[Record<string, unknown>, string]> = [
      [{ store: true }, "store"],
      [{ previous_response_id: "resp_1" }, "previous_response_id"],
      [{ background: true }, "background"],
      [{ conversation: "conv_1" }, "conversation"],
      [{ prompt: { id: "p" } }, "prompt"],
      [{ tools: [{ type: "web_search" }] }, "tools[0].type"],
      [{ tools: [{ type: "function", name: "f", defer_loading: true }] }, "tools[0].defer_loading"],
      [{ input: [{ role: "user", content: [{ type: "input_image", image_url: "http://x" }] }] }, "input[0].content[0].type"],
      [{ input: [{ type: "computer_call_output", call_id: "c" }] }, "input[0].type"],
      [{ reasoning: { effort: "high" } }, "reasoning.effort"],
      [{ text: { verbosity: "low" } }, "text.verbosity"],
      [{ text: { format: { type: "grammar" } } }, "text.format.type"],
      [{ text: { format: { type: "json_schema", name: "x" } } }, "text.format.schema"],
      [{ include: ["file_search_call.results"] }, "include[0]"],
      [{ truncation: "auto" }, "truncation"],
      [{ max_tool_calls: 2 }, "max_tool_calls"],
      [{ temperature: 3 }, "temperature"],
      [{ max_output_tokens: 0 }, "max_output_tokens"],
      [{ max_output_tokens: 100_000 }, "max_output_tokens"],
      [{ tool_choice: "required" }, "tool_choice"],
      [{ input: [] }, "input"],
      [{ seed: 1 }, "seed"],
    ];
    for (const [patch, param] of cases) {
      const res = await post({ ...ok, ...patch });
      const body = await res.json();
      expect([res.status, body.error?.param], JSON.stringify(patch)).toEqual([400, param]);
      expect(body.error.message).toContain(param.split(".")[0]!.replace(/\[\d+\]/, ""));
    }
    // the 400 for store says what to do
    const s = await (await post({ ...ok, store: true })).json();
    expect(s.error.message).toMatch(/does not store responses/);
    // store: false is fine, and the response says it was not stored
    const r = await client.responses.create({ ...ok, store: false });
    expect(r.store).toBe(false);
    // the key is needed
    expect((await post(ok, "sk-wrong")).status).toBe(401);
    // an unknown model
    const m = await post({ ...ok, model: "gpt-nope" });
    expect([400, 404]).toContain(m.status);
    expect((await m.json()).error.code).toBe("model_not_found");
  });
});
