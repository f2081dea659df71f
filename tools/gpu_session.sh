#!/usr/bin/env bash
# One GPU session, run from the repository root on an offline GPU machine (see ../shared/gpu/README.md):
# phantom data -> segmenter pre-training -> TC-MGAN at the shipped width (the shipped model.pt) -> paper-width
# iteration timing. Everything it keeps goes to $OUT. (Inference timing: bundle/scripts/benchmark.py inference.)
#   QUICK=1 makes every stage tiny (a CPU dry run of this script).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"  # wheels on an offline GPU machine, PY, log
export PYTHONPATH=$PWD/bundle:${PYTHONPATH:-}
Q=${QUICK:-0}
N=$([ "$Q" = 1 ] && echo 6 || echo ${NCASES:-60})               # phantom cases
SEG_EP=$([ "$Q" = 1 ] && echo 1 || echo ${SEG_EPOCHS:-8})            # segmenter epochs
GAN_EP=$([ "$Q" = 1 ] && echo 1 || echo ${GAN_EPOCHS:-80})           # GAN epochs at the shipped width
EPLEN=$([ "$Q" = 1 ] && echo "--epoch_length 2" || echo "")  # empty: whole epochs
BENCH_IT=$([ "$Q" = 1 ] && echo 1 || echo 5)
BENCH_F=$([ "$Q" = 1 ] && echo 8 || echo 64)
D=/tmp/brainsynth_phantom; R=/tmp/brainsynth_runs
(nvidia-smi -L || true) | tee -a "$OUT/session.log"
log "phantoms: $N cases"
[ -f $D/datalist.json ] && log "phantoms already there" || seq 0 $((N - 1)) | xargs -P 12 -I{} $PY -c "
import sys; from pathlib import Path; from scripts.phantom import make_case, case_seed, _write_case, brats_affine
i={}; c=make_case(case_seed(0, i)); _write_case(c, i, Path('$D'), 'brats2021', brats_affine())" || log "phantom FAILED"
[ -f $D/datalist.json ] || $PY bundle/scripts/prepare_datalist.py --data_dir $D 2>&1 | tee -a "$OUT/session.log"
log "segmenter"
$PY -m monai.bundle run --bundle_root bundle --config_file "['bundle/configs/train.json','bundle/configs/train_segmenter.json']" --dataset_dir $D \
  --output_dir $R --features 16 --max_epochs $SEG_EP $EPLEN --cache_num_workers 12 > "$OUT/segmenter.log" 2>&1 || log "segmenter FAILED"
tail -3 "$OUT/segmenter.log"
log "tcmgan features 16"
timeout ${GAN_LIMIT:-170} $PY -m monai.bundle run --bundle_root bundle --config_file bundle/configs/train.json --dataset_dir $D --output_dir $R \
  --variant tcmgan --features 16 --batch_size 64 --max_epochs $GAN_EP $EPLEN --cache_num_workers 12 \
  --log_every 50 > "$OUT/tcmgan.log" 2>&1 || log "tcmgan stopped (exit $?; 124 = time limit, model.pt holds the best epoch so far)"
grep -E "Key metric|Epoch\[[0-9]+\] Metrics" "$OUT/tcmgan.log" | tail -4
cp $R/tcmgan/model.pt "$OUT/model.pt" 2>/dev/null; cp $R/segmenter/model.pt "$OUT/segmenter.pt" 2>/dev/null
log "benchmark: training iteration at width $BENCH_F"
[ "${SKIP_BENCH:-0}" = 1 ] || $PY bundle/scripts/benchmark.py training --features $BENCH_F --batch_size 64 --iterations $BENCH_IT --output "$OUT/train_bench.json" 2>&1 | grep "|" | tee -a "$OUT/session.log"
log "done"
