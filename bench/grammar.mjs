// The grammar engine's costs (a benchmark that reports; nothing is asserted), on DeepSeek-V3's
// vocabulary (the bundled tokenizer, 129,280 ids as the checkpoints' logits have):
//   node bench/grammar.mjs [--steps 200] [--out bench/results/grammar.json]
// - setup: the engine's first compile (loads XGrammar's wasm, hands it the vocabulary)
// - compile of a 20-property JSON schema: cold (first time) and cached (the same spec again)
// - per-token mask cost (the processor the engine calls on each step: accept the sampled token,
//   get XGrammar's bitmask, apply it to a Float32Array of 129,280 logits), over a generation
//   under that schema, under json_object, and under a tool-call grammar; p50/p99/mean in ms.
// Prints one JSON line and writes it to --out.
import { mkdirSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Tokenizer } from "@ds3/core";
import { createGrammars, tokenTable } from "@ds3/server";

const here = dirname(fileURLToPath(import.meta.url));
const { values } = parseArgs({
  options: { steps: { type: "string", default: "200" }, out: { type: "string", default: resolve(here, "results/grammar.json") } },
});
const STEPS = Number(values.steps);
const VOCAB = 129_280;

const tok = await Tokenizer.load();
const table = tokenTable(tok, VOCAB);
const eos = tok.eosId;
const grammars = createGrammars(table, [eos]);
const now = () => performance.now();

const props = {};
for (let i = 0; i < 20; i++) {
  const kinds = [{ type: "string" }, { type: "integer" }, { type: "boolean" }, { enum: ["low", "mid", "high"] }, { type: "number" }];
  props[`field_${i}`] = i === 7 ? { type: "array", items: { type: "string" } } : i === 13 ? { type: "object", properties: { x: { type: "number" }, y: { type: "number" } }, required: ["x", "y"] } : kinds[i % kinds.length];
}
const schema = { type: "object", properties: props, required: Object.keys(props), additionalProperties: false };

let t = now();
await grammars.compile({ type: "choice", choices: ["warm"] });
const setupMs = now() - t;
t = now();
const cg = await grammars.compile({ type: "json_schema", schema, strict: true });
const coldMs = now() - t;
t = now();
await grammars.compile({ type: "json_schema", schema, strict: true });
const cachedMs = now() - t;

/** Decodes under the processor (seeded noise + a bias toward short structural tokens), timing each call. */
const texts = table.bytes.map((b) => new TextDecoder().decode(b));
const bias = new Float32Array(VOCAB);
for (let id = 0; id < VOCAB; id++) if (texts[id] && (/^\s*["}\],:]{1,3}\s*$/.test(texts[id]) || /^(true|false|[0-9])$/.test(texts[id]))) bias[id] = 6;
bias[eos] = 8;
function run(compiled, steps) {
  const p = compiled.processor();
  const ids = [];
  const logits = new Float32Array(VOCAB);
  const times = [];
  let s = 12345;
  let restarts = 0;
  let proc = p;
  while (times.length < steps) {
    for (let j = 0; j < VOCAB; j++) {
      s ^= s << 13;
      s ^= s >>> 17;
      s ^= s << 5;
      logits[j] = ((s >>> 0) / 2 ** 32) * 6 + bias[j];
    }
    const a = now();
    proc(ids, logits);
    times.push(now() - a);
    let best = 0;
    for (let j = 1; j < VOCAB; j++) if (logits[j] > logits[best]) best = j;
    if (best === eos) {
      // a finished output: start another so the sample covers `steps` steps
      ids.length = 0;
      proc = compiled.processor();
      restarts++;
      continue;
    }
    ids.push(best);
  }
  times.sort((x, y) => x - y);
  const q = (f) => +times[Math.min(times.length - 1, Math.floor(f * times.length))].toFixed(4);
  return { steps: times.length, outputs: restarts, mean_ms: +(times.reduce((x, y) => x + y, 0) / times.length).toFixed(4), p50_ms: q(0.5), p99_ms: q(0.99), max_ms: q(1) };
}

const tools = [
  { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" }, unit: { enum: ["celsius", "fahrenheit"] } }, required: ["city", "unit"] } },
  { name: "get_time", parameters: { type: "object", properties: { tz: { type: "string" } }, required: ["tz"] } },
];
const result = {
  bench: "grammar",
  engine: "xgrammar (@mlc-ai/web-xgrammar 0.1.27, wasm)",
  vocab: VOCAB,
  cpu: cpus()[0]?.model ?? "unknown",
  cores: cpus().length,
  node: process.version,
  setup_ms: +setupMs.toFixed(1),
  compile_20_properties_cold_ms: +coldMs.toFixed(1),
  compile_20_properties_cached_ms: +cachedMs.toFixed(3),
  mask_per_token: {
    json_schema_20_properties: run(cg, STEPS),
    json_object: run(await grammars.compile({ type: "json_object" }), STEPS),
    tool_calls: run(await grammars.compile({ type: "tool_calls", tools, choice: "required", parallel: true }), STEPS),
  },
};
const line = JSON.stringify(result);
console.log(line);
mkdirSync(dirname(values.out), { recursive: true });
writeFileSync(values.out, `${JSON.stringify(result, null, 2)}\n`);
