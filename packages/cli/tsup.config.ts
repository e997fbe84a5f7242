import { readFileSync } from "node:fs";
import { defineConfig } from "tsup";

const pkg = JSON.parse(readFileSync(new URL("./package.json", import.meta.url), "utf8")) as { version: string };

// One file, dist/ds3.js (the bin). The @ds3 packages and yargs stay external: the CPU backend
// finds its native addon relative to its own module, which bundling would break.
export default defineConfig({
  entry: { ds3: "src/ds3.ts" },
  format: ["esm"],
  target: "node20",
  platform: "node",
  splitting: false,
  sourcemap: true,
  clean: true,
  dts: false,
  define: { __DS3_VERSION__: JSON.stringify(pkg.version) },
});
