#!/usr/bin/env bash
# Linear Datamodeling Score (RESULTS.md section 4), then kronfluence's LDS on the same ground truth.
# The commands live in run_here.sh (the one source of truth for what produced RESULTS.md); this runs its sweeps
# lds lds_damping lds_seeds lds_ensemble  (resumable: finished sweeps are skipped; extra arguments are sweep names to
# restrict to), then experiments/lds_peer.py on the lds sweep's EK-FAC job (-> experiments/results/lds_peer/).
set -euo pipefail
cd "$(dirname "$0")"
bash run_here.sh ${*:-lds lds_pcg lds_damping lds_seeds lds_ensemble}
if [ -e ../multirun/lds/0/lds.csv ]; then "${PY:-../.venv/bin/python}" lds_peer.py ../multirun/lds/0; fi
if [ -e results/lds_pcg/job0_lds.csv ]; then  # PCG paired with EK-FAC on the same ground truth
  "${PY:-../.venv/bin/python}" lds_pair.py results/lds/job0_lds.csv results/lds_pcg/job0_lds.csv \
    --out results/lds_pcg/paired_vs_ekfac.csv
fi
