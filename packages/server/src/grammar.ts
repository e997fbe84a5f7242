// Constrained decoding: one interface for every structured-output spec the routes accept
// (json_object, json_schema, regex, choice, EBNF grammar, DeepSeek-V3 tool calls).
// Interim version: json_object and tool_calls over the hand-written JSON masker and
// ToolCallGrammar; the other spec types are rejected with GrammarError until the grammar
// engine lands behind this same interface.
import { type Processor, ToolCallGrammar, toolMarkers } from "./constraints.js";
import { JsonMasker } from "./json.js";
import type { TokenTable } from "./tokens.js";
import { T } from "./tools.js";

export type GrammarSpec =
  | { type: "json_object" }
  | { type: "json_schema"; schema: Record<string, unknown>; strict?: boolean }
  | { type: "regex"; pattern: string }
  | { type: "choice"; choices: string[] }
  | { type: "grammar"; grammar: string }
  | {
      type: "tool_calls";
      tools: { name: string; parameters?: Record<string, unknown> }[];
      choice: "auto" | "required" | { name: string };
      parallel: boolean;
    };

/** an invalid schema / regex / grammar; the message names what is wrong. Routes answer 400 with it. */
export class GrammarError extends Error {
  override name = "GrammarError";
}

export interface CompiledGrammar {
  /** a fresh matcher for one generated choice: masks logits so the output follows the grammar and,
   *  once the grammar is complete, allows only the end-of-sequence token */
  processor(): Processor;
}

export interface Grammars {
  /** compiled off the request's critical path and cached per spec; rejects with GrammarError */
  compile(spec: GrammarSpec): Promise<CompiledGrammar>;
}

/** `eosIds` defaults to the vocabulary's <｜end▁of▁sentence｜>. */
export function createGrammars(table: TokenTable, eosIds?: readonly number[]): Grammars {
  const eos = eosIds ?? [table.idOf(T.eos)].filter((x): x is number => x !== undefined);
  let json: JsonMasker | null = null;
  let tools: ToolCallGrammar | null | undefined;
  const getJson = () => (json ??= new JsonMasker(table, eos));
  return {
    async compile(spec) {
      switch (spec.type) {
        case "json_object": {
          const m = getJson();
          return { processor: () => m.processor().process };
        }
        case "tool_calls": {
          if (tools === undefined) {
            const mk = toolMarkers(table);
            tools = mk ? new ToolCallGrammar(table, mk, getJson(), eos) : null;
          }
          if (!tools) throw new GrammarError("this model's vocabulary has no DeepSeek-V3 tool-call tokens");
          if (spec.choice === "auto") throw new GrammarError("tool_calls: choice 'auto' is not constrained yet");
          const names = typeof spec.choice === "object" ? [spec.choice.name] : spec.tools.map((t) => t.name);
          const parallel = spec.parallel && typeof spec.choice !== "object";
          const g = tools;
          return { processor: () => g.processor(names, parallel) };
        }
        default:
          throw new GrammarError(`structured output type '${spec.type}' is not supported yet`);
      }
    },
  };
}
