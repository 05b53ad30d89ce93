#!/usr/bin/env bash
# Runs HERE (no GPU needed), before a device session: gathers what the lent GPU machine lacks into .gpu_carry/
# (git-ignored; carried with the call, under the tool's 64 MiB limit together with the working tree):
#   wheels/        hydra-core, omegaconf, antlr4-python3-runtime (built here: PyPI has only its sdist),
#                  kronfluence and einconv, for Python 3.12 (the device has torch, timm, scipy, pandas, ...)
#   FashionMNIST/raw/  the four IDX files of Debian's dataset-fashion-mnist (INFLUENCELAB_DATA=.gpu_carry there)
# Then, through the device tool:  run(command="bash benchmarks/gpu/run.sh", carry=[".gpu_carry"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.gpu_carry
PY=${PYTHON:-python3}
rm -rf "$DEST/wheels"
mkdir -p "$DEST/wheels" "$DEST/FashionMNIST/raw"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$DEST/wheels" hydra-core==1.3.2 omegaconf==2.3.0 kronfluence==1.0.1 einconv==0.1.0
"$PY" -m pip wheel -q --no-deps -w "$DEST/wheels" antlr4-python3-runtime==4.9.3
SRC=/usr/share/datasets/fashion-mnist
if [ -e "$SRC/train-images-idx3-ubyte.gz" ]; then
  cp "$SRC"/*-ubyte.gz "$DEST/FashionMNIST/raw/"
else
  echo "no FashionMNIST in $SRC: apt-get install dataset-fashion-mnist (the cnn/resnet18 cases need it)" >&2
fi
ls -1 "$DEST/wheels"
du -sh "$DEST"
