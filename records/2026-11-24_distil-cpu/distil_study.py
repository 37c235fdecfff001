"""One model from the population, on a CPU: distil each q0 ensemble of the CPU study into a student.

    python records/2026-11-24_distil-cpu/distil_study.py --runs-dir runs/study   # after the q0 study

The populations are the q0 runs of records/2026-11-23_shakespeare-cpu/study.py (run with
`--budgets ...`; the cpu preset, bytes-level Shakespeare, 32,768 training tokens): q0-e{E}-s{S}
for each budget E and seed S, each with its prior.json. A student is `train_q0.py --preset cpu
--distil-from <population>/prior.json ...`: an ordinary run (one base, no snapshot noise) whose
teacher in every cycle is the prior's budget-K ensemble. Its number is the validation loss of its
snapshot with the lowest fitness loss (chosen on the held-out fitness play, as the single model's
E* is; never on validation); the last snapshot's is reported too.

Variants (flags on top of the main recipe `--distil-k 8 --epochs 16 --distil-alpha 0.8`):
  main       every budget and seed
  the rest   the 64-epoch population, seed 0 (alpha, init, temperature, K, a 32-epoch student, and
             the teacher on more text: bytes sampled from the ensemble by more_text.py)
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
MAIN = ["--distil-k", "8", "--epochs", "16", "--distil-alpha", "0.8"]
ABLATIONS = {  # name -> (population, seed, flags replacing or adding to MAIN's), most telling first
    "alpha-0.45": ("q0-e64-s0", 0, ["--distil-alpha", "0.45"]),  # chain distillation's alpha
    "alpha-1.0": ("q0-e64-s0", 0, ["--distil-alpha", "1.0"]),    # the teacher alone, no ground truth
    "alpha-0.45-init-best": ("q0-e64-s0", 0, ["--distil-alpha", "0.45", "--distil-init", "best"]),
    "T-1.0": ("q0-e64-s0", 0, ["--distil-temperature", "1.0"]),
    "K-4": ("q0-e64-s0", 0, ["--distil-k", "4"]),
    "epochs-32": ("q0-e64-s0", 0, ["--epochs", "32"]),                # a longer student, 2x the tokens
}
# The teacher on more text: the 32,768 training bytes plus 342 documents sampled from the same
# ensemble (more_text.py: 32-byte real prompts, 96 sampled bytes each), the student's tokens held
# equal to the 16- and the 32-epoch student's (fewer epochs of the larger data); both seeds.
SAMPLED = {"sampled-1x": 16, "sampled-1x-long": 32}  # name -> the real-data student whose tokens it matches
TRAIN_BYTES = 32768  # the cpu preset's --train-tokens
EXTRA = {"st-e64-s1-alpha-0.45": ("q0-e64-s1", 1, ["--distil-alpha", "0.45"]),  # the alpha-0.45 row's seed 1
         "st-e64-s1-epochs-32": ("q0-e64-s1", 1, ["--epochs", "32"])}


# Students trained before the --distil-* renaming recorded these names in their population_config.
OLD_NAMES = {"distil_alpha": "distill_alpha", "distil_temperature": "distill_temperature"}


def merged(flags: list[str]) -> list[str]:
    """MAIN with `flags` overriding its values (argparse's last-wins, written out once)."""
    out, given = [], dict(zip(flags[::2], flags[1::2]))
    for k, v in zip(MAIN[::2], MAIN[1::2]):
        out += [k, given.pop(k, v)]
    return out + [x for kv in given.items() for x in kv]


def sampled_data(runs: Path, seed: int) -> tuple[Path, int]:
    """The data folder with seed's 64-epoch ensemble's samples appended (built once; seed 0's folder
    has no suffix, as it was first built), and its training tokens."""
    folder = runs / ("data-sampled-1x" + (f"-s{seed}" if seed else ""))
    if not (folder / "sampled.json").is_file():
        cmd = [PY, str(HERE / "more_text.py"), "--prior", str(runs / f"q0-e64-s{seed}" / "prior.json"), "--k", "8",
               "--samples", "342", "--seed", str(seed), "--out", str(folder)]
        if subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1")).returncode:
            raise SystemExit(f"error: {' '.join(cmd)} failed")
    return folder, json.loads((folder / "sampled.json").read_text())["student_train_tokens"]


def sampled_jobs(runs: Path, seeds: list[int]) -> list[tuple]:
    jobs = []
    for seed in seeds:
        folder, tokens = sampled_data(runs, seed)
        for name, epochs in SAMPLED.items():
            flags = ["--data-dir", str(folder), "--train-tokens", str(tokens),
                     "--epochs", f"{epochs * TRAIN_BYTES / tokens:.4f}"]
            jobs.append((f"st-e64-s{seed}-{name}", f"q0-e64-s{seed}", seed, flags))
    return jobs


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
    events = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [e["tokens_per_s"] for e in events if e.get("event") == "step"]
    flags = {k: cfg[k] if k in cfg else cfg[OLD_NAMES[k]]
             for k in ("distil_k", "distil_init", "distil_alpha", "distil_temperature", "epochs")}
    return {"student": student.name, "population": population, "flags": flags,
            "teacher_forward_passes": len(cfg["distil_teacher"]),
            "student_tokens": round(last["base_epochs"] * manifest["train"]["tokens"]),
            "sampled_data": "sampled" in cfg["data_dir"],
            "student_val": pick["val_loss"], "student_snapshot": pick["id"], "student_epochs": pick["base_epochs"],
            "student_last_val": last["val_loss"], "student_last_epochs": last["base_epochs"],
            "population_epochs": sum(max(r["base_epochs"] for r in pop_recs if r["base"] == b)
                                     for b in {r["base"] for r in pop_recs}),
            "q0_val": pop_eval["prior"]["budgets"][-1]["refitted"]["loss"],
            "q0_forward_passes": pop_eval["prior"]["budgets"][-1]["refitted"]["forward_passes"],
            "teacher_val": budgets.get(cfg["distil_k"]),
            "best_snapshot_val": min(r["val_loss"] for r in pop_recs),
            "student_tokens_per_s": sum(rates) / len(rates) if rates else None}


def best_single(runs: Path, seeds: list[int], budget: float) -> dict | None:
    """The study's best single model within the budget: E* picked on the mean fitness loss over
    seeds (as study.py does), its validation loss per seed; None until those runs exist."""
    points = {}
    for m in runs.glob("single-e*-s*/manifest.json"):
        e, seed = m.parent.name[len("single-e"):].rsplit("-s", 1)
        if float(e) <= budget and int(seed) in seeds:
            points.setdefault(float(e), {})[int(seed)] = json.loads(m.read_text())["snapshots"][0]
    points = {e: p for e, p in points.items() if len(p) == len(seeds)}
    if not points:
        return None
    e = min(points, key=lambda e: sum(r["fitness_loss"] for r in points[e].values()))
    return {"epochs": e, "val": [points[e][s]["val_loss"] for s in seeds]}


def mean(xs):
    return sum(xs) / len(xs)


def spread(xs) -> str:
    return f"{mean(xs):.4f}" + (f" ± {(max(xs) - min(xs)) / 2:.4f}" if len(xs) > 1 else "")


def more_text_table(runs: Path, rows: list[dict], seeds: list[int]) -> list[str]:
    """Real text against real + sampled text, the student's tokens held equal (64-epoch populations)."""
    by_name, single = {r["student"]: r for r in rows}, best_single(runs, seeds, 64)
    out = ["", "The teacher on more text (64-epoch populations, K=8, a = 0.8): the student's training tokens held "
           "equal, on the 32,768 real bytes alone or with 44,118 bytes sampled from the same ensemble added "
           "(more_text.py; its cost is in README).", "",
           "| student's tokens | real text (epochs) | real + sampled (epochs) | gain kept of q0's: real | "
           "real + sampled |", "|---|---|---|---|---|"]
    pairs = (("st-e64-s{}", "st-e64-s{}-sampled-1x"), ("st-e64-s{}-epochs-32", "st-e64-s{}-sampled-1x-long"))
    for real, sampled in pairs:
        a = [by_name.get(real.format(s)) for s in seeds]
        b = [by_name.get(sampled.format(s)) for s in seeds]
        if None in a or None in b or not single:
            continue
        ref, q0 = mean(single["val"]), mean([r["q0_val"] for r in a])
        kept = [f"{(ref - mean([r['student_val'] for r in x])) / (ref - q0):.0%}" for x in (a, b)]
        out.append(f"| {mean([r['student_tokens'] for r in a]):,.0f} | {spread([r['student_val'] for r in a])} "
                   f"({mean([r['student_epochs'] for r in a]):.1f}) | {spread([r['student_val'] for r in b])} "
                   f"({mean([r['student_epochs'] for r in b]):.1f}) | {kept[0]} | {kept[1]} |")
    return out


def markdown(runs: Path, rows: list[dict], budgets: list[int], seeds: list[int]) -> str:
    out = ["Validation loss in nats per byte (the cpu preset's 32,768 validation bytes), mean ± half-range over "
           f"seeds {', '.join(map(str, seeds))}. fp = forward passes per token at inference. Gain kept = (best single "
           "- student) / (best single - ensemble).", "",
           "| budget | best single model (E*) | q0 ensemble, full prior (fp) | teacher: prior K=8 (fp) | student, 1 fp "
           "| student's own epochs | epochs on the axis | gain kept of q0's | gain kept of the teacher's |",
           "|---|---|---|---|---|---|---|---|---|"]
    for b in budgets:
        mine = [r for s in seeds for r in rows if r["student"] == f"st-e{b}-s{s}"]
        if len(mine) != len(seeds):
            continue
        single = best_single(runs, seeds, b)
        st, q0, te = ([r[k] for r in mine] for k in ("student_val", "q0_val", "teacher_val"))
        if single:
            ref = mean(single["val"])
            kept = f"{(ref - mean(st)) / (ref - mean(q0)):.0%}"
            kept_t = f"{(ref - mean(st)) / (ref - mean(te)):.0%}"
            single_txt = f"{spread(single['val'])} ({single['epochs']:g})"
        else:
            kept = kept_t = single_txt = "not run"
        fps = "/".join(str(r["q0_forward_passes"]) for r in mine)
        tfp = "/".join(str(r["teacher_forward_passes"]) for r in mine)
        axis = mean([r["population_epochs"] + r["student_epochs"] for r in mine])
        out.append(f"| {b} | {single_txt} | {spread(q0)} ({fps}) | {spread(te)} ({tfp}) | {spread(st)} | "
                   f"{mean([r['student_epochs'] for r in mine]):.1f} | {axis:.1f} | {kept} | {kept_t} |")
    out += more_text_table(runs, rows, seeds)
    out += ["", "Every student: the main recipe `--distil-k 8 --epochs 16 --distil-alpha 0.8` (st-eE-sS) and "
            "the ablations on the 64-epoch populations, each one change against it (the student picked on "
            "fitness, and its last snapshot):", "",
            "| student | population | K | init | alpha | T | teacher fp | teacher (K) loss | text | student's "
            "tokens | student (epochs) | last snapshot (epochs) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r["flags"]
        text = "real + sampled" if r.get("sampled_data") else "real"
        out.append(f"| {r['student']} | {r['population']} | {f['distil_k']} | {f['distil_init']} | "
                   f"{f['distil_alpha']:g} | {f['distil_temperature']:g} | {r['teacher_forward_passes']} | "
                   f"{r['teacher_val']:.4f} | {text} | {r['student_tokens']:,} | {r['student_val']:.4f} "
                   f"({r['student_epochs']:.1f}) | {r['student_last_val']:.4f} ({r['student_last_epochs']:.1f}) |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "study")
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 32, 16])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--only", choices=["main", "ablations", "all", "report"], default="all",
                    help="report: no training, the tables from the students already trained")
    a = ap.parse_args()
    jobs = []
    if a.only in ("main", "all"):
        jobs += [(f"st-e{b}-s{s}", f"q0-e{b}-s{s}", s, []) for b in a.budgets for s in a.seeds]
    if a.only in ("ablations", "all"):
        jobs += [(f"st-e64-s{seed}-{name}", pop, seed, flags) for name, (pop, seed, flags) in ABLATIONS.items()]
        jobs += [(name, pop, seed, flags) for name, (pop, seed, flags) in EXTRA.items()]
        jobs += sampled_jobs(a.runs_dir, a.seeds)
    if a.only == "report":
        jobs = [(d.name, d.name.split("-")[0] == "st" and "q0-" + "-".join(d.name.split("-")[1:3]), 0, [])
                for d in sorted((a.runs_dir / "students").iterdir()) if (d / "manifest.json").is_file()]
    for _, pop, _, _ in jobs:
        if not (a.runs_dir / pop / "prior.json").is_file():
            raise SystemExit(f"error: {a.runs_dir / pop} has no prior.json; run the q0 study and fit_prior.py first")
    with concurrent.futures.ThreadPoolExecutor(a.workers) as pool:
        runs = list(pool.map(lambda j: train_student(a.runs_dir, j[0], j[1], j[2], j[3]), jobs))
    rows = [result(a.runs_dir, j[1], r) for j, r in zip(jobs, runs) if (a.runs_dir / j[1] / "eval.json").is_file()]
    (HERE / "distil.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = markdown(a.runs_dir, rows, a.budgets, a.seeds)
    (HERE / "distil.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
