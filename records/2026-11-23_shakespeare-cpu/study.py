"""The mini-Slowrun on a CPU: single model, strong ensemble baseline and q0 at every epoch budget.

    python records/2026-11-23_shakespeare-cpu/study.py                 # everything (~1.5 h on 2 cores)
    python records/2026-11-23_shakespeare-cpu/study.py --stage single  # one stage at a time

Every training run is `train_q0.py --preset cpu` with flags (no other trainer): bytes-level
Shakespeare, 32,768 training tokens, a 0.95M-parameter model. Runs go to --runs-dir; a run that
already finished is reused, a cut-off one resumes, so the study can be stopped and restarted.

Stages, in order (each needs the ones before it):
  single       one model, one linear-decay schedule of E epochs, for E in --budgets (and the
               extra points 6, 10, 12 and 14 near its optimum), --seeds seeds: the saturation curve.
  allocations  q0 layouts tried at six budgets (seed 0) to find the `--epochs` recipe.
  baseline     independent members, each with the single-model schedule that is best on the
               fitness set (E*), seeds 100+; the ensemble at budget E is the first E/E* of them,
               probabilities averaged uniformly. Below E* it is the single model of E epochs.
  q0           `train_q0.py --epochs E` (the recipe), --seeds seeds; fit_prior.py then eval.py.
  report       study.json, study.md and study.png (with matplotlib) beside this file.

Selection is never made on validation data: E* and K are picked on the fitness set (the first
play, held out from training), and validation numbers are only reported.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))
import q0_run  # noqa: E402  (epochs_spent: the budget a run's snapshots account for)
import train_q0  # noqa: E402  (recipe: the layout of a budget)

PY = sys.executable
SINGLE_EXTRA = (6, 10, 12, 14)        # finer points near the single model's optimum
BASELINE_SEED0 = 100            # baseline members: seeds 100, 101, ... (disjoint from the others)
ALLOCATIONS = {                 # budget -> (bases, first-cycle epochs, cycle epochs) tried
    1: [(1, 0.5, 0.25), (1, 0.5, 0.5)],
    2: [(1, 1, 0.5), (1, 1, 0.25), (1, 1.5, 0.25)],
    4: [(1, 2, 0.5), (1, 2, 1), (1, 1, 0.5), (1, 3, 0.5)],
    16: [(1, 8, 2), (1, 6, 2), (1, 4, 2), (1, 8, 1), (1, 12, 1), (1, 12, 2), (1, 8, 4)],
    32: [(1, 8, 2), (1, 8, 1), (2, 8, 1)],
    64: [(1, 8, 2), (1, 12, 2), (1, 16, 2), (1, 8, 4), (1, 8, 1), (2, 8, 2), (2, 8, 1), (4, 8, 1)],
}


def train_run(runs: Path, name: str, flags: list[str]) -> Path:
    """Train (or resume, or reuse) one run; its stdout and stderr go to <name>.out."""
    run_dir = runs / name
    if (run_dir / "manifest.json").is_file():
        return run_dir
    cmd = [PY, str(ROOT / "train_q0.py"), "--preset", "cpu", "--runs-dir", str(runs), "--run-name", name, *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per run, runs side by side
    with open(runs / f"{name}.out", "a") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode:
            raise SystemExit(f"error: {' '.join(cmd)} failed; see {runs / (name + '.out')}")
    return run_dir


def train_all(runs: Path, jobs: list[tuple[str, list[str]]], workers: int):
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: train_run(runs, *job), jobs))


def tool(script: str, *args) -> None:
    cmd = [PY, str(ROOT / script), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{res.stderr}")


def snapshots(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "manifest.json").read_text())["snapshots"]


def single_flags(epochs: float, seed: int) -> list[str]:
    return ["--cycles", "1", "--first-cycle-epochs", f"{epochs:g}", "--distil-from-cycle", "0",
            "--snapshot-noise", "0", "0", "--seed", str(seed)]


def fmt(x: float) -> str:
    return f"{x:g}"


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def stage_single(a) -> dict:
    points = sorted(e for e in set(a.budgets) | set(SINGLE_EXTRA) if e <= a.single_max)
    jobs = [(f"single-e{fmt(e)}-s{s}", single_flags(e, s)) for e in reversed(points) for s in a.seeds]
    train_all(a.runs, jobs, a.workers)  # longest first, so the workers finish together
    out = {}
    for e in points:
        recs = [snapshots(a.runs / f"single-e{fmt(e)}-s{s}")[0] for s in a.seeds]
        out[fmt(e)] = {"epochs": e, "val": [r["val_loss"] for r in recs], "fitness": [r["fitness_loss"] for r in recs]}
    return out


def best_single_epochs(single: dict) -> float:
    """E*: the schedule length whose mean fitness loss is lowest."""
    return min(single.values(), key=lambda p: sum(p["fitness"]) / len(p["fitness"]))["epochs"]


def stage_baseline(a, single: dict) -> dict:
    e_star = best_single_epochs(single)
    n_groups = a.baseline_groups or len(a.seeds)
    groups = [[BASELINE_SEED0 + g * 1000 + m for m in range(int(max(a.budgets) // e_star))] for g in range(n_groups)]
    jobs = [(f"member-e{fmt(e_star)}-s{s}", single_flags(e_star, s)) for grp in groups for s in grp]
    train_all(a.runs, jobs, a.workers)
    out = {"member_epochs": e_star, "budgets": {}}
    for budget in a.budgets:
        n = int(budget // e_star)
        if n < 1:  # below E* the best one can do is one model of `budget` epochs
            p = single[fmt(budget)]
            out["budgets"][fmt(budget)] = {"members": 1, "member_epochs": budget, "epochs": budget, "val": p["val"]}
            continue
        vals = []
        for g, grp in enumerate(groups):
            dirs = [a.runs / f"member-e{fmt(e_star)}-s{s}" for s in grp[:n]]
            res_path = a.runs / f"baseline-e{fmt(budget)}-g{g}.json"
            if not res_path.is_file():
                tool("eval.py", *dirs, "--parts", "uniform", "--out", res_path)
            vals.append(json.loads(res_path.read_text())["uniform"]["loss"])
        out["budgets"][fmt(budget)] = {"members": n, "member_epochs": e_star, "epochs": n * e_star, "val": vals}
    return out


def q0_result(run_dir: Path, baseline_members: int) -> dict:
    """Fit the prior, score it; K chosen on the fitness set (the full prior: every snapshot it
    weights) and K = the baseline's member count."""
    prior_path, eval_path = run_dir / "prior.json", run_dir / "eval.json"
    if not prior_path.is_file():
        tool("fit_prior.py", run_dir)
    if not eval_path.is_file():
        plot_flag = ["--plot"] if importlib.util.find_spec("matplotlib") else []
        tool("eval.py", run_dir, "--prior", prior_path, *plot_flag)
    prior, res = json.loads(prior_path.read_text()), json.loads(eval_path.read_text())
    recs = snapshots(run_dir)
    budgets = {b["K"]: b for b in res["prior"]["budgets"]}
    nonzero = sum(1 for m in prior["members"] if m["weight"] > 1e-6)
    full = budgets[max(budgets)]
    k_match = min(baseline_members, len(recs))
    if k_match not in budgets:  # the default budgets are powers of two: fit this K on its own
        prior_k, eval_k = run_dir / f"prior-k{k_match}.json", run_dir / f"eval-k{k_match}.json"
        if not prior_k.is_file():
            tool("fit_prior.py", run_dir, "--budgets", k_match, "--out", prior_k)
        if not eval_k.is_file():
            tool("eval.py", run_dir, "--prior", prior_k, "--parts", "prior", "--out", eval_k)
        budgets[k_match] = json.loads(eval_k.read_text())["prior"]["budgets"][0]
    return {
        "run": run_dir.name, "snapshots": len(recs), "epochs": q0_run.epochs_spent(recs),
        "prior_val": full["refitted"]["loss"], "prior_nonzero": nonzero,
        "k_match": k_match, "k_match_val": budgets[k_match]["refitted"]["loss"],
        "k_best_on_val": min(budgets, key=lambda k: (budgets[k]["refitted"]["loss"], k)),
        "best_k_val": min(b["refitted"]["loss"] for b in budgets.values()),
        "uniform_val": res["uniform"]["loss"], "best_snapshot_val": min(r["val_loss"] for r in recs),
        "prior_fitness": prior["loss"],
    }


def layout_flags(bases: int, first: float, cycle: float, budget: float) -> list[str]:
    cycles = 1 + round((budget / bases - first) / cycle)
    return ["--bases", str(bases), "--cycles", str(cycles), "--first-cycle-epochs", fmt(first),
            "--cycle-epochs", fmt(cycle)]


def alloc_name(budget: float, bases: int, first: float, cycle: float) -> str:
    return f"alloc-e{fmt(budget)}-p{bases}-f{fmt(first)}-c{fmt(cycle)}"


def stage_allocations(a, single: dict) -> dict:
    jobs = [(alloc_name(b, p, f, c), layout_flags(p, f, c, b) + ["--seed", "0"])
            for b in sorted(ALLOCATIONS, reverse=True) for p, f, c in ALLOCATIONS[b]]
    train_all(a.runs, jobs, a.workers)
    out = {}
    for b, trials in ALLOCATIONS.items():
        n = max(1, int(b // best_single_epochs(single)))  # the baseline's member count
        out[fmt(b)] = [{"bases": p, "first": f, "cycle": c, **q0_result(a.runs / alloc_name(b, p, f, c), n)}
                       for p, f, c in trials]
    return out


def q0_run_name(a, epochs: float, seed: int) -> str:
    """An allocation run with the recipe's layout and this seed is the same run (same flags, same
    seed): reuse it rather than train it twice."""
    r = train_q0.recipe(epochs, train_q0.RECIPES["cpu"])
    alloc = alloc_name(epochs, r["bases"], r["first_cycle_epochs"], r["cycle_epochs"])
    if seed == 0 and r["cycles"] > 1 and (a.runs / alloc / "manifest.json").is_file():
        return alloc
    return f"q0-e{fmt(epochs)}-s{seed}"


def stage_q0(a, baseline: dict) -> dict:
    names = {(e, s): q0_run_name(a, e, s) for e in a.budgets for s in a.seeds}
    jobs = [(names[e, s], ["--epochs", fmt(e), "--seed", str(s)]) for e in sorted(a.budgets, reverse=True)
            for s in a.seeds if names[e, s].startswith("q0-")]
    train_all(a.runs, jobs, a.workers)
    out = {}
    for e in a.budgets:
        n = baseline["budgets"][fmt(e)]["members"]
        out[fmt(e)] = [q0_result(a.runs / names[e, s], n) for s in a.seeds]
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def mean(xs):
    return sum(xs) / len(xs)


def spread(xs) -> str:
    """mean ± half the range over seeds (the range itself with two seeds)."""
    return f"{mean(xs):.4f}" + (f" ± {(max(xs) - min(xs)) / 2:.4f}" if len(xs) > 1 else "")


def epochs_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First budget where a (budget, loss) curve reaches `target`, interpolated in log2(budget)."""
    for (e0, l0), (e1, l1) in zip(curve, curve[1:]):
        if l0 <= target:
            return e0
        if l1 <= target:
            t = (l0 - target) / (l0 - l1)
            return 2 ** (math.log2(e0) + t * (math.log2(e1) - math.log2(e0)))
    return curve[-1][0] if curve and curve[-1][1] <= target else None


def students(a, budget: str) -> dict | None:
    """The ensemble-distilled students of this budget's q0 runs (records/2026-11-24_distil-cpu's
    main recipe, st-e{E}-s{S} under <runs>/students), when all seeds have one: validation loss of
    the student's snapshot with the lowest fitness loss (1 forward pass) and the epochs spent, the
    population's plus the student's up to that snapshot."""
    out = {"val": [], "epochs": []}
    for s in a.seeds:
        m = a.runs / "students" / f"st-e{budget}-s{s}" / "manifest.json"
        pop = a.runs / f"q0-e{budget}-s{s}" / "manifest.json"
        if not (m.is_file() and pop.is_file()):
            return None
        recs = json.loads(m.read_text())["snapshots"]
        pick = min(recs, key=lambda r: r["fitness_loss"])
        out["val"].append(pick["val_loss"])
        out["epochs"].append(q0_run.epochs_spent(json.loads(pop.read_text())["snapshots"]) + pick["base_epochs"])
    return out


def report(a, single, baseline, allocations, q0) -> dict:
    rows, budgets = [], [fmt(e) for e in a.budgets]
    for b in budgets:
        e = float(b)
        below = [p for p in single.values() if p["epochs"] <= e]
        best = min(below, key=lambda p: mean(p["fitness"]))  # picked on fitness, as a user would
        q = q0[b]
        rows.append({
            "budget": e, "single_own_schedule": single[b]["val"] if b in single else None, "best_single": best["val"],
            "best_single_epochs": best["epochs"], "baseline": baseline["budgets"][b]["val"],
            "baseline_members": baseline["budgets"][b]["members"],
            "q0_prior": [r["prior_val"] for r in q], "q0_prior_forward_passes": [r["prior_nonzero"] for r in q],
            "q0_k_match": [r["k_match_val"] for r in q], "k_match": q[0]["k_match"],
            "q0_snapshots": [r["snapshots"] for r in q], "q0_uniform": [r["uniform_val"] for r in q],
            "q0_best_k_on_val": [r["best_k_val"] for r in q], "q0_k_best_on_val": [r["k_best_on_val"] for r in q],
            "q0_epochs_spent": mean([r["epochs"] for r in q]),
            "baseline_epochs_spent": baseline["budgets"][b]["epochs"], "student": students(a, b),
        })
    for r in rows:
        r["margin_over_best_single"] = mean(r["best_single"]) - mean(r["q0_prior"])
        r["margin_over_baseline"] = mean(r["baseline"]) - mean(r["q0_prior"])
    base_best = min(rows, key=lambda r: mean(r["baseline"]))
    ratios = {}
    spent = base_best["baseline_epochs_spent"]  # ratios count the epochs really spent, not the labels
    for key in ("q0_prior", "q0_k_match"):
        reach = epochs_to_reach([(r["q0_epochs_spent"], mean(r[key])) for r in rows], mean(base_best["baseline"]))
        ratios[key] = {"baseline_best_loss": mean(base_best["baseline"]), "baseline_epochs": spent,
                       "q0_epochs_to_match": reach, "ratio": spent / reach if reach else None}
    record = [copy_record_run(a.runs / r["run"], a.out_dir) for r in q0[budgets[-1]]]
    log = (a.runs / q0[budgets[-1]][0]["run"] / "log.txt").read_text()
    params = int(re.search(r"\] ([\d,]+) parameters", log).group(1).replace(",", ""))
    summary = {"budgets": a.budgets, "seeds": a.seeds, "single": single, "baseline": baseline,
               "allocations": allocations, "q0": q0, "table": rows, "ratios": ratios, "record_runs": record,
               "parameters": params}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    (a.out_dir / "study.md").write_text(markdown(summary) + "\n")
    plot(summary, a.out_dir / "study.png")
    return summary


RECORD_FILES = ("run.json", "log.txt", "metrics.jsonl", "manifest.json", "prior.json", "eval.json", "eval.md",
                "eval.png", "prior-k6.json", "eval-k6.json", "eval-k6.md")


def copy_record_run(run_dir: Path, out_dir: Path) -> dict:
    """The largest budget's q0 runs are the record: their logs, prior and evaluation (not the
    snapshot weights) go beside this file, under runs/."""
    dest = out_dir / "runs" / run_dir.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, dest / name)
    created = datetime.datetime.fromisoformat(json.loads((run_dir / "run.json").read_text())["created"])
    finished = datetime.datetime.fromtimestamp((run_dir / "manifest.json").stat().st_mtime, datetime.timezone.utc)
    return {"run": run_dir.name, "training_wall_s": round((finished - created).total_seconds())}


def markdown(s: dict) -> str:
    n = len(s["seeds"])
    out = [f"Validation loss in nats per byte on the first 32,768 bytes of the held-out plays (Julius Caesar); "
           f"mean ± half-range over {n} seeds. Lower is better.", "",
           "| epochs | single, own schedule | best single (epochs) | ensemble baseline (members) | "
           "q0, prior (forward passes) | q0, K = baseline members | q0 margin over best single | "
           "q0 student, 1 forward pass (epochs incl. its own) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in s["table"]:
        own = spread(r["single_own_schedule"]) if r["single_own_schedule"] else "not run"
        out.append(f"| {fmt(r['budget'])} | {own} | {spread(r['best_single'])} "
                   f"({fmt(r['best_single_epochs'])}) | {spread(r['baseline'])} ({r['baseline_members']}) | "
                   f"{spread(r['q0_prior'])} ({'/'.join(map(str, r['q0_prior_forward_passes']))}) | "
                   f"{spread(r['q0_k_match'])} (K={r['k_match']}) | {round(r['margin_over_best_single'], 4) + 0.0:+.4f} | "
                   + (f"{spread(r['student']['val'])} ({mean(r['student']['epochs']):.0f})" if r.get("student") else "-")
                   + " |")
    out += ["", "Epochs really spent (each cycle is a whole number of steps, and q0's cycles in the "
            "outer quarters use a 0.75x batch, so its budgets are met within 1.1%): " + ", ".join(f"budget {fmt(r['budget'])}: q0 {r['q0_epochs_spent']:.2f}, baseline "
                                f"{fmt(r['baseline_epochs_spent'])}" for r in s["table"]) + "."]
    out += ["", "| q0 variant | baseline's best loss | baseline epochs | q0 epochs to match | ratio |", "|---|---|---|---|---|"]
    names = {"q0_prior": "q0, learned prior", "q0_k_match": "q0, K = baseline members"}
    for key, r in s["ratios"].items():
        reach = f"{r['q0_epochs_to_match']:.1f}" if r["q0_epochs_to_match"] else "not reached"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        out.append(f"| {names[key]} | {r['baseline_best_loss']:.4f} | {fmt(r['baseline_epochs'])} | {reach} | {ratio} |")
    if not s["allocations"]:
        return "\n".join(out)
    out += ["", "Allocations tried (seed 0; bases x first stretch + cycles x cycle length):", "",
            "| budget | bases | first | cycle | snapshots | q0 prior val | prior fitness | uniform val | best snapshot val |",
            "|---|---|---|---|---|---|---|---|---|"]
    for b, trials in s["allocations"].items():
        for t in trials:
            out.append(f"| {b} | {t['bases']} | {fmt(t['first'])} | {fmt(t['cycle'])} | {t['snapshots']} | "
                       f"{t['prior_val']:.4f} | {t['prior_fitness']:.4f} | {t['uniform_val']:.4f} | "
                       f"{t['best_snapshot_val']:.4f} |")
    return "\n".join(out)


def plot(s: dict, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no study.png (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    params = f"{s['parameters'] / 1e6:.2f}M" if s.get("parameters") else "0.95M"
    series = [("single_own_schedule", "single model, own schedule of E epochs", "tab:gray", ":"),
              ("best_single", "best single model (<= E epochs)", "black", "-"),
              ("baseline", "ensemble baseline (independent members)", "tab:blue", "-"),
              ("q0_k_match", "q0, K = baseline members", "tab:orange", "--"),
              ("q0_prior", "q0, learned prior", "tab:red", "-")]
    for ax, first in zip(axes, (1, 8)):  # all budgets; then a zoom on where the methods part
        rows = [r for r in s["table"] if r["budget"] >= first]
        for key, label, colour, style in series:
            have = [r for r in rows if r[key]]
            ys = [mean(r[key]) for r in have]
            err = [[y - min(r[key]) for y, r in zip(ys, have)], [max(r[key]) - y for y, r in zip(ys, have)]]
            ax.errorbar([r["budget"] for r in have], ys, yerr=err, label=label, color=colour, ls=style,
                        marker="o", ms=3, capsize=2)
        studs = [r for r in rows if r.get("student")]
        if studs:  # at the epochs really spent: the population's and the student's own
            ys = [mean(r["student"]["val"]) for r in studs]
            ax.errorbar([mean(r["student"]["epochs"]) for r in studs], ys,
                        yerr=[[y - min(r["student"]["val"]) for y, r in zip(ys, studs)],
                              [max(r["student"]["val"]) - y for y, r in zip(ys, studs)]],
                        label="q0 student (1 forward pass), at population + student epochs", color="tab:green",
                        ls="-.", marker="s", ms=3, capsize=2)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epoch budget (summed over members)")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(1.9, 2.3)
    axes[1].set_title("zoom: 8 to 64 epochs (single model's own schedule leaves the chart)", fontsize=9)
    axes[0].set_title(f"q0 on a CPU: bytes Shakespeare, 32K train tokens, {params} params, {len(s['seeds'])} seeds",
                      fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "study")
    ap.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workers", type=int, default=2, help="training runs side by side (one thread each)")
    ap.add_argument("--stage", choices=["single", "allocations", "baseline", "q0", "report"], default="report",
                    help="run the stages up to and including this one")
    ap.add_argument("--single-max", type=float, default=math.inf,
                    help="train the single model only up to this many epochs (longer ones overfit; not reported)")
    ap.add_argument("--baseline-groups", type=int, default=0,
                    help="independent ensembles of the baseline (default: one per seed)")
    ap.add_argument("--no-allocations", action="store_true",
                    help="skip the allocation search (the --epochs recipe is already chosen)")
    ap.add_argument("--out-dir", type=Path, default=HERE.parent / "2026-11-24_record-model-cpu" / "study",
                    help="where study.json/.md/.png and the record's logs go (the 2026-11-23 files beside this "
                         "script are the previous model's and are not rewritten)")
    a = ap.parse_args()
    a.runs_dir.mkdir(parents=True, exist_ok=True)
    a.runs = a.runs_dir
    order = ["single", "allocations", "baseline", "q0", "report"]
    upto = order.index(a.stage)
    if upto >= 3 and a.no_allocations:  # q0's populations first: they are what later studies build on
        train_all(a.runs, [(f"q0-e{fmt(e)}-s{s}", ["--epochs", fmt(e), "--seed", str(s)])
                           for e in sorted(a.budgets, reverse=True) for s in a.seeds], a.workers)
    single = stage_single(a)
    allocations = stage_allocations(a, single) if upto >= 1 and not a.no_allocations else None
    baseline = stage_baseline(a, single) if upto >= 2 else None
    q0 = stage_q0(a, baseline) if upto >= 3 else None
    if upto >= 4:
        s = report(a, single, baseline, allocations, q0)
        print(markdown(s))
    else:
        print(json.dumps({"single": single, "baseline": baseline, "allocations": allocations}, indent=1))


if __name__ == "__main__":
    main()
