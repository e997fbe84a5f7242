// Named-event SSE streams (the Responses and Anthropic Messages APIs: `event: NAME` + `data: JSON`).

export interface NamedEvent {
  name: string;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  data: Record<string, any>;
}

/** The `event:` / `data:` blocks of a stream's text, in order (blocks without an event name are left out). */
export function namedEvents(text: string): NamedEvent[] {
  return text
    .split("\n\n")
    .filter((b) => b.startsWith("event: "))
    .map((b) => ({ name: /^event: (.*)$/m.exec(b)![1]!, data: JSON.parse(/^data: (.*)$/m.exec(b)![1]!) as Record<string, unknown> }));
}

/** Read a response body to its end; `onText` sees the whole text so far after every chunk. */
export async function readStream(res: Response, onText?: (text: string) => void): Promise<string> {
  const reader = res.body!.getReader();
  const dec = new TextDecoder();
  let text = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return text;
    text += dec.decode(value, { stream: true });
    onText?.(text);
  }
}
