#!/usr/bin/env bash
# How large the fitness set must be, and what scoring it costs (records/2026-12-05_fitness-size-cpu).
#   bash records/2026-12-05_fitness-size-cpu/run.sh
# Every population is trained with a fitness set of at least 99,743 tokens; fitness_size.py then
# fits the prior on prefixes of its fitness caches (exact: see its docstring).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
runs=runs/fitness-size
python data/shakespeare.py --tokenizer bytes
python data/python_docs.py --tokenizer bytes
for s in 0 1; do python train_q0.py --preset cpu --fitness-tokens 99743 --seed $s --runs-dir $runs; done
python train_q0.py --preset cpu --fitness-tokens 99743 --epochs 64 --runs-dir $runs --run-name q0-e64-s0
python train_q0.py --preset cpu --fitness-tokens 99743 --epochs 32 --data-dir data/python-docs/bytes \
  --runs-dir $runs --run-name pydocs-e32-s0
# a corpus whose first document is 466,118 tokens: the reference topics as one file, then each module
python - <<'PY'
import sysconfig
from pathlib import Path
from data import python_docs
src = Path("runs/fitness-size/bigdoc-src")
src.mkdir(parents=True, exist_ok=True)
topics, _ = python_docs.topic_documents()
(src / "0000-all-topics.txt").write_text("".join(d.text for d in topics))
for d in python_docs.module_documents(Path(sysconfig.get_paths()["stdlib"]))[0]:
    (src / (d.name.replace("module:", "m-") + ".txt")).write_text(d.text)
PY
python data/text.py $runs/bigdoc-src --tokenizer bytes --out $runs/bigdoc-data
for f in 466118 32768 16384; do  # the whole first document (the old carve), and two heads of it
  python train_q0.py --preset cpu --data-dir $runs/bigdoc-data --fitness-tokens $f --runs-dir $runs --run-name bigdoc-f$f
done
python records/2026-12-05_fitness-size-cpu/fitness_size.py $runs/cpu-1x6-seed0 $runs/cpu-1x6-seed1 \
  $runs/q0-e64-s0 $runs/pydocs-e32-s0 --out records/2026-12-05_fitness-size-cpu/fitness_size.json
python records/2026-12-05_fitness-size-cpu/fitness_size.py $runs/bigdoc-f466118 \
  --sizes 2048,4096,8192,16384,32768,65536,131072,262144
