// POST /v1/completions: OpenAI's legacy text completions, on text or token-id prompts, with
// echo + logprobs scoring the prompt (vLLM's prompt logprobs) and the legacy logprobs shape.
import { randomBytes } from "node:crypto";
import { type Processor, compose, logitBias } from "../constraints.js";
import type { ServerContext } from "../context.js";
import { invalid } from "../errors.js";
import { type ChoiceResult, type ChoiceRun, type ChoiceSpec, type Delta, minTokens } from "../generate.js";
import { type Route, sendJson } from "../http.js";
import { type ActiveRequest, type Exchange, clampLp, cutError, finishMetrics, openChunkStream, tokenName, usage } from "../stream.js";
import { type CompletionRequestBody, parseCompletionRequest } from "../validate.js";

/** max_tokens when the request gives none */
export const DEFAULT_MAX_TOKENS = 16;

/** legacy logprobs: tokens, token_logprobs, top_logprobs (dicts), text_offset */
interface LegacyLp {
  tokens: string[];
  token_logprobs: (number | null)[];
  top_logprobs: (Record<string, number> | null)[];
  text_offset: number[];
}

async function completions(ctx: ServerContext, x: Exchange, body: Record<string, unknown>): Promise<void> {
  const { tok, table, modelName, metrics } = ctx;
  const r: CompletionRequestBody = parseCompletionRequest(body, ctx.vocabSize);
  ctx.checkModel(r);
  const prompts: number[][] = r.prompts.map((p, i) => {
    if (typeof p !== "string") return p;
    if (!tok) throw invalid(r.prompts.length > 1 ? `prompt[${i}]` : "prompt", `model ${modelName} has no tokenizer: give token ids`);
    const ids = tok.encode(p, { addSpecial: true });
    if (ids.length === 0) throw invalid(r.prompts.length > 1 ? `prompt[${i}]` : "prompt", "the prompt has no tokens");
    return ids;
  });
  prompts.forEach((p, i) => ctx.checkContext(p.length, r, r.prompts.length > 1 ? `prompt[${i}]` : "prompt"));
  const base: Processor[] = [];
  if (r.logitBias) base.push(logitBias(r.logitBias));
  const grammar = r.grammar ? await ctx.compileGrammar(r.grammar) : null;
  const scoring = r.echo && r.logprobs !== null;
  const specs: ChoiceSpec[] = [];
  prompts.forEach((ids, pi) => {
    for (let j = 0; j < r.n; j++) {
      const sampling = ctx.samplingFor(r, j);
      // no max_tokens: 16, as OpenAI, vLLM and SGLang (less where the context has less room)
      if (r.maxTokens === undefined) sampling.maxTokens = Math.min(DEFAULT_MAX_TOKENS, ctx.maxModelLen - ids.length);
      const ps = [...base];
      if (r.minTokens) ps.push(minTokens(r.minTokens, [...ctx.eosIds, ...(sampling.stopTokenIds ?? [])]));
      if (grammar) ps.push(grammar.processor());
      specs.push({
        index: pi * r.n + j,
        promptIds: ids,
        sampling,
        processor: compose(ps),
        ...(scoring && { scorePrompt: r.logprobs! }),
        ...(r.includeStopStr && { includeStopStr: true }),
      });
    }
  });
  const id = `cmpl-${randomBytes(12).toString("hex")}`;
  const asIds = r.tokenIdNames;
  const promptTokens = prompts.reduce((a, p) => a + p.length, 0);
  const promptText = (ids: number[]) => (tok ? tok.decode(ids, { skipSpecial: true }) : "");
  const name = (id: number) => tokenName(table, id, asIds);

  const newLp = (): LegacyLp => ({ tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] });
  const tokenText = (id: number) => (table ? table.tokenString(id) : "");
  const addSamples = (lp: LegacyLp, samples: Delta["samples"], offset: number) => {
    let off = offset;
    for (const s of samples) {
      lp.tokens.push(name(s.id));
      lp.token_logprobs.push(clampLp(s.logprob));
      const top: Record<string, number> = {};
      for (const t of s.top ?? []) top[name(t.id)] = clampLp(t.logprob);
      top[name(s.id)] = clampLp(s.logprob);
      lp.top_logprobs.push(top);
      lp.text_offset.push(off);
      off += tokenText(s.id).length;
    }
    return off;
  };
  const promptLp = (ids: number[], score: NonNullable<ChoiceRun["score"]>): { lp: LegacyLp; end: number } => {
    const lp = newLp();
    let off = 0;
    ids.forEach((tid, t) => {
      lp.tokens.push(name(tid));
      lp.text_offset.push(off);
      off += table && !table.special[tid] ? tokenText(tid).length : 0;
      if (t === 0) {
        lp.token_logprobs.push(null);
        lp.top_logprobs.push(null);
        return;
      }
      const top: Record<string, number> = {};
      for (const x of score.top[t - 1] ?? []) top[name(x.id)] = clampLp(x.logprob);
      const v = clampLp(score.logprobs[t - 1] ?? -Infinity);
      top[name(tid)] = v;
      lp.token_logprobs.push(v);
      lp.top_logprobs.push(top);
    });
    return { lp, end: off };
  };

  /** cut by shutdown (or the engine stopping): an error, never finish_reason "abort" */
  const cutCheck = (result: ChoiceResult, active: ActiveRequest) => {
    if (result.finishReason !== "abort" || active.cancelledBy === "client") return;
    finishMetrics(metrics, result, "abort");
    throw cutError(active);
  };

  await ctx.admission.run(x, specs, async (runs, active) => {
    const results: ChoiceResult[] = [];
    if (r.stream) {
      const { out, chunk } = openChunkStream(x.res, id, "text_completion", modelName, r.includeUsage);
      await ctx.admission.runAll(x, runs, active, async (run) => {
        const index = run.spec.index;
        const pIds = run.spec.promptIds;
        let offset = 0;
        let echoed = !r.echo;
        const sendEcho = async () => {
          if (echoed) return;
          echoed = true;
          let lp: LegacyLp | null = null;
          if (r.logprobs !== null) {
            const score = run.score;
            if (score) {
              const p = promptLp(pIds, score);
              lp = p.lp;
              offset = p.end;
            }
          }
          const text = promptText(pIds);
          if (lp === null) offset = text.length;
          await out.send(chunk({ index, text, logprobs: lp, finish_reason: null }));
        };
        const result = await run.run(async (d) => {
          await sendEcho();
          let lp: LegacyLp | null = null;
          if (r.logprobs !== null) {
            lp = newLp();
            offset = addSamples(lp, d.samples, offset);
          }
          if (d.text || lp || !table) await out.send(chunk({ index, text: d.text, logprobs: lp, finish_reason: null }));
        });
        cutCheck(result, active);
        await sendEcho();
        await out.send(chunk({ index, text: "", logprobs: null, finish_reason: result.finishReason }));
        results.push(result);
        finishMetrics(metrics, result, result.finishReason);
      });
      if (r.includeUsage)
        await out.send({ id, object: "text_completion", created: Math.floor(Date.now() / 1000), model: modelName, choices: [], usage: usage(promptTokens, results) });
      out.end();
      return;
    }
    const choices: unknown[] = new Array(specs.length);
    await ctx.admission.runAll(x, runs, active, async (run) => {
      const result = await run.run(() => undefined);
      cutCheck(result, active);
      const index = run.spec.index;
      const pIds = run.spec.promptIds;
      let text = result.text;
      let lp: LegacyLp | null = null;
      if (r.logprobs !== null) {
        let offset = 0;
        if (r.echo) {
          const score = run.score;
          if (score) {
            const p = promptLp(pIds, score);
            lp = p.lp;
            offset = p.end;
          }
        }
        lp ??= newLp();
        addSamples(lp, result.samples, offset);
      }
      if (r.echo) text = promptText(pIds) + text;
      choices[index] = { index, text, logprobs: lp, finish_reason: result.finishReason };
      results.push(result);
      finishMetrics(metrics, result, result.finishReason);
    });
    if (active.cancelledBy === "client") return;
    sendJson(x.res, 200, { id, object: "text_completion", created: Math.floor(Date.now() / 1000), model: modelName, choices, usage: usage(promptTokens, results) });
  });
}

export const completionsRoute: Route = {
  path: "/v1/completions",
  methods: ["POST"],
  auth: true,
  handle: async (ctx, x, m) => completions(ctx, x, await m.json()),
};
