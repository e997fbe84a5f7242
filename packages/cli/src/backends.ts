// Backend discovery: backends are packages, found by name wherever they are installed (next
// to the CLI, or in the project ds3 runs in), probed before use; a missing driver or package
// means "not available", with the reason, never a crash.
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { type BackendProvider, checkProvider } from "@ds3/core";
import { UsageError } from "./ui.js";

export const KNOWN_BACKENDS: Record<string, string> = {
  cpu: "@ds3/backend-cpu",
  cuda: "@ds3/backend-cuda",
  rocm: "@ds3/backend-rocm",
  ascend: "@ds3/backend-ascend",
};

export interface BackendProbe {
  name: string;
  package: string;
  ok: boolean;
  devices?: string[];
  reason?: string;
  provider?: BackendProvider;
}

const packageOf = (name: string) => KNOWN_BACKENDS[name] ?? name;

function isProvider(x: unknown): x is BackendProvider {
  return !!x && typeof x === "object" && typeof (x as BackendProvider).available === "function" && typeof (x as BackendProvider).create === "function";
}

/** The package's ESM entry, found by walking up node_modules from `from` (a project using ds3). */
function findInProject(pkg: string, from: string): string | null {
  let dir = resolve(from);
  for (;;) {
    const pj = join(dir, "node_modules", pkg, "package.json");
    if (existsSync(pj)) {
      const meta = JSON.parse(readFileSync(pj, "utf8")) as { exports?: unknown; module?: string; main?: string };
      const root = (meta.exports as Record<string, unknown> | undefined)?.["."];
      const entry =
        typeof root === "string" ? root : ((root as Record<string, unknown> | undefined)?.import as string | undefined) ?? meta.module ?? meta.main ?? "index.js";
      return join(dirname(pj), typeof entry === "string" ? entry : "index.js");
    }
    const up = dirname(dir);
    if (up === dir) return null;
    dir = up;
  }
}

async function importProvider(name: string): Promise<{ provider?: BackendProvider; reason?: string }> {
  const pkg = packageOf(name);
  let mod: Record<string, unknown> | undefined;
  let firstError: unknown;
  try {
    mod = (await import(/* @vite-ignore */ pkg)) as Record<string, unknown>;
  } catch (e) {
    firstError = e;
    const local = findInProject(pkg, process.cwd());
    if (local) {
      try {
        mod = (await import(pathToFileURL(local).href)) as Record<string, unknown>;
      } catch (e2) {
        firstError = e2;
      }
    }
  }
  if (!mod) {
    const code = (firstError as NodeJS.ErrnoException)?.code;
    if (code === "ERR_MODULE_NOT_FOUND" && String((firstError as Error).message).includes(pkg))
      return { reason: `not installed (npm i ${pkg})` };
    return { reason: `${pkg} failed to load: ${(firstError as Error)?.message?.split("\n")[0] ?? firstError}` };
  }
  const cand = [mod.default, mod[name], ...Object.values(mod)].find(isProvider);
  if (!cand) return { reason: `${pkg} does not export a backend provider` };
  try {
    checkProvider(cand);
  } catch (e) {
    return { reason: (e as Error).message };
  }
  return { provider: cand };
}

export async function probeBackend(name: string): Promise<BackendProbe> {
  const pkg = packageOf(name);
  const { provider, reason } = await importProvider(name);
  if (!provider) return { name, package: pkg, ok: false, reason };
  let r: ReturnType<BackendProvider["available"]>;
  try {
    r = provider.available();
  } catch (e) {
    return { name, package: pkg, ok: false, reason: `probe failed: ${(e as Error).message}`, provider };
  }
  return r.ok ? { name, package: pkg, ok: true, devices: r.devices, provider } : { name, package: pkg, ok: false, reason: r.reason, provider };
}

export async function probeAll(): Promise<BackendProbe[]> {
  const out: BackendProbe[] = [];
  for (const name of Object.keys(KNOWN_BACKENDS)) out.push(await probeBackend(name));
  return out;
}

/** Preference of "auto": accelerators first, the CPU last. */
const AUTO_ORDER = ["cuda", "rocm", "ascend", "cpu"];

/** The backend to run on ("auto": the best one available), or a one-line error that says why it cannot be used. */
export async function getBackend(name: string): Promise<BackendProvider> {
  if (name === "auto") {
    const why: string[] = [];
    for (const n of AUTO_ORDER) {
      const p = await probeBackend(n);
      if (p.ok && p.provider) return p.provider;
      why.push(`${n}: ${p.reason}`);
    }
    throw new UsageError(`no backend is available (${why.join("; ")})`, 1);
  }
  const p = await probeBackend(name);
  if (!p.provider || !p.ok) {
    const known = Object.keys(KNOWN_BACKENDS).join(", ");
    throw new UsageError(`backend "${name}" is not available: ${p.reason}${KNOWN_BACKENDS[name] ? "" : ` (known backends: ${known}, or a package name)`}`, 1);
  }
  return p.provider;
}
