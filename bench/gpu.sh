#!/usr/bin/env bash
# Everything the GPU machine does in one call: the CUDA tests, compute-sanitizer memcheck and
# racecheck on the kernel tests, bench_cuda and the PyTorch baselines. Binaries are built here
# (scripts/gpu_bundle.sh) and carried in .carry/gpu. Results go to $OUT. MODEL (default
# models/default.gguf) is the model bench_cuda times: issue 13's targets were set on the model
# shipped before session 11 (git show e1ff7a6:models/default.gguf), carried then in its place;
# sessions 16-20 measured them on the m = 64 model of those sessions (git show
# dc88985:models/default.gguf), the figures to compare with; session 21's model (m = 256) decodes
# 14 % slower at batch 1 (docs/PERF.md).
# BENCH_ARGS: bench_cuda's options (default: all its tables); SANITIZER_SECONDS: each sanitizer's
# cap (150); NCU_DECODE="1 256": ncu's time of each kernel of a decode step at those batches
# (NCU_CACHE=none: caches not flushed between kernels); NCU_PROMPT=1: ncu's time of each kernel
# of the last 64K-token chunk of a 1M-token prompt (caches kept);
# SKIP_TORCH: no PyTorch baselines.
set -uo pipefail
root=$(pwd)
bash scripts/gpu_unpack.sh || exit
export LD_LIBRARY_PATH=$root/.carry/gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export MULTIPOLE_TEST_DATA=$root/tests/data
bin=$root/.carry/gpu/bin
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
"$bin/multipole_gpu_tests" > "$out/gpu_tests.log" 2>&1; echo "gpu tests rc $?"
grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|rel_err|Which is" "$out/gpu_tests.log" | head -40
# racecheck instruments every shared-memory access: it gets the smaller tests.
for tool in memcheck racecheck; do
  filter='Cuda.RmsNorm*:Models/CudaModel.*/groupedconv:Models/CudaModel.*/exact:Models/CudaModel.*/one_pass_groupedconv:Cuda.BatchedDecode*:Cuda.Sampling*:Cuda.ForwardSample*:Cuda.TensorCoreAttentionMatchesTheFp32Tile:Cuda.OnePassSummariesMatchThePerLevelKernelsInEveryShape:Cuda.AppendTokens*:Cuda.ExactBatchedDecode*:Cuda.DecodeAttention*:Cuda.AttentionRounds*:Cuda.MixedSteps*'
  [ $tool = racecheck ] && filter='Cuda.RmsNorm*:Cuda.GemvWith*:Cuda.Q8Gemv*:Cuda.ExactDecodeAttention*:Cuda.DecodeAttention*:Cuda.AttentionRounds*:Cuda.TensorCoreAttentionMatchesTheFp32Tile:Cuda.SamplingKernelMatchesHostSampler:Cuda.OnePassSummariesMatchThePerLevelKernelsInEveryShape'
  timeout ${SANITIZER_SECONDS:-150} compute-sanitizer --tool $tool --error-exitcode 9 "$bin/multipole_gpu_tests" \
    --gtest_filter="$filter" > "$out/sanitizer_$tool.log" 2>&1
  echo "compute-sanitizer $tool rc $?: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -1)"
done
"$bin/bench_cuda" "${MODEL:-models/default.gguf}" ${BENCH_ARGS:-} > "$out/bench_cuda.md" 2>&1; echo "bench_cuda rc $?"
cat "$out/bench_cuda.md"
# NCU_DECODE="1 256": ncu's time of each kernel of one decode step at those batch sizes, caches
# flushed before each kernel (NCU_CACHE=none: kept, nearer a step's warm caches).
for b in ${NCU_DECODE:-}; do
  timeout 300 ncu --clock-control none --cache-control ${NCU_CACHE:-all} --profile-from-start off --section SpeedOfLight \
    --print-summary per-kernel "$bin/bench_cuda" "${MODEL:-models/default.gguf}" --profile-decode "$b" \
    > "$out/ncu_decode_$b.txt" 2>&1
  echo "ncu decode batch $b rc $?"
done
if [ -n "${NCU_PROMPT:-}" ]; then
  timeout 300 ncu --clock-control none --cache-control none --profile-from-start off --section SpeedOfLight \
    --print-summary per-kernel "$bin/bench_cuda" "${MODEL:-models/default.gguf}" --profile-prompt \
    > "$out/ncu_prompt.txt" 2>&1
  echo "ncu prompt rc $?"
fi
[ -n "${SKIP_TORCH:-}" ] && exit 0  # the PyTorch baselines take about 90 s
PYTHONUNBUFFERED=1 timeout 200 python3 bench/attention_torch.py > "$out/bench_torch.md" 2>&1; echo "torch rc $?"
cat "$out/bench_torch.md"
