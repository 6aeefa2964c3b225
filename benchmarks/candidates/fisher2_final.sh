#!/bin/bash
# Round 2b finalist: the Fisher compensation with lr * lambda_max(F) <= 1, 5 seeds, M = 1..64, both models.
cd "$(dirname "$0")/../.."
for model in cnn mlp; do
/work/main/.venv/bin/python benchmarks/candidates/fisher2.py cap1-by1-5s '{"cap": 1, "cap_by": "1", "seeds": 5}' $model 1 4 8 16 32 64
done
