// @ds3/core — public API
export * from "./config.js";
export * from "./safetensors.js";
export * from "./backend.js";
export * from "./model.js";
