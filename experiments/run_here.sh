#!/usr/bin/env bash
# Everything in experiments/RESULTS.md that runs on this repository's CPU machine (2 cores, no GPU), in order.
# Outputs: multirun/<name>/ (git-ignored); tables and figures are copied to experiments/results/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
IL="${IL:-.venv/bin/influencelab}"
REPORT="${REPORT:-.venv/bin/influencelab-report}"
run() {  # run NAME ARGS...: a multirun into multirun/NAME, then its report copied to experiments/results/NAME
  local name=$1; shift
  local t0=$SECONDS
  if [ ! -e "multirun/$name/.done" ]; then  # resumable: finished sweeps are skipped
    "$IL" -m "$@" logger=none hydra.sweep.dir="multirun/$name"
    touch "multirun/$name/.done"
  fi
  "$REPORT" "multirun/$name" > /dev/null
  mkdir -p "experiments/results/$name"
  cp "multirun/$name/report.md" "multirun/$name/report.csv" "experiments/results/$name/"
  [ -d "multirun/$name/report_figures" ] && cp multirun/"$name"/report_figures/*.png "experiments/results/$name/"
  for d in multirun/"$name"/*/; do
    [ -d "$d/figures" ] && for f in "$d"/figures/*.png; do cp "$f" "experiments/results/$name/job$(basename "$d")_$(basename "$f")"; done
  done
  echo "$name: $((SECONDS - t0)) s" | tee -a experiments/results/timings.txt
}
run mislabel_standard experiment=mislabel solver=ekfac,kfac,identity
run mislabel_memorize experiment=mislabel_memorize solver=ekfac,kfac,identity
run ihvp_cnn experiment=ihvp_cnn dataset.subset=2000 query.n=8 solver=ekfac,kfac,lissa solver.damping=1e-4,1e-3,1e-2,1e-1,1
run lds experiment=lds solver=ekfac,kfac,identity
run lds_damping experiment=lds solver=ekfac solver.damping=1e-4,1e-2,1e-1,auto
run lds_seeds experiment=lds solver=ekfac,identity lds.seeds_per_subset=2
run mislabel_lissa experiment=mislabel dataset.subset=1000 solver=lissa solver.depth=50
