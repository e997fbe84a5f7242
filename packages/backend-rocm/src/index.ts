// @ds3/backend-rocm — the ROCm backend: @ds3/backend-cuda's GPU op table (`@ds3/backend-cuda/gpu`, one
// implementation for both vendors) around ds3_rocm.node, which hipcc builds from the CUDA backend's
// kernel sources. What is ROCm's own is data: the addon's name, the device lines of its probe (gfx
// target, memory), and which precisions each AMD target runs (FP8 as the device computes it).
import { accessSync, constants, existsSync } from "node:fs";
import type { ActQuant, DeviceInfo, Precision } from "@ds3/core";
import {
  GpuContext,
  gpuBackend,
  gibOf,
  type GpuBackend,
  type GpuBackendOptions,
  type GpuDevice,
  type GpuVendor,
  type Native,
  type NativeLoader,
  type ProbeResult,
} from "@ds3/backend-cuda/gpu";

export type { DeviceSampling, GemvTuning, GpuDevice, GraphStats, ProbeResult, ProfileEntry } from "@ds3/backend-cuda/gpu";
export { GpuContext, SyntheticSource, type SyntheticHostWeight } from "@ds3/backend-cuda/gpu";

/** An AMD target the kernels are built for, and what it computes. */
export interface RocmTarget {
  /** the Instinct parts of this target */
  family: string;
  /** the FP8 format of its matrix cores (null: none) */
  fp8: "e4m3fnuz" | "e4m3fn" | null;
  /** the activation-quantization modes it runs: FP8 only in the device's own format */
  actQuant: readonly ActQuant[];
  /** how DeepSeek's FP8 (OCP e4m3fn) weights are held there */
  weights: string;
}

/**
 * The targets of this backend (wave 64 all three). gfx942 computes FP8 in e4m3fnuz (bias 8, max 240):
 * the checkpoint's e4m3fn weights are converted at load (byte 0x80 -> 0, other bytes unchanged, block
 * scales doubled; the dequantized values are the same) and activations are quantized with max 240, so
 * its FP8 mode is "fp8-fnuz", which the CPU backend emulates exactly. gfx950 computes OCP e4m3fn as
 * the checkpoint stores it ("fp8", "fp8-ue8m0"). gfx90a has no FP8: BF16 matrix cores on dequantized
 * weights, so no FP8 activation mode.
 */
export const ROCM_TARGETS: Readonly<Record<string, RocmTarget>> = {
  gfx90a: { family: "MI200 (MI210, MI250, MI250X)", fp8: null, actQuant: ["none"], weights: "e4m3fn bytes, decoded to f32/bf16 in the kernels (no FP8 matrix cores)" },
  gfx942: { family: "MI300 (MI300X, MI300A, MI325X)", fp8: "e4m3fnuz", actQuant: ["none", "fp8-fnuz"], weights: "e4m3fnuz: converted at load (0x80 -> 0, scales doubled)" },
  gfx950: { family: "MI350 (MI350X, MI355X)", fp8: "e4m3fn", actQuant: ["none", "fp8", "fp8-ue8m0"], weights: "e4m3fn, as stored" },
};

/** the FP8 activation mode device `arch` computes natively ("fp8-fnuz" on gfx942, "fp8" on gfx950), or null (gfx90a, unknown) */
export function fp8Mode(arch: string): ActQuant | null {
  const t = ROCM_TARGETS[arch];
  return t?.actQuant.find((q) => q !== "none" && q !== "fp8-ue8m0") ?? null;
}

function fmtGiB(bytes: number): string {
  const g = bytes / 2 ** 30;
  return `${g >= 10 ? Math.round(g) : Number(g.toFixed(1))} GiB`;
}

export interface RocmBackendOptions extends GpuBackendOptions {
  /**
   * Capture repeated step segments as HIP graphs and replay them (default: on; $DS3_ROCM_GRAPHS=0 turns
   * it off). Results are identical either way.
   */
  graphs?: boolean;
  /** collectives through RCCL when the addon has it and there is more than one rank (default: on; $DS3_RCCL=0: host) */
  nccl?: boolean;
}

/** Why the HIP runtime sees no device, where the machine can tell (the driver's node, its permissions, the visibility variables). */
export function noDeviceHint(): string | null {
  const vis = ["HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"].filter((k) => process.env[k] !== undefined).map((k) => `${k}=${process.env[k]}`);
  const why: string[] = [];
  if (!existsSync("/dev/kfd")) why.push("no /dev/kfd: the amdgpu kernel driver is not loaded here, or a container was started without --device=/dev/kfd --device=/dev/dri");
  else {
    try {
      accessSync("/dev/kfd", constants.R_OK | constants.W_OK);
    } catch {
      why.push("/dev/kfd is not readable and writable by this user: add it to the render and video groups");
    }
  }
  if (vis.length) why.push(`${vis.join(", ")} may hide the devices`);
  return why.length ? why.join("; ") : null;
}

export const rocmVendor: GpuVendor = {
  name: "rocm",
  label: "ROCm",
  pkg: "@ds3/backend-rocm",
  addon: "ds3_rocm.node",
  addonEnv: "DS3_ROCM_ADDON",
  base: import.meta.url,
  graphsEnv: "DS3_ROCM_GRAPHS",
  collEnv: "DS3_RCCL",
  perDevice: true,
  hint(reason: string): string | null {
    return /hipErrorNoDevice|no ROCm devices|hipErrorInvalidDevice|hipErrorNotInitialized/.test(reason) ? noDeviceHint() : null;
  },
  /**
   * "rocm:0 AMD Instinct MI300X (gfx942:sramecc+:xnack-, 191.5 GiB, 304 CUs, wave64, fp8 e4m3fnuz)" ->
   * index 0, name "AMD Instinct MI300X (gfx942, 192 GiB)", arch "gfx942". The HIP runtime applies
   * HIP_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES itself: the indices are the visible devices.
   */
  device(line: string, i: number): GpuDevice {
    const m = /^\w+:(\d+) ?(.*?)(?: \(([^()]*)\))?$/.exec(line);
    const arch = /\bgfx[0-9a-f]+/.exec(line)?.[0] ?? "";
    const memoryTotal = gibOf(line);
    const base = (m?.[2] ?? "").trim() || "AMD GPU";
    const info = [arch, Number.isFinite(memoryTotal) ? fmtGiB(memoryTotal) : ""].filter(Boolean).join(", ");
    return { index: m ? Number(m[1]) : i, name: info ? `${base} (${info})` : base, memoryTotal, memoryFree: NaN, label: line, arch };
  },
  deviceError(d: GpuDevice, nat: Native): string | null {
    const built = typeof nat.targets === "string" ? nat.targets.split(/[;,]/) : nat.targets;
    if (!d.arch) return `${d.label}: the probe does not name the device's gfx target`;
    if (!ROCM_TARGETS[d.arch]) return `${d.label} is not a target of @ds3/backend-rocm (${Object.keys(ROCM_TARGETS).join(", ")})`;
    if (built && !built.includes(d.arch)) return `${d.label} has no code object in this build (built for ${built.join(", ")})`;
    return null;
  },
  precisionError(d: GpuDevice | null, p: Precision): string | null {
    const where = d ? `${d.label.split(" (")[0]} (${d.arch})` : "ROCm";
    if (p.activations !== "f32" && p.activations !== "bf16") return `${where}: activations "${p.activations}" are not supported (f32, bf16)`;
    if (p.cache !== "f32" && p.cache !== "bf16") return `${where}: cache "${p.cache}" is not supported (f32, bf16)`;
    const t = d ? ROCM_TARGETS[d.arch] : undefined;
    if (!d || !t) return `${where}: not a target of @ds3/backend-rocm (${Object.keys(ROCM_TARGETS).join(", ")})`;
    if (!t.actQuant.includes(p.actQuant)) {
      const own = fp8Mode(d.arch);
      const fmt = t.fp8 ? `computes FP8 as ${t.fp8}` : "has no FP8 matrix cores (BF16 on dequantized weights)";
      return `${where} ${fmt}: actQuant "${String(p.actQuant)}" is not supported there (${t.actQuant.map((q) => `"${q}"`).join(", ")}${own ? `; its FP8 mode is "${own}"` : ""})`;
    }
    return null;
  },
};

export class RocmContext extends GpuContext {
  constructor(opts: RocmBackendOptions = {}, load?: NativeLoader) {
    super(rocmVendor, opts, load);
  }
}

/**
 * The ROCm backend over a given addon. The default is ds3_rocm.node as built (`rocm` below); tests
 * pass a stand-in that reports chosen devices, to check this layer's choices per gfx target.
 */
export function rocmBackend(load?: NativeLoader): GpuBackend {
  return gpuBackend(rocmVendor, load, (opts) => new RocmContext(opts, load));
}

const backend = rocmBackend();

/** Probe the HIP runtime and devices without creating a context (never throws). */
export function probe(): ProbeResult {
  return backend.probe();
}

export function createRocmBackend(opts?: RocmBackendOptions): RocmContext {
  return backend.create(opts) as RocmContext;
}

/** The probe's devices as DeviceInfo (name with gfx target and memory; free memory unknown: NaN). */
export function rocmDevices(p: ProbeResult = probe()): DeviceInfo[] {
  if (!p.ok) return [];
  return backend.devices(p).map(({ index, name, memoryTotal, memoryFree }) => ({ index, name, memoryTotal, memoryFree }));
}

/** The provider `rocm`: every op of the contract on gfx90a / gfx942 / gfx950 at the precisions each runs. */
export const rocm = backend.provider;

export default rocm;
