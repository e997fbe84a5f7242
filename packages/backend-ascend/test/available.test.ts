// The "not available" paths of @ds3/backend-ascend, each in a fresh process (the probe runs once per
// process): no CANN at all, a CANN whose libopapi lacks a required operator, and the stand-in.
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");
const standin = join(pkg, "standin/build");
const toolkit = join(standin, "ascend-toolkit/latest"); // the layout standin/build.sh writes around the libraries

/** ascend.available() and ds3 devices() in a child process with this environment */
function availableWith(env: Record<string, string | undefined>): { ok: boolean; reason?: string; devices?: string[]; infos: unknown[] } {
  const code = `import("${join(pkg, "dist/index.js")}").then((m) => { const a = m.ascend.available(); console.log(JSON.stringify({ ...a, infos: m.ascend.devices() })); })`;
  const clean = { ...process.env };
  for (const k of ["DS3_ASCEND_LIB_DIR", "ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"]) delete clean[k];
  const out = execFileSync(process.execPath, ["-e", code], { env: { ...clean, ...env }, encoding: "utf8" });
  return JSON.parse(out.trim().split("\n").pop()!);
}

const empty = mkdtempSync(join(tmpdir(), "ds3-ascend-empty-"));
afterAll(() => rmSync(empty, { recursive: true, force: true }));

describe("ascend available()", () => {
  it("no CANN: names every folder it looked in", () => {
    const r = availableWith({ DS3_ASCEND_LIB_DIR: empty });
    expect(r.ok).toBe(false);
    expect(r.reason).toContain("no CANN");
    expect(r.reason).toContain(empty);
    expect(r.reason).toContain("libopapi.so");
    expect(r.infos).toEqual([]);
  });
  it("no CANN in the default places: ASCEND_TOOLKIT_HOME, ASCEND_HOME_PATH and the default install are tried", () => {
    const r = availableWith({ ASCEND_TOOLKIT_HOME: join(empty, "tk"), ASCEND_HOME_PATH: join(empty, "home") });
    expect(r.ok).toBe(false);
    expect(r.reason).toContain(join(empty, "tk", "lib64"));
    expect(r.reason).toContain(join(empty, "home", "lib64"));
    expect(r.reason).toContain("/usr/local/Ascend/ascend-toolkit/latest/lib64");
  });
  it("CANN too old: a libopapi without aclnnMoeFinalizeRoutingV2 is named by the missing operator", () => {
    const r = availableWith({ DS3_ASCEND_LIB_DIR: join(standin, "too-old") });
    expect(r.ok).toBe(false);
    expect(r.reason).toMatch(/^Ascend not available: CANN too old: aclnnMoeFinalizeRoutingV2GetWorkspaceSize \(libopapi\.so\), aclnnMoeFinalizeRoutingV2 \(libopapi\.so\) missing/);
  });
  it("no NPU: the stand-in with 0 devices says aclrtGetDeviceCount = 0", () => {
    const r = availableWith({ DS3_ASCEND_LIB_DIR: standin, DS3_STANDIN_DEVICES: "0" });
    expect(r.ok).toBe(false);
    expect(r.reason).toContain("no NPU: aclrtGetDeviceCount = 0");
  });
  it("the stand-in found as CANN is installed (ASCEND_TOOLKIT_HOME=<toolkit>/latest): NPUs listed with the SoC name, memory and the CANN version of <arch>-linux/ascend_toolkit_install.info", () => {
    const r = availableWith({ ASCEND_TOOLKIT_HOME: toolkit });
    expect(r.reason).toBeUndefined();
    expect(r.ok).toBe(true);
    expect(r.devices).toHaveLength(2);
    expect(r.devices![0]).toMatch(/^npu:0 Ascend910B3-standin \([\d.]+ GiB, CANN 8\.2\.RC1\.standin\)$/);
    expect(r.devices![1]).toMatch(/^npu:1 Ascend910B3-standin \([\d.]+ GiB, CANN 8\.2\.RC1\.standin\)$/);
    expect((r.infos as Array<{ index: number; memoryTotal: number }>).map((d) => d.index)).toEqual([0, 1]);
    expect((r.infos as Array<{ index: number; memoryTotal: number }>)[0]!.memoryTotal).toBeGreaterThan(0);
  });
  it("libraries without the toolkit's version files around them: the CANN version is unknown, and where it looked is named", () => {
    const r = availableWith({ DS3_ASCEND_LIB_DIR: standin });
    expect(r.ok).toBe(true);
    expect(r.devices![0]).toBe(`npu:0 Ascend910B3-standin (64.0 GiB, CANN version unknown (no ascend_toolkit_install.info or version.info at ${dirname(standin)}))`);
  });
  it("a version.info (Version=...) next to lib64 is read when there is no ascend_toolkit_install.info", () => {
    const tk = mkdtempSync(join(tmpdir(), "ds3-ascend-tk-"));
    try {
      symlinkSync(standin, join(tk, "lib64"));
      mkdirSync(join(tk, "runtime"));
      writeFileSync(join(tk, "runtime", "version.info"), "Version=7.0.0\r\nversion_dir=7.0.0\r\n");
      const r = availableWith({ ASCEND_TOOLKIT_HOME: tk });
      expect(r.devices![0]).toMatch(/, CANN 7\.0\.0\)$/);
    } finally {
      rmSync(tk, { recursive: true, force: true });
    }
  });
});
