#!/usr/bin/env bash
# The study on a corpus nobody tuned for: Python's own documentation, bytes, --preset cpu, seed 0,
# no allocation search (the `--epochs` recipe as tuned on Shakespeare), a 16,384-token fitness set.
#   bash records/2026-12-05_python-docs-cpu/run.sh        (about 2.5 hours on 2 shared cores)
# The first call ran budgets up to 32 with one worker; the second added 64, reusing every run.
set -euo pipefail
cd "$(dirname "$0")/../.."
python data/python_docs.py --tokenizer bytes
runs=runs/study-python_docs-bytes
python study.py --data-dir data/python-docs/bytes --budgets 1 2 4 8 16 32 --seeds 0 --workers 1 \
  --no-allocations --runs-dir $runs -- --fitness-tokens 16384
python study.py --data-dir data/python-docs/bytes --budgets 1 2 4 8 16 32 64 --seeds 0 --workers 2 \
  --no-allocations --single-max 32 --runs-dir $runs --out records/2026-12-05_python-docs-cpu \
  -- --fitness-tokens 16384
