#!/usr/bin/env bash
# Paper Sec. 6.2 against an exact reference at every damping (RESULTS.md section 3): every sweep of section 3.0, then
# its figures and their data (sec62.sh) and RESULTS.md's tables. The commands live in run_here.sh (the one source
# of truth for what produced RESULTS.md); resumable: finished sweeps are skipped; extra arguments are sweep names to
# restrict to. ~20 h on this repository's 2 CPU cores, most of it LiSSA + EK-FAC on ResNet-18 (experiments/results/
# timings.txt). The CG-reference runs of RESULTS sections 8 and 9 are sec62_ihvp.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
CNN="ihvp_cnn_exact ihvp_cnn_exact_arnoldi ihvp_cnn_exact_lissa ihvp_cnn_exact_lissa_ekfac ihvp_cnn_exact_cg_ekfac
  ihvp_cnn_ladder_blockdiag ihvp_cnn_ladder_empirical ihvp_cnn_ladder_samples ihvp_cnn_ladder_points"
R18K="ihvp_resnet18_1k_exact ihvp_resnet18_1k_exact_arnoldi ihvp_resnet18_1k_exact_large
  ihvp_resnet18_1k_exact_large_arnoldi"
R18="ihvp_resnet18_exact ihvp_resnet18_exact_arnoldi ihvp_resnet18_exact_cg_ekfac ihvp_resnet18_ladder_blockdiag
  ihvp_resnet18_ladder_blockdiag_large ihvp_resnet18_exact_large ihvp_resnet18_exact_large_arnoldi
  ihvp_resnet18_retrained_1e-6 ihvp_resnet18_original_0.1
  ihvp_resnet18_original_arnoldi_0.1 ihvp_resnet18_original_cg_ekfac_0.1 ihvp_resnet18_original_lissa_0.1"
for L in 1e-6 1e-4 1e-2 10 1 0.1; do R18="$R18 ihvp_resnet18_exact_lissa_$L ihvp_resnet18_exact_lissa_ekfac_$L"; done
for L in 10 1 0.1; do R18="$R18 ihvp_resnet18_exact_cg_ekfac_$L"; done
# shellcheck disable=SC2086  # word splitting intended: one argument per sweep name
bash experiments/run_here.sh ${*:-$CNN $R18K $R18}
[ -n "${DRY:-}" ] && exit 0  # DRY=1: the names checked, nothing run
bash experiments/sec62.sh
"${PY:-.venv/bin/python}" experiments/tables.py
