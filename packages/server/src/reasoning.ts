// `reasoning_content` for R1-style output: `<think>…</think>` then the answer. The opening tag
// may be missing from the output (R1's template puts it in the prompt): the parser then starts
// inside the reasoning, when told so, or (non-streaming) when a closing tag shows up.
import { partialSuffix } from "./tools.js";

export const THINK_OPEN = "<think>";
export const THINK_CLOSE = "</think>";

export type ReasoningMode =
  /** reasoning only when the output opens with <think> or the prompt ends inside one */
  | "auto"
  /** DeepSeek-R1: the output starts inside the reasoning whether or not <think> is there */
  | "deepseek-r1"
  /** never split */
  | "none";

export class ReasoningStreamParser {
  private buf = "";
  private state: "start" | "reasoning" | "content";
  private sawReasoning = false;
  private stripNewlines = false;

  constructor(
    readonly mode: ReasoningMode,
    /** the prompt ends inside <think> (the template opened it) */
    promptOpensThink = false,
  ) {
    this.state = mode === "none" ? "content" : mode === "deepseek-r1" || promptOpensThink ? "reasoning" : "start";
    if (this.state === "reasoning") this.sawReasoning = true;
    this.allowOpenTag = this.state === "reasoning";
  }
  /** in reasoning from the start: an explicit <think> at the very beginning is still stripped */
  private allowOpenTag: boolean;

  get hadReasoning(): boolean {
    return this.sawReasoning;
  }

  push(delta: string): { reasoning: string; content: string } {
    this.buf += delta;
    return this.drain(false);
  }

  finish(): { reasoning: string; content: string } {
    return this.drain(true);
  }

  private drain(final: boolean): { reasoning: string; content: string } {
    let reasoning = "";
    let content = "";
    for (;;) {
      if (this.state === "start" || this.allowOpenTag) {
        const s = this.buf.trimStart();
        if (s.startsWith(THINK_OPEN)) {
          this.buf = s.slice(THINK_OPEN.length);
          this.state = "reasoning";
          this.sawReasoning = true;
          this.allowOpenTag = false;
          continue;
        }
        if (!final && THINK_OPEN.startsWith(s)) break; // could still become <think>
        this.allowOpenTag = false;
        if (this.state === "start") this.state = "content";
        continue;
      }
      if (this.state === "reasoning") {
        const i = this.buf.indexOf(THINK_CLOSE);
        if (i >= 0) {
          reasoning += this.buf.slice(0, i);
          this.buf = this.buf.slice(i + THINK_CLOSE.length);
          this.state = "content";
          this.stripNewlines = true;
          continue;
        }
        const hold = final ? 0 : partialSuffix(this.buf, THINK_CLOSE);
        reasoning += this.buf.slice(0, this.buf.length - hold);
        this.buf = this.buf.slice(this.buf.length - hold);
        break;
      }
      // content
      if (this.stripNewlines) {
        const s = this.buf.replace(/^\n+/, "");
        if (s.length === 0 && !final) {
          this.buf = "";
          break;
        }
        this.buf = s;
        this.stripNewlines = false;
      }
      content += this.buf;
      this.buf = "";
      break;
    }
    return { reasoning, content };
  }
}

/** Whole-output split (non-streaming, mode auto): a closing tag without an opening one. */
export function splitReasoning(text: string): { reasoning: string | null; content: string } {
  const i = text.indexOf(THINK_CLOSE);
  if (i < 0) return { reasoning: null, content: text };
  let r = text.slice(0, i);
  const t = r.trimStart();
  if (t.startsWith(THINK_OPEN)) r = t.slice(THINK_OPEN.length);
  return { reasoning: r, content: text.slice(i + THINK_CLOSE.length).replace(/^\n+/, "") };
}

/** Whether a rendered prompt leaves the model inside an opened <think>. */
export function promptOpensThink(prompt: string): boolean {
  const t = prompt.trimEnd();
  return t.endsWith(THINK_OPEN);
}
