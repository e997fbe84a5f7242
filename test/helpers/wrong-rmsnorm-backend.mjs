// A test backend: the CPU backend with one wrong op (rmsNorm scaled by 1 + 1e-3), for checking
// that `ds3 selftest` and the conformance suite fail that op by name.
import { cpu } from "@ds3/backend-cpu";

/** @type {import("@ds3/core").BackendProvider} */
export const wrongRmsNorm = {
  ...cpu,
  name: "cpu-wrong-rmsnorm",
  entry: import.meta.url,
  create(opts) {
    const ctx = cpu.create(opts);
    const rms = ctx.rmsNorm.bind(ctx);
    ctx.rmsNorm = (x, w, eps) => ctx.upload(ctx.download(rms(x, w, eps)).map((v) => v * 1.001), x.shape);
    return ctx;
  },
};
export default wrongRmsNorm;
