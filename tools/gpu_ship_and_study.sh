#!/usr/bin/env bash
# Issues #13 and #14 in one device command (see ../shared/gpu/README.md), from the repository root: the shipped
# model's recipe (tools/gpu_ship_and_probe.sh, no paper probe) and the `gpu` preset of reproduce.py with 3 seeds
# (tools/gpu_study.sh, no paper preset) side by side on one GPU, each with half the CPU cores: width-16/32 networks
# at batch 64 should leave an H200 mostly idle (not yet measured); the phantoms are the CPU-heavy part.
# Everything kept is packed into $OUT/all.tgz (the device tool brings back only a few files).
#   OUT=/tmp/gpu bash tools/gpu_ship_and_study.sh
#   QUICK=1 OUT=/tmp/gpu_dry bash tools/gpu_ship_and_study.sh   # both tiny, on the CPU: a dry run
set -uo pipefail
OUT=${OUT:-/tmp/brainsynth_gpu}; mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"  # wheels on an offline GPU machine, PY, log
HALF=$(( $(nproc) / 2 )); [ "$HALF" -ge 1 ] || HALF=1
BUDGET=${BUDGET:-$([ "${QUICK:-0}" = 1 ] && echo 400 || echo 540)}
log "both for at most $BUDGET s, $HALF cores each"
[ "${QUICK:-0}" = 1 ] || export NCASES=${NCASES:-96} SEG_EPOCHS=${SEG_EPOCHS:-6}
WORKERS=$HALF PROBE=0 SHIP_BUDGET=$BUDGET OUT=$OUT/ship \
  bash tools/gpu_ship_and_probe.sh > "$OUT/ship_console.log" 2>&1 &
SHIP=$!
PIN=$(command -v taskset >/dev/null && echo "taskset -c $HALF-$(( $(nproc) - 1 ))" || echo "")
PAPER=0 LIMIT=$((BUDGET - 20)) OUT=$OUT/study $PIN bash tools/gpu_study.sh > "$OUT/study_console.log" 2>&1 &
STUDY=$!
wait $SHIP; log "ship: exit $?"; wait $STUDY; log "study: exit $?"
cat "$OUT/ship/session.log" >> "$OUT/session.log" 2>/dev/null
tail -5 "$OUT/study/session.log" >> "$OUT/session.log" 2>/dev/null  # results.md is in study/all.tgz
# the study's weights and checkpoints (GBs at the gpu preset's width) stay behind; the shipped model.pt is in ship/all.tgz
tar czf /tmp/brainsynth_both.tgz -C "$OUT" --exclude ./session.log --exclude "./study/*.pt" . \
  && mv /tmp/brainsynth_both.tgz "$OUT/all.tgz"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name all.tgz ! -name session.log -exec rm -rf {} +
du -sh "$OUT/all.tgz" | tee -a "$OUT/session.log"
log done
