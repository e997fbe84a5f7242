// Options and helpers the commands share: the model/backend/parallel options, sampling
// flags, loading a model with progress on stderr, parsing token ids.
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join, resolve } from "node:path";
import type { Argv, Options } from "yargs";
import { DS3, SamplingError, type SamplingParams, Tokenizer, builtinModelDir, loadConfig, parseDeviceList, validateSampling } from "@ds3/core";
import { getBackend } from "./backends.js";
import { ProgressBar, UsageError, fmtBytes, notice, ui, warn } from "./ui.js";

export interface GlobalArgs {
  verbose?: boolean;
  quiet?: boolean;
}

export interface ModelArgs extends GlobalArgs {
  model?: string;
  backend: string;
  tp: number;
  devices?: number[];
  shareDevices?: boolean;
  maxModelLen?: number;
  cacheBlocks?: number;
  cacheBytes?: number;
  cacheDtype?: string;
  maxBatchTokens?: number;
  prefillChunk?: number;
  prefixCaching?: boolean;
  mtp?: boolean;
  nnodes?: number;
  nodeRank?: number;
  distInitAddr?: string;
  distTimeout?: number;
  distToken?: string;
}

/** yargs coercion for integer flags, with a one-line error naming the flag. */
export function intFlag(flag: string, min = 0): (v: unknown) => number | undefined {
  return (v: unknown) => {
    if (v === undefined) return undefined;
    if (Array.isArray(v)) throw new UsageError(`--${flag} was given more than once`);
    const n = typeof v === "number" ? v : Number(String(v).trim());
    if (String(v).trim() === "" || !Number.isSafeInteger(n) || n < min) throw new UsageError(`--${flag} must be an integer >= ${min}, got "${v}"`);
    return n;
  };
}

/** yargs coercion for --devices 0,1,2,3 */
function devicesFlag(v: unknown): number[] | undefined {
  if (v === undefined) return undefined;
  if (Array.isArray(v)) throw new UsageError("--devices was given more than once (give one comma-separated list)");
  try {
    return parseDeviceList(String(v));
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

export function numFlag(flag: string): (v: unknown) => number | undefined {
  return (v: unknown) => {
    if (v === undefined) return undefined;
    if (Array.isArray(v)) throw new UsageError(`--${flag} was given more than once`);
    const n = typeof v === "number" ? v : Number(String(v).trim());
    if (String(v).trim() === "" || !Number.isFinite(n)) throw new UsageError(`--${flag} must be a number, got "${v}"`);
    return n;
  };
}

export const modelOptions: Record<string, Options> = {
  model: { type: "string", describe: "checkpoint directory (HF layout); default: the built-in tiny model (random weights)", requiresArg: true },
  backend: { type: "string", default: "auto", describe: "backend: auto (the best one found), cpu, cuda, rocm, ascend or a package name (see ds3 inspect)", requiresArg: true },
  tp: { default: 1, describe: "tensor/expert parallel ranks (worker threads, one per device)", coerce: intFlag("tp", 1), requiresArg: true },
  devices: { type: "string", describe: "device per rank, e.g. 0,1,2,3 (default: rank r on device r of the backend's visible devices)", coerce: devicesFlag, requiresArg: true },
  "share-devices": { type: "boolean", describe: "let ranks share a device (testing on one GPU); collectives then go through the host" },
  "max-model-len": { describe: "longest sequence (prompt + output) in tokens (default: min(model, 4096))", coerce: intFlag("max-model-len", 1), requiresArg: true },
  "cache-blocks": { describe: "latent cache size in 64-token blocks (default: 4 x max-model-len)", coerce: intFlag("cache-blocks", 1), requiresArg: true },
  "cache-bytes": { describe: "latent cache budget in bytes per rank (instead of --cache-blocks)", coerce: intFlag("cache-bytes", 1), requiresArg: true },
  "cache-dtype": { type: "string", choices: ["f32", "bf16"], default: "f32", describe: "latent cache precision", requiresArg: true },
  "max-batch-tokens": { describe: "token budget of one engine step (decode + prefill chunks)", coerce: intFlag("max-batch-tokens", 1), requiresArg: true },
  "prefill-chunk": { describe: "largest prefill chunk of one sequence per step", coerce: intFlag("prefill-chunk", 1), requiresArg: true },
  "prefix-caching": { type: "boolean", default: true, describe: "share the cache blocks of common prompt prefixes (--no-prefix-caching to disable)" },
};

/** Ranks over several nodes (processes or machines), as SGLang starts them. */
export const nodeOptions: Record<string, Options> = {
  nnodes: { describe: "nodes (machines or processes) the ranks span; --tp is the total, tp/nnodes ranks per node", coerce: intFlag("nnodes", 1), requiresArg: true },
  "node-rank": {
    describe: "this node's rank: 0 runs the engine (and the server), the others only run their ranks until node 0 ends (no prompt, no port)",
    coerce: intFlag("node-rank", 0),
    requiresArg: true,
  },
  "dist-init-addr": { type: "string", describe: "HOST:PORT where node 0 listens for the other nodes (the same on every node)", requiresArg: true },
  "dist-timeout": { describe: "seconds node 0 waits for the others and they retry reaching it (default 300)", coerce: intFlag("dist-timeout", 1), requiresArg: true },
  "dist-token": {
    type: "string",
    describe:
      "shared secret of the node group, the same on every node (default: $DS3_DIST_TOKEN; prefer the variable: a flag shows in ps). Nodes prove it in the handshake (HMAC-SHA256 challenge-response); it never travels. Without it the init port admits any peer that can reach it: use a trusted network. Not encryption: steps travel in clear",
    requiresArg: true,
  },
};

/** Whether these arguments make this process a node other than node 0 (it runs only its ranks). */
export function isWorkerNode(a: ModelArgs): boolean {
  return (a.nodeRank ?? 0) > 0;
}

/** The load options of the node flags. */
function nodeLoadOptions(a: ModelArgs): { nnodes?: number; nodeRank?: number; distInitAddr?: string; distTimeoutMs?: number; distToken?: string } {
  if (a.nodeRank !== undefined && a.nnodes === undefined) throw new UsageError("--node-rank goes with --nnodes N");
  if (a.distInitAddr !== undefined && a.nnodes === undefined) throw new UsageError("--dist-init-addr goes with --nnodes N");
  if (a.distToken !== undefined && a.nnodes === undefined) throw new UsageError("--dist-token goes with --nnodes N");
  if (Array.isArray(a.distToken)) throw new UsageError("--dist-token was given more than once");
  if (a.distToken === "") throw new UsageError("--dist-token is empty");
  if (a.nnodes === undefined) return {};
  const env = process.env.DS3_DIST_TOKEN;
  const distToken = a.distToken ?? (env !== undefined && env !== "" ? env : undefined);
  if (a.nnodes > 1 && a.distInitAddr === undefined) throw new UsageError(`--nnodes ${a.nnodes} needs --dist-init-addr HOST:PORT (where node 0 listens; the same on every node)`);
  if ((a.nodeRank ?? 0) >= a.nnodes) throw new UsageError(`--node-rank ${a.nodeRank} is not below --nnodes ${a.nnodes} (node ranks are 0 .. ${a.nnodes - 1})`);
  if (a.tp % a.nnodes !== 0) throw new UsageError(`--tp ${a.tp} is the total over all nodes and must divide by --nnodes ${a.nnodes} (each node runs tp/nnodes ranks)`);
  return {
    nnodes: a.nnodes,
    nodeRank: a.nodeRank ?? 0,
    ...(a.distInitAddr !== undefined && { distInitAddr: a.distInitAddr }),
    ...(a.distTimeout !== undefined && { distTimeoutMs: a.distTimeout * 1000 }),
    ...(distToken !== undefined && { distToken }),
  };
}

/**
 * A node other than node 0: run this node's ranks for node 0's engine until node 0 ends. Exits
 * normally when node 0 ends normally; an error (node 0 gone, a mismatch, a failure) is thrown.
 */
export async function runWorkerNode(a: ModelArgs): Promise<void> {
  const dir = modelDir(a.model);
  const backend = await getBackend(a.backend);
  const n = nodeLoadOptions(a);
  const k = n.nodeRank ?? 0;
  const per = a.tp / (n.nnodes ?? 1);
  const ranks = per === 1 ? `rank ${k}` : `ranks ${k * per}-${(k + 1) * per - 1}`;
  // one line says what this node does (no prompt, no port here); the steps of joining with --verbose
  notice(`node ${k} of ${n.nnodes}: ${ranks} on ${backend.name}${a.devices ? ` devices ${a.devices.join(",")}` : ""}, waiting for node 0 at ${a.distInitAddr}`);
  await DS3.runNode({
    ...(dir && { model: dir }),
    backend,
    tp: a.tp,
    ...n,
    ...(a.devices !== undefined && { devices: a.devices }),
    ...(a.shareDevices !== undefined && { shareDevices: a.shareDevices }),
    ...(a.cacheDtype !== undefined && { cacheDtype: a.cacheDtype as "f32" | "bf16" }),
    onProgress: (m) => ui.verbose && notice(m),
  });
  // node 0 ended normally: so does this node (exit 0)
  if (ui.verbose) notice(`node 0 ended: node ${k} stops`);
}

export const mtpOption: Record<string, Options> = {
  mtp: { type: "boolean", describe: "speculative decoding with the checkpoint's MTP layer" },
};

export const samplingOptions: Record<string, Options> = {
  temperature: { describe: "0 = greedy (default: generation_config.json, else greedy)", coerce: numFlag("temperature"), requiresArg: true },
  "top-p": { describe: "nucleus sampling: keep the smallest set with probability >= p", coerce: numFlag("top-p"), requiresArg: true },
  "top-k": { describe: "keep the k most likely tokens (0 or -1: all)", coerce: intFlag("top-k", -1), requiresArg: true },
  "min-p": { describe: "drop tokens below min-p x the top probability", coerce: numFlag("min-p"), requiresArg: true },
  "presence-penalty": { describe: "in [-2, 2]", coerce: numFlag("presence-penalty"), requiresArg: true },
  "frequency-penalty": { describe: "in [-2, 2]", coerce: numFlag("frequency-penalty"), requiresArg: true },
  "repetition-penalty": { describe: "> 0; 1 = none", coerce: numFlag("repetition-penalty"), requiresArg: true },
  seed: { describe: "random seed (same seed and inputs, same output)", coerce: intFlag("seed", 0), requiresArg: true },
  "max-tokens": { describe: "most tokens to generate", coerce: intFlag("max-tokens", 0), requiresArg: true },
  stop: { type: "string", array: true, describe: "stop string (repeatable); never printed", requiresArg: true },
  "stop-token-ids": { type: "string", describe: "comma-separated token ids that end the output", requiresArg: true },
  "ignore-eos": { type: "boolean", describe: "keep generating past the end-of-sequence token" },
};

/** The sampling flags as yargs parses them: core's SamplingParams, with stop ids still a comma list. */
export type SamplingArgs = Omit<SamplingParams, "stopTokenIds" | "logprobs"> & { stopTokenIds?: string };

const kebab = (s: string) => s.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);

/** The sampling flags given (only those: generation_config.json and greedy fill the rest). */
export function samplingFrom(a: SamplingArgs, defaults: { maxTokens?: number } = {}): SamplingParams {
  const p: SamplingParams = {};
  if (a.temperature !== undefined) p.temperature = a.temperature;
  if (a.topP !== undefined) p.topP = a.topP;
  if (a.topK !== undefined) p.topK = a.topK;
  if (a.minP !== undefined) p.minP = a.minP;
  if (a.presencePenalty !== undefined) p.presencePenalty = a.presencePenalty;
  if (a.frequencyPenalty !== undefined) p.frequencyPenalty = a.frequencyPenalty;
  if (a.repetitionPenalty !== undefined) p.repetitionPenalty = a.repetitionPenalty;
  if (a.seed !== undefined) p.seed = a.seed;
  const mt = a.maxTokens ?? defaults.maxTokens;
  if (mt !== undefined) p.maxTokens = mt;
  if (a.stop?.length) p.stop = a.stop.map(String);
  if (a.stopTokenIds !== undefined) p.stopTokenIds = parseIds(a.stopTokenIds, "--stop-token-ids");
  if (a.ignoreEos) p.ignoreEos = true;
  try {
    return validateSampling(p);
  } catch (e) {
    if (e instanceof SamplingError) throw new UsageError(`--${kebab(e.field)}: ${e.message.replace(/^sampling parameter "[^"]+"( \([^)]*\))?: /, "")}`);
    throw e;
  }
}

/** "1,2, 3" -> [1, 2, 3], with an error that names the flag and the bad entry. */
export function parseIds(s: string, what: string): number[] {
  const parts = String(s).split(",").map((x) => x.trim());
  if (parts.length === 1 && parts[0] === "") throw new UsageError(`${what}: no token ids given`);
  return parts.map((x, i) => {
    if (!/^\d+$/.test(x)) throw new UsageError(`${what}: "${x}" (entry ${i + 1}) is not a token id (ids are comma-separated non-negative integers)`);
    return Number(x);
  });
}

/** Resolve --model: a directory, "builtin", or undefined (the built-in model). */
export function modelDir(model: string | undefined): string | undefined {
  if (model === undefined) return undefined;
  if (model === "builtin" && !existsSync(model)) return undefined;
  const dir = resolve(model);
  if (!existsSync(dir)) throw new UsageError(`model directory not found: ${model}`, 1);
  if (!statSync(dir).isDirectory()) throw new UsageError(`--model must be a directory, ${model} is a file`, 1);
  if (!existsSync(join(dir, "config.json"))) throw new UsageError(`${model}: not a model directory (no config.json)`, 1);
  return dir;
}

export function builtinNotice(): void {
  notice("no --model given: running the built-in tiny DeepSeek-V3 (random weights, real tokenizer) - its output is noise. Use --model DIR for a real checkpoint.");
}

function checkpointBytes(dir: string): number {
  let n = 0;
  for (const f of readdirSync(dir)) if (f.endsWith(".safetensors")) n += statSync(join(dir, f)).size;
  return n;
}

/** Load a model for chat/generate/score/serve, with notices and progress on stderr. */
export async function loadModel(a: ModelArgs, o: { mtp?: boolean } = {}): Promise<DS3> {
  const dir = modelDir(a.model);
  const backend = await getBackend(a.backend);
  if (!dir) builtinNotice();
  const t0 = performance.now();
  let size = dir ? checkpointBytes(dir) : 0;
  let bar: ProgressBar | undefined;
  const onProgress = (m: string) => {
    if (m.startsWith("loading")) {
      if (!dir) size = checkpointBytes(builtinModelDir());
      notice(`${m} (${fmtBytes(size)} of weights)...`);
    } else notice(m);
  };
  const ds3 = await DS3.load({
    ...(dir && { model: dir }),
    backend,
    tp: a.tp,
    ...(a.devices !== undefined && { devices: a.devices }),
    ...(a.shareDevices !== undefined && { shareDevices: a.shareDevices }),
    ...(a.maxModelLen !== undefined && { maxModelLen: a.maxModelLen }),
    ...(a.cacheBlocks !== undefined && { cacheBlocks: a.cacheBlocks }),
    ...(a.cacheBytes !== undefined && { cacheBytes: a.cacheBytes }),
    ...(a.cacheDtype !== undefined && { cacheDtype: a.cacheDtype as "f32" | "bf16" }),
    ...(a.maxBatchTokens !== undefined && { maxBatchTokens: a.maxBatchTokens }),
    ...(a.prefillChunk !== undefined && { prefillChunk: a.prefillChunk }),
    ...(a.prefixCaching !== undefined && { prefixCaching: a.prefixCaching }),
    ...((o.mtp ?? a.mtp) && { speculative: { drafter: "mtp" as const } }),
    ...nodeLoadOptions(a),
    onProgress,
    onWarning: warn,
    onWeights: (done, total) => {
      // a bar on a terminal; in logs only for checkpoints big enough to take a while
      if (!bar && !process.stderr.isTTY && total < 2 ** 30) return;
      bar ??= new ProgressBar("loading weights", total);
      bar.update(done);
    },
  });
  bar?.finish();
  const tok = ds3.tokenizer;
  notice(
    `loaded ${ds3.modelName} in ${((performance.now() - t0) / 1000).toFixed(1)} s on ${ds3.executor.backendName}${a.tp > 1 ? ` x${a.tp}` : ""}${(a.nnodes ?? 1) > 1 ? ` over ${a.nnodes} nodes` : ""}` +
      (tok ? `; tokenizer: ${tok.source}` : "; no tokenizer (token ids only)"),
  );
  return ds3;
}

/** The tokenizer of --model (or the DeepSeek-V3 one the built-in model uses), without loading weights. */
export async function loadTokenizer(model: string | undefined): Promise<Tokenizer> {
  const dir = modelDir(model);
  if (dir && !existsSync(join(dir, "tokenizer.json"))) {
    const cfg = loadConfig(dir);
    if (cfg.vocabSize < 128815) throw new UsageError(`model ${model} has no tokenizer (no tokenizer.json, and its ${cfg.vocabSize}-row vocabulary is not DeepSeek-V3's)`, 1);
  }
  const tok = await Tokenizer.load(dir);
  notice(`tokenizer: ${tok.source}`);
  return tok;
}

/** Read a text file, or stdin for "-". */
export function readInput(path: string, what: string): string {
  try {
    return readFileSync(path === "-" ? 0 : path, "utf8");
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new UsageError(`${what}: ${code === "ENOENT" ? `file not found: ${path}` : code === "EISDIR" ? `${path} is a directory` : (e as Error).message}`, 1);
  }
}

/**
 * The positional text, also when given after "--" (for text that starts with "-"): yargs puts
 * what follows "--" into argv._ (after the command name), not into the positional.
 */
export function positionalText(a: { _?: Array<string | number> }, given: string | undefined): string | undefined {
  if (given !== undefined) return String(given);
  const rest = (a._ ?? []).slice(1);
  return rest.length ? rest.map(String).join(" ") : undefined;
}

export function withOptions<T>(y: Argv<T>, ...groups: Array<Record<string, Options>>): Argv<T> {
  let out = y;
  for (const g of groups) out = out.options(g) as Argv<T>;
  return out;
}

export type { Argv };
