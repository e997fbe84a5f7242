#!/usr/bin/env bash
# Builds the CPU stand-in of CANN's libraries (tests only; never shipped) into standin/build/:
#   libds3standin.so  the shared state (memory, handles, streams, executors, errors)
#   libascendcl.so    aclInit/aclrt*/aclGetRecentErrMsg      (src/runtime.cpp)
#   libnnopbase.so    aclCreateTensor & co.                  (src/nnopbase.cpp)
#   libopapi.so       the aclnn operators                    (src/ops_basic.cpp, src/ops_moe.cpp)
#   libhccl.so        HcclGetRootInfo & co.                  (src/hccl.cpp)
#   too-old/          the same, with a libopapi.so that lacks aclnnMoeFinalizeRoutingV2 (the "CANN too old" case)
# Each library exports only its own group's symbols, as CANN's do; all four link libds3standin.so
# (rpath $ORIGIN), so they share one process-wide state.
# Usage: bash build.sh [--force]   (nothing is rebuilt when every output is newer than every source)
#   ascend-toolkit/latest/  the toolkit's layout around them: lib64 -> <arch>-linux/lib64 -> build/, and
#                     <arch>-linux/ascend_toolkit_install.info (version=...), as CANN's installer writes it
#                     (ASCEND_TOOLKIT_HOME=build/ascend-toolkit/latest finds the libraries and the version)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/build"
CXX="${CXX:-g++}"
mkdir -p "$out"
# two test runs (this package's and test/ascend.test.ts) may build at once: one at a time
if command -v flock >/dev/null && [[ -z "${DS3_STANDIN_LOCKED:-}" ]]; then
  exec env DS3_STANDIN_LOCKED=1 flock "$out/.lock" bash "${BASH_SOURCE[0]}" "$@"
fi
if [[ "${1:-}" != "--force" && -f "$out/too-old/libopapi.so" && -f "$out/ascend-toolkit/latest/$(uname -m)-linux/ascend_toolkit_install.info" ]]; then
  stale=0
  for f in "$here"/src/* "$here/build.sh"; do [[ "$f" -nt "$out/too-old/libopapi.so" ]] && stale=1; done
  [[ $stale == 0 ]] && exit 0
fi
mkdir -p "$out/too-old"
flags=(-std=c++17 -O2 -g -fPIC -pthread -ffp-contract=off -Wall -Wextra -Wno-unused-parameter)  # no FMA contraction: the
# documented arithmetic is a rounded product, then a rounded sum
obj() { "$CXX" "${flags[@]}" "${@:3}" -c "$here/src/$1" -o "$out/$2"; }
obj core.cpp core.o &
obj runtime.cpp runtime.o -fvisibility=hidden &
obj nnopbase.cpp nnopbase.o -fvisibility=hidden &
obj hccl.cpp hccl.o -fvisibility=hidden &
wait
obj ops_basic.cpp ops_basic.o -fvisibility=hidden &
obj ops_moe.cpp ops_moe.o -fvisibility=hidden &
obj ops_moe.cpp ops_moe_old.o -fvisibility=hidden -DDS3_STANDIN_TOO_OLD &
wait
link() {  # name, dir, rpath, objects...
  "$CXX" -shared -pthread -o "$2/lib$1.so.tmp" "${@:4}" -Wl,-soname,"lib$1.so" -Wl,--no-undefined \
    -Wl,--no-as-needed -L"$out" -lds3standin -Wl,-rpath,"$3"
  mv -f "$2/lib$1.so.tmp" "$2/lib$1.so"
}
"$CXX" -shared -pthread -o "$out/libds3standin.so.tmp" "$out/core.o" -Wl,-soname,libds3standin.so -Wl,--no-undefined
mv -f "$out/libds3standin.so.tmp" "$out/libds3standin.so"
link ascendcl "$out" '$ORIGIN' "$out/runtime.o"
link nnopbase "$out" '$ORIGIN' "$out/nnopbase.o"
link hccl "$out" '$ORIGIN' "$out/hccl.o"
link opapi "$out" '$ORIGIN' "$out/ops_basic.o" "$out/ops_moe.o"
link opapi "$out/too-old" '$ORIGIN' "$out/ops_basic.o" "$out/ops_moe_old.o"
# the same files (same inode: dlopen gives back the objects already loaded), and libds3standin.so next to
# them because $ORIGIN is the folder a library was opened from, symlink or not
for l in ascendcl nnopbase hccl ds3standin; do ln -sfn "../lib$l.so" "$out/too-old/lib$l.so"; done
arch="$(uname -m)-linux"
tk="$out/ascend-toolkit/latest"
mkdir -p "$tk/$arch"
ln -sfn ../../.. "$tk/$arch/lib64"
ln -sfn "$arch/lib64" "$tk/lib64"
cat >"$tk/$arch/ascend_toolkit_install.info" <<EOF
package_name=Ascend-cann-toolkit
version=8.2.RC1.standin
innerversion=ds3 CPU stand-in of the CANN C interface (tests only)
arch=$(uname -m)
os=linux
path=$tk/$arch
EOF
echo "ascend stand-in built in $out"
