#!/usr/bin/env node
// ds3: the command line of ds3, a DeepSeek-V3 inference runtime for Node.js.
// One file per command under commands/, each { command, describe, builder, handler }.
import yargs, { type CommandModule } from "yargs";
import { hideBin } from "yargs/helpers";
import * as chat from "./commands/chat.js";
import * as convert from "./commands/convert.js";
import * as generate from "./commands/generate.js";
import * as inspect from "./commands/inspect.js";
import * as score from "./commands/score.js";
import * as selftest from "./commands/selftest.js";
import * as serve from "./commands/serve.js";
import * as tokenize from "./commands/tokenize.js";
import { UsageError, printError, ui } from "./ui.js";

declare const __DS3_VERSION__: string;

interface Command {
  command: string;
  describe: string;
  builder: (y: ReturnType<typeof yargs>) => ReturnType<typeof yargs>;
  handler: (a: never) => Promise<void>;
}

const COMMANDS: Command[] = [chat, generate, score, serve, tokenize, convert, inspect, selftest] as unknown as Command[];

function toModule(c: Command): CommandModule {
  return {
    command: c.command,
    describe: c.describe,
    builder: c.builder as never,
    handler: async (argv) => {
      ui.verbose = argv.verbose === true;
      ui.quiet = argv.quiet === true;
      await c.handler(argv as never);
    },
  };
}

process.stdout.on("error", (e: NodeJS.ErrnoException) => {
  if (e.code === "EPIPE") process.exit(0); // the reader went away (e.g. | head)
  throw e;
});

/** yargs' "Unknown arguments: bogus-flag, bogusFlag" as "unknown option --bogus-flag" (or an unknown command). */
function explainUnknown(msg: string, args: string[]): string {
  const m = /^Unknown arguments?: (.*)$/.exec(msg);
  if (!m) return msg;
  const first = args[0];
  if (first && !first.startsWith("-") && !COMMANDS.some((c) => c.command.split(" ")[0] === first))
    return `unknown command "${first}" (commands: ${COMMANDS.map((c) => c.command.split(" ")[0]).join(", ")})`;
  const names = m[1]!.split(", ");
  const kebab = (x: string) => x.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
  const shown = names.filter((n) => !(kebab(n) !== n && names.includes(kebab(n))));
  const flag = (n: string) => (args.some((a) => a === `--${n}` || a.startsWith(`--${n}=`)) ? `--${n}` : args.includes(`-${n}`) ? `-${n}` : null);
  const flags = shown.map(flag).filter((x): x is string => x !== null);
  const extra = shown.filter((n) => flag(n) === null);
  const parts = [];
  if (flags.length) parts.push(`unknown option${flags.length > 1 ? "s" : ""} ${flags.join(", ")}`);
  if (extra.length) parts.push(`unexpected argument${extra.length > 1 ? "s" : ""} ${extra.map((x) => JSON.stringify(x)).join(", ")}`);
  return parts.join("; ");
}

async function main(argv: string[]): Promise<number> {
  const args = hideBin(argv);
  ui.verbose = args.includes("--verbose");
  let y = yargs(args)
    .scriptName("ds3")
    .usage("$0 <command> [options]\n\nDeepSeek-V3 inference for Node.js. Without --model, ds3 runs a built-in tiny DeepSeek-V3 with random weights (its output is noise).")
    .option("verbose", { type: "boolean", global: true, describe: "print the stack with errors, and progress details (how the nodes of --nnodes join)" })
    .option("quiet", { alias: "q", type: "boolean", global: true, describe: "no notices on stderr" });
  for (const c of COMMANDS) y = y.command(toModule(c));
  y = y
    .demandCommand(1, "give a command")
    .strict()
    .recommendCommands()
    .help()
    .alias("help", "h")
    .version(__DS3_VERSION__)
    .alias("version", "V")
    .wrap(Math.min(110, y.terminalWidth()))
    .fail((msg, err) => {
      // validation failures come as a message, errors of coercions and handlers as err
      if (err) throw err;
      throw new UsageError(msg);
    });
  try {
    await y.parseAsync();
    return 0;
  } catch (e) {
    const usage = e instanceof UsageError || (e as Error)?.name === "YError";
    if (usage) (e as Error).message = explainUnknown((e as Error).message, args);
    const cmd = COMMANDS.find((c) => c.command.split(" ")[0] === args[0]);
    printError(e, usage && (e as UsageError).exitCode !== 1 ? ` (see: ds3 ${cmd ? `${args[0]} ` : ""}--help)` : "");
    return e instanceof UsageError ? e.exitCode : usage ? 2 : 1;
  }
}

main(process.argv).then(
  (code) => process.exit(code),
  (e) => {
    printError(e);
    process.exit(1);
  },
);
