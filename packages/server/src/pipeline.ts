// The chat pipeline: a parsed chat request (messages, tools, tool_choice, sampling, constraints,
// n, stop, logprobs, ...) in; per-choice events out: reasoning and content text, tool-call
// deltas, the sampled tokens with their logprobs, the finish reason, usage. It renders the
// prompt, builds the constraints, admits the choices, runs them and parses their output.
// /v1/chat/completions turns the events into OpenAI's chunks and messages; /v1/responses and
// /v1/messages are adapters over the same function with their own wire formats.
import { randomBytes } from "node:crypto";
import type { SampleResult } from "@ds3/core";
import type { ServerContext } from "./context.js";
import { type Processor, compose, forbid, logitBias, toolMarkers } from "./constraints.js";
import { ApiError, invalid } from "./errors.js";
import type { CompiledGrammar } from "./grammar.js";
import { type ChoiceResult, type ChoiceSpec, minTokens } from "./generate.js";
import { ReasoningStreamParser, promptOpensThink, splitReasoning } from "./reasoning.js";
import { type ActiveRequest, type Exchange, type Usage, cutError, finishMetrics, usage } from "./stream.js";
import { type ParsedToolCall, T, type ToolCallDelta, ToolCallStreamParser, renderToolChat } from "./tools.js";
import type { ChatRequest } from "./validate.js";

/** "abort" only when the client hung up (nobody reads it); a request cut by shutdown throws
 *  cutError() (503 shutting_down) instead, which no client mistakes for an answer */
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

/** The prompt of a chat request: the checkpoint's chat template (or, with tools, DeepSeek-V3's
 *  tool-call format), chat_template_kwargs and reasoning_effort as template variables, and
 *  continue_final_message / prefix: true leaving the last assistant message open. */
export function renderPrompt(ctx: ServerContext, r: ChatRequest): { text: string; ids: number[] } {
  const tok = ctx.tok!;
  const toolsOn = r.tools !== null && r.toolChoice !== "none";
  const involvesTools = toolsOn || r.messages.some((m) => m.role === "tool" || (m.tool_calls?.length ?? 0) > 0);
  const addGen = r.addGenerationPrompt ?? true;
  const vars: Record<string, unknown> = { ...r.templateVars };
  if (r.reasoningEffort !== undefined) vars.thinking = r.reasoningEffort !== "none";
  const hasVars = Object.keys(vars).length > 0;
  let text: string;
  const render = (v: Record<string, unknown> | undefined) => ctx.ds3.renderChat(r.messages, { addGenerationPrompt: addGen, ...(v && { variables: v }) }).text;
  try {
    if (involvesTools) {
      if (r.reasoningEffort !== undefined) throw invalid("reasoning_effort", "is not supported together with tools (the tool-call prompt has no thinking switch)");
      if (hasVars) throw invalid("chat_template_kwargs", "is not supported together with tools (tool prompts use DeepSeek-V3's own tool-call format, not the chat template)");
      text = renderToolChat(r.messages, r.tools, r.toolChoice, tok.bosToken ?? "", addGen);
    } else {
      text = render(hasVars ? vars : undefined);
      // a variable the template never reads would be silently ignored: name it
      for (const k of Object.keys(vars)) {
        const without = { ...vars };
        delete without[k];
        const a = render({ ...without, [k]: true });
        const b = render({ ...without, [k]: false });
        if (a === b && a === render(without)) {
          if (r.reasoningEffort !== undefined && k === "thinking" && !(r.templateVars && k in r.templateVars))
            throw invalid("reasoning_effort", `this model's chat template has no thinking switch (${ctx.modelName})`);
          throw invalid(`chat_template_kwargs.${k}`, `this model's chat template does not use it`);
        }
      }
    }
  } catch (e) {
    if (e instanceof ApiError) throw e;
    throw invalid("messages", `cannot render the chat template: ${(e as Error).message}`);
  }
  if (r.continueFinal) {
    const last = r.messages[r.messages.length - 1]!;
    const content = last.content ?? "";
    const param = r.continueFinal && last.prefix === undefined ? "continue_final_message" : `messages[${r.messages.length - 1}].prefix`;
    if (content === "") throw invalid(param, "the last message has no content to continue");
    const at = text.lastIndexOf(content);
    if (at < 0) throw invalid(param, "the chat template changes the last message's content, so it cannot be continued");
    text = text.slice(0, at + content.length);
  }
  return { text, ids: tok.encode(text, { addSpecial: false }) };
}

/** The processors of a request's choices: logit_bias, min_tokens, and its grammar (structured
 *  output, or the tool calls' schemas when tools are on), a fresh matcher per choice. */
export async function chatSpecs(ctx: ServerContext, r: ChatRequest, promptIds: number[]): Promise<ChoiceSpec[]> {
  const table = ctx.table!;
  const toolsOn = r.tools !== null && r.toolChoice !== "none";
  const base: Processor[] = [];
  if (r.logitBias) base.push(logitBias(r.logitBias));
  const callsBegin = table.idOf(T.callsBegin);
  // tool_choice "none" beside tools: the model must not call any
  if (r.tools && r.toolChoice === "none" && callsBegin !== undefined) base.push(forbid([callsBegin]));
  let grammar: CompiledGrammar | null = null;
  if (toolsOn && toolMarkers(table)) {
    const choice = r.toolChoice as "auto" | "required" | { name: string };
    grammar = await ctx.compileGrammar({
      spec: {
        type: "tool_calls",
        tools: r.tools!.map((t) => ({ name: t.function.name, ...(t.function.parameters && { parameters: t.function.parameters }) })),
        choice,
        parallel: r.parallelToolCalls && typeof choice !== "object",
      },
      param: "tools",
    });
  } else {
    const g = r.grammar ?? (r.jsonMode ? { spec: { type: "json_object" as const }, param: "response_format" } : null);
    if (g) grammar = await ctx.compileGrammar(g);
  }
  const specs: ChoiceSpec[] = [];
  for (let j = 0; j < r.n; j++) {
    const sampling = ctx.samplingFor(r, j);
    const ps = [...base];
    if (r.minTokens) ps.push(minTokens(r.minTokens, [...ctx.eosIds, ...(sampling.stopTokenIds ?? [])]));
    if (grammar) ps.push(grammar.processor());
    specs.push({ index: j, promptIds, sampling, processor: compose(ps), ...(r.includeStopStr && { includeStopStr: true }) });
  }
  return specs;
}

/** Run a chat request: prompt, constraints, admission, generation, parsing. */
export async function runChat(ctx: ServerContext, x: Exchange, r: ChatRequest, hooks: ChatHooks): Promise<ChatOutcome> {
  const { tok, table } = ctx;
  ctx.checkModel(r);
  if (!tok || !table) throw invalid("messages", `model ${ctx.modelName} has no tokenizer, so it cannot chat: use /v1/completions with token-id prompts`);

  const { text: promptText, ids: promptIds } = renderPrompt(ctx, r);
  ctx.checkContext(promptIds.length, r, "messages");
  const specs = await chatSpecs(ctx, r, promptIds);
  const toolsOn = r.tools !== null && r.toolChoice !== "none";

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
      if (result.finishReason === "abort" && active.cancelledBy !== "client") {
        // cut by shutdown (or the engine stopping): an error, never finish_reason "abort"
        finishMetrics(ctx.metrics, result, "abort");
        throw cutError(active);
      }
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
