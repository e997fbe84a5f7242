import { defineConfig } from "tsup";
// scripts/gpu-check.mjs and bench/cuda/*.mjs import build/gpu/ds3.mjs; the addons sit beside it:
// build/Release/ds3_cuda.node (this package) and build/build/Release/ds3_cpu.node (CPU reference).
export default defineConfig({
  entry: { ds3: "gpu/entry.ts" },
  outDir: "build/gpu",
  format: ["esm"],
  platform: "node",
  target: "node20",
  dts: false,
  sourcemap: false,
  clean: true,
  splitting: false,
  noExternal: [/.*/],
  banner: { js: "import { createRequire as __ds3cr } from 'node:module'; const require = __ds3cr(import.meta.url);" },
});
