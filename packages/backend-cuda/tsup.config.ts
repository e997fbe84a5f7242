import { defineConfig } from "tsup";
export default defineConfig({
  // index: the CUDA provider; gpu-provider: the GPU layer it shares with @ds3/backend-rocm (`@ds3/backend-cuda/gpu`)
  entry: { index: "src/index.ts", "gpu-provider": "src/gpu-provider.ts" },
  format: ["esm"],
  dts: true,
  sourcemap: true,
  clean: true,
  target: "node20",
  external: ["@ds3/core"],
});
