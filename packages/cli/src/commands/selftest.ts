// ds3 selftest: the backend conformance suite of @ds3/core on this machine's hardware — every op
// of the contract against float64 references at each precision (exact; bf16, fp8, fp8-ue8m0 and
// fp8-fnuz against a reference emulating the same quantization, and the quantizers themselves
// exactly), rank placement, and with golden checkpoints the end-to-end logits through 1, 2 and 4
// worker ranks (the collectives). Prints a pass/fail table per precision with the worst error per
// check (or --json), for users with hardware the project cannot test on to run and send back.
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import type { Argv } from "yargs";
import { formatConformance, PRECISION_NAMES, type PrecisionName, runConformance } from "@ds3/core";
import { getBackend } from "../backends.js";
import { notice, UsageError } from "../ui.js";

interface Args {
  backend: string;
  golden?: string[];
  json?: boolean;
  precision: string;
  worldSizes: string;
}

export const command = "selftest";
export const describe = "run the backend conformance suite (every op, rank placement, golden checkpoints) and print pass/fail with the worst error per check";

export function builder(y: Argv): Argv {
  return y
    .options({
      backend: { type: "string", default: "auto", describe: "backend to test: auto (the best one found), cpu, cuda, rocm, ascend or a package name", requiresArg: true },
      golden: { type: "string", array: true, describe: "golden checkpoint directory (golden.json + golden.f32 with the weights) for the end-to-end checks; repeatable (default: the repository's test fixtures when ds3 runs from a checkout)", requiresArg: true },
      json: { type: "boolean", describe: "print the report as one JSON object" },
      precision: {
        type: "string",
        default: "all",
        describe: `precisions to run, comma separated: ${PRECISION_NAMES.join(", ")} or all (every precision the backend supports; the others are reported as not supported). A precision named here that the backend does not support fails`,
        requiresArg: true,
      },
      "world-sizes": { type: "string", default: "1,2,4", describe: "world sizes of the end-to-end checks through worker ranks, comma separated", requiresArg: true },
    })
    .example("$0 selftest --backend cuda", "")
    .example("$0 selftest --json > report.json", "")
    .example("$0 selftest --backend rocm --precision fp8-fnuz", "");
}

/** The repository's golden fixtures, when this CLI runs from a checkout (packages/cli/dist). */
function checkoutFixtures(): string[] {
  const root = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
  return ["tiny-v3", "tiny-v3-bf16"].map((n) => join(root, "test/fixtures", n)).filter((d) => existsSync(join(d, "golden.json")));
}

/** --precision: "all" or a comma-separated list of names */
function parsePrecision(v: string): PrecisionName[] | "all" {
  const list = v.split(",").map((x) => x.trim());
  if (list.length === 1 && list[0] === "all") return "all";
  for (const x of list)
    if (!(PRECISION_NAMES as readonly string[]).includes(x)) throw new UsageError(`--precision: "${x}" is not a precision (${PRECISION_NAMES.join(", ")}, or all)`, 2);
  return list as PrecisionName[];
}

/** --world-sizes: positive integers, comma separated */
function parseWorldSizes(v: string): number[] {
  const list = v.split(",").map((x) => x.trim());
  for (const x of list) if (!/^[1-9]\d*$/.test(x)) throw new UsageError(`--world-sizes: "${x}" is not a positive integer (in "${v}")`, 2);
  return list.map(Number);
}

export async function handler(a: Args): Promise<void> {
  const precision = parsePrecision(a.precision);
  const worldSizes = parseWorldSizes(a.worldSizes);
  const provider = await getBackend(a.backend);
  const golden = a.golden ?? checkoutFixtures();
  for (const d of a.golden ?? []) if (!existsSync(join(d, "golden.json"))) throw new UsageError(`--golden ${d}: no golden.json there`, 2);
  if (!golden.length) notice("no --golden DIR given (and no repository fixtures found): the end-to-end checks through worker ranks do not run");
  const report = await runConformance(provider, { precision, worldSizes, goldenDirs: golden.map((d) => resolve(d)) });
  if (a.json) process.stdout.write(JSON.stringify(report) + "\n"); // a worst error that is not a number (NaN, inf) is null
  else process.stdout.write(formatConformance(report) + "\n");
  if (!report.ok) throw new UsageError(`selftest failed on backend ${report.backend}: ${report.checks.filter((c) => !c.ok).map((c) => `${c.name} [${c.precision}]`).join("; ")}`, 1);
}
