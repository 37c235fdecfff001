"""The mini-Slowrun study on any shard folder: single model, ensemble baseline and q0 at every epoch budget.

    python study.py --data-dir data/mine                      # every stage, the cpu preset (hours on 2 cores)
    python study.py --data-dir data/mine --stage single       # the stages up to this one
    python study.py --data-dir data/mine -- --fitness-tokens 32768   # flags after -- go to every train_q0.py

Every training run is `train_q0.py --preset P --data-dir D` with the study's flags (and those given
after `--`), in a process of its own on one thread, --workers of them side by side; then
`fit_prior.py` and `eval.py`. Runs go to --runs-dir (default runs/study-<corpus>): a run that
finished is reused (if the flags ask for the same population), a cut one resumes, so the study
can be stopped and the same command rerun.

Stages, in order (each needs the ones before it):
  single       one model, one linear-decay schedule of E epochs, for E in --budgets (and 6, 10, 12
               and 14 below the largest budget, near where the cpu preset's single model is best;
               and 1.25 and 1.5 x the best when the next schedule is further), every seed: the
               saturation curve.
  allocations  q0 layouts tried at the budgets of ALLOCATIONS that --budgets holds (seed 0): the
               search the `--epochs` recipe came from (--no-allocations skips it).
  baseline     independent members, each with the schedule E* whose mean fitness loss is lowest,
               seeds 100+; the baseline of m members is the uniform average of a group's first m,
               for m = 1 .. largest budget / E*. At a budget below E*: the single model of that budget.
  q0           `train_q0.py --epochs E` (the recipe), every seed; fit_prior.py, then eval.py.
  students     each seed's q0 population at --student-budgets (default: the largest budget) distilled
               into one model, `train_q0.py --distil-from <run>/prior.json --distil-k 8 --epochs
               --student-epochs` (records/2026-11-24_distil-cpu's recipe): one forward pass.
  report       study.json, study.md and study.png (with matplotlib) in --out (default <runs-dir>/report):
               every method per budget; q0's epochs to match the baseline of every member count m
               and their ratio, with its learned prior and held to K = m forward passes; q0 at K =
               the baseline's members minus the baseline at every budget; the students against the
               baseline's best member (one forward pass each).

Selection is never made on validation data: E* and the prior are chosen on the fitness set (the
front of the training shard, never trained on); validation numbers are only reported.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

import q0_run
import train_q0
from data import shards
from data.shards import (CHOICE, PATH, SWITCH, ArgumentParser, UsageError, at_least, command, parse_checked,
                         path_arg)

ROOT = Path(__file__).resolve().parent
STAGES = ("single", "allocations", "baseline", "q0", "students", "report")
DEFAULT_BUDGETS = [1, 2, 4, 8, 16, 32, 64]
SINGLE_EXTRA = (6, 10, 12, 14)  # finer points near the cpu preset's single-model optimum (12 epochs)
REFINE = (1.25, 1.5)            # E* x these are tried too when the next schedule is further (16 -> 32: 20, 24)
STUDENT_K = 8                   # the student's teacher: the prior's 8 heaviest snapshots (records/2026-11-24_distil-cpu)
BASELINE_SEED0 = 100            # baseline members: seeds 100+, group g at 100 + 1000 g (disjoint from q0's)
ALLOCATIONS = {                 # budget -> (bases, first-cycle epochs, cycle epochs) tried at seed 0
    # 1 to 4: the 2026-11-23 search's layouts (records/2026-11-23_shakespeare-cpu). 8 to 64: the search
    # with the record's model (records/2026-12-05_two-corpora-cpu), the recipe's layout first, then a
    # first cycle nearer the single model's best (12 to 16 epochs on both corpora), longer or shorter
    # cycles, and a second base.
    1: [(1, 0.5, 0.25), (1, 0.5, 0.5)],
    2: [(1, 1, 0.5), (1, 1, 0.25), (1, 1.5, 0.25)],
    4: [(1, 2, 0.5), (1, 2, 1), (1, 1, 0.5), (1, 3, 0.5)],
    8: [(1, 4, 1), (1, 6, 1), (1, 4, 0.5)],
    16: [(1, 8, 1), (1, 12, 1), (1, 8, 2), (1, 6, 1), (1, 12, 0.5)],
    32: [(1, 8, 1), (1, 12, 1), (1, 8, 2), (2, 8, 1)],
    64: [(2, 8, 1), (2, 12, 1)],
}
# train_q0.py flags the study sets for each run, or without which its numbers mean nothing (eval.py
# reads the validation caches): refused after `--`.
STUDY_OWNED = {"preset", "data_dir", "runs_dir", "run_name", "seed", "epochs", "bases", "cycles", "cycle_epochs",
               "first_cycle_epochs", "distil_from_cycle", "snapshot_noise", "distil_from", "distil_k", "distil_init",
               "val_probs", "dry_run"}
NEAR_ZERO = 1e-9


@dataclasses.dataclass
class Study:
    preset: str
    data_dir: Path          # absolute: every run records the same spelling (a resume compares it)
    runs: Path
    out: Path
    budgets: list[float]
    seeds: list[int]
    workers: int
    single_max: float       # 0: no limit
    groups: int             # baseline groups
    search_budgets: list[float]  # the budgets the allocations stage searches (none with --no-allocations)
    student_budgets: list[float]
    student_epochs: float
    extra: list[str]        # train_q0.py flags after `--`
    data: q0_run.RunData    # the tokens every run trains and is scored on, checked once up front
    corpus: dict


def fmt(x: float) -> str:
    return f"{x:g}"


def mean(xs) -> float:
    return sum(xs) / len(xs)


def half_range(xs) -> float:
    return (max(xs) - min(xs)) / 2


def signed(x: float) -> str:
    """+0.1234 or -0.1234; a difference that rounds to zero reads +0.0000, not -0.0000."""
    return f"{round(x, 4) + 0.0:+.4f}"


def spread(xs, digits: int = 4, suffix: str = "") -> str:
    """mean ± half the range over seeds (the range itself with two seeds)."""
    text = f"{mean(xs):.{digits}f}{suffix}"
    return text + (f" ± {half_range(xs):.{digits}f}" if len(xs) > 1 else "")


# ---------------------------------------------------------------------------------------------
# The data: its name, and what the validation slice covers
# ---------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._+-]+", "-", text.lower()).strip("-.") or "data"


def corpus_name(data_dir: Path, manifest: dict | None, tokenizer: str) -> str:
    """A short name for the data, for the runs folder and the report: what the manifest's command
    built it from (data/text.py: its first SOURCE, +N for more; data/shakespeare.py: shakespeare),
    or the folder's name without a manifest; then the tokenizer, as the two tokenizers' runs differ."""
    words = shlex.split(manifest.get("command", "")) if manifest else []
    script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    name = Path(os.path.abspath(data_dir)).name
    if script is not None and Path(words[script]).stem == "text":
        sources = []
        for w in words[script + 1:]:
            if w.startswith("-"):
                break
            sources.append(w)
        if sources:
            name = Path(sources[0]).stem + (f"+{len(sources) - 1}" if len(sources) > 1 else "")
    elif script is not None:
        name = Path(words[script]).stem
    return slug(name if name.endswith(tokenizer) else f"{name}-{tokenizer}")


def val_slice(data_dir: Path, manifest: dict | None, used: int) -> dict:
    """The validation tokens a run scores (the first `used` of the split) in documents: how many of
    the split's documents the slice reaches, and their names when the manifest lists them
    (data/text.py's val_documents, in the order they are in the shard)."""
    split = shards.load_split(data_dir, "val")
    starts = shards.doc_starts(split.tokens, split.bos_id)
    ends = np.append(starts[1:], split.tokens.size)
    reached = int(np.searchsorted(starts, used, side="left"))  # documents that start inside the slice
    names = (manifest or {}).get("val_documents")
    if not isinstance(names, list) or len(names) != starts.size:  # not this shard's list: name none
        names = None
    return {"tokens": used, "split_tokens": int(split.tokens.size), "documents": int(starts.size),
            "reached": reached, "last_in_part": bool(ends[reached - 1] > used), "names": names,
            "tokenizer": split.tokenizer}


def listed(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def describe_val(v: dict) -> str:
    """One sentence: the validation slice in tokens and in the documents it reaches."""
    unit = "bytes" if v["tokenizer"] == "bytes" else "tokens"
    docs = f"{v['documents']:,} held-out document{'s' if v['documents'] != 1 else ''}"
    if v["names"] and len(v["names"]) <= 6:  # a longer list is named only as far as the slice reaches
        docs += f" ({', '.join(v['names'])})"
    if v["tokens"] >= v["split_tokens"]:
        return f"all {v['split_tokens']:,} {unit} of the validation split: its {docs}"
    part = " (the last in part)" if v["last_in_part"] else ""
    if v["reached"] == 1:
        part = " (in part)" if v["last_in_part"] else ""
    reached = f"{v['reached']:,} of its {docs}" + (f": {listed(v['names'][:v['reached']])}" if v["names"] else "")
    return f"the first {v['tokens']:,} {unit} of the validation split ({v['split_tokens']:,}), which reach " \
           f"{reached}{part}"


def describe_corpus(data_dir: Path, data: q0_run.RunData) -> dict:
    manifest = shards.recorded_manifest(data_dir)
    v = val_slice(data_dir, manifest, int(data.val.size))
    return {"name": corpus_name(data_dir, manifest, data.tokenizer), "data_dir": str(data_dir),
            "command": (manifest or {}).get("command"), "source": (manifest or {}).get("source"),
            "tokenizer": data.tokenizer, "train_tokens": int(data.train.size), "fitness_tokens": int(data.fitness.size),
            "val": v, "val_description": describe_val(v)}


# ---------------------------------------------------------------------------------------------
# Running the commands
# ---------------------------------------------------------------------------------------------

def run_script(script: str, args: list[str], log: Path) -> int:
    """`python SCRIPT ARGS` in a process of its own on one thread (runs side by side share the
    cores instead of oversubscribing them), its output appended to `log`; its exit code. The one
    place the study starts a command (the tests' in-process twin replaces it)."""
    cmd = [sys.executable, str(ROOT / script), *args]
    with open(log, "a") as out:
        out.write(shlex.join(cmd) + "\n")
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              stdin=subprocess.DEVNULL).returncode


def last_error(log: Path, start: int) -> str:
    """The command's own error line in what it wrote to `log` from byte `start` (the log gathers
    every attempt), or its last line (a traceback's)."""
    with open(log, "rb") as f:
        f.seek(start)
        lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1].removeprefix("error:").strip()


def call(script: str, args, log: Path, what: str):
    """run_script; a failure is one line: the command's own error and where its output is."""
    start = log.stat().st_size if log.exists() else 0
    if run_script(script, [str(a) for a in args], log):
        raise UsageError(f"{script} ({what}) failed: {last_error(log, start)}; its output: {log}")


def train_argv(study: Study, name: str, flags: list[str]) -> list[str]:
    """A run's train_q0.py flags; a name with a folder (students/st-e64-s0) puts it in that folder of the runs."""
    where = study.runs / name
    return ["--preset", study.preset, "--data-dir", str(study.data_dir), "--runs-dir", str(where.parent),
            "--run-name", where.name, *flags, *study.extra]


def finished(study: Study, name: str, flags: list[str]) -> bool:
    """Whether the run finished, as the population these flags ask for: a run another study's
    flags left (another preset, other flags after --, other data) is refused, not reported."""
    run_dir = study.runs / name
    if not (run_dir / "manifest.json").is_file():
        return False
    args = train_q0.parse_args(train_argv(study, name, flags))
    teacher = None
    if args.distil_from:  # a student: its teacher's members are part of its population
        teacher = q0_run.teacher_record(q0_run.distil_members(Path(args.distil_from), args.distil_k, study.data,
                                                              args.seq_len)[1])
    try:
        q0_run.check_same_run(run_dir, q0_run.population_config(args, train_q0.NON_POPULATION_FLAGS, teacher),
                              study.data)
    except UsageError as e:
        raise UsageError(f"{e} (for the study: rerun it with the flags it ran with, or give it another "
                         f"--runs-dir)") from None
    return True


def train_run(study: Study, name: str, flags: list[str]) -> Path:
    """Train (or resume, or reuse) one run; its output goes to <runs>/<name>.out."""
    if not finished(study, name, flags):
        print(f"training {name} (output: {study.runs / name}.out)", flush=True)
        call("train_q0.py", train_argv(study, name, flags), study.runs / f"{name}.out", f"run {name}")
    return study.runs / name


def train_all(study: Study, jobs: list[tuple[str, list[str]]]):
    """Every job, --workers at a time. A failure (or Ctrl-C) starts no further run; the running
    ones finish (each resumes anyway)."""
    stop = threading.Event()  # a worker may take the next job before the failure reaches this thread

    def one(name: str, flags: list[str]):
        if stop.is_set():
            return
        try:
            train_run(study, name, flags)
        except BaseException:
            stop.set()
            raise
    pool = concurrent.futures.ThreadPoolExecutor(study.workers)
    try:
        for future in [pool.submit(one, name, flags) for name, flags in jobs]:
            future.result()
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tool(study: Study, label: str, script: str, *args):
    call(script, args, study.runs / f"{label}.{Path(script).stem}.out", label)


def read_json(path: Path) -> dict:
    return q0_run.read_json(path, "move it away and rerun the study to write it again")


def snapshots(run_dir: Path) -> list[dict]:
    return read_json(run_dir / "manifest.json")["snapshots"]


def single_flags(epochs: float, seed: int) -> list[str]:
    return ["--cycles", "1", "--first-cycle-epochs", fmt(epochs), "--distil-from-cycle", "0",
            "--snapshot-noise", "0", "0", "--seed", str(seed)]


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------

def single_points(study: Study) -> list[float]:
    """The single model's schedules: the budgets and the extra points below the largest one (a
    schedule longer than every budget is never compared), up to --single-max."""
    top = max(study.budgets)
    points = set(study.budgets) | {e for e in SINGLE_EXTRA if e < top}
    return sorted(e for e in points if not study.single_max or e <= study.single_max)


def refinement(study: Study, points: list[float], e_star: float) -> list[float]:
    """Schedules between E* and the next longer one when that is more than REFINE[-1] x E* away: a
    corpus whose single model is best beyond the extra points (16 of 16 and 32) gets its minimum
    placed, so the baseline's members are as strong as they can be."""
    longer = [e for e in points if e > e_star]
    if not longer or longer[0] <= e_star * REFINE[-1] * (1 + NEAR_ZERO):
        return []
    return [e for e in (e_star * r for r in REFINE) if not study.single_max or e <= study.single_max]


def stage_single(study: Study) -> dict:
    points = single_points(study)
    out = train_single(study, points)
    while more := refinement(study, points, best_single(out)["epochs"]):
        points = sorted(set(points) | set(more))
        out = train_single(study, points)
    return out


def train_single(study: Study, points: list[float]) -> dict:
    name = lambda e, s: f"single-e{fmt(e)}-s{s}"  # noqa: E731
    train_all(study, [(name(e, s), single_flags(e, s)) for e in reversed(points) for s in study.seeds])  # longest first
    out = {}
    for e in points:
        recs = [snapshots(study.runs / name(e, s))[0] for s in study.seeds]
        out[fmt(e)] = {"epochs": e, "epochs_spent": mean([r["base_epochs"] for r in recs]),
                       "val": [r["val_loss"] for r in recs], "fitness": [r["fitness_loss"] for r in recs]}
    return out


def best_single(single: dict, most: float = math.inf) -> dict:
    """The schedule of at most `most` epochs whose mean fitness loss is lowest (what a user picks
    without touching validation); E* when `most` is unbounded."""
    return min((p for p in single.values() if p["epochs"] <= most), key=lambda p: mean(p["fitness"]))


def member_name(e_star: float, seed: int) -> str:
    return f"member-e{fmt(e_star)}-s{seed}"


def stage_baseline(study: Study, single: dict) -> dict:
    e_star = best_single(single)["epochs"]
    most = math.floor(max(study.budgets) / e_star + NEAR_ZERO)
    groups = [[BASELINE_SEED0 + g * 1000 + m for m in range(most)] for g in range(study.groups or len(study.seeds))]
    train_all(study, [(member_name(e_star, s), single_flags(e_star, s)) for grp in groups for s in grp])
    spent = snapshots(study.runs / member_name(e_star, groups[0][0]))[0]["base_epochs"]  # every member's schedule
    members = {str(s): {k: snapshots(study.runs / member_name(e_star, s))[0][f"{k}_loss"] for k in ("val", "fitness")}
               for grp in groups for s in grp}
    by_members = {}
    for m in range(1, most + 1):
        vals = [ensemble_loss(study, e_star, g, grp[:m]) for g, grp in enumerate(groups)]
        by_members[str(m)] = {"members": m, "epochs": m * spent, "val": vals}
    budgets = {}
    for b in study.budgets:
        m = math.floor(b / e_star + NEAR_ZERO)
        if m < 1:  # below E* the best one can do is one model of `b` epochs
            p = single[fmt(b)]
            budgets[fmt(b)] = {"members": 1, "member_epochs": b, "epochs": p["epochs_spent"], "val": p["val"]}
        else:
            budgets[fmt(b)] = {**by_members[str(m)], "member_epochs": e_star}
    return {"member_epochs": e_star, "member_epochs_spent": spent, "groups": groups, "by_members": by_members,
            "budgets": budgets, "members": members}


def ensemble_loss(study: Study, e_star: float, group: int, seeds: list[int]) -> float:
    """The uniform ensemble of these members, scored by eval.py (once; its JSON is reused)."""
    label = f"baseline-e{fmt(e_star)}-g{group}-m{len(seeds)}"
    path = study.runs / f"{label}.json"
    if not path.is_file():
        tool(study, label, "eval.py", *[study.runs / member_name(e_star, s) for s in seeds], "--parts", "uniform",
             "--out", path)
    return read_json(path)["uniform"]["loss"]


def q0_result(study: Study, run_dir: Path, k_most: int) -> dict:
    """Fit the prior (fit_prior.py's budgets), score it (eval.py), and make sure the prior refitted
    on its K heaviest snapshots is scored for every K up to k_most (the baseline's member counts)."""
    label, prior_path, eval_path = run_dir.name, run_dir / "prior.json", run_dir / "eval.json"
    if not prior_path.is_file():
        tool(study, label, "fit_prior.py", run_dir)
    if not eval_path.is_file():
        plot = ["--plot"] if importlib.util.find_spec("matplotlib") else []
        tool(study, label, "eval.py", run_dir, "--prior", prior_path, *plot)
    res, recs = read_json(eval_path), snapshots(run_dir)
    ks = {b["K"]: b["refitted"] for b in res["prior"]["budgets"]}
    full = ks[max(ks)]  # every snapshot: the learned prior
    top = min(k_most, len(recs))
    if any(k not in ks for k in range(1, top + 1)):  # fit_prior's default budgets are powers of two
        ks |= k_budgets(study, run_dir, top)
    return {"run": run_dir.name, "snapshots": len(recs), "epochs": q0_run.epochs_spent(recs),
            "prior_val": full["loss"], "prior_forward_passes": full["forward_passes"],
            "k_val": {str(k): ks[k]["loss"] for k in range(1, top + 1)}, "uniform_val": res["uniform"]["loss"],
            "best_snapshot_val": min(r["val_loss"] for r in recs),
            "prior_fitness": read_json(prior_path)["loss"]}


def k_budgets(study: Study, run_dir: Path, top: int) -> dict:
    """The prior at every K from 1 to top, in files of their own beside prior.json."""
    prior, res = run_dir / f"prior-k1-{top}.json", run_dir / f"eval-k1-{top}.json"
    label = f"{run_dir.name}.k1-{top}"
    if not prior.is_file():
        tool(study, label, "fit_prior.py", run_dir, "--budgets", ",".join(map(str, range(1, top + 1))), "--out", prior)
    if not res.is_file():
        tool(study, label, "eval.py", run_dir, "--prior", prior, "--parts", "prior", "--out", res)
    return {b["K"]: b["refitted"] for b in read_json(res)["prior"]["budgets"]}


def layout_flags(bases: int, first: float, cycle: float, budget: float) -> list[str]:
    cycles = 1 + round((budget / bases - first) / cycle)
    return ["--bases", str(bases), "--cycles", str(cycles), "--first-cycle-epochs", fmt(first),
            "--cycle-epochs", fmt(cycle)]


def alloc_name(budget: float, bases: int, first: float, cycle: float) -> str:
    return f"alloc-e{fmt(budget)}-p{bases}-f{fmt(first)}-c{fmt(cycle)}"


def allocation_trials(study: Study) -> dict:
    """The layouts the allocations stage tries (none with --no-allocations: then no run it left is
    reused, as none of them is checked against the study's flags)."""
    return {b: trials for b, trials in ALLOCATIONS.items() if b in study.search_budgets}


def recipe_trial(study: Study, epochs: float) -> tuple | None:
    """The recipe's layout at this budget as an allocation trial (None for one cycle: no layout)."""
    r = train_q0.recipe(epochs, train_q0.RECIPES[study.preset])
    return (r["bases"], r["first_cycle_epochs"], r["cycle_epochs"]) if r["cycles"] > 1 else None


def q0_flags(epochs: float, seed: int) -> list[str]:
    return ["--epochs", fmt(epochs), "--seed", str(seed)]


def trial_run(study: Study, budget: float, trial: tuple) -> tuple[str, list[str]]:
    """An allocation trial's run and its flags. The recipe's layout is the run `--epochs B --seed 0`
    trains (the same layout, the same seed): when the q0 stage finished that run first (a study that
    adds the search later), the trial is that run, not a second copy of it."""
    q0 = f"q0-e{fmt(budget)}-s0"
    if trial == recipe_trial(study, budget) and not (study.runs / alloc_name(budget, *trial) / "manifest.json").is_file() \
            and finished(study, q0, q0_flags(budget, 0)):
        return q0, q0_flags(budget, 0)
    return alloc_name(budget, *trial), layout_flags(*trial, budget) + ["--seed", "0"]


def stage_allocations(study: Study) -> dict:
    trials = allocation_trials(study)
    runs = {(b, t): trial_run(study, b, t) for b in trials for t in trials[b]}
    train_all(study, [runs[b, t] for b in sorted(trials, reverse=True) for t in trials[b]])
    return {fmt(b): [{"bases": p, "first": f, "cycle": c, **q0_result(study, study.runs / runs[b, (p, f, c)][0], 1)}
                     for p, f, c in ts] for b, ts in trials.items()}


def q0_run_name(study: Study, epochs: float, seed: int) -> str:
    """An allocation run with the recipe's layout and seed 0 is the run `--epochs E --seed 0`
    trains (the same layout, the same seed): it is reused rather than trained twice."""
    trial = recipe_trial(study, epochs)
    alloc = alloc_name(epochs, *trial) if trial else None
    if seed == 0 and trial in allocation_trials(study).get(epochs, []) \
            and (study.runs / alloc / "manifest.json").is_file():
        return alloc
    return f"q0-e{fmt(epochs)}-s{seed}"


def stage_q0(study: Study, baseline: dict) -> dict:
    names = {(e, s): q0_run_name(study, e, s) for e in study.budgets for s in study.seeds}
    train_all(study, [(names[e, s], q0_flags(e, s))
                      for e in sorted(study.budgets, reverse=True) for s in study.seeds
                      if names[e, s].startswith("q0-")])
    k_most = max(len(baseline["by_members"]), 1)  # every baseline member count, on every budget's curve
    return {fmt(e): [q0_result(study, study.runs / names[e, s], k_most) for s in study.seeds] for e in study.budgets}


def student_name(budget: float, seed: int) -> str:
    return f"students/st-e{fmt(budget)}-s{seed}"


def stage_students(study: Study, q0: dict):
    """One student per seed of each --student-budgets population: an ordinary run that learns from
    the prior's STUDENT_K heaviest snapshots (or all of them, in a smaller population)."""
    (study.runs / "students").mkdir(exist_ok=True)
    jobs = []
    for b in study.student_budgets:
        for s, r in zip(study.seeds, q0[fmt(b)]):
            prior = study.runs / r["run"] / "prior.json"
            k = max(x["K"] for x in read_json(prior)["budgets"] if x["K"] <= STUDENT_K)
            jobs.append((student_name(b, s), ["--distil-from", str(prior), "--distil-k", str(k),
                                              "--epochs", fmt(study.student_epochs), "--seed", str(s)]))
    train_all(study, jobs)


# ---------------------------------------------------------------------------------------------
# The arithmetic: epochs to match, and the comparison at equal inference cost
# ---------------------------------------------------------------------------------------------

def epochs_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first epochs at which a (epochs, loss) curve is at or below `target`: a point's own
    epochs, or between two points interpolated linearly in log2(epochs) (the axis the losses fall
    along); None where it never gets there."""
    curve = sorted(curve)
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (e0, l0), (e1, l1) in zip(curve, curve[1:]):
        if l1 <= target:  # l0 > target >= l1 here, so l0 > l1
            t = (l0 - target) / (l0 - l1)
            return 2 ** (math.log2(e0) + t * (math.log2(e1) - math.log2(e0)))
    return None


def paired(values: list[float], n_seeds: int) -> list[float]:
    """The baseline value each q0 seed is held to: its own group's when the baseline has one group
    per seed, else the mean over the groups."""
    return list(values) if len(values) == n_seeds else [mean(values)] * n_seeds


def match(curves: list[list[tuple[float, float]]], targets: list[float], baseline_epochs: float) -> dict:
    """Each seed's q0 curve against its baseline value: the epochs q0 needs to reach it and the
    ratio baseline epochs / q0 epochs (None: never reached). "at_first_point" marks a curve already at
    the target at its first point: there the epochs are an upper bound and the ratio a lower one."""
    reach = [epochs_to_reach(c, t) for c, t in zip(curves, targets)]
    first = [r is not None and r == min(c)[0] for r, c in zip(reach, curves)]
    mean_curve = [(mean([c[i][0] for c in curves]), mean([c[i][1] for c in curves])) for i in range(len(curves[0]))]
    mean_reach = epochs_to_reach(mean_curve, mean(targets))
    return {"baseline_epochs": baseline_epochs, "target": targets, "q0_epochs": reach,
            "ratio": [baseline_epochs / r if r else None for r in reach], "at_first_point": first,
            "mean_curves": {"q0_epochs": mean_reach, "ratio": baseline_epochs / mean_reach if mean_reach else None}}


def k_val(result: dict, k: int) -> float:
    """q0 held to K forward passes: the prior refitted on its K heaviest snapshots (all of them
    when it has fewer)."""
    return result["k_val"][str(min(k, result["snapshots"]))]


VARIANTS = {  # key -> (name, q0's loss when compared with a baseline of m members)
    "q0_prior": ("q0, learned prior", lambda r, m: r["prior_val"]),
    "q0_k_match": ("q0, K = baseline members", k_val),
}


def ratio_tables(q0: dict, by_members: dict, seeds: list[int]) -> dict:
    """For each q0 variant and every baseline member count m: q0's epochs to reach the baseline of
    m members (each seed's curve over the budgets), and the ratio to the baseline's m x E* epochs."""
    out = {}
    for key, (_, loss) in VARIANTS.items():
        out[key] = []
        for m_text, base in by_members.items():
            m = int(m_text)
            curves = [[(q0[b][i]["epochs"], loss(q0[b][i], m)) for b in q0] for i in range(len(seeds))]
            out[key].append({"members": m, "baseline": base["val"],
                             **match(curves, paired(base["val"], len(seeds)), base["epochs"])})
    return out


def equal_cost(q0_k: list[float], baseline: list[float]) -> list[float]:
    """q0 at K = the baseline's member count minus the baseline, per seed (negative: q0 lower)."""
    return [q - b for q, b in zip(q0_k, paired(baseline, len(q0_k)))]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def students(study: Study, budget: str, q0_results: list[dict]) -> dict | None:
    """The ensemble-distilled students of this budget's q0 runs (records/2026-11-24_distil-cpu's
    names: <runs>/students/st-e{E}-s{S}), when every seed has one: the validation loss of the
    student's snapshot with the lowest fitness loss (1 forward pass), at the population's epochs
    plus the student's own up to that snapshot."""
    out = {"val": [], "epochs": []}
    for s, r in zip(study.seeds, q0_results):
        path = study.runs / student_name(float(budget), s) / "manifest.json"
        if not path.is_file():
            return None
        pick = min(read_json(path)["snapshots"], key=lambda x: x["fitness_loss"])
        out["val"].append(pick["val_loss"])
        out["epochs"].append(r["epochs"] + pick["base_epochs"])
    return out


def table_row(study: Study, b: str, single: dict, baseline: dict, q0: dict) -> dict:
    best, base, q = best_single(single, float(b)), baseline["budgets"][b], q0[b]
    k_match = [k_val(r, base["members"]) for r in q]
    return {"budget": float(b), "single_own_schedule": single[b]["val"] if b in single else None,
            "best_single": best["val"], "best_single_epochs": best["epochs"],
            "baseline": base["val"], "baseline_members": base["members"], "baseline_epochs_spent": base["epochs"],
            "q0_prior": [r["prior_val"] for r in q], "q0_prior_forward_passes": [r["prior_forward_passes"] for r in q],
            "q0_k_match": k_match, "k_match": [min(base["members"], r["snapshots"]) for r in q],
            "q0_snapshots": [r["snapshots"] for r in q], "q0_uniform": [r["uniform_val"] for r in q],
            "q0_epochs_spent": [r["epochs"] for r in q], "student": students(study, b, q),
            "margin_over_best_single": mean(best["val"]) - mean([r["prior_val"] for r in q]),
            "equal_cost": equal_cost(k_match, base["val"])}


def one_pass(study: Study, baseline: dict, rows: list[dict]) -> list[dict]:
    """The paper's one-model comparison at each budget with students: the student against the
    baseline's best member, picked per group by fitness loss (as a user would pick, without
    validation), each one forward pass."""
    picks = [min(grp, key=lambda m: baseline["members"][str(m)]["fitness"]) for grp in baseline["groups"]]
    member = paired([baseline["members"][str(m)]["val"] for m in picks], len(study.seeds))
    out = []
    for r in rows:
        if r["student"]:
            out.append({"budget": r["budget"], "student": r["student"]["val"], "student_epochs": r["student"]["epochs"],
                        "best_member": member, "best_member_seeds": picks, "group_members": len(baseline["groups"][0]),
                        "student_minus_member": [a - b for a, b in zip(r["student"]["val"], member)],
                        "q0_prior": r["q0_prior"], "q0_prior_forward_passes": r["q0_prior_forward_passes"]})
    return out


def parameters(run_dir: Path) -> int | None:
    found = re.search(r"\] ([\d,]+) parameters", (run_dir / "log.txt").read_text(errors="replace"))
    return int(found.group(1).replace(",", "")) if found else None


def report(study: Study, single: dict, baseline: dict, allocations: dict | None, q0: dict) -> dict:
    rows = [table_row(study, fmt(b), single, baseline, q0) for b in study.budgets]
    ratios = ratio_tables(q0, baseline["by_members"], study.seeds)
    best_m = min(baseline["by_members"].values(), key=lambda x: mean(x["val"]))["members"]
    top = q0[fmt(max(study.budgets))]
    summary = {"format": "q0-study", "version": 1,
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "preset": study.preset, "train_flags": study.extra, "corpus": study.corpus,
               "budgets": study.budgets, "seeds": study.seeds, "runs_dir": str(study.runs),
               "parameters": parameters(study.runs / top[0]["run"]), "single": single, "baseline": baseline,
               "allocations": allocations, "q0": q0, "table": rows, "ratios": ratios, "best_baseline_members": best_m,
               "one_pass": one_pass(study, baseline, rows), "plot": None}
    study.out.mkdir(parents=True, exist_ok=True)
    summary["plot"] = plot(summary, study.out / "study.png")
    shards.atomic_write_text(study.out / "study.json", json.dumps(summary, indent=1) + "\n")
    shards.atomic_write_text(study.out / "study.md", markdown(summary) + "\n")
    return summary


def unit(s: dict) -> str:
    return "nats per byte" if s["corpus"]["tokenizer"] == "bytes" else "nats per token"


def seeds_text(s: dict) -> str:
    return f"{len(s['seeds'])} seed{'s' if len(s['seeds']) > 1 else ''}"


def setup_lines(s: dict) -> list[str]:
    c = s["corpus"]
    built = f"built by `{c['command']}`" if c["command"] else "no manifest.json"
    params = f"{s['parameters']:,}-parameter model" if s["parameters"] else "model"
    flags = f" `{shlex.join(s['train_flags'])}`" if s["train_flags"] else ""
    return [f"# q0 study: {c['name']}", "",
            f"`train_q0.py --preset {s['preset']}`{flags}: a {params} on {c['train_tokens']:,} training tokens of "
            f"`{c['data_dir']}` ({built}{'; ' + c['source'] if c['source'] else ''}); the fitness set (the prior "
            f"and E* are chosen on it, never trained on) is {c['fitness_tokens']:,} tokens from the front of the "
            f"training shard. Seeds {', '.join(map(str, s['seeds']))}.", "",
            f"Validation loss in {unit(s)} on {c['val_description']}; mean ± half-range over {seeds_text(s)}. "
            "Lower is better."]


def main_table(s: dict) -> list[str]:
    """The table per budget; the students' column only where ensemble-distilled students exist."""
    students = any(r["student"] for r in s["table"])
    out = ["", "| epochs | single, own schedule | best single (epochs) | ensemble baseline (members) | "
           "q0, prior (forward passes) | q0, K = baseline members | q0 margin over best single |"
           + (" q0 student, 1 forward pass (epochs incl. its own) |" if students else ""),
           "|---|---|---|---|---|---|---|" + ("---|" if students else "")]
    for r in s["table"]:
        own = spread(r["single_own_schedule"]) if r["single_own_schedule"] else "not run"
        ks = "/".join(sorted({str(k) for k in r["k_match"]}))
        student = f" {spread(r['student']['val'])} ({mean(r['student']['epochs']):.0f}) |" if r["student"] else " - |"
        out.append(f"| {fmt(r['budget'])} | {own} | {spread(r['best_single'])} ({fmt(r['best_single_epochs'])}) | "
                   f"{spread(r['baseline'])} ({r['baseline_members']}) | {spread(r['q0_prior'])} "
                   f"({'/'.join(map(str, r['q0_prior_forward_passes']))}) | {spread(r['q0_k_match'])} (K={ks}) | "
                   f"{signed(r['margin_over_best_single'])} |" + (student if students else ""))
    out += ["", "Epochs really spent (each cycle is a whole number of steps; q0's outer-quarter cycles use a "
            "smaller batch): " + ", ".join(f"budget {fmt(r['budget'])}: q0 {mean(r['q0_epochs_spent']):.2f}, "
                                           f"baseline {r['baseline_epochs_spent']:.2f}" for r in s["table"]) + "."]
    return out


def ratio_cell(row: dict, seeds: list[int]) -> tuple[str, str, str]:
    """(q0 epochs, ratio, per seed) of one ratio-table row: mean ± half-range when every seed
    reached the baseline; otherwise the seeds that did not, said plainly."""
    per_seed = ", ".join(f"s{s} " + ("not reached" if r is None else f"{'≥' if first else ''}{r:.2f}x")
                         for s, r, first in zip(seeds, row["ratio"], row["at_first_point"]))
    missed = [s for s, r in zip(seeds, row["ratio"]) if r is None]
    if len(missed) == len(seeds):
        return "not reached", "not reached", per_seed
    if missed:
        return f"not reached by seed {', '.join(map(str, missed))}", "-", per_seed
    bound = "≥ " if any(row["at_first_point"]) else ""
    return spread(row["q0_epochs"], 1), bound + spread(row["ratio"], 2, "x"), per_seed


def ratio_lines(s: dict) -> list[str]:
    base = s["baseline"]
    out = ["", "## Epochs to match the ensemble baseline", "",
           f"The baseline of m members is m independent {fmt(base['member_epochs'])}-epoch models (E*, the single "
           f"schedule with the lowest fitness loss; {base['member_epochs_spent']:.2f} epochs each as run), "
           "probabilities averaged uniformly. q0's epochs to reach its loss are read off q0's curve over the budgets "
           "(each seed's own, against " + ("its own baseline group" if len(base["groups"]) == len(s["seeds"])
                                          else "the mean over baseline groups") +
           "), interpolated in log2(epochs); ratio = baseline epochs / q0 epochs. \"not reached\": q0's curve never "
           "gets that low, so there is no ratio. ≥: q0 was there at its smallest budget already, so the ratio is a "
           "lower bound. \"K = baseline members\" holds q0 to the baseline's inference cost: m forward passes."]
    for key, rows in s["ratios"].items():
        out += ["", f"**{VARIANTS[key][0]}**", "",
                "| baseline members | baseline loss | baseline epochs | q0 epochs to reach it | ratio | per seed | "
                "ratio, seed-mean curves |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            reach, ratio, per_seed = ratio_cell(r, s["seeds"])
            whole = r["mean_curves"]["ratio"]
            best = " (best)" if r["members"] == s["best_baseline_members"] else ""
            out.append(f"| {r['members']}{best} | {spread(r['baseline'])} | {r['baseline_epochs']:.1f} | {reach} | "
                       f"{ratio} | {per_seed} | {'not reached' if whole is None else f'{whole:.2f}x'} |")
    return out + headline(s)


def headline(s: dict) -> list[str]:
    """The paper's two numbers, at this scale: against the baseline's best loss, the epochs ratio
    of q0 with its learned prior, and of q0 held to the baseline's member count."""
    m = s["best_baseline_members"]
    said = []
    for key, rows in s["ratios"].items():
        r = next(x for x in rows if x["members"] == m)
        reach, ratio, _ = ratio_cell(r, s["seeds"])
        said.append(f"{VARIANTS[key][0]}: " + (f"{reach} epochs ({ratio} fewer)" if None not in r["ratio"] else reach))
    best = s["baseline"]["by_members"][str(m)]
    return ["", f"The baseline's best is {m} member{'s' if m > 1 else ''}: {spread(best['val'])} after "
            f"{best['epochs']:.1f} epochs. To reach it, " + "; ".join(said) + "."]


def equal_cost_lines(s: dict) -> list[str]:
    out = ["", "## Equal inference cost", "",
           "q0 held to the baseline's forward passes (K = its member count) minus the baseline, per seed "
           f"({unit(s)}; negative: q0 lower, better).", "",
           "| epochs | members = K | baseline | q0, K = members | q0 - baseline, per seed | mean ± half-range |",
           "|---|---|---|---|---|---|"]
    for r in s["table"]:
        per_seed = ", ".join(f"s{seed} {signed(d)}" for seed, d in zip(s["seeds"], r["equal_cost"]))
        diff = signed(mean(r["equal_cost"])) + (f" ± {half_range(r['equal_cost']):.4f}" if len(r["equal_cost"]) > 1
                                                else "")
        out.append(f"| {fmt(r['budget'])} | {r['baseline_members']} | {spread(r['baseline'])} | "
                   f"{spread(r['q0_k_match'])} | {per_seed} | {diff} |")
    return out


def one_pass_lines(s: dict) -> list[str]:
    if not s["one_pass"]:
        return []
    e_star = fmt(s["baseline"]["member_epochs"])
    out = ["", "## One forward pass: the student against the baseline's best member", "",
           f"The student learns from its population's {STUDENT_K} heaviest snapshots; the member is the one of its group's "
           f"{s['one_pass'][0]['group_members']} {e_star}-epoch members with the lowest fitness loss (seeds "
           f"{', '.join(map(str, s['one_pass'][0]['best_member_seeds']))}). Epochs: the student's population plus "
           f"its own; the member's own {e_star} (its group cost {s['one_pass'][0]['group_members']} x {e_star}).", "",
           "| budget | q0 student, 1 forward pass (epochs) | best baseline member, 1 forward pass | student - member, "
           "per seed | q0, prior (forward passes) |", "|---|---|---|---|---|"]
    for r in s["one_pass"]:
        per_seed = ", ".join(f"s{seed} {signed(d)}" for seed, d in zip(s["seeds"], r["student_minus_member"]))
        out.append(f"| {fmt(r['budget'])} | {spread(r['student'])} ({mean(r['student_epochs']):.1f}) | "
                   f"{spread(r['best_member'])} | {per_seed} | {spread(r['q0_prior'])} "
                   f"({'/'.join(map(str, r['q0_prior_forward_passes']))}) |")
    return out


def allocation_lines(s: dict) -> list[str]:
    if not s["allocations"]:
        return []
    out = ["", "## Allocations tried (seed 0; bases x first stretch + cycles x cycle length)", "",
           "| budget | bases | first | cycle | snapshots | q0 prior val | prior fitness | uniform val | best snapshot val |",
           "|---|---|---|---|---|---|---|---|---|"]
    for b, trials in s["allocations"].items():
        out += [f"| {b} | {t['bases']} | {fmt(t['first'])} | {fmt(t['cycle'])} | {t['snapshots']} | {t['prior_val']:.4f} "
                f"| {t['prior_fitness']:.4f} | {t['uniform_val']:.4f} | {t['best_snapshot_val']:.4f} |" for t in trials]
    return out


def markdown(s: dict) -> str:
    figure = ["", "![loss against epoch budget](study.png)" if s["plot"] == "study.png" else f"No figure: {s['plot']}."]
    return "\n".join(setup_lines(s) + main_table(s) + ratio_lines(s) + equal_cost_lines(s) + one_pass_lines(s)
                     + allocation_lines(s) + figure)


SERIES = [("single_own_schedule", "single model, own schedule of E epochs", "tab:gray", ":"),
          ("best_single", "best single model (<= E epochs)", "black", "-"),
          ("baseline", "ensemble baseline (independent members)", "tab:blue", "-"),
          ("q0_k_match", "q0, K = baseline members", "tab:orange", "--"),
          ("q0_prior", "q0, learned prior", "tab:red", "-")]


def plot(s: dict, path: Path) -> str:
    """study.png: loss against the budget, and the epochs ratio against the baseline's members.
    Returns the file's name, or why there is none."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no study.png (pip install matplotlib)", file=sys.stderr)
        return "matplotlib is not installed (pip install matplotlib)"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, label, colour, style in SERIES:
        have = [r for r in s["table"] if r[key]]
        ys = [mean(r[key]) for r in have]
        err = [[y - min(r[key]) for y, r in zip(ys, have)], [max(r[key]) - y for y, r in zip(ys, have)]]
        left.errorbar([r["budget"] for r in have], ys, yerr=err, label=label, color=colour, ls=style, marker="o",
                      ms=3, capsize=2)
    left.set_xscale("log", base=2)
    left.set(xlabel="epoch budget (summed over members)", ylabel=f"validation loss ({unit(s)})")
    left.set_title(f"q0 study: {s['corpus']['name']}, {s['corpus']['train_tokens']:,} training tokens, "
                   f"{seeds_text(s)}", fontsize=9)
    left.legend(fontsize=8)
    for key, colour in (("q0_prior", "tab:red"), ("q0_k_match", "tab:orange")):
        for i, seed in enumerate(s["seeds"]):
            points = [(r["members"], r["ratio"][i]) for r in s["ratios"][key] if r["ratio"][i] is not None]
            if points:
                right.plot(*zip(*points), color=colour, marker="o", ms=4, ls="-" if i == 0 else ":",
                           label=f"{VARIANTS[key][0]}, seed {seed}")
    right.axhline(1, color="gray", lw=0.8)
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # member counts
    right.set(xlabel="baseline members m (m x E* epochs)", ylabel="baseline epochs / q0 epochs to match")
    right.set_title("epochs to match the baseline of m members (missing: not reached)", fontsize=9)
    if right.lines[1:]:
        right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    q0_run.write_output(path, lambda tmp: fig.savefig(tmp, format="png"), replace=True)
    plt.close(fig)
    return path.name


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

RANGES = {"data_dir": PATH, "preset": CHOICE, "runs_dir": PATH, "out": PATH, "budgets": at_least(0, lo_open=True),
          "seeds": at_least(0), "workers": at_least(1), "stage": CHOICE, "single_max": at_least(0),
          "baseline_groups": at_least(0), "no_allocations": SWITCH, "student_budgets": at_least(0, lo_open=True),
          "student_epochs": at_least(0, lo_open=True), "search_budgets": at_least(0, lo_open=True),
          "no_students": SWITCH}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options] [-- TRAIN_Q0_FLAGS ...]")
    p.add_argument("--data-dir", type=path_arg,
                   help="shards from data/text.py or data/shakespeare.py (default: the preset's data)")
    p.add_argument("--preset", choices=sorted(train_q0.PRESETS), default="cpu")
    p.add_argument("--runs-dir", type=path_arg, help="default: runs/study-<corpus> (the corpus named from the data's "
                                                     "manifest.json), runs/study-<corpus>-<preset> off the cpu preset")
    p.add_argument("--out", type=path_arg, help="study.json, study.md, study.png (default: <runs-dir>/report)")
    p.add_argument("--budgets", type=float, nargs="+", default=DEFAULT_BUDGETS, help="epoch budgets (default: %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="q0 and single-model seeds (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="training runs side by side, one thread each (default: 2)")
    p.add_argument("--stage", choices=STAGES, default="report", help="run the stages up to and including this one")
    p.add_argument("--single-max", type=float, default=0,
                   help="train the single model only up to this many epochs (longer ones overfit; 0: no limit)")
    p.add_argument("--baseline-groups", type=int, default=0,
                   help="independent groups of baseline members (default 0: one per seed)")
    p.add_argument("--no-allocations", action="store_true", help="skip the allocation search")
    p.add_argument("--search-budgets", type=float, nargs="+",
                   help="search the allocations only at these budgets (default: every budget of study.ALLOCATIONS "
                        "in --budgets)")
    p.add_argument("--student-budgets", type=float, nargs="+",
                   help="budgets whose populations are distilled into students (default: the largest budget)")
    p.add_argument("--no-students", action="store_true", help="skip the students")
    p.add_argument("--student-epochs", type=float, default=16, help="each student's own epochs (default: %(default)s)")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the study's flags, train_q0.py's flags after `--`)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def checked_extra(extra: list[str]) -> list[str]:
    owned = sorted(shards.typed_flags(train_q0.build_parser(), extra) & STUDY_OWNED)
    if owned:
        raise UsageError(f"--{owned[0].replace('_', '-')} after --: the study sets it for each run; leave it out")
    return extra


def train_flags(argv: list[str], what: str) -> argparse.Namespace:
    """train_q0.py's reading of a run's flags; what it refuses is one line that says `what` asked for it."""
    try:
        return train_q0.parse_args(argv)
    except UsageError as e:
        raise UsageError(f"{what}: train_q0.py says: {e}") from None


def setup(args, extra: list[str]) -> Study:
    """The study the flags describe, every run's flags checked and the data read before any run
    starts: a bad flag or data that does not fit the preset is one line now, not hours later."""
    budgets, seeds = sorted(set(args.budgets)), list(dict.fromkeys(args.seeds))
    if args.single_max and args.single_max < budgets[0]:
        raise UsageError(f"--single-max {fmt(args.single_max)} is below the smallest budget {fmt(budgets[0])}: no "
                         f"single model to compare there")
    data_dir = Path(os.path.abspath(args.data_dir or train_q0.PRESETS[args.preset]["data_dir"]))
    base = train_flags(["--preset", args.preset, "--data-dir", str(data_dir), *checked_extra(extra)],
                       "the flags after --" if extra else f"--preset {args.preset}")
    for b in budgets:  # the recipe takes every budget (train_q0.py refuses one it cannot lay out)
        train_flags(["--preset", args.preset, "--data-dir", str(data_dir), "--epochs", fmt(b), *extra],
                    f"--budgets {fmt(b)}")
    data = q0_run.load_data(base)
    corpus = describe_corpus(data_dir, data)
    default = f"study-{corpus['name']}" + ("" if args.preset == "cpu" else f"-{args.preset}")
    runs = Path(os.path.abspath(args.runs_dir or Path("runs") / default))
    out = Path(os.path.abspath(args.out)) if args.out else runs / "report"
    for path, flag in ((runs, "--runs-dir"), (out, "--out")):
        if path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path} is a file; give a folder")
    students = [] if args.no_students else [budgets[-1]] if args.student_budgets is None \
        else sorted(set(args.student_budgets))
    if set(students) - set(budgets):
        raise UsageError(f"--student-budgets {fmt(min(set(students) - set(budgets)))} is not in --budgets: there is "
                         f"no population to distil there")
    if students:  # the student's own flags, checked now (a teacher's path is only read when it trains)
        train_flags(["--preset", args.preset, "--data-dir", str(data_dir), "--epochs", fmt(args.student_epochs),
                     "--distil-k", str(STUDENT_K), *extra], f"--student-epochs {fmt(args.student_epochs)}")
    search = [] if args.no_allocations else [b for b in ALLOCATIONS if b in budgets] if args.search_budgets is None \
        else sorted(set(args.search_budgets))
    if set(search) - (set(ALLOCATIONS) & set(budgets)):
        raise UsageError(f"--search-budgets {fmt(min(set(search) - (set(ALLOCATIONS) & set(budgets))))}: the search has "
                         f"layouts at {', '.join(fmt(b) for b in sorted(set(ALLOCATIONS) & set(budgets)))} of --budgets; "
                         f"choose among them")
    runs.mkdir(parents=True, exist_ok=True)
    return Study(args.preset, data_dir, runs, out, budgets, seeds, args.workers, args.single_max, args.baseline_groups,
                 search, students, args.student_epochs, extra, data, corpus)


@command
def main(argv=None) -> int:
    ours, extra = split_argv(list(sys.argv[1:] if argv is None else argv))
    args = parse_checked(build_parser(), RANGES, ours)
    study = setup(args, extra)
    upto = STAGES.index(args.stage)
    print(f"study of {study.corpus['name']}: runs in {study.runs}", flush=True)
    single = stage_single(study)
    print(f"single: E* = {fmt(best_single(single)['epochs'])} epochs (lowest mean fitness loss)", flush=True)
    allocations = stage_allocations(study) if upto >= 1 and study.search_budgets else None
    baseline = stage_baseline(study, single) if upto >= 2 else None
    q0 = stage_q0(study, baseline) if upto >= 3 else None
    if upto >= 4:
        stage_students(study, q0)
    if upto < STAGES.index("report"):
        print(f"done up to --stage {args.stage}; the report: rerun with --stage report")
        return 0
    summary = report(study, single, baseline, allocations, q0)
    print(markdown(summary))
    print(f"wrote {', '.join(str(study.out / n) for n in ('study.json', 'study.md'))}"
          + (f", {study.out / 'study.png'}" if summary["plot"] == "study.png" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
