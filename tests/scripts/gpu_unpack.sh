#!/usr/bin/env bash
# scripts/source_hash.sh and scripts/gpu_unpack.sh: the hash follows the code files and nothing
# else; a bundle of this tree's sources unpacks, one of other sources is refused (exit 4) unless
# ALLOW_OTHER_SOURCES=1.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

tree=$tmp/tree
mkdir -p "$tree"/{engine,kernels,server,tools,tests,bench,docs}
echo 'project(x)' > "$tree/CMakeLists.txt"
echo '__global__ void k() {}' > "$tree/kernels/k.cu"
echo 'int main() {}' > "$tree/engine/a.cpp"
h0=$(bash "$root/scripts/source_hash.sh" "$tree")
echo 'notes' > "$tree/docs/x.md"
echo 'print(1)' > "$tree/tools/t.py"
[ "$(bash "$root/scripts/source_hash.sh" "$tree")" = "$h0" ] || fail "the hash read a non-code file"
echo '__global__ void k() { }' > "$tree/kernels/k.cu"
[ "$(bash "$root/scripts/source_hash.sh" "$tree")" != "$h0" ] || fail "the hash missed a kernel's change"

pack() {  # BUNDLE-DIR HASH: a bundle holding bin/tool and SOURCE_HASH
  local stage=$tmp/stage
  rm -rf "$stage" "$1" && mkdir -p "$stage/bin" "$1"
  echo tool > "$stage/bin/tool"
  echo "$2" > "$stage/SOURCE_HASH"
  tar -C "$stage" -cf - . | xz > "$1/bundle.tar.xz"
}
pack "$tmp/good" "$(bash "$root/scripts/source_hash.sh")"
bash "$root/scripts/gpu_unpack.sh" "$tmp/good" || fail "this tree's bundle was refused"
[ -f "$tmp/good/bin/tool" ] || fail "not unpacked"
pack "$tmp/stale" 0123456789abcdef
set +e
bash "$root/scripts/gpu_unpack.sh" "$tmp/stale" 2> "$tmp/err"
rc=$?
set -e
[ $rc = 4 ] || fail "a stale bundle gave exit $rc, not 4"
grep -q "other sources" "$tmp/err" || fail "no reason given: $(cat "$tmp/err")"
ALLOW_OTHER_SOURCES=1 bash "$root/scripts/gpu_unpack.sh" "$tmp/stale" || fail "ALLOW_OTHER_SOURCES"
echo "gpu_unpack: ok"
