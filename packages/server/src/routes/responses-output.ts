// The Responses API's output for one generated choice: the pipeline's deltas (reasoning, text,
// tool-call pieces) become output items — a `reasoning` item (DeepSeek's <think> section, as
// reasoning_text content), a `message` with one output_text part, `function_call` items — and,
// when streaming, the documented event sequence for each (output_item.added, content_part.added,
// output_text.delta …, output_text.done, content_part.done, output_item.done; function-call
// arguments delta/done). Streaming and non-streaming share this code.
import { randomBytes } from "node:crypto";
import type { SampleResult } from "@ds3/core";
import type { ToolCallDelta } from "../tools.js";

export const newId = (prefix: string): string => `${prefix}_${randomBytes(12).toString("hex")}`;

export interface OutputLogprob {
  token: string;
  logprob: number;
  bytes: number[];
  top_logprobs: { token: string; logprob: number; bytes: number[] }[];
}

type Item = Record<string, unknown> & { id: string; type: string };

/** `emit(type, fields)` sends one stream event (sequence numbers are the caller's). */
export type Emit = (type: string, fields: Record<string, unknown>) => Promise<void>;

interface Open {
  kind: "reasoning" | "message" | "function_call";
  item: Item;
  index: number;
  text: string;
  logprobs: OutputLogprob[];
  /** the pipeline's tool-call index (function_call items) */
  callIndex?: number;
}

export class ResponseOutput {
  readonly items: Item[] = [];
  private open: Open | null = null;
  private pendingSamples: SampleResult[] = [];

  constructor(
    private readonly emit: Emit,
    /** logprobs of sampled tokens, or null when the request asked for none */
    private readonly logprobs: ((s: readonly SampleResult[]) => OutputLogprob[]) | null,
  ) {}

  async delta(reasoning: string, content: string, calls: readonly ToolCallDelta[], samples: readonly SampleResult[]): Promise<void> {
    if (this.logprobs) this.pendingSamples.push(...samples);
    if (reasoning) await this.text("reasoning", reasoning);
    if (content) await this.text("message", content);
    for (const c of calls) await this.call(c);
  }

  /** close what is open; `status` of the last item: "completed", or "incomplete" when cut */
  async finish(status: "completed" | "incomplete"): Promise<void> {
    if (this.items.length === 0) await this.text("message", ""); // always an answer, if empty
    await this.close(status);
  }

  private async text(kind: "reasoning" | "message", text: string): Promise<void> {
    if (this.open?.kind !== kind) {
      await this.close("completed");
      const index = this.items.length;
      const item: Item =
        kind === "reasoning"
          ? { id: newId("rs"), type: "reasoning", summary: [], content: [], status: "in_progress" }
          : { id: newId("msg"), type: "message", role: "assistant", status: "in_progress", content: [] };
      this.items.push(item);
      this.open = { kind, item, index, text: "", logprobs: [] };
      await this.emit("response.output_item.added", { output_index: index, item: { ...item } });
      const part = kind === "reasoning" ? { type: "reasoning_text", text: "" } : { type: "output_text", text: "", annotations: [], logprobs: [] };
      await this.emit("response.content_part.added", { item_id: item.id, output_index: index, content_index: 0, part });
    }
    const o = this.open!;
    o.text += text;
    let lps: OutputLogprob[] = [];
    if (this.logprobs && kind === "message") {
      lps = this.logprobs(this.pendingSamples);
      this.pendingSamples = [];
      o.logprobs.push(...lps);
    }
    if (!text) return;
    if (kind === "reasoning") await this.emit("response.reasoning_text.delta", { item_id: o.item.id, output_index: o.index, content_index: 0, delta: text });
    else await this.emit("response.output_text.delta", { item_id: o.item.id, output_index: o.index, content_index: 0, delta: text, logprobs: lps });
  }

  private async call(c: ToolCallDelta): Promise<void> {
    if (c.function.name !== undefined || this.open?.kind !== "function_call" || this.open.callIndex !== c.index) {
      await this.close("completed");
      const index = this.items.length;
      const item: Item = { id: newId("fc"), type: "function_call", status: "in_progress", arguments: "", call_id: c.id ?? newId("call"), name: c.function.name ?? "" };
      this.items.push(item);
      this.open = { kind: "function_call", item, index, text: "", logprobs: [], callIndex: c.index };
      await this.emit("response.output_item.added", { output_index: index, item: { ...item } });
    }
    const args = c.function.arguments;
    if (args) {
      const o = this.open!;
      o.text += args;
      await this.emit("response.function_call_arguments.delta", { item_id: o.item.id, output_index: o.index, delta: args });
    }
  }

  private async close(status: "completed" | "incomplete"): Promise<void> {
    const o = this.open;
    if (!o) return;
    this.open = null;
    const { item, index } = o;
    item.status = status;
    if (o.kind === "function_call") {
      item.arguments = o.text;
      await this.emit("response.function_call_arguments.done", { item_id: item.id, output_index: index, name: item.name, arguments: o.text });
    } else if (o.kind === "reasoning") {
      const part = { type: "reasoning_text", text: o.text };
      item.content = [part];
      await this.emit("response.reasoning_text.done", { item_id: item.id, output_index: index, content_index: 0, text: o.text });
      await this.emit("response.content_part.done", { item_id: item.id, output_index: index, content_index: 0, part });
    } else {
      if (this.logprobs && this.pendingSamples.length) {
        o.logprobs.push(...this.logprobs(this.pendingSamples));
        this.pendingSamples = [];
      }
      const part = { type: "output_text", text: o.text, annotations: [], logprobs: o.logprobs };
      item.content = [part];
      await this.emit("response.output_text.done", { item_id: item.id, output_index: index, content_index: 0, text: o.text, logprobs: o.logprobs });
      await this.emit("response.content_part.done", { item_id: item.id, output_index: index, content_index: 0, part });
    }
    await this.emit("response.output_item.done", { output_index: index, item });
  }
}
