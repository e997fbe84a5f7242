// ds3 tokenize: text to token ids (a JSON array), chat messages through the chat template,
// or ids back to text. Reads only the tokenizer files, never the weights.
import type { Argv } from "yargs";
import type { ChatMessage } from "@ds3/core";
import { loadTokenizer, parseIds, positionalText, readInput } from "../common.js";
import { UsageError } from "../ui.js";

interface Args {
  _?: Array<string | number>;
  text?: string;
  model?: string;
  addSpecial?: boolean;
  chat?: string;
  generationPrompt?: boolean;
  decode?: string;
  json?: boolean;
}

export const command = "tokenize [text]";
export const describe = "print the token ids of a text (JSON array); --chat renders messages through the chat template";

export function builder(y: Argv): Argv {
  return y
    .positional("text", { type: "string", describe: 'text to tokenize ("-" reads stdin)' })
    .options({
      model: { type: "string", describe: "model directory whose tokenizer to use; default: the DeepSeek-V3 tokenizer (as the built-in model)", requiresArg: true },
      "add-special": { type: "boolean", describe: "add BOS (and EOS) as tokenizer_config.json says" },
      chat: { type: "string", describe: 'JSON file with a list of messages (or {"messages": [...], "tools": [...]}) to render through the chat template', requiresArg: true },
      "generation-prompt": { type: "boolean", describe: "with --chat: end with the assistant prefix" },
      decode: { type: "string", describe: "comma-separated token ids to turn back into text", requiresArg: true },
      json: { type: "boolean", describe: 'with --chat: print {"text", "ids"} as one JSON object' },
    })
    .example('$0 tokenize "Hello, world!"', "[19923,14,2058,3]")
    .example("$0 tokenize --chat messages.json --generation-prompt", "");
}

export async function handler(a: Args): Promise<void> {
  a.text = positionalText(a, a.text);
  // yargs hands a lone "-" to a string positional as ""
  if (a.text === "" && process.argv.slice(2).includes("-")) a.text = "-";
  const modes = [a.text !== undefined, a.chat !== undefined, a.decode !== undefined].filter(Boolean).length;
  if (modes === 0) throw new UsageError("give a TEXT to tokenize, --chat FILE or --decode IDS");
  if (modes > 1) throw new UsageError("give only one of TEXT, --chat and --decode");
  const decodeIds = a.decode !== undefined ? parseIds(a.decode, "--decode") : null;
  let chat: { messages: ChatMessage[]; tools?: unknown[] } | null = null;
  if (a.chat !== undefined) {
    const raw = readInput(a.chat, "--chat");
    let v: unknown;
    try {
      v = JSON.parse(raw);
    } catch (e) {
      throw new UsageError(`--chat ${a.chat}: not valid JSON (${(e as Error).message})`, 1);
    }
    const obj = Array.isArray(v) ? { messages: v } : (v as { messages?: unknown; tools?: unknown });
    if (!obj || !Array.isArray(obj.messages)) throw new UsageError(`--chat ${a.chat}: expected a JSON list of messages, or an object with "messages"`, 1);
    obj.messages.forEach((m: unknown, i: number) => {
      if (!m || typeof m !== "object" || typeof (m as ChatMessage).role !== "string") throw new UsageError(`--chat ${a.chat}: message ${i} has no "role"`, 1);
    });
    if (obj.tools !== undefined && !Array.isArray(obj.tools)) throw new UsageError(`--chat ${a.chat}: "tools" must be a list`, 1);
    chat = { messages: obj.messages as ChatMessage[], ...(obj.tools !== undefined && { tools: obj.tools as unknown[] }) };
  }
  const tok = await loadTokenizer(a.model);
  const out = process.stdout;
  if (decodeIds) {
    out.write(tok.decode(decodeIds) + "\n");
    return;
  }
  if (chat) {
    const text = tok.applyChatTemplate(chat.messages, { addGenerationPrompt: a.generationPrompt ?? false, ...(chat.tools && { tools: chat.tools }) });
    const ids = tok.encode(text, { addSpecial: false }); // the template already holds BOS
    out.write(a.json ? JSON.stringify({ text, ids }) + "\n" : `${text}\n${JSON.stringify(ids)}\n`);
    return;
  }
  const text = a.text === "-" ? readInput("-", "stdin") : a.text!;
  out.write(JSON.stringify(tok.encode(text, { addSpecial: a.addSpecial ?? false })) + "\n");
}
