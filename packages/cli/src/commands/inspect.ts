// ds3 inspect: which backends are here (and why not the others); for a model, its layers,
// parameters (total / active per token), dtypes and the bytes each rank holds.
import type { Argv } from "yargs";
import { Checkpoint, DTYPE_SIZE, type ModelConfig, cacheBytesPerBlock, checkParallel, ensureBuiltinModel, loadConfig, parseDeviceList, placeRanks } from "@ds3/core";
import { getBackend, probeAll } from "../backends.js";
import { intFlag, modelDir } from "../common.js";
import { fmtBytes, fmtCount, notice, UsageError } from "../ui.js";

interface Args {
  model?: string;
  tp?: number;
  nnodes?: number;
  devices?: string;
  shareDevices?: boolean;
  backend?: string;
  cacheBlocks?: number;
  json?: boolean;
}

export const command = "inspect";
export const describe = "backends found (and why not the others); with --model: layers, parameters, dtypes, bytes per rank";

export function builder(y: Argv): Argv {
  return y
    .options({
      model: { type: "string", describe: 'checkpoint directory to describe ("builtin": the built-in model)', requiresArg: true },
      tp: { describe: "tensor/expert parallel size for the bytes-per-rank figure (default: 1, 2, 4, 8)", coerce: intFlag("tp", 1), requiresArg: true },
      devices: { type: "string", describe: "with --model and --tp: the device per rank for the placement plan (default: rank r on device r); with --nnodes, per node", requiresArg: true },
      nnodes: { describe: "with --model and --tp: the plan over N nodes (tp/N ranks each, node-major; every node assumed to have this machine's devices)", coerce: intFlag("nnodes", 1), requiresArg: true },
      "share-devices": { type: "boolean", describe: "with --devices: let ranks share a device (testing)" },
      backend: { type: "string", describe: "with --model and --tp: the backend whose devices the plan uses (default: auto)", requiresArg: true },
      "cache-blocks": { describe: "with the plan: latent cache blocks of 64 tokens per rank (default: as ds3 serve, 4 x min(model, 4096) tokens)", coerce: intFlag("cache-blocks", 1), requiresArg: true },
      json: { type: "boolean", describe: "print one JSON object" },
    })
    .example("$0 inspect", "backends")
    .example("$0 inspect --model DeepSeek-V3 --tp 8", "")
    .example("$0 inspect --model DeepSeek-V3 --tp 16 --nnodes 2", "the plan over two 8-GPU nodes");
}

type Split = "replicated" | "split" | "expert";

function classify(name: string): { split: Split; expert?: number } {
  const e = /\.mlp\.experts\.(\d+)\./.exec(name);
  if (e) return { split: "expert", expert: Number(e[1]) };
  if (/(embed_tokens|lm_head|shared_head\.head)\.weight/.test(name)) return { split: "split" };
  if (/self_attn\.(q_proj|q_b_proj|kv_b_proj|o_proj)\.weight/.test(name)) return { split: "split" };
  if (/\.mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight/.test(name)) return { split: "split" };
  return { split: "replicated" };
}

interface ModelReport {
  dir: string;
  config: Record<string, unknown>;
  layers: { total: number; dense: number; moe: number; mtp: number };
  parameters: { total: number; active: number; mtp: number; mtpActive: number };
  dtypes: Record<string, { tensors: number; parameters: number; bytes: number }>;
  bytes: number;
  kvCacheBytesPerToken: { f32: number; bf16: number };
  ranks: Array<{ tp: number; ok: boolean; reason?: string; bytesPerRank?: number; perRank?: number[] }>;
  plan?: RankPlan[];
}

/** One rank of a placement plan: what it holds, on which device, and whether it fits. */
interface RankPlan {
  rank: number;
  /** with --nnodes: the node the rank runs on */
  node?: number;
  device: { index: number; name: string; memoryFree: number | null };
  heads: [number, number];
  experts: [number, number];
  vocabRows: [number, number];
  weightBytes: number;
  cacheBytes: number;
  /** null: the backend cannot tell the device's free memory */
  fits: boolean | null;
}

function describeModel(dir: string, tps: number[]): ModelReport {
  const cfg = loadConfig(dir);
  const ck = Checkpoint.open(dir);
  try {
    const dtypes: ModelReport["dtypes"] = {};
    const p = { total: 0, active: 0, mtp: 0, mtpActive: 0 };
    let bytes = 0;
    const tensors: Array<{ name: string; bytes: number }> = [];
    for (const name of ck.names()) {
      const ti = ck.info(name);
      const n = ti.shape.reduce((a, b) => a * b, 1);
      const d = (dtypes[ti.dtype] ??= { tensors: 0, parameters: 0, bytes: 0 });
      d.tensors++;
      d.bytes += ti.nbytes;
      bytes += ti.nbytes;
      tensors.push({ name, bytes: ti.nbytes });
      if (name.endsWith("_scale_inv")) continue;
      d.parameters += n;
      const layer = /^model\.layers\.(\d+)\./.exec(name);
      const isMtp = layer !== null && Number(layer[1]) >= cfg.nLayers;
      const act = classify(name).split === "expert" ? (n * cfg.nActivatedExperts) / cfg.nRoutedExperts : n;
      if (isMtp) {
        p.mtp += n;
        p.mtpActive += act;
      } else {
        p.total += n;
        p.active += act;
      }
    }
    const ranks = tps.map((tp) => {
      try {
        checkParallel(cfg, tp);
      } catch (e) {
        return { tp, ok: false, reason: (e as Error).message };
      }
      const per = new Array<number>(tp).fill(0);
      const perRank = cfg.nRoutedExperts / tp;
      for (const t of tensors) {
        const base = t.name.replace(/_scale_inv$/, "");
        const c = classify(base);
        if (c.split === "expert") per[Math.floor(c.expert! / perRank)]! += t.bytes;
        else for (let r = 0; r < tp; r++) per[r]! += c.split === "split" ? t.bytes / tp : t.bytes;
      }
      return { tp, ok: true, bytesPerRank: Math.ceil(Math.max(...per)), perRank: per.map(Math.ceil) };
    });
    const raw = { ...cfg } as unknown as Record<string, unknown>;
    return {
      dir,
      config: raw,
      layers: { total: cfg.nLayers, dense: cfg.nDenseLayers, moe: cfg.nLayers - cfg.nDenseLayers, mtp: cfg.nMtpLayers },
      parameters: { total: p.total, active: Math.round(p.active), mtp: p.mtp, mtpActive: Math.round(p.mtpActive) },
      dtypes,
      bytes,
      kvCacheBytesPerToken: { f32: cacheBytesPerBlock(cfg, 1, "f32", false), bf16: cacheBytesPerBlock(cfg, 1, "bf16", false) },
      ranks,
    };
  } finally {
    ck.close();
  }
}

function summary(cfg: ModelConfig): string {
  const q = cfg.quantization ? `FP8 ${cfg.quantization.fmt} ${cfg.quantization.blockSize.join("x")} blocks` : "none (BF16)";
  return [
    `  hidden ${cfg.dim}, ${cfg.nHeads} heads, q_lora ${cfg.qLoraRank || "none"}, kv_lora ${cfg.kvLoraRank}, head dims nope ${cfg.qkNopeHeadDim} / rope ${cfg.qkRopeHeadDim} / v ${cfg.vHeadDim}`,
    `  experts: ${cfg.nRoutedExperts} routed (${cfg.nActivatedExperts} per token, ${cfg.nExpertGroups} groups, top ${cfg.nLimitedGroups}; ${cfg.scoreFunc}, ${cfg.topkMethod}), ${cfg.nSharedExperts} shared; dense inter ${cfg.interDim}, expert inter ${cfg.moeInterDim}`,
    `  vocab ${cfg.vocabSize}, max positions ${cfg.maxPositionEmbeddings}, rope ${cfg.ropeScaling.type === "yarn" ? `YaRN x${cfg.ropeScaling.factor}` : "plain"}; quantization: ${q}`,
  ].join("\n");
}

export async function handler(a: Args): Promise<void> {
  const backends = await probeAll();
  let model: ModelReport | null = null;
  let cfg: ModelConfig | null = null;
  if (a.model !== undefined) {
    const dir = modelDir(a.model) ?? (await ensureBuiltinModel({ onProgress: notice }));
    cfg = loadConfig(dir);
    model = describeModel(dir, a.tp !== undefined ? [a.tp] : [1, 2, 4, 8]);
  }
  if (model && cfg && (a.devices !== undefined || a.shareDevices || a.backend !== undefined) && a.tp === undefined) throw new UsageError("--devices, --share-devices and --backend make a placement plan: give --tp N too", 2);
  if (a.nnodes !== undefined && (a.tp === undefined || !model)) throw new UsageError("--nnodes makes a placement plan: give --model DIR and --tp N too", 2);
  if (a.nnodes !== undefined && a.tp! % a.nnodes !== 0) throw new UsageError(`--tp ${a.tp} is the total over all nodes and must divide by --nnodes ${a.nnodes}`, 2);
  if (model && cfg && a.tp !== undefined && model.ranks[0]?.ok) {
    const provider = await getBackend(a.backend ?? "auto");
    const tp = a.tp;
    const nnodes = a.nnodes ?? 1;
    const perNode = tp / nnodes;
    let devices: number[] | undefined;
    try {
      devices = a.devices !== undefined ? parseDeviceList(a.devices) : undefined;
    } catch (e) {
      throw new UsageError((e as Error).message, 2);
    }
    // each node places its own tp/nnodes ranks on its devices (the same plan on every node)
    const pl = placeRanks(provider, perNode, { devices, shareDevices: a.shareDevices });
    const blocks = a.cacheBlocks ?? Math.max(16, Math.ceil(Math.min(cfg.maxPositionEmbeddings, 4096) / 64) * 4);
    const cacheBytes = blocks * cacheBytesPerBlock(cfg, 64, "f32", false);
    const per = model.ranks[0]!.perRank!;
    const used = new Map<number, number>(); // bytes per device, when ranks share one
    const key = (r: number) => Math.floor(r / perNode) * 1e6 + pl.devices[r % perNode]!; // (node, device)
    per.forEach((b, r) => used.set(key(r), (used.get(key(r)) ?? 0) + b + cacheBytes));
    const range = (n: number, r: number): [number, number] => [(r * n) / tp, ((r + 1) * n) / tp];
    model.plan = per.map((b, r) => {
      const d = pl.info[r % perNode]!;
      const free = Number.isFinite(d.memoryFree) ? d.memoryFree : null;
      return {
        rank: r,
        ...(nnodes > 1 && { node: Math.floor(r / perNode) }),
        device: { index: d.index, name: d.name, memoryFree: free },
        heads: range(cfg!.nHeads, r),
        experts: range(cfg!.nRoutedExperts, r),
        vocabRows: [Math.floor((r * cfg!.vocabSize) / tp), Math.floor(((r + 1) * cfg!.vocabSize) / tp)],
        weightBytes: b,
        cacheBytes,
        fits: free === null ? null : used.get(key(r))! <= free,
      };
    });
  }
  if (a.json) {
    process.stdout.write(
      JSON.stringify({
        backends: backends.map((b) => ({ name: b.name, package: b.package, available: b.ok, ...(b.devices && { devices: b.devices }), ...(b.reason && { reason: b.reason }) })),
        ...(model && { model }),
      }) + "\n",
    );
    return;
  }
  const lines: string[] = ["backends:"];
  for (const b of backends) lines.push(`  ${b.name.padEnd(7)} ${b.ok ? `available: ${b.devices?.join(", ")}` : `not available: ${b.reason}`}`);
  if (model && cfg) {
    const m = model;
    lines.push(`model: ${m.dir}`);
    lines.push(`  layers: ${m.layers.total} (${m.layers.dense} dense + ${m.layers.moe} MoE)${m.layers.mtp ? ` + ${m.layers.mtp} MTP` : ""}`);
    lines.push(summary(cfg));
    lines.push(
      `  parameters: ${fmtCount(m.parameters.total)} total, ${fmtCount(m.parameters.active)} active per token` +
        (m.parameters.mtp ? `; MTP ${fmtCount(m.parameters.mtp)} (${fmtCount(m.parameters.mtpActive)} active)` : ""),
    );
    lines.push(`  weights: ${fmtBytes(m.bytes)}`);
    for (const [dt, d] of Object.entries(m.dtypes).sort((x, y) => y[1].bytes - x[1].bytes))
      lines.push(`    ${dt.padEnd(8)} ${String(d.tensors).padStart(6)} tensors  ${fmtCount(d.parameters).padStart(9)} values  ${fmtBytes(d.bytes).padStart(10)}  (${DTYPE_SIZE[dt as keyof typeof DTYPE_SIZE]} B each)`);
    lines.push(`  KV (latent) cache per token: ${fmtBytes(m.kvCacheBytesPerToken.f32)} fp32, ${fmtBytes(m.kvCacheBytesPerToken.bf16)} bf16 (all layers)`);
    lines.push("  weights per rank (tensor parallel attention/dense/shared, expert parallel routed experts, vocab parallel embedding/head):");
    for (const r of m.ranks) lines.push(`    tp ${String(r.tp).padEnd(3)} ${r.ok ? fmtBytes(r.bytesPerRank!) : `not possible: ${r.reason}`}`);
    if (m.plan) {
      const nn = a.nnodes ?? 1;
      lines.push(
        `  placement plan (tp ${m.plan.length}${nn > 1 ? ` over ${nn} nodes, ${m.plan.length / nn} ranks each, every node assumed to have this machine's devices` : ""}, latent cache ${fmtBytes(m.plan[0]!.cacheBytes)} per rank in fp32):`,
      );
      for (const p of m.plan)
        lines.push(
          `    ${p.node !== undefined ? `node ${p.node} ` : ""}rank ${p.rank}: device ${p.device.index} (${p.device.name}); heads ${p.heads[0]}-${p.heads[1] - 1}, experts ${p.experts[0]}-${p.experts[1] - 1}, vocab rows ${p.vocabRows[0]}-${p.vocabRows[1] - 1}; ` +
            `weights ${fmtBytes(p.weightBytes)} + cache ${fmtBytes(p.cacheBytes)}; ` +
            (p.fits === null ? "free memory unknown" : `${p.fits ? "fits" : "does NOT fit"} in ${fmtBytes(p.device.memoryFree!)} free`),
        );
    }
  }
  process.stdout.write(lines.join("\n") + "\n");
}
