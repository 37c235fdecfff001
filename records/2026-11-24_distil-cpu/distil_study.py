"""One model from the population, on a CPU: distil each q0 ensemble of the CPU study into a student.

    python records/2026-11-24_distil-cpu/distil_study.py --runs-dir runs/study   # after the q0 study

The populations are the q0 runs of records/2026-11-23_shakespeare-cpu/study.py (run with
`--budgets ...`; the cpu preset, bytes-level Shakespeare, 32,768 training tokens): q0-e{E}-s{S}
for each budget E and seed S, each with its prior.json. A student is `train_q0.py --preset cpu
--distil-from <population>/prior.json ...`: an ordinary run (one base, no snapshot noise) whose
teacher in every cycle is the prior's budget-K ensemble. Its number is the validation loss of its
snapshot with the lowest fitness loss (chosen on the held-out fitness play, as the single model's
E* is; never on validation); the last snapshot's is reported too.

Variants (flags on top of the main recipe `--distil-k 8 --epochs 16 --distill-alpha 0.8`):
  main       every budget and seed
  the rest   the 64-epoch population, seed 0 (alpha, init, temperature, K)
Students already trained are reused; a cut-off one resumes. Results: distil.json and distil.md
beside this file.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PY = sys.executable
MAIN = ["--distil-k", "8", "--epochs", "16", "--distill-alpha", "0.8"]
ABLATIONS = {  # name -> (population, seed, flags replacing or adding to MAIN's), most telling first
    "alpha-0.45": ("q0-e64-s0", 0, ["--distill-alpha", "0.45"]),  # chain distillation's alpha
    "alpha-1.0": ("q0-e64-s0", 0, ["--distill-alpha", "1.0"]),    # the teacher alone, no ground truth
    "alpha-0.45-init-best": ("q0-e64-s0", 0, ["--distill-alpha", "0.45", "--distil-init", "best"]),
    "T-1.0": ("q0-e64-s0", 0, ["--distill-temperature", "1.0"]),
    "K-4": ("q0-e64-s0", 0, ["--distil-k", "4"]),
}
EXTRA = {"st-e64-s1-alpha-0.45": ("q0-e64-s1", 1, ["--distill-alpha", "0.45"])}  # the alpha-0.45 row's seed 1


def merged(flags: list[str]) -> list[str]:
    """MAIN with `flags` overriding its values (argparse's last-wins, written out once)."""
    out, given = [], dict(zip(flags[::2], flags[1::2]))
    for k, v in zip(MAIN[::2], MAIN[1::2]):
        out += [k, given.pop(k, v)]
    return out + [x for kv in given.items() for x in kv]


def train_student(runs: Path, name: str, population: str, seed: int, flags: list[str]) -> Path:
    run = runs / "students" / name
    if (run / "manifest.json").is_file():
        return run
    cmd = [PY, str(ROOT / "train_q0.py"), "--preset", "cpu", "--runs-dir", str(runs / "students"), "--run-name", name,
           "--distil-from", str(runs / population / "prior.json"), "--seed", str(seed), *merged(flags)]
    (runs / "students").mkdir(parents=True, exist_ok=True)
    with open(runs / "students" / f"{name}.out", "a") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode:
            raise SystemExit(f"error: {' '.join(cmd)} failed; see {out.name}")
    return run


def result(runs: Path, population: str, student: Path) -> dict:
    pop_eval = json.loads((runs / population / "eval.json").read_text())
    budgets = {b["K"]: b["refitted"]["loss"] for b in pop_eval["prior"]["budgets"]}
    manifest = json.loads((student / "manifest.json").read_text())
    recs, cfg = manifest["snapshots"], manifest["population_config"]
    last = max(recs, key=lambda r: r["cycle"])
    pick = min(recs, key=lambda r: r["fitness_loss"])
    pop_recs = json.loads((runs / population / "manifest.json").read_text())["snapshots"]
    log = (student / "log.txt").read_text().splitlines()
    rates = [float(line.split(" tok/s")[0].rsplit("| ", 1)[1].replace(",", "")) for line in log if " tok/s" in line]
    return {"student": student.name, "population": population, "flags": {k: cfg[k] for k in (
                "distil_k", "distil_init", "distill_alpha", "distill_temperature", "epochs")},
            "teacher_forward_passes": len(cfg["distil_teacher"]),
            "student_val": pick["val_loss"], "student_snapshot": pick["id"], "student_epochs": pick["base_epochs"],
            "student_last_val": last["val_loss"], "student_last_epochs": last["base_epochs"],
            "population_epochs": sum(max(r["base_epochs"] for r in pop_recs if r["base"] == b)
                                     for b in {r["base"] for r in pop_recs}),
            "q0_val": pop_eval["prior"]["budgets"][-1]["refitted"]["loss"],
            "q0_forward_passes": pop_eval["prior"]["budgets"][-1]["refitted"]["forward_passes"],
            "teacher_val": budgets.get(cfg["distil_k"]),
            "best_snapshot_val": min(r["val_loss"] for r in pop_recs),
            "student_tokens_per_s": sum(rates) / len(rates) if rates else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "study")
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 32, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=["main", "ablations", "all"], default="all")
    a = ap.parse_args()
    jobs = []
    if a.only in ("main", "all"):
        jobs += [(f"st-e{b}-s{s}", f"q0-e{b}-s{s}", s, []) for b in a.budgets for s in a.seeds]
    if a.only in ("ablations", "all"):
        jobs += [(f"st-e64-s{seed}-{name}", pop, seed, flags) for name, (pop, seed, flags) in ABLATIONS.items()]
        jobs += [(name, pop, seed, flags) for name, (pop, seed, flags) in EXTRA.items()]
    for _, pop, _, _ in jobs:
        if not (a.runs_dir / pop / "prior.json").is_file():
            raise SystemExit(f"error: {a.runs_dir / pop} has no prior.json; run the q0 study and fit_prior.py first")
    with concurrent.futures.ThreadPoolExecutor(a.workers) as pool:
        runs = list(pool.map(lambda j: train_student(a.runs_dir, j[0], j[1], j[2], j[3]), jobs))
    rows = [result(a.runs_dir, j[1], r) for j, r in zip(jobs, runs) if (a.runs_dir / j[1] / "eval.json").is_file()]
    (HERE / "distil.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
