// The default paths of the newest clients against a real server at 127.0.0.1 (built-in model,
// random weights: the text is noise, so the tests check what the clients get and accept):
// - the Vercel AI SDK with @ai-sdk/openai's default provider, which speaks the Responses API:
//   generateText, streamText, generateObject, a tool loop (call → execute → second step);
// - the AI SDK with @ai-sdk/openai-compatible (supportsStructuredOutputs: true) on chat completions;
// - LangChain's withStructuredOutput with its default method (json_schema) and with function calling.
// Objects under a schema must validate against it (zod, independently of the clients' own checks):
// the schema has an enum, a boolean, a required nested object and an array.
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { cpu } from "@ds3/backend-cpu";
import { DS3 } from "@ds3/core";
import { type Ds3Server, createServer } from "@ds3/server";
import { ChatOpenAI } from "@langchain/openai";
import { generateObject, generateText, stepCountIs, streamText, tool } from "ai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";

const KEY = "sk-clients";

const Answer = z
  .object({
    mood: z.enum(["happy", "sad", "calm"]),
    ok: z.boolean(),
    place: z.object({ zone: z.enum(["north", "south"]), open: z.boolean() }).strict(),
    tags: z.array(z.enum(["a", "b", "c"])).max(3),
  })
  .strict();

describe("client SDKs on their default paths", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let base: string;
  const requests: Array<{ path: string; body: Record<string, unknown> }> = [];

  beforeAll(async () => {
    ds3 = await DS3.load({ backend: cpu });
    srv = createServer({ ds3, apiKeys: [KEY] });
    base = (await srv.listen(0, "127.0.0.1")).url;
  });
  afterAll(async () => {
    await srv?.close();
    await ds3?.close();
  });

  /** a fetch that records what the client sends */
  const recording: typeof fetch = async (input, init) => {
    const url = new URL(typeof input === "string" ? input : input instanceof URL ? input.href : input.url);
    if (typeof init?.body === "string") requests.push({ path: url.pathname, body: JSON.parse(init.body) });
    return fetch(input, init);
  };
  const aiOpenAI = () => createOpenAI({ baseURL: `${base}/v1`, apiKey: KEY, fetch: recording });

  it("AI SDK, @ai-sdk/openai default provider (Responses API): generateText and streamText", async () => {
    const model = aiOpenAI()(ds3.modelName);
    requests.length = 0;
    const g = await generateText({ model, prompt: "Say something.", maxOutputTokens: 8, temperature: 0 });
    expect(requests.map((r) => r.path)).toEqual(["/v1/responses"]);
    expect(typeof g.text).toBe("string");
    expect(g.usage.inputTokens).toBe(ds3.renderChat([{ role: "user", content: "Say something." }]).ids.length);
    expect(g.usage.outputTokens).toBeGreaterThan(0);
    expect(["stop", "length"]).toContain(g.finishReason);
    if (g.finishReason === "length") expect(g.usage.outputTokens).toBe(8);

    const s = streamText({ model, prompt: "Say something.", maxOutputTokens: 8, temperature: 0 });
    let text = "";
    for await (const t of s.textStream) text += t;
    expect(text).toBe(g.text);
    expect(await s.finishReason).toBe(g.finishReason);
    expect((await s.usage).outputTokens).toBe(g.usage.outputTokens);
  });

  it("AI SDK, @ai-sdk/openai default provider: a second turn references the first answer (item_reference) and renders it", async () => {
    const model = aiOpenAI()(ds3.modelName);
    const first = await generateText({ model, prompt: "Hi", maxOutputTokens: 3, temperature: 0 });
    requests.length = 0;
    const second = await generateText({ model, messages: [{ role: "user", content: "Hi" }, ...first.response.messages, { role: "user", content: "More" }], maxOutputTokens: 2, temperature: 0 });
    const items = requests[0]!.body.input as Array<{ type?: string }>;
    expect(items.some((i) => i.type === "item_reference")).toBe(true);
    const expected = ds3.renderChat([
      { role: "user", content: "Hi" },
      { role: "assistant", content: first.text },
      { role: "user", content: "More" },
    ]).ids.length;
    expect(second.usage.inputTokens).toBe(expected);
  });

  it("AI SDK, @ai-sdk/openai default provider: generateObject validates against the schema (text.format json_schema)", async () => {
    requests.length = 0;
    const { object } = await generateObject({ model: aiOpenAI()(ds3.modelName), schema: Answer, prompt: "Describe the place.", temperature: 0, maxOutputTokens: 200 });
    expect(requests[0]!.path).toBe("/v1/responses");
    expect((requests[0]!.body.text as { format: { type: string } }).format.type).toBe("json_schema");
    Answer.parse(object);
  });

  it("AI SDK, @ai-sdk/openai default provider: a tool loop (call, execute, the result back, a second step)", async () => {
    const seen: unknown[] = [];
    requests.length = 0;
    const r = await generateText({
      model: aiOpenAI()(ds3.modelName),
      prompt: "What is the weather in Paris?",
      tools: {
        get_weather: tool({
          description: "Current weather of a city",
          inputSchema: z.object({ city: z.enum(["Paris", "Tokyo"]), unit: z.enum(["c", "f"]) }),
          execute: async (input) => {
            seen.push(input);
            return { temperature: 21, unit: input.unit };
          },
        }),
      },
      toolChoice: "required",
      prepareStep: ({ stepNumber }) => (stepNumber > 0 ? { toolChoice: "none" } : {}),
      stopWhen: stepCountIs(2),
      providerOptions: { openai: { parallelToolCalls: false } },
      maxOutputTokens: 60,
      temperature: 1,
    });
    expect(r.steps).toHaveLength(2);
    const calls = r.steps[0]!.toolCalls;
    expect(calls.length).toBeGreaterThan(0);
    expect(calls[0]!.toolName).toBe("get_weather");
    expect(seen.length).toBe(calls.length);
    z.object({ city: z.enum(["Paris", "Tokyo"]), unit: z.enum(["c", "f"]) }).parse(seen[0]);
    expect(r.steps[0]!.toolResults[0]!.output).toMatchObject({ temperature: 21 });
    // the second request carried the call and its output as Responses input items
    expect(requests.map((q) => q.path)).toEqual(["/v1/responses", "/v1/responses"]);
    const items = requests[1]!.body.input as Array<{ type?: string; call_id?: string }>;
    const call = items.find((i) => i.type === "function_call");
    const out = items.find((i) => i.type === "function_call_output");
    expect(call?.call_id).toBe(calls[0]!.toolCallId);
    expect(out?.call_id).toBe(calls[0]!.toolCallId);
    expect(r.steps[1]!.toolCalls).toHaveLength(0);
  });

  it("AI SDK, @ai-sdk/openai-compatible with supportsStructuredOutputs: generateObject (chat completions json_schema)", async () => {
    const provider = createOpenAICompatible({ name: "ds3", baseURL: `${base}/v1`, apiKey: KEY, supportsStructuredOutputs: true, fetch: recording });
    requests.length = 0;
    const { object } = await generateObject({ model: provider(ds3.modelName), schema: Answer, prompt: "Describe the place.", temperature: 0, maxOutputTokens: 200 });
    expect(requests[0]!.path).toBe("/v1/chat/completions");
    expect((requests[0]!.body.response_format as { type: string }).type).toBe("json_schema");
    Answer.parse(object);
    // and plain text on the same provider
    const g = await generateText({ model: provider(ds3.modelName), prompt: "Hi", maxOutputTokens: 4, temperature: 0 });
    expect(typeof g.text).toBe("string");
  });

  it("LangChain withStructuredOutput: the default method (json_schema) and function calling", async () => {
    const llm = new ChatOpenAI({ model: ds3.modelName, apiKey: KEY, configuration: { baseURL: `${base}/v1`, fetch: recording }, temperature: 0, maxTokens: 200, maxRetries: 0 });
    requests.length = 0;
    const a = await llm.withStructuredOutput(Answer).invoke("Describe the place.");
    expect(requests[0]!.path).toBe("/v1/chat/completions");
    expect((requests[0]!.body.response_format as { type: string }).type).toBe("json_schema");
    Answer.parse(a);
    requests.length = 0;
    const b = await llm.withStructuredOutput(Answer, { method: "functionCalling", name: "describe" }).invoke("Describe the place.");
    expect(requests[0]!.body.tool_choice).toEqual({ type: "function", function: { name: "describe" } });
    Answer.parse(b);
  });
});
