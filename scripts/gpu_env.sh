# shellcheck shell=bash
# Sourced by the GPU scripts (bench/*_gpu.sh) on the GPU machine, from the repository root:
# unpacks the carried bundle (scripts/gpu_bundle.sh), sets root, bin, out ($OUT) and the library
# path, and runs the CUDA tests into $out/gpu_tests.log unless SKIP_TESTS is set.
root=$(pwd)
bash scripts/gpu_unpack.sh || exit
export LD_LIBRARY_PATH=$root/.carry/gpu/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export MULTIPOLE_TEST_DATA=$root/tests/data PYTHONUNBUFFERED=1
bin=$root/.carry/gpu/bin
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -z "${SKIP_TESTS:-}" ]; then
  "$bin/multipole_gpu_tests" > "$out/gpu_tests.log" 2>&1; echo "gpu tests rc $?"
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Which is" "$out/gpu_tests.log" | head -30
fi
