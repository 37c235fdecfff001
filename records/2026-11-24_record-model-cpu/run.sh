#!/usr/bin/env bash
# The cpu preset's ablations (--epochs 16, seed 0) and its re-measure at 16 and 32 epochs.
#   bash records/2026-11-24_record-model-cpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python data/shakespeare.py --tokenizer bytes
runs=runs/record-model-cpu
one() {  # NAME FLAGS...: train, fit the prior, evaluate (each step skipped when done)
  local name=$1; shift
  python train_q0.py --preset cpu --runs-dir $runs --run-name "$name" "$@"
  [ -f $runs/$name/prior.json ] || python fit_prior.py $runs/$name
  [ -f $runs/$name/eval.json ] || python eval.py $runs/$name --prior $runs/$name/prior.json
}
one ref16 --epochs 16 --loop-layers 2 2 --no-zero-out-init
one loop16 --epochs 16 --loop-layers 2 3 --loop-repeats 4 --no-zero-out-init
one nodecay16 --epochs 16 --loop-layers 2 2 --no-zero-out-init --no-decay-embeddings
one nomtp16 --epochs 16 --loop-layers 2 2 --no-zero-out-init --mtp-weight 0
one noiha16 --epochs 16 --loop-layers 2 2 --no-zero-out-init --no-iha
one nocautious16 --epochs 16 --loop-layers 2 2 --no-zero-out-init --no-cautious-wd
one noeqr16 --epochs 16 --loop-layers 2 2 --no-zero-out-init --no-muon-eq-r
for e in 16 32; do for s in 0 1; do one q0-e$e-s$s --epochs $e --seed $s; done; done
