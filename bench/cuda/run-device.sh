#!/usr/bin/env bash
# Runs the GPU checks and the ds3-4L benchmark on a GPU machine (no Node, no registry there).
#
# The GPU check, in one command (packages/backend-cuda/NOTES.md):
#   here:  bash bench/cuda/prepare-device.sh          (.device/: node, headers, gpu.tar.xz; checked under 64 MiB)
#   there: bash bench/cuda/run-device.sh all          (carry .device; results in $OUT/gpu-check.json, .log)
# `all` = bench/cuda/device-check.mjs: conformance (exact, fast), device sampling, NCCL ws 1, the GPU
# checks, the ds3-4L bench if time is left, inside $DS3_CHECK_BUDGET seconds (default 420).
#
# The older, stage-by-stage way:
# Prepare here:  bash ../shared/tools/device-carry.sh && pnpm --filter @ds3/backend-cuda build && \
#                pnpm --filter @ds3/backend-cuda bundle:gpu   (+ the CPU reference addon, see NOTES.md)
#                + bash bench/cuda/build-device.sh --prepare   (napi headers for the NCCL build there)
# Carry: .device packages/backend-cuda/build/Release packages/backend-cuda/build/gpu packages/backend-cuda/build/build
#   bash bench/cuda/run-device.sh [ncclbuild] [check|quick] [nccl] [bench] [sanitizer] [racecheck] [micro] [ncu]
# ncclbuild starts building the NCCL variant in the background (CPU) while the next stages use the GPU;
# nccl waits for it and runs bench/cuda/nccl-check.mjs with it (world size 1: one GPU).
set -uo pipefail
OUT=${OUT:-/tmp/ds3-out}
mkdir -p "$OUT"
source .device/setup.sh >/dev/null
# the bundles and addons prepare-device.sh packed (packages/backend-cuda/build/gpu, build/build/Release)
if [ -f .device/gpu.tar.xz ]; then
  tar -xJf .device/gpu.tar.xz && export DS3_CUDA_ADDON=${DS3_CUDA_ADDON:-$PWD/packages/backend-cuda/build/gpu/ds3_cuda.node}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
stages=${*:-check bench sanitizer}
for s in $stages; do
  echo "=== $s $(date +%T)"
  case $s in
    all) node bench/cuda/device-check.mjs --out "$OUT" --budget "${DS3_CHECK_BUDGET:-420}" ${DS3_CHECK_ARGS:-}; rc_all=$?; echo "device-check exit $rc_all" ;;
    check) timeout 170 node scripts/gpu-check.mjs --json "$OUT/check.json" 2>&1 | tee "$OUT/check.log" | grep -v '^PASS' | tail -45 ;;
    quick) timeout 120 node scripts/gpu-check.mjs --quick --json "$OUT/check.json" 2>&1 | tee "$OUT/check.log" | grep -v '^PASS' | tail -45 ;;
    bench) timeout 280 node bench/cuda/ds3-4L.mjs --out "$OUT/ds3-4L-h100.json" 2>&1 | tee "$OUT/bench.log" | tail -60 ;;
    sanitizer) timeout 200 compute-sanitizer --tool memcheck --print-limit 10 node scripts/gpu-check.mjs --quick 2>&1 | tee "$OUT/sanitizer.log" | grep -E "ERROR SUMMARY|Invalid|FAIL|ALL PASS|FAILED|=========" | head -30 ;;
    racecheck) timeout 240 compute-sanitizer --tool racecheck --print-limit 10 node scripts/gpu-check.mjs --quick 2>&1 | tee "$OUT/racecheck.log" | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard|FAIL|ALL PASS|FAILED" | head -20 ;;
    ncclbuild) ( timeout 300 bash bench/cuda/build-device.sh /tmp/ds3-nccl > /tmp/ds3-nccl.path 2> "$OUT/nccl-build.log"; echo "rc=$?" >> "$OUT/nccl-build.log" ) &
      nccl_pid=$! ;;
    nccl) [ -n "${nccl_pid:-}" ] && wait "$nccl_pid"; tail -4 "$OUT/nccl-build.log"; addon=$(tail -1 /tmp/ds3-nccl.path 2>/dev/null)
      if [ -n "$addon" ] && [ -f "$addon" ]; then
        DS3_CUDA_ADDON="$addon" timeout 120 node bench/cuda/nccl-check.mjs --json "$OUT/nccl.json" 2>&1 | tee "$OUT/nccl.log" | tail -12
      else echo "NCCL build failed"; tail -30 /tmp/ds3-nccl.build.log 2>/dev/null; fi ;;
    micro) timeout 120 node bench/cuda/ds3-4L.mjs --micro --only micro 2>&1 | tee "$OUT/micro.log" | tail -40 ;;
    ncu) timeout 300 ncu --clock-control none --kernel-name-base mangled -k regex:'tc_kernelILb1ELb0E|gemv_kernelILi0ELi1E|mla_absorb_vec|mla_attn_tc' -c 24 --section SpeedOfLight --section Occupancy --section LaunchStats node bench/cuda/ds3-4L.mjs --micro --only micro --reps 1 > "$OUT/ncu.log" 2>&1; grep -E "^  _Z|Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Grid Size" "$OUT/ncu.log" | sed -E 's/ +/ /g' | cut -c1-110 | head -150 ;;
  esac
done
echo "=== done $(date +%T)"
exit "${rc_all:-0}"
