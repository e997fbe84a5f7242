// GET /v1/models and /v1/models/{id}: the one model this server serves.
import type { ServerContext } from "../context.js";
import { ApiError, invalid } from "../errors.js";
import { type Route, sendJson } from "../http.js";

function modelCard(ctx: ServerContext) {
  return { id: ctx.modelName, object: "model", created: ctx.created, owned_by: "ds3", root: ctx.modelName, max_model_len: ctx.maxModelLen };
}

export const modelsRoute: Route = {
  path: "/v1/models",
  methods: ["GET"],
  auth: true,
  handle: (ctx, x) => sendJson(x.res, 200, { object: "list", data: [modelCard(ctx)] }),
};

export const modelRoute: Route = {
  path: "/v1/models/{id}",
  methods: ["GET"],
  auth: true,
  handle(ctx, x, m) {
    let name: string;
    try {
      name = decodeURIComponent(m.param!);
    } catch {
      throw invalid("model", `the model id in the path is not valid percent-encoding: ${JSON.stringify(m.param!.slice(0, 100))}`);
    }
    if (name !== ctx.modelName && name !== ctx.ds3.modelName) throw new ApiError(404, `The model '${name}' does not exist`, "model", "model_not_found");
    sendJson(x.res, 200, modelCard(ctx));
  },
};
