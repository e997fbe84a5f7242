// The ROCm backend through the CLI, as an MI300 user meets it first, on this machine (no AMD GPU):
// `ds3 inspect` lists the rocm line with the backend's own reason, and `ds3 selftest --backend rocm`
// prints that reason and exits 1 without running anything. The reason is the provider's
// (@ds3/backend-rocm's available(), asked directly here), so the CLI neither hides nor rewrites it.
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { describe, expect, it } from "vitest";
import { ds3, ROOT } from "./helpers/cli.js";

interface Provider {
  name: string;
  available(): { ok: true; devices: string[] } | { ok: false; reason: string };
}
const rocm = ((await import(pathToFileURL(join(ROOT, "packages/backend-rocm/dist/index.js")).href)) as { default: Provider }).default;
const av = rocm.available();

describe("ds3 and the ROCm backend on a machine without an AMD GPU", () => {
  it("the provider says ROCm is not available and why", () => {
    expect(rocm.name).toBe("rocm");
    expect(av.ok).toBe(false);
    if (!av.ok) expect(av.reason).toMatch(/^ROCm not available: \S/);
  });

  it("ds3 inspect lists the rocm line with that reason (text and --json)", async () => {
    const reason = (av as { reason: string }).reason;
    const t = await ds3(["inspect"]);
    expect(t.code).toBe(0);
    const line = t.stdout.split("\n").find((l) => /^ {2}rocm\s/.test(l));
    expect(line).toBe(`  ${"rocm".padEnd(7)} not available: ${reason}`);
    const j = await ds3(["inspect", "--json"]);
    expect(j.code).toBe(0);
    const o = JSON.parse(j.stdout) as { backends: Array<{ name: string; package: string; available: boolean; reason?: string }> };
    expect(o.backends.find((b) => b.name === "rocm")).toEqual({ name: "rocm", package: "@ds3/backend-rocm", available: false, reason });
  });

  it("ds3 selftest --backend rocm prints the reason and exits 1; nothing runs, nothing on stdout (table or --json)", async () => {
    const reason = (av as { reason: string }).reason;
    for (const extra of [[], ["--json"]]) {
      const r = await ds3(["selftest", "--backend", "rocm", ...extra]);
      expect(r.code).toBe(1);
      expect(r.stdout).toBe("");
      expect(r.stderr.trim()).toBe(`ds3: error: backend "rocm" is not available: ${reason}`);
    }
  });
});
