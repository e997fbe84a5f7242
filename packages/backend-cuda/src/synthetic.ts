// Random weights generated on the GPU from a seed (benchmarks at full DeepSeek-V3 width, where no
// checkpoint can be downloaded and nothing large should cross from the host), by any GPU backend of
// the shared layer (gpu-provider.ts: CUDA and ROCm build the same generator). The dtypes follow the
// released checkpoint: FP8 e4m3 with 128x128 block scales for the projections and experts, BF16 for
// the embedding, the head and the router; norms are ones; the routing bias is zero, so a random router
// spreads tokens evenly over the experts.
import type { HostWeight, ModelConfig, RankInfo, Split, WeightDType, WeightSource } from "@ds3/core";

export interface SyntheticHostWeight extends HostWeight {
  /** the backend generates the data on the device: uniform in [-amp, amp) (amp < 0: ones) */
  init: { seed: number; amp: number };
}

function hash(s: string, seed: number): number {
  let h = (seed ^ 0x811c9dc5) >>> 0;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

export class SyntheticSource implements WeightSource {
  constructor(
    readonly cfg: ModelConfig,
    readonly seed = 1,
    readonly rank: RankInfo = { rank: 0, worldSize: 1 },
  ) {}

  has(_name: string): boolean {
    return true;
  }

  dtypeOf(name: string): WeightDType {
    if (/norm\.weight$/.test(name)) return "f32";
    if (/embed_tokens\.weight$|lm_head\.weight$|shared_head\.head\.weight$|\.mlp\.gate\.weight$/.test(name)) return "bf16";
    return "f8_e4m3";
  }

  host(name: string, shape: [number, number] | [number], split: Split = "none"): HostWeight {
    const R = shape.length === 1 ? 1 : shape[0];
    const C = shape.length === 1 ? shape[0] : shape[1]!;
    const { rank, worldSize: ws } = this.rank;
    const rows = split === "rows" && ws > 1 ? R / ws : R;
    const cols = split === "cols" && ws > 1 ? C / ws : C;
    const dtype = this.dtypeOf(name);
    const embed = /embed_tokens\.weight$/.test(name);
    const amp = dtype === "f32" ? -1 : embed ? 1 : Math.sqrt(3 / C);
    const w: SyntheticHostWeight = {
      name,
      dtype,
      shape: [rows, cols],
      data: new Uint8Array(0),
      init: { seed: hash(`${name}#${rank}`, this.seed), amp },
    };
    return w;
  }

  vector(_name: string, n: number): Float32Array {
    return new Float32Array(n);
  }
}
