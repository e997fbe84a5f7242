import { defineConfig } from "tsup";
export default defineConfig({
  entry: ["src/index.ts"],
  format: ["esm"],
  dts: true,
  sourcemap: true,
  clean: true,
  target: "node20",
  // the GPU layer is @ds3/backend-cuda's (one implementation for both vendors), imported at run time
  external: ["@ds3/core", "@ds3/backend-cuda", "@ds3/backend-cuda/gpu"],
});
