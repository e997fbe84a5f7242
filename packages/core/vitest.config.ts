import { defineConfig } from "vitest/config";
// Tests assert behaviour, never speed: on a loaded 2-core CI machine a 20,000-draw sampling test can
// pass vitest's 5 s default, so the limit is generous.
export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 60_000,
  },
});
