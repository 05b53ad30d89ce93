#!/usr/bin/env bash
# Paper Sec. 8 (its open questions): sample removal and label repair by one Newton step, against retraining and
# fine-tuning, by set size and selection (digits, then FashionMNIST), by solver and damping, and the
# detect-then-clean pipeline. Results: experiments/RESULTS.md section 5.
set -euo pipefail
influencelab -m experiment=unlearn unlearn.mode=remove unlearn.selection=random,self_influence,flipped \
  unlearn.size=1,10,100 "$@"
influencelab -m experiment=unlearn unlearn.mode=repair unlearn.selection=self_influence,flipped unlearn.size=1,10,100 "$@"
influencelab -m experiment=unlearn unlearn.selection=flipped unlearn.size=10,100 solver=ekfac,cg,lissa \
  solver.damping=1e-3,1e-2,1e-1,1 "$@"
influencelab -m experiment=unlearn dataset=fashion_mnist dataset.subset=5000 trainer.epochs=10 trainer.batch_size=64 \
  unlearn.mode=remove unlearn.selection=random,flipped unlearn.size=10,100,1000 "$@"
influencelab -m experiment=clean_pipeline unlearn.mode=repair,remove "$@"
influencelab -m experiment=clean_pipeline dataset=fashion_mnist dataset.subset=5000 trainer.epochs=10 \
  trainer.batch_size=64 unlearn.size=500 unlearn.mode=repair,remove "$@"
