// CPU backend throughput on a DeepSeek-V3-architecture model of issue 16's shape (a benchmark that
// reports; nothing is asserted). The model is made by the built-in generator with a shape option
// (random FP8 weights, ~1.2 GB, generated once into the ds3 cache directory, never committed).
//   node bench/cpu.mjs [--model DIR] [--threads N] [--steps 128] [--prompt 512] [--tag NAME] [--backend MODULE]
// (--backend: another build of @ds3/backend-cpu, e.g. an older one, to compare on the same run conditions)
// Figures: prefill of one 512-token prompt; greedy-shaped decode steps at batch 1 (context 512)
// and batch 8 (8 sequences sharing the 512-token prefix, each decoding its own tokens); the
// machine's streaming-read bandwidth measured in the same run, and each figure's fraction of the
// memory roofline (bytes a step must read / bandwidth). Load average is recorded with each figure.
import { LocalExecutor, ensureBuiltinModel } from "@ds3/core";
import { availableParallelism, cpus, loadavg } from "node:os";
import { parseArgs } from "node:util";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const { values } = parseArgs({
  options: { backend: { type: "string" }, model: { type: "string" }, threads: { type: "string" }, steps: { type: "string" }, prompt: { type: "string" }, tag: { type: "string" } },
});
/** issue 16's shape: 6 layers (1 dense + 5 MoE), hidden 2048, 16 heads, 64 experts of 512, top-6, vocab 16,384 */
export const SHAPE = {
  vocab_size: 16384, hidden_size: 2048, intermediate_size: 5120, moe_intermediate_size: 512, num_hidden_layers: 6, num_nextn_predict_layers: 0,
  num_attention_heads: 16, n_shared_experts: 1, n_routed_experts: 64, kv_lora_rank: 512, q_lora_rank: 512, qk_rope_head_dim: 64,
  v_head_dim: 128, qk_nope_head_dim: 128, n_group: 8, topk_group: 3, num_experts_per_tok: 6, first_k_dense_replace: 1,
};
const { availableIsas, cpu, readBandwidth } = await import(values.backend ? pathToFileURL(resolve(values.backend)).href : "@ds3/backend-cpu");
const threads = Number(values.threads ?? availableParallelism());
const steps = Number(values.steps ?? 128);
const P = Number(values.prompt ?? 512);
const dir = values.model ?? (await ensureBuiltinModel({ shape: SHAPE, onProgress: (m) => console.error(m) }));
const cfg = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));

const bw = () => readBandwidth({ mib: 1024, threads, reps: 5 });
const bandwidth = [bw()];
const load = () => loadavg().map((x) => Number(x.toFixed(2)));

// bytes one decode step must read: every weight but the embedding (one row) and the routed
// experts (those the batch selects: expected distinct count under uniform routing), plus the
// latent cache of each sequence
const E = cfg.n_routed_experts, K = cfg.num_experts_per_tok, D = cfg.hidden_size, L = cfg.num_hidden_layers;
const fp8 = (r, c) => r * c + Math.ceil(r / 128) * Math.ceil(c / 128) * 4;
const H = cfg.num_attention_heads, qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, C = cfg.kv_lora_rank, R = cfg.qk_rope_head_dim;
const attn = fp8(cfg.q_lora_rank, D) + fp8(H * qk, cfg.q_lora_rank) + fp8(C + R, D) + fp8(H * (cfg.qk_nope_head_dim + cfg.v_head_dim), C) + fp8(D, H * cfg.v_head_dim);
const mlp = (I) => 2 * fp8(I, D) + fp8(D, I);
const expert = mlp(cfg.moe_intermediate_size);
const moeLayers = L - cfg.first_k_dense_replace;
const fixedBytes = L * attn + cfg.first_k_dense_replace * mlp(cfg.intermediate_size) + moeLayers * (mlp(cfg.moe_intermediate_size * cfg.n_shared_experts) + E * D * 2) + cfg.vocab_size * D * 2;
const stepBytes = (B, ctx) => fixedBytes + moeLayers * E * (1 - (1 - K / E) ** B) * expert + B * L * ctx * (C + R) * 4;

const ex = new LocalExecutor(dir, { backend: cpu, backendOptions: { threads }, cache: { numBlocks: 256, blockSize: 64, dtype: "f32" }, mtp: false });
const V = ex.vocabSize;
const now = () => performance.now();
const prompt = Array.from({ length: P }, (_, i) => (i * 7919 + 13) % V);
const pBlocks = Math.ceil(P / 64);
const maxBlocks = Math.ceil((P + steps) / 64);
/** block table of sequence b: the shared prompt blocks, then blocks of its own */
const table = (b) => Array.from({ length: maxBlocks }, (_, j) => (j < pBlocks ? j : pBlocks + b * (maxBlocks - pBlocks) + (j - pBlocks)));
const prefillStep = () => ({
  ids: Int32Array.from(prompt), positions: Int32Array.from(prompt.map((_, i) => i)), seqIdx: new Int32Array(P),
  blockTables: Int32Array.from(table(0)), maxBlocks, logitRows: Int32Array.from([P - 1]),
});

const results = {
  machine: `${cpus()[0]?.model} x${availableParallelism()}`, threads, model: values.model ? dir : "builtin generator with shape", shape: values.model ? undefined : SHAPE,
  kernels: process.env.DS3_CPU_ISA || availableIsas()[0], weight_bytes_per_decode_token_b1: Math.round(stepBytes(1, P)), figures: {},
};

// prefill: the first run warms up (page-ins, caches), the second is measured
await ex.step(prefillStep());
let t = now();
let cpu0 = process.cpuUsage();
const l0 = load();
await ex.step(prefillStep());
let sec = (now() - t) / 1000;
// cpu_utilization: this process's CPU time / (wall time x threads); below 1 on a machine shared with
// other work. tok_s_cpu_bound: the figure if every thread had run all the time (CPU time, not wall)
const rooflines = [];
const fig = (name, tokS, bytesPerSec) => {
  const c = process.cpuUsage(cpu0), cpuSec = (c.user + c.system) / 1e6, util = cpuSec / (sec * threads);
  results.figures[name] = { tok_s: Number(tokS.toFixed(2)), cpu_utilization: Number(util.toFixed(3)), tok_s_cpu_bound: Number((tokS / Math.min(1, util)).toFixed(2)), loadavg: load() };
  rooflines.push([name, tokS, bytesPerSec]);
  console.error(name, results.figures[name]);
};
fig(`prefill_${P}`, P / sec, (fixedBytes + moeLayers * E * expert) / sec);
results.figures[`prefill_${P}`].loadavg_before = l0;

for (const B of [1, 8]) {
  // the prompt is in blocks 0..pBlocks-1 (shared); each sequence decodes into its own blocks
  const bt = Int32Array.from(Array.from({ length: B }, (_, b) => table(b)).flat());
  const run = async (n) => {
    for (let s = 0; s < n; s++) {
      await ex.step({
        ids: Int32Array.from({ length: B }, (_, b) => (b * 977 + s * 31 + 5) % V), positions: new Int32Array(B).fill(P + s), seqIdx: Int32Array.from({ length: B }, (_, b) => b),
        blockTables: bt, maxBlocks, logitRows: Int32Array.from({ length: B }, (_, b) => b),
      });
    }
  };
  await run(2);
  t = now();
  cpu0 = process.cpuUsage();
  await run(steps);
  sec = (now() - t) / 1000;
  fig(`decode_b${B}_ctx${P}`, (B * steps) / sec, (stepBytes(B, P + steps / 2) * steps) / sec);
  results.figures[`decode_b${B}_ctx${P}`].ms_per_step = Number(((sec * 1000) / steps).toFixed(2));
}
await ex.close();
bandwidth.push(bw());
results.read_bandwidth_gb_s = bandwidth.map((b) => Number((b / 1e9).toFixed(2)));
// the roofline: the best streaming-read bandwidth seen in this run (start and end)
const best = Math.max(...bandwidth);
for (const [name, tokS, bytesPerSec] of rooflines) {
  const r = best / bytesPerSec;
  Object.assign(results.figures[name], { roofline_tok_s: Number((r * tokS).toFixed(2)), roofline_fraction: Number((1 / r).toFixed(4)) });
}
results.figures_note = "roofline_tok_s: tokens/s if the step ran at the best streaming-read bandwidth measured in this run (start, end) (bytes: weights read + latent cache; batch 8 with the expected distinct experts under uniform routing)";
results.date = new Date().toISOString();
console.log(JSON.stringify(results, null, 2));
const machine = (values.tag ?? `${cpus()[0]?.model ?? "cpu"}-x${availableParallelism()}`).toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
mkdirSync(new URL("./results/", import.meta.url), { recursive: true });
writeFileSync(new URL(`./results/cpu-${machine}.json`, import.meta.url), JSON.stringify(results, null, 2) + "\n");
