#!/usr/bin/env bash
# Paper Sec. 8 open questions (RESULTS.md section 5): removal / repair by one Newton step vs retraining.
# The commands live in run_here.sh (the one source of truth for what produced RESULTS.md); this runs its sweeps
# unlearn_remove unlearn_repair unlearn_fmnist unlearn_solvers unlearn_precond clean_pipeline clean_pipeline_repair_to clean_pipeline_fmnist clean_pipeline_fmnist_repair_to  (resumable: finished sweeps are skipped; extra arguments are sweep names to restrict to).
set -euo pipefail
cd "$(dirname "$0")"
exec bash run_here.sh ${*:-unlearn_remove unlearn_repair unlearn_fmnist unlearn_solvers unlearn_precond clean_pipeline clean_pipeline_repair_to clean_pipeline_fmnist clean_pipeline_fmnist_repair_to}
