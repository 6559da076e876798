#!/usr/bin/env bash
# The GPU check, ready to run: one command, under 8 minutes on one H100,
# one JSON under benchmarks/results/.
#
#   benchmarks/accelerator_check.sh [--out=PATH] [--budget=SECONDS]
#       [--parts=vs_pytorch_B16,...] [--mfu_workdir=DIR] [--curves_workdir=DIR]
#   benchmarks/accelerator_check.sh --smoke [--out=PATH]   # CPU, tiny sizes
#
# --parts runs only those parts (names below; smoke: vs_pytorch_smoke, mfu,
# curves_bf16, compile). --mfu_workdir / --curves_workdir read a finished
# training workdir instead of training one (the tests use this).
#
# Needs CUDA builds of JAX (pip install -U "jax[cuda12]") and of PyTorch on
# the machine; without a GPU in JAX it stops at once with a message (exit 3).
# Parts, in order, each under its own `timeout` (one that fails or runs out
# of time is recorded with its error and the next one runs):
#   vs_pytorch_B16, vs_pytorch_L16  benchmarks/vs_pytorch.py in bf16 on the
#       GPU (PyTorch AMP autocast vs mim_jax model.dtype=bfloat16): B/16 at
#       batch 256, L/16 at batch 128; one round, 10 timed steps each.
#   mfu          a 60-step ViT-B/16 MAE run (python -m mim_jax.main, bf16,
#       batch 256, the embedded photos) and its train/mfu, images/s and
#       TFLOP/s from metrics.jsonl (peak: PEAK_TFLOPS, else the GPU's).
#   curves_bf16  configs/mae_curves_tiny.py in bf16, seed 0, 480 steps, vs
#       the official curves (mim_jax.tools.compare_curves) with the goals.
#   compile      benchmarks/compile_bench.py: B/16 and L/16 on one device
#       (the configs of COMPILE_CONFIGS below, with their ViT-B ones).
# Every part's timeout is its cap or what is left of --budget (default
# 450 s; smoke: caps 300 s, budget 1200 s), whichever is less; a part with
# under 20 s left is skipped.
# The JSON (device, versions, every part's result or error, a summary)
# goes to benchmarks/results/accelerator_check_<device>.json or --out; its
# path is the last line printed. Exit status 0 when every part passed.
# PYTHON picks the interpreter (default: python).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

# The config files whose train steps the compile part compiles, each with
# its ViT-B config (compile_bench.py --configs; they replace --variants).
# Empty: the MAE variants B/16 and L/16.
COMPILE_CONFIGS="configs/mae_vitl.py,configs/cae_vitl.py,configs/bootmae_vitl.py"

PY=${PYTHON:-python}
SMOKE=0
OUT=""
BUDGET=""
WANTED=""
MFU_DIR=""
CURVES_DIR=""
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    --out=*) OUT=${arg#--out=} ;;
    --budget=*) BUDGET=${arg#--budget=} ;;
    --parts=*) WANTED=",${arg#--parts=}," ;;
    --mfu_workdir=*) MFU_DIR=${arg#--mfu_workdir=} ;;
    --curves_workdir=*) CURVES_DIR=${arg#--curves_workdir=} ;;
    *) echo "usage: $0 [--smoke] [--out=PATH] [--budget=SECONDS]" \
         "[--parts=A,B] [--mfu_workdir=DIR] [--curves_workdir=DIR]" >&2
       exit 2 ;;
  esac
done
# The GPU run's budget; a smoke run on a busy 2-core CPU needs longer.
(( SMOKE )) && BUDGET=${BUDGET:-1200}
BUDGET=${BUDGET:-450}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/accelerator_check.XXXXXX") || exit 2
trap 'rm -rf "$TMP"' EXIT
START=$EPOCHREALTIME
PARTS=()

elapsed() {  # seconds since $1 (an $EPOCHREALTIME)
  awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'
}

# run_part NAME CAP_S COMMAND: runs COMMAND (bash) under `timeout`, its
# output in $TMP/NAME.log, 'rc seconds timeout_s' in $TMP/NAME.status.
run_part() {
  local name=$1 cap=$2 cmd=$3 left t t0 rc
  if [[ -n $WANTED && $name != probe && $WANTED != *",$name,"* ]]; then
    return
  fi
  PARTS+=("$name")
  (( SMOKE )) && cap=300
  printf '%s\n' "$cmd" > "$TMP/$name.cmd"
  left=$(awk -v b="$BUDGET" -v e="$(elapsed "$START")" \
    'BEGIN { printf "%d", b - e }')
  t=$(( cap < left ? cap : left ))
  if (( t < 20 )); then
    echo "skipped 0 0" > "$TMP/$name.status"
    echo "[$name] skipped: ${left} s of the budget left"
    return
  fi
  echo "[$name] timeout ${t} s: $cmd"
  t0=$EPOCHREALTIME
  timeout -k 10 "$t" bash -c "$cmd" > "$TMP/$name.log" 2>&1
  rc=$?
  echo "$rc $(elapsed "$t0") $t" > "$TMP/$name.status"
  echo "[$name] exit $rc after $(elapsed "$t0") s"
  if (( rc != 0 )) && [[ $name != probe ]]; then tail -n 5 "$TMP/$name.log"; fi
}

# The machine: which device JAX sees, versions, the GPU's peak.
PROBE_FLAGS=""
(( SMOKE )) && PROBE_FLAGS="--smoke"
run_part probe 120 \
  "$PY benchmarks/accelerator_check.py probe $PROBE_FLAGS --env=$TMP/probe.env"
PARTS=()  # (the probe is the JSON's `device`, not a part)
if [[ ! -f $TMP/probe.env ]]; then
  cat "$TMP/probe.log" >&2
  exit 2
fi
# shellcheck disable=SC1091
. "$TMP/probe.env"
if [[ $PLATFORM == cpu && $SMOKE == 0 ]]; then
  grep -v '^{' "$TMP/probe.log" >&2  # the message: install jax[cuda12]
  exit 3
fi
OUT=${OUT:-benchmarks/results/accelerator_check_${DEVICE_SLUG}.json}
CHECK="$PY benchmarks/accelerator_check.py"

if (( SMOKE )); then
  run_part vs_pytorch_smoke 120 \
    "$PY benchmarks/vs_pytorch.py --smoke --noproof --dtype=bfloat16"
  TRAIN="--config=configs/mae_tiny.py --config.stop_after_steps=4"
  TRAIN+=" --config.log_every_steps=2 --config.knn.data=None"
  CURVES_STEPS="--config.stop_after_steps=32"
  COMPILE="--smoke --devices=1"
else
  VS="$PY benchmarks/vs_pytorch.py --device=cuda --dtype=bfloat16"
  VS+=" --rounds=1 --steps=10 --warmup=3"
  run_part vs_pytorch_B16 150 "$VS --models=B/16 --batch_size=256"
  run_part vs_pytorch_L16 170 "$VS --models=L/16 --batch_size=128 --noproof"
  TRAIN="--config=configs/mae_vitb.py --config.input.data=embedded:skimage"
  TRAIN+=" --config.input.batch_size=256 --config.stop_after_steps=60"
  TRAIN+=" --config.log_every_steps=20"
  CURVES_STEPS=""
  COMPILE="--variants=B/16,L/16 --devices=1 --repeats=1"
  COMPILE+=" --batch_per_device=128${COMPILE_CONFIGS:+ --configs=$COMPILE_CONFIGS}"
  # compile_bench.py defaults JAX_PLATFORMS to cpu: point it at the GPU.
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
fi
if [[ -n $MFU_DIR ]]; then
  run_part mfu 150 "$CHECK mfu $MFU_DIR"
else
  run_part mfu 150 "$PY -m mim_jax.main $TRAIN --workdir=$TMP/mfu_run \
--config.model.dtype=bfloat16${PEAK:+ --config.peak_tflops=$PEAK} \
&& $CHECK mfu $TMP/mfu_run"
fi
if [[ -n $CURVES_DIR ]]; then
  run_part curves_bf16 120 "$CHECK curves $CURVES_DIR"
else
  run_part curves_bf16 120 "$PY -m mim_jax.main \
--config=configs/mae_curves_tiny.py --workdir=$TMP/curves_run \
--config.seed=0 --config.model.dtype=bfloat16 $CURVES_STEPS \
&& $CHECK curves $TMP/curves_run"
fi
run_part compile 120 "$PY benchmarks/compile_bench.py $COMPILE"

printf '{"smoke": %s, "budget_s": %s, "total_s": %s, "parts": [%s]}\n' \
  "$([[ $SMOKE == 1 ]] && echo true || echo false)" "$BUDGET" \
  "$(elapsed "$START")" \
  "$(printf '"%s",' "${PARTS[@]}" | sed 's/,$//')" > "$TMP/meta.json"
$CHECK assemble "$TMP" "$OUT" | tail -n 1
echo "$OUT"
"$PY" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$OUT"
