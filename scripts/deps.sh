#!/usr/bin/env bash
# Installs the Debian packages Multipole needs, when run as root and they are missing.
# usage: deps.sh [engine|all]: `engine` builds and runs the engine, its tools and the server
# (scripts/run.sh); `all` (the default) adds what the tests need: GoogleTest, and NumPy and
# PyTorch for the cross-checks and the trainer (scripts/test.sh).
set -euo pipefail
# tests: also clang, libclang-rt-dev (libFuzzer) and libomp-dev (OpenMP for clang) for the fuzz
# targets; chromium for the playground page's browser test (tests/browser); python3-aiohttp for
# the load scripts (bench/soak.py runs in CI, bench/serve.py); redis-server for the shared session
# store's tests (tests/test_sessions.cpp starts its own), haproxy to check deploy/haproxy.cfg,
# both for scripts/cluster.sh's end-to-end test (tests/cluster); python3-yaml to check the
# Kubernetes manifests (tests/deploy); shellcheck and pyflakes3 for the shell and Python scripts
# (tests/CMakeLists.txt).
# The engine's libhiredis-dev: the server's Redis session store.
engine=(cmake ninja-build g++ pkg-config libsentencepiece-dev nlohmann-json3-dev libcpp-httplib-dev
        libdnnl-dev libhiredis-dev)
tests=(libgtest-dev sentencepiece python3-numpy python3-torch python3-sentencepiece clang
       libclang-rt-dev libomp-dev chromium python3-aiohttp redis-server haproxy python3-yaml
       shellcheck pyflakes3)
case "${1:-all}" in
  engine) pkgs=("${engine[@]}") ;;
  all) pkgs=("${engine[@]}" "${tests[@]}") ;;
  *) echo "usage: deps.sh [engine|all]" >&2; exit 2 ;;
esac
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
