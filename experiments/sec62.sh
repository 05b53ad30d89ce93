#!/usr/bin/env bash
# Section 3's exact-reference figures and their data (experiments/results/sec62/<setting>.png and .csv), from the
# committed per-query files of the sweeps named in run_here.sh (run ihvp_cnn_exact ... ihvp_resnet18_exact).
# A series is LABEL=SWEEP/JOB; a sweep that was not run (or a job that is missing) is left out with a note.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
R=experiments/results
have() {  # SWEEP/JOB, or several joined by + (all of them present)
  local p
  for p in ${1//+/ }; do [ -f "$R/${p%/*}/job${p#*/}_ihvp_queries.csv" ] || return 1; done
}
# a series' jobs that exist (SWEEP/JOB+SWEEP/JOB...): a damping not run yet is left out
present() { local p out=""; for p in ${1//+/ }; do have "$p" && out="${out:+$out+}$p"; done; echo "$out"; }
figure() {  # figure SETTING TITLE LABEL=SWEEP/JOB ...
  local setting=$1 title=$2; shift 2
  local series=()
  for s in "$@"; do
    local p; p=$(present "${s#*=}")
    if [ -n "$p" ]; then series+=("${s%%=*}=$p"); else echo "sec62: $setting: ${s#*=} missing, left out"; fi
  done
  [ ${#series[@]} -gt 0 ] && "$PY" experiments/sec62_figure.py "$R/sec62/$setting.png" --title "$title" "${series[@]}"
}
figure cnn "CNN, FashionMNIST 500 points, against solver=gram" \
  "EK-FAC=ihvp_cnn_exact/0" "K-FAC=ihvp_cnn_exact/1" "LiSSA (tuned)=ihvp_cnn_exact_lissa/0" \
  "LiSSA+EK-FAC (tuned)=ihvp_cnn_exact_lissa_ekfac/0" "CG+EK-FAC (30 it.)=ihvp_cnn_exact_cg_ekfac/0" \
  "Arnoldi 50, dropped=ihvp_cnn_exact_arnoldi/0" "Arnoldi 50, λ elsewhere=ihvp_cnn_exact_arnoldi/1" \
  "Arnoldi 200, dropped=ihvp_cnn_exact_arnoldi/2" "Arnoldi 200, λ elsewhere=ihvp_cnn_exact_arnoldi/3"
figure cnn_ladder "CNN: the approximation ladder (exact GGN = the reference)" \
  "exact block-diagonal=ihvp_cnn_ladder_blockdiag/0" "K-FAC=ihvp_cnn_exact/1" "EK-FAC=ihvp_cnn_exact/0" \
  "EK-FAC, 10 Fisher samples=ihvp_cnn_ladder_samples/0" "K-FAC, 10 Fisher samples=ihvp_cnn_ladder_samples/1" \
  "exact, empirical Fisher=ihvp_cnn_ladder_empirical/0" "EK-FAC, empirical Fisher=ihvp_cnn_ladder_empirical/1" \
  "EK-FAC on 50 points=ihvp_cnn_ladder_points/0" "EK-FAC on 150 points=ihvp_cnn_ladder_points/1"
figure resnet18_ladder "ResNet-18 (reduced): the approximation ladder (exact GGN = the reference)" \
  "exact block-diagonal=ihvp_resnet18_ladder_blockdiag/0+ihvp_resnet18_ladder_blockdiag_large/0" \
  "K-FAC=ihvp_resnet18_exact/1+ihvp_resnet18_exact_large/1" "EK-FAC=ihvp_resnet18_exact/0+ihvp_resnet18_exact_large/0"
# (λ = 0.1, 1, 10: the ..._large sweeps and LiSSA's ..._lissa_<λ>, on the † model; a damping not run is left out)
figure resnet18 "ResNet-18 (reduced: 256 points), against solver=gram" \
  "EK-FAC=ihvp_resnet18_exact/0+ihvp_resnet18_exact_large/0" "K-FAC=ihvp_resnet18_exact/1+ihvp_resnet18_exact_large/1" \
  "Arnoldi 50, λ elsewhere=ihvp_resnet18_exact_arnoldi/0+ihvp_resnet18_exact_large_arnoldi/0" "LiSSA (tuned)=ihvp_resnet18_exact_lissa_1e-6/0+ihvp_resnet18_exact_lissa_1e-4/0+ihvp_resnet18_exact_lissa_1e-2/0+ihvp_resnet18_exact_lissa_0.1/0+ihvp_resnet18_exact_lissa_1/0+ihvp_resnet18_exact_lissa_10/0" \
  "CG+EK-FAC (30 it.)=ihvp_resnet18_exact_cg_ekfac/0+ihvp_resnet18_exact_cg_ekfac_0.1/0+ihvp_resnet18_exact_cg_ekfac_1/0+ihvp_resnet18_exact_cg_ekfac_10/0" "LiSSA+EK-FAC (tuned)=ihvp_resnet18_exact_lissa_ekfac_1e-6/0+ihvp_resnet18_exact_lissa_ekfac_1e-4/0+ihvp_resnet18_exact_lissa_ekfac_1e-2/0+ihvp_resnet18_exact_lissa_ekfac_0.1/0+ihvp_resnet18_exact_lissa_ekfac_1/0+ihvp_resnet18_exact_lissa_ekfac_10/0"
figure resnet18_1k "ResNet-18 (reduced: 1,024 points), against solver=gram" \
  "EK-FAC=ihvp_resnet18_1k_exact/0+ihvp_resnet18_1k_exact_large/0" \
  "K-FAC=ihvp_resnet18_1k_exact/1+ihvp_resnet18_1k_exact_large/1" \
  "Arnoldi 50, λ elsewhere=ihvp_resnet18_1k_exact_arnoldi/0+ihvp_resnet18_1k_exact_large_arnoldi/0"
# the time-matched comparison (issue 29 item 3): each solver's error when each other one has finished
matched() {  # matched SETTING LABEL=SWEEP/JOB ...
  local setting=$1; shift
  local series=()
  for s in "$@"; do local p; p=$(present "${s#*=}"); [ -n "$p" ] && series+=("${s%%=*}=$p"); done
  [ ${#series[@]} -gt 1 ] && "$PY" experiments/sec62_time_matched.py "$R/sec62/${setting}_time_matched.csv" "${series[@]}"
}
# (λ = 0.1, 1, 10: the † model's sweeps, as in the figure; each damping's budget is that damping's EK-FAC time)
matched resnet18 "EK-FAC=ihvp_resnet18_exact/0+ihvp_resnet18_exact_large/0" \
  "K-FAC=ihvp_resnet18_exact/1+ihvp_resnet18_exact_large/1" \
  "Arnoldi 50, λ elsewhere=ihvp_resnet18_exact_arnoldi/0+ihvp_resnet18_exact_large_arnoldi/0" \
  "LiSSA (tuned)=ihvp_resnet18_exact_lissa_1e-6/0+ihvp_resnet18_exact_lissa_1e-4/0+ihvp_resnet18_exact_lissa_1e-2/0+ihvp_resnet18_exact_lissa_0.1/0+ihvp_resnet18_exact_lissa_1/0+ihvp_resnet18_exact_lissa_10/0" \
  "CG+EK-FAC (30 it.)=ihvp_resnet18_exact_cg_ekfac/0+ihvp_resnet18_exact_cg_ekfac_0.1/0+ihvp_resnet18_exact_cg_ekfac_1/0+ihvp_resnet18_exact_cg_ekfac_10/0" \
  "LiSSA+EK-FAC (tuned)=ihvp_resnet18_exact_lissa_ekfac_1e-6/0+ihvp_resnet18_exact_lissa_ekfac_1e-4/0+ihvp_resnet18_exact_lissa_ekfac_1e-2/0+ihvp_resnet18_exact_lissa_ekfac_0.1/0+ihvp_resnet18_exact_lissa_ekfac_1/0+ihvp_resnet18_exact_lissa_ekfac_10/0"
# λ = 0.1 on the setting's model, every solver on one machine (2026-12-07: run ihvp_resnet18_original_<solver>_0.1 and
# the LiSSA + EK-FAC sweep that ran on that model)
matched resnet18_original_0.1 "EK-FAC=ihvp_resnet18_original_0.1/0" "K-FAC=ihvp_resnet18_original_0.1/1" \
  "Arnoldi 50, λ elsewhere=ihvp_resnet18_original_arnoldi_0.1/0" "LiSSA (tuned)=ihvp_resnet18_original_lissa_0.1/0" \
  "CG+EK-FAC (30 it.)=ihvp_resnet18_original_cg_ekfac_0.1/0" "LiSSA+EK-FAC (tuned)=ihvp_resnet18_exact_lissa_ekfac_0.1/0"
