#!/usr/bin/env bash
# Fetch GemLite 0.6.0.post2's sdist (pure Python over Triton, ~180 KB) into .gemlite/ (git-ignored),
# unpacked, for the side-by-side kernel comparison on the GPU machine (bench/gpu_quant.sh carries
# it with the device call and puts .gemlite/src on PYTHONPATH). Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version=0.6.0.post2
dest=.gemlite
grep -qxF "/$dest/" .git/info/exclude 2>/dev/null || echo "/$dest/" >> .git/info/exclude
if [ -d "$dest/src/gemlite" ]; then
  echo "$dest/src/gemlite already there"
  exit 0
fi
mkdir -p "$dest"
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pip download --no-deps --no-binary :all: "gemlite==$version" -d "$dest" -q
tar -xzf "$dest"/gemlite-"$version".tar.gz -C "$dest"
rm -rf "$dest/src"
mkdir -p "$dest/src"
cp -r "$dest"/gemlite-"$version"/gemlite "$dest/src/gemlite"
rm -rf "$dest"/gemlite-"$version" "$dest"/gemlite-"$version".tar.gz  # carry only the package
echo "gemlite $version in $dest/src (PYTHONPATH=$dest/src)"
