#!/usr/bin/env bash
# The record: q0 with the --epochs 64 recipe (2 bases x (8 epochs + 24 one-epoch cycles), chain
# distillation, learned prior) on bytes-level Shakespeare, 32K training tokens, 0.95M parameters,
# on a CPU. Two seeds; each run trained in about 10 minutes on one thread (596 s and 637 s).
#   bash records/2026-11-23_shakespeare-cpu/run.sh
# The whole study behind it (single model, ensemble baseline, 27 allocations, q0 at 1-64 epochs,
# 2 seeds; about 85 minutes on 2 cores):
#   python records/2026-11-23_shakespeare-cpu/study.py
set -euo pipefail
cd "$(dirname "$0")/../.."
python data/shakespeare.py --tokenizer bytes
for seed in 0 1; do
  run=runs/record-cpu/q0-e64-s$seed
  python train_q0.py --preset cpu --epochs 64 --seed $seed --runs-dir runs/record-cpu --run-name q0-e64-s$seed
  [ -f $run/prior.json ] || python fit_prior.py $run
  [ -f $run/eval.json ] || python eval.py $run --prior $run/prior.json
done
