#!/usr/bin/env bash
# Paper Sec. 6.2: LiSSA vs EK-FAC IHVP error against CG and wall time, across damping (CNN here; ResNet-18 preset).
set -euo pipefail
influencelab -m experiment=ihvp_cnn solver=lissa,ekfac,kfac solver.damping=1e-5,1e-4,1e-3,1e-2,1e-1 "$@"
influencelab -m experiment=ihvp_cnn solver=lissa solver.damping=1e-3 solver.depth=50,100,200,400 "$@"
# ResNet-18 (long on CPU): influencelab -m experiment=ihvp solver=lissa,ekfac solver.damping=1e-5,1e-4,1e-3,1e-2,1e-1
