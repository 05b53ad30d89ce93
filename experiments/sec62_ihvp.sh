#!/usr/bin/env bash
# Paper Sec. 6.2 against CG references (RESULTS.md sections 8 and 9; section 3, against an exact reference, is
# sec62_exact.sh): IHVP error of LiSSA / EK-FAC / K-FAC and the preconditioned solvers across damping.
# The commands live in run_here.sh (the one source of truth for what produced RESULTS.md); this runs its sweeps
# ihvp_cnn ihvp_depth ihvp_precond ihvp_precond_cg ihvp_precond_lissa ihvp_solvers ihvp_resnet18 ihvp_resnet18_pcg ihvp_resnet18_lissa_ekfac  (resumable: finished sweeps are skipped; extra arguments are sweep names to restrict to).
# Full-size ResNet-18 (GPU): influencelab -m experiment=ihvp solver=lissa,ekfac,kfac solver.damping=1e-3,1e-2,1e-1,1,10
set -euo pipefail
cd "$(dirname "$0")"
bash run_here.sh ${*:-ihvp_cnn ihvp_depth ihvp_precond ihvp_precond_cg ihvp_precond_lissa ihvp_solvers ihvp_resnet18 ihvp_resnet18_pcg ihvp_resnet18_lissa_ekfac}
# the reduced ResNet-18's sweeps on one figure (RESULTS section 9)
R=results
if [ -e $R/ihvp_resnet18/report.csv ] && [ -e $R/ihvp_resnet18_pcg/report.csv ] && [ -e $R/ihvp_resnet18_lissa_ekfac/report.csv ]; then
  "${PY:-../.venv/bin/python}" ihvp_figure.py $R/ihvp_resnet18 $R/ihvp_resnet18_pcg $R/ihvp_resnet18_lissa_ekfac \
    --out $R/ihvp_resnet18_all/report_figures
fi
