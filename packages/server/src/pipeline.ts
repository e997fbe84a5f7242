// The chat pipeline: a parsed chat request (messages, tools, tool_choice, sampling, constraints,
// n, stop, logprobs, ...) in; per-choice events out: reasoning and content text, tool-call
// deltas, the sampled tokens with their logprobs, the finish reason, usage. It renders the
// prompt, builds the constraints, admits the choices, runs them and parses their output.
// /v1/chat/completions turns the events into OpenAI's chunks and messages; /v1/responses and
// /v1/messages are adapters over the same function with their own wire formats.
import { randomBytes } from "node:crypto";
import type { SampleResult } from "@ds3/core";
import type { ServerContext } from "./context.js";
import { type Processor, compose, forbid, logitBias } from "./constraints.js";
import { invalid } from "./errors.js";
import type { ChoiceResult, ChoiceSpec } from "./generate.js";
import { ReasoningStreamParser, promptOpensThink, splitReasoning } from "./reasoning.js";
import { type ActiveRequest, type Exchange, type Usage, finishMetrics, usage } from "./stream.js";
import { type ParsedToolCall, T, type ToolCallDelta, ToolCallStreamParser, renderToolChat } from "./tools.js";
import type { ChatRequest } from "./validate.js";

export type ChatFinishReason = "stop" | "length" | "tool_calls" | "abort";

export type ChatEvent =
  /** a choice begins (before its first token) */
  | { type: "start"; index: number }
  /** new output of one choice: any of the parts may be empty */
  | { type: "delta"; index: number; reasoning: string; content: string; toolCalls: ToolCallDelta[]; samples: SampleResult[] }
  /** a choice ended: its whole message */
  | { type: "done"; choice: ChatChoice };

export interface ChatChoice {
  index: number;
  finishReason: ChatFinishReason;
  /** the answer text (null when the choice is only tool calls) */
  content: string | null;
  /** the reasoning (DeepSeek's <think> section); null when there was none */
  reasoning: string | null;
  toolCalls: ParsedToolCall[];
  /** every sampled token with its logprob (and top logprobs when asked) */
  samples: SampleResult[];
  result: ChoiceResult;
}

export interface ChatOutcome {
  promptTokens: number;
  /** by index */
  choices: ChatChoice[];
  usage: Usage;
  /** set when the request was cut: by the client hanging up or by shutdown */
  cancelledBy: ActiveRequest["cancelledBy"];
}

export interface ChatHooks {
  /** called once the request is admitted, before any event (open a stream here); errors thrown
   *  before it are plain HTTP errors (400, 404, 429), after it they arrive mid-response */
  onStart?(info: { id: string; promptTokens: number }): void | Promise<void>;
  /** every event, awaited (backpressure): choices run concurrently, so events of different
   *  indexes interleave; those of one index come in order */
  onEvent(ev: ChatEvent): void | Promise<void>;
}

/** A fresh id for a chat response ("chatcmpl-…"). */
export const chatId = (): string => `chatcmpl-${randomBytes(12).toString("hex")}`;

interface ParseState {
  reasoning: ReasoningStreamParser | null;
  tools: ToolCallStreamParser | null;
  content: string;
  reasoningText: string;
}

function pipe(st: ParseState, text: string, final: boolean): { reasoning: string; content: string; calls: ToolCallDelta[] } {
  let r = st.reasoning ? st.reasoning.push(text) : { reasoning: "", content: text };
  if (final && st.reasoning) {
    const f = st.reasoning.finish();
    r = { reasoning: r.reasoning + f.reasoning, content: r.content + f.content };
  }
  let out = { content: r.content, calls: [] as ToolCallDelta[] };
  if (st.tools) {
    out = st.tools.push(r.content);
    if (final) {
      const f = st.tools.finish();
      out = { content: out.content + f.content, calls: [...out.calls, ...f.calls] };
    }
  }
  st.content += out.content;
  st.reasoningText += r.reasoning;
  return { reasoning: r.reasoning, content: out.content, calls: out.calls };
}

/** Run a chat request: prompt, constraints, admission, generation, parsing. */
export async function runChat(ctx: ServerContext, x: Exchange, r: ChatRequest, hooks: ChatHooks): Promise<ChatOutcome> {
  const { tok, table } = ctx;
  ctx.checkModel(r);
  if (!tok || !table) throw invalid("messages", `model ${ctx.modelName} has no tokenizer, so it cannot chat: use /v1/completions with token-id prompts`);

  // render the prompt
  const toolsOn = r.tools !== null && r.toolChoice !== "none";
  const involvesTools = toolsOn || r.messages.some((m) => m.role === "tool" || (m.tool_calls?.length ?? 0) > 0);
  let promptText: string;
  let promptIds: number[];
  try {
    if (involvesTools) {
      promptText = renderToolChat(r.messages, r.tools, r.toolChoice, tok.bosToken ?? "");
      promptIds = tok.encode(promptText, { addSpecial: false });
    } else ({ text: promptText, ids: promptIds } = ctx.ds3.renderChat(r.messages));
  } catch (e) {
    throw invalid("messages", `cannot render the chat template: ${(e as Error).message}`);
  }
  ctx.checkContext(promptIds.length, r, "messages");

  // constraints
  const base: Processor[] = [];
  if (r.logitBias) base.push(logitBias(r.logitBias));
  let grammarNames: string[] | null = null;
  if (toolsOn && (r.toolChoice === "required" || typeof r.toolChoice === "object") && ctx.toolGrammar())
    grammarNames = typeof r.toolChoice === "object" ? [r.toolChoice.name] : r.tools!.map((t) => t.function.name);
  const callsBegin = table.idOf(T.callsBegin);
  // tool_choice "none" beside tools: the model must not call any
  if (r.tools && r.toolChoice === "none" && callsBegin !== undefined) base.push(forbid([callsBegin]));

  const specs: ChoiceSpec[] = [];
  for (let j = 0; j < r.n; j++) {
    const ps = [...base];
    if (grammarNames) ps.push(ctx.toolGrammar()!.processor(grammarNames, r.parallelToolCalls && typeof r.toolChoice !== "object"));
    else if (r.jsonMode) ps.push(ctx.jsonMasker().processor().process);
    specs.push({ index: j, promptIds, sampling: ctx.samplingFor(r, j), processor: compose(ps) });
  }

  const opensThink = promptOpensThink(promptText);
  const mode = ctx.reasoningMode;
  const newState = (): ParseState => ({
    reasoning: mode === "none" ? null : new ReasoningStreamParser(mode, opensThink),
    tools: toolsOn ? new ToolCallStreamParser() : null,
    content: "",
    reasoningText: "",
  });
  const finishReason = (res: ChoiceResult, st: ParseState): ChatFinishReason =>
    res.finishReason === "abort" ? "abort" : st.tools && st.tools.toolCalls.length > 0 && res.finishReason === "stop" ? "tool_calls" : (res.finishReason as ChatFinishReason);

  const id = chatId();
  return ctx.admission.run(x, specs, async (runs, active) => {
    await hooks.onStart?.({ id, promptTokens: promptIds.length });
    const choices: ChatChoice[] = new Array(r.n);
    const results: ChoiceResult[] = [];
    await ctx.admission.runAll(x, runs, active, async (run) => {
      const st = newState();
      const index = run.spec.index;
      await hooks.onEvent({ type: "start", index });
      const emit = async (p: { reasoning: string; content: string; calls: ToolCallDelta[] }, samples: SampleResult[]) => {
        if (p.reasoning || p.content || p.calls.length || samples.length)
          await hooks.onEvent({ type: "delta", index, reasoning: p.reasoning, content: p.content, toolCalls: p.calls, samples });
      };
      const result = await run.run(async (d) => emit(pipe(st, d.text, false), d.samples));
      await emit(pipe(st, "", true), []);
      let reasoning = st.reasoning?.hadReasoning ? st.reasoningText : null;
      let content = st.content;
      if (reasoning === null && mode === "auto" && content.includes("</think>")) {
        const s = splitReasoning(content);
        reasoning = s.reasoning;
        content = s.content;
      }
      const calls: ParsedToolCall[] = st.tools?.toolCalls ?? [];
      const fr = finishReason(result, st);
      const choice: ChatChoice = {
        index,
        finishReason: fr,
        content: calls.length && content === "" ? null : content,
        reasoning,
        toolCalls: calls,
        samples: result.samples,
        result,
      };
      choices[index] = choice;
      results.push(result);
      finishMetrics(ctx.metrics, result, fr);
      await hooks.onEvent({ type: "done", choice });
    });
    return { promptTokens: promptIds.length, choices, usage: usage(promptIds.length, results), cancelledBy: active.cancelledBy };
  });
}
