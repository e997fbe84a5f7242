// One sequence ("choice") from admission to its end: engine events → text (exact UTF-8, stop
// strings cut), sampled tokens, timings. The endpoints build their responses on top of it.
import { type Engine, type FinishReason, type RequestMetrics, type SampleResult, type SamplingParams, StopMatcher, type TokenEvent, logSoftmax, topN } from "@ds3/core";
import { ByteStreamDecoder, type TokenTable } from "./tokens.js";
import type { Processor } from "./constraints.js";

export interface ChoiceSpec {
  index: number;
  promptIds: number[];
  sampling: SamplingParams;
  processor?: Processor;
  /** top-N for prompt scoring (echo + logprobs); undefined: no scoring */
  scorePrompt?: number;
  /** the stop string that matched stays at the end of the text (vLLM's include_stop_str_in_output) */
  includeStopStr?: boolean;
}

export interface PromptScore {
  /** per prompt position t >= 1: logprob of token t under the logits at t-1 */
  logprobs: number[];
  /** and the top-N there */
  top: Array<Array<{ id: number; logprob: number }>>;
}

export interface Delta {
  text: string;
  samples: SampleResult[];
  ids: number[];
}

export interface ChoiceResult {
  index: number;
  text: string;
  ids: number[];
  samples: SampleResult[];
  finishReason: FinishReason;
  /** the stop string or stop token that ended it, if any */
  promptTokens: number;
  cachedTokens: number;
  ttft: number | null;
  tpot: number | null;
  e2e: number;
  queueTime: number | null;
}

/** min_tokens: the end ids (EOS, stop_token_ids) are masked until `n` tokens were generated. */
export function minTokens(n: number, endIds: readonly number[]): Processor {
  const ids = [...new Set(endIds)];
  return (out, logits) => {
    if (out.length >= n) return;
    for (const id of ids) if (id >= 0 && id < logits.length) logits[id] = -Infinity;
  };
}

/** A started sequence; run() drives it, calling onDelta for each piece of output. */
export class ChoiceRun {
  readonly iter: AsyncIterator<TokenEvent>;
  private readonly decoder: ByteStreamDecoder | null;
  private readonly stop: StopMatcher;
  readonly score: PromptScore | null;
  private started = false;

  constructor(
    engine: Engine,
    readonly spec: ChoiceSpec,
    table: TokenTable | null,
    signal: AbortSignal,
    private readonly t0: number,
  ) {
    this.decoder = table ? new ByteStreamDecoder(table) : null;
    this.stop = new StopMatcher(table ? (spec.sampling.stop ?? []) : []);
    let score: PromptScore | null = null;
    let onPromptLogits: ((pos: number, logits: Float32Array) => void) | undefined;
    if (spec.scorePrompt !== undefined) {
      const s: PromptScore = { logprobs: [], top: [] };
      score = s;
      const ids = spec.promptIds;
      const n = spec.scorePrompt;
      onPromptLogits = (pos, logits) => {
        try {
          if (pos + 1 >= ids.length) return; // the last position predicts the first generated token
          const lp = logSoftmax(logits);
          s.logprobs[pos] = lp[ids[pos + 1]!]!;
          s.top[pos] = topN(lp, n);
        } catch {
          // never throw inside the engine's step
        }
      };
    }
    this.score = score;
    // generate() validates and admits now (it throws on a bad or unadmittable request)
    const it = engine.generate({ promptIds: spec.promptIds, sampling: spec.sampling, signal, logitsProcessor: spec.processor, onPromptLogits });
    this.iter = it[Symbol.asyncIterator]();
  }

  /** Drop a sequence that was admitted but never run (its signal must be aborted first). */
  discard(): void {
    if (this.started) return;
    this.started = true;
    // the engine's stream notices the aborted signal on its first step and frees the sequence
    void this.iter.next().then(
      () => this.iter.return?.(),
      () => undefined,
    );
  }

  /** the stop string at the start of `rest` that StopMatcher cut at (the one ending first) */
  private matchedStop(rest: string): string {
    let best = "";
    for (const s of this.spec.sampling.stop ?? []) if (s && rest.startsWith(s) && (!best || s.length < best.length)) best = s;
    return best;
  }

  async run(onDelta: (d: Delta) => void | Promise<void>): Promise<ChoiceResult> {
    this.started = true;
    const ids: number[] = [];
    const samples: SampleResult[] = [];
    let text = "";
    let raw = ""; // the decoded text before stop strings cut it
    let finish: FinishReason = "abort";
    let metrics: RequestMetrics | undefined;
    let tFirst = 0;
    try {
      for (;;) {
        const r = await this.iter.next();
        if (r.done) break;
        const ev = r.value;
        if (ev.ids.length && !tFirst) tFirst = performance.now();
        let piece = "";
        let stopped = false;
        if (this.decoder) {
          for (const id of ev.ids) piece += this.decoder.push(id);
          if (ev.finishReason) piece += this.decoder.flush();
          raw += piece;
          const s = this.stop.push(piece);
          piece = s.emit;
          stopped = s.stopped;
          if (stopped && this.spec.includeStopStr) piece += this.matchedStop(raw.slice(text.length + piece.length));
          if (ev.finishReason && !stopped) piece += this.stop.flush();
        }
        ids.push(...ev.ids);
        samples.push(...ev.samples);
        text += piece;
        if (ev.metrics) metrics = ev.metrics;
        if (piece || ev.ids.length) await onDelta({ text: piece, samples: ev.samples, ids: ev.ids });
        if (stopped) {
          finish = "stop";
          break; // leaving aborts the sequence in the engine
        }
        if (ev.finishReason) {
          finish = ev.finishReason;
          break;
        }
      }
    } finally {
      await this.iter.return?.();
    }
    const tEnd = performance.now();
    return {
      index: this.spec.index,
      text,
      ids,
      samples,
      finishReason: finish,
      promptTokens: this.spec.promptIds.length,
      cachedTokens: metrics?.cachedTokens ?? 0,
      ttft: tFirst ? (tFirst - this.t0) / 1000 : null,
      tpot: tFirst && ids.length > 1 ? (tEnd - tFirst) / 1000 / (ids.length - 1) : null,
      e2e: (tEnd - this.t0) / 1000,
      queueTime: metrics ? metrics.queueTime : null,
    };
  }
}
