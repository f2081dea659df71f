#!/usr/bin/env bash
# The GPU rows of bundle/docs/performance.md: benchmark.py inference / training / data on cuda:0, run from the
# repository root on an offline GPU machine (see ../shared/gpu/README.md). Tables and JSON go to $OUT.
#   tools/gpu_bench.sh [PART ...]: some of inference inference_ext training training_log1 data inference_compiled
#   throughput (default: all but throughput)
#   QUICK=1: every part tiny and on the CPU (a dry run of this script).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"  # wheels on an offline GPU machine, PY, log
B="$PY bundle/scripts/benchmark.py"
if [ "${QUICK:-0}" = 1 ]; then
  DEV=cpu; INF="--widths 8 --repeats 1"; TRAIN="--features 8 --batch_size 8 --iterations 1 --repeats 1 --variants mgan"
  DATA="--features 8 --batch_size 8 --step_iterations 1"; COMP="--widths 8 --repeats 1"
  TPUT="--widths 8 --num_cases 2 --repeats 1"
else
  DEV=cuda:0; INF="--widths 16,64 --amp both --repeats 3"; TRAIN="--iterations 5"; DATA=""; COMP="--widths 16,64 --repeats 3"
  TPUT="--widths 16 --num_cases 8 --repeats 2"
fi
(nvidia-smi -L || true) | tee -a "$OUT/session.log"
run() {  # run NAME LIMIT ARGS...: one benchmark, its tables to the log, its JSON to $OUT/NAME.json
  local name=$1 limit=$2; shift 2
  log "$name: $*"
  timeout "$limit" $B "$@" --device $DEV --output "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || log "$name: exit $?"
  grep "|" "$OUT/$name.log" | tee -a "$OUT/session.log"
}
PARTS=${*:-inference training training_log1 data inference_compiled}
for part in $PARTS; do
  case $part in
    inference) run inference 150 inference $INF ;;
    inference_ext) run inference_ext 120 inference --output_ext .nii.gz,.nii $COMP ;;  # gzip vs uncompressed
    training) run training 150 training $TRAIN ;;
    training_log1) run training_log1 100 training --log_every 1 $TRAIN ;;  # loss terms read every iteration
    data) run data 80 data --cases "" $DATA ;;
    inference_compiled) run inference_compiled 140 inference --compile true $COMP ;;
    throughput) run throughput 170 throughput $TPUT ;;  # volumes/min against the I/O floor, serial vs overlapped
    *) log "unknown part $part" ;;
  esac
done
log done
