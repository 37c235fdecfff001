#!/usr/bin/env bash
# Downstream tasks on the CPU: the next-line task (tasks.py) for the README's default q0
# population (each snapshot, the uniform ensemble, the prior's budgets), a student distilled from
# its K=4 ensemble, and the ensemble baseline's two independent 12-epoch single models.
#   bash records/2026-12-05_downstream-cpu/run.sh [RUNS_DIR]      (default /tmp/q0-tasks-runs)
# About 25 minutes on 2 cores. eval.py never overwrites its output: move the record's eval-*.json
# and eval-*.md away first to compute them again.
set -euo pipefail
# --fitness-tokens 99743: the cpu preset's fitness set when this ran (the whole first play; it carves 32,768 since)
cd "$(dirname "$0")/../.."
RUNS=${1:-/tmp/q0-tasks-runs}
OUT=records/2026-12-05_downstream-cpu
export OMP_NUM_THREADS=1
[ -f data/shakespeare/bytes/val.q0t ] || python data/shakespeare.py --tokenizer bytes
python train_q0.py --preset cpu --fitness-tokens 99743 --runs-dir "$RUNS"                                  # cpu-1x6-seed0: 6 snapshots, 16 epochs
[ -f "$RUNS/cpu-1x6-seed0/prior.json" ] || python fit_prior.py "$RUNS/cpu-1x6-seed0"
for seed in 100 101; do                                                             # independent single models
  python train_q0.py --preset cpu --fitness-tokens 99743 --runs-dir "$RUNS" --run-name member-e12-s$seed --cycles 1 \
    --first-cycle-epochs 12 --distil-from-cycle 0 --snapshot-noise 0 0 --seed $seed
done
python train_q0.py --preset cpu --fitness-tokens 99743 --runs-dir "$RUNS" --run-name student-k4 \
  --distil-from "$RUNS/cpu-1x6-seed0/prior.json" --distil-k 4 --epochs 16             # one model from the K=4 ensemble
python eval.py "$RUNS/cpu-1x6-seed0" "$RUNS/student-k4" --prior "$RUNS/cpu-1x6-seed0/prior.json" \
  --tasks next-line --out "$OUT/eval-q0.json"
python eval.py "$RUNS/member-e12-s100" "$RUNS/member-e12-s101" --tasks next-line --parts members,uniform \
  --out "$OUT/eval-baseline.json"
