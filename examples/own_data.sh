#!/usr/bin/env bash
# Bring your own model and data, end to end from the command line:
#   real data written to disk the way users hold it (an ImageFolder of PNGs, an .npz), a real
#   weights file loaded through `--weights`, adaptation on that data, an ONNX export, a parity check.
#
#   examples/own_data.sh [OUT]        # OUT: a new folder (default own-data-demo)
#
# Environment: PYTHON (default .venv/bin/python if present, else python), CRISP_EDGE (the command,
# default "$PYTHON -m crisp_edge.cli"). About 2 minutes on 2 cores.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-own-data-demo}
if [ -e "$OUT" ]; then echo "$OUT exists; give a new folder" >&2; exit 2; fi
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
CE=${CRISP_EDGE:-"$PYTHON -m crisp_edge.cli"}
step() { printf '\n$ %s\n' "$*"; "$@"; }

# 1. data as users have it: Fashion-MNIST images as class folders of PNGs, digits as an .npz
step $PYTHON "$HERE/data/write_user_data.py" --out "$OUT/user-data" --per-class 40 --val-per-class 10

# 2. a pretrained timm ViT from its weights file (here the embedded model's own safetensors file and
#    the timm arguments it was built with; your file and your --model-arg lines go here)
WEIGHTS=$($PYTHON -c "from crisp_edge.models.sources import embedded_vit_files as f; print(f() / 'model.safetensors')")
step $CE retrofit timm:vit_tiny_patch16_224 --weights "$WEIGHTS" \
    --model-arg img_size=28 --model-arg patch_size=7 --model-arg in_chans=1 --model-arg num_classes=10 \
    --model-arg embed_dim=192 --model-arg depth=6 --model-arg num_heads=3 --model-arg mlp_ratio=4.0 \
    --group-size 3 --out "$OUT/ckpt" --no-progress

# 3. one mixer file per task, trained on the data on disk (bases frozen)
step $CE adapt "$OUT/ckpt" --data "$OUT/user-data/fmnist-images/train" --val-fraction 0.1 --epochs 2 \
    --name fmnist --out "$OUT/fmnist.mixers.safetensors" --no-progress
step $CE adapt "$OUT/ckpt" --data "$OUT/user-data/digits-train.npz" --val "$OUT/user-data/digits-test.npz" \
    --train-limit 400 --epochs 2 --name digits --out "$OUT/digits.mixers.safetensors" --no-progress

# 4. export to ONNX Runtime (swappable: one session, one adapter per task) and check parity
step $CE export "$OUT/ckpt" --target onnx --mode swappable --task "$OUT/fmnist.mixers.safetensors" \
    --task "$OUT/digits.mixers.safetensors" --out "$OUT/onnx"
step $CE parity "$OUT/onnx" --report-dir "$OUT/parity" --no-plot --no-progress
