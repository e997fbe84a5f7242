import { fileURLToPath } from "node:url";
import { defineConfig } from "tsup";
// Bundles for GPU machines (plain node, no node_modules, no registry), in build/gpu/:
//   ds3.js          @ds3/core, this backend and the CPU backend (the op-level reference): what
//                   scripts/gpu-*.mjs and bench/cuda/*.mjs import
//   cuda.js, cpu.js one provider each (its default export): what worker ranks import
//                   (BackendProvider.entry is the bundle the provider lives in, and a rank takes
//                   the first provider a module exports, so ds3.js, which exports both, cannot be it)
//   rank-worker.js  @ds3/core's rank worker: RankExecutor starts it from the bundle's folder
// piscina stays external: it starts its own worker file from its own folder, so
// bench/cuda/prepare-device.sh copies the package to build/gpu/node_modules/piscina.
// @ds3/core and @ds3/backend-cpu are taken from their sources (no stale dist/).
// The addons sit beside them: build/build/Release/ds3_cpu.node (the CPU backend looks in ../build/Release)
// and build/gpu/ds3_cuda.node or $DS3_CUDA_ADDON (this package's build/Release first when present).
const src = (p: string) => fileURLToPath(new URL(p, import.meta.url));
export default defineConfig({
  entry: {
    ds3: "gpu/entry.ts",
    cuda: "gpu/cuda-entry.ts",
    cpu: "gpu/cpu-entry.ts",
    "rank-worker": src("../core/src/rank-worker.ts"),
  },
  outDir: "build/gpu",
  format: ["esm"],
  platform: "node",
  target: "node20",
  dts: false,
  sourcemap: false,
  clean: true,
  splitting: false,
  noExternal: [/^(?!piscina$)/],
  external: ["piscina"],
  esbuildOptions(o) {
    o.alias = { "@ds3/core": src("../core/src/index.ts"), "@ds3/backend-cpu": src("../backend-cpu/src/index.ts") };
  },
  banner: { js: "import { createRequire as __ds3cr } from 'node:module'; const require = __ds3cr(import.meta.url);" },
});
