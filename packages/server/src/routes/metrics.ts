// GET /metrics: Prometheus text format (vLLM's metric names where they exist).
import type { Route } from "../http.js";

export const metricsRoute: Route = {
  path: "/metrics",
  methods: ["GET", "HEAD"],
  auth: false,
  handle(ctx, x) {
    const text = ctx.metrics.render();
    x.res.writeHead(200, { "Content-Type": "text/plain; version=0.0.4; charset=utf-8", "Content-Length": Buffer.byteLength(text) });
    x.res.end(x.req.method === "HEAD" ? undefined : text);
  },
};
