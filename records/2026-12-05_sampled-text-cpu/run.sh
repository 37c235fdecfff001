#!/usr/bin/env bash
# Sampled-text distillation with the KV-cache sampler (sample.py --write-data), its cost on the
# epoch axis, and the student it teaches: the 64-epoch population of the CPU study, seeds 0 and 1.
#   RUNS=/work/study/sampled bash records/2026-12-05_sampled-text-cpu/run.sh [SEED ...]
# Every step is skipped when its output exists and resumes when cut off (the trainer resumes when
# rerun with the same command), so rerunning this script finishes whatever is left.
set -euo pipefail
# --fitness-tokens 99743: the cpu preset's fitness set when this ran (the whole first play; it carves 32,768 since)
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/sampled-text}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f data/shakespeare/bytes/train.q0t ] || python data/shakespeare.py --tokenizer bytes
SEEDS=${*:-0 1}
for S in $SEEDS; do
  POP=$RUNS/q0-e64-s$S DATA=$RUNS/data-sampled-s$S STUDENT=st-e64-s$S-sampled
  # the population, its prior and its evaluation (records/2026-11-23_shakespeare-cpu/study.py's q0 runs)
  [ -f "$POP/manifest.json" ] || python train_q0.py --preset cpu --fitness-tokens 99743 --epochs 64 --seed "$S" --runs-dir "$RUNS" \
    --run-name "q0-e64-s$S"
  [ -f "$POP/prior.json" ] || python fit_prior.py "$POP"
  [ -f "$POP/eval.json" ] || python eval.py "$POP" --prior "$POP/prior.json"
  # 342 documents from the prior's K=8 ensemble: BOS, 32 real training bytes, 96 drawn at temperature 1
  # (the text records/2026-11-24_distil-cpu/more_text.py sampled without a cache)
  [ -f "$DATA/manifest.json" ] || python sample.py "$POP" --prior "$POP/prior.json" --budget 8 --samples 342 \
    --tokens 96 --prompt-tokens 32 --seed "$S" --write-data "$DATA"
  # the student of records/2026-11-24_distil-cpu's sampled-1x-long: K=8, a = 0.8, the tokens of a
  # 32-epoch student on the 32,768 real bytes (fewer epochs of the larger data)
  TOKENS=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['student_flags'][-1])" "$DATA/manifest.json")
  EPOCHS=$(python -c "print(f'{32 * 32768 / $TOKENS:.4f}')")
  [ -f "$RUNS/$STUDENT/manifest.json" ] || python train_q0.py --preset cpu --fitness-tokens 99743 --runs-dir "$RUNS" --run-name "$STUDENT" \
    --distil-from "$POP/prior.json" --seed "$S" --distil-k 8 --epochs "$EPOCHS" --distil-alpha 0.8 \
    --data-dir "$DATA" --train-tokens "$TOKENS"
  # the student (its last snapshot, 1 forward pass) beside the population's ensembles
  [ -f "$RUNS/eval-$STUDENT.json" ] || python eval.py "$POP" "$RUNS/$STUDENT" --prior "$POP/prior.json" \
    --out "$RUNS/eval-$STUDENT.json"
  cp "$DATA/manifest.json" "records/2026-12-05_sampled-text-cpu/data-sampled-s$S.json"
done
# results.json and results.md: the table of README.md
python records/2026-12-05_sampled-text-cpu/table.py --runs-dir "$RUNS" --seeds $SEEDS
