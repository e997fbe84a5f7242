// The Anthropic Messages API's content for one generated choice: the pipeline's deltas become
// content blocks — `thinking` (DeepSeek's <think> section), `text`, `tool_use` — and, when
// streaming, content_block_start / content_block_delta (thinking_delta, text_delta,
// input_json_delta) / content_block_stop events. Streaming and non-streaming share this code.
import { randomBytes } from "node:crypto";
import type { ToolCallDelta } from "../tools.js";

export const messageId = (): string => `msg_${randomBytes(12).toString("hex")}`;
export const toolUseId = (): string => `toolu_${randomBytes(12).toString("hex")}`;

export type Block =
  | { type: "thinking"; thinking: string; signature: string }
  | { type: "text"; text: string }
  | { type: "tool_use"; id: string; name: string; input: Record<string, unknown> };

/** `emit(type, fields)` sends one stream event */
export type Emit = (type: string, fields: Record<string, unknown>) => Promise<void>;

interface Open {
  kind: Block["type"];
  index: number;
  text: string;
  callIndex?: number;
  id?: string;
  name?: string;
}

export class MessageOutput {
  readonly blocks: Block[] = [];
  private open: Open | null = null;
  private count = 0;

  constructor(private readonly emit: Emit) {}

  async delta(reasoning: string, content: string, calls: readonly ToolCallDelta[]): Promise<void> {
    if (reasoning) await this.text("thinking", reasoning);
    if (content) await this.text("text", content);
    for (const c of calls) await this.call(c);
  }

  async finish(): Promise<void> {
    await this.close();
  }

  private async start(o: Open, block: Record<string, unknown>): Promise<void> {
    this.open = o;
    await this.emit("content_block_start", { index: o.index, content_block: block });
  }

  private async text(kind: "thinking" | "text", text: string): Promise<void> {
    if (this.open?.kind !== kind) {
      await this.close();
      await this.start({ kind, index: this.count++, text: "" }, kind === "thinking" ? { type: "thinking", thinking: "", signature: "" } : { type: "text", text: "" });
    }
    const o = this.open!;
    o.text += text;
    await this.emit("content_block_delta", { index: o.index, delta: kind === "thinking" ? { type: "thinking_delta", thinking: text } : { type: "text_delta", text } });
  }

  private async call(c: ToolCallDelta): Promise<void> {
    if (c.function.name !== undefined || this.open?.kind !== "tool_use" || this.open.callIndex !== c.index) {
      await this.close();
      const id = toolUseId();
      const name = c.function.name ?? "";
      await this.start({ kind: "tool_use", index: this.count++, text: "", callIndex: c.index, id, name }, { type: "tool_use", id, name, input: {} });
    }
    const args = c.function.arguments;
    if (args) {
      const o = this.open!;
      o.text += args;
      await this.emit("content_block_delta", { index: o.index, delta: { type: "input_json_delta", partial_json: args } });
    }
  }

  private async close(): Promise<void> {
    const o = this.open;
    if (!o) return;
    this.open = null;
    await this.emit("content_block_stop", { index: o.index });
    if (o.kind === "thinking") this.blocks.push({ type: "thinking", thinking: o.text, signature: "" });
    else if (o.kind === "text") this.blocks.push({ type: "text", text: o.text });
    else {
      // arguments that do not parse (cut by max_tokens) stay visible as text, never dropped
      let input: unknown;
      try {
        input = JSON.parse(o.text.trim() === "" ? "{}" : o.text);
      } catch {
        input = undefined;
      }
      if (typeof input === "object" && input !== null && !Array.isArray(input)) this.blocks.push({ type: "tool_use", id: o.id!, name: o.name!, input: input as Record<string, unknown> });
      else this.blocks.push({ type: "text", text: o.text });
    }
  }
}

/** The Anthropic error body: {"type": "error", "error": {"type", "message"}} */
export function anthropicError(status: number, message: string) {
  const type =
    status === 400 || status === 405 || status === 409 || status === 422
      ? "invalid_request_error"
      : status === 401
        ? "authentication_error"
        : status === 403
          ? "permission_error"
          : status === 404
            ? "not_found_error"
            : status === 413
              ? "request_too_large"
              : status === 429
                ? "rate_limit_error"
                : status === 503 || status === 529
                  ? "overloaded_error"
                  : status < 500
                    ? "invalid_request_error"
                    : "api_error";
  return { type: "error", error: { type, message } };
}
