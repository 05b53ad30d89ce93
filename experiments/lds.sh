#!/usr/bin/env bash
# Linear Datamodeling Score (RESULTS.md section 4); kronfluence's LDS: experiments/lds_peer.py.
# The commands live in run_here.sh (the one source of truth for what produced RESULTS.md); this runs its sweeps
# lds lds_damping lds_seeds lds_ensemble  (resumable: finished sweeps are skipped; extra arguments are sweep names to restrict to).
set -euo pipefail
cd "$(dirname "$0")"
exec bash run_here.sh ${*:-lds lds_damping lds_seeds lds_ensemble}
