#!/usr/bin/env bash
# Runs THERE, on the lent GPU machine, after benchmarks/gpu/prepare.sh here; through the device tool:
#   run(command="bash benchmarks/gpu/sec62.sh", carry=[".gpu_carry"], timeout_s=480)
# The paper-size Sec. 6.2 run (issue 29 item 7; benchmarks/gpu/sec62_paper.py's docstring has the plan):
# 1. installs the carried wheels into /tmp/site (hydra-core, omegaconf, antlr4: the solvers' YAML is composed by Hydra);
# 2. sec62_paper.py with what is left of BUDGET seconds (default 420: the command ends inside 7.5 minutes, the
#    call, with the machine's start, inside about 9 of the task's 15 device minutes), ARGS appended (e.g. ARGS="--n-curv 1000" for a quicker reference, "--solvers ekfac,lissa").
# Writes to $OUT: nvidia-smi.csv, sec62.log, sec62.csv, sec62_queries.csv, reference.csv, env.json (6 files: the
# tool brings back at most 8). Then, here: cp <files_at>/* experiments/results/ihvp_resnet18_gpu/
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benchmarks/gpu/setup.sh
source benchmarks/gpu/setup.sh  # start, OUT, PY, BUDGET; the carried wheels installed; nvidia-smi.csv
left=$(( BUDGET - ($(date +%s) - start) ))
# shellcheck disable=SC2086  # ARGS: words on purpose
"$PY" benchmarks/gpu/sec62_paper.py --out "$OUT" --budget "$left" ${ARGS:-} > "$OUT/sec62.log" 2>&1
rc=$?
echo "sec62_paper.py: exit $rc"
grep -v -i -E "warn|GradScaler|did not reach tol" "$OUT/sec62.log" | tail -n 70
echo "total $(( $(date +%s) - start )) s"
exit $rc
