// @ds3/server — the embeddable OpenAI-compatible server
export { createServer, type Ds3Server, type ServerModel, type ServerOptions } from "./server.js";
export { ApiError } from "./errors.js";
export { ServerMetrics, Registry, Counter, Gauge, Histogram } from "./metrics.js";
export { parseToolCalls, renderToolChat, toolSection, ToolCallStreamParser, type ParsedToolCall, type ToolCallDelta } from "./tools.js";
export { ReasoningStreamParser, splitReasoning, type ReasoningMode } from "./reasoning.js";
export { createGrammars, GrammarError, type GrammarSpec, type Grammars, type CompiledGrammar } from "./grammar.js";
export { tokenTable, ByteStreamDecoder, type TokenTable } from "./tokens.js";
export { parseChatRequest, parseCompletionRequest, type ChatRequest, type CompletionRequestBody, type ToolDef, type ToolChoice } from "./validate.js";
export { runChat, chatId, type ChatEvent, type ChatChoice, type ChatOutcome, type ChatHooks, type ChatFinishReason } from "./pipeline.js";
export type { Route, RouteMatch } from "./http.js";
export type { ServerContext } from "./context.js";
