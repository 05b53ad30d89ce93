#!/usr/bin/env bash
# MNIST, 5k real digits (RESULTS.md section 6b): Fig. 2 and Fig. 3 on dataset=mnist_5k.
# The commands live in run_here.sh (the one source of truth for what produced RESULTS.md); this runs its sweeps
# mnist5k_attribution mnist5k_mislabel  (resumable: finished sweeps are skipped; extra arguments are sweep names to restrict to).
set -euo pipefail
cd "$(dirname "$0")"
exec bash run_here.sh ${*:-mnist5k_attribution mnist5k_mislabel}
