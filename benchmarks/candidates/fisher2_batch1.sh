#!/bin/bash
# Round 2b, batch 1: bounds on the Fisher compensation, M = 32 and 64, 3 seeds, both models, serially.
cd "$(dirname "$0")/../.."
run() { /work/main/.venv/bin/python benchmarks/candidates/fisher2.py "$@"; }
for model in cnn mlp; do
run cap1-by1      '{"cap": 1, "cap_by": "1"}' $model 32 64
run cap0.5-by1    '{"cap": 0.5, "cap_by": "1"}' $model 32 64
run kappa1        '{"kappa": 1}' $model 32 64
run kappa2        '{"kappa": 2}' $model 32 64
run kappa4        '{"kappa": 4}' $model 32 64
run cap20-bys     '{"cap": 20, "cap_by": "s"}' $model 32 64
run cap1-by1-clip4 '{"cap": 1, "cap_by": "1", "clip": 4}' $model 32 64
done
