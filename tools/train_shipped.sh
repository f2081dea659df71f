#!/usr/bin/env bash
# The recipe of the shipped bundle/models/model.pt (the recommended model: TC-MGAN, 3-slice context,
# resize-convolution, augmentation), run from the repository root: domain-randomised phantoms -> segmenter
# pre-training -> recommended GAN -> its out-of-distribution evaluation (phantom.py --domain shifted) and figures.
# Everything it keeps goes to $OUT (model.pt, logs, table1.md, the figures).
#
#   OUT=/tmp/ship bash tools/train_shipped.sh                    # the GPU recipe (one H100/H200, ~10 min)
#   OUT=/tmp/ship DEVICE=cpu NCASES=40 SEG_EPOCHS=6 SEG_BATCH=32 BATCH=16 GAN_EPOCHS=48 EPOCH_LENGTH=25 \
#       GAN_LIMIT=0 bash tools/train_shipped.sh                 # the CPU run the current model.pt comes from
#   QUICK=1 OUT=/tmp/ship_dry bash tools/train_shipped.sh        # every stage tiny: a dry run of this script
#
# Settings (environment): NCASES training phantoms (their datalist: 90 % gan, 10 % seg), OOD held-out shifted
# cases, SEG_EPOCHS, SEG_BATCH, FEATURES, BATCH, GAN_EPOCHS, EPOCH_LENGTH (iterations per GAN epoch; empty =
# whole epochs), GAN_LIMIT (seconds, 0 = none; model.pt keeps the best validated epoch), BUDGET (seconds for the
# whole script; the GAN gets what is left after RESERVE seconds for what follows it), DEVICE (default: cuda:0
# when there is a GPU), WORKERS (processes for the phantoms and the cache).
set -uo pipefail
OUT=${OUT:-/tmp/brainsynth_ship}; mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"  # wheels on an offline GPU machine, PY, log
Q=${QUICK:-0}
W=${WORKERS:-$(nproc)}
NCASES=$([ "$Q" = 1 ] && echo "${NCASES:-6}" || echo "${NCASES:-120}")
OOD=$([ "$Q" = 1 ] && echo 2 || echo "${OOD:-12}")
SHAPE=$([ "$Q" = 1 ] && echo "--shape [96,96,40]" || echo "")
SEG_EPOCHS=$([ "$Q" = 1 ] && echo 1 || echo "${SEG_EPOCHS:-10}")
SEG_BATCH=${SEG_BATCH:-64}
FEATURES=$([ "$Q" = 1 ] && echo 4 || echo "${FEATURES:-16}")
BATCH=$([ "$Q" = 1 ] && echo 4 || echo "${BATCH:-64}")
GAN_EPOCHS=$([ "$Q" = 1 ] && echo 2 || echo "${GAN_EPOCHS:-40}")
EPOCH_LENGTH=$([ "$Q" = 1 ] && echo 2 || echo "${EPOCH_LENGTH:-}")
GAN_LIMIT=${GAN_LIMIT:-$([ "$Q" = 1 ] && echo 0 || echo 420)}
BUDGET=${BUDGET:-0}     # seconds for the whole script (0 = none): the GAN's limit shrinks to what is left of it
RESERVE=${RESERVE:-100} # seconds kept for the evaluation, inference and figures when BUDGET is set
MINPIX=$([ "$Q" = 1 ] && echo "--min_brain_pixels 400" || echo "")
DEVICE=${DEVICE:-$($PY -c "import torch; print('cuda:0' if torch.cuda.is_available() else 'cpu')")}
D=$OUT/data; T=$OUT/ood; R=$OUT/runs
(nvidia-smi -L 2>/dev/null || echo "no GPU: $DEVICE") | tee -a "$OUT/session.log"
BUNDLE="$PY -m monai.bundle run --bundle_root bundle"
LEN=${EPOCH_LENGTH:+--epoch_length $EPOCH_LENGTH}

log "phantoms: $NCASES randomised (seed 0), $OOD shifted (seed 0), $W processes"
[ -f "$D/datalist.json" ] || $PY bundle/scripts/phantom.py --output_dir "$D" --num_cases "$NCASES" --seed 0 \
  --domain randomised --workers "$W" $SHAPE > "$OUT/phantoms.log" 2>&1 || log "phantoms FAILED"
[ -f "$T/datalist.json" ] || $PY bundle/scripts/phantom.py --output_dir "$T" --num_cases "$OOD" --seed 0 \
  --domain shifted --workers "$W" $SHAPE >> "$OUT/phantoms.log" 2>&1 || log "shifted phantoms FAILED"
$PY bundle/scripts/prepare_datalist.py --data_dir "$D" --fractions "[0.9,0.1,0.0]" | tail -1 | tee -a "$OUT/session.log"
$PY bundle/scripts/prepare_datalist.py --data_dir "$T" --fractions "[0,0,1]" | tail -1 | tee -a "$OUT/session.log"

log "segmenter: $SEG_EPOCHS epochs"
$BUNDLE --config_file "['bundle/configs/train.json','bundle/configs/train_segmenter.json']" --dataset_dir "$D" \
  --output_dir "$R" --device "$DEVICE" --features 16 --batch_size "$SEG_BATCH" --max_epochs "$SEG_EPOCHS" \
  --val_num_cases 3 $MINPIX --cache_num_workers "$W" --overwrite true > "$OUT/segmenter.log" 2>&1 || {
  log "segmenter FAILED; its log ends:"; grep -a -v "INFO - >" "$OUT/segmenter.log" | tail -25 | tee -a "$OUT/session.log"; }
VARIANT=""
[ -f "$R/segmenter/model.pt" ] || { VARIANT="--variant mgan"; log "no segmenter: the GAN is trained without the tumour-consistency term (mgan)"; }
grep -a "best value" "$OUT/segmenter.log" | tail -1 | tee -a "$OUT/session.log"

log "recommended model: features $FEATURES, batch $BATCH, $GAN_EPOCHS epochs ${EPOCH_LENGTH:+of $EPOCH_LENGTH iterations}"
if [ "$BUDGET" -gt 0 ]; then  # what is left of the session's budget, less the evaluation, inference and figures
  LEFT=$((BUDGET - SECONDS - RESERVE)); [ "$GAN_LIMIT" -eq 0 ] || [ "$LEFT" -lt "$GAN_LIMIT" ] && GAN_LIMIT=$LEFT
  [ "$GAN_LIMIT" -lt 30 ] && GAN_LIMIT=30
  log "GAN time limit: $GAN_LIMIT s (budget $BUDGET s, $SECONDS s used, $RESERVE s kept for what follows)"
fi
LIMIT=$([ "$GAN_LIMIT" -gt 0 ] && echo "timeout $GAN_LIMIT" || echo "")
$LIMIT $BUNDLE --config_file "['bundle/configs/train.json','bundle/configs/recommended.json']" --dataset_dir "$D" $VARIANT \
  --output_dir "$R" --device "$DEVICE" --features "$FEATURES" --batch_size "$BATCH" --max_epochs "$GAN_EPOCHS" $LEN \
  --val_num_cases 3 --val_interval 4 $MINPIX --cache_num_workers "$W" --log_every 25 --overwrite true \
  > "$OUT/recommended.log" 2>&1 || { log "training stopped (exit $?; 124 = time limit, model.pt holds the best validated epoch)"
  grep -a -v "INFO - >" "$OUT/recommended.log" | grep -a -v "Epoch\|Iteration" | tail -8 | tee -a "$OUT/session.log"; }
grep -a "Epoch\[[0-9]*\] Metrics" "$OUT/recommended.log" | tail -3 | tee -a "$OUT/session.log"
cp "$R/recommended/model.pt" "$OUT/model.pt" 2>/dev/null || log "no model.pt"

log "evaluation on the $OOD shifted cases"
$BUNDLE --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json']" --dataset_dir "$T" \
  --ckpt_path "$OUT/model.pt" --output_dir "$OUT/evaluation" --device "$DEVICE" $MINPIX \
  > "$OUT/evaluation.log" 2>&1 || log "evaluation FAILED"
sed -n '/Quality protocol/,$p' "$OUT/evaluation/table1.md" | tee -a "$OUT/session.log"
$BUNDLE inference --config_file bundle/configs/inference.json --dataset_dir "$T" --output_dir "$OUT/inference" \
  --ckpt_path "$OUT/model.pt" --device "$DEVICE" > "$OUT/inference.log" 2>&1 || log "inference FAILED"
for view in axial sagittal; do
  $PY bundle/scripts/figures.py synthesis_figure "$T" "$OUT/inference" "$OUT/ood_$view.png" --view "$view" >/dev/null \
    || log "figure $view FAILED"
done
log "done"
