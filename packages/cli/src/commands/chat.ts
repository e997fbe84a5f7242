// ds3 chat: interactive, streaming, multi-turn. Replies go to stdout; the prompt, notices and
// what you type to stderr.
//
// On a terminal (stdin and stderr both TTYs) the line editor of chat-editor.ts reads messages:
// a paste is one message, typing during a reply is not echoed (it starts the next message),
// up/down recall the input history, which chat-history.ts keeps in the cache directory across
// runs. Ctrl-C stops a reply (not the program); at the prompt, Ctrl-C twice or Ctrl-D quits.
// Otherwise stdin is read as the conversation: one message per line, a line ending in "\"
// continues on the next; no escape codes are written.
//
// When the conversation plus the reply would pass the context (--max-model-len), the oldest
// exchanges are dropped, the system prompt kept, with a one-line notice (chat-context.ts).
import { createInterface } from "node:readline";
import type { Argv } from "yargs";
import type { ChatMessage } from "@ds3/core";
import { ContextError, fitContext } from "../chat-context.js";
import { LineEditor } from "../chat-editor.js";
import { InputHistory, historyPath } from "../chat-history.js";
import { type ModelArgs, type SamplingArgs, loadModel, modelOptions, mtpOption, samplingFrom, samplingOptions, withOptions } from "../common.js";
import { UsageError, errorLine, notice } from "../ui.js";

interface Args extends ModelArgs, SamplingArgs {
  system?: string;
  prompt?: string;
  history?: boolean;
}

export const command = "chat";
export const describe = "interactive chat with streaming replies (/help lists the commands; Ctrl-C stops a reply)";

export function builder(y: Argv): Argv {
  return withOptions(y, modelOptions, mtpOption, samplingOptions)
    .options({
      system: { type: "string", describe: "system prompt (kept when old turns make room in a full context)", requiresArg: true },
      prompt: { type: "string", describe: "a first message, sent at once; the chat goes on after the reply", requiresArg: true },
      history: { type: "boolean", default: true, describe: "keep what you send (up/down recall it) in the cache directory across runs (--no-history: this session only)" },
    })
    .example("$0 chat", "the built-in model (noise)")
    .example('$0 chat --model DIR --system "You are terse." --temperature 0.6', "")
    .example('echo "Hello" | $0 chat --model DIR', "one message per line from a pipe, replies on stdout");
}

function helpText(history: InputHistory): string {
  return [
    "commands:",
    "  /help           this list",
    "  /reset          start over: forget the conversation (the system prompt stays)",
    "  /history [N]    the last N messages you sent (default 20)",
    "  /clear-history  forget the input history, on disk too",
    "  /exit, /quit    quit (or Ctrl-D on an empty line, or Ctrl-C twice)",
    "  //text          send a message that starts with \"/\"",
    "keys:",
    "  Enter           send; a line ending in \\ or Alt-Enter starts a new line; a paste is one message",
    `  Up/Down         earlier messages (${history.file ? `kept in ${history.file}` : "this session only"})`,
    "  Ctrl-C          stop a reply; at the prompt, twice to quit",
    "  what you type while a reply streams is not shown in it: it starts your next message",
    "",
  ].join("\n");
}

/** Reply text for a terminal: control characters (C0 but newline and tab, DEL, C1) are shown as U+FFFD, never run. */
const forTerminal = (s: string) => s.replace(/[\x00-\x08\x0b-\x1f\x7f-\x9f]/g, "\ufffd");

export async function handler(a: Args): Promise<void> {
  if (a.prompt !== undefined && a.prompt.trim() === "") throw new UsageError("--prompt is empty: give the first message, or leave --prompt out");
  const sampling = samplingFrom(a, { maxTokens: 512 });
  const maxTokens = sampling.maxTokens ?? 512;
  const tty = process.stdin.isTTY === true && process.stderr.isTTY === true;
  const ds3 = await loadModel(a);
  if (!ds3.tokenizer) {
    await ds3.close();
    throw new UsageError(`model ${ds3.modelName} has no tokenizer: chat needs one`, 1);
  }
  const maxLen = ds3.engine.maxModelLen;
  const base: ChatMessage[] = a.system !== undefined ? [{ role: "system", content: a.system }] : [];
  let conversation: ChatMessage[] = [...base];
  const history = new InputHistory(tty && a.history !== false ? historyPath() : null);
  const show = process.stdout.isTTY ? forTerminal : (s: string) => s;
  let reply: AbortController | null = null;

  /** Send one message and stream the reply. */
  const turn = async (text: string) => {
    let fit;
    try {
      fit = fitContext([...conversation, { role: "user", content: text }], (m) => ds3.renderChat(m).ids, maxLen, maxTokens);
    } catch (e) {
      if (!(e instanceof ContextError)) throw e;
      notice(`error: ${e.message}; the message was not sent`);
      return;
    }
    if (fit.dropped > 0)
      notice(
        `context full: dropped the oldest ${fit.dropped === 1 ? "exchange" : `${fit.dropped} exchanges`} to fit the ${maxLen}-token context (--max-model-len)${base.length ? "; the system prompt is kept" : ""}`,
      );
    if (fit.maxTokens < maxTokens) notice(`this reply has room for ${fit.maxTokens} tokens (the context holds ${maxLen}, --max-model-len)`);
    conversation = fit.messages;
    reply = new AbortController();
    let out = "";
    let finish = "";
    try {
      for await (const c of ds3.complete({ prompt: fit.ids, sampling: { ...sampling, maxTokens: fit.maxTokens }, signal: reply.signal })) {
        if (c.text) {
          process.stdout.write(show(c.text));
          out += c.text;
        }
        if (c.finishReason) finish = c.finishReason;
      }
      process.stdout.write("\n");
      if (finish === "abort") notice("(stopped)");
      else if (finish === "length") notice(`(reply cut at ${fit.maxTokens} tokens)`);
      conversation.push({ role: "assistant", content: out });
    } catch (e) {
      process.stdout.write("\n");
      conversation.pop(); // the turn failed: leave it out of the conversation
      notice(`error: ${errorLine(e)}`);
    } finally {
      reply = null;
    }
  };

  /** A slash command: "exit", "done" when it was one, or the message to send. */
  const slash = (text: string): "exit" | "done" | string => {
    const m = /^\/([A-Za-z][\w-]*)(?:[ \t]+(.*))?$/.exec(text.trim()); // one line: a paste of several is a message
    if (!m) return text.startsWith("//") ? text.slice(1) : text;
    const [, cmd, arg = ""] = m;
    switch (cmd) {
      case "exit":
      case "quit":
        return "exit";
      case "reset":
        conversation = [...base];
        notice("history cleared: a new conversation");
        return "done";
      case "help":
        process.stderr.write(helpText(history));
        return "done";
      case "history": {
        const n = arg.trim() === "" ? 20 : Number(arg.trim());
        if (!Number.isSafeInteger(n) || n < 1) {
          notice(`/history takes a count, e.g. /history 50 (got "${arg.trim()}")`);
          return "done";
        }
        const all = history.entries;
        if (all.length === 0) notice("the input history is empty");
        const from = Math.max(0, all.length - n);
        for (let i = from; i < all.length; i++) process.stderr.write(`${String(i + 1).padStart(5)}  ${all[i]!.replace(/\n/g, "\n       ")}\n`);
        return "done";
      }
      case "clear-history":
        history.clear();
        notice(`input history cleared${history.file ? ` (${history.file} removed)` : ""}`);
        return "done";
      default:
        notice(`unknown command /${cmd}: /help lists the commands (start a message with // to send a "/")`);
        return "done";
    }
  };

  let stop = () => {};
  const onSignal = () => (reply ? reply.abort() : stop()); // a signal (kill -INT); a terminal in raw mode sends Ctrl-C as a key
  process.on("SIGINT", onSignal);
  try {
    if (tty) {
      const editor = new LineEditor(process.stdin, process.stderr);
      editor.onInterrupt = () => reply?.abort();
      stop = () => editor.close();
      editor.start();
      try {
        notice(`chat with ${ds3.modelName}: /help lists the commands; Ctrl-C stops a reply, twice at the prompt quits`);
        if (a.prompt !== undefined) {
          editor.echo(a.prompt);
          await turn(a.prompt);
        }
        let lastInterrupt = 0;
        for (;;) {
          const r = await editor.read(history.entries);
          if (r.kind === "eof") break;
          if (r.kind === "interrupt") {
            const now = Date.now();
            if (now - lastInterrupt < 2000) break;
            lastInterrupt = now;
            process.stderr.write("(Ctrl-C again, Ctrl-D or /exit to quit)\n");
            continue;
          }
          if (r.text.trim() === "") continue;
          history.add(r.text);
          const s = slash(r.text);
          if (s === "exit") break;
          if (s !== "done") await turn(s);
        }
      } finally {
        editor.close();
      }
    } else {
      const rl = createInterface({ input: process.stdin, terminal: false });
      const lines = rl[Symbol.asyncIterator](); // from now on, lines wait here (also while --prompt is answered)
      stop = () => rl.close();
      let sent = a.prompt !== undefined;
      if (a.prompt !== undefined) await turn(a.prompt);
      let pending = "";
      let exit = false;
      const take = async (text: string) => {
        if (text.trim() === "") return;
        sent = true;
        const s = slash(text);
        if (s === "exit") exit = true;
        else if (s !== "done") await turn(s);
      };
      for await (const line of { [Symbol.asyncIterator]: () => lines }) {
        if (line.endsWith("\\")) {
          pending += `${line.slice(0, -1)}\n`;
          continue;
        }
        await take(pending + line);
        pending = "";
        if (exit) break;
      }
      if (!exit && pending) await take(pending.slice(0, -1));
      rl.close();
      if (!sent) notice("stdin is not a terminal and gave no message: pipe one message per line (a line ending in \\ continues), or give --prompt");
    }
  } finally {
    process.off("SIGINT", onSignal);
    await ds3.close();
  }
}
