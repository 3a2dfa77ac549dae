#!/usr/bin/env bash
# Runs the fuzz targets of a MULTIPOLE_FUZZ build over their seed corpora.
#   tests/fuzz/run.sh BUILD_DIR SECONDS [TARGET...]   (default: every target BUILD_DIR holds)
# Each target runs SECONDS, one after the other, with new inputs kept in a scratch corpus (the
# committed seeds are not touched). Exit status 1 and the crashing input's path on a finding.
set -euo pipefail
build=$1 seconds=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then  # every target built (the list: tests/CMakeLists.txt)
  shopt -s nullglob
  for f in "$build"/tests/fuzz/fuzz_*; do targets+=("${f##*/fuzz_}"); done
  [ ${#targets[@]} -gt 0 ] || { echo "no fuzz targets built in $build/tests/fuzz" >&2; exit 2; }
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "$work/artifacts-$t"
  echo "== fuzz_$t: ${seconds}s"
  if ! "$build/tests/fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=20 -rss_limit_mb=2560 \
      -print_final_stats=1 -artifact_prefix="$work/artifacts-$t/" \
      "$work/$t" "$here/corpus/$t" 2>"$work/$t.log"; then
    tail -n 60 "$work/$t.log"
    mkdir -p "$build/fuzz-findings"
    cp "$work/artifacts-$t"/* "$build/fuzz-findings/" 2>/dev/null || true
    echo "fuzz_$t found a problem; the input is in $build/fuzz-findings/" >&2
    exit 1
  fi
  grep -E "^stat::number_of_executed_units|^#[0-9]+ *DONE" "$work/$t.log" | tail -n 2
done
