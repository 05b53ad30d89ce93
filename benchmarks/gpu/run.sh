#!/usr/bin/env bash
# Runs THERE, on the lent GPU machine, after benchmarks/gpu/prepare.sh here; through the device tool:
#   run(command="bash benchmarks/gpu/run.sh", carry=[".gpu_carry"], timeout_s=600)
# 1. installs the carried wheels into /tmp/site (hydra-core, omegaconf, antlr4, kronfluence, einconv);
# 2. pytest -m cuda tests/test_cuda.py (training, every solver, bf16, CLI on CUDA = CPU results), at most 150 s;
# 3. benchmarks/gpu/run.py with what is left of BUDGET (default 420 s: on 2026-12-04 470 s made the call 481 s).
# Writes to $OUT: nvidia-smi.csv, tests.log, bench.log, bench.csv, env.json; then, here:
#   python benchmarks/gpu/summarize.py <the fetched folder>     (-> benchmarks/results/gpu/, RESULTS.md section 6c)
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=benchmarks/gpu/setup.sh
source benchmarks/gpu/setup.sh  # start, OUT, PY, BUDGET; the carried wheels installed; nvidia-smi.csv
timeout "${TEST_S:-150}" "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider -o addopts="" \
  --durations=5 > "$OUT/tests.log" 2>&1
echo "pytest -m cuda: exit $?"; tail -n 25 "$OUT/tests.log"
left=$(( BUDGET - ($(date +%s) - start) ))
"$PY" benchmarks/gpu/run.py --out "$OUT" --budget "$left" ${RUN_ARGS:-} > "$OUT/bench.log" 2>&1
echo "run.py: exit $?"; grep -v -i -E "warn|GradScaler" "$OUT/bench.log" | tail -n 40
echo "total $(( $(date +%s) - start )) s"
