// @ds3/backend-rocm's TypeScript layer on a machine without an AMD GPU (this one, CI):
// - the addon as built here (HIP build with no device, or the stub where no HIP toolchain was found),
//   a missing addon and an unloadable one: available() gives "ROCm not available: <why>" and never
//   throws, create() throws the same reason, devices() is empty, supports() is false;
// - the choices this layer makes per gfx target (device names, which precisions each target runs,
//   the native FP8 mode it passes, refusals naming the device), driven by a stand-in addon that
//   reports AMD devices as ds3_rocm.node's probe formats them. The stand-in records what the layer
//   asks of the addon; it computes nothing, so no kernel is checked here (see README: nothing has run
//   on AMD hardware).
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { BACKEND_API_VERSION, checkProvider, type Precision } from "@ds3/core";
import { gpuBackend, type Native } from "@ds3/backend-cuda/gpu";
import { afterAll, describe, expect, it } from "vitest";
import { fp8Mode, probe, rocm, rocmBackend, rocmDevices, rocmVendor, ROCM_TARGETS } from "./index.js";

const here = dirname(fileURLToPath(import.meta.url));
const P = (actQuant: Precision["actQuant"], activations: Precision["activations"] = "f32", cache: Precision["cache"] = "f32"): Precision => ({ activations, cache, actQuant });
const MODES: Precision["actQuant"][] = ["none", "fp8", "fp8-ue8m0", "fp8-fnuz"];

describe("the addon as built on this machine (no AMD GPU here)", () => {
  const av = rocm.available();
  let built = "missing";
  try {
    // the addon the provider loads: $DS3_ROCM_ADDON first, else the package's build
    built = (createRequire(import.meta.url)(process.env.DS3_ROCM_ADDON || join(here, "../build/Release/ds3_rocm.node")) as Native).built;
  } catch {
    /* not built: the reason says so */
  }
  console.log(`[@ds3/backend-rocm] addon: ${built}; available(): ${av.ok ? "yes" : av.reason}`);

  it("available() says ROCm is not available and why; create() throws the same reason; no devices, no precision supported", () => {
    expect(av.ok).toBe(false);
    if (av.ok) return;
    expect(av.reason).toMatch(/^ROCm not available: \S/);
    // the why: no addon / built without HIP / the HIP runtime's answer (no /dev/kfd: no device)
    if (built === "missing") expect(av.reason).toMatch(/native addon not built or not loadable; run `pnpm --filter @ds3\/backend-rocm build`/);
    else if (built === "stub") expect(av.reason).toMatch(/built without HIP/);
    else expect(av.reason).toMatch(/hipError|no ROCm devices|no supported GPU/);
    // and where the machine can tell why there is no device, it says so (here: no amdgpu driver node)
    if (built === "rocm" && !existsSync("/dev/kfd") && /hipErrorNoDevice|no ROCm devices/.test(av.reason)) expect(av.reason).toMatch(/\(no \/dev\/kfd: the amdgpu kernel driver is not loaded/);
    expect(probe()).toMatchObject({ ok: false, reason: av.reason });
    expect(() => rocm.create()).toThrow(av.reason);
    expect(rocm.devices()).toEqual([]);
    expect(rocmDevices()).toEqual([]);
    for (const q of MODES) expect(rocm.supports("linear", P(q))).toBe(false);
  });

  it("is a contract-v2 provider whose entry module exports it as default (worker ranks import it)", async () => {
    expect(checkProvider(rocm)).toBe(rocm);
    expect(rocm.apiVersion).toBe(BACKEND_API_VERSION);
    expect(rocm.name).toBe("rocm");
    const m = (await import(rocm.entry!)) as { default: unknown };
    expect(m.default).toBe(rocm);
  });
});

describe("a missing or unloadable addon is a reason, not a crash", () => {
  const dir = mkdtempSync(join(tmpdir(), "ds3-rocm-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  // the vendor as published, but looking for its addon next to an empty folder
  const base = pathToFileURL(join(dir, "dist", "index.js")).href;

  it("no addon: the reason names the paths tried and the build command; create() throws it", () => {
    const b = gpuBackend({ ...rocmVendor, base, addonEnv: "DS3_ROCM_TEST_NO_ADDON" });
    const p = b.probe();
    expect(p.ok).toBe(false);
    expect(p.reason).toMatch(/^ROCm not available: @ds3\/backend-rocm: native addon not built or not loadable; run `pnpm --filter @ds3\/backend-rocm build` \(tried: .*ds3_rocm\.node \(missing\)/);
    expect(b.provider.available()).toEqual({ ok: false, reason: p.reason });
    expect(() => b.create()).toThrow(p.reason!);
  });

  it("a file that is not an addon: the loader's error is in the reason", () => {
    writeFileSync(join(dir, "ds3_rocm.node"), "not an ELF file");
    const b = gpuBackend({ ...rocmVendor, base: pathToFileURL(join(dir, "index.js")).href, addonEnv: "DS3_ROCM_TEST_NO_ADDON" });
    const a = b.provider.available();
    expect(a.ok).toBe(false);
    if (!a.ok) expect(a.reason).toMatch(/^ROCm not available: .*ds3_rocm\.node \(.*(invalid ELF header|too short|file)/);
  });
});

// ---- a stand-in addon: AMD devices as ds3_rocm.node's probe() formats them ---------------------------
const MI300X = "rocm:0 AMD Instinct MI300X (gfx942:sramecc+:xnack-, 191.5 GiB, 304 CUs, wave64, fp8 e4m3fnuz)";
const MI250X = "rocm:1 AMD Instinct MI250X/MI250 (gfx90a:sramecc+:xnack-, 64.0 GiB, 110 CUs, wave64, no fp8)";
const MI355X = "rocm:2 AMD Instinct MI355X (gfx950:sramecc+:xnack-, 288.0 GiB, 256 CUs, wave64, fp8 e4m3fn)";

interface Made {
  o: { device: number; actBf16: boolean; actQuant: number; graphs: boolean };
}
function standIn(probeResult: () => ReturnType<Native["probe"]>, made: Made[] = []): Native {
  class Context {
    constructor(o: Made["o"]) {
      made.push({ o });
    }
    ncclUniqueId() {
      return new Uint8Array(128);
    }
    dispose() {}
  }
  return { built: "rocm", probe: probeResult, Context: Context as unknown as Native["Context"], nccl: 0 };
}
const three = () => standIn(() => ({ ok: true, devices: [MI300X, MI250X, MI355X] }));

describe("per gfx target (stand-in addon reporting an MI300X, an MI250X and an MI355X)", () => {
  it("devices are named with their gfx target and memory, indexed as HIP numbers them", () => {
    const b = rocmBackend(three);
    expect(b.provider.available()).toEqual({ ok: true, devices: [MI300X, MI250X, MI355X] });
    expect(b.provider.devices()).toEqual([
      { index: 0, name: "AMD Instinct MI300X (gfx942, 192 GiB)", memoryTotal: Math.round(191.5 * 2 ** 30), memoryFree: NaN },
      { index: 1, name: "AMD Instinct MI250X/MI250 (gfx90a, 64 GiB)", memoryTotal: 64 * 2 ** 30, memoryFree: NaN },
      { index: 2, name: "AMD Instinct MI355X (gfx950, 288 GiB)", memoryTotal: 288 * 2 ** 30, memoryFree: NaN },
    ]);
    expect(b.devices().map((d) => d.arch)).toEqual(["gfx942", "gfx90a", "gfx950"]);
  });

  it("supports() per device: gfx942 FP8 only as e4m3fnuz, gfx950 only as OCP e4m3fn, gfx90a no FP8; bf16 everywhere", () => {
    const b = rocmBackend(three).provider;
    const want: Record<number, Precision["actQuant"][]> = { 0: ["none", "fp8-fnuz"], 1: ["none"], 2: ["none", "fp8", "fp8-ue8m0"] };
    for (const [dev, ok] of Object.entries(want))
      for (const q of MODES)
        for (const act of ["f32", "bf16"] as const) {
          expect(b.supports("linear", P(q, act, act), Number(dev)), `device ${dev} ${q} ${act}`).toBe(ok.includes(q));
          expect(b.supports("sample", P(q, act), Number(dev))).toBe(ok.includes(q));
        }
    // no device named: what every device runs (a rank may be placed on any of them)
    for (const q of MODES) expect(b.supports("mla", P(q))).toBe(q === "none");
    expect(b.supports("mla", P("none", "bf16", "bf16"))).toBe(true);
    // a device that is not there
    expect(b.supports("linear", P("none"), 7)).toBe(false);
    // the table agrees
    expect(fp8Mode("gfx942")).toBe("fp8-fnuz");
    expect(fp8Mode("gfx950")).toBe("fp8");
    expect(fp8Mode("gfx90a")).toBeNull();
    expect(Object.keys(ROCM_TARGETS)).toEqual(["gfx90a", "gfx942", "gfx950"]);
  });

  it("create() passes the device's FP8 mode to the addon (fp8-fnuz -> 3 on gfx942, fp8 -> 1 / ue8m0 -> 2 on gfx950) and names the device", () => {
    const made: Made[] = [];
    const b = rocmBackend(() => standIn(() => ({ ok: true, devices: [MI300X, MI250X, MI355X] }), made));
    const c0 = b.create({ device: 0, precision: { actQuant: "fp8-fnuz" } });
    expect(c0.device).toBe(MI300X);
    expect(c0.name).toBe("rocm");
    expect(c0.gpu.arch).toBe("gfx942");
    expect(c0.precision).toEqual(P("fp8-fnuz"));
    b.create({ device: 2, precision: { actQuant: "fp8", activations: "bf16" } });
    b.create({ device: 2, precision: { actQuant: "fp8-ue8m0" }, graphs: false });
    b.create({ device: 1, precision: { activations: "bf16", cache: "bf16" } });
    expect(made.map((m) => m.o)).toEqual([
      { device: 0, actBf16: false, actQuant: 3, graphs: true },
      { device: 2, actBf16: true, actQuant: 1, graphs: true },
      { device: 2, actBf16: false, actQuant: 2, graphs: false },
      { device: 1, actBf16: true, actQuant: 0, graphs: true },
    ]);
  });

  it("$DS3_ROCM_GRAPHS=0 turns HIP graphs off", () => {
    const made: Made[] = [];
    const b = rocmBackend(() => standIn(() => ({ ok: true, devices: [MI300X] }), made));
    process.env.DS3_ROCM_GRAPHS = "0";
    try {
      b.create();
    } finally {
      delete process.env.DS3_ROCM_GRAPHS;
    }
    expect(made[0]!.o.graphs).toBe(false);
  });

  it("a precision the device does not run is refused before the addon is asked, naming the device, its format and its FP8 mode", () => {
    const made: Made[] = [];
    const b = rocmBackend(() => standIn(() => ({ ok: true, devices: [MI300X, MI250X, MI355X] }), made));
    expect(() => b.create({ device: 0, precision: { actQuant: "fp8" } })).toThrow(
      'rocm:0 AMD Instinct MI300X (gfx942) computes FP8 as e4m3fnuz: actQuant "fp8" is not supported there ("none", "fp8-fnuz"; its FP8 mode is "fp8-fnuz")',
    );
    expect(() => b.create({ device: 2, precision: { actQuant: "fp8-fnuz" } })).toThrow(/rocm:2 AMD Instinct MI355X \(gfx950\) computes FP8 as e4m3fn: actQuant "fp8-fnuz" is not supported there .*its FP8 mode is "fp8"/);
    expect(() => b.create({ device: 1, precision: { actQuant: "fp8-fnuz" } })).toThrow(/rocm:1 AMD Instinct MI250X\/MI250 \(gfx90a\) has no FP8 matrix cores \(BF16 on dequantized weights\): actQuant "fp8-fnuz" is not supported there \("none"\)$/);
    expect(() => b.create({ device: 0, precision: { activations: "f16" as never } })).toThrow(/activations "f16" are not supported/);
    expect(() => b.create({ device: 5 })).toThrow(/rocm: no device 5 \(devices: rocm:0 .*rocm:2 /);
    expect(made).toEqual([]);
  });

  it("a device of a gfx target this backend has no kernels for is listed but refused; alone, the backend is not available", () => {
    const navi = "rocm:1 AMD Radeon (TM) PRO W7900 (gfx1100, 45.0 GiB, 48 CUs, wave32, no fp8)";
    const mixed = rocmBackend(() => standIn(() => ({ ok: true, devices: [MI300X, navi] })));
    expect(mixed.provider.available().ok).toBe(true);
    expect(mixed.provider.devices().map((d) => d.name)).toEqual(["AMD Instinct MI300X (gfx942, 192 GiB)", "AMD Radeon (TM) PRO W7900 (gfx1100, 45 GiB)"]);
    expect(mixed.provider.supports("linear", P("none"), 1)).toBe(false);
    expect(mixed.provider.supports("linear", P("none"))).toBe(false); // not every device
    expect(mixed.provider.supports("linear", P("none"), 0)).toBe(true);
    expect(() => mixed.create({ device: 1 })).toThrow(/gfx1100.* is not a target of @ds3\/backend-rocm \(gfx90a, gfx942, gfx950\)/);
    const alone = rocmBackend(() => standIn(() => ({ ok: true, devices: [navi] }))).provider.available();
    expect(alone.ok).toBe(false);
    if (!alone.ok) expect(alone.reason).toMatch(/^ROCm not available: rocm:1 AMD Radeon .*gfx1100.* is not a target/);
    // an addon that says which targets it was compiled for: a device outside them is refused
    const only90a = rocmBackend(() => ({ ...standIn(() => ({ ok: true, devices: [MI300X, MI250X] })), targets: "gfx90a" }));
    expect(only90a.provider.supports("linear", P("none"), 0)).toBe(false);
    expect(only90a.provider.supports("linear", P("none"), 1)).toBe(true);
    expect(() => only90a.create({ device: 0 })).toThrow(/has no code object in this build \(built for gfx90a\)/);
  });

  it("the runtime's own refusals pass through as the reason (probe not ok, or a probe that throws)", () => {
    const no = rocmBackend(() => standIn(() => ({ ok: false, reason: "ROCm not available: hipErrorNoDevice" })));
    const r = no.provider.available();
    expect(r).toMatchObject({ ok: false, reason: expect.stringMatching(/^ROCm not available: hipErrorNoDevice/) });
    expect(() => no.create()).toThrow((r as { reason: string }).reason);
    // the hint is the machine's: with HIP_VISIBLE_DEVICES set, it is named
    process.env.HIP_VISIBLE_DEVICES = "3";
    try {
      expect(rocmBackend(() => standIn(() => ({ ok: false, reason: "ROCm not available: hipErrorNoDevice" }))).provider.available()).toMatchObject({
        reason: expect.stringMatching(/^ROCm not available: hipErrorNoDevice \(.*HIP_VISIBLE_DEVICES=3 may hide the devices\)$/),
      });
    } finally {
      delete process.env.HIP_VISIBLE_DEVICES;
    }
    const boom = rocmBackend(() =>
      standIn(() => {
        throw new Error("hipGetDeviceCount: hipErrorInvalidDevice");
      }),
    );
    expect(boom.provider.available()).toEqual({ ok: false, reason: "ROCm not available: hipGetDeviceCount: hipErrorInvalidDevice" });
    expect(boom.provider.devices()).toEqual([]);
  });
});
