#!/bin/bash
# The full configurations of bench_minilm.py (3 tasks x 6 methods, rates swept, 3 seeds) and
# bench_compress_minilm.py (48.6% and 24.7% kept, Alg. 6 at 48.6%) as 8 processes sharing one GPU (about 7
# minutes on an H200 machine). Run from the repository root on the device, after bench/device/pack.sh here:
#   LIMIT=500 bash bench/device/minilm_full.sh
# then combine the parts (bench/combine_parts.py; README.md says which file each table reads).
source bench/device/setup.sh
M1=head,lora_r8,crisp_s2; M2=crisp_s3,crisp_s6,full
for t in wordnet-nouns fortunes wordnet-verbs; do
  run $t-1 bench_minilm.py --threads 1 --tasks $t --methods $M1 $A --out $RES/adapt-$t-1.json --plot /tmp/$t-1.png &
  run $t-2 bench_minilm.py --threads 1 --tasks $t --methods $M2 $A --out $RES/adapt-$t-2.json --plot /tmp/$t-2.png &
done
run c50 bench_compress_minilm.py --threads 4 --keeps 0.5 --methods crisp,svd,basis-sharing,fips --alg6 $C --out $RES/compress50.json &
run c25 bench_compress_minilm.py --threads 4 --keeps 0.25 --methods crisp,svd,basis-sharing,fips $C --out $RES/compress25.json &
finish
