// Fitting a chat conversation into the context: when the rendered conversation plus the reply
// (max tokens) would pass the max model length, the oldest exchanges (a user message and the
// reply to it) are dropped; the system prompt and the newest message are always kept. When the
// newest message alone leaves less room than max tokens, the reply gets the room there is.
import type { ChatMessage } from "@ds3/core";

export interface Fit {
  /** The conversation kept: the system prompt(s), then the newest exchanges, ending with the new message. */
  messages: ChatMessage[];
  /** Its prompt ids (chat template with the generation prompt). */
  ids: number[];
  /** How many exchanges were dropped. */
  dropped: number;
  /** The reply's token budget: `maxTokens`, or less when the context has less room. */
  maxTokens: number;
}

export class ContextError extends Error {
  override name = "ContextError";
}

/**
 * `conversation`: system messages first, then alternating user/assistant turns ending with the
 * new user message. `render` gives the prompt ids of a conversation (ds3.renderChat).
 */
export function fitContext(conversation: ChatMessage[], render: (m: ChatMessage[]) => number[], maxModelLen: number, maxTokens: number): Fit {
  const nSys = conversation.findIndex((m) => m.role !== "system");
  const system = conversation.slice(0, nSys < 0 ? conversation.length : nSys);
  let turns = conversation.slice(system.length);
  let dropped = 0;
  for (;;) {
    const messages = [...system, ...turns];
    const ids = render(messages);
    if (ids.length + maxTokens <= maxModelLen) return { messages, ids, dropped, maxTokens };
    // the oldest exchange: a user message and everything up to the next user message
    const next = turns.findIndex((m, i) => i > 0 && m.role === "user");
    if (next < 0) {
      if (ids.length < maxModelLen) return { messages, ids, dropped, maxTokens: maxModelLen - ids.length };
      throw new ContextError(
        `the message is too long: with the chat template${system.length ? " and the system prompt" : ""} it is ${ids.length} tokens, and the context holds ${maxModelLen} (--max-model-len) with room for at least one token of reply`,
      );
    }
    turns = turns.slice(next);
    dropped++;
  }
}
