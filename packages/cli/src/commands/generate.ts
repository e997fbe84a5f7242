// ds3 generate: one prompt, or a file of prompts run as one batch (as DeepSeek's generate.py).
import type { Argv } from "yargs";
import type { CompletionChunk, DS3, RequestMetrics, SampleResult, SamplingParams } from "@ds3/core";
import { type ModelArgs, type SamplingArgs, intFlag, isWorkerNode, loadModel, nodeOptions, runWorkerNode, positionalText, modelOptions, mtpOption, parseIds, readInput, samplingFrom, samplingOptions, withOptions } from "../common.js";
import { UsageError, notice } from "../ui.js";

interface Args extends ModelArgs, SamplingArgs {
  _?: Array<string | number>;
  prompt?: string;
  promptIds?: string;
  inputFile?: string;
  ids?: boolean;
  raw?: boolean;
  system?: string;
  json?: boolean;
  logprobs?: number;
}

export const command = "generate [prompt]";
export const describe = "generate from one prompt, or from a file of prompts run as one batch";

export function builder(y: Argv): Argv {
  return withOptions(y, modelOptions, nodeOptions, mtpOption, samplingOptions)
    .positional("prompt", { type: "string", describe: "prompt text (sent through the chat template as a user message unless --raw)" })
    .options({
      "prompt-ids": { type: "string", describe: "one prompt of comma-separated token ids, e.g. 0,4845,3", requiresArg: true },
      "input-file": { type: "string", describe: "one prompt per line, run as one batch; results in input order", requiresArg: true },
      ids: { type: "boolean", describe: "with --input-file: each line is comma-separated token ids" },
      raw: { type: "boolean", describe: "send text as is (with BOS), without the chat template" },
      system: { type: "string", describe: "system prompt for the chat template", requiresArg: true },
      json: { type: "boolean", describe: "one JSON object per prompt per line: token_ids, text, finish_reason, timings" },
      logprobs: { describe: "with --json: the top-N logprobs of each generated token", coerce: intFlag("logprobs", 0), requiresArg: true },
    })
    .example('$0 generate "Hello"', "the built-in model (noise)")
    .example("$0 generate --model DIR --prompt-ids 0,19923 --temperature 0 --json", "greedy from token ids")
    .example("$0 generate --model DIR --input-file prompts.txt --json", "a batch")
    .example("$0 generate --model DIR --tp 4 --nnodes 2 --node-rank 0 --dist-init-addr 10.0.0.1:5000 --prompt-ids 0,1", "node 0 of two (the prompt and the output are here)")
    .example("$0 generate --model DIR --tp 4 --nnodes 2 --node-rank 1 --dist-init-addr 10.0.0.1:5000", "node 1: runs ranks 2-3 until node 0 ends");
}

interface Prompt {
  ids: number[];
  line: number;
}

/** Checks that need no model, done before loading one. */
function checkArgs(a: Args): void {
  const given = [a.prompt !== undefined, a.promptIds !== undefined, a.inputFile !== undefined].filter(Boolean).length;
  if (given === 0) throw new UsageError("give a prompt: PROMPT, --prompt-ids 1,2,3 or --input-file FILE");
  if (given > 1) throw new UsageError("give only one of PROMPT, --prompt-ids and --input-file");
  if (a.ids && a.inputFile === undefined) throw new UsageError("--ids goes with --input-file (use --prompt-ids for one prompt)");
  if (a.promptIds !== undefined) parseIds(a.promptIds, "--prompt-ids");
  if (a.inputFile !== undefined) readInput(a.inputFile, "--input-file");
}

function collectPrompts(a: Args, ds3: DS3): Prompt[] {
  const fromText = (text: string): number[] => {
    if (!ds3.tokenizer) throw new UsageError(`model ${ds3.modelName} has no tokenizer: give token ids (--prompt-ids, or --input-file with --ids)`, 1);
    if (a.raw) return ds3.encode(text);
    const messages = [...(a.system !== undefined ? [{ role: "system", content: a.system }] : []), { role: "user", content: text }];
    return ds3.renderChat(messages).ids;
  };
  if (a.promptIds !== undefined) return [{ ids: parseIds(a.promptIds, "--prompt-ids"), line: 1 }];
  if (a.prompt !== undefined) {
    if (a.prompt === "") throw new UsageError("the prompt is empty");
    return [{ ids: fromText(a.prompt), line: 1 }];
  }
  const lines = readInput(a.inputFile!, "--input-file").split(/\r?\n/);
  const out: Prompt[] = [];
  lines.forEach((l, i) => {
    if (l.trim() === "") return;
    out.push({ ids: a.ids ? parseIds(l, `${a.inputFile}:${i + 1}`) : fromText(l.trim()), line: i + 1 });
  });
  if (out.length === 0) throw new UsageError(`--input-file ${a.inputFile} has no prompts`, 1);
  return out;
}

interface Result {
  ids: number[];
  text: string;
  finishReason: string;
  metrics?: RequestMetrics;
  samples: SampleResult[];
}

async function run(ds3: DS3, ids: number[], sampling: SamplingParams, onChunk?: (c: CompletionChunk) => void): Promise<Result> {
  const r: Result = { ids: [], text: "", finishReason: "length", samples: [] };
  for await (const c of ds3.complete({ prompt: ids, sampling })) {
    r.ids.push(...c.ids);
    r.text += c.text;
    r.samples.push(...c.samples);
    if (c.finishReason) r.finishReason = c.finishReason;
    if (c.metrics) r.metrics = c.metrics;
    onChunk?.(c);
  }
  return r;
}

function toJson(i: number, p: Prompt, r: Result, hasText: boolean, logprobs: boolean): string {
  const m = r.metrics;
  const o: Record<string, unknown> = {
    index: i,
    line: p.line,
    prompt_tokens: p.ids.length,
    token_ids: r.ids,
    text: hasText ? r.text : null,
    finish_reason: r.finishReason,
    timings: m
      ? {
          queue_s: round(m.queueTime),
          ttft_s: round(m.timeToFirstToken),
          tpot_s: round(m.timePerOutputToken),
          e2e_s: round(m.e2eLatency),
          tokens_per_s: m.e2eLatency > 0 ? round(m.generatedTokens / m.e2eLatency) : null,
          cached_tokens: m.cachedTokens,
        }
      : null,
  };
  if (logprobs) o.logprobs = r.samples.map((s) => ({ id: s.id, logprob: s.logprob, ...(s.top && { top: s.top }) }));
  return JSON.stringify(o);
}

function specNote(ds3: DS3): string {
  const s = ds3.engine.stats();
  return s.specProposed ? `; MTP drafts accepted ${s.specAccepted}/${s.specProposed} (${(100 * s.specAcceptance).toFixed(0)}%)` : "";
}

const round = (x: number) => Math.round(x * 1e6) / 1e6;

export async function handler(a: Args): Promise<void> {
  if (isWorkerNode(a)) return runWorkerNode(a); // node R > 0: its ranks only, no prompt
  a.prompt = positionalText(a, a.prompt);
  checkArgs(a);
  const sampling = samplingFrom(a, { maxTokens: 200 });
  if (a.logprobs !== undefined) sampling.logprobs = a.logprobs;
  const ds3 = await loadModel(a);
  try {
    const prompts = collectPrompts(a, ds3);
    const resolved = ds3.resolveSampling(sampling);
    if (prompts.length > 1) notice(`running ${prompts.length} prompts as one batch`);
    const hasText = ds3.tokenizer !== null;
    const out = process.stdout;
    const t0 = performance.now();
    if (prompts.length === 1 && !a.json && hasText) {
      // stream the one reply as it comes
      const r = await run(ds3, prompts[0]!.ids, resolved, (c) => c.text && out.write(c.text));
      out.write("\n");
      notice(`${r.ids.length} tokens, finish: ${r.finishReason}${specNote(ds3)}`);
      return;
    }
    // a batch: all at once through the engine, printed in input order as each is ready
    const results: Array<Result | undefined> = new Array(prompts.length);
    let next = 0;
    const flush = () => {
      while (next < prompts.length && results[next]) {
        const r = results[next]!;
        const p = prompts[next]!;
        if (a.json) out.write(toJson(next, p, r, hasText, a.logprobs !== undefined) + "\n");
        else if (hasText) out.write(`${r.text}\n${prompts.length > 1 ? "\n" : ""}`);
        else out.write(`${JSON.stringify(r.ids)}\n`);
        next++;
      }
    };
    await Promise.all(
      prompts.map(async (p, i) => {
        results[i] = await run(ds3, p.ids, resolved);
        flush();
      }),
    );
    const total = results.reduce((s, r) => s + (r?.ids.length ?? 0), 0);
    notice(`${prompts.length} prompt(s), ${total} tokens in ${((performance.now() - t0) / 1000).toFixed(2)} s${specNote(ds3)}`);
  } finally {
    await ds3.close();
  }
}
