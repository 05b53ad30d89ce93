#!/usr/bin/env bash
# Linear Datamodeling Score on FashionMNIST (5,000 points, CNN, 100 queries, 100 subsets); the retraining ground
# truth is computed once (cached) and shared by every solver, seed count and damping.
set -euo pipefail
influencelab -m experiment=lds solver=ekfac,kfac,identity "$@"
influencelab -m experiment=lds solver=ekfac solver.damping=1e-4,1e-3,1e-2,1e-1,auto "$@"
influencelab -m experiment=lds solver=ekfac lds.seeds_per_subset=2 "$@"
influencelab -m experiment=lds solver=ekfac,identity score.ensemble=2,4,8 "$@"  # scores averaged over k models
