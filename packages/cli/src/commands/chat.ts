// ds3 chat: interactive, streaming, multi-turn. /reset clears the history, /exit quits;
// Ctrl-C stops the reply being written (not the program); at the prompt, Ctrl-C twice or
// Ctrl-D quits. Replies go to stdout; the prompt, notices and the echo of what you type to stderr.
import { createInterface } from "node:readline";
import type { Argv } from "yargs";
import type { ChatMessage } from "@ds3/core";
import { type ModelArgs, type SamplingArgs, loadModel, modelOptions, mtpOption, samplingFrom, samplingOptions, withOptions } from "../common.js";
import { UsageError, errorLine, notice } from "../ui.js";

interface Args extends ModelArgs, SamplingArgs {
  system?: string;
}

export const command = "chat";
export const describe = "interactive chat with streaming replies (/reset, /exit; Ctrl-C stops a reply)";

export function builder(y: Argv): Argv {
  return withOptions(y, modelOptions, mtpOption, samplingOptions)
    .options({
      system: { type: "string", describe: "system prompt", requiresArg: true },
    })
    .example("$0 chat", "the built-in model (noise)")
    .example('$0 chat --model DIR --system "You are terse." --temperature 0.6', "");
}

export async function handler(a: Args): Promise<void> {
  const sampling = samplingFrom(a, { maxTokens: 512 });
  const ds3 = await loadModel(a);
  if (!ds3.tokenizer) {
    await ds3.close();
    throw new UsageError(`model ${ds3.modelName} has no tokenizer: chat needs one`, 1);
  }
  const base: ChatMessage[] = a.system !== undefined ? [{ role: "system", content: a.system }] : [];
  let history: ChatMessage[] = [...base];
  const tty = process.stdin.isTTY === true && process.stderr.isTTY === true;
  const rl = createInterface({ input: process.stdin, output: process.stderr, terminal: tty, prompt: "> " });
  let reply: AbortController | null = null;
  let lastInterrupt = 0;
  let closed = false;

  const interrupt = () => {
    if (reply) {
      reply.abort();
      return;
    }
    const now = Date.now();
    if (now - lastInterrupt < 2000 || !tty) {
      rl.close();
      return;
    }
    lastInterrupt = now;
    process.stderr.write("\n(Ctrl-C again, Ctrl-D or /exit to quit)\n");
    rl.prompt();
  };
  rl.on("SIGINT", interrupt); // a terminal in raw mode: Ctrl-C arrives as input
  process.on("SIGINT", interrupt); // a signal (e.g. kill -INT)
  rl.on("close", () => (closed = true));

  if (tty) notice(`chat with ${ds3.modelName}: /reset clears the history, /exit quits, Ctrl-C stops a reply`);
  rl.prompt();
  try {
    for await (const raw of rl) {
      const line = raw.trim();
      if (line === "") {
        if (!closed) rl.prompt();
        continue;
      }
      if (line.startsWith("/")) {
        const cmd = line.split(/\s+/)[0]!;
        if (cmd === "/exit" || cmd === "/quit") break;
        if (cmd === "/reset") {
          history = [...base];
          notice("history cleared");
        } else notice(`unknown command ${cmd}: /reset clears the history, /exit quits`);
        if (!closed) rl.prompt();
        continue;
      }
      history.push({ role: "user", content: raw });
      reply = new AbortController();
      let text = "";
      let finish = "";
      try {
        for await (const c of ds3.chat(history, { sampling, signal: reply.signal })) {
          if (c.text) {
            process.stdout.write(c.text);
            text += c.text;
          }
          if (c.finishReason) finish = c.finishReason;
        }
        process.stdout.write("\n");
        if (finish === "abort") notice("(stopped)");
        else if (finish === "length") notice(`(reply cut at ${sampling.maxTokens} tokens)`);
        history.push({ role: "assistant", content: text });
      } catch (e) {
        process.stdout.write("\n");
        history.pop(); // the turn failed: leave it out of the history
        notice(`error: ${errorLine(e)}${/context length/.test(String((e as Error).message)) ? " (/reset starts over)" : ""}`);
      } finally {
        reply = null;
      }
      if (!closed) rl.prompt();
    }
  } finally {
    process.off("SIGINT", interrupt);
    rl.close();
    if (tty) process.stderr.write("\n");
    await ds3.close();
  }
}
