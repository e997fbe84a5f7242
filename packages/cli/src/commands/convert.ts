// ds3 convert --to bf16 SRC DST: an FP8 checkpoint to BF16 (DeepSeek's fp8_cast_bf16.py).
import type { Argv } from "yargs";
import { type ConvertProgress, convertToBf16 } from "@ds3/core";
import { ProgressBar, UsageError, fmtBytes, notice } from "../ui.js";

interface Args {
  src: string;
  dst: string;
  to: string;
}

export const command = "convert <src> <dst>";
export const describe = "convert a checkpoint: --to bf16 dequantizes FP8 weights (atomic; an interrupted run resumes)";

export function builder(y: Argv): Argv {
  return y
    .positional("src", { type: "string", describe: "source checkpoint directory" })
    .positional("dst", { type: "string", describe: "output directory (must not exist)" })
    .options({
      to: { type: "string", choices: ["bf16"], demandOption: "give the target format: --to bf16", describe: "target format", requiresArg: true },
    })
    .example("$0 convert --to bf16 DeepSeek-V3 DeepSeek-V3-bf16", "");
}

export async function handler(a: Args): Promise<void> {
  if (a.to !== "bf16") throw new UsageError(`--to ${a.to}: only bf16 is supported`);
  let bar: ProgressBar | null = null;
  const t0 = performance.now();
  const onProgress = (p: ConvertProgress) => {
    if (p.phase === "start") {
      notice(p.message ?? "converting");
      bar = new ProgressBar("converting", p.bytesTotal);
    } else if (p.phase === "skip") {
      notice(p.message ?? "");
      bar?.update(p.bytesDone);
    } else if (p.phase === "tensor") bar?.update(p.bytesDone, p.file);
    else if (p.phase === "files") bar?.update(p.bytesDone);
  };
  const r = await convertToBf16(a.src, a.dst, { onProgress });
  (bar as ProgressBar | null)?.finish(
    `converted ${r.converted} FP8 weights to BF16, dropped ${r.dropped} weight_scale_inv, ${r.tensors} tensors, ${fmtBytes(r.bytes)} in ${((performance.now() - t0) / 1000).toFixed(1)} s` +
      (r.resumedShards ? ` (${r.resumedShards} shard(s) resumed from an earlier run)` : ""),
  );
  process.stdout.write(`${r.dir}\n`);
}
