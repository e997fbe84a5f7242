// Tool calling in DeepSeek-V3's format.
//
// DeepSeek-V3's own chat template ignores `tools` (and mishandles a lone tool call), so when a
// conversation involves tools it is rendered here in the same format, with a tool section in the
// system prompt (as vLLM's and SGLang's DeepSeek-V3 tool templates do):
//
//   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
//   ```json
//   ARGUMENTS
//   ```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜><｜end▁of▁sentence｜>
//
// and tool results come back as <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>…<｜tool▁output▁end｜>….
import { randomBytes } from "node:crypto";
import type { ChatMessage } from "@ds3/core";
import type { ToolDef } from "./validate.js";

export const T = {
  callsBegin: "<｜tool▁calls▁begin｜>",
  callsEnd: "<｜tool▁calls▁end｜>",
  callBegin: "<｜tool▁call▁begin｜>",
  callEnd: "<｜tool▁call▁end｜>",
  sep: "<｜tool▁sep｜>",
  outputsBegin: "<｜tool▁outputs▁begin｜>",
  outputsEnd: "<｜tool▁outputs▁end｜>",
  outputBegin: "<｜tool▁output▁begin｜>",
  outputEnd: "<｜tool▁output▁end｜>",
  user: "<｜User｜>",
  assistant: "<｜Assistant｜>",
  eos: "<｜end▁of▁sentence｜>",
} as const;

export function toolSection(tools: ToolDef[], choice: "auto" | "required" | { name: string }): string {
  let s = "\n\n## Tools\nYou have access to the following tools:\n";
  for (const t of tools) {
    s += `\n### ${t.function.name}\n`;
    if (t.function.description) s += `Description: ${t.function.description}\n`;
    s += `\nParameters: ${JSON.stringify(t.function.parameters ?? { type: "object", properties: {} })}\n`;
  }
  s +=
    "\nTo call tools, answer with exactly this format, one call per tool, and nothing after it:\n" +
    `${T.callsBegin}${T.callBegin}function${T.sep}TOOL_NAME\n\`\`\`json\n{"argument": "value"}\n\`\`\`${T.callEnd}${T.callsEnd}\n`;
  if (choice === "required") s += "\nYou must call at least one of these tools.\n";
  else if (typeof choice === "object") s += `\nYou must call the tool ${choice.name}.\n`;
  return s;
}

/**
 * Renders a conversation with tools, tool calls and tool results in DeepSeek-V3's chat format.
 * `bos` is the tokenizer's BOS token text.
 */
export function renderToolChat(messages: ChatMessage[], tools: ToolDef[] | null, choice: "none" | "auto" | "required" | { name: string }, bos: string, addGenerationPrompt = true): string {
  let system = "";
  let firstSystem = true;
  for (const m of messages) {
    if (m.role !== "system") continue;
    system += (firstSystem ? "" : "\n\n") + (m.content ?? "");
    firstSystem = false;
  }
  if (tools && choice !== "none") system += toolSection(tools, choice);
  let out = bos + system;
  let inTools = false; // inside a run of tool outputs
  let firstOutput = true;
  let last = "";
  for (const m of messages) {
    if (m.role === "system") continue;
    if (m.role === "user") {
      if (inTools) out += T.outputsEnd;
      inTools = false;
      out += T.user + (m.content ?? "");
    } else if (m.role === "assistant") {
      out += inTools ? T.outputsEnd : T.assistant;
      inTools = false;
      if (m.tool_calls?.length) {
        out += m.content ?? "";
        out += T.callsBegin;
        out += m.tool_calls
          .map((c) => `${T.callBegin}${c.type ?? "function"}${T.sep}${c.function.name}\n\`\`\`json\n${c.function.arguments}\n\`\`\`${T.callEnd}`)
          .join("\n");
        out += T.callsEnd + T.eos;
        firstOutput = true;
      } else out += (m.content ?? "") + T.eos;
    } else if (m.role === "tool") {
      if (!inTools || firstOutput) out += T.outputsBegin + T.outputBegin + (m.content ?? "") + T.outputEnd;
      else out += "\n" + T.outputBegin + (m.content ?? "") + T.outputEnd;
      inTools = true;
      firstOutput = false;
    }
    last = m.role;
  }
  if (inTools) out += T.outputsEnd;
  else if (addGenerationPrompt && last !== "assistant") out += T.assistant;
  return out;
}

export interface ParsedToolCall {
  id: string;
  type: "function";
  function: { name: string; arguments: string };
}

export function toolCallId(): string {
  return `call_${randomBytes(12).toString("hex")}`;
}

const CALL_RE = new RegExp(
  `${esc(T.callBegin)}\\s*(\\w+)\\s*${esc(T.sep)}\\s*([^\\n\`<]+?)\\s*\\n\\s*(?:\`\`\`(?:json)?\\s*\\n)?([\\s\\S]*?)(?:\\n?\\s*\`\`\`)?\\s*${esc(T.callEnd)}`,
  "g",
);

function esc(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

/** Parses a whole output: content before the tool-call block, and the calls in it. */
export function parseToolCalls(text: string): { content: string | null; calls: ParsedToolCall[] } {
  const at = text.indexOf(T.callsBegin);
  if (at < 0) return { content: text, calls: [] };
  const block = text.slice(at + T.callsBegin.length);
  const calls: ParsedToolCall[] = [];
  for (const m of block.matchAll(CALL_RE)) calls.push({ id: toolCallId(), type: "function", function: { name: m[2]!.trim(), arguments: m[3]!.trim() } });
  if (calls.length === 0) return { content: text, calls: [] };
  const content = text.slice(0, at);
  return { content: content === "" ? null : content, calls };
}

export interface ToolCallDelta {
  index: number;
  id?: string;
  type?: "function";
  function: { name?: string; arguments?: string };
}

/**
 * Streaming tool-call parser: push text deltas, get content deltas and tool-call deltas (the
 * first delta of a call carries its id and name, later ones pieces of its arguments).
 * Any text that could still be the start of a marker is held back.
 */
export class ToolCallStreamParser {
  private buf = "";
  private state: "content" | "between" | "header" | "args" | "done" = "content";
  private calls: ParsedToolCall[] = [];
  private argsSent = 0;
  private raw = "";

  get toolCalls(): ParsedToolCall[] {
    return this.calls;
  }

  push(delta: string): { content: string; calls: ToolCallDelta[] } {
    this.buf += delta;
    this.raw += delta;
    return this.drain(false);
  }

  /** End of output: whatever is held back comes out. */
  finish(): { content: string; calls: ToolCallDelta[] } {
    return this.drain(true);
  }

  private drain(final: boolean): { content: string; calls: ToolCallDelta[] } {
    let content = "";
    const calls: ToolCallDelta[] = [];
    for (;;) {
      if (this.state === "content") {
        const i = this.buf.indexOf(T.callsBegin);
        if (i >= 0) {
          content += this.buf.slice(0, i);
          this.buf = this.buf.slice(i + T.callsBegin.length);
          this.state = "between";
          continue;
        }
        const hold = final ? 0 : partialSuffix(this.buf, T.callsBegin);
        content += this.buf.slice(0, this.buf.length - hold);
        this.buf = this.buf.slice(this.buf.length - hold);
        break;
      }
      if (this.state === "between") {
        const s = this.buf.trimStart();
        if (s.startsWith(T.callBegin)) {
          this.buf = s.slice(T.callBegin.length);
          this.state = "header";
          continue;
        }
        if (s.startsWith(T.callsEnd)) {
          this.buf = s.slice(T.callsEnd.length);
          this.state = "done";
          continue;
        }
        if (!final && (T.callBegin.startsWith(s) || T.callsEnd.startsWith(s))) break;
        if (final || s.length > 0) {
          // not the expected format: stop parsing; unparsed text is dropped once calls exist
          if (this.calls.length === 0) content += T.callsBegin + this.buf;
          this.buf = "";
          this.state = "done";
        }
        break;
      }
      if (this.state === "header") {
        // TYPE<｜tool▁sep｜>NAME\n```json\n
        const sep = this.buf.indexOf(T.sep);
        const nl = sep >= 0 ? this.buf.indexOf("\n", sep) : -1;
        if (sep < 0 || nl < 0) {
          if (final) {
            this.state = "done";
            if (this.calls.length === 0) content += this.raw.slice(this.raw.indexOf(T.callsBegin));
            this.buf = "";
          }
          break;
        }
        const name = this.buf.slice(sep + T.sep.length, nl).trim();
        let rest = this.buf.slice(nl + 1);
        const fence = /^\s*```(?:json)?[ \t]*\n/.exec(rest);
        if (!fence) {
          // wait for the fence unless what we have cannot become one
          if (!final && /^\s*`{0,3}(j(s(o(n)?)?)?)?[ \t]*$/.test(rest)) break;
        } else rest = rest.slice(fence[0].length);
        const call: ParsedToolCall = { id: toolCallId(), type: "function", function: { name, arguments: "" } };
        this.calls.push(call);
        calls.push({ index: this.calls.length - 1, id: call.id, type: "function", function: { name, arguments: "" } });
        this.buf = rest;
        this.argsSent = 0;
        this.state = "args";
        continue;
      }
      if (this.state === "args") {
        const call = this.calls[this.calls.length - 1]!;
        if (this.argsSent === 0) this.buf = this.buf.trimStart();
        const end = this.buf.indexOf(T.callEnd);
        let args: string;
        let closed = false;
        if (end >= 0) {
          args = this.buf.slice(0, end).replace(/\n?\s*```\s*$/, "");
          this.buf = this.buf.slice(end + T.callEnd.length);
          closed = true;
        } else if (final) {
          args = this.buf.replace(/\n?\s*```\s*$/, "");
          this.buf = "";
          closed = true;
        } else {
          // hold back a possible closing fence / marker
          let hold = partialSuffix(this.buf, T.callEnd);
          const m = /\n?\s*`{0,3}\s*$/.exec(this.buf.slice(0, this.buf.length - hold));
          if (m) hold += m[0].length;
          args = this.buf.slice(0, this.buf.length - hold);
        }
        args = args.trimEnd();
        const fresh = args.slice(this.argsSent);
        if (fresh) {
          call.function.arguments += fresh;
          calls.push({ index: this.calls.length - 1, function: { arguments: fresh } });
          this.argsSent = args.length;
        }
        if (!closed) {
          // the buffer keeps everything not yet confirmed; argsSent counts what went out
          break;
        }
        this.argsSent = 0;
        this.state = "between";
        continue;
      }
      // done: the rest of the output is ignored
      this.buf = "";
      break;
    }
    return { content, calls };
  }
}

/** Length of the longest suffix of s that is a proper prefix of marker. */
export function partialSuffix(s: string, marker: string): number {
  for (let k = Math.min(marker.length - 1, s.length); k > 0; k--) if (s.endsWith(marker.slice(0, k))) return k;
  return 0;
}
