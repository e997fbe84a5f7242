// A test backend: the CPU backend's kernels behind a provider that reports several devices, so
// rank placement can be checked without accelerators. Variants (a module each, since worker ranks
// import a backend by its module URL) are in ./devices/: makeDevicesBackend(url, { count, api, lack }).
// Each context names the device it was given and whether device collectives are on, so a test can
// see what every rank received.
import { cpu } from "@ds3/backend-cpu";

/** @returns {import("@ds3/core").BackendProvider} */
export function makeDevicesBackend(entry, { count = 4, api = cpu.apiVersion, lack = [] } = {}) {
  return {
    name: "fake-gpu",
    apiVersion: api,
    entry,
    available: () => cpu.available(),
    devices: () =>
      Array.from({ length: count }, (_, i) => ({ index: i, name: `Fake GPU ${i}`, memoryTotal: 80 * 2 ** 30, memoryFree: (80 - i) * 2 ** 30 })),
    supports: (op, p) => !lack.includes(op) && cpu.supports(op, p),
    create(opts = {}) {
      const d = opts.device ?? 0;
      if (!(Number.isInteger(d) && d >= 0 && d < count)) throw new Error(`fake-gpu: no device ${d}`);
      const ctx = cpu.create(opts);
      Object.defineProperty(ctx, "device", { value: `fake-gpu:${d} (device collectives ${opts.deviceCollectives === false ? "off" : "on"})` });
      return ctx;
    },
  };
}

/** four devices */
export const devicesBackend = makeDevicesBackend(import.meta.url);
export default devicesBackend;
