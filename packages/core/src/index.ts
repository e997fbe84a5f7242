// @ds3/core — public API
export * from "./config.js";
export * from "./safetensors.js";
export * from "./backend.js";
export * from "./model.js";
export * from "./tokenizer.js";
export * from "./engine.js";
export * from "./executor.js";
export * from "./sampling.js";
export * from "./ranks.js";
export * from "./nodes.js";
export * from "./devices.js";
export * from "./conformance.js";
export * from "./llm.js";
export * from "./builtin.js";
export * from "./convert.js";
export * from "./checks.js";
