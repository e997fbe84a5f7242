// One-file bundle for GPU machines (plain node, no node_modules): @ds3/core, this backend and the
// CPU backend (the op-level reference). Built by `pnpm --filter @ds3/backend-cuda bundle:gpu`.
export * from "@ds3/core";
export { cuda, createCudaBackend, CudaContext, SyntheticSource, probe } from "../src/index.js";
export { cpu } from "@ds3/backend-cpu";
