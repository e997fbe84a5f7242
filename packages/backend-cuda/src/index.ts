// @ds3/backend-cuda — the CUDA backend: the shared GPU op table (gpu-provider.ts, also used by
// @ds3/backend-rocm) around ds3_cuda.node, and what is CUDA's own: the addon's name, the device lines
// of its probe, and the precisions NVIDIA GPUs run.
import type { DeviceInfo, Precision } from "@ds3/core";
import { GpuContext, gpuBackend, gibOf, type GpuBackendOptions, type GpuDevice, type GpuVendor, type ProbeResult } from "./gpu-provider.js";

export type { GemvTuning, GraphStats, ProfileEntry, ProbeResult } from "./native.js";
export type { DeviceSampling, GpuDevice } from "./gpu-provider.js";
export { GpuContext } from "./gpu-provider.js";
export { SyntheticSource, type SyntheticHostWeight } from "./synthetic.js";

export interface CudaBackendOptions extends GpuBackendOptions {
  /**
   * Capture repeated step segments (decode steps per batch size) as CUDA graphs and replay them
   * (default: on; $DS3_CUDA_GRAPHS=0 turns it off). Results are identical either way.
   */
  graphs?: boolean;
  /** collectives through NCCL when the addon has it and there is more than one rank (default: on; $DS3_NCCL=0: host) */
  nccl?: boolean;
}

const CUDA_ACT_QUANT = ["none", "fp8", "fp8-ue8m0"];

export const cudaVendor: GpuVendor = {
  name: "cuda",
  label: "CUDA",
  pkg: "@ds3/backend-cuda",
  addon: "ds3_cuda.node",
  addonEnv: "DS3_CUDA_ADDON",
  base: import.meta.url,
  graphsEnv: "DS3_CUDA_GRAPHS",
  collEnv: "DS3_NCCL",
  /** "cuda:0 NVIDIA H100 80GB HBM3 (compute capability 9.0, 79.1 GiB, 132 SMs)" */
  device(line: string, i: number): GpuDevice {
    const m = /^cuda:(\d+) (.*?) \(/.exec(line);
    const cc = /compute capability (\d+)\.(\d+)/.exec(line);
    return {
      index: m ? Number(m[1]) : i,
      name: m ? m[2]! : line,
      memoryTotal: m ? gibOf(line) : NaN,
      memoryFree: NaN,
      label: line,
      arch: cc ? `sm_${cc[1]}${cc[2]}` : "",
    };
  },
  /** every op, `sample` included, at every precision of the contract but AMD's e4m3fnuz, on every device */
  precisionError(_d: GpuDevice | null, p: Precision): string | null {
    if (p.activations !== "f32" && p.activations !== "bf16") return `CUDA: activations "${p.activations}" are not supported (f32, bf16)`;
    if (p.cache !== "f32" && p.cache !== "bf16") return `CUDA: cache "${p.cache}" is not supported (f32, bf16)`;
    if (!CUDA_ACT_QUANT.includes(p.actQuant))
      return p.actQuant === "fp8-fnuz"
        ? `CUDA: actQuant "fp8-fnuz" is AMD MI300's e4m3fnuz; NVIDIA GPUs compute OCP e4m3fn (actQuant "fp8" or "fp8-ue8m0")`
        : `CUDA: actQuant "${String(p.actQuant)}" is not supported (${CUDA_ACT_QUANT.join(", ")})`;
    return null;
  },
};

export class CudaContext extends GpuContext {
  constructor(opts: CudaBackendOptions = {}) {
    super(cudaVendor, opts);
  }
}

const backend = gpuBackend(cudaVendor, undefined, (opts) => new CudaContext(opts));

/** Probe the driver and devices without creating a context (never throws). */
export function probe(): ProbeResult {
  return backend.probe();
}

export function createCudaBackend(opts?: CudaBackendOptions): CudaContext {
  return new CudaContext(opts);
}

/**
 * The probe's devices as DeviceInfo. The CUDA runtime applies CUDA_VISIBLE_DEVICES itself: the
 * indices here are the visible devices, renumbered from 0, which is what `device` takes. Free
 * memory needs a context on each device, so it is NaN here (unknown).
 */
export function cudaDevices(p: ProbeResult = probe()): DeviceInfo[] {
  if (!p.ok) return [];
  return backend.devices(p).map(({ index, name, memoryTotal, memoryFree }) => ({ index, name, memoryTotal, memoryFree }));
}

export const cuda = backend.provider;

export default cuda;
