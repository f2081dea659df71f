#!/usr/bin/env bash
# What this project runs on a lent GPU machine, one script with modes, from the repository root (carrying MONAI
# there: ../shared/gpu/README.md). Everything kept goes to $OUT; the modes that train pack it into $OUT/all.tgz
# (the device tool brings back only a few files).
#   OUT=/tmp/gpu bash tools/gpu.sh bench [PART ...]  # the GPU rows of bundle/docs/performance.md (benchmark.py);
#       PART: inference inference_ext training training_log1 data inference_compiled throughput (default: all
#       but throughput)
#   OUT=/tmp/gpu bash tools/gpu.sh ship               # tools/train_shipped.sh within SHIP_BUDGET s, then the paper
#       preset's GAN (TC-MGAN, width 64, batch 64) for its first PROBE s: does it start, its time per iteration
#   OUT=/tmp/gpu bash tools/gpu.sh study              # reproduce.py's gpu preset with 3 seeds within LIMIT s, then
#       the paper preset's first PAPER s
#   OUT=/tmp/gpu bash tools/gpu.sh ship_and_study     # ship (no probe) and study (no paper preset) side by side,
#       half the CPU cores each, both within BUDGET s
#   QUICK=1 ...: every stage tiny and on the CPU (a dry run of the mode)
set -uo pipefail
MODE=${1:-}; shift || true
OUT=${OUT:-/tmp/brainsynth_gpu}; mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"  # wheels on an offline GPU machine, PY, log
Q=${QUICK:-0}

monitor() {  # GPU memory and utilisation every 2 s to $OUT/gpu_usage.csv, in the background; MON = its PID
  (while sleep 2; do nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null; done) \
    > "$OUT/gpu_usage.csv" &
  MON=$!
}
pack() {  # $OUT's contents (less the patterns given) into $OUT/all.tgz; everything else but session.log removed
  local excludes=() p
  for p in "$@"; do excludes+=(--exclude "$p"); done
  tar czf /tmp/brainsynth_all.tgz -C "$OUT" --exclude ./session.log "${excludes[@]}" . \
    && mv /tmp/brainsynth_all.tgz "$OUT/all.tgz" \
    && find "$OUT" -mindepth 1 -maxdepth 1 ! -name all.tgz ! -name session.log -exec rm -rf {} +
  du -sh "$OUT/all.tgz" | tee -a "$OUT/session.log"
}

bench() {
  local B="$PY tools/benchmark.py" DEV INF TRAIN DATA COMP TPUT
  if [ "$Q" = 1 ]; then
    DEV=cpu; INF="--widths 8 --repeats 1"; TRAIN="--features 8 --batch_size 8 --iterations 1 --repeats 1 --variants mgan"
    DATA="--features 8 --batch_size 8 --step_iterations 1"; COMP="--widths 8 --repeats 1"
    TPUT="--widths 8 --num_cases 2 --repeats 1"
  else
    DEV=cuda:0; INF="--widths 16,64 --amp both --repeats 3"; TRAIN="--iterations 5"; DATA=""
    COMP="--widths 16,64 --repeats 3"; TPUT="--widths 16 --num_cases 8 --repeats 2"
  fi
  (nvidia-smi -L || true) | tee -a "$OUT/session.log"
  run() {  # NAME LIMIT ARGS...: one benchmark, its tables to the log, its JSON to $OUT/NAME.json
    local name=$1 limit=$2; shift 2
    log "$name: $*"
    timeout "$limit" $B "$@" --device $DEV --output "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || log "$name: exit $?"
    grep "|" "$OUT/$name.log" | tee -a "$OUT/session.log"
  }
  local part
  for part in ${*:-inference training training_log1 data inference_compiled}; do
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
}

ship() {
  local budget=${SHIP_BUDGET:-$([ "$Q" = 1 ] && echo 300 || echo 465)} probe=${PROBE:-$([ "$Q" = 1 ] && echo 60 || echo 75)}
  monitor
  $PY -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" | tee -a "$OUT/session.log"
  nproc | sed 's/^/cpu cores: /' | tee -a "$OUT/session.log"
  log "tools/train_shipped.sh, budget $budget s"
  BUDGET=$budget OUT=$OUT/ship bash tools/train_shipped.sh > "$OUT/ship.log" 2>&1 || log "train_shipped.sh: exit $?"
  if [ "$probe" -gt 0 ]; then
    local F LEN MINPIX DEVICE T0=$SECONDS
    F=$([ "$Q" = 1 ] && echo 8 || echo 64); LEN=$([ "$Q" = 1 ] && echo 2 || echo 50)
    MINPIX=$([ "$Q" = 1 ] && echo "--min_brain_pixels 400" || echo "")
    DEVICE=$($PY -c "import torch; print('cuda:0' if torch.cuda.is_available() else 'cpu')")
    log "the paper preset's GAN for $probe s"
    timeout "$probe" $PY -m monai.bundle run --bundle_root bundle --config_file bundle/configs/train.json \
      --dataset_dir "$OUT/ship/data" --output_dir "$OUT/paper_probe" --variant tcmgan --features "$F" --batch_size 64 \
      --segmenter_ckpt "$OUT/ship/runs/segmenter/model.pt" --device "$DEVICE" --max_epochs 20 --epoch_length "$LEN" \
      --val_interval 100 --cache_num_workers "$(nproc)" $MINPIX --overwrite true > "$OUT/paper_probe.log" 2>&1
    log "paper probe stopped (exit $?) after $((SECONDS - T0)) s; $LEN iterations per epoch:"
    grep -a "Complete. Time taken" "$OUT/paper_probe.log" | tee -a "$OUT/session.log"
  fi
  kill $MON 2>/dev/null
  sort -t, -k2 -n "$OUT/gpu_usage.csv" 2>/dev/null | tail -1 | sed 's/^/peak GPU memory sample: /' | tee -a "$OUT/session.log"
  rm -rf "$OUT/ship/data" "$OUT/ship/ood" "$OUT/ship/inference" "$OUT/ship/runs"/*/checkpoint.pt \
    "$OUT/ship/runs/cache" "$OUT/paper_probe"/*/checkpoint.pt "$OUT/paper_probe"/*/model.pt
}

study() {
  local preset seeds jobs limit paper
  if [ "$Q" = 1 ]; then
    preset=smoke; seeds=2; jobs=2; limit=1200; paper=0
  else
    preset=gpu; seeds=3; jobs=6; limit=${LIMIT:-600}; paper=${PAPER:-150}
  fi
  (nvidia-smi -L 2>/dev/null || echo "no GPU") | tee -a "$OUT/session.log"
  monitor
  log "study: preset $preset, $seeds seeds, $jobs stages at a time, limit $limit s"
  timeout "$limit" $PY tools/reproduce.py --preset $preset --seeds $seeds --jobs $jobs \
    --output_dir "$OUT/study" > "$OUT/study.log" 2>&1 || log "study: exit $?"
  tail -3 "$OUT/study.log" | tee -a "$OUT/session.log"
  if [ "$paper" -gt 0 ]; then
    log "paper preset: first $paper s"
    timeout "$paper" $PY tools/reproduce.py --preset paper --output_dir "$OUT/paper" > "$OUT/paper.log" 2>&1
    log "paper preset: stopped ($?) after $paper s"; tail -5 "$OUT/paper.log" | tee -a "$OUT/session.log"
  fi
  kill $MON 2>/dev/null
  rm -rf "$OUT/study/cache" "$OUT/study/data" "$OUT/paper/cache" "$OUT/paper/data"  # large, made again on demand
}

ship_and_study() {
  local half=$(( $(nproc) / 2 )) budget=${BUDGET:-$([ "$Q" = 1 ] && echo 400 || echo 540)} pin=""
  [ "$half" -ge 1 ] || half=1
  log "ship and study side by side for at most $budget s, $half cores each"
  [ "$Q" = 1 ] || export NCASES=${NCASES:-96} SEG_EPOCHS=${SEG_EPOCHS:-6}
  WORKERS=$half PROBE=0 SHIP_BUDGET=$budget OUT=$OUT/ship bash "$0" ship > "$OUT/ship_console.log" 2>&1 &
  local ship_pid=$!
  command -v taskset >/dev/null && pin="taskset -c $half-$(( $(nproc) - 1 ))"
  PAPER=0 LIMIT=$((budget - 20)) OUT=$OUT/study $pin bash "$0" study > "$OUT/study_console.log" 2>&1 &
  local study_pid=$!
  wait $ship_pid; log "ship: exit $?"; wait $study_pid; log "study: exit $?"
}

case $MODE in
  bench) bench "$@" ;;
  ship) ship; pack ;;
  study) study; pack "*.pt" ;;  # not the weights (GBs at the gpu preset's width)
  ship_and_study) ship_and_study; cat "$OUT/ship/session.log" >> "$OUT/session.log" 2>/dev/null
    tail -5 "$OUT/study/session.log" >> "$OUT/session.log" 2>/dev/null
    pack ;;  # each side packed its own all.tgz first
  *) echo "usage: OUT=dir bash tools/gpu.sh bench [PART ...] | ship | study | ship_and_study (QUICK=1: a CPU dry run)" >&2
     exit 2 ;;
esac
log done
