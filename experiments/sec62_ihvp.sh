#!/usr/bin/env bash
# Paper Sec. 6.2 (RESULTS.md section 3): IHVP error of LiSSA / EK-FAC / K-FAC against CG across damping.
# The commands live in run_here.sh (the one source of truth for what produced RESULTS.md); this runs its sweeps
# ihvp_cnn ihvp_depth ihvp_precond ihvp_precond_cg ihvp_precond_lissa ihvp_solvers ihvp_resnet18 ihvp_resnet18_pcg ihvp_resnet18_lissa_ekfac  (resumable: finished sweeps are skipped; extra arguments are sweep names to restrict to).
# Full-size ResNet-18 (GPU): influencelab -m experiment=ihvp solver=lissa,ekfac,kfac solver.damping=1e-3,1e-2,1e-1,1,10
set -euo pipefail
cd "$(dirname "$0")"
exec bash run_here.sh ${*:-ihvp_cnn ihvp_depth ihvp_precond ihvp_precond_cg ihvp_precond_lissa ihvp_solvers ihvp_resnet18 ihvp_resnet18_pcg ihvp_resnet18_lissa_ekfac}
