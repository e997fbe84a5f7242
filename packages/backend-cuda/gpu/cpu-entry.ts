// The CPU provider alone (default export), for worker ranks: build/gpu/cpu.js. The harness checks of
// scripts/gpu-conformance.mjs --backend cpu run through it on machines without a GPU.
import { cpu } from "@ds3/backend-cpu";
export default cpu;
export { cpu };
