// Real clients on /v1/chat/completions (a real server at 127.0.0.1, the built-in model: random
// weights, so outputs are checked for shape and schema validity, not sense): the Vercel AI SDK
// with @ai-sdk/openai-compatible (generateText, streamText, generateObject with
// supportsStructuredOutputs, a tool loop) and LangChain's ChatOpenAI (withStructuredOutput by its
// default method, json_schema, and by function calling). Every field these clients send must be
// accepted: the server answers 400 to fields it does not implement.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { cpu } from "@ds3/backend-cpu";
import { DS3 } from "@ds3/core";
import { type Ds3Server, createServer } from "@ds3/server";
import { ChatOpenAI } from "@langchain/openai";
import { generateObject, generateText, stepCountIs, streamText, tool } from "ai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";

const Person = z.object({
  name: z.string().max(10),
  admin: z.boolean(),
  role: z.enum(["dev", "ops"]),
  address: z.object({ zip: z.number().int().min(0).max(99999) }),
  langs: z.array(z.enum(["ts", "py", "go"])).max(2),
});

describe("server: AI SDK (openai-compatible) and LangChain on chat completions", () => {
  let ds3: DS3;
  let srv: Ds3Server;
  let baseURL: string;
  let model: string;
  const KEY = "sk-clients";

  beforeAll(async () => {
    ds3 = await DS3.load({ backend: cpu });
    model = ds3.modelName;
    srv = createServer({ ds3, apiKeys: [KEY] });
    baseURL = `${(await srv.listen(0, "127.0.0.1")).url}/v1`;
  });
  afterAll(async () => {
    await srv?.close();
    await ds3?.close();
  });

  const provider = () => createOpenAICompatible({ name: "ds3", baseURL, apiKey: KEY, supportsStructuredOutputs: true });

  it("AI SDK: generateText and streamText", async () => {
    const p = provider();
    const a = await generateText({ model: p(model), prompt: "Say hi.", maxOutputTokens: 8, temperature: 0 });
    expect(a.finishReason).toBe("length");
    expect(a.usage.outputTokens).toBe(8);
    const s = streamText({ model: p(model), prompt: "Say hi.", maxOutputTokens: 8, temperature: 0 });
    let text = "";
    for await (const d of s.textStream) text += d;
    expect(text).toBe(a.text);
    expect(await s.finishReason).toBe("length");
  });

  it("AI SDK: generateObject with supportsStructuredOutputs validates against the schema", async () => {
    const p = provider();
    for (const seed of [1, 2]) {
      const r = await generateObject({ model: p(model), schema: Person, prompt: "A person.", maxOutputTokens: 300, temperature: 1, seed });
      expect(Person.safeParse(r.object).success).toBe(true);
      expect(r.finishReason).toBe("stop");
    }
  });

  it("AI SDK: a tool loop (the required call's input follows the schema, the result goes back)", async () => {
    // the request bodies the client sends, as the server receives them
    const bodies: Array<{ messages: Array<{ role: string; content: string }> }> = [];
    const p = createOpenAICompatible({
      name: "ds3",
      baseURL,
      apiKey: KEY,
      supportsStructuredOutputs: true,
      fetch: async (input, init) => {
        if (typeof init?.body === "string") bodies.push(JSON.parse(init.body));
        return fetch(input, init);
      },
    });
    const calls: unknown[] = [];
    const r = await generateText({
      model: p(model),
      prompt: "What is the weather in Paris?",
      tools: {
        weather: tool({
          description: "the weather in a city",
          inputSchema: z.object({ city: z.string().max(12), unit: z.enum(["c", "f"]) }),
          execute: async (input) => {
            calls.push(input);
            return { tempC: 21 };
          },
        }),
      },
      toolChoice: "required",
      stopWhen: stepCountIs(2),
      maxOutputTokens: 120,
      temperature: 1,
      seed: 3,
    });
    expect(r.steps.length).toBe(2);
    expect(calls.length).toBeGreaterThan(0);
    for (const c of calls) expect(z.object({ city: z.string(), unit: z.enum(["c", "f"]) }).safeParse(c).success).toBe(true);
    // the first step's calls were executed and their results sent back in the second request
    expect(r.steps[0]!.toolCalls.length).toBeGreaterThan(0);
    expect(r.steps[0]!.toolResults.length).toBe(r.steps[0]!.toolCalls.length);
    expect(bodies.length).toBe(2);
    expect(bodies[1]!.messages.some((m: { role: string; content: string }) => m.role === "tool" && String(m.content).includes("21"))).toBe(true);
  });

  it("LangChain: withStructuredOutput by its default method (json_schema) and by function calling", async () => {
    const llm = new ChatOpenAI({ model, apiKey: KEY, configuration: { baseURL }, temperature: 1, maxTokens: 300, maxRetries: 0 });
    const bySchema = await llm.withStructuredOutput(Person, { name: "person" }).invoke("A person.");
    expect(Person.safeParse(bySchema).success).toBe(true);
    const byTool = await llm.withStructuredOutput(Person, { name: "person", method: "functionCalling" }).invoke("A person.");
    expect(Person.safeParse(byTool).success).toBe(true);
    // plain invoke and stream
    const plain = await new ChatOpenAI({ model, apiKey: KEY, configuration: { baseURL }, temperature: 0, maxTokens: 6, maxRetries: 0 }).invoke("hi");
    expect(typeof plain.content).toBe("string");
    let streamed = "";
    for await (const c of await new ChatOpenAI({ model, apiKey: KEY, configuration: { baseURL }, temperature: 0, maxTokens: 6, maxRetries: 0, streaming: true }).stream("hi")) streamed += c.content;
    expect(streamed).toBe(plain.content);
  });
});
