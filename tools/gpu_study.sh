#!/usr/bin/env bash
# Issue #14 on one GPU machine, run from the repository root (see ../shared/gpu/README.md): the `gpu` preset of
# reproduce.py with three seeds under a 10-minute limit, then the first minutes of the `paper` preset (does it start,
# its iteration time and GPU memory). Everything kept is packed into $OUT/all.tgz (results.md, tables, figure, logs,
# nvidia-smi; not the weights).
#   OUT=/tmp/study bash tools/gpu_study.sh
#   QUICK=1 OUT=/tmp/study_dry bash tools/gpu_study.sh   # the smoke preset on the CPU: a dry run of this script
set -uo pipefail
OUT=${OUT:-/tmp/brainsynth_study}; mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"  # wheels on an offline GPU machine, PY, log
if [ "${QUICK:-0}" = 1 ]; then
  PRESET=smoke; SEEDS=2; JOBS=2; LIMIT=1200; PAPER=0
else
  PRESET=gpu; SEEDS=3; JOBS=6; LIMIT=${LIMIT:-600}; PAPER=${PAPER:-150}
fi
(nvidia-smi -L 2>/dev/null || echo "no GPU") | tee -a "$OUT/session.log"
(while sleep 5; do nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null; done) \
  > "$OUT/gpu_usage.csv" &
MON=$!
log "study: preset $PRESET, $SEEDS seeds, $JOBS stages at a time, limit $LIMIT s"
timeout "$LIMIT" $PY bundle/scripts/reproduce.py --preset $PRESET --seeds $SEEDS --jobs $JOBS --output_dir "$OUT/study" \
  > "$OUT/study.log" 2>&1 || log "study: exit $?"
tail -3 "$OUT/study.log" | tee -a "$OUT/session.log"
if [ "$PAPER" -gt 0 ]; then
  log "paper preset: first $PAPER s"
  timeout "$PAPER" $PY bundle/scripts/reproduce.py --preset paper --output_dir "$OUT/paper" > "$OUT/paper.log" 2>&1
  log "paper preset: stopped ($?) after $PAPER s"; tail -5 "$OUT/paper.log" | tee -a "$OUT/session.log"
fi
kill $MON 2>/dev/null
rm -rf "$OUT/study/cache" "$OUT/study/data" "$OUT/paper/cache" "$OUT/paper/data"  # large, and made again on demand
# one archive (the device tool brings back only a few files), without the weights and checkpoints (GBs)
tar czf /tmp/brainsynth_study.tgz -C "$OUT" --exclude ./session.log --exclude "*.pt" . \
  && mv /tmp/brainsynth_study.tgz "$OUT/all.tgz" \
  && find "$OUT" -mindepth 1 -maxdepth 1 ! -name all.tgz ! -name session.log -exec rm -rf {} +
log done
