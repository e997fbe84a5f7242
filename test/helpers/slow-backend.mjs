// A test backend (the CPU backend, unchanged) whose first op of a step blocks its thread
// synchronously for BLOCK_MS whenever the step's tokens include SLOW_TOKEN: a stand-in for a long
// step of a big model. Worker ranks import it by path (`entry`), so it is plain ESM.
import { cpu } from "@ds3/backend-cpu";

export const SLOW_TOKEN = 777;
export const BLOCK_MS = 1500;
/** BroadcastChannel on which the blocking op says "start" before it blocks and "end" after */
export const BLOCK_CHANNEL = "ds3-test-slow-backend";

function wrap(ctx) {
  return new Proxy(ctx, {
    get(t, k) {
      if (k === "embed")
        return (table, ids, vocabStart) => {
          if (ids.includes(SLOW_TOKEN)) {
            const ch = new BroadcastChannel(BLOCK_CHANNEL);
            ch.postMessage("start");
            Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, BLOCK_MS);
            ch.postMessage("end");
            ch.close();
          }
          return t.embed(table, ids, vocabStart);
        };
      const v = t[k];
      return typeof v === "function" ? v.bind(t) : v;
    },
  });
}

/** @type {import("@ds3/core").BackendProvider} */
export const slowCpu = {
  name: "cpu-slow-test",
  entry: import.meta.url,
  available: () => cpu.available(),
  apiVersion: cpu.apiVersion,
  devices: () => cpu.devices(),
  supports: (op, p) => cpu.supports(op, p),
  create: (opts) => wrap(cpu.create(opts)),
};
export default slowCpu;
