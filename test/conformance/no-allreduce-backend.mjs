// A test backend: the CPU backend whose allReduce returns the rank's own partial sum (no sum
// across ranks). At world size 1 allReduce is the identity, so every op check passes; only the
// golden checkpoints through 2 or more ranks can catch it.
import { cpu } from "@ds3/backend-cpu";

/** @type {import("@ds3/core").BackendProvider} */
export const noAllReduce = {
  ...cpu,
  name: "cpu-no-allreduce",
  entry: import.meta.url,
  create(opts) {
    const ctx = cpu.create(opts);
    ctx.allReduce = (x) => x;
    return ctx;
  },
};
export default noAllReduce;
