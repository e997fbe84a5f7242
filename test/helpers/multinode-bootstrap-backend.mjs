// A test backend for the device-collective bootstrap across nodes: the CPU backend's kernels,
// plus what an NCCL/RCCL/HCCL backend does in create(): rank 0 makes a communicator id (128
// random bytes, the size of an NCCL unique id) and every rank gets it through
// `Collective.broadcast`. Each context names the id it received in its `device`, so a test can
// see that the ranks of every node would join the same communicator.
import { randomBytes } from "node:crypto";
import { cpu } from "@ds3/backend-cpu";

/** @type {import("@ds3/core").BackendProvider} */
export const bootstrapBackend = {
  name: "bootstrap-test",
  apiVersion: cpu.apiVersion,
  entry: import.meta.url,
  available: () => cpu.available(),
  devices: () => cpu.devices(),
  supports: (op, p) => cpu.supports(op, p),
  create(opts = {}) {
    const c = opts.collective;
    if (!c) throw new Error("bootstrap-test: needs a collective (world size > 1)");
    const id = c.broadcast(c.rank === 0 ? new Uint8Array(randomBytes(128)) : undefined);
    const ctx = cpu.create(opts);
    Object.defineProperty(ctx, "device", { value: `comm ${Buffer.from(id).toString("hex")} rank ${c.rank}/${c.worldSize}` });
    return ctx;
  },
};
export default bootstrapBackend;
