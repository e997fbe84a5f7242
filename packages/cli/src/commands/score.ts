// ds3 score: per-token logprobs and perplexity of a text or of token ids; optionally the
// logits of every position as raw little-endian float32 (rows = positions).
import { closeSync, openSync, writeSync } from "node:fs";
import { endianness } from "node:os";
import type { Argv } from "yargs";
import { type DS3, type StepInput, logSoftmax } from "@ds3/core";
import { type ModelArgs, loadModel, modelOptions, parseIds, withOptions } from "../common.js";
import { UsageError, notice } from "../ui.js";

interface Args extends ModelArgs {
  text?: string;
  ids?: string;
  json?: boolean;
  dumpLogits?: string;
  chunk?: number;
}

export const command = "score";
export const describe = "per-token logprobs and perplexity of a text or token ids; --dump-logits writes every position's logits";

export function builder(y: Argv): Argv {
  return withOptions(y, modelOptions)
    .options({
      text: { type: "string", describe: "text to score (tokenized with BOS, no chat template)", requiresArg: true },
      ids: { type: "string", describe: "comma-separated token ids to score as they are (no BOS added)", requiresArg: true },
      json: { type: "boolean", describe: "print one JSON object" },
      "dump-logits": { type: "string", describe: "write the logits of every position to FILE as little-endian float32, [positions, vocab]", requiresArg: true },
    })
    .example('$0 score --text "The capital of France is Paris."', "")
    .example("$0 score --model DIR --ids 0,4845,3 --dump-logits logits.f32", "");
}

const CHUNK = 256;

/**
 * Logits of every position: the tokens go through the executor in chunks (a prefill with the
 * latent cache, as the engine does), each chunk asking for the logits of all its rows.
 */
async function allLogits(ds3: DS3, ids: number[], onRows: (logits: Float32Array, first: number, rows: number) => void): Promise<void> {
  const ex = ds3.executor;
  const bs = ex.cache.blockSize;
  const blocks = Math.ceil(ids.length / bs);
  if (ids.length > ds3.engine.maxModelLen) throw new UsageError(`${ids.length} tokens exceed the maximum context length ${ds3.engine.maxModelLen} (raise --max-model-len)`, 1);
  if (blocks > ex.cache.numBlocks) throw new UsageError(`${ids.length} tokens do not fit in the cache (${ex.cache.numBlocks} blocks of ${bs})`, 1);
  const blockTables = Int32Array.from({ length: blocks }, (_, i) => i);
  for (let s = 0; s < ids.length; s += CHUNK) {
    const n = Math.min(CHUNK, ids.length - s);
    const input: StepInput = {
      ids: Int32Array.from(ids.slice(s, s + n)),
      positions: Int32Array.from({ length: n }, (_, i) => s + i),
      seqIdx: new Int32Array(n),
      blockTables,
      maxBlocks: blocks,
      logitRows: Int32Array.from({ length: n }, (_, i) => i),
    };
    const logits = await ex.step(input);
    onRows(logits, s, n);
  }
}

/** null if every logit is finite; else what is not ("NaN at id 5", "NaN and Infinity" for a whole row). */
function nonFinite(row: Float32Array): string | null {
  let n = 0;
  let first = -1;
  const kinds = new Set<string>();
  for (let i = 0; i < row.length; i++) {
    const x = row[i]!;
    if (Number.isFinite(x)) continue;
    if (first < 0) first = i;
    n++;
    kinds.add(String(x));
  }
  if (n === 0) return null;
  const k = [...kinds].join(" and ");
  if (n === row.length) return k;
  return `${String(row[first])} at id ${first}${n > 1 ? ` and ${n - 1} more (${k})` : ""}`;
}

export async function handler(a: Args): Promise<void> {
  if ((a.text === undefined) === (a.ids === undefined)) throw new UsageError("give one of --text and --ids");
  const idsArg = a.ids !== undefined ? parseIds(a.ids, "--ids") : null;
  const ds3 = await loadModel(a);
  let fd: number | null = null;
  try {
    const ids = idsArg ?? ds3.encode(a.text!);
    if (ids.length === 0) throw new UsageError("nothing to score: the text has no tokens", 1);
    const V = ds3.executor.vocabSize;
    ids.forEach((t, i) => {
      if (t >= V) throw new UsageError(`token id ${t} at index ${i} is outside the vocabulary [0, ${V})`, 1);
    });
    if (a.dumpLogits !== undefined) {
      try {
        fd = openSync(a.dumpLogits, "w");
      } catch (e) {
        throw new UsageError(`--dump-logits: cannot write ${a.dumpLogits}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`, 1);
      }
    }
    const logprobs: Array<number | null> = [null];
    const t0 = performance.now();
    // the first position whose logits are not finite, and how many are: the command fails (after
    // --dump-logits has every row, for a look at them) instead of printing a NaN or Infinity perplexity
    let bad: { pos: number; what: string } | null = null;
    let badRows = 0;
    await allLogits(ds3, ids, (logits, first, rows) => {
      for (let r = 0; r < rows; r++) {
        const what = nonFinite(logits.subarray(r * V, (r + 1) * V));
        if (what === null) continue;
        badRows++;
        bad ??= { pos: first + r, what };
      }
      if (fd !== null) {
        const b = Buffer.from(logits.buffer, logits.byteOffset, rows * V * 4);
        if (endianness() !== "LE") b.swap32();
        let off = 0;
        while (off < b.length) off += writeSync(fd, b, off, b.length - off);
      }
      for (let r = 0; r < rows; r++) {
        const pos = first + r;
        if (pos + 1 >= ids.length) break;
        const lp = logSoftmax(logits.subarray(r * V, (r + 1) * V));
        logprobs.push(lp[ids[pos + 1]!]!);
      }
    });
    if (bad !== null) {
      const { pos, what } = bad;
      throw new UsageError(
        `the logits at position ${pos} (token ${ids[pos]}) are not finite (${what}); ${badRows} of ${ids.length} positions are: no logprobs or perplexity (the checkpoint's weights or its config are broken)`,
        1,
      );
    }
    const scored = logprobs.slice(1) as number[];
    const mean = scored.length ? scored.reduce((s, x) => s + x, 0) / scored.length : null;
    const ppl = mean === null ? null : Math.exp(-mean);
    notice(`scored ${ids.length} tokens in ${((performance.now() - t0) / 1000).toFixed(2)} s${a.dumpLogits ? `; logits [${ids.length}, ${V}] float32 in ${a.dumpLogits}` : ""}`);
    const tok = ds3.tokenizer;
    const piece = (id: number) => (tok ? (tok.idToToken(id) ?? null) : null);
    if (a.json) {
      process.stdout.write(
        JSON.stringify({
          tokens: ids.map((id, i) => ({ id, token: piece(id), logprob: logprobs[i] ?? null })),
          n_tokens: ids.length,
          n_scored: scored.length,
          mean_logprob: mean,
          perplexity: ppl,
          ...(a.dumpLogits && { logits_file: a.dumpLogits, logits_shape: [ids.length, V] }),
        }) + "\n",
      );
      return;
    }
    const lines = ["pos\tid\tlogprob\ttoken"];
    ids.forEach((id, i) => {
      const lp = logprobs[i];
      lines.push(`${i}\t${id}\t${lp == null ? "-" : lp.toFixed(4)}\t${tok ? JSON.stringify(tok.decode([id])) : ""}`);
    });
    lines.push(ppl === null ? "perplexity: n/a (one token: nothing to predict)" : `perplexity: ${ppl.toFixed(4)} over ${scored.length} tokens (mean logprob ${mean!.toFixed(4)})`);
    process.stdout.write(lines.join("\n") + "\n");
  } finally {
    if (fd !== null) closeSync(fd);
    await ds3.close();
  }
}
