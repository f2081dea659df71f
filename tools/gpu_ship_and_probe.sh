#!/usr/bin/env bash
# One GPU session in one command (see ../shared/gpu/README.md), from the repository root:
#  1. tools/train_shipped.sh under a time budget (the shipped model.pt: phantoms, segmenter, recommended GAN,
#     out-of-distribution evaluation, figures);
#  2. the paper preset's GAN (TC-MGAN, width 64, batch 64, the segmenter of step 1) for its first seconds: does it
#     start, its time per iteration and GPU memory (the projection of the `paper` preset's wall time, issue #14).
# Everything kept goes to $OUT; the phantom volumes, caches and training checkpoints are removed at the end.
#   OUT=/tmp/gpu bash tools/gpu_ship_and_probe.sh
#   QUICK=1 OUT=/tmp/gpu_dry bash tools/gpu_ship_and_probe.sh     # every stage tiny, on the CPU: a dry run
set -uo pipefail
OUT=${OUT:-/tmp/brainsynth_gpu}; mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"  # wheels on an offline GPU machine, PY, log
Q=${QUICK:-0}
SHIP_BUDGET=${SHIP_BUDGET:-$([ "$Q" = 1 ] && echo 300 || echo 465)}
PROBE=${PROBE:-$([ "$Q" = 1 ] && echo 60 || echo 75)}
(while sleep 2; do nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null; done) \
  > "$OUT/gpu_usage.csv" &
MON=$!
$PY -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__)" | tee -a "$OUT/session.log"
nproc | sed 's/^/cpu cores: /' | tee -a "$OUT/session.log"

log "step 1: tools/train_shipped.sh, budget $SHIP_BUDGET s"
BUDGET=$SHIP_BUDGET OUT=$OUT/ship bash tools/train_shipped.sh > "$OUT/ship.log" 2>&1 || log "train_shipped.sh: exit $?"

[ "$PROBE" -gt 0 ] && {
log "step 2: the paper preset's GAN for $PROBE s"
F=$([ "$Q" = 1 ] && echo 8 || echo 64); LEN=$([ "$Q" = 1 ] && echo 2 || echo 50)
MINPIX=$([ "$Q" = 1 ] && echo "--min_brain_pixels 400" || echo "")
DEVICE=$($PY -c "import torch; print('cuda:0' if torch.cuda.is_available() else 'cpu')")
PROBE_T0=$SECONDS
timeout "$PROBE" $PY -m monai.bundle run --bundle_root bundle --config_file bundle/configs/train.json \
  --dataset_dir "$OUT/ship/data" --output_dir "$OUT/paper_probe" --variant tcmgan --features "$F" --batch_size 64 \
  --segmenter_ckpt "$OUT/ship/runs/segmenter/model.pt" --device "$DEVICE" --max_epochs 20 --epoch_length "$LEN" \
  --val_interval 100 --cache_num_workers "$(nproc)" $MINPIX --overwrite true > "$OUT/paper_probe.log" 2>&1
log "paper probe stopped (exit $?) after $((SECONDS - PROBE_T0)) s; $LEN iterations per epoch:"
grep -a "Complete. Time taken" "$OUT/paper_probe.log" | tee -a "$OUT/session.log"
}
kill $MON 2>/dev/null
sort -t, -k2 -n "$OUT/gpu_usage.csv" 2>/dev/null | tail -1 | sed 's/^/peak GPU memory sample: /' | tee -a "$OUT/session.log"
rm -rf "$OUT/ship/data" "$OUT/ship/ood" "$OUT/ship/inference" "$OUT/ship/runs"/*/checkpoint.pt \
  "$OUT/ship/runs/cache" "$OUT/paper_probe"/*/checkpoint.pt "$OUT/paper_probe"/*/model.pt
tar czf /tmp/brainsynth_all.tgz -C "$OUT" --exclude ./session.log . && mv /tmp/brainsynth_all.tgz "$OUT/all.tgz"
du -sh "$OUT/all.tgz" | tee -a "$OUT/session.log"
find "$OUT" -mindepth 1 -maxdepth 1 ! -name all.tgz ! -name session.log -exec rm -rf {} +  # one file comes back
log done
