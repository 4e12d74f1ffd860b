#!/bin/bash
# Where the full runs miss their goals: ten epochs instead of three (CRISP s=2/3/6 and LoRA on wordnet-nouns,
# one seed) and the distillation rate (1e-4, 1e-3; 2e-4 is the full run's) for every method at 48.6% kept.
# 12 processes, about 4 minutes on an H200 machine:  LIMIT=320 bash bench/device/minilm_explore.sh
source bench/device/setup.sh
for m in crisp_s2 crisp_s3 crisp_s6 lora_r8; do
  run e10-$m bench_minilm.py --threads 1 --tasks wordnet-nouns --methods $m --seeds 0 --grid 2 --epochs 10 $A --out $RES/adapt10-$m.json --plot /tmp/e10-$m.png &
done
for lr in 1e-4 1e-3; do for m in crisp svd basis-sharing fips; do
  run c50-$m-$lr bench_compress_minilm.py --threads 1 --keeps 0.5 --methods $m --distill-lr $lr $C --out $RES/compress50-$m-lr$lr.json &
done; done
finish
