#!/usr/bin/env bash
# One model from the population: the q0 study's populations (the cpu preset at 16, 32 and 64
# epochs, seeds 0 and 1) each distilled into one student, and the ablations on the 64-epoch one.
#   bash records/2026-11-24_distil-cpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
python data/shakespeare.py --tokenizer bytes
# the populations, their priors and evaluations (and the single model and baseline the table needs)
python records/2026-11-23_shakespeare-cpu/study.py --runs-dir runs/study --no-allocations --single-max 16 \
  --baseline-groups 1 --stage report \
  --out-dir records/2026-11-24_record-model-cpu/study
# the students (with the text more_text.py samples from the 64-epoch ensembles), then the
# study's tables again with the student column
python records/2026-11-24_distil-cpu/distil_study.py --runs-dir runs/study
python records/2026-11-23_shakespeare-cpu/study.py --runs-dir runs/study --no-allocations --single-max 16 \
  --baseline-groups 1 --stage report \
  --out-dir records/2026-11-24_record-model-cpu/study
