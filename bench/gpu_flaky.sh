#!/usr/bin/env bash
# The hunt for the flaky GPU result (docs/PERF.md, sessions 20-21), in steps that fit beside other
# work in a call: the suite once, the mixed-step and step-loop tests repeated, compute-sanitizer's
# initcheck, racecheck and synccheck on them, each step capped; logs and a summary in OUT.
# usage (repository root, GPU machine): bench/gpu_flaky.sh OUT STEP...
#   STEP: suite mixed steploop steploop_serial initcheck racecheck synccheck
#   GPU_BUNDLE: scripts/gpu_bundle.sh's bin/ and lib/, unpacked (default /tmp/gpu)
set -u
o=$1; shift; steps=" $* "; mkdir -p "$o"
gpu=${GPU_BUNDLE:-/tmp/gpu}
export LD_LIBRARY_PATH=$gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export MULTIPOLE_TEST_DATA=$PWD/tests/data
t=$gpu/bin/multipole_gpu_tests
run() {  # NAME SECONDS COMMAND...
  local name=$1 limit=$2 s
  s=$(date +%s)
  shift 2
  [[ $steps == *" $name "* ]] || return 0
  timeout "$limit" "$@" > "$o/$name.log" 2>&1
  echo "$name: rc $? in $(( $(date +%s) - s )) s; $(grep -cE '^\[  FAILED  \] [A-Za-z]' "$o/$name.log") failed lines; $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|SYNCCHECK SUMMARY' "$o/$name.log" | tail -1)"
}
run suite 240 "$t"
run mixed 150 "$t" --gtest_filter='Cuda.MixedSteps*' --gtest_repeat=10
run steploop 150 "$t" --gtest_filter='Cuda.ReplicaStepLoops*' --gtest_repeat=60
run steploop_serial 120 env MULTIPOLE_CUDA_SERIAL_LAUNCHES=1 "$t" --gtest_filter='Cuda.ReplicaStepLoops*' --gtest_repeat=40
# Every report kept (the first 100 were all split_qkv_rope reading cuBLAS's output, session 21),
# then counted by kernel below.
run initcheck 150 compute-sanitizer --tool initcheck --check-api-memory-access no --print-limit 100000 --error-exitcode 9 "$t" --gtest_filter='Cuda.ReplicaStepLoops*:Cuda.MixedSteps*'
run racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 9 "$t" --gtest_filter='Cuda.GemvWith*:Cuda.Q8*:Cuda.AppendTokens*:Cuda.ReplicaStepLoops*'
run synccheck 100 compute-sanitizer --tool synccheck --error-exitcode 9 "$t" --gtest_filter='Cuda.ReplicaStepLoops*:Cuda.MixedSteps*'
grep -E '^\[  (FAILED|PASSED) ' "$o/suite.log" 2>/dev/null | head -20
for f in mixed steploop steploop_serial; do
  echo "== $f"; grep -E 'Failure|token [0-9]+;|seed [0-9]+ run|rel_err|Which is|Expected' "$o/$f.log" 2>/dev/null | sort | uniq -c | sort -rn | head -20
done
grep -oE '^=========     at [^(]+' "$o/initcheck.log" 2>/dev/null | sort | uniq -c | sort -rn | head -20
