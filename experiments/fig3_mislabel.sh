#!/usr/bin/env bash
# Paper Fig. 3 (RESULTS.md section 1): mislabel detection by self-influence, FashionMNIST, both regimes.
# The commands live in run_here.sh (the one source of truth for what produced RESULTS.md); this runs its sweeps
# mislabel_standard mislabel_memorize mislabel_memorize_full mislabel_memorize_fresh mislabel_damping mislabel_damping_high mislabel_damping_seed1 mislabel_modules mislabel_modules_seed1 mislabel_lissa mislabel_small  (resumable: finished sweeps are skipped; extra arguments are sweep names to restrict to).
# Needs downloads / a GPU (not run here): influencelab -m experiment=mislabel_flowers102,mislabel_food101 model=resnet50,vit_b16
set -euo pipefail
cd "$(dirname "$0")"
exec bash run_here.sh ${*:-mislabel_standard mislabel_memorize mislabel_memorize_full mislabel_memorize_fresh mislabel_damping mislabel_damping_high mislabel_damping_seed1 mislabel_modules mislabel_modules_seed1 mislabel_lissa mislabel_small}
