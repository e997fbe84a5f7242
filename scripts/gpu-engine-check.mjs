// The whole stack on the GPU: Engine (continuous batching, paged cache, prefix caching,
// speculative decoding) over a LocalExecutor on the CUDA backend, on tiny-v3 in exact mode.
// Runs with plain node over the one-file bundle (packages/backend-cuda/build/gpu/ds3.js):
//   node scripts/gpu-engine-check.mjs [--cpu]   (--cpu: the same checks on the CPU backend)
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
const { cuda, cpu, Engine, LocalExecutor, Rng } = await import(new URL("../packages/backend-cuda/build/gpu/ds3.js", import.meta.url).href);
const dir = `${root}test/fixtures/tiny-v3`;
const golden = JSON.parse(readFileSync(`${dir}/golden.json`, "utf8"));
let failed = 0;
const check = (name, ok, info = "") => {
  console.log(`${ok ? "PASS" : "FAIL"}  ${name}${info ? `  ${info}` : ""}`);
  if (!ok) failed++;
};
const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

async function run(engine, promptIds, sampling) {
  const ids = [];
  for await (const ev of engine.generate({ promptIds, sampling })) ids.push(...ev.ids);
  return ids;
}

const backend = process.argv.includes("--cpu") ? cpu : cuda;
console.log(backend.name, JSON.stringify(backend.available()));
for (const precision of [{ activations: "f32", cache: "f32", actQuant: "none" }, { activations: "bf16", cache: "bf16", actQuant: "fp8" }]) {
  const exact = precision.actQuant === "none";
  const tag = exact ? "exact" : "bf16+fp8";
  const ex = new LocalExecutor(dir, { backend, backendOptions: { precision }, cache: { numBlocks: 96, blockSize: 64, dtype: precision.cache }, mtp: true });
  const t0 = performance.now();
  // 1. golden prompts, concurrently, greedy
  const e1 = new Engine({ executor: ex, eosIds: [] });
  const outs = await Promise.all(golden.prompts.map((p) => run(e1, p.ids, { temperature: 0, maxTokens: 24 })));
  if (exact) {
    golden.prompts.forEach((p, i) => {
      const k = p.greedy_margins.findIndex((m) => m < 1e-3);
      const n = k < 0 ? 24 : k;
      check(`${tag}: engine greedy = golden (prompt of ${p.ids.length})`, same(outs[i].slice(0, n), p.greedy.slice(0, n)), `${n} compared`);
    });
  }
  // 2. 24 concurrent mixed requests = each alone
  const rng = new Rng(3);
  const prompts = Array.from({ length: 24 }, () => Array.from({ length: 1 + Math.floor(rng.next() * 120) }, () => Math.floor(rng.next() * 1024)));
  const alone = [];
  const e2 = new Engine({ executor: ex, eosIds: [], prefixCaching: false });
  for (const [i, p] of prompts.entries()) alone.push(await run(e2, p, { temperature: 0, maxTokens: 4 + (i % 9) }));
  const e3 = new Engine({ executor: ex, eosIds: [], maxBatchTokens: 256, prefillChunk: 40 });
  const together = await Promise.all(prompts.map((p, i) => run(e3, p, { temperature: 0, maxTokens: 4 + (i % 9) })));
  const diff = together.filter((o, i) => !same(o, alone[i])).length;
  check(`${tag}: 24 concurrent mixed requests = each alone`, exact ? diff === 0 : true, `${diff} of 24 differ${exact ? "" : " (reported, fast modes are not batch invariant)"}`);
  check(`${tag}: cache returns to free`, e3.stats().cacheBlocksUsed === 0, JSON.stringify({ steps: e3.stats().steps }));
  // 3. speculative decoding: oracle drafter and MTP keep outputs
  const truth = new Map(prompts.map((p, i) => [p.join(","), alone[i]]));
  const oracle = { name: "oracle", propose: (s, k) => { const w = truth.get(s.tokens.slice(0, s.promptLength).join(",")); const d = s.tokens.length - s.promptLength; return w.slice(d, d + k); } };
  const e4 = new Engine({ executor: ex, eosIds: [], speculative: { drafter: oracle, k: 3 } });
  const spec = await Promise.all(prompts.map((p, i) => run(e4, p, { temperature: 0, maxTokens: 4 + (i % 9) })));
  const sdiff = spec.filter((o, i) => !same(o, alone[i])).length;
  check(`${tag}: oracle drafter k=3${exact ? ": same outputs" : ""}, acceptance ${(100 * e4.stats().specAcceptance).toFixed(1)}%`, exact ? sdiff === 0 && e4.stats().specAcceptance === 1 : true, `${sdiff} differ${exact ? "" : " (reported)"}`);
  const e5 = new Engine({ executor: ex, eosIds: [], speculative: { drafter: "mtp" } });
  const mtp = await Promise.all(prompts.slice(0, 8).map((p, i) => run(e5, p, { temperature: 0, maxTokens: 4 + (i % 9) })));
  const mdiff = mtp.filter((o, i) => !same(o, alone[i])).length;
  check(`${tag}: MTP drafts${exact ? ": same outputs" : ""}, acceptance ${(100 * e5.stats().specAcceptance).toFixed(1)}% of ${e5.stats().specProposed}`, exact ? mdiff === 0 : true, `${mdiff} differ${exact ? "" : " (reported)"}`);
  // 4. seeded sampling: alone = in a batch
  const sp = { temperature: 0.9, topP: 0.95, seed: 99, maxTokens: 10 };
  const solo = await run(e3, prompts[5], sp);
  const batch = await Promise.all(prompts.map((p, i) => run(e3, i === 5 ? prompts[5] : p, i === 5 ? sp : { ...sp, seed: i })));
  check(`${tag}: seeded request alone = in a batch of 24`, exact ? same(batch[5], solo) : true, exact ? "" : `(reported) ${same(batch[5], solo)}`);
  // 5. sampling on the device (backends that can) = sampling on the host, greedy and seeded
  if (exact) {
    const spS = (i) => (i % 3 === 0 ? { temperature: 0, maxTokens: 8 } : { temperature: 0.8, topK: i % 2 ? 40 : 0, topP: 0.9, minP: i % 4 === 1 ? 0.05 : 0, seed: 500 + i, maxTokens: 8 });
    const limit = 1000; // the allowed ids are [0, 1000): the device samples from the first 1000 columns
    const mk = (device) => new Engine({ executor: ex, eosIds: [], deviceSampling: device, vocabLimit: limit, allowedIds: (id) => id < limit });
    const eh = mk(false);
    const host = await Promise.all(prompts.map((p, i) => run(eh, p, spS(i))));
    const ed = mk(true);
    const dev = await Promise.all(prompts.map((p, i) => run(ed, p, spS(i))));
    const ddiff = dev.filter((o, i) => !same(o, host[i])).length;
    const onDevice = ed.stats().deviceSampledSteps;
    check(`${tag}: sampling on the device = on the host (greedy and seeded top-k/top-p/min-p, ids < ${limit})`, backend.name === "cpu" || (ddiff === 0 && onDevice > 0 && dev.flat().every((t) => t < limit)), `${ddiff} of 24 differ; ${onDevice} of ${ed.stats().steps} steps sampled on the device`);
  }
  console.log(`INFO  ${tag}: engine checks took ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  await ex.close();
}
console.log(failed ? `${failed} FAILED` : "ALL PASS");
process.exit(failed ? 1 : 0);
