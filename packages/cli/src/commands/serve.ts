// ds3 serve: the OpenAI-compatible HTTP server of @ds3/server (chat and text completions,
// streaming, tools, JSON mode, /metrics) on a loaded model.
import type { Argv } from "yargs";
import { createServer } from "@ds3/server";
import { type ModelArgs, intFlag, isWorkerNode, loadModel, modelOptions, mtpOption, nodeOptions, runWorkerNode, withOptions } from "../common.js";
import { notice, printError, ui } from "../ui.js";

interface Args extends ModelArgs {
  host: string;
  port: number;
  apiKey?: string[];
  cors?: string[];
  servedModelName?: string;
  maxQueue?: number;
  requestTimeout?: number;
  maxConnections?: number;
}

/** how long node 0 of a node group keeps answering (503) after the group lost a node, before it exits */
const EXIT_GRACE_MS = 3_000;

export const command = "serve";
export const describe = "OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/responses, /v1/messages, /v1/models, /metrics)";

export function builder(y: Argv): Argv {
  return withOptions(y, modelOptions, nodeOptions, mtpOption)
    .options({
      host: { type: "string", default: "127.0.0.1", describe: "address to listen on", requiresArg: true },
      port: { default: 8000, describe: "port (0: any free one)", coerce: intFlag("port", 0), requiresArg: true },
      "api-key": { type: "string", array: true, describe: "accepted API key (repeatable); default: $DS3_API_KEY (comma-separated); none: no authentication", requiresArg: true },
      cors: { type: "string", array: true, describe: 'allowed CORS origin (repeatable; "*" for any)', requiresArg: true },
      "served-model-name": { type: "string", describe: "the model id clients send and /v1/models lists", requiresArg: true },
      "max-queue": { describe: "most sequences in flight before requests get 429", coerce: intFlag("max-queue", 1), requiresArg: true },
      "request-timeout": { describe: "seconds to receive a request's headers and body, else 408 (default 30)", coerce: intFlag("request-timeout", 1), requiresArg: true },
      "max-connections": { describe: "most open connections; more are closed at once (default 4096)", coerce: intFlag("max-connections", 1), requiresArg: true },
    })
    .example("$0 serve --model DIR --port 8000", "")
    .example("$0 serve --port 0", "the built-in model on a free port (printed on stdout)")
    .example("$0 serve --model DIR --tp 16 --nnodes 2 --node-rank 0 --dist-init-addr 10.0.0.1:5000", "node 0 of two 8-GPU machines: the engine and the server")
    .example("$0 serve --model DIR --tp 16 --nnodes 2 --node-rank 1 --dist-init-addr 10.0.0.1:5000", "node 1: ranks 8-15, no HTTP port; exits when node 0 ends")
    .example("DS3_DIST_TOKEN=$SECRET $0 serve ... --nnodes 2 --node-rank R ...", "the same on both nodes, with a shared secret: only nodes that know it can join");
}

export async function handler(a: Args): Promise<void> {
  if (isWorkerNode(a)) return runWorkerNode(a); // node R > 0: its ranks only, no port
  const ds3 = await loadModel(a);
  let server: ReturnType<typeof createServer>;
  try {
    server = createServer({
      ds3,
      ...(a.apiKey && { apiKeys: a.apiKey }),
      ...(a.cors && { cors: a.cors.includes("*") ? true : a.cors }),
      ...(a.servedModelName !== undefined && { modelName: a.servedModelName }),
      ...(a.maxQueue !== undefined && { maxQueue: a.maxQueue }),
      ...(a.requestTimeout !== undefined && { requestTimeoutMs: a.requestTimeout * 1000 }),
      ...(a.maxConnections !== undefined && { maxConnections: a.maxConnections }),
      handleSignals: true,
      onSignal: async (sig) => {
        notice(`${sig}: stopped`);
        await ds3.close();
        process.exit(0);
      },
      ...(!ui.quiet && { log: (line: string) => process.stderr.write(`ds3: ${line}\n`) }),
    });
  } catch (e) {
    await ds3.close();
    throw e;
  }
  let addr: { url: string };
  try {
    addr = await server.listen(a.port, a.host);
  } catch (e) {
    await ds3.close();
    const code = (e as NodeJS.ErrnoException).code;
    throw new Error(code === "EADDRINUSE" ? `port ${a.port} on ${a.host} is in use` : code === "EACCES" ? `no permission to listen on ${a.host}:${a.port}` : (e as Error).message);
  }
  notice(`serving ${server.modelName} at ${addr.url} (OpenAI-compatible: ${addr.url}/v1); Ctrl-C stops`);
  process.stdout.write(`${addr.url}\n`);
  if ((a.nnodes ?? 1) > 1) {
    // a group of nodes cannot heal: once a node or rank is lost (the requests in flight failed with
    // it, /health says it), node 0 stops too, after a few seconds for clients to see the error
    const watch = setInterval(() => {
      const failed = ds3.executor.failed;
      if (!failed) return;
      clearInterval(watch);
      printError(failed);
      notice(`the node group lost a rank: node 0 stops in ${EXIT_GRACE_MS / 1000} s (/health answers 503 until then)`);
      setTimeout(() => {
        void server.close({ graceMs: 0 }).finally(() => void ds3.close().finally(() => process.exit(1)));
      }, EXIT_GRACE_MS).unref();
    }, 200);
  }
  // runs until a signal closes it
  await new Promise<never>(() => {});
}
