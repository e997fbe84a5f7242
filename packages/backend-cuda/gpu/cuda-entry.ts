// The CUDA provider alone (default export), for worker ranks: BackendProvider.entry of the bundled
// provider is this file (build/gpu/cuda.js). See tsup.gpu.config.ts.
import { cuda } from "../src/index.js";
export default cuda;
export { cuda };
