// A test backend for the refusal at load of a plan that does not fit (fit.ts): the CPU backend's
// kernels behind a provider whose one device (shareable, as the CPU is) has as many bytes of
// memory as DS3_TEST_DEVICE_MEMORY says, read at each devices() call (default 1 TiB). create()
// counts its calls in globalThis.__tinymemCreates, so an in-thread test can see that a refused
// load created no backend context.
import { cpu } from "@ds3/backend-cpu";

/** @type {import("@ds3/core").BackendProvider} */
export const tinyMemoryBackend = {
  name: "tinymem-test",
  apiVersion: cpu.apiVersion,
  entry: import.meta.url,
  available: () => cpu.available(),
  devices: () => {
    const bytes = Number(process.env.DS3_TEST_DEVICE_MEMORY ?? 2 ** 40);
    return [{ index: 0, name: "tinymem device", memoryTotal: bytes, memoryFree: bytes, shareable: true }];
  },
  supports: (op, p) => cpu.supports(op, p),
  create(opts = {}) {
    globalThis.__tinymemCreates = (globalThis.__tinymemCreates ?? 0) + 1;
    return cpu.create(opts);
  },
};
export default tinyMemoryBackend;
