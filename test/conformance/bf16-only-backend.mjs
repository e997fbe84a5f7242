// A test backend that supports only the bf16 precision (activations and cache bf16, no FP8
// activation quantization), as a BF16-only accelerator backend (Ascend) does: the CPU backend
// behind a narrower supports(). For the conformance suite's "not supported" handling.
import { cpu } from "@ds3/backend-cpu";

/** @type {import("@ds3/core").BackendProvider} */
export const bf16Only = {
  ...cpu,
  name: "cpu-bf16-only",
  entry: import.meta.url,
  supports: (op, p) => p.activations === "bf16" && p.cache === "bf16" && p.actQuant === "none" && cpu.supports(op, p),
  create(opts) {
    const p = { activations: "f32", cache: "f32", actQuant: "none", ...opts?.precision };
    if (p.activations !== "bf16" || p.actQuant !== "none") throw new Error(`cpu-bf16-only: precision ${JSON.stringify(p)} is not supported`);
    return cpu.create(opts);
  },
};
export default bf16Only;
