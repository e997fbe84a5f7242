// The route table: every endpoint the server answers, one line each. A route is a file in this
// folder exporting a Route (http.ts): its path, methods, whether it needs the API key, and the
// handler, which gets the server context (context.ts) and the request.
import type { Route } from "../http.js";
import { chatRoute } from "./chat.js";
import { completionsRoute } from "./completions.js";
import { deepHealthRoute, healthRoute } from "./health.js";
import { messagesRoute } from "./messages.js";
import { metricsRoute } from "./metrics.js";
import { modelRoute, modelsRoute } from "./models.js";
import { detokenizeRoute, tokenizeRoute } from "./tokenize.js";
import { versionRoute } from "./version.js";
import { responsesRoute } from "./responses.js";

export const routes: readonly Route[] = [
  healthRoute,
  deepHealthRoute,
  metricsRoute,
  modelsRoute,
  modelRoute,
  chatRoute,
  completionsRoute,
  responsesRoute,
  messagesRoute,
  tokenizeRoute,
  detokenizeRoute,
  versionRoute,
];
