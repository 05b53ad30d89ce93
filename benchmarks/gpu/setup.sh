# Sourced THERE by benchmarks/gpu/run.sh and sec62.sh (from the repository root): the start time, OUT, PY and
# BUDGET defaults, the carried wheels installed into /tmp/site (when .gpu_carry/wheels exists), the environment,
# and the card's name in $OUT/nvidia-smi.csv.
start=$(date +%s)
OUT=${OUT:-gpu_out}
PY=${PY:-python3}
BUDGET=${BUDGET:-420}
mkdir -p "$OUT"
if [ -d .gpu_carry/wheels ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_carry/wheels/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled MPLBACKEND=Agg INFLUENCELAB_DATA=$PWD/.gpu_carry
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1
cat "$OUT/nvidia-smi.csv"
