#!/usr/bin/env bash
# Installs the Debian packages Multipole needs, when run as root and they are missing.
set -euo pipefail
pkgs=(cmake ninja-build g++ pkg-config libsentencepiece-dev sentencepiece nlohmann-json3-dev
      libcpp-httplib-dev libgtest-dev python3-numpy python3-torch python3-sentencepiece
      chromium)  # chromium: the playground page's browser test (tests/browser)
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
