// Does a placement plan fit its devices? Each rank's weight bytes (its slice of every tensor, read
// from the safetensors headers only) plus its latent cache, summed per device, against the
// device's memoryTotal. A plan that does not fit is refused before any weight is read, with the
// numbers (issue 9: "a plan for a checkpoint that does not fit is refused at load with the same
// numbers" as `ds3 inspect` prints).
//
// RankExecutor.create and the LocalExecutor constructor call checkRanksFit right after the
// placement, before any weight is read; across nodes each node checks its own ranks (node R when
// node 0's load reaches it: the cache size is node 0's). The CPU device's memoryTotal is the
// host's memory (os.totalmem()), shared by every CPU rank of the process.
import type { BackendProvider, DeviceInfo } from "./backend.js";
import type { ModelConfig } from "./config.js";
import { type CacheSpec, cacheBytesPerBlock } from "./executor.js";
import { Checkpoint } from "./safetensors.js";

/** How the ranks hold a checkpoint tensor: whole on every rank, split N ways, or one routed expert on one rank. */
export type TensorSplit = { split: "replicated" } | { split: "split" } | { split: "expert"; expert: number };

/** The split of one tensor by its name (a `_scale_inv` follows its weight). */
export function tensorSplit(name: string): TensorSplit {
  const base = name.replace(/_scale_inv$/, "");
  const e = /\.mlp\.experts\.(\d+)\./.exec(base);
  if (e) return { split: "expert", expert: Number(e[1]) };
  if (/(embed_tokens|lm_head|shared_head\.head)\.weight$/.test(base)) return { split: "split" };
  if (/self_attn\.(q_proj|q_b_proj|kv_b_proj|o_proj)\.weight$/.test(base)) return { split: "split" };
  if (/\.mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)\.weight$/.test(base)) return { split: "split" };
  return { split: "replicated" };
}

/** Weight bytes each of `worldSize` ranks holds (routed experts in contiguous runs of nRoutedExperts / worldSize). */
export function weightBytesPerRank(ck: Checkpoint, cfg: ModelConfig, worldSize: number, include: (name: string) => boolean = () => true): number[] {
  const per = new Array<number>(worldSize).fill(0);
  const expertsPerRank = cfg.nRoutedExperts / worldSize;
  for (const name of ck.names()) {
    if (!include(name)) continue;
    const b = ck.info(name).nbytes;
    const s = tensorSplit(name);
    if (s.split === "expert") per[Math.min(worldSize - 1, Math.floor(s.expert / expertsPerRank))]! += b;
    else for (let r = 0; r < worldSize; r++) per[r]! += s.split === "split" ? b / worldSize : b;
  }
  return per.map(Math.ceil);
}

/** What one rank needs on its device. */
export interface RankFootprint {
  rank: number;
  device: DeviceInfo;
  weightBytes: number;
  cacheBytes: number;
}

/** Each rank's footprint: its weights and the latent cache it allocates (every rank holds the whole cache of its heads' latents). */
export function planFootprint(ck: Checkpoint, cfg: ModelConfig, devices: readonly DeviceInfo[], cache: CacheSpec, mtp = false): RankFootprint[] {
  const w = weightBytesPerRank(ck, cfg, devices.length);
  const cacheBytes = cache.numBlocks * cacheBytesPerBlock(cfg, cache.blockSize, cache.dtype, mtp && cfg.nMtpLayers > 0);
  return devices.map((device, rank) => ({ rank, device, weightBytes: w[rank]!, cacheBytes }));
}

export class FitError extends Error {
  override name = "FitError";
  constructor(
    message: string,
    /** the devices that do not fit: their ranks, the bytes they need, the bytes they have */
    readonly devices: Array<{ device: DeviceInfo; ranks: number[]; needBytes: number; totalBytes: number }>,
  ) {
    super(message);
  }
}

/** bytes for messages: GiB from 1 GiB up (the plans of real checkpoints), MiB / KiB below (tiny models) */
const gib = (b: number) => (b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(2)} GiB` : b >= 2 ** 20 ? `${(b / 2 ** 20).toFixed(2)} MiB` : `${(b / 2 ** 10).toFixed(2)} KiB`);

/**
 * Refuses a plan whose weights + cache exceed some device's memoryTotal (ranks sharing a device
 * add up), naming each such device with its ranks and numbers. A device whose memoryTotal is
 * not a positive finite number is not checked (the backend cannot tell).
 */
export function checkPlanFits(plan: readonly RankFootprint[], backend = "the backend"): void {
  const byDevice = new Map<number, { device: DeviceInfo; ranks: RankFootprint[] }>();
  for (const r of plan) {
    const d = byDevice.get(r.device.index) ?? { device: r.device, ranks: [] };
    d.ranks.push(r);
    byDevice.set(r.device.index, d);
  }
  const over: FitError["devices"] = [];
  for (const { device, ranks } of byDevice.values()) {
    if (!(device.memoryTotal > 0 && Number.isFinite(device.memoryTotal))) continue;
    const need = ranks.reduce((a, r) => a + r.weightBytes + r.cacheBytes, 0);
    if (need > device.memoryTotal) over.push({ device, ranks: ranks.map((r) => r.rank), needBytes: need, totalBytes: device.memoryTotal });
  }
  if (!over.length) return;
  const lines = over.map(({ device, ranks, needBytes, totalBytes }) => {
    const rs = plan.filter((r) => ranks.includes(r.rank));
    const w = rs.reduce((a, r) => a + r.weightBytes, 0);
    const c = rs.reduce((a, r) => a + r.cacheBytes, 0);
    return `device ${device.index} (${device.name}) holds rank${ranks.length > 1 ? "s" : ""} ${ranks.join(", ")}: ${gib(w)} of weights + ${gib(c)} of latent cache = ${gib(needBytes)}, more than its ${gib(totalBytes)}`;
  });
  throw new FitError(
    `the placement plan does not fit on ${backend}: ${lines.join("; ")} (more ranks (--tp), fewer cache blocks (--cache-blocks / --cache-bytes), a bf16 cache, or devices with more memory)`,
    over,
  );
}

/**
 * Refuse (FitError) a plan whose ranks do not fit their devices, before any weight is read: ranks
 * [first, first + devices.length) of a world of `worldSize`, rank first + i on device devices[i]
 * (indices into provider.devices()). Reads only the checkpoint's headers. The MTP layer's
 * weights count only when it is loaded (`mtp`). `ck`: the open checkpoint, or its directory; a
 * directory whose headers do not open is not checked here (the ranks report the loader's error).
 */
export function checkRanksFit(o: {
  provider: BackendProvider;
  ck: Checkpoint | string;
  cfg: ModelConfig;
  worldSize: number;
  first?: number;
  devices: readonly number[];
  cache: CacheSpec;
  mtp?: boolean;
}): void {
  if (typeof o.ck === "string") {
    let ck: Checkpoint;
    try {
      ck = Checkpoint.open(o.ck);
    } catch {
      return;
    }
    try {
      return checkRanksFit({ ...o, ck });
    } finally {
      ck.close();
    }
  }
  const { provider, ck, cfg, worldSize, cache } = o;
  const first = o.first ?? 0;
  const mtp = !!o.mtp && cfg.nMtpLayers > 0;
  const infos = provider.devices();
  // the MTP block's tensors are layers nLayers and up
  const include = (name: string) => {
    const m = /^model\.layers\.(\d+)\./.exec(name);
    return mtp || !m || Number(m[1]) < cfg.nLayers;
  };
  const w = weightBytesPerRank(ck, cfg, worldSize, include);
  const cacheBytes = cache.numBlocks * cacheBytesPerBlock(cfg, cache.blockSize, cache.dtype, mtp);
  const plan: RankFootprint[] = [];
  o.devices.forEach((d, i) => {
    const device = infos.find((x) => x.index === d);
    if (device) plan.push({ rank: first + i, device, weightBytes: w[first + i]!, cacheBytes });
  });
  checkPlanFits(plan, `backend "${provider.name}"`);
}
