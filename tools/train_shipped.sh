#!/usr/bin/env bash
# The recipe of the shipped bundle/models/model.pt, one command, resumable stage by stage (run it again after a
# kill: finished stages are skipped, the GAN continues from its last checkpoint). From the repository root:
#   phantoms (training: domain-randomised, optionally half of them with physics contrasts; model selection:
#   shifted cases of seed 1; test: shifted cases of seed 0) -> segmenter pre-training -> the recommended GAN
#   within a wall-time limit, model.pt chosen by the margin over the better trivial baseline on the selection
#   cases -> (CALIBRATE=1) its output calibration, fitted on the training data's seg split -> the test set's
#   quality table (model.pt, and the run's kept generators at three budgets) -> inference
#   and the axial / sagittal figures of one test case. Everything it keeps goes to $OUT.
#   VARIANT=anymissing trains the any-missing generator instead (same data, segmenter and recipe), selected on the
#   "three available -> one missing" scenarios of the selection cases, then scores it on the test cases by scenario
#   (evaluate.json; DOWNSTREAM_EPOCHS > 0 first trains BraSyn's downstream segmenter on the four real modalities;
#   remove $OUT/evaluation to re-evaluate with it) and draws its figures; no calibration, no inference folder.
#
#   OUT=runs/anymissing_ship VARIANT=anymissing DOWNSTREAM_EPOCHS=30 bash tools/train_shipped.sh   # any-missing
#   OUT=runs/shipped nohup bash tools/train_shipped.sh > runs/shipped.log 2>&1 &   # the CPU recipe (2 cores)
#   OUT=/tmp/ship NCASES=96 BATCH=64 GAN_LIMIT=420 bash tools/train_shipped.sh      # a GPU (H100/H200)
#   QUICK=1 OUT=/tmp/ship_dry bash tools/train_shipped.sh                          # every stage tiny: a dry run
#
# The shipped model (bundle 0.7.0) is this recipe's run OUT=runs/r7 NCASES=96 SEG_EPOCHS=3 CONTEXT=3 SELECT_EVERY=1200
# GAN_LIMIT=6700 CALIBRATE=1 TUMOUR_L1=5 on 2 cores (2026-12-07, fifth session: 3,882 iterations; its phantoms and
# segmenter were those of the same settings' earlier run, reused), before tumour_l1_weight 5 went into
# recommended.json; docs/quality.md has it and the runs before it (0.6.0: CONTRAST=mix on 40 phantoms, 800
# iterations; not shipped: CONTEXT=1, the weight average alone, the calibration alone, 96 phantoms without the
# tumour weight).
# Settings (environment): NCASES training phantoms (their datalist: 85 % gan, 15 % seg), CONTRAST (mix, the default:
# the second half of the training cases from phantom.py --domain physics; or randomised), NSELECT shifted cases for the model
# selection (seed 1), OOD shifted test cases (seed 0), SEG_EPOCHS, SEG_BATCH, FEATURES, BATCH, CONTEXT (G's input
# slices), GAN_LIMIT (seconds of GAN training; 0 = until GAN_EPOCHS x EPOCH_LENGTH iterations), GAN_EPOCHS,
# EPOCH_LENGTH, SELECT_EVERY (iterations between model-selection passes), BUDGET (seconds for the whole script:
# the GAN's limit shrinks to what is left after RESERVE seconds for what follows it), THREADS (torch threads of
# the GAN), DEVICE (default: cuda:0 when there is a GPU), WORKERS (processes for the phantoms and the cache),
# VARIANT (tcmgan, the default; anymissing), DOWNSTREAM_EPOCHS (any-missing only; 0: no downstream test), FULL_EVALUATION
# (1: evaluate.json on the test cases; the default for anymissing), TUMOUR_L1 (extra weight of the tumour's pixels in the generator's L1 term; unset: the configs'), VIEWS (axial, the default; all: the tri-planar generator and segmenter, trained, selected, scored and run on the
# axial, coronal and sagittal slices), STOP_AFTER=segmenter (make the data and the segmenter only, e.g. while the GAN's settings are decided), CALIBRATE
# (0, the default: none; 1: model.pt gets the output calibration fitted on the seg split, configs/calibrate.json,
# and the generator as trained is kept as model_uncalibrated.pt, both scored on the test cases).
set -uo pipefail
OUT=${OUT:-runs/shipped}; mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"  # wheels on an offline GPU machine, PY, log
Q=${QUICK:-0}
W=${WORKERS:-$(nproc)}
pick() { [ "$Q" = 1 ] && echo "$1" || echo "$2"; }  # the QUICK value or the setting's
NCASES=$(pick 6 "${NCASES:-40}"); NSELECT=$(pick 1 "${NSELECT:-8}"); OOD=$(pick 2 "${OOD:-8}")
CONTRAST=${CONTRAST:-mix}
SHAPE=$(pick "--shape [96,96,40]" ""); MINPIX=$(pick "--min_brain_pixels 400" "")
NOCHECK=$(pick "--check_contrast false" "")  # the T2 contrast check is fitted on full-size volumes, not 96x96x40
SEG_EPOCHS=$(pick 1 "${SEG_EPOCHS:-6}"); SEG_BATCH=${SEG_BATCH:-32}
FEATURES=$(pick 4 "${FEATURES:-16}"); BATCH=$(pick 4 "${BATCH:-16}"); CONTEXT=${CONTEXT:-3}
GAN_EPOCHS=$(pick 2 "${GAN_EPOCHS:-50}"); EPOCH_LENGTH=$(pick 2 "${EPOCH_LENGTH:-200}")
GAN_LIMIT=$(pick 0 "${GAN_LIMIT:-5000}"); SELECT_EVERY=$(pick 2 "${SELECT_EVERY:-300}")
BUDGET=${BUDGET:-0}; RESERVE=${RESERVE:-100}
TUMOUR_L1=${TUMOUR_L1:+--tumour_l1_weight $TUMOUR_L1}  # unset: the configs' (train.json: 0, the paper's plain L1)
VIEWS=${VIEWS:-axial}  # slice orientations of the segmenter, the GAN, the selection, the scores and the inference
THREADS=${THREADS:-$(nproc)}
DEVICE=${DEVICE:-$($PY -c "import torch; print('cuda:0' if torch.cuda.is_available() else 'cpu')")}
VARIANT=${VARIANT:-tcmgan}  # anymissing: the any-missing generator (any available modalities -> the missing ones)
case $VARIANT in tcmgan) G_NAME=recommended ;; anymissing) G_NAME=anymissing ;;
  *) echo "VARIANT=$VARIANT: expected tcmgan (the shipped model.pt) or anymissing" >&2; exit 2 ;; esac
if [ "$VARIANT" = anymissing ] && [ "${CALIBRATE:-0}" = 1 ]; then
  echo "CALIBRATE=1 is for the T2-only generator; the any-missing one is not calibrated" >&2; exit 2
fi
FULL_EVALUATION=${FULL_EVALUATION:-$([ "$VARIANT" = anymissing ] && echo 1 || echo 0)}
DOWNSTREAM_EPOCHS=${DOWNSTREAM_EPOCHS:-0}; [ "$Q" = 1 ] && [ "$DOWNSTREAM_EPOCHS" -gt 0 ] && DOWNSTREAM_EPOCHS=1
D=$OUT/data; S=$OUT/select; T=$OUT/ood; R=$OUT/runs; G=$R/$G_NAME
(nvidia-smi -L 2>/dev/null || echo "no GPU: $DEVICE, $THREADS threads") | tee -a "$OUT/session.log"
BUNDLE="$PY -m monai.bundle run --bundle_root bundle"

phantoms() {  # folder, number, seed, domain, fractions
  [ -f "$1/datalist.json" ] && return
  $PY bundle/scripts/phantom.py --output_dir "$1" --num_cases "$2" --seed "$3" --domain "$4" --workers "$W" \
    --overwrite true $SHAPE >> "$OUT/phantoms.log" 2>&1 || log "phantoms $1 FAILED"
  $PY bundle/scripts/prepare_datalist.py --data_dir "$1" --fractions "$5" | tail -1 | tee -a "$OUT/session.log"
}
log "phantoms: $NCASES training ($CONTRAST), $NSELECT shifted for the selection (seed 1), $OOD shifted for the test (seed 0)"
if [ "$CONTRAST" = mix ]; then  # the first half randomised, the second half physics contrasts (other anatomy too)
  if [ ! -f "$D/datalist.json" ]; then
    HALF=$((NCASES / 2))
    $PY bundle/scripts/phantom.py --output_dir "$OUT/randomised" --num_cases "$HALF" --seed 0 --workers "$W" \
      --overwrite true $SHAPE >> "$OUT/phantoms.log" 2>&1 || log "phantoms FAILED"
    $PY bundle/scripts/phantom.py --output_dir "$OUT/physics" --num_cases "$NCASES" --seed 0 --domain physics \
      --workers "$W" --overwrite true $SHAPE >> "$OUT/phantoms.log" 2>&1 || log "physics phantoms FAILED"
    mkdir -p "$D"
    for c in "$OUT"/randomised/BraTS2021_*; do ln -sfn "../randomised/$(basename "$c")" "$D/"; done
    for c in "$OUT"/physics/BraTS2021_*; do  # the physics cases numbered from HALF on
      n=$((10#${c##*_})); [ "$n" -ge "$HALF" ] && ln -sfn "../physics/$(basename "$c")" "$D/"
    done
    $PY bundle/scripts/prepare_datalist.py --data_dir "$D" --fractions "[0.85,0.15,0.0]" | tail -1 | tee -a "$OUT/session.log"
  fi
else
  phantoms "$D" "$NCASES" 0 randomised "[0.85,0.15,0.0]"
fi
phantoms "$S" "$NSELECT" 1 shifted "[0,0,1]"
phantoms "$T" "$OOD" 0 shifted "[0,0,1]"

if [ ! -f "$R/segmenter/model.pt" ]; then
  log "segmenter: $SEG_EPOCHS epochs"
  $BUNDLE --config_file "['bundle/configs/train.json','bundle/configs/train_segmenter.json']" --dataset_dir "$D" \
    --output_dir "$R" --device "$DEVICE" --features 16 --batch_size "$SEG_BATCH" --max_epochs "$SEG_EPOCHS" \
    --val_num_cases 3 --views "$VIEWS" $MINPIX --cache_num_workers "$W" --overwrite true > "$OUT/segmenter.log" 2>&1 || {
    log "segmenter FAILED; its log ends:"; grep -a -v "INFO - >" "$OUT/segmenter.log" | tail -25 | tee -a "$OUT/session.log"; }
  grep -a "best value" "$OUT/segmenter.log" | tail -1 | tee -a "$OUT/session.log"
fi
[ "${STOP_AFTER:-}" = segmenter ] && { log "stopped after the segmenter (STOP_AFTER=segmenter)"; exit 0; }

if [ ! -f "$G/done" ]; then
  if [ "$BUDGET" -gt 0 ]; then  # what is left of the session's budget, less the evaluation, inference and figures
    LEFT=$((BUDGET - SECONDS - RESERVE)); { [ "$GAN_LIMIT" -eq 0 ] || [ "$LEFT" -lt "$GAN_LIMIT" ]; } && GAN_LIMIT=$LEFT
    [ "$GAN_LIMIT" -lt 30 ] && GAN_LIMIT=30
  fi
  RESUME=$([ -f "$G/checkpoint.pt" ] && echo "--resume true" || echo "--overwrite true")
  log "recommended model, $VARIANT ($RESUME): features $FEATURES, batch $BATCH, context $CONTEXT, limit $GAN_LIMIT s"
  OMP_NUM_THREADS=$THREADS $BUNDLE --config_file "['bundle/configs/train.json','bundle/configs/recommended.json']" \
    --variant "$VARIANT" --dataset_dir "$D" --output_dir "$R" --device "$DEVICE" --features "$FEATURES" --batch_size "$BATCH" \
    --context "$CONTEXT" --views "$VIEWS" --max_epochs "$GAN_EPOCHS" --epoch_length "$EPOCH_LENGTH" --time_limit "$GAN_LIMIT" \
    --select_dataset_dir "$S" --select_interval "$SELECT_EVERY" --select_keep true --val_num_cases 3 \
    --val_interval 5 $MINPIX --cache_num_workers "$W" --log_every 100 $TUMOUR_L1 $RESUME >> "$OUT/recommended.log" 2>&1 \
    && touch "$G/done" || log "training stopped (exit $?): run this script again to resume it"
  grep -a "model selection at\|progress:" "$OUT/recommended.log" | tail -3 | tee -a "$OUT/session.log"
fi
[ -f "$G/model.pt" ] || { log "no model.pt"; exit 1; }
if [ "${CALIBRATE:-0}" = 1 ]; then  # the output calibration, fitted on the training data's seg split (not the test set)
  if [ ! -f "$OUT/model.pt" ] || [ "$G/model.pt" -nt "$OUT/model.pt" ]; then
    cp "$G/model.pt" "$OUT/model_uncalibrated.pt"
    log "output calibration on the seg split of $D"
    $BUNDLE --config_file "['bundle/configs/train.json','bundle/configs/calibrate.json']" --dataset_dir "$D" \
      --output_dir "$R" --ckpt_path "$OUT/model_uncalibrated.pt" --calibrated_path "$OUT/model.pt" $MINPIX --views "$VIEWS" \
      --device "$DEVICE" > "$OUT/calibration.log" 2>&1 || { log "calibration FAILED"; exit 1; }
    grep -a "calibration " "$OUT/calibration.log" | tail -4 | tee -a "$OUT/session.log"
  fi
else
  cp "$G/model.pt" "$OUT/model.pt"
fi

log "scores on the $OOD shifted test cases: model.pt, and the kept generators at three budgets"
if [ ! -f "$OUT/test_scores.json" ]; then
  KEPT=($(ls "$G"/selection/iteration_*.pt 2>/dev/null | sort -t_ -k2 -n))
  CKPTS="$OUT/model.pt$([ -f "$OUT/model_uncalibrated.pt" ] && echo ",$OUT/model_uncalibrated.pt")"
  if [ "${#KEPT[@]}" -ge 3 ]; then  # first, middle, last
    CKPTS="$CKPTS,${KEPT[0]},${KEPT[$(( ${#KEPT[@]} / 2 ))]},${KEPT[-1]}"
  fi
  $PY tools/score_checkpoints.py --dataset_dir "$T" --checkpoints "[$CKPTS]" --output "$OUT/test_scores.json" \
    --device "$DEVICE" --views "$VIEWS" 2>&1 | tee "$OUT/test_scores.md" | tee -a "$OUT/session.log" || log "scoring FAILED"
fi
DOWN=()
if [ "$VARIANT" = anymissing ] && [ "$DOWNSTREAM_EPOCHS" -gt 0 ]; then  # BraSyn's downstream test: a segmenter on the 4 real
  if [ ! -f "$R/downstream/real/model.pt" ]; then
    log "downstream segmenter on the four real modalities: $DOWNSTREAM_EPOCHS epochs"
    $BUNDLE --config_file "['bundle/configs/train.json','bundle/configs/train_segmenter.json','bundle/configs/train_downstream.json']" \
      --dataset_dir "$D" --output_dir "$R" --inputs real --device "$DEVICE" --features 16 --batch_size "$SEG_BATCH" \
      --max_epochs "$DOWNSTREAM_EPOCHS" --val_num_cases 3 $MINPIX --cache_num_workers "$W" --overwrite true \
      > "$OUT/downstream.log" 2>&1 \
      || log "downstream segmenter FAILED"
  fi
  [ -f "$R/downstream/real/model.pt" ] && DOWN=(--downstream_ckpt "$R/downstream/real/model.pt")
fi
if [ "$FULL_EVALUATION" = 1 ] && [ ! -f "$OUT/evaluation/scores.json" ]; then  # Table 1 / the scenario table (slow)
  $BUNDLE --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json']" --dataset_dir "$T" \
    --ckpt_path "$OUT/model.pt" --output_dir "$OUT/evaluation" --device "$DEVICE" --views "$VIEWS" $MINPIX \
    ${DOWN[@]+"${DOWN[@]}"} > "$OUT/evaluation.log" 2>&1 \
    || log "evaluation FAILED"
fi
if [ "$VARIANT" = anymissing ]; then  # the figures of the scenario evaluation (every scenario, one test case)
  [ -f "$OUT/evaluation/examples.npz" ] || { log "no evaluation (FULL_EVALUATION=0 or it failed): no figures"; exit 0; }
  for view in axial sagittal; do
    $PY tools/figures.py anymissing_figure "$OUT/evaluation/examples.npz" "$OUT/ood_$view.png" --view "$view" \
      >/dev/null || log "figure $view FAILED"
  done
  log "done"; exit 0
fi
[ -d "$OUT/inference" ] || $BUNDLE inference --config_file bundle/configs/inference.json --dataset_dir "$T" \
  --output_dir "$OUT/inference" --ckpt_path "$OUT/model.pt" --device "$DEVICE" --views "$VIEWS" $NOCHECK > "$OUT/inference.log" 2>&1 \
  || log "inference FAILED"
for view in axial sagittal; do
  $PY tools/figures.py synthesis_figure "$T" "$OUT/inference" "$OUT/ood_$view.png" --view "$view" >/dev/null \
    || log "figure $view FAILED"
done
log "done"
