"""Validation loss of q0 snapshots and their probability-averaged ensembles.

    python eval.py runs/q0 [--prior runs/q0/prior.json] [--plot]           # cached fp16, seconds
    python eval.py runs/q0 --prior runs/q0/prior.json --forward             # forward passes, the truth
    torchrun --nproc_per_node=2 eval.py runs/q0 --forward                    # members over processes
    python eval.py runs/q0 --prior runs/q0/prior.json --tasks next-line      # + downstream accuracy (tasks.py)

Scores, on the whole validation set, in nats per token and bits per byte: every snapshot alone;
the uniform ensemble; each prior budget K with renormalised and refitted weights; and the
population curve (ensemble loss against epochs spent, as snapshots arrived, with uniform weights
and with a prior refitted on the fitness caches of the snapshots present then). Every number
carries its inference cost: forward passes = members in the ensemble. --tasks adds zero-shot
multiple-choice accuracy of the snapshots, the uniform ensemble, the prior's budgets and the
students (tasks.py), always by forward passes.

The cached path reads fp16 probabilities, whose rounding (relative 2**-11, so |d log p| <= 4.9e-4
per token, unbiased) keeps it within 1e-3 nats/token of the forward path: that is the tolerance.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import fit_prior
import q0_run
import tasks
from data.shards import PATH, SWITCH, TEXT, ArgumentParser, UsageError, at_least, command, parse_checked

CACHE_TOLERANCE = 1e-3  # nats/token between the cached fp16 and forward paths (see the docstring)
CHUNK_ELEMS = 1 << 22    # tokens x max(members, weightings) scored at once: 32 MiB of float64
PARTS = ("members", "uniform", "prior", "curve")
MD_TITLE = "# q0 evaluation "
EVAL_VERSION = 3         # eval.json's format; 2: sealed (q0_run.sealed_json); 3: "tasks" (--tasks)
# --forward under torchrun: a rank waits in a collective while another runs a member's forward pass
# over the whole validation set, so the timeout is torch's gloo default, not the trainer's flag's.
COLLECTIVE_TIMEOUT_MINUTES = 30.0


# ---------------------------------------------------------------------------------------------
# What to score: weight vectors over the population
# ---------------------------------------------------------------------------------------------

def load_prior(path: Path, members, ks):
    """prior.json's budgets as dense weight vectors over `members`, checked against the disk."""
    prior = q0_run.read_prior(path)
    try:
        return _prior_weightings(path, prior, members, ks)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # cut short, or keys missing
        raise UsageError(f"{path} is not a whole q0 prior ({type(e).__name__}: {e}); fit it again with "
                         f"`python fit_prior.py RUN_DIR --out NEW.json`") from None


def _prior_weightings(path: Path, prior: dict, members, ks):
    """The prior's population (every member it was fitted on) is checked against the disk
    (q0_run.check_prior: a member gone or changed refuses the prior); members it never saw are
    named (it was fitted while the run was still training)."""
    where = {(m.run_dir.resolve(), m.record["id"]): i for i, m in enumerate(members)}
    found = q0_run.check_prior(path, prior, prior["members"], members[0].run["fitness"]["sha256"],
                               "these runs; refit with fit_prior.py",
                               records={key: members[i].record for key, i in where.items()})
    fitted_on = {where[(run_dir, record["id"])] for run_dir, record in found}
    budgets = {b["K"]: b for b in prior["budgets"]}
    for k in ks or ():
        if k not in budgets:
            raise UsageError(f"--budgets {k}: {path} has budgets {sorted(budgets)} only")
    out = []
    for k in sorted(ks or budgets):
        b, idx = budgets[k], []
        for ref in b["members"]:
            i = where.get(((path.parent / ref["run"]).resolve(), ref["id"]))
            if i not in fitted_on:
                raise UsageError(f"{path}: budget K={k} names snapshot {ref['id']}, which is not in its population; "
                                 f"refit with fit_prior.py")
            idx.append(i)
        for kind in ("renormalised", "refitted"):
            w = np.zeros(len(members))
            w[idx] = b[f"weights_{kind}"]
            out.append({"part": "prior", "K": k, "weights": kind, "w": w})
    unfitted = [m.name for i, m in enumerate(members) if i not in fitted_on]
    return prior | {"unfitted": unfitted}, out


def unfitted_note(prior_path, unfitted: list[str], population: int) -> str:
    names = ", ".join(unfitted[:6]) + (f" and {len(unfitted) - 6} more" if len(unfitted) > 6 else "")
    return (f"{prior_path} was fitted on {population - len(unfitted)} of the {population} snapshots; it gives no "
            f"weight to {names}: refit with fit_prior.py to use them")


def split_students(members):
    """Students (runs trained with --distil-from) apart from the population: they join no ensemble,
    no prior and no curve, and are scored alone, beside the ensembles. Runs of students only are a
    population of their own."""
    students = [m for m in members if m.run.get("population_config", {}).get("distil_from")]
    if len(students) == len(members):
        return members, []
    return [m for m in members if m not in students], students


def student_last(students) -> list[int]:
    """Each student run's last snapshot (the end of its schedule), as an index into `students`."""
    out = []
    for run_dir in dict.fromkeys(m.run_dir for m in students):
        mine = [i for i, m in enumerate(students) if m.run_dir == run_dir]
        out.append(max(mine, key=lambda i: (students[i].record["cycle"], students[i].record["base"])))
    return out


def student_rows(students, member_sums, run: dict) -> list[dict]:
    """Each student run's last snapshot: its loss at 1 forward pass, its own epochs, and the
    teacher's cost (the members of nonzero weight it learned from)."""
    out = []
    for i in student_last(students):
        m, cfg = students[i], students[i].run["population_config"]
        out.append({"run": str(m.run_dir), "id": m.record["id"], "forward_passes": 1,
                    "epochs": q0_run.epochs_spent([x.record for x in students if x.run_dir == m.run_dir]),
                    "teacher": {"prior": cfg["distil_from"], "K": cfg["distil_k"],
                                "forward_passes": len(cfg.get("distil_teacher", []))},
                    **numbers(member_sums[i], run)})
    return out


def forward_passes(w: np.ndarray) -> int:
    """The inference cost of a weighting: members with a weight, the forward passes a user runs."""
    return int(np.count_nonzero(w))


def curve_points(m: int, most: int) -> list[int]:
    """Population sizes for the curve: every arrival, or `most` of them evenly spaced (with M)."""
    if m <= most:
        return list(range(1, m + 1))
    return sorted({round(1 + j * (m - 1) / (most - 1)) for j in range(most)})


def curve_weightings(members, ns: list[int]):
    P = q0_run.load_matrix(members, "fitness")  # rows in arrival order: P[:n] is a prefix
    out = []
    for n in ns:
        runs = {}
        for m in members[:n]:
            runs.setdefault(m.run_index, []).append(m.record)
        point = {"part": "curve", "n": n, "latest": members[n - 1].record["id"],
                 "epochs": sum(q0_run.epochs_spent(r) for r in runs.values())}
        w = np.zeros(len(members))
        w[:n] = 1.0 / n
        out.append(point | {"weights": "uniform", "w": w})
        fit = fit_prior.fit_newton(P[:n])  # fit_prior.py's default solver
        w = np.zeros(len(members))
        w[:n] = fit.w
        out.append(point | {"weights": "prior", "w": w, "fitness_loss": fit.loss})
    return out


# ---------------------------------------------------------------------------------------------
# Scoring: sum over validation targets of -log(sum_i w_i p_i), for every weighting at once
# ---------------------------------------------------------------------------------------------

def nll_sums(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(rows, 2): sum of -log p over all targets, and over the targets that carry bytes (bpb)."""
    nll = -probs.log()
    return torch.stack([nll.sum(-1), (nll * keep).sum(-1)], dim=-1)


def score_chunks(read, n_members: int, T: int, W: torch.Tensor, keep: torch.Tensor, need: np.ndarray):
    """nll_sums of every weighting's mixture W @ p and of every needed member, from member
    probabilities read in token chunks (`read(s, e)` -> float32 [members, e - s]): memory is one
    chunk of every member and of every weighting, whatever the number of targets."""
    chunk = max(1024, CHUNK_ELEMS // max(n_members, len(W)))  # W @ P of a chunk is as large as P
    sums, member_sums = torch.zeros(len(W), 2, dtype=torch.float64), torch.zeros(n_members, 2, dtype=torch.float64)
    rows = torch.from_numpy(np.flatnonzero(need))
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        Pc = torch.from_numpy(read(s, e)).double()
        member_sums[rows] += nll_sums(Pc[rows], keep[s:e])
        sums += nll_sums(W @ Pc, keep[s:e])
    return sums.numpy(), member_sums.numpy()


def score_cached(members, W: torch.Tensor, keep: torch.Tensor):
    """Chunks of validation tokens x all members (bounded memory), all weightings per chunk; each
    cache checked (shape, dtype, then its SHA-256 once read: q0_run.CachedProbs)."""
    T = members[0].run["val"]["targets"]
    files = [q0_run.CachedProbs(m.run_dir, m.record, "val", T) for m in members]

    def read(s, e):
        return np.stack([f.read(s, e).astype(np.float32) for f in files])
    out = score_chunks(read, len(members), T, W, keep, np.ones(len(members), bool))
    for f in files:
        f.check()
    return out


class SpillFile:
    """Member probabilities, float32, one row per member, in a plain file read back in chunks with
    ordinary reads (a memory map would count every page it touched as resident memory)."""

    def __init__(self, path: Path, rows: int, T: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        need = rows * T * 4
        free = shutil.disk_usage(path.parent).free
        if need > free:
            raise UsageError(f"--forward needs {need / 2 ** 30:.1f} GiB beside {path.parent} for the members' "
                             f"probabilities and {free / 2 ** 30:.1f} GiB is free; free space or choose another --out")
        self.path, self.T, self.rows = path, T, rows
        self.file = open(path, "w+b")

    def write(self, row: int, p: np.ndarray):
        self.file.seek(row * self.T * 4)
        self.file.write(np.ascontiguousarray(p, dtype=np.float32).tobytes())

    def read(self, s: int, e: int) -> np.ndarray:
        out = np.zeros((self.rows, e - s), dtype=np.float32)  # rows never written: members no weighting uses
        size = os.fstat(self.file.fileno()).st_size
        for i in range(self.rows):
            if (i * self.T + e) * 4 <= size:
                self.file.seek((i * self.T + s) * 4)
                out[i] = np.frombuffer(self.file.read((e - s) * 4), dtype=np.float32)
        return out

    def close(self):
        self.file.close()
        self.path.unlink(missing_ok=True)


def forward_members(members, todo: np.ndarray, device, rank: int, world: int, T: int, probs_of, what: str):
    """Members todo[...] stream from disk one at a time (train_q0.load_snapshot_model: the weights'
    SHA-256 checked), spread over processes: rank k runs member todo[start + k] of each round,
    `probs_of(model, member)` -> float32[T]. Each row is handed to rank 0, which alone gets
    (index, row) pairs; every rank must run the generator to its end (its collectives)."""
    import train_q0  # the model: only forward passes need the trainer
    started = time.time()
    for start in range(0, todo.size, world):  # a round: rank k runs member todo[start + k]
        p = None
        if start + rank < todo.size:
            m = members[todo[start + rank]]
            model = train_q0.load_snapshot_model(m.run_dir, m.record, device)
            p = probs_of(model, m)
            del model
        if rank == 0:  # progress on stderr: stdout is the result
            done, spent = min(todo.size, start + world), time.time() - started
            print(f"{what}: scored {done}/{todo.size} members | {q0_run.clock(spent)} elapsed, "
                  f"ETA {q0_run.clock(spent / done * (todo.size - done))}", file=sys.stderr, flush=True)
        for k in range(min(world, todo.size - start)):  # each owner hands its row to rank 0
            row = torch.from_numpy(p) if (rank == k and p is not None) else torch.zeros(T)
            if world > 1:
                q0_run.all_reduce_(row)
            if rank == 0:
                yield todo[start + k], row.numpy()


def score_forward(members, W: torch.Tensor, keep: torch.Tensor, need: np.ndarray, device, batch_size: int,
                  rank: int, world: int, spill: Path):
    """Members' forward passes over the validation set (forward_members); each one's probabilities
    (float32, floored like the caches) go to one file on the reporting rank (`spill`, removed after),
    which then scores every weighting in token chunks: host memory is one member's probabilities
    and one chunk, not a running sum per weighting per token."""
    import train_q0
    run = members[0].run
    tokens, T = q0_run.load_val_tokens(run), run["val"]["targets"]

    def probs_of(model, m):
        return np.maximum(train_q0.token_probs(model, tokens, run["seq_len"], batch_size, device),
                          q0_run.PROB_FLOOR)  # the caches' floor: both paths score the same numbers
    store = SpillFile(spill, len(members), T) if rank == 0 else None
    try:
        for i, row in forward_members(members, np.flatnonzero(need), device, rank, world, T, probs_of, "validation"):
            store.write(i, row)
        if rank != 0:
            return None, None
        return score_chunks(store.read, len(members), T, W, keep, need)
    finally:
        if store is not None:
            store.close()


def score_tasks(job, members, device, rank: int, world: int) -> np.ndarray | None:
    """log p of every task target for every member `job.need` marks (rows of 0 elsewhere), on rank 0."""
    T = job.layout.n_targets
    LP = np.zeros((len(members), T), dtype=np.float32) if rank == 0 else None
    for i, row in forward_members(members, np.flatnonzero(job.need), device, rank, world, T, job.forward, "tasks"):
        LP[i] = row
    return LP


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def numbers(sums, run: dict, cost: int | None = None) -> dict:
    """Loss in nats per target (all targets) and the record's bits per byte (q0_run.nats_to_bpb);
    `sums` from nll_sums, the sum over targets that carry bytes NaN where the tokens were unavailable."""
    T = run["val"]["targets"]
    bpb = None if math.isnan(sums[1]) else q0_run.nats_to_bpb(float(sums[1]), run["val"].get("text_bytes"))
    return ({"forward_passes": cost} if cost is not None else {}) | {"loss": sums[0] / T, "bpb": bpb}


def byte_targets(run: dict) -> torch.Tensor:
    """1 for every validation target that carries bytes (q0_run.carries_bytes); NaN when the
    validation tokens are not at hand, so bits per byte reads n/a rather than a guess."""
    try:
        tokens = q0_run.load_val_tokens(run)
    except UsageError:
        return torch.full((run["val"]["targets"],), float("nan"), dtype=torch.float64)
    return torch.from_numpy(q0_run.carries_bytes(tokens[1:], run["bos_id"])).double()


def fmt_bpb(x):
    return "n/a" if x is None else f"{x:.4f}"


def markdown(res: dict) -> str:
    v = res["val"]
    out = [f"{MD_TITLE}({res['path']})", "",
           f"Validation: {v['targets']} targets, {v['text_bytes'] or 'unknown'} bytes, sha256 {v['sha256'][:12]}; "
           f"{len(res['members']) or res['population']} snapshots. Loss in nats/token; bpb = bits per byte; "
           f"forward passes = members run per token.", ""]
    if res.get("prior", {}).get("snapshots_not_in_prior"):
        p = res["prior"]
        out += [f"Note: {unfitted_note(p['file'], p['snapshots_not_in_prior'], res['population'])}.", ""]
    rows = []
    if res.get("uniform"):
        u = res["uniform"]
        rows.append(f"| uniform, all | {u['forward_passes']} | {u['loss']:.4f} | {fmt_bpb(u['bpb'])} |")
    for b in res.get("prior", {}).get("budgets", []):
        for kind in ("renormalised", "refitted"):
            rows.append(f"| prior K={b['K']}, {kind} | {b[kind]['forward_passes']} | {b[kind]['loss']:.4f} | "
                        f"{fmt_bpb(b[kind]['bpb'])} |")
    for st in res.get("students", []):
        n = st["teacher"]["forward_passes"]
        rows.append(f"| student {Path(st['run']).name} ({st['id']}, {st['epochs']:.2f} epochs of its own; teacher "
                    f"K={st['teacher']['K']}, {n} forward pass{'es' if n != 1 else ''}) | 1 | {st['loss']:.4f} | "
                    f"{fmt_bpb(st['bpb'])} |")
    if rows:
        out += ["| ensemble, or student | forward passes | loss | bpb |", "| --- | ---: | ---: | ---: |", *rows, ""]
    if res["members"]:
        out += ["## Each snapshot alone", "", "| snapshot | run | base | cycle | base epochs | forward passes | loss | bpb |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        out += [f"| {m['id']} | {m['run']} | {m['base']} | {m['cycle']} | {m['base_epochs']:.2f} | 1 | "
                f"{m['loss']:.4f} | {fmt_bpb(m['bpb'])} |" for m in res["members"]]
        out.append("")
    if res.get("curve"):
        out += ["## Population curve", "",
                "| snapshots | latest | epochs spent | prior forward passes | uniform loss | prior loss | uniform bpb | "
                "prior bpb |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        out += [f"| {c['n']} | {c['latest']} | {c['epochs']:.2f} | {c['prior']['forward_passes']} | "
                f"{c['uniform']['loss']:.4f} | "
                f"{c['prior']['loss']:.4f} | {fmt_bpb(c['uniform']['bpb'])} | {fmt_bpb(c['prior']['bpb'])} |"
                for c in res["curve"]]
        out.append("")
    if res.get("tasks"):
        out += tasks.markdown(res["tasks"])
    return "\n".join(out)


def plot(res: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    budgets = res.get("prior", {}).get("budgets", [])
    for kind in ("renormalised", "refitted"):
        axes[0].plot([b["K"] for b in budgets], [b[kind]["loss"] for b in budgets], "o-", label=f"prior, {kind}")
    if res.get("uniform"):
        axes[0].axhline(res["uniform"]["loss"], ls="--", c="gray", label=f"uniform, K={res['uniform']['forward_passes']}")
    axes[0].set(xscale="log", xlabel="K (forward passes)", ylabel="validation loss (nats/token)")
    for kind in ("uniform", "prior"):
        axes[1].plot([c["epochs"] for c in res.get("curve", [])], [c[kind]["loss"] for c in res.get("curve", [])],
                     "o-", label=kind)
    axes[1].set(xlabel="epochs spent", ylabel="validation loss (nats/token)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    q0_run.write_output(path, lambda tmp: fig.savefig(tmp, format="png"), replace=True)


def claim_outputs(out: Path, writer: bool = True):
    """The results JSON is the completion marker: written last, after the .md and .png beside it.
    So a .md (or .png) without its JSON was left by an interrupted eval and is rewritten; a JSON
    that exists is never overwritten. A .md that is not an eval's, alone, is refused too. Returns
    the claim on the JSON (q0_run.claim_output), held by the writer (under torchrun, rank 0)."""
    md, png = out.with_suffix(".md"), out.with_suffix(".png")
    leftover = md.is_file() and md.read_text(errors="replace").startswith(MD_TITLE)
    for p in (md, png):
        if p.exists() and not out.exists() and not leftover:
            raise UsageError(f"{p} exists and is never overwritten; choose another path with --out")
    return q0_run.claim_output(out, hold=writer)


RANGES = {"runs": PATH, "prior": PATH, "budgets": TEXT, "parts": TEXT, "curve_points": at_least(2),
          "forward": SWITCH, "device": TEXT, "batch_size": at_least(1), "out": PATH, "plot": SWITCH,
          "tasks": TEXT, "task_items": at_least(1), "task_file": TEXT}


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (a population may span several)")
    ap.add_argument("--prior", help="prior.json from fit_prior.py: score its budgets")
    ap.add_argument("--budgets", help="only these budgets K of the prior, comma-separated")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"what to score, from {','.join(PARTS)}")
    ap.add_argument("--curve-points", type=int, default=64, help="most population sizes on the curve")
    ap.add_argument("--forward", action="store_true", help="run every member's forward pass instead of the caches")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=16, help="windows per forward batch (--forward, --tasks)")
    ap.add_argument("--out", help="results JSON (default <first run>/eval[-forward].json; .md beside it); never overwritten")
    ap.add_argument("--plot", action="store_true", help="also write a PNG beside --out (needs matplotlib)")
    ap.add_argument("--tasks", help=f"downstream tasks, comma-separated, from {','.join(tasks.TASKS)} (tasks.py): "
                                    f"acc and acc_norm of the parts asked for, by forward passes")
    ap.add_argument("--task-items", type=int, help="score the first N items of each task (default: all)")
    ap.add_argument("--task-file", action="append", metavar="TASK=PATH[,PATH]",
                    help="a local copy of a standard task's file(s), in its original format (repeatable)")
    return ap


def checked_device(args) -> torch.device:
    """--device as a torch device that exists here (eval.py, sample.py)."""
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a torch device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here; give --device cpu")
    return device


def checked_flags(args) -> tuple[torch.device, set[str], int]:
    """What the flags ask for, refused before any work: the device, the parts, the processes."""
    device = checked_device(args)
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        raise UsageError(f"--parts {args.parts}: choose from {','.join(PARTS)}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not args.forward:
        raise UsageError("the cached path runs in one process; drop torchrun, or add --forward")
    if args.budgets and not args.prior:
        raise UsageError("--budgets selects budgets of a prior; give --prior too")
    if args.tasks is not None:
        tasks.parse_flags(args.tasks, args.task_file)
    elif args.task_items or args.task_file:
        raise UsageError("--task-items and --task-file shape the downstream tasks; give --tasks too")
    return device, parts, world


def choose_weightings(args, parts: set[str], pop) -> tuple[list[dict], dict | None]:
    """Every weighting to score over the population (uniform, the prior's budgets, the curve's),
    and the prior (None without --prior)."""
    ks = q0_run.parse_budgets(args.budgets, len(pop)) if args.budgets else None
    weightings, prior = [], None
    if "uniform" in parts:
        weightings.append({"part": "uniform", "w": np.full(len(pop), 1.0 / len(pop))})
    if args.prior and "prior" in parts:
        prior, ws = load_prior(Path(args.prior), pop, ks)
        if prior["unfitted"]:
            print(f"note: {unfitted_note(args.prior, prior['unfitted'], len(pop))}", file=sys.stderr)
        weightings += ws
    if "curve" in parts:
        weightings += curve_weightings(pop, curve_points(len(pop), args.curve_points))
    return weightings, prior


@dataclasses.dataclass
class TaskJob:
    """The downstream tasks of --tasks: their items and targets (tasks.Layout), what to score
    (`scored`: a snapshot or student by member index, or a weighting over every member) and the
    members whose forward passes that needs."""
    tasks: list
    layout: tasks.Layout
    forward: tasks.Forward
    scored: list[dict]
    need: np.ndarray


def task_job(args, parts: set[str], pop, students, weightings) -> TaskJob | None:
    """Every snapshot (with "members" in --parts), the uniform ensemble and the prior's budgets as
    chosen for the validation loss (not the curve), and each student's last snapshot."""
    if args.tasks is None:
        return None
    names, local = tasks.parse_flags(args.tasks, args.task_file)
    run = pop[0].run
    chosen = tasks.load_tasks(names, local, run, args.task_items)
    layout = tasks.build_layout(chosen, run)
    pad = np.zeros(len(students))
    scored = [{"what": "snapshot", "run": str(m.run_dir), "id": m.record["id"], "member": i}
              for i, m in enumerate(pop)] if "members" in parts else []
    scored += [{"what": x["part"], **{k: x[k] for k in ("K", "weights") if x["part"] == "prior"},
                "w": np.append(x["w"], pad)} for x in weightings if x["part"] in ("uniform", "prior")]
    for i in student_last(students):
        m = students[i]
        scored.append({"what": "student", "run": str(m.run_dir), "id": m.record["id"],
                       "teacher_K": m.run["population_config"]["distil_k"], "member": len(pop) + i})
    need = np.zeros(len(pop) + len(students), dtype=bool)
    for x in scored:
        need[[x["member"]] if "member" in x else np.flatnonzero(x["w"])] = True
    return TaskJob(chosen, layout, tasks.Forward(layout, run["bos_id"], args.batch_size), scored, need)


def score(args, parts: set[str], members, n_pop: int, W: torch.Tensor, keep: torch.Tensor, device: torch.device,
          world: int, out: Path, job: TaskJob | None = None):
    """(rank, weighting sums, member sums, task log-probabilities or None): the caches in one
    process, or forward passes spread over torchrun's processes (q0_run.setup_distributed; plain
    --device cuda is each process's own GPU). The tasks always take forward passes."""
    if not args.forward:
        sums = score_cached(members, W, keep)
        return (0, *sums, score_tasks(job, members, device, 0, 1) if job else None)
    rank = 0
    if world > 1:
        _, rank, local = q0_run.setup_distributed(COLLECTIVE_TIMEOUT_MINUTES, cuda=device.type == "cuda")
        device = local if device.type == "cuda" and device.index is None else device
    need = (W != 0).any(0).numpy() | ("members" in parts) | (np.arange(len(members)) >= n_pop)
    spill = out.with_name(f".{out.name}.members.tmp")  # fixed: a rerun reuses it
    sums = score_forward(members, W, keep, need, device, args.batch_size, rank, world, spill)
    task_logp = score_tasks(job, members, device, rank, world) if job else None
    if world > 1:
        dist.destroy_process_group()  # sums are reduced; an open gloo group aborts at interpreter exit
    return (rank, *sums, task_logp)


def results(args, world: int, parts: set[str], pop, students, weightings, prior, sums, member_sums,
            job: TaskJob | None = None, task_logp: np.ndarray | None = None) -> dict:
    """eval.json: every number scored, by what it scores."""
    members, run = pop + students, pop[0].run
    res = {**q0_run.json_header("q0-eval", EVAL_VERSION),
           "path": "forward passes" if args.forward else "cached fp16 probabilities",
           "cache_tolerance_nats": CACHE_TOLERANCE, "processes": world,
           "runs": [str(r) for r in args.runs], "population": len(pop),
           "val": {k: run["val"].get(k) for k in ("targets", "text_bytes", "sha256")},
           "members": [], "curve": []}
    if "members" in parts:
        res["members"] = [{"run": str(m.run_dir), "id": m.record["id"], "base": m.record["base"],
                           "cycle": m.record["cycle"], "base_epochs": m.record["base_epochs"],
                           "forward_passes": 1, **numbers(s, run)} for m, s in zip(members, member_sums)]
    res["students"] = student_rows(students, member_sums[len(pop):], run)
    budgets, curve = {}, {}
    for x, s in zip(weightings, sums):
        if x["part"] == "uniform":
            res["uniform"] = numbers(s, run, forward_passes(x["w"]))
        elif x["part"] == "prior":
            budgets.setdefault(x["K"], {"K": x["K"]})[x["weights"]] = numbers(s, run, forward_passes(x["w"]))
        else:
            c = curve.setdefault(x["n"], {k: x[k] for k in ("n", "latest", "epochs")})
            c[x["weights"]] = numbers(s, run, forward_passes(x["w"])) | ({"fitness_loss": x["fitness_loss"]} if "fitness_loss" in x else {})
    if prior is not None:
        res["prior"] = {"file": str(args.prior), "solver": prior["solver"]["name"], "budgets": list(budgets.values()),
                        "snapshots_not_in_prior": prior["unfitted"]}
    res["curve"] = list(curve.values())
    if job is not None:
        res["tasks"] = tasks.score(job.tasks, job.layout, task_logp, job.scored)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


@command
def main(argv=None):
    args = parse_checked(build_parser(), RANGES, argv)
    device, parts, world = checked_flags(args)
    out = Path(args.out) if args.out else Path(args.runs[0]) / ("eval-forward.json" if args.forward else "eval.json")
    outputs = [out, out.with_suffix(".md")] + ([out.with_suffix(".png")] if args.plot else [])
    with claim_outputs(out, writer=os.environ.get("RANK", "0") == "0"):
        pop, students = split_students(q0_run.load_population(args.runs))
        members = pop + students  # weightings are over the population; students get weight 0 in all
        if os.environ.get("RANK", "0") == "0":
            for note in q0_run.unfinished_notes(members, "this evaluation", "evaluate again"):
                print(note, file=sys.stderr, flush=True)
        weightings, prior = choose_weightings(args, parts, pop)
        W = torch.from_numpy(np.stack([np.append(x["w"], np.zeros(len(students))) for x in weightings])) \
            if weightings else torch.zeros((0, len(members)), dtype=torch.float64)
        job = task_job(args, parts, pop, students, weightings)
        keep = byte_targets(members[0].run)
        rank, sums, member_sums, task_logp = score(args, parts, members, len(pop), W, keep, device, world, out, job)
        if rank != 0:
            return 0
        res = results(args, world, parts, pop, students, weightings, prior, sums, member_sums, job, task_logp)
        md = markdown(res)
        q0_run.write_output(out.with_suffix(".md"), md + "\n", replace=True)  # the JSON, last, marks them complete
        if args.plot:
            plot(res, out.with_suffix(".png"))
        q0_run.write_output(out, q0_run.sealed_json(res) + "\n")
    print(md)
    print(f"wrote {', '.join(map(str, outputs))} (peak RSS {res['peak_rss_mib']:.0f} MiB, rank 0)")


if __name__ == "__main__":
    sys.exit(main())
