# Sourced by the device jobs (minilm_full.sh, minilm_explore.sh): unpacks what bench/device/pack.sh put in .gpu/
# (WordNet, fortunes and the calibration texts under /, all-MiniLM-L6-v2 as a float32 package in $SITE, peft),
# defines run NAME SCRIPT ARGS... (a benchmark as a background process, its output prefixed into $OUT/log.txt,
# stopped after $LIMIT s) and snapshots the JSON written so far into $OUT/results.tgz every 45 s, so a call cut
# short keeps what finished. DRY=1: the same commands at smoke sizes, on the CPU here, before spending device time.
set -u
OUT=${OUT:-/tmp/gpuout}; mkdir -p $OUT
ROOT=$(pwd); PY=${PY:-python3}; SITE=${SITE:-/tmp/site}; LIMIT=${LIMIT:-470}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
log() { echo "[$(date +%T)] $*" | tee -a $OUT/log.txt; }
if [ "${DRY:-0}" != 1 ]; then
  tar --skip-old-files -xJf .gpu/data.tar.xz -C / || { log "data untar failed"; exit 1; }
  nvidia-smi -L | tee -a $OUT/log.txt
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .gpu/whl/*.whl 2>&1 | tail -2
fi
mkdir -p $SITE && tar -xJf .gpu/minilm.tar.xz -C $SITE && $PY $ROOT/bench/device/prep.py $SITE 2>&1 | tee -a $OUT/log.txt
export PYTHONPATH=$SITE:$ROOT
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a $OUT/log.txt
cd bench
if [ "${DRY:-0}" = 1 ]; then
  A="--seeds 0,1 --max-train 48 --max-val 16 --max-test 16 --epochs 1 --grid 2"
  C="--windows 32 --window 32 --distill-epochs 1 --distill-batch 8 --head-epochs 1 --max-train 32 --max-test 16 --embed-texts 16"
else
  A=""; C="--windows 3072 --distill-epochs 8"
fi
RES=/tmp/res; mkdir -p $RES
run() { name=$1; shift; timeout $LIMIT $PY "$@" 2>&1 | grep --line-buffered -v -E "Loading weights|LOAD REPORT|^Key|^---|MISSING|^Notes|newly initialized|^$" | sed -u "s/^/[$name] /" >> $OUT/log.txt; echo "[$name] exit ${PIPESTATUS[0]}" >> $OUT/log.txt; }
snap() { tar -C $RES -czf $OUT/.r.tgz . && mv $OUT/.r.tgz $OUT/results.tgz; }
( while sleep 45; do snap; done ) & SNAP=$!
finish() { wait $(jobs -p | grep -v "^$SNAP$"); kill $SNAP; snap; log "all done"; ls -la $RES | tee -a $OUT/log.txt; }
