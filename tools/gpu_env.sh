# Sourced by the tools/*.sh GPU scripts after they set OUT (run from the repository root): on an offline GPU machine
# without monai, install the carried wheels (.whl/, ../shared/gpu/wheels.sh) into .site and put it on PYTHONPATH;
# then PY (the interpreter) and log (a timestamped line to the console and $OUT/session.log).
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import monai" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:${PYTHONPATH:-}
fi
PY=${PY:-python3}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/session.log"; }
