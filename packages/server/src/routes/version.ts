// GET /version: the server's version (vLLM's shape: {"version": ...}).
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import type { Route } from "../http.js";

/** @ds3/server's version, from the package.json above this module (src/ or dist/). */
function findVersion(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as { name?: string; version?: string };
      if (pkg.name === "@ds3/server" && typeof pkg.version === "string") return pkg.version;
    } catch {
      // not here
    }
    dir = dirname(dir);
  }
  return "unknown";
}

let version: string | null = null;

export const versionRoute: Route = {
  path: "/version",
  methods: ["GET"],
  auth: false,
  handle(_ctx, x) {
    version ??= findVersion();
    const body = JSON.stringify({ version });
    x.res.writeHead(200, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body) });
    x.res.end(body);
  },
};
