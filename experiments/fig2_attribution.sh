#!/usr/bin/env bash
# Paper Fig. 2 (RESULTS.md section 2): most helpful / harmful training images (FashionMNIST).
# The commands live in run_here.sh (the one source of truth for what produced RESULTS.md); this runs its sweeps
# attribution  (resumable: finished sweeps are skipped; extra arguments are sweep names to restrict to).
# MNIST: see mnist5k.sh (real digits, offline); full MNIST needs its IDX files: influencelab experiment=attribution dataset=mnist
set -euo pipefail
cd "$(dirname "$0")"
exec bash run_here.sh ${*:-attribution}
