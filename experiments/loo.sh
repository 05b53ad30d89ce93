#!/usr/bin/env bash
# Leave-one-out retraining vs prediction (RESULTS.md section 2, Koh & Liang style), digits.
# The commands live in run_here.sh (the one source of truth for what produced RESULTS.md); this runs its sweeps
# loo loo_warm  (resumable: finished sweeps are skipped; extra arguments are sweep names to restrict to).
set -euo pipefail
cd "$(dirname "$0")"
exec bash run_here.sh ${*:-loo loo_warm}
