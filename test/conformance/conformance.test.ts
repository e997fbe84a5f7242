// The backend conformance suite (@ds3/core's runConformance, the code `ds3 selftest` runs) on the
// CPU backend: every op of the contract against float64 references in exact mode, the golden
// checkpoints end to end through worker ranks at world size 1, 2 and 4 (the collectives), rank
// placement. And the suite itself is checked: a backend with one wrong op fails that op, and only it.
import { cpu } from "@ds3/backend-cpu";
import { type BackendContext, type BackendOptions, type BackendProvider, formatConformance, runConformance, type Tensor } from "@ds3/core";
import { describe, expect, it } from "vitest";
import { FIXTURES } from "../helpers/golden.js";

const GOLDEN = ["tiny-v3", "tiny-v3-bf16"].map((n) => FIXTURES + n);

describe.each([{ name: "cpu", provider: cpu }])("conformance: $name backend", ({ provider }) => {
  it("every op, the collectives at world size 2 and 4, the golden checkpoints end to end, rank placement", async () => {
    const r = await runConformance(provider, { goldenDirs: GOLDEN });
    console.log(formatConformance(r));
    for (const c of r.checks) expect({ check: c.name, ok: c.ok, detail: c.detail }).toEqual({ check: c.name, ok: true, detail: c.detail });
    expect(r.ok).toBe(true);
    // every op of the contract this backend supports was checked, and both checkpoints at 1, 2 and 4 ranks
    const ops = new Set(r.checks.map((c) => c.op).filter(Boolean));
    for (const op of ["embed", "rmsNorm", "linear", "add", "siluMul", "concat", "slice", "rows", "rope", "mla", "moeGate", "moeExperts", "allReduce", "allGatherCols"]) expect(ops.has(op as never)).toBe(true);
    for (const g of ["tiny-v3", "tiny-v3-bf16"]) for (const ws of [1, 2, 4]) expect(r.checks.some((c) => c.name === `${g} at world size ${ws}: golden logits, every position` && c.ok)).toBe(true);
  });
});

describe("the suite catches a wrong backend", () => {
  // the CPU backend with one op off by a little: rmsNorm scaled by 1 + 1e-3
  const off: BackendProvider = {
    ...cpu,
    name: "cpu-wrong-rmsnorm",
    entry: undefined,
    create(o?: BackendOptions): BackendContext {
      const ctx = cpu.create(o);
      const rms = ctx.rmsNorm.bind(ctx);
      ctx.rmsNorm = (x, w, eps): Tensor => {
        const y = ctx.download(rms(x, w, eps));
        return ctx.upload(y.map((v) => v * 1.001), x.shape);
      };
      return ctx;
    },
  };

  it("fails rmsNorm with its error, passes the other ops, and says a backend without entry cannot run ranks", async () => {
    const r = await runConformance(off, { goldenDirs: [GOLDEN[0]!] });
    expect(r.ok).toBe(false);
    const rms = r.checks.find((c) => c.op === "rmsNorm")!;
    expect(rms.ok).toBe(false);
    expect(rms.worst).toBeGreaterThan(5e-4);
    expect(rms.worst).toBeLessThan(2e-3);
    expect(r.checks.filter((c) => c.op && c.op !== "rmsNorm").every((c) => c.ok)).toBe(true);
    expect(r.checks.find((c) => c.name === "golden checkpoints through worker ranks")?.detail).toMatch(/has no entry/);
    expect(formatConformance(r)).toMatch(/^rmsNorm +FAIL +1\.\d\de-3/m);
  });

  it("an op the backend says it lacks is a failure naming it, not a silent pass", async () => {
    const r = await runConformance({ ...cpu, name: "cpu-no-mla", supports: (op, p) => op !== "mla" && cpu.supports(op, p) });
    const mla = r.checks.find((c) => c.op === "mla")!;
    expect(mla.ok).toBe(false);
    expect(mla.detail).toBe('backend "cpu-no-mla" does not support op mla in exact mode');
    expect(r.ok).toBe(false);
  });
});
