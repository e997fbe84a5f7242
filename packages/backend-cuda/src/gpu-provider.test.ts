// The shared GPU layer (gpu-provider.ts, `@ds3/backend-cuda/gpu`) with the CUDA vendor's data, driven by
// a stand-in addon on any machine: what it asks of the addon (device, actQuant code, graphs), how it
// reads the probe's device lines, which precisions it accepts, and its checks on tensors. The stand-in
// computes nothing; the kernels are checked on the GPU machine (scripts/gpu-check.mjs).
import type { Precision } from "@ds3/core";
import { describe, expect, it } from "vitest";
import { ACT_QUANT_CODE, gpuBackend, type Native, type NativeCtx } from "./gpu-provider.js";
import { cuda, cudaVendor } from "./index.js";

const H100 = "cuda:0 NVIDIA H100 80GB HBM3 (compute capability 9.0, 79.1 GiB, 132 SMs)";
const A100 = "cuda:1 NVIDIA A100-SXM4-40GB (compute capability 8.0, 39.4 GiB, 108 SMs)";
const P = (actQuant: Precision["actQuant"], activations: Precision["activations"] = "bf16"): Precision => ({ activations, cache: activations, actQuant });

type Opts = { device: number; actBf16: boolean; actQuant: number; graphs: boolean };
function standIn(made: Opts[] = []): Native {
  let next = 4096;
  const mem = new Map<number, Float32Array>();
  const ctx: Partial<NativeCtx> = {
    upload(a: ArrayBufferView) {
      const p = (next += 4096);
      mem.set(p, Float32Array.from(a as Float32Array));
      return p;
    },
    download(p: number, n: number) {
      return mem.get(p)!.slice(0, n);
    },
    beginStep() {},
    dispose() {},
  };
  class Context {
    constructor(o: Opts) {
      made.push(o);
      Object.assign(this, ctx);
    }
  }
  return { built: "cuda", probe: () => ({ ok: true, devices: [H100, A100] }), Context: Context as unknown as Native["Context"], nccl: 0 };
}

describe("the GPU layer with the CUDA vendor (stand-in addon)", () => {
  it("reads the probe's device lines as before: index, name, memory; arch from the compute capability", () => {
    const b = gpuBackend(cudaVendor, () => standIn());
    expect(b.provider.devices()).toEqual([
      { index: 0, name: "NVIDIA H100 80GB HBM3", memoryTotal: Math.round(79.1 * 2 ** 30), memoryFree: NaN },
      { index: 1, name: "NVIDIA A100-SXM4-40GB", memoryTotal: Math.round(39.4 * 2 ** 30), memoryFree: NaN },
    ]);
    expect(b.devices().map((d) => d.arch)).toEqual(["sm_90", "sm_80"]);
    expect(b.provider.available()).toEqual({ ok: true, devices: [H100, A100] });
  });

  it("passes the native codes of every precision (0 none, 1 fp8, 2 fp8-ue8m0; fp8-fnuz is AMD's and refused by name)", () => {
    expect(ACT_QUANT_CODE).toEqual({ none: 0, fp8: 1, "fp8-ue8m0": 2, "fp8-fnuz": 3 });
    const made: Opts[] = [];
    const b = gpuBackend(cudaVendor, () => standIn(made));
    const c = b.create({ device: 1, precision: { actQuant: "fp8", activations: "bf16" }, graphs: false });
    expect(c.device).toBe(A100);
    expect(c.name).toBe("cuda");
    b.create({ precision: { actQuant: "fp8-ue8m0" } });
    b.create();
    expect(made).toEqual([
      { device: 1, actBf16: true, actQuant: 1, graphs: false },
      { device: 0, actBf16: false, actQuant: 2, graphs: true },
      { device: 0, actBf16: false, actQuant: 0, graphs: true },
    ]);
    expect(() => b.create({ precision: { actQuant: "fp8-fnuz" } })).toThrow(/CUDA: actQuant "fp8-fnuz" is AMD MI300's e4m3fnuz; NVIDIA GPUs compute OCP e4m3fn/);
    expect(() => b.create({ device: 3 })).toThrow(/cuda: no device 3/);
    expect(made.length).toBe(3);
  });

  it("supports() on CUDA does not depend on a device being there (as before): every precision but fp8-fnuz", () => {
    for (const q of ["none", "fp8", "fp8-ue8m0"] as const) for (const a of ["f32", "bf16"] as const) expect(cuda.supports("linear", P(q, a))).toBe(true);
    expect(cuda.supports("sample", P("none", "f32"))).toBe(true);
    expect(cuda.supports("linear", P("fp8-fnuz"))).toBe(false);
  });

  it("a tensor of an earlier step or of another backend is refused by name", () => {
    const b = gpuBackend(cudaVendor, () => standIn());
    const c = b.create();
    const x = c.upload(Float32Array.from([1, 2, 3]), [1, 3]);
    expect(Array.from(c.download(x))).toEqual([1, 2, 3]);
    c.beginStep();
    expect(() => c.download(x)).toThrow("download: tensor from an earlier step (beginStep() released it)");
    expect(() => c.download({ shape: [1, 3] })).toThrow("download: not a CUDA tensor");
    expect(() => c.upload(new Float32Array(4), [1, 3])).toThrow("upload: 4 values for shape [1, 3]");
  });
});
