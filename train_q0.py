"""q0: hyper-epoch pretraining in one file.

A fixed dataset, a large compute budget: instead of training one model for many epochs (it
saturates after ~16), train a *population*. A few parallel trajectories ("bases") run a
cyclic, anti-correlated LR / weight-decay schedule and save a snapshot at the end of every
cycle; each cycle distils from the previous snapshot of its own base (chain distillation);
fit_prior.py then weights the snapshots and eval.py scores the probability-averaged ensemble.

    python train_q0.py --preset cpu                   # a laptop CPU, a few minutes
    python train_q0.py --preset cpu --epochs 64       # the CPU record: the budget recipe picks the layout
    torchrun --nproc_per_node=8 train_q0.py           # the 1.8B Slowrun configuration, 8xH100

Read top to bottom: configuration, data, model, optimiser, schedule, distillation,
evaluation, run directory, population layout, training, main.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import struct
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent

# =============================================================================================
# Configuration
# =============================================================================================
# Flags default to the 1.8B Slowrun q0 record configuration (5 bases x 96 cycles x 2 epochs,
# 480 snapshots). A preset replaces the size-related defaults; explicit flags override both.

PRESETS = {
    # The defaults below; a device batch of at most 2 (the reference's micro-batch): the --dry-run
    # memory plan puts 8 sequences of 2048 over an H100's 80 GB.
    "slowrun": dict(device_batch=2),
    # README's main job: bytes-level Shakespeare, 32K training tokens (the first play is the
    # fitness set), so a 1.2M-parameter model overfits within the 16-epoch budget: the data-limited
    # regime q0 is for. One base: 6 epochs, then five 2-epoch cycles distilling. The record's
    # architecture with two choices measured at this scale (--epochs 16, seed 0, q0 prior loss;
    # records/2026-11-24_record-model-cpu): modded-nanogpt's zero init of the residual branches
    # (1.9912 against 2.0612 with the record's init) and no layer looping (2.0661 looping layer 2
    # four more times, 1.5x the time, against 2.0612).
    "cpu": dict(
        data_dir="data/shakespeare/bytes", n_layer=4, d_model=128, n_head=4, mlp_hidden=384,
        seq_len=128, short_window=64, batch_seqs=32, device_batch=8, fitness_tokens=1,
        train_tokens=32768, val_tokens=32768, bases=1, cycles=6, cycle_epochs=2.0,
        first_cycle_epochs=6.0, distill_from_cycle=2, lr_matrix=0.02, lr_embed=0.05,
        lr_head=0.004, lr_scalar=0.02, weight_decay=0.2, eval_batch=32,
        loop_layers=[2, 2], zero_out_init=True,
    ),
    # The tests: seconds per run on their short documents; every piece of the architecture on (layer
    # 2 looped once more). On Shakespeare the fitness set is the first whole play (99,743 tokens)
    # against 4K training tokens: scoring it at every snapshot is most of a run of minutes.
    "tiny": dict(
        data_dir="data/shakespeare/bytes", d_model=32, n_head=2, mlp_hidden=64,
        seq_len=32, short_window=16, batch_seqs=8, device_batch=8, fitness_tokens=1,
        train_tokens=4096, val_tokens=2048, bases=1, cycles=3, cycle_epochs=1.0,
        first_cycle_epochs=1.0, distill_from_cycle=2, lr_matrix=0.02, lr_embed=0.05,
        lr_head=0.004, lr_scalar=0.02, weight_decay=0.2, eval_batch=16,
        n_layer=4, loop_layers=[2, 3], loop_repeats=1,
    ),
}

# Without --device-batch, the largest device batch up to the preset's (or this) that divides.
DEVICE_BATCH_CAP = 8

# Flags that do not change the population: a resumed run may change these freely. Placement
# flags (--device-batch, --groups, and the process count, which is no flag) change only the
# floating-point reduction order: dropout masks are drawn per sequence of the global batch,
# whatever micro-batch or process it lands on (tests/test_train.py measures both).
NON_POPULATION_FLAGS = {
    "preset", "run_name", "runs_dir", "device_batch", "groups", "eval_batch", "compile", "log_every",
    "checkpoint_minutes", "collective_timeout_minutes", "wandb_project", "attention", "autocast",
    "checkpoint_activations", "dry_run", "plan_gpus", "mfu", "peak_tflops",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one `error: ...` line and exit code 2, no usage block."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="slowrun", help="size preset; flags override it")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default="data/fineweb",
                   help="folder with train.q0t and val.q0t (or Slowrun's fineweb_{train,val}.pt, or "
                        "modded-nanogpt .bin shards)")
    g.add_argument("--train-tokens", type=int, default=0,
                   help="use only the first N training tokens after the fitness carve (0: all)")
    g.add_argument("--val-tokens", type=int, default=0, help="use only the first N validation tokens (0: all)")
    g.add_argument("--fitness-tokens", type=int, default=132000,
                   help="whole documents carved from the front of the training data until at least this "
                        "many tokens; never trained on; the prior is fitted on them")
    g = p.add_argument_group("model")
    g.add_argument("--n-layer", type=int, default=30)
    g.add_argument("--d-model", type=int, default=2048)
    g.add_argument("--n-head", type=int, default=16)
    g.add_argument("--mlp-hidden", type=int, default=5632, help="SwiGLU hidden width")
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--short-window", type=int, default=1024,
                   help="S layers of the SSSL pattern: a query sees itself and this many earlier tokens")
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--loop-layers", type=int, nargs=2, default=[15, 25], metavar=("START", "END"),
                   help="decoder layers [START, END) run again --loop-repeats times after their first pass "
                        "(training, teacher and evaluation alike); END = START: no looping")
    g.add_argument("--loop-repeats", type=int, default=4, help="extra passes of the looped layers")
    g.add_argument("--iha", action=argparse.BooleanOptionalAction, default=True,
                   help="interleaved head attention: learned q/k/v head mixing (--no-iha: off)")
    g.add_argument("--mtp-weight", type=float, default=0.3,
                   help="multi-token-prediction loss weight (0: no MTP block)")
    g.add_argument("--zero-out-init", action=argparse.BooleanOptionalAction, default=False,
                   help="modded-nanogpt's init instead of the record's: attention and MLP output projections and "
                        "the head start at zero, the x0 scalars at 0 (every residual branch starts closed)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-seqs", type=int, default=256, help="global batch in sequences (256 x 2048 = 524,288 tokens)")
    g.add_argument("--device-batch", type=int, default=None,
                   help="sequences per forward pass per process (default: the largest, at most the preset's "
                        "cap (slowrun: 2, the reference's micro-batch, as 8 runs out of 80 GB; cpu, tiny: 8), "
                        "that splits every cycle's batch over the processes)")
    g.add_argument("--lr-matrix", type=float, default=0.01, help="Muon peak LR (hidden matrices)")
    g.add_argument("--lr-embed", type=float, default=0.0375, help="AdamW peak LR (token embedding)")
    g.add_argument("--lr-head", type=float, default=0.0005, help="AdamW peak LR (output head)")
    g.add_argument("--lr-scalar", type=float, default=0.025,
                   help="AdamW peak LR of the x0 scalars; residual and skip scalars get 0.01x")
    g.add_argument("--lr-iha", type=float, default=0.02, help="AdamW peak LR (IHA head-mixing matrices)")
    g.add_argument("--weight-decay", type=float, default=1.3,
                   help="peak decoupled weight decay of the Muon matrices, embedding and head (x LR)")
    g.add_argument("--decay-embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="decay the embedding and the head like the matrices")
    g.add_argument("--muon-momentum", type=float, default=0.95)
    g.add_argument("--muon-eq-r", action=argparse.BooleanOptionalAction, default=True,
                   help="MuonEq-R: normalise every row of the momentum before orthogonalising")
    g.add_argument("--normuon", action=argparse.BooleanOptionalAction, default=True,
                   help="NorMuon: rescale the update by a second moment along its reduction dimension")
    g.add_argument("--cautious-wd", action=argparse.BooleanOptionalAction, default=True,
                   help="decay only weights whose update agrees with them in sign")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g = p.add_argument_group("population layout (the epoch budget is bases x total epochs per base)")
    g.add_argument("--epochs", type=float, default=0,
                   help="epoch budget summed over bases: choose --bases, --cycles, --cycle-epochs and "
                        "--first-cycle-epochs by the recipe (README); those flags, given, override it")
    g.add_argument("--bases", type=int, default=5, help="parallel trajectories, each its own seed and data order")
    g.add_argument("--cycles", type=int, default=96, help="cycles per base = snapshots per base")
    g.add_argument("--cycle-epochs", type=float, default=2.0, help="length of every cycle after the first")
    g.add_argument("--first-cycle-epochs", type=float, default=2.0,
                   help="length of the first cycle: a longer stretch before the first snapshot")
    g.add_argument("--groups", type=int, default=0,
                   help="process groups bases are placed on (0: gcd(bases, world size)); must divide both; "
                        "placement only: a resumed run may change it")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("cyclic schedule")
    g.add_argument("--lr-floor", type=float, default=0.08, help="LR multiplier at the end of each cycle")
    g.add_argument("--wd-floor", type=float, default=0.7, help="weight-decay multiplier at peak LR")
    g.add_argument("--snapshot-noise", type=float, nargs=2, default=[0.25, 0.05], metavar=("START", "END"),
                   help="after each snapshot add N(0, (s*std(W))^2) to every weight matrix, s cosine-decayed "
                        "from START to END over the cycles; 0 0 turns it off")
    g.add_argument("--batch-schedule", type=float, default=0.75,
                   help="batch multiplier of the first and last quarter of the cycles (1: constant batch)")
    g = p.add_argument_group("chain distillation")
    g.add_argument("--distill-from-cycle", type=int, default=9,
                   help="first cycle that distils from the previous snapshot (0: never)")
    g.add_argument("--distill-alpha", type=float, default=0.45,
                   help="weight a of the teacher: (1-a) CE + a T^2 KL (chain and ensemble distillation alike; "
                        "with --distil-from the default is 0.8)")
    g.add_argument("--distill-temperature", type=float, default=1.2, help="temperature T of the KL term")
    g = p.add_argument_group("ensemble distillation: one student of a prior's ensemble, at 1 forward pass")
    g.add_argument("--distil-from", default="",
                   help="prior.json from fit_prior.py: every cycle learns from its --distil-k ensemble (log of the "
                        "weighted mean of the members' probabilities at --distill-temperature); with --epochs E "
                        "the student is one base of E epochs without snapshot noise. The run is an ordinary one")
    g.add_argument("--distil-k", type=int, default=0, help="which budget K of the prior (0: its largest)")
    g.add_argument("--distil-init", choices=["scratch", "best"], default="scratch",
                   help="the student starts from scratch, or as the prior's member with the lowest fitness loss")
    g = p.add_argument_group("snapshots, logs and runs")
    g.add_argument("--runs-dir", default="runs")
    g.add_argument("--run-name", default="", help="default: <preset>-<bases>x<cycles>-seed<seed>")
    g.add_argument("--import-slowrun", default="", metavar="DIR",
                   help="instead of training, score the reference's snapshots DIR/model_{i}.pt into a run directory "
                        "(model i: base i // --cycles, cycle i %% --cycles + 1); the model flags must be the ones it "
                        "was trained with (the slowrun preset's defaults are the record's)")
    g.add_argument("--val-probs", type=int, choices=[0, 1], default=1,
                   help="cache every snapshot's validation probabilities (what eval.py's fast path reads)")
    g.add_argument("--eval-batch", type=int, default=8, help="sequences per forward pass in evaluation")
    g.add_argument("--log-every", type=int, default=10, help="steps between training-loss lines")
    g.add_argument("--checkpoint-minutes", type=float, default=30.0,
                   help="also checkpoint this often within a cycle (cycle ends always checkpoint)")
    g.add_argument("--collective-timeout-minutes", type=float, default=10.0,
                   help="a process that does not answer a collective (or, at the end, show signs of life) "
                        "for this long fails the run with an error naming its rank")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the model (auto: on CUDA only)")
    g.add_argument("--attention", choices=ATTENTION_KERNELS, default="auto",
                   help="attention kernel: flex (FlexAttention, block-sparse windows) or sdpa (auto: flex on CUDA)")
    g.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast of the forward passes (auto: on CUDA only)")
    g.add_argument("--wandb-project", default="", help="also log to Weights & Biases (needs wandb installed)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each block's activations in the backward pass: far less memory, ~1/3 more compute")
    g = p.add_argument_group("preflight plan (printed at the top of every run)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, FLOPs, memory, disk, hours) and exit; no data needed")
    g.add_argument("--plan-gpus", type=int, default=0,
                   help="plan for this many CUDA processes (default: this launch's processes and device)")
    g.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the hours assume")
    g.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                   help="peak bf16 TFLOP/s of one process's device (default: H100 SXM, dense)")
    return p


# The --epochs recipe: how a budget of E epochs (summed over bases) splits into bases, cycles and
# cycle lengths. Every base first trains half its budget, at most `first_max` epochs, as one
# stretch before its first snapshot, then runs cycles of 1/8 of its budget, at most `cycle_max`
# epochs: small budgets pack short cycles at the end, large ones run many cycles. One base takes
# budgets up to `one_base` epochs; each doubling beyond adds a base (the published guidance).
# The three numbers depend on the scale, so each preset has its own:
#   cpu, tiny: measured by the CPU study (records/2026-11-23_shakespeare-cpu: 27 allocations at 1
#              to 64 epochs): first 8 (the single model's best is 10), cycles of 1 epoch; at 64
#              epochs two bases beat one and four (at 32, two beat one by 0.011 on one seed).
#   slowrun:   the published guidance (one base up to 128 epochs) and the record's 2-epoch cycles;
#              first_max 16 is where the single model saturates there. Not measured by us.
@dataclasses.dataclass(frozen=True)
class Recipe:
    one_base: float
    first_max: float
    cycle_max: float


CPU_RECIPE = Recipe(one_base=32, first_max=8, cycle_max=1)
RECIPES = {"slowrun": Recipe(one_base=128, first_max=16, cycle_max=2), "cpu": CPU_RECIPE, "tiny": CPU_RECIPE}
RECIPE_LAYOUT_FLAGS = ("bases", "cycles", "cycle_epochs", "first_cycle_epochs")
# A student of an ensemble (--distil-from) weighs the teacher more than chain distillation does:
# alpha 0.8 against 0.45 took the cpu preset's 64-epoch student from 2.0174 to 1.9562 nats/byte
# (records/2026-11-24_distil-cpu).
DISTIL_ALPHA = 0.8


def recipe(epochs: float, rule: Recipe, given: dict | None = None) -> dict:
    """The layout for a budget of `epochs`; `given` holds layout flags set explicitly, which win.
    Cycle counts are whole, so the cycle length is then stretched to spend the budget exactly."""
    out = dict(given or {})
    if "bases" not in out:
        out["bases"] = 1 if epochs <= rule.one_base else 1 + math.ceil(math.log2(epochs / rule.one_base) - 1e-9)
    per_base = epochs / out["bases"]
    if "first_cycle_epochs" not in out:
        if "cycles" in out and "cycle_epochs" in out:
            out["first_cycle_epochs"] = per_base - (out["cycles"] - 1) * out["cycle_epochs"]
        else:
            out["first_cycle_epochs"] = min(per_base / 2, rule.first_max) if per_base > 1 else per_base
    rest = per_base - out["first_cycle_epochs"]
    if "cycles" not in out:
        length = out.get("cycle_epochs", min(per_base / 8, rule.cycle_max))
        out["cycles"] = 1 + max(1, round(rest / length)) if rest > 1e-9 else 1
    if "cycle_epochs" not in out:
        out["cycle_epochs"] = rest / (out["cycles"] - 1) if out["cycles"] > 1 else rule.cycle_max
    spent = out["bases"] * (out["first_cycle_epochs"] + (out["cycles"] - 1) * out["cycle_epochs"])
    if out["cycles"] < 1 or out["first_cycle_epochs"] <= 0 or abs(spent - epochs) > 1e-6 * max(1.0, epochs):
        flags = " ".join(f"--{k.replace('_', '-')} {out[k]:g}" for k in RECIPE_LAYOUT_FLAGS if k in (given or {}))
        raise UsageError(f"--epochs {epochs:g} with {flags} spends {spent:g} epochs; give fewer layout flags "
                         f"or a budget they fill")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    # The preset's device batch is a cap, applied once the layout is known (choose_device_batch).
    parser.set_defaults(**{k: v for k, v in PRESETS[preset].items() if k != "device_batch"})
    args = parser.parse_args(argv)
    errors = range_errors(parser, args, RANGES)
    if errors:
        raise UsageError(errors[0])
    model_config(args, vocab_size=2)  # shapes the model cannot take, before any data is read
    if args.epochs:
        explicit = argparse.ArgumentParser(add_help=False)  # which layout flags the user typed
        for flag in RECIPE_LAYOUT_FLAGS:
            explicit.add_argument("--" + flag.replace("_", "-"), type=type(getattr(args, flag)),
                                  default=argparse.SUPPRESS)
        given = vars(explicit.parse_known_args(argv)[0])
        if args.distil_from:  # a student: one base, unless the user says otherwise
            given = {"bases": 1} | given
        vars(args).update(recipe(args.epochs, RECIPES[args.preset], given))
    typed = sys.argv[1:] if argv is None else argv
    if args.distil_from and "--snapshot-noise" not in typed:
        args.snapshot_noise = [0.0, 0.0]  # a student's snapshots are its own checkpoints, not a population
    if args.distil_from and "--distill-alpha" not in typed:
        args.distill_alpha = DISTIL_ALPHA
    if not args.run_name:
        kind = "distil-" if args.distil_from else ""
        args.run_name = f"{args.preset}-{kind}{args.bases}x{args.cycles}-seed{args.seed}"
    return args


class UsageError(Exception):
    """Bad input: reported as one line, exit code 2, before any training starts."""


# Every flag's meaningful values, checked once right after parsing. Every flag has an entry (a
# test enumerates the parser): a flag added without one fails the tests.
@dataclasses.dataclass(frozen=True)
class Range:
    """kind "number": finite, within [lo, hi] (an end left out when open), or one of `also`
    (0 for "all", say); "text", "path", "choice", "switch": argparse or the code checks them."""
    kind: str = "number"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()

    def accepts(self, value) -> bool:
        if self.kind != "number" or value is None or value in self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def says(self, integer: bool = False) -> str:
        ends = ([f"{'>' if self.lo_open else '>='} {self.lo:g}"] if self.lo is not None else []) + \
               ([f"{'<' if self.hi_open else '<='} {self.hi:g}"] if self.hi is not None else [])
        return ("an integer " if integer else "a finite number ") + " and ".join(ends) \
            + "".join(f" (or {a:g})" for a in self.also)


def at_least(lo, **kw) -> Range:
    return Range(lo=lo, **kw)


TEXT, PATH, CHOICE, SWITCH = Range("text"), Range("path"), Range("choice"), Range("switch")
UNIT = Range(lo=0, hi=1)  # a fraction, both ends allowed

RANGES = {
    "preset": CHOICE, "data_dir": PATH, "train_tokens": at_least(0), "val_tokens": at_least(2, also=(0,)),
    "fitness_tokens": at_least(1),
    "n_layer": at_least(1), "d_model": at_least(2), "n_head": at_least(1), "mlp_hidden": at_least(1),
    "seq_len": at_least(1), "short_window": at_least(1), "dropout": Range(lo=0, hi=1, hi_open=True),
    "batch_seqs": at_least(1), "device_batch": at_least(1), "lr_matrix": at_least(0), "lr_embed": at_least(0),
    "lr_head": at_least(0), "lr_scalar": at_least(0), "weight_decay": at_least(0),
    "loop_layers": at_least(0), "loop_repeats": at_least(0), "iha": SWITCH, "mtp_weight": at_least(0),
    "zero_out_init": SWITCH, "import_slowrun": PATH, "lr_iha": at_least(0), "decay_embeddings": SWITCH, "muon_eq_r": SWITCH, "normuon": SWITCH, "cautious_wd": SWITCH,
    "muon_momentum": Range(lo=0, hi=1, hi_open=True), "grad_clip": at_least(0),
    "epochs": at_least(0), "bases": at_least(1), "cycles": at_least(1), "cycle_epochs": at_least(0, lo_open=True),
    "first_cycle_epochs": at_least(0, lo_open=True), "groups": at_least(0), "seed": at_least(0),
    "lr_floor": Range(lo=0, hi=1, hi_open=True), "wd_floor": UNIT, "snapshot_noise": at_least(0),
    "batch_schedule": at_least(0, lo_open=True),
    "distill_from_cycle": at_least(0), "distill_alpha": UNIT, "distill_temperature": at_least(0, lo_open=True),
    "runs_dir": PATH, "run_name": TEXT, "val_probs": CHOICE, "eval_batch": at_least(1), "log_every": at_least(1),
    "checkpoint_minutes": at_least(0), "compile": CHOICE, "wandb_project": TEXT,
    "collective_timeout_minutes": at_least(0, lo_open=True), "attention": CHOICE, "autocast": CHOICE,
    "checkpoint_activations": SWITCH, "dry_run": SWITCH, "plan_gpus": at_least(0),
    "distil_from": PATH, "distil_k": at_least(0), "distil_init": CHOICE,
    "mfu": Range(lo=0, hi=1, lo_open=True), "peak_tflops": at_least(0, lo_open=True),
}


def range_errors(parser: argparse.ArgumentParser, args: argparse.Namespace, ranges: dict) -> list[str]:
    """One message per flag whose value is outside its declared range."""
    out = []
    for action in parser._actions:
        if action.dest == "help":
            continue
        rule = ranges[action.dest]  # a KeyError here is a flag without a declared range
        value = getattr(args, action.dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not rule.accepts(v):
                flag = action.option_strings[0] if action.option_strings else action.dest
                out.append(f"{flag} {v:g}: expected {rule.says(action.type is int)}")
                break
    return out


# =============================================================================================
# Files: hashing, atomic writes, one writer per run (a crash never leaves half a file under a
# real name, and the same command, rerun, repairs whatever a crash left)
# =============================================================================================

def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# Fault injection for the crash tests: Q0_FAULT=kill:N SIGKILLs this process just before its N-th
# commit (a rename, link or unlink that changes what a name holds), stop:N freezes it there
# (SIGSTOP: a hung node), enospc:N makes that commit's write fail as on a full disk.
# Q0_FAULT_RANK limits it to one torchrun rank. Nothing else reads these variables.
_COMMITS = [0]


def _fault(kind: str) -> bool:
    """Count one commit; act on Q0_FAULT when this is the one it names."""
    if kind == "commit":
        _COMMITS[0] += 1
    spec = os.environ.get("Q0_FAULT", "")
    if not spec or os.environ.get("Q0_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return False
    action, _, n = spec.partition(":")
    if int(n) != _COMMITS[0] + (kind == "write"):
        return False
    if kind == "commit" and action in ("kill", "stop"):
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
    return kind == "write" and action == "enospc"


def _commit(op, *paths):
    """Every change of what a name holds goes through here (os.replace, os.rename, os.link, unlink)."""
    _fault("commit")
    op(*paths)


def _tmp_name(path: Path) -> Path:
    """One temporary name per file, the same in every process: one writer per run (RunLock) and
    per output (claim_output) means a rerun reuses what a killed writer left instead of adding to it."""
    return path.with_name(f".{path.name}.tmp")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


class DiskError(UsageError):
    """A write that the disk refused: full, or read-only. Nothing under a real name was touched."""


def _disk_error(path: Path, size: int | None, err: BaseException) -> DiskError | None:
    """One line for a full disk or a read-only folder; None for any other failure."""
    code = getattr(err, "errno", None)
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DiskError(f"cannot write {path}: {os.strerror(code)}; make {path.parent} writable (or write "
                         f"elsewhere), then rerun the same command")
    free = shutil.disk_usage(next(p for p in path.parents if p.exists())).free
    # torch.save reports a full disk as a RuntimeError without errno ("unexpected pos ..."): the
    # free space left says what happened
    if code in (errno.ENOSPC, errno.EDQUOT) or (isinstance(err, RuntimeError) and free < max(size or 0, 1 << 20)):
        need = f"{_human(size)}" if size else "more space"
        return DiskError(f"no space left for {path}: it needs {need}, {_human(free)} free on its disk; free "
                         f"some space (or write elsewhere), then rerun the same command")
    return None


def _atomic(path, write, size: int | None = None, replace: bool = True):
    """Write through a temporary file, then commit it under its real name: os.replace, or with
    replace=False os.link, which refuses a name that exists. `size`, the bytes the file will take,
    turns a full disk into one line before anything is written."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if size is not None and shutil.disk_usage(path.parent).free < size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if _fault("write"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(tmp)
        _commit(os.replace if replace else os.link, tmp, path)
    except FileExistsError:
        raise UsageError(f"{path} exists and is never overwritten; choose another path") from None
    except (OSError, RuntimeError) as e:
        raise _disk_error(path, size, e) or e
    finally:
        if os.path.lexists(tmp):  # (unlink of a missing name fails on a read-only disk)
            tmp.unlink()


def load_weights(path, device="cpu", mmap: bool = False) -> dict:
    """torch.load with weights_only: anything but plain tensors (a pickled object, a damaged file)
    is refused in one line. mmap: tensors backed by the file (pages read when touched)."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, a damaged zip, a missing file: one answer
        raise UsageError(f"{path} is not a q0 weights file that loads safely ({type(e).__name__}); move it away "
                         f"and rerun the command that wrote it") from None
def _tensor_bytes(obj) -> int:
    """What torch.save of obj takes on disk, generously: tensor payloads plus record overheads."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size() + 512
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values()) + 64
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj) + 64
    return 64


def _canonical(obj):
    """The same values as the same bytes. pickle writes a string or tuple once and then refers to
    it by identity, so an optimizer state loaded from a checkpoint (fresh key strings) pickled
    differently from one built in this process (interned literals): strings interned, containers
    rebuilt unshared, torch.save's output depends on the values alone."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def atomic_torch_save(obj, path):
    obj = _canonical(obj)
    _atomic(path, lambda tmp: torch.save(obj, tmp), size=_tensor_bytes(obj) + 65536)


def atomic_write_text(path, text: str, replace: bool = True):
    _atomic(path, lambda tmp: tmp.write_text(text), size=len(text.encode()), replace=replace)


def atomic_save_npy(path, array: np.ndarray):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    _atomic(path, write, size=array.nbytes + 4096)


def _lock(fd: int, exclusive_range: tuple[int, int] | None) -> bool:
    """A POSIX record lock on [start, start+length) (length 0: to the end of the file and beyond),
    released by the kernel when the process dies; False if another process holds part of it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, exclusive_range[1], exclusive_range[0])
        return True
    except OSError:
        return False


class RunLock:
    """One writer per run folder. Every process of a trainer holds its own 16-byte slot of
    <run>/.lock (its pid written there) for its whole life; the first rank takes the whole file
    at once before keeping slot 0, so it fails while any process of another trainer is alive
    (torchrun's workers can outlive a kill of torchrun itself). A dead writer holds nothing."""

    SLOT = 16

    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        whole = (0, 0) if rank == 0 else (rank * self.SLOT, self.SLOT)
        if not _lock(self.fd, whole):
            pids = self.holders()
            os.close(self.fd)
            raise UsageError(f"{run_dir} is in use by another trainer (pid {', '.join(pids) or 'unknown'}); "
                             f"wait for it to finish or stop it, then rerun")
        if rank == 0:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 0, self.SLOT)  # keep slot 0 only
        os.pwrite(self.fd, f"{os.getpid():>{self.SLOT - 1}}\n".encode(), rank * self.SLOT)

    def holders(self) -> list[str]:
        """The pids written in the slots that another process holds now."""
        raw = os.pread(self.fd, 1 << 20, 0)
        out = []
        for i in range(0, max(1, len(raw) // self.SLOT)):
            if _lock(self.fd, (i * self.SLOT, self.SLOT)):
                fcntl.lockf(self.fd, fcntl.LOCK_UN, self.SLOT, i * self.SLOT)
            else:
                out.append(raw[i * self.SLOT:(i + 1) * self.SLOT].decode(errors="replace").strip() or "?")
        return out


def claim_output(path) -> int:
    """Hold `path` for this process until it exits: an flock on the file's temporary name, which
    a second fit_prior.py or eval.py writing the same file meets at once. Returns the fd (keep it)."""
    tmp = _tmp_name(Path(path))
    tmp.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UsageError(f"{path} is being written by another process; wait for it to finish") from None
    return fd


# =============================================================================================
# Collectives: every one goes through these, on the device its group's backend takes
# =============================================================================================
# NCCL takes CUDA tensors only, gloo takes CPU tensors. Each helper looks the group's backend up
# by the device type the group serves and hands it the tensor on the device that backend takes,
# so no caller can give NCCL a host tensor (the crash this prevents: an all_reduce of a CPU tensor
# under NCCL raises "No backend type associated with device type cpu"). The tests run them in a
# "cuda:gloo" group, which refuses CPU tensors through torch.distributed's own calls as NCCL does,
# so a collective that bypasses these fails there.
# Pinned torch internals (torch 2.5 to 2.13): ProcessGroup._device_types, ProcessGroup._get_backend
# and the backend objects' allreduce / allgather / alltoall_base returning a Work.

def group_backend(group=None):
    """(backend, device it takes) of a process group (None: the world)."""
    group = group if group is not None else dist.group.WORLD
    types = [d.type for d in group._device_types]
    backend = group._get_backend(torch.device("cuda" if "cuda" in types else types[0]))
    if "NCCL" in type(backend).__name__:
        return backend, torch.device("cuda", torch.cuda.current_device())
    return backend, torch.device("cpu")


def all_reduce_(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `t` over the group, in place; `t` may live anywhere."""
    backend, device = group_backend(group)
    x = t if t.device == device else t.to(device)
    backend.allreduce([x]).wait()
    if x is not t:
        t.copy_(x)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape everywhere), in rank order, on `t`'s device."""
    backend, device = group_backend(group)
    x = t.contiguous() if t.device == device else t.to(device).contiguous()
    out = [torch.empty_like(x) for _ in range(backend.size())]
    backend.allgather([out], [x]).wait()
    return out if t.device == device else [o.to(t.device) for o in out]


def all_to_all(parts: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """parts[j] (one shape for all) goes to group rank j; returns what each rank sent this one, in
    rank order, on the parts' device. gloo has no all-to-all: there every rank gathers all parts."""
    backend, device = group_backend(group)
    x = torch.stack(parts).to(device)                                   # (W, ...)
    if "NCCL" in type(backend).__name__:
        out = torch.empty_like(x)
        backend.alltoall_base(out, x, [], []).wait()  # equal splits along dim 0
        received = out.unbind(0)
    else:
        received = [p[dist.get_rank(group)] for p in all_gather(x, group)]
    return [r.to(parts[0].device) for r in received]


def barrier(group=None):
    """A barrier that is an all_reduce of one number, so it runs wherever all_reduce_ does."""
    all_reduce_(torch.zeros(1), group)


# =============================================================================================
# Data: one shard format, plus the two formats Slowrun and modded-nanogpt users have on disk
# =============================================================================================
# data/shards.py writes .q0t (README, "The shard format"); this is the reader. Little-endian:
#   0 magic b"Q0TOKENS" | 8 u32 version | 12 u32 bytes per token (2 or 4) | 16 u64 num_tokens
#   24 u32 vocab_size | 28 u32 bos_id | 32 u64 num_docs | 40 u64 text_bytes (UTF-8 bytes of the
#   documents) | 48 32s tokenizer name | 80 32s sha256 of the token payload
# version 1: the payload follows the 256-byte header.
# version 2: 112 32s sha256 of the metadata block | 144 u64 payload offset | 152 u32 command
#   length; at 256 the metadata block: vocab_size x u16 UTF-8 bytes of each token id (BOS 0, what
#   bits per byte divides by), then the command that rebuilds the file; the payload at the offset.
# Every document starts with bos_id, so document boundaries are recoverable from tokens alone.

SHARD_MAGIC, SHARD_VERSIONS, SHARD_HEADER_BYTES = b"Q0TOKENS", (1, 2), 256
_SHARD_STRUCT = struct.Struct("<8sIIQIIQQ32s32s32sQI")
MODDED_MAGIC, MODDED_VERSION = 20240520, 1
# The commands that build the default --data-dir of each preset: named when that folder is empty.
DEFAULT_DATA_COMMANDS = {"data/shakespeare/bytes": "python data/shakespeare.py --tokenizer bytes",
                         "data/shakespeare/gpt2": "python data/shakespeare.py --tokenizer gpt2",
                         "data/fineweb": "python data/fineweb.py"}


class DataError(UsageError):
    pass


def _rebuild_hint(path, recorded: str | None = None) -> str:
    """The command that rebuilds a data file: the one it (or the manifest beside it) records, or,
    for a folder with neither, the data command that makes such a folder."""
    if recorded:
        return recorded
    folder = Path(path) if Path(path).is_dir() or not Path(path).suffix else Path(path).parent
    try:
        return json.loads((folder / "manifest.json").read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for default, command in DEFAULT_DATA_COMMANDS.items():
        if folder.resolve() == (REPO_ROOT / default).resolve() or folder == Path(default):
            return command
    if Path(path).suffix in (".pt", ".bin"):  # FineWeb in Slowrun's or modded-nanogpt's layout
        return "python data/fineweb.py"
    return f"python data/text.py YOUR_TEXT --tokenizer bytes --out {folder}"


@dataclasses.dataclass
class TokenFile:
    tokens: np.ndarray
    vocab_size: int
    bos_id: int
    tokenizer: str
    text_bytes: int | None  # None: not recorded by the format
    path: str
    format: str
    token_bytes: np.ndarray | None = None  # UTF-8 bytes of every token id (BOS 0); None: not recorded
    command: str | None = None             # the command that rebuilds the file, as recorded in it


def _read_q0t(path: Path) -> TokenFile:
    raw = path.read_bytes()
    if len(raw) < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes); rebuild it with: {_rebuild_hint(path)}")
    magic, version, tok_bytes, n, vocab, bos, _docs, text_bytes, tok_name, digest, meta_digest, offset, cmd_len = \
        _SHARD_STRUCT.unpack_from(raw)
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: not a q0 token shard (bad magic); rebuild it with: {_rebuild_hint(path)}")
    if version not in SHARD_VERSIONS:
        raise DataError(f"{path}: shard version {version}, this code reads versions 1 and 2; "
                        f"rebuild it with: {_rebuild_hint(path)}")
    token_bytes, command = None, None
    if version == 1:
        offset = SHARD_HEADER_BYTES
    else:
        meta = memoryview(raw)[SHARD_HEADER_BYTES:offset]
        if offset > len(raw) or 2 * vocab + cmd_len > len(meta) or hashlib.sha256(meta).digest() != meta_digest:
            raise DataError(f"{path}: metadata do not match the SHA-256 in the header (corrupted or truncated); "
                            f"rebuild it with: {_rebuild_hint(path)}")
        token_bytes = np.frombuffer(raw, dtype="<u2", count=vocab, offset=SHARD_HEADER_BYTES).astype(np.int64)
        command = bytes(meta[2 * vocab:2 * vocab + cmd_len]).decode("utf-8", errors="replace")
    hint = _rebuild_hint(path, command)
    if tok_bytes not in (2, 4) or len(raw) != offset + n * tok_bytes:
        raise DataError(f"{path}: size {len(raw)} bytes does not match the header's {n} tokens "
                        f"(truncated?); rebuild it with: {hint}")
    tok_name = tok_name.rstrip(b"\0").decode("ascii", errors="replace")
    if hashlib.sha256(memoryview(raw)[offset:]).digest() != digest:
        raise DataError(f"{path}: tokens do not match the SHA-256 in the header (corrupted); rebuild it with: {hint}")
    if version == 1 and tok_name == "bytes":  # one byte per id but BOS, by the tokenizer's definition
        token_bytes = np.ones(vocab, dtype=np.int64)
        token_bytes[bos] = 0
    tokens = np.frombuffer(raw, dtype=np.uint16 if tok_bytes == 2 else np.uint32, offset=offset)
    return TokenFile(tokens, vocab, bos, tok_name, text_bytes, str(path), "q0", token_bytes, command)


def _read_modded_bin(path: Path) -> TokenFile:
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header.size < 256 or header[0] != MODDED_MAGIC or header[1] != MODDED_VERSION:
        raise DataError(f"{path}: not a modded-nanogpt shard (magic {MODDED_MAGIC}, version 1); "
                        f"rebuild it with: {_rebuild_hint(path)}")
    n = int(header[2])
    tokens = np.fromfile(path, dtype=np.uint16, offset=256 * 4)
    if tokens.size != n:
        raise DataError(f"{path}: holds {tokens.size} tokens, header says {n} (truncated?); "
                        f"rebuild it with: {_rebuild_hint(path)}")
    return TokenFile(tokens, 50257, 50256, "gpt2", None, str(path), "modded")


def _read_slowrun_pt(path: Path) -> TokenFile:
    try:
        d = torch.load(path, weights_only=True, map_location="cpu")
        tokens = d["tokens"].numpy() if torch.is_tensor(d["tokens"]) else np.asarray(d["tokens"])
        bos = int(d.get("bos_id", 50256))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise DataError(f"{path}: not a readable Slowrun token file ({type(e).__name__}); "
                        f"rebuild it with: {_rebuild_hint(path)}") from None
    return TokenFile(tokens, int(d.get("vocab_size", 50257)), bos, "gpt2", None, str(path), "slowrun")


def read_tokens(path, expect_vocab: int | None = None) -> TokenFile:
    """Read any of the three formats, check it, and fail with one line that names the fix."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found; build it with: {_rebuild_hint(path)}")
    if path.suffix == ".pt":
        tf = _read_slowrun_pt(path)
    elif path.suffix == ".bin":
        tf = _read_modded_bin(path)
    else:
        tf = _read_q0t(path)
    hint = _rebuild_hint(path, tf.command)
    if expect_vocab is not None and tf.vocab_size != expect_vocab:
        raise DataError(f"{path}: vocabulary {tf.vocab_size} does not match the model's {expect_vocab}; "
                        f"rebuild the data with the model's tokenizer ({hint})")
    if tf.tokens.size < 2 or int(tf.tokens.max()) >= tf.vocab_size:
        raise DataError(f"{path}: token ids outside the vocabulary of {tf.vocab_size}, or fewer than 2 tokens; "
                        f"rebuild it with: {hint}")
    return tf


def find_split(data_dir, split: str) -> list[Path]:
    """The file(s) of one split in any of the three layouts, ours first."""
    d = Path(data_dir)
    for candidate in (d / f"{split}.q0t", d / f"fineweb_{split}.pt"):
        if candidate.exists():
            return [candidate]
    modded = sorted(d.glob(f"*_{split}_*.bin"))
    if modded:
        return modded
    if d.is_dir() and any(p.suffix in (".txt", ".md", ".jsonl") for p in d.iterdir()):
        raise DataError(f"{d} holds text, not token shards; make them with: python data/text.py {d} "
                        f"--tokenizer bytes --out {d}-q0, then pass --data-dir {d}-q0")
    raise DataError(f"no {split} data in {d} (looked for {split}.q0t, fineweb_{split}.pt, *_{split}_*.bin); "
                    f"build it with: {_rebuild_hint(d)}")


def load_split(data_dir, split: str) -> TokenFile:
    files = [read_tokens(p) for p in find_split(data_dir, split)]
    first = files[0]
    for f in files[1:]:
        if (f.vocab_size, f.tokenizer) != (first.vocab_size, first.tokenizer):
            raise DataError(f"{f.path}: tokenizer differs from {first.path}; rebuild with {_rebuild_hint(f.path)}")
    if len(files) == 1:
        return first
    text = None if any(f.text_bytes is None for f in files) else sum(f.text_bytes for f in files)
    return dataclasses.replace(first, tokens=np.concatenate([f.tokens for f in files]), text_bytes=text,
                               path=",".join(f.path for f in files))


def doc_starts(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    starts = np.flatnonzero(tokens == bos_id)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return starts


def carve_fitness(tokens: np.ndarray, bos_id: int, fitness_tokens: int):
    """Split whole documents off the front of the training stream: (fitness, train).

    The fitness set is identical for every member and never trained on; it is where the prior is
    fitted, so it must not be the validation set.
    """
    starts = np.append(doc_starts(tokens, bos_id), tokens.size)
    cut_index = int(np.searchsorted(starts, fitness_tokens, side="left"))
    if cut_index >= starts.size - 1:
        raise UsageError(f"the fitness set (--fitness-tokens {fitness_tokens}, whole documents) would take all "
                         f"{tokens.size} training tokens; lower --fitness-tokens")
    cut = int(starts[max(cut_index, 1)])
    return tokens[:cut], tokens[cut:]


class TrainStream:
    """An endless stream of training tokens: epoch e is the documents in a permutation seeded by
    (seed, base, e), concatenated. A step's global batch is `rows` windows of seq_len+1 tokens with
    stride seq_len from a stream position, so it never depends on the number of processes, and the
    stream position alone (no hidden state) says where a resumed run continues."""

    def __init__(self, tokens: np.ndarray, bos_id: int, seed: int, base: int):
        self.tokens, self.seed, self.base = tokens, seed, base
        starts = doc_starts(tokens, bos_id)
        self.doc_bounds = np.stack([starts, np.append(starts[1:], tokens.size)], axis=1)
        self._epochs: dict[int, np.ndarray] = {}

    def __len__(self):
        return self.tokens.size

    def epoch(self, e: int) -> np.ndarray:
        if e not in self._epochs:
            order = np.random.default_rng([self.seed, self.base, e]).permutation(len(self.doc_bounds))
            self._epochs = {k: v for k, v in self._epochs.items() if k == e - 1}  # keep two epochs
            self._epochs[e] = np.concatenate([self.tokens[s:t] for s, t in self.doc_bounds[order]])
        return self._epochs[e]

    def window(self, pos: int, length: int) -> np.ndarray:
        parts, n = [], len(self)
        while length > 0:
            e, off = divmod(pos, n)
            piece = self.epoch(e)[off:off + length]
            parts.append(piece)
            pos, length = pos + piece.size, length - piece.size
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def batch(self, pos: int, rows: int, seq_len: int) -> np.ndarray:
        return np.stack([self.window(pos + r * seq_len, seq_len + 1) for r in range(rows)]).astype(np.int64)


# =============================================================================================
# Attention: causal, optionally in a sliding window
# =============================================================================================
# Query i sees key j iff 0 <= i - j <= window (the reference's convention; window >= T - 1 is
# plain causal). On CUDA, FlexAttention with a block mask: a window skips the blocks it masks
# out and runs a fused kernel, where a boolean SDPA mask rules out the flash kernels and does the
# whole square. SDPA is the CPU path and the fallback (--attention sdpa); torch has no CPU
# backward for FlexAttention, so the CPU tests compare its forward only.

ATTENTION_KERNELS = ("auto", "flex", "sdpa")
_kernels = {"attention": "auto", "autocast": "auto"}  # set once by main() from --attention, --autocast


def set_kernels(attention: str = "auto", autocast: str = "auto"):
    _kernels.update(attention=attention, autocast=autocast)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention of (B, H, T, D) tensors; query i sees keys i - window .. i."""
    kernel = _kernels["attention"]
    if kernel == "flex" or (kernel == "auto" and q.is_cuda):
        return flex_attend(q, k, v, window)
    return sdpa_attend(q, k, v, window)


def sdpa_attend(q, k, v, window: int) -> torch.Tensor:
    T = q.size(-2)
    if window >= T - 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    i = torch.arange(T, device=q.device)
    distance = i[:, None] - i[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(distance >= 0) & (distance <= window))


def _window_block_mask(T: int, window: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return create_block_mask(visible, None, None, T, T, device=device)


@functools.lru_cache(maxsize=None)
def _cached_block_mask(T: int, window: int, device: str):
    return _window_block_mask(T, window, device)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q, k, v, window: int) -> torch.Tensor:
    """FlexAttention; inside a compiled model it is traced (mask build included) into the graph,
    called eagerly it runs the compiled kernel with a block mask built once per shape."""
    T = q.size(-2)
    if torch.compiler.is_compiling():
        from torch.nn.attention.flex_attention import flex_attention
        return flex_attention(q, k, v, block_mask=_window_block_mask(T, window, q.device))
    return _compiled_flex_attention()(q, k, v, block_mask=_cached_block_mask(T, window, str(q.device)))


# =============================================================================================
# Model: the Slowrun GPT (the record's architecture, unlimited/train.py at a200723)
# =============================================================================================
# SwiGLU MLP; separate q, k, v projections with interleaved head attention (IHA: learned
# head-mixing matrices, fused into the projection weights); RoPE then QK RMS-norm; a per-head
# sigmoid gate on the attention output read from 12 input channels; value embeddings (a
# projection of x0) added to v on every other layer through a per-head gate read from 32
# channels; U-Net skips; learned residual and x0 scalars before every block application; a
# middle block of decoder layers looped (run 1 + loop_repeats times); logits soft-capped at
# 15*tanh(z/15); an untied head over the vocabulary padded to a multiple of 64; sliding windows in
# a short-short-short-long pattern (the last layer long); and a multi-token-prediction (MTP) loss
# through one extra block and the shared head.

GATE_CHANNELS = 12        # the attention output gate reads x[..., :12]
VALUE_GATE_CHANNELS = 32  # the value-embedding gate reads x[..., :32]


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int                # the tokenizer's; embedding and head are padded to a multiple of 64
    n_layer: int                   # blocks; the first n_layer // 2 form the U-Net encoder
    d_model: int                   # residual width
    n_head: int                    # attention heads of d_model // n_head channels
    mlp_hidden: int                # SwiGLU hidden width (the record: 5632 = 256 * ceil(8 * 2048 / 3 / 256))
    seq_len: int                   # training context; RoPE tables are built for it
    short_window: int              # S layers: a query sees itself and this many earlier tokens
    dropout: float = 0.0           # on the attention and MLP outputs (0.1 in the record)
    window_pattern: str = "SSSL"   # per layer, repeated; the last layer is always long
    logit_softcap: float = 15.0    # logits = cap * tanh(z / cap)
    loop_start: int = 0            # decoder layers [loop_start, loop_end) run 1 + loop_repeats times
    loop_end: int = 0              # (loop_end = loop_start: no looping)
    loop_repeats: int = 4
    iha: bool = True               # interleaved head attention (q, k and v head mixing)
    mtp_weight: float = 0.0        # weight of the multi-token-prediction loss (0: no MTP block)
    zero_out_init: bool = False    # modded-nanogpt's init: output projections and head 0, x0 scalars 0

    @property
    def padded_vocab(self) -> int:
        return (self.vocab_size + 63) // 64 * 64

    @property
    def encoder_layers(self) -> int:
        return self.n_layer // 2

    def window(self, layer: int) -> int:
        """Earlier tokens a query of `layer` sees (the MTP block, layer n_layer, is long too)."""
        long = layer >= self.n_layer - 1 or self.window_pattern[layer % len(self.window_pattern)] == "L"
        return self.seq_len if long else self.short_window

    def decoder_order(self) -> list[int]:
        """Decoder layers in the order they run: up to the loop's end, the loop again
        `loop_repeats` times, then the rest (the record: 15-24, 4 x 15-24, 25-29)."""
        n, s, e = self.n_layer, self.loop_start, self.loop_end
        if e <= s:
            return list(range(self.encoder_layers, n))
        return list(range(self.encoder_layers, e)) + list(range(s, e)) * self.loop_repeats + list(range(e, n))

    def check(self):
        """Shapes the model cannot take: one line that names the flag."""
        if self.n_head < 1 or self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise UsageError(f"--d-model {self.d_model} must split into --n-head {self.n_head} heads of even size")
        if self.d_model < VALUE_GATE_CHANNELS:
            raise UsageError(f"--d-model {self.d_model}: the value-embedding gate reads {VALUE_GATE_CHANNELS} "
                             f"channels; use a width of at least {VALUE_GATE_CHANNELS}")
        if self.loop_end > self.loop_start and not (
                self.encoder_layers <= self.loop_start < self.loop_end <= self.n_layer):
            raise UsageError(f"--loop-layers {self.loop_start} {self.loop_end}: the looped block must lie in the "
                             f"decoder, layers {self.encoder_layers} to {self.n_layer} of --n-layer {self.n_layer}")


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE, (seq_len, head_dim / 2), rounded to bf16 as the record's model uses them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos().bfloat16().float(), angles.sin().bfloat16().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of every head: x (B, T, H, D), cos/sin (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)                                    # (B, T, H, D/2) each
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, D/2)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def mixed_heads(weight: torch.Tensor, mix: torch.Tensor | None) -> torch.Tensor:
    """IHA: head h of the projection becomes sum_g mix[h, g] * head g, fused into the weight."""
    if mix is None:
        return weight
    H = mix.size(0)
    return (mix @ weight.view(H, -1)).view_as(weight)              # (H, D/H * C) -> (D, C)


MTP_SITE = 1 << 20  # the MTP block's dropout site, apart from every block application's


def _splitmix(h: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (multiplies wrap; the shifts are masked to act as
    logical shifts): a counter-based generator made of tensor ops, so torch.compile traces it."""
    h = (h ^ ((h >> 30) & ((1 << 34) - 1))) * -4658895280553007687   # 0xbf58476d1ce4e5b9
    h = (h ^ ((h >> 27) & ((1 << 37) - 1))) * -7723592293110705685   # 0x94d049bb133111eb
    return h ^ ((h >> 31) & ((1 << 33) - 1))


def row_dropout(x: torch.Tensor, p: float, training: bool, seeds: torch.Tensor | None, site: int) -> torch.Tensor:
    """Dropout whose mask for row b is a function of (seeds[b], site, element): the same sequence
    of the global batch gets the same mask whatever micro-batch or process it lands on, so
    --device-batch and --groups are placement flags. Without seeds, ordinary F.dropout."""
    if not training or p == 0:
        return x
    if seeds is None:
        return F.dropout(x, p, True)
    B = x.size(0)
    # (B, n) keys: the row's mixed seed + site * 2^32 + element, so rows' counters lie 2^64-randomly
    # apart. No constant multiplies the element index: inductor's index arithmetic (exact
    # integers) never leaves int64.
    counter = site * (1 << 32) + torch.arange(x[0].numel(), device=x.device, dtype=torch.int64)  # (n,)
    key = _splitmix(seeds.view(B, 1)) + counter
    u = ((_splitmix(key) >> 40) & 0xFFFFFF).to(torch.float32) * 2.0 ** -24   # 24 uniform bits, [0, 1)
    keep = (u >= p).view(x.shape)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        d, h = cfg.d_model, cfg.n_head
        self.n_head, self.head_dim, self.dropout = h, d // h, cfg.dropout
        self.window = cfg.window(layer)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.proj = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(GATE_CHANNELS, h, bias=False)
        has_value_embed = layer < cfg.n_layer and layer % 2 == (cfg.n_layer - 1) % 2  # the last layer has one
        self.value_embed = nn.Linear(d, d, bias=False) if has_value_embed else None   # of x0
        self.value_gate = nn.Linear(VALUE_GATE_CHANNELS, h, bias=False) if has_value_embed else None
        self.q_mix, self.k_mix, self.v_mix = ((nn.Parameter(torch.eye(h)) for _ in range(3)) if cfg.iha
                                              else (None, None, None))

    def forward(self, x: torch.Tensor, x0: torch.Tensor, rope, seeds=None, site: int = 0) -> torch.Tensor:
        B, T, D = x.shape                                          # x: the normed block input
        H, hd = self.n_head, self.head_dim
        q = F.linear(x, mixed_heads(self.q.weight, self.q_mix)).view(B, T, H, hd)
        k = F.linear(x, mixed_heads(self.k.weight, self.k_mix)).view(B, T, H, hd)
        v = F.linear(x, mixed_heads(self.v.weight, self.v_mix)).view(B, T, H, hd)
        if self.value_embed is not None:
            gate = 2 * torch.sigmoid(self.value_gate(x[..., :VALUE_GATE_CHANNELS]))  # (B, T, H)
            v = v + gate.unsqueeze(-1) * self.value_embed(x0).view(B, T, H, hd)
        cos, sin = rope
        q, k = norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin))
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.window)  # (B, H, T, hd)
        y = y.transpose(1, 2) * torch.sigmoid(self.gate(x[..., :GATE_CHANNELS])).unsqueeze(-1)  # (B, T, H, hd)
        return row_dropout(self.proj(y.reshape(B, T, D)), self.dropout, self.training, seeds, site)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, seeds=None, site: int = 0) -> torch.Tensor:
        return row_dropout(self.down(F.silu(self.gate(x)) * self.up(x)), self.dropout, self.training, seeds, site)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, x0: torch.Tensor, rope, seeds=None, site: int = 0) -> torch.Tensor:
        """site: which block application this is (dropout masks differ per application)."""
        x = x + self.attn(norm(x), x0, rope, seeds, 2 * site)
        return x + self.mlp(norm(x), seeds, 2 * site + 1)


def capped_logits(x: torch.Tensor, head_weight: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """The head over the real vocabulary, soft-capped, in float32 (GPT.logits, and a teacher's head)."""
    z = F.linear(x, head_weight)[..., :cfg.vocab_size].float()
    return cfg.logit_softcap * torch.tanh(z / cfg.logit_softcap)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.n_layer
        self.embed = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(n))
        self.head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        self.resid_scale = nn.Parameter(torch.ones(n))     # x <- resid_scale[i] * x + x0_scale[i] * x0
        self.x0_scale = nn.Parameter(torch.full((n,), 0.1))
        self.skip_scale = nn.Parameter(torch.ones(cfg.encoder_layers))  # U-Net: weight of encoder output j
        if cfg.mtp_weight > 0:
            self.mtp_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
            self.mtp_block = Block(cfg, n)
        cos, sin = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_blocks = False  # recompute each block application in backward (saves memory)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The record's init: inputs U(+-sqrt(3/d)), output projections N(0, 1/sqrt(d)), gates 0,
        head mixing identity, head N(0, 0.001), embedding N(0, 1), x0 scalars 0.1."""
        bound, std = 3 ** 0.5 * self.cfg.d_model ** -0.5, self.cfg.d_model ** -0.5
        nn.init.normal_(self.embed.weight)
        nn.init.normal_(self.head.weight, std=0.001)
        for block in list(self.blocks) + ([self.mtp_block] if self.cfg.mtp_weight > 0 else []):
            a, m = block.attn, block.mlp
            for w in (a.q.weight, a.k.weight, a.v.weight, m.gate.weight, m.up.weight):
                nn.init.uniform_(w, -bound, bound)
            for w in (a.proj.weight, m.down.weight):
                nn.init.zeros_(w) if self.cfg.zero_out_init else nn.init.normal_(w, std=std)
            nn.init.zeros_(a.gate.weight)
            if a.value_embed is not None:
                nn.init.uniform_(a.value_embed.weight, -bound, bound)
                nn.init.zeros_(a.value_gate.weight)
            for mix in (a.q_mix, a.k_mix, a.v_mix):
                if mix is not None:
                    mix.copy_(torch.eye(mix.size(0)))
        if self.cfg.mtp_weight > 0:
            nn.init.uniform_(self.mtp_proj.weight, -bound, bound)
        if self.cfg.zero_out_init:
            nn.init.zeros_(self.head.weight)
        self.resid_scale.fill_(1.0)
        self.x0_scale.fill_(0.0 if self.cfg.zero_out_init else 0.1)
        self.skip_scale.fill_(1.0)

    def _layer(self, i: int, x: torch.Tensor, x0: torch.Tensor, rope, seeds, site: int) -> torch.Tensor:
        """One block application, the residual/x0 mix before it (applied on every pass)."""
        x = self.resid_scale[i] * x + self.x0_scale[i] * x0
        if self.checkpoint_blocks and self.training:
            return torch.utils.checkpoint.checkpoint(self.blocks[i], x, x0, rope, seeds, site, use_reentrant=False)
        return self.blocks[i](x, x0, rope, seeds, site)

    def hidden(self, idx: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """The normed final hidden states (B, T, D): an encoder that keeps its outputs, then the
        decoder (looped block included) that adds encoder output n-1-i before layer i."""
        T, n = idx.size(1), self.cfg.n_layer
        rope = (self.rope_cos[:T], self.rope_sin[:T])
        x0 = norm(self.embed(idx))
        x, skips = x0, []
        for i in range(self.cfg.encoder_layers):
            x = self._layer(i, x, x0, rope, seeds, site=i)
            skips.append(x)
        for site, i in enumerate(self.cfg.decoder_order(), start=self.cfg.encoder_layers):
            if n - 1 - i < len(skips):
                x = x + self.skip_scale[n - 1 - i] * skips[n - 1 - i]
            x = self._layer(i, x, x0, rope, seeds, site)
        return norm(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Soft-capped logits over the real vocabulary, in float32."""
        # the head's weight, not the module: the chunked loss calls this outside forward(), where a
        # module call would read as a new iteration to the preflight's memory tracker
        return capped_logits(x, self.head.weight, self.cfg)

    def mtp_loss(self, x: torch.Tensor, targets: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Predict token t+2 from the hidden state at t and the embedding of token t+1, through
        the MTP block (long window, no value embedding) and the shared head."""
        T = x.size(1) - 1
        nxt = norm(self.embed(targets[:, :-1]))                          # (B, T-1, D)
        h = self.mtp_proj(torch.cat([x[:, :-1], nxt], dim=-1))           # (B, T-1, 2D) -> (B, T-1, D)
        h = norm(self.mtp_block(h, h, (self.rope_cos[:T], self.rope_sin[:T]), seeds, site=MTP_SITE))
        return chunked_distillation_loss(self, h, targets[:, 1:])  # logits a chunk of tokens at a time

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, hidden: bool = False,
                seeds: torch.Tensor | None = None):
        """Logits (B, T, V); with targets, (logits, MTP loss or 0). hidden=True gives the normed
        hidden states in place of the logits: the training loss and the evaluation make the
        logits from them a chunk of tokens at a time (chunked_distillation_loss, token_probs).
        seeds (int64, one per row): dropout masks drawn from each row's own seed (row_dropout)."""
        x = self.hidden(idx, seeds)
        out = x if hidden else self.logits(x)
        if targets is None:
            return out
        mtp = self.mtp_loss(x, targets, seeds) if self.cfg.mtp_weight > 0 else x.new_zeros((), dtype=torch.float32)
        return out, mtp


def slowrun_config(ref: dict) -> GPTConfig:
    """Our GPTConfig for the reference's GPTConfig fields (plus `dupe_layers`: [start, end] or None)."""
    if ref.get("n_kv_head", ref["n_head"]) != ref["n_head"]:
        raise UsageError(f"n_kv_head {ref['n_kv_head']} != n_head {ref['n_head']}: q0's model has no grouped-query "
                         f"attention (the record does not use it)")
    d, T = ref["n_embd"], ref["sequence_len"]
    loop = ref.get("dupe_layers") or (0, 0)
    return GPTConfig(vocab_size=ref["vocab_size"], n_layer=ref["n_layer"], d_model=d, n_head=ref["n_head"],
                     mlp_hidden=256 * ((8 * d // 3 + 255) // 256), seq_len=T, short_window=T // 2,
                     dropout=ref.get("dropout", 0.0), window_pattern=ref.get("window_pattern", "SSSL").upper(),
                     loop_start=loop[0], loop_end=loop[1], iha=bool(ref.get("use_iha", False)),
                     mtp_weight=float(ref.get("mtp_weight", 0.0)))


_SLOWRUN_NAMES = [  # (reference name pattern, ours) - block-level names under transformer.h.{i}.
    ("attn.c_q.weight", "attn.q.weight"), ("attn.c_k.weight", "attn.k.weight"),
    ("attn.c_v.weight", "attn.v.weight"), ("attn.c_proj.weight", "attn.proj.weight"),
    ("attn.attn_gate.weight", "attn.gate.weight"), ("attn.ve_gate.weight", "attn.value_gate.weight"),
    ("attn.q_mix", "attn.q_mix"), ("attn.k_mix", "attn.k_mix"), ("attn.v_mix", "attn.v_mix"),
    ("mlp.c_gate.weight", "mlp.gate.weight"), ("mlp.c_fc.weight", "mlp.up.weight"),
    ("mlp.c_proj.weight", "mlp.down.weight"),
]


def from_slowrun(state_dict: dict, config: dict) -> GPT:
    """Our GPT holding a snapshot saved by the reference (`model_{i}.pt`), for its configuration
    given as the reference's GPTConfig fields plus `dupe_layers` ([start, end] or None)."""
    cfg = slowrun_config(config)
    cfg.check()
    model = GPT(cfg)
    model.load_state_dict(slowrun_state_dict(state_dict, cfg, iha_mix_v=config.get("iha_mix_v", True)))
    return model


def slowrun_state_dict(state_dict: dict, cfg: GPTConfig, iha_mix_v: bool = True) -> dict:
    """The reference's parameter names and layouts renamed to ours (fp32), checked both ways."""
    with torch.device("meta"):
        names = {n: p.shape for n, p in GPT(cfg).named_parameters()}
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state_dict.items()}
    ours = {"embed.weight": sd.pop("transformer.wte.weight"), "head.weight": sd.pop("lm_head.weight"),
            "resid_scale": sd.pop("resid_lambdas"), "x0_scale": sd.pop("x0_lambdas"),
            # the reference indexes skip weights by decoder position i - n/2, ours by encoder layer n-1-i
            "skip_scale": sd.pop("skip_weights").flip(0)}
    if cfg.n_layer % 2:
        raise UsageError(f"n_layer {cfg.n_layer}: the reference's U-Net needs an even layer count")
    prefixes = [(f"transformer.h.{i}.", f"blocks.{i}.") for i in range(cfg.n_layer)] + [("mtp_block.", "mtp_block.")]
    for ref_prefix, our_prefix in prefixes:
        for ref_name, our_name in _SLOWRUN_NAMES:
            if ref_prefix + ref_name in sd:
                ours[our_prefix + our_name] = sd.pop(ref_prefix + ref_name)
    for i in range(cfg.n_layer):
        if f"ve_projs.{i}.weight" in sd:
            ours[f"blocks.{i}.attn.value_embed.weight"] = sd.pop(f"ve_projs.{i}.weight")
    if "mtp_proj.weight" in sd:
        ours["mtp_proj.weight"] = sd.pop("mtp_proj.weight")
    if cfg.iha and not iha_mix_v:  # v unmixed: the identity mixes exactly that
        for name, shape in names.items():
            if name.endswith("attn.v_mix"):
                ours[name] = torch.eye(shape[0])
    if sd:
        raise UsageError(f"reference state dict has entries q0's model does not know: {sorted(sd)[:4]}; "
                         f"check the configuration given with it")
    missing = set(names) - set(ours)
    if missing:
        raise UsageError(f"reference state dict lacks {sorted(missing)[:4]}; check the configuration given with it")
    return {k: v.float() for k, v in ours.items()}


# =============================================================================================
# Optimiser: Muon for the block matrices, AdamW for embedding, head, scalars and head mixing
# =============================================================================================
# Muon, as the record runs it, on matrices stacked by shape: Nesterov momentum; MuonEq-R (each
# row of the update normalised); 5 Polar Express steps in bf16 (arXiv:2505.16932's
# coefficients); NorMuon (a running second moment along the reduction dimension rescales the
# update, keeping its norm); LR x sqrt(max(1, rows/cols)); cautious weight decay (only where the
# update and the weight agree in sign) scaled by that LR. The scalars it uses (momentum, beta2,
# LR, WD) meet the bf16 update in bf16, as in the record.

POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(G: torch.Tensor) -> torch.Tensor:
    """Approximate U V^T of every G = U S V^T in a stack (..., rows, cols), in bf16."""
    X = G.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # singular values start inside (0, 1)
    tall = G.size(-2) > G.size(-1)
    for a, b, c in POLAR_EXPRESS:
        if tall:  # the small Gram matrix: cols x cols
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    return X


def sharded_polar_express(G: torch.Tensor, group=None) -> torch.Tensor:
    """polar_express of a stack (n, rows, cols) with the work split over a process group: rank r
    orthogonalises matrices r*k .. (r+1)*k - 1 (k = ceil(n / ranks), the stack zero-padded), then
    an all-gather gives every rank the whole stack. Every matrix is orthogonalised on its own, so
    the result is the unsharded one; only 1/ranks of the FLOPs run on each rank."""
    if group is None:
        return polar_express(G)
    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    k = -(-G.size(0) // ranks)
    padded = torch.cat([G, G.new_zeros(k * ranks - G.size(0), *G.shape[1:])]) if k * ranks > G.size(0) else G
    mine = polar_express(padded[rank * k:(rank + 1) * k])
    return torch.cat(all_gather(mine, group))[:G.size(0)]


def muon_direction(grad, momentum_buf, moment_buf, momentum: float, beta2: float, eq_r: bool, normuon: bool,
                   group=None):
    """The update direction of a stack of matrices (n, rows, cols); advances both buffers. Every
    rank of `group` holds the same gradients (DDP averaged them), so all but the orthogonalisation
    runs everywhere and the state stays identical on every rank."""
    momentum_buf.lerp_(grad, 1 - momentum)
    g = grad.lerp(momentum_buf, momentum)                                   # Nesterov
    if eq_r:                                                                # MuonEq-R
        g = g / g.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(g.dtype)
    u = sharded_polar_express(g, group)
    if not normuon:
        return u
    reduce = -1 if u.size(-2) >= u.size(-1) else -2       # a moment per row (tall) or per column (wide)
    v_mean = u.float().square().mean(dim=reduce, keepdim=True)
    size = u.size(reduce)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * size).sqrt()
    moment_buf.lerp_(v_mean.to(moment_buf.dtype), 1 - torch.tensor(beta2, dtype=torch.bfloat16))
    step = moment_buf.clamp_min(1e-10).rsqrt()
    norm_after = ((v_mean * size) * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return u * (step * (norm_before / norm_after.clamp_min(1e-10))).to(u.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """One optimiser, two rules: groups with kind="muon" (matrices of one shape, stacked) and
    kind="adamw". Every group's "lr" and "weight_decay" are rewritten each step by the schedule
    from its "peak_lr" and "peak_wd"; the state is plain tensors and ints (weights_only)."""

    def __init__(self, groups, momentum=0.95, beta2=0.95, eq_r=True, normuon=True, cautious=True, eps=1e-10,
                 process_group=None):
        super().__init__(groups, dict(momentum=momentum, beta2=beta2, eq_r=eq_r, normuon=normuon,
                                      cautious=cautious, betas=(0.8, 0.95), eps=eps, weight_decay=0.0))
        self.process_group = process_group  # Muon's orthogonalisation is sharded over it (None: not)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                for p in group["params"]:
                    if p.grad is not None:
                        self._adamw(p, group)

    def _muon(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        state = self.state[params[0]]  # the stack's buffers live with its first matrix
        rows, cols = params[0].shape
        if not state:
            state["momentum"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype, device=params[0].device)
            state["moment"] = torch.zeros(len(params), rows, 1, dtype=params[0].dtype, device=params[0].device) \
                if rows >= cols else torch.zeros(len(params), 1, cols, dtype=params[0].dtype, device=params[0].device)
        P = torch.stack(params)                                         # (n, rows, cols)
        u = muon_direction(torch.stack([p.grad for p in params]), state["momentum"], state["moment"],
                           group["momentum"], group["beta2"], group["eq_r"], group["normuon"], self.process_group)
        lr = torch.tensor(group["lr"] * max(1.0, rows / cols) ** 0.5, dtype=u.dtype)
        wd = torch.tensor(group["weight_decay"], dtype=u.dtype)
        decay = lr * wd * P
        if group["cautious"]:
            decay = decay * ((u * P) >= 0)
        P.sub_(lr * u + decay)
        torch._foreach_copy_(params, list(P.unbind(0)))

    def _adamw(self, p, group):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t, (beta1, beta2), lr = state["step"], group["betas"], group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].lerp_(p.grad.square(), 1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))


def build_optimizer(model: GPT, args, process_group=None) -> MuonAdamW:
    """The record's groups. Muon: every block matrix (attention, MLP, gates, value embeddings,
    MTP), stacked by shape. AdamW: head and embedding (decayed like the matrices), residual and
    skip scalars at 0.01x the scalar LR, x0 scalars with betas (0.96, 0.95), IHA mixing (no decay)."""
    iha = [p for n, p in model.named_parameters() if n.endswith(("q_mix", "k_mix", "v_mix"))]
    special = {id(p) for p in iha} | {id(model.embed.weight), id(model.head.weight)}
    matrices = [p for p in model.parameters() if p.ndim == 2 and id(p) not in special]
    wd_embed = args.weight_decay if args.decay_embeddings else 0.0
    groups = [
        dict(kind="adamw", params=[model.head.weight], peak_lr=args.lr_head, peak_wd=wd_embed),
        dict(kind="adamw", params=[model.embed.weight], peak_lr=args.lr_embed, peak_wd=wd_embed),
        dict(kind="adamw", params=[model.resid_scale], peak_lr=args.lr_scalar * 0.01, peak_wd=0.0),
        dict(kind="adamw", params=[model.x0_scale], peak_lr=args.lr_scalar, peak_wd=0.0, betas=(0.96, 0.95)),
        dict(kind="adamw", params=[model.skip_scale], peak_lr=args.lr_scalar * 0.01, peak_wd=0.0),
    ]
    if iha:
        groups.append(dict(kind="adamw", params=iha, peak_lr=args.lr_iha, peak_wd=0.0))
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                           peak_lr=args.lr_matrix, peak_wd=args.weight_decay))
    for g in groups:
        g["lr"], g["weight_decay"] = g["peak_lr"], g["peak_wd"]
    return MuonAdamW(groups, momentum=args.muon_momentum, eq_r=args.muon_eq_r, normuon=args.normuon,
                     cautious=args.cautious_wd, process_group=process_group)


# =============================================================================================
# The cyclic schedule
# =============================================================================================
# Each base runs `cycles` cycles; the first may be longer. Within a cycle the LR falls linearly
# from its peak to lr_floor (reached on the cycle's last step, where the snapshot is taken) and
# jumps back at the next cycle. Weight decay is anti-correlated: wd_floor at peak LR, 1 at the
# LR floor, so every snapshot settles into a low-norm basin.

@dataclasses.dataclass
class Cycle:
    index: int          # 1-based
    epochs: float
    batch_seqs: int
    steps: int
    first_step: int     # global step index of the cycle's first step within the base
    first_pos: int      # stream position (tokens) at the cycle's start


def plan_cycles(args, train_tokens: int) -> list[Cycle]:
    cycles, step, pos = [], 0, 0
    for c in range(1, args.cycles + 1):
        epochs = args.first_cycle_epochs if c == 1 else args.cycle_epochs
        middle = args.cycles >= 4 and args.cycles / 4 <= c - 1 < 3 * args.cycles / 4
        batch = args.batch_seqs if middle or args.cycles < 4 else max(1, round(args.batch_seqs * args.batch_schedule))
        steps = round(epochs * train_tokens / (batch * args.seq_len))
        if steps < 1:
            raise UsageError(f"cycle {c} ({epochs} epochs of {train_tokens} tokens) is shorter than one step of "
                             f"{batch} x {args.seq_len} tokens; lengthen the cycle or shrink --batch-seqs")
        cycles.append(Cycle(c, epochs, batch, steps, step, pos))
        step, pos = step + steps, pos + steps * batch * args.seq_len
    return cycles


def lr_multiplier(step_in_cycle: int, cycle_steps: int, lr_floor: float) -> float:
    frac = step_in_cycle / max(1, cycle_steps - 1)
    return 1.0 - (1.0 - lr_floor) * frac


def wd_multiplier(lr_mult: float, lr_floor: float, wd_floor: float) -> float:
    return wd_floor + (1.0 - wd_floor) * (1.0 - lr_mult) / (1.0 - lr_floor)


def noise_scale(cycle: int, cycles: int, start: float, end: float) -> float:
    """Cosine decay from `start` after the first snapshot to `end` after the last one that a cycle
    follows (snapshot cycles - 1), as the record schedules it."""
    frac = (cycle - 1) / max(1, cycles - 2)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * frac))


@torch.no_grad()
def add_snapshot_noise(model: GPT, scale: float, generator: torch.Generator):
    """Perturb every tensor of more than one number (matrices, embedding, head, scalar vectors, head
    mixing: what the record perturbs) by Gaussian noise of std scale * std(W): a kick out of the
    basin the snapshot settled in, so the next cycle explores a different one. The noise is drawn on
    the weights' device from `generator` (seeded alike on every rank of a group, so ranks stay
    equal), and std(W) stays a device tensor: no host round trip per tensor."""
    for p in model.parameters():
        if p.numel() > 1 and scale > 0:
            noise = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
            p.add_((noise * (scale * p.float().std())).to(p.dtype))


# =============================================================================================
# Chain distillation
# =============================================================================================

def distillation_loss(logits, targets, teacher_logits=None, alpha=0.45, temperature=1.2, mtp=None, mtp_weight=0.0):
    """The training loss per token: CE(student, y) + w MTP without a teacher; with one,
    (1-a) (CE + w MTP) + a T^2 KL(softmax(teacher/T) || softmax(student/T)), as the record
    folds MTP into the ground-truth side of the trade-off."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    if mtp is not None and mtp_weight > 0:
        ce = ce + mtp_weight * mtp
    if teacher_logits is None:
        return ce
    T = temperature
    kl = F.kl_div(F.log_softmax(logits.flatten(0, 1) / T, dim=-1),
                  F.log_softmax(teacher_logits.flatten(0, 1) / T, dim=-1),
                  log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * T * T * kl


LOSS_CHUNK_TOKENS = 4096  # tokens whose fp32 logits (x vocabulary) exist at once in the loss: 0.8 GB at 50K


def _chunk_terms(model: GPT, x, targets, teacher: Teacher | None, teacher_x, temperature: float):
    """Summed cross-entropy, and summed KL to the teacher (0 without one), of one chunk of tokens."""
    logits = model.logits(x)
    ce = F.cross_entropy(logits, targets, reduction="sum")
    if teacher is None:
        return ce, torch.zeros_like(ce)
    with torch.no_grad():
        target = teacher.log_probs(teacher_x, temperature)
    return ce, F.kl_div(F.log_softmax(logits / temperature, dim=-1), target, log_target=True, reduction="sum")


def chunked_distillation_loss(model: GPT, x, targets, teacher: Teacher | None = None, teacher_x=None, alpha=0.45,
                              temperature=1.2, mtp=None, mtp_weight=0.0, chunk=LOSS_CHUNK_TOKENS):
    """distillation_loss from hidden states (B, T, D): the head, soft-cap, cross-entropy and KL run a
    chunk of tokens at a time, each chunk recomputed in the backward pass (checkpointed), so no
    [tokens x vocab] fp32 tensor of student or teacher exists whole. teacher_x: the teacher's
    features (B, T, ...), teacher.features(), cut into the same chunks of tokens."""
    x, targets = x.flatten(0, 1), targets.flatten()
    teacher_x = teacher_x.flatten(0, 1) if teacher is not None else None
    ce = kl = 0.0
    for s in range(0, x.size(0), chunk):
        c, k = torch.utils.checkpoint.checkpoint(
            _chunk_terms, model, x[s:s + chunk], targets[s:s + chunk], teacher,
            teacher_x[s:s + chunk] if teacher is not None else None, temperature, use_reentrant=False)
        ce, kl = ce + c, kl + k
    loss = ce / x.size(0)
    if mtp is not None and mtp_weight > 0:
        loss = loss + mtp_weight * mtp
    if teacher is None:
        return loss
    return (1 - alpha) * loss + alpha * temperature ** 2 * kl / x.size(0)


# =============================================================================================
# Teachers: what a student learns from, as log-probabilities
# =============================================================================================
# Chain distillation and ensemble distillation are one loss (above) with two teachers. A teacher
# gives features for a batch (B, T, ...) in one no-grad forward, then the log-probabilities of
# a chunk of those tokens: the loss never holds [tokens x vocab] for more than one chunk.

class SnapshotTeacher:
    """One frozen model, today's chain teacher (the previous snapshot of the base): log_softmax(z / T)."""

    def __init__(self, model: GPT, forward=None):
        self.model, self.forward = model, forward if forward is not None else model  # forward: compiled
        self.head_weight = model.head.weight
        self.forward_passes = 1

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        return self.forward(idx, hidden=True)                          # (B, T, D)

    def log_probs(self, f: torch.Tensor, temperature: float) -> torch.Tensor:
        return F.log_softmax(self.model.logits(f) / temperature, dim=-1)


class MemberHead:
    """A member whose body another process of the group holds: its head, enough for its
    log-probabilities from the features that process sends (1/18 of the 1.8B model's weights)."""

    def __init__(self, head_weight: torch.Tensor, cfg: GPTConfig):
        self.head_weight, self.cfg = head_weight, cfg

    def log_probs(self, f: torch.Tensor, temperature: float) -> torch.Tensor:
        return F.log_softmax(capped_logits(f, self.head_weight, self.cfg) / temperature, dim=-1)


class EnsembleTeacher:
    """A prior's K members with their weights: log sum_i w_i softmax(z_i / T), the ensemble q0
    evaluates, at the distillation temperature. The mixture is accumulated member by member
    (logaddexp), so a chunk holds two [tokens x vocab] tensors whatever K is.

    With a group of W processes the members are spread over it: member i's body lives on group
    rank i mod W (a SnapshotTeacher there, a MemberHead elsewhere). features() gathers the group's
    micro-batches, runs each local body over all of them and sends every process the features of
    its own rows (all-to-all). A process then holds ceil(K/W) bodies and K heads, and runs the
    FLOPs of K members over its rows, as if it held them all. Every process of the group calls
    features() once per micro-batch (they run equally many)."""

    def __init__(self, members: list[SnapshotTeacher | MemberHead], weights: list[float], group=None):
        self.members, self.group = members, group
        self.log_w = [math.log(w) for w in weights]
        self.forward_passes = len(members)
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        local = [i for i in range(len(members)) if i % self.size == self.rank]
        if any(not isinstance(members[i], SnapshotTeacher) for i in local):
            raise ValueError("member i's body belongs on group rank i mod W")

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return torch.stack([m.features(idx) for m in self.members], dim=2)  # (B, T, K, D)
        W, K, B = self.size, len(self.members), idx.size(0)
        rows = torch.cat(all_gather(idx, self.group))                            # (W*B, T)
        # one dtype on every rank (the heads'), and zeros where a rank has fewer bodies than ceil(K/W)
        mine = [m.features(rows).to(m.head_weight.dtype) for m in self.members[self.rank::W]]  # (W*B, T, D)
        head = self.members[0].head_weight
        blank = head.new_zeros(rows.size(0), rows.size(1), head.size(1))
        f = torch.stack(mine + [blank] * (-(-K // W) - len(mine)), dim=2)      # (W*B, T, slots, D)
        got = all_to_all(list(f.split(B)), self.group)                           # rank s: (B, T, slots, D)
        return torch.stack([got[i % W][:, :, i // W] for i in range(K)], dim=2)  # (B, T, K, D)

    def log_probs(self, f: torch.Tensor, temperature: float) -> torch.Tensor:
        out = None
        for i, m in enumerate(self.members):  # f: (n, K, D)
            lp = m.log_probs(f[:, i], temperature) + self.log_w[i]
            out = lp if out is None else torch.logaddexp(out, lp)
        return out


Teacher = SnapshotTeacher | EnsembleTeacher


def read_prior(path: Path) -> dict:
    """A prior.json of fit_prior.py, read whole (eval.py --prior and --distil-from share it)."""
    if not path.is_file():
        raise UsageError(f"{path}: no such prior; fit one with `python fit_prior.py RUN_DIR`")
    try:
        prior = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not a whole q0 prior ({type(e).__name__}: {e}); fit it again with "
                         f"`python fit_prior.py RUN_DIR --out NEW.json`") from None
    if not isinstance(prior, dict) or prior.get("format") != "q0-prior":
        raise UsageError(f"{path} is not a q0 prior (fit one with `python fit_prior.py RUN_DIR`)")
    return prior


def distil_members(args, data: RunData) -> list[dict]:
    """The --distil-k budget of the --distil-from prior (0 resolved to its largest), checked against
    this run's data and the disk: its members of nonzero weight (those a user of the ensemble runs),
    [{run_dir, record, weight, run}], weights refitted for K, as eval.py scores them."""
    path = Path(args.distil_from)
    prior = read_prior(path)
    if prior.get("tokenizer") != data.tokenizer:
        raise UsageError(f"--distil-from {path} is a prior of {prior.get('tokenizer')} tokens and this run's data "
                         f"is {data.tokenizer}; distil on the data its members were trained on (--data-dir)")
    if prior["fitness"]["sha256"] != tokens_sha256(data.fitness):
        raise UsageError(f"--distil-from {path} was fitted on another fitness set than this run's (different "
                         f"--data-dir, --fitness-tokens or --train-tokens); use the flags of the members' run")
    budgets = {b["K"]: b for b in prior["budgets"]}
    k = args.distil_k or max(budgets)
    if k not in budgets:
        larger = "larger than the prior, whose budgets are" if k > max(budgets) else "not a budget of the prior:"
        raise UsageError(f"--distil-k {k} is {larger} {sorted(budgets)}; choose one of them, or fit that budget "
                         f"with `python fit_prior.py RUN_DIR --budgets {k} --out PRIOR`")
    args.distil_k, out = k, []
    for ref, w in zip(budgets[k]["members"], budgets[k]["weights_refitted"]):
        if w <= 0:
            continue
        run_dir = (path.parent / ref["run"]).resolve()
        record_path = run_dir / "snapshots" / f"{ref['id']}.json"
        if not record_path.is_file():
            raise UsageError(f"--distil-from {path}: member {ref['id']} of {run_dir} is gone; refit the prior")
        record = read_json(record_path, "rerun its training command to repair it")
        if record["weights_sha256"] != ref["weights_sha256"]:
            raise UsageError(f"snapshot {run_dir.name}:{ref['id']} changed since {path} was fitted (weights SHA-256 "
                             f"differs); refit the prior with fit_prior.py")
        member_run = load_run(run_dir)
        if member_run["vocab_size"] != data.vocab_size or member_run["seq_len"] < args.seq_len:
            raise UsageError(f"member {ref['id']} of {run_dir} has vocabulary {member_run['vocab_size']} and sequence "
                             f"length {member_run['seq_len']}; the student needs {data.vocab_size} and at most that "
                             f"--seq-len")
        out.append({"run_dir": run_dir, "record": record, "weight": w, "run": member_run})
    return out


# =============================================================================================
# Evaluation: every target token's probability, the same tokens whatever the hardware
# =============================================================================================

def autocast_for(device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA (--autocast auto), or wherever --autocast bf16 asks (the CPU tests).
    cache=False: no bf16 copies of weights kept for a backward pass (the teacher has none)."""
    mode = _kernels["autocast"]
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return nullcontext()


@torch.no_grad()
def token_probs(model: GPT, tokens: np.ndarray, seq_len: int, batch_size: int, device, group=None) -> np.ndarray:
    """p(true next token) for every target tokens[1:], in windows of seq_len that each start a
    fresh context (the last window shorter). With a process group, windows are spread over its
    ranks and the result is summed, so every rank returns the whole array. `model` may be a
    compiled module (it is called in eval mode, one shape). Probabilities stay on
    the device until the end: one copy to the host, and the reduction runs where the group's
    backend wants it (all_reduce_)."""
    device = torch.device(device)
    n_targets = tokens.size - 1
    starts = list(range(0, n_targets, seq_len))
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    mine = starts[rank::world]
    out = torch.zeros(n_targets, dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), batch_size):
        # Every forward is [batch_size, seq_len] (short windows and a short last batch padded,
        # the padding discarded), so a compiled model sees one shape and never recompiles.
        rows = np.zeros((batch_size, seq_len + 1), dtype=np.int64)
        src, dst = [], []
        for r, s in enumerate(mine[i:i + batch_size]):
            length = min(seq_len, n_targets - s)
            rows[r, :length + 1] = tokens[s:s + length + 1]
            src.append(np.arange(r * seq_len, r * seq_len + length))
            dst.append(np.arange(s, s + length))
        w = to_device(torch.from_numpy(rows), device)
        targets = w[:, 1:].flatten()
        logp = torch.empty(targets.numel(), dtype=torch.float32, device=device)
        with autocast_for(device):
            x = model(w[:, :-1], hidden=True).flatten(0, 1)
            for s in range(0, x.size(0), LOSS_CHUNK_TOKENS):  # logits a chunk at a time, as in training
                z = model.logits(x[s:s + LOSS_CHUNK_TOKENS]).float()  # log p(y) = z_y - logsumexp(z)
                logp[s:s + z.size(0)] = z.gather(-1, targets[s:s + z.size(0), None]).squeeze(-1) - z.logsumexp(-1)
        src, dst = (to_device(torch.from_numpy(np.concatenate(x)), device) for x in (src, dst))
        out.index_copy_(0, dst, logp[src].exp())
    model.train(was_training)
    if world > 1:
        all_reduce_(out, group)  # each position was filled by exactly one rank
    return out.cpu().numpy()


def mean_nll(probs: np.ndarray) -> float:
    return float(-np.log(probs.astype(np.float64)).mean())


def bits_per_byte(probs: np.ndarray, targets: np.ndarray, bos_id: int, text_bytes: int | None) -> float | None:
    """The record's bits per byte: the nats of every target but BOS (a BOS target carries no bytes,
    so it carries no nats either) over the UTF-8 bytes of the targets, in bits."""
    if not text_bytes:
        return None
    keep = targets != bos_id
    return float(-np.log(probs[keep].astype(np.float64)).sum() / (math.log(2) * text_bytes))


def probs_to_cache(probs: np.ndarray) -> np.ndarray:
    """float16 for the cache; clamped so a log never sees 0 (2**-24 is fp16's smallest value)."""
    return np.maximum(probs, 2.0 ** -24).astype(np.float16)


# =============================================================================================
# Data for one run: training stream, fitness set, validation set
# =============================================================================================

def tokens_sha256(tokens: np.ndarray) -> str:
    """Identity of a token sequence, independent of how it was stored (hashed in chunks: the
    training set of a real run is 100M tokens)."""
    h = hashlib.sha256()
    for s in range(0, tokens.size, 1 << 22):
        h.update(np.ascontiguousarray(tokens[s:s + (1 << 22)], dtype="<i8").tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class RunData:
    train: np.ndarray
    fitness: np.ndarray
    val: np.ndarray
    vocab_size: int
    bos_id: int
    tokenizer: str
    val_bytes: int | None
    describe: dict
    token_bytes: np.ndarray | None = None  # UTF-8 bytes of every token id (BOS 0), from the data files


def load_data(args) -> RunData:
    train_file, val_file = load_split(args.data_dir, "train"), load_split(args.data_dir, "val")
    if (train_file.vocab_size, train_file.tokenizer, train_file.bos_id) != \
            (val_file.vocab_size, val_file.tokenizer, val_file.bos_id):
        raise DataError(f"{train_file.path} ({train_file.tokenizer}, vocabulary {train_file.vocab_size}) and "
                        f"{val_file.path} ({val_file.tokenizer}, vocabulary {val_file.vocab_size}) do not match; "
                        f"rebuild both with: {_rebuild_hint(args.data_dir, train_file.command)}")
    token_bytes = val_file.token_bytes
    if train_file.token_bytes is not None and token_bytes is not None \
            and not np.array_equal(train_file.token_bytes, token_bytes):
        raise DataError(f"{train_file.path} and {val_file.path} record different token byte lengths; "
                        f"rebuild both with: {_rebuild_hint(args.data_dir, train_file.command)}")
    fitness, train = carve_fitness(train_file.tokens, train_file.bos_id, args.fitness_tokens)
    if args.train_tokens:
        if args.train_tokens > train.size:
            raise UsageError(f"--train-tokens {args.train_tokens} exceeds the {train.size} training tokens left "
                             f"after the fitness carve")
        train = train[:args.train_tokens]
    if args.val_tokens > val_file.tokens.size:
        raise UsageError(f"--val-tokens {args.val_tokens} exceeds the {val_file.tokens.size} validation tokens in "
                         f"{val_file.path}; lower it, or 0 for all")
    val = val_file.tokens[:args.val_tokens] if args.val_tokens else val_file.tokens
    if train.size < (args.seq_len + 1):
        raise UsageError(f"only {train.size} training tokens, fewer than one sequence of {args.seq_len + 1}")
    if token_bytes is not None:
        val_bytes = int(token_bytes[val[1:].astype(np.int64)].sum())
    else:
        val_bytes = val_file.text_bytes if (val_file.text_bytes is not None and val.size == val_file.tokens.size) \
            else None
    describe = {
        "train": {"path": train_file.path, "format": train_file.format, "tokens": int(train.size),
                  "sha256": tokens_sha256(train)},
        "fitness": {"tokens": int(fitness.size), "targets": int(fitness.size - 1),
                    "sha256": tokens_sha256(fitness)},
        "val": {"path": val_file.path, "format": val_file.format, "tokens": int(val.size),
                "targets": int(val.size - 1), "text_bytes": val_bytes, "sha256": tokens_sha256(val)},
    }
    return RunData(np.ascontiguousarray(train), np.ascontiguousarray(fitness), np.ascontiguousarray(val),
                   train_file.vocab_size, train_file.bos_id, train_file.tokenizer, val_bytes, describe, token_bytes)


# =============================================================================================
# The run directory: config, logs, snapshots, checkpoints
# =============================================================================================
# runs/<name>/run.json           everything that defines the population, written once
#            /log.txt            this file's code, arguments, versions, hardware, then every line
#            /metrics.jsonl      the same events as JSON, one a line
#            /snapshots/bBcC.{pt,json,fitness.npy,val.npy}   weights, record, cached probabilities
#            /checkpoints/baseB.pt                            resume state of base B
#            /manifest.json      run.json plus every snapshot record, written at the end

RUN_VERSION = 2  # 2: the record's model (looping, IHA, MTP, separate q/k/v) and optimiser


def check_run_version(run: dict, run_dir) -> None:
    if run.get("version") != RUN_VERSION:
        raise UsageError(f"{run_dir} was written by an older q0 (run format {run.get('version')}, this code writes "
                         f"{RUN_VERSION}): its model differs; retrain it, or use the q0 version that trained it")


def snapshot_id(base: int, cycle: int) -> str:
    return f"b{base}c{cycle}"


def load_run(run_dir) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise UsageError(f"{run_dir} is not a q0 run (no run.json); train one with: python train_q0.py")
    return read_json(path, "rerun the training command that made it")


def read_json(path, fix: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable or not whole JSON ({type(e).__name__}); {fix}") from None


SNAPSHOT_FILES = ("weights", "fitness_probs", "val_probs")


def list_snapshots(run_dir) -> list[dict]:
    """Snapshot records present on disk, in population order (cycle, then base). A record is the
    snapshot's completion marker (written after its files, removed before them): one whose files
    are gone was tampered with, and nothing may be computed from it."""
    records = [read_json(p, "move it away (with its snapshot files) and resume the run")
               for p in Path(run_dir, "snapshots").glob("b*c*.json")]
    for r in records:
        missing = [r[k] for k in SNAPSHOT_FILES if r.get(k) and not (Path(run_dir) / r[k]).is_file()]
        if missing:
            raise UsageError(f"snapshot {r['id']} of {run_dir} is missing {', '.join(missing)}; rerun its training "
                             f"command to repair it")
    return sorted(records, key=lambda r: (r["cycle"], r["base"]))


def _snapshot_weights(run_dir, record: dict, check_sha: bool) -> tuple[GPTConfig, Path]:
    run = load_run(run_dir)
    path = Path(run_dir) / record["weights"]
    if not path.exists():
        raise UsageError(f"snapshot {record['id']} is missing its weights {path}")
    if check_sha and sha256_file(path) != record["weights_sha256"]:
        raise UsageError(f"{path} does not match the SHA-256 in its record: the file changed since it was written")
    check_run_version(run, run_dir)
    return GPTConfig(**run["model"]), path


def load_snapshot_model(run_dir, record: dict, device="cpu", check_sha=True) -> GPT:
    cfg, path = _snapshot_weights(run_dir, record, check_sha)
    model = GPT(cfg)
    model.load_state_dict(load_weights(path))
    return model.to(device).eval()


def load_snapshot_head(run_dir, record: dict, device, dtype) -> tuple[torch.Tensor, GPTConfig]:
    """A snapshot's head weight alone (an ensemble member whose body another process holds): the
    file is memory-mapped, so the rest of it is never read into this process."""
    cfg, path = _snapshot_weights(run_dir, record, check_sha=True)
    return load_weights(path, mmap=True)["head.weight"].to(device, dtype, copy=True), cfg  # not a view of the file


def load_val_tokens(run: dict) -> np.ndarray:
    """A run's validation tokens, found from run.json (relative to here or to the repository) and
    checked against the SHA-256 recorded when it trained."""
    v = run["val"]
    paths = [Path(p) if Path(p).exists() else REPO_ROOT / p for p in str(v["path"]).split(",")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"validation tokens {', '.join(missing)} (run.json val.path) not found; run from the "
                         f"directory training ran in, or rebuild the data")
    tokens = np.concatenate([read_tokens(p).tokens for p in paths])[:v["tokens"]]
    if tokens_sha256(tokens) != v["sha256"]:
        raise UsageError(f"validation tokens {v['path']} differ from the run's (sha256 {v['sha256'][:12]}); "
                         f"rebuild the data the run was trained on")
    return tokens


def population_config(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in NON_POPULATION_FLAGS}


def epochs_spent(records: list[dict]) -> float:
    """Compute that produced a set of snapshots: each base counted up to its latest snapshot."""
    latest = {}
    for r in records:
        latest[r["base"]] = max(latest.get(r["base"], 0.0), r["base_epochs"])
    return sum(latest.values())


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
         "platform": platform.platform(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return v


class RunLog:
    """Text for people (stdout + log.txt) and JSON lines for scripts (metrics.jsonl).
    Only the first rank of each process group writes; lines carry their base."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_run=None):
        self.run_dir, self.enabled, self.wandb = run_dir, enabled, wandb_run

    def line(self, text: str, echo: bool = True):
        if not self.enabled:
            return
        if echo:
            print(text, flush=True)
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(text + "\n")

    def event(self, kind: str, **fields):
        if not self.enabled:
            return
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in fields.items() if isinstance(v, (int, float))})


def check_same_run(run_dir: Path, args, data: RunData):
    """A rerun resumes only the same population trained on the same tokens (by content: data
    replaced at the same path between a crash and the resume is caught)."""
    run, pop = load_run(run_dir), population_config(args)
    old = run["population_config"]
    changed = sorted(k for k in set(old) | set(pop) if old.get(k) != pop.get(k))
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} ({old.get(k)} -> {pop.get(k)})" for k in changed)
        raise UsageError(f"run {run_dir} exists with a different population: {flags}; "
                         f"rerun with its flags to resume, or choose a new --run-name")
    for split in ("train", "fitness", "val"):
        was, now = run[split].get("sha256"), data.describe[split]["sha256"]
        if was is not None and was != now:
            where = data.describe["val" if split == "val" else "train"]["path"]
            raise DataError(f"the {split} tokens in {where} differ from those run {run_dir} trained on (sha256 "
                            f"{was[:12]}, now {now[:12]}); restore that data, or choose a new --run-name")


def sweep_temporaries(run_dir: Path) -> int:
    """Remove the temporary files killed writers left (each as large as its file); only the run's
    lock holder calls this, so no live writer owns them."""
    litter = [p for folder in ("snapshots", "checkpoints") for p in (run_dir / folder).glob(".*.tmp*")]
    litter += [p for name in ("run.json", "manifest.json") for p in run_dir.glob(f".{name}.tmp*")]
    for p in litter:
        p.unlink(missing_ok=True)
    return len(litter)


def _mkdir(path: Path):
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(path, None, e) or e


def prepare_run_dir(args, data: RunData, model_cfg: GPTConfig, cycles: list[Cycle]) -> tuple[Path, bool, RunLock]:
    """Create the run, or check that a rerun means the same population on the same data; either
    way take the run's lock. Returns (dir, resumed, lock). A new run is built under a temporary
    name and renamed into place, so a folder under the run's name is complete; a half-built one a
    crash left is rebuilt by the rerun."""
    run_dir = Path(args.runs_dir) / args.run_name
    if (run_dir / "run.json").exists():
        lock = RunLock(run_dir, 0)
        check_run_version(load_run(run_dir), run_dir)
        check_same_run(run_dir, args, data)
        sweep_temporaries(run_dir)
        return run_dir, True, lock
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir} exists and is not a q0 run; choose another --run-name or --runs-dir")
    building = _tmp_name(run_dir)
    _mkdir(building / "snapshots")
    _mkdir(building / "checkpoints")
    lock = RunLock(building, 0)
    epochs_per_base = sum(c.epochs for c in cycles)
    run = {
        "format": "q0-run", "version": RUN_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "population_config": population_config(args), "model": dataclasses.asdict(model_cfg),
        "tokenizer": data.tokenizer, "vocab_size": data.vocab_size, "bos_id": data.bos_id,
        "seq_len": args.seq_len, **data.describe,
        "layout": {"bases": args.bases, "cycles": [dataclasses.asdict(c) for c in cycles],
                   "epochs_per_base": epochs_per_base, "epoch_budget": epochs_per_base * args.bases},
    }
    atomic_write_text(building / "run.json", json.dumps(run, indent=1))
    try:
        _commit(os.rename, building, run_dir)  # an empty folder of that name is replaced
    except OSError as e:
        raise _disk_error(run_dir, None, e) or UsageError(
            f"{run_dir} appeared while this run was being created ({e.strerror}); rerun to resume it") from None
    return run_dir, False, lock


def log_header(log: RunLog, args, world: int):
    log.line("=" * 100 + "\n" + Path(__file__).read_text() + "=" * 100, echo=False)  # the code, in the log only
    log.line("command: " + " ".join([sys.executable] + sys.argv) + f"  (world size {world})")
    log.line("arguments: " + json.dumps(vars(args), sort_keys=True))
    log.line("versions: " + json.dumps(versions()))


def save_snapshot(run_dir: Path, record: dict, state: dict, fitness: np.ndarray, val: np.ndarray | None):
    """Write a snapshot's weights and caches, then its record (last: the record marks it complete)."""
    snap_dir, sid = run_dir / "snapshots", record["id"]
    atomic_torch_save(state, snap_dir / f"{sid}.pt")
    atomic_save_npy(snap_dir / f"{sid}.fitness.npy", probs_to_cache(fitness))
    if val is not None:
        atomic_save_npy(snap_dir / f"{sid}.val.npy", probs_to_cache(val))
    for key in ("weights", "fitness_probs", "val_probs"):
        record[key + "_sha256"] = sha256_file(run_dir / record[key]) if record[key] else None
    atomic_write_text(snap_dir / f"{sid}.json", json.dumps(record, indent=1))


def snapshot_record(sid: str, base: int, cycle: int, step: int, base_epochs: float, fitness: np.ndarray,
                    val: np.ndarray, data: "RunData", val_probs: bool) -> dict:
    return {"id": sid, "base": base, "cycle": cycle, "step": step, "base_epochs": round(base_epochs, 6),
            "val_loss": mean_nll(val), "val_bpb": bits_per_byte(val, data.val[1:], data.bos_id, data.val_bytes),
            "fitness_loss": mean_nll(fitness), "weights": f"snapshots/{sid}.pt",
            "fitness_probs": f"snapshots/{sid}.fitness.npy", "val_probs": f"snapshots/{sid}.val.npy" if val_probs else None}


class PopulationTracker:
    """The uniform ensemble of every snapshot on disk so far, from the cached validation
    probabilities; each file is read once (a running sum), so cost stays linear in snapshots."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.records, self.prob_sum, self.all_cached = run_dir, [], 0.0, True

    def update(self) -> dict:
        seen = {r["id"] for r in self.records}
        for r in list_snapshots(self.run_dir):
            if r["id"] in seen:
                continue
            self.records.append(r)
            if r.get("val_probs"):
                self.prob_sum = self.prob_sum + np.load(self.run_dir / r["val_probs"]).astype(np.float64)
            else:
                self.all_cached = False  # one member without a cache: no uniform number rather than a wrong one
        n = len(self.records)
        best = min(self.records, key=lambda r: r["val_loss"]) if n else None
        return {"snapshots": n, "epochs_spent": epochs_spent(self.records),
                "uniform_val_loss": mean_nll(self.prob_sum / n) if n and self.all_cached else None,
                "best_single_val_loss": best["val_loss"] if best else None,
                "best_single": best["id"] if best else None}


# =============================================================================================
# Population layout: bases on process groups
# =============================================================================================
# The world is cut into G equal process groups (G = gcd(bases, world) unless --groups says);
# group g trains bases g, g+G, g+2G, ... one after another, with DDP inside the group. A base's
# seed, data order and global batch depend only on the base, so 1 GPU, 8 GPUs or 5 nodes give
# the same population (up to floating-point reduction order).

@dataclasses.dataclass
class Layout:
    world: int
    rank: int
    groups: int
    group_index: int
    group: object          # torch ProcessGroup, or None for a single-process group
    group_size: int
    group_rank: int
    bases: list[int]


def choose_device_batch(args, size: int, cycles: list[Cycle]) -> int:
    """--device-batch, checked; without it the largest, up to the preset's, that splits every cycle's
    batch over the group's processes (a placement choice: the global batch is the same)."""
    batches = sorted({c.batch_seqs for c in cycles})
    uneven = [b for b in batches if b % size]
    if uneven:
        raise UsageError(f"a batch of {uneven[0]} sequences does not split over {size} processes; choose a "
                         f"--batch-seqs whose batches ({', '.join(map(str, batches))}) divide by {size}, or another "
                         f"process count")
    per_process = math.gcd(*(b // size for b in batches))
    if args.device_batch is not None:
        if per_process % args.device_batch:
            failing = next(b for b in batches if (b // size) % args.device_batch)
            raise UsageError(f"a batch of {failing} sequences does not split over {size} processes x "
                             f"--device-batch {args.device_batch}; choose a --device-batch that divides "
                             f"{per_process}, or leave it out")
        return args.device_batch
    cap = PRESETS[args.preset].get("device_batch", DEVICE_BATCH_CAP)
    return max(d for d in range(1, min(cap, per_process) + 1) if per_process % d == 0)


def make_layout(args, world: int, rank: int, cycles: list[Cycle], create_groups: bool = True) -> Layout:
    groups = args.groups or math.gcd(args.bases, world)
    if world % groups or args.bases % groups:
        raise UsageError(f"{args.bases} bases cannot be placed evenly on {groups} groups of a world of {world} "
                         f"processes: --groups must divide both the world size and --bases")
    size = world // groups
    args.device_batch = choose_device_batch(args, size, cycles)  # resolved here, once: it needs the layout
    index = rank // size
    group = None
    for g in range(groups):  # every rank must take part in creating every group
        ranks = list(range(g * size, (g + 1) * size))
        pg = dist.new_group(ranks, timeout=datetime.timedelta(minutes=args.collective_timeout_minutes)) \
            if world > 1 and create_groups else None
        if g == index and size > 1:
            group = pg
    return Layout(world, rank, groups, index, group, size, rank - index * size,
                  list(range(index, args.bases, groups)))


# =============================================================================================
# Training one base
# =============================================================================================

def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto the device without stalling the host (pinned, asynchronous on CUDA)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def micro_batch_loss(forward, model: GPT, teacher: Teacher | None, rows: torch.Tensor, args,
                     device, seeds: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one micro-batch (B, T + 1) as training runs it (and the preflight traces it):
    `forward` (DDP and compiled as configured) gives hidden states, the loss makes logits in chunks."""
    with autocast_for(device):
        x, mtp = forward(rows[:, :-1], rows[:, 1:], hidden=True, seeds=seeds)
        teacher_x = None
        if teacher is not None:
            with torch.no_grad(), autocast_for(device, cache=False):
                teacher_x = teacher.features(rows[:, :-1])
        return chunked_distillation_loss(model, x, rows[:, 1:], teacher, teacher_x, args.distill_alpha,
                                         args.distill_temperature, mtp, args.mtp_weight)


def micro_batches_of(group_rank: int, group_size: int, micro_batches: int) -> list[int]:
    """Which micro-batches of the global batch this process runs (one per accumulation step).
    Rank r takes r, r+W, r+2W, ...: together the ranks cover every micro-batch exactly once."""
    return list(range(group_rank, micro_batches, group_size))


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2 ** 63 - 1)


def snapshot_state(model: GPT, device: torch.device) -> dict:
    """The weights as saved: bf16 on GPU (half the disk), exact fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {k: v.detach().to(dtype).cpu().clone() for k, v in model.state_dict().items()}


def model_from_state(cfg: GPTConfig, state: dict, device) -> GPT:
    """A frozen copy of saved weights, built directly on `device` (no host-side model): eval mode,
    no gradients, so autocast keeps no bf16 weight copies for a backward that never comes."""
    with torch.device(device):
        model = GPT(cfg)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def check_finite(loss: torch.Tensor, base: int, cycle: int, step: int):
    """Stop a diverged run before it writes a snapshot or checkpoint (called where the loss is read
    anyway, so it adds no host sync). Every rank of a group sees the same all-reduced loss."""
    if not torch.isfinite(loss):
        raise UsageError(f"the training loss is {loss.item()} at step {step} (base {base}, cycle {cycle}); nothing "
                         f"of this cycle was saved: lower the learning rates (--lr-*) or check the data and flags")


class Stepper:
    """The optimiser step of one model, apart from the driver that decides what to step on: the
    schedule's LR and weight decay, the micro-batches of the global batch this process runs,
    DDP's gradient sync on the last of them, clipping and the update. It knows no cycles,
    snapshots, checkpoints or teachers' life cycle (BaseTrainer): it is handed a batch, its rows'
    dropout seeds and a teacher (or None)."""

    def __init__(self, args, model: GPT, layout: Layout, device: torch.device, compiled):
        self.args, self.model, self.layout, self.device = args, model, layout, device
        if args.checkpoint_activations:
            model.checkpoint_blocks = True
        self.optimizer = build_optimizer(model, args, layout.group)  # Muon sharded over the group
        self.ddp = None
        if layout.group is not None:
            from torch.nn.parallel import DistributedDataParallel
            # gradients as views of DDP's buckets: no second fp32 copy of every gradient
            self.ddp = DistributedDataParallel(model, process_group=layout.group, gradient_as_bucket_view=True)
        self.forward = compiled(self.ddp if self.ddp is not None else model)

    def schedule(self, step_in_cycle: int, cycle_steps: int):
        args = self.args
        lr_mult = lr_multiplier(step_in_cycle, cycle_steps, args.lr_floor)
        wd_mult = wd_multiplier(lr_mult, args.lr_floor, args.wd_floor)
        for g in self.optimizer.param_groups:
            g["lr"], g["weight_decay"] = g["peak_lr"] * lr_mult, g["peak_wd"] * wd_mult

    def step(self, batch: np.ndarray, seeds: list[int], teacher: Teacher | None) -> torch.Tensor:
        """One update from the global batch (rows, T + 1); returns this process's mean loss."""
        args, lay, B = self.args, self.layout, self.args.device_batch
        mine = micro_batches_of(lay.group_rank, lay.group_size, batch.shape[0] // B)
        loss_sum = torch.zeros((), device=self.device)
        for a, k in enumerate(mine):
            rows = to_device(torch.from_numpy(batch[k * B:(k + 1) * B]), self.device)
            row_seeds = to_device(torch.tensor(seeds[k * B:(k + 1) * B], dtype=torch.int64), self.device)
            sync = nullcontext() if (self.ddp is None or a == len(mine) - 1) else self.ddp.no_sync()
            with sync:  # dropout masks follow the rows (row_dropout), not the micro-batch
                loss = micro_batch_loss(self.forward, self.model, teacher, rows, args, self.device, row_seeds)
                (loss / len(mine)).backward()
            loss_sum += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / len(mine)


class BaseTrainer:
    """One base's trajectory (the driver; its Stepper makes each update): cycles of training, a
    snapshot at the end of each, noise, checkpoints and resume. The teacher is
    decided in one place (teacher_for, after_snapshot): the prior's ensemble when one is given
    (ensemble distillation, every cycle), else the previous snapshot (chain distillation)."""

    def __init__(self, args, base: int, layout: Layout, data: RunData, cfg: GPTConfig, cycles: list[Cycle],
                 run_dir: Path, log: RunLog, device: torch.device, distil: list[dict] | None = None):
        self.args, self.base, self.layout, self.data, self.cfg = args, base, layout, data, cfg
        self.cycles, self.run_dir, self.log, self.device = cycles, run_dir, log, device
        self.leader = layout.group_rank == 0
        self.use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
        self.stream = TrainStream(data.train, data.bos_id, args.seed, base)
        self.checkpoint_path = run_dir / "checkpoints" / f"base{base}.pt"
        torch.manual_seed(_seed(args.seed, base))  # the initialisation depends on the base only
        self.model = GPT(cfg).to(device)
        if distil and args.distil_init == "best":  # the student starts as the prior's best member
            best = min(distil, key=lambda m: m["record"]["fitness_loss"])
            if best["run"]["model"] != dataclasses.asdict(cfg):
                raise UsageError(f"--distil-init best: member {best['record']['id']} of {best['run_dir']} has another "
                                 f"architecture than the student; give the members' model flags or --distil-init scratch")
            self.model.load_state_dict(load_weights(best["run_dir"] / best["record"]["weights"]))
        self.stepper = Stepper(args, self.model, layout, device, self.compiled)
        self.optimizer = self.stepper.optimizer
        self.ensemble = self.load_ensemble(distil) if distil else None
        self.teacher: SnapshotTeacher | None = None  # the chain teacher, while a cycle needs it
        self.step, self.cycles_done = 0, 0
        self.tracker = PopulationTracker(run_dir)
        self.scoring_seconds: list[float] = []  # per snapshot, for the ETA
        log.line(f"[b{base}] {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                 f"{sum(c.steps for c in cycles)} steps")

    def compiled(self, module):
        return torch.compile(module) if self.use_compile else module

    # --- the teacher: every decision about it is made here -----------------------------------
    def set_teacher(self, model: GPT | None):
        self.teacher = SnapshotTeacher(model, self.compiled(model)) if model is not None else None

    def load_ensemble(self, distil: list[dict]) -> EnsembleTeacher:
        """The prior's members, frozen and compiled like the student, bf16 on CUDA: member i's body on
        group rank i mod W, its head on every rank (EnsembleTeacher)."""
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        size, rank = self.layout.group_size, self.layout.group_rank
        members = []
        for i, d in enumerate(distil):
            if i % size == rank:
                model = load_snapshot_model(d["run_dir"], d["record"]).to(self.device, dtype).requires_grad_(False)
                members.append(SnapshotTeacher(model, self.compiled(model)))
            else:
                members.append(MemberHead(*load_snapshot_head(d["run_dir"], d["record"], self.device, dtype)))
        return EnsembleTeacher(members, [d["weight"] for d in distil], self.layout.group)

    def chain_distills(self, cycle_index: int) -> bool:
        return 0 < self.args.distill_from_cycle <= cycle_index and cycle_index > 1

    def teacher_for(self, cycle: Cycle) -> Teacher | None:
        """The prior's ensemble (--distil-from) in every cycle; else, from --distill-from-cycle on, the
        previous snapshot of this base (kept from its scoring, or read back after a resume)."""
        if self.ensemble is not None:
            return self.ensemble
        if not self.chain_distills(cycle.index):
            return None
        if self.teacher is None:
            self.load_teacher(cycle.index - 1)
        return self.teacher

    def after_snapshot(self, scorer: SnapshotTeacher, cycle_index: int):
        """The snapshot just scored teaches the next cycle if chain distillation wants it; else it goes."""
        keep = self.ensemble is None and self.chain_distills(cycle_index + 1)
        self.teacher = scorer if keep else None

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self):
        if self.leader:
            atomic_torch_save({"base": self.base, "step": self.step, "cycles_done": self.cycles_done,
                               "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                              self.checkpoint_path)
        self.last_checkpoint = time.time()

    def resume(self):
        if not self.checkpoint_path.exists():
            return
        ckpt = load_weights(self.checkpoint_path, self.device)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.cycles_done = ckpt["step"], ckpt["cycles_done"]
        stale = [] if not self.leader else [
            p for c in range(self.cycles_done + 1, len(self.cycles) + 1)
            for p in sorted((self.run_dir / "snapshots").glob(f"{snapshot_id(self.base, c)}.*"),
                            key=lambda p: p.suffix != ".json")]
        for p in stale:  # written after the checkpoint by the interrupted run: recomputed below. The
            _commit(p.unlink)  # record (.json, the completion marker) goes first, its files after
        self.log.line(f"[b{self.base}] resumed at step {self.step} after {self.cycles_done} cycles"
                      + (f"; removed {len(stale)} files of unfinished snapshots" if stale else ""))

    def load_teacher(self, cycle: int):
        """The previous snapshot of this base, exactly as saved (before any noise)."""
        record = json.loads((self.run_dir / "snapshots" / f"{snapshot_id(self.base, cycle)}.json").read_text())
        state = load_weights(self.run_dir / record["weights"])
        self.set_teacher(model_from_state(self.cfg, state, self.device))

    # --- one optimiser step ------------------------------------------------------------------
    def train_step(self, cycle: Cycle, step_in_cycle: int, distill: bool) -> torch.Tensor:
        args = self.args
        teacher = (self.ensemble or self.teacher) if distill else None
        self.stepper.schedule(step_in_cycle, cycle.steps)
        pos = cycle.first_pos + step_in_cycle * cycle.batch_seqs * args.seq_len
        batch = self.stream.batch(pos, cycle.batch_seqs, args.seq_len)
        seeds = [_seed(args.seed, self.base, self.step, r) for r in range(cycle.batch_seqs)]
        loss = self.stepper.step(batch, seeds, teacher)
        self.step += 1
        return loss

    # --- snapshot ----------------------------------------------------------------------------
    def snapshot(self, cycle: Cycle):
        args, sid = self.args, snapshot_id(self.base, cycle.index)
        state = snapshot_state(self.model, self.device)
        snap = model_from_state(self.cfg, state, self.device)  # evaluate, and later teach, what was saved
        self.log.line(f"[b{self.base}] scoring {sid} on {self.data.fitness.size - 1:,} fitness and "
                      f"{self.data.val.size - 1:,} validation targets")
        t0 = time.perf_counter()
        scorer = SnapshotTeacher(snap, self.compiled(snap))  # compiled once: it scores now, may teach next
        fitness = token_probs(scorer.forward, self.data.fitness, args.seq_len, args.eval_batch, self.device,
                              self.layout.group)
        val = token_probs(scorer.forward, self.data.val, args.seq_len, args.eval_batch, self.device,
                          self.layout.group)
        self.after_snapshot(scorer, cycle.index)
        self.scoring_seconds.append(time.perf_counter() - t0)
        base_epochs = (cycle.first_pos + cycle.steps * cycle.batch_seqs * args.seq_len) / len(self.stream)
        record = snapshot_record(sid, self.base, cycle.index, self.step, base_epochs, fitness, val, self.data,
                                 bool(args.val_probs))
        val_loss, bpb = record["val_loss"], record["val_bpb"]
        if self.leader:
            save_snapshot(self.run_dir, record, state, fitness, val if args.val_probs else None)
            pop = self.tracker.update()
            self.log.line(f"[b{self.base}] snapshot {sid} | step {self.step} | base epochs {base_epochs:.2f} | "
                          f"val {val_loss:.4f} nats" + (f" {bpb:.4f} bpb" if bpb else "")
                          + f" | fitness {record['fitness_loss']:.4f} | scored in {self.scoring_seconds[-1]:.1f}s")
            uniform = f"{pop['uniform_val_loss']:.4f}" if pop["uniform_val_loss"] is not None else "n/a"
            self.log.line(f"[b{self.base}] population: {pop['snapshots']} snapshots | epochs spent "
                          f"{pop['epochs_spent']:.2f} | best single {pop['best_single_val_loss']:.4f} "
                          f"({pop['best_single']}) | uniform ensemble val {uniform} ({pop['snapshots']} forward "
                          f"pass{'es' if pop['snapshots'] != 1 else ''})")
            self.log.event("snapshot", **record)
            self.log.event("population", base=self.base, after=sid, **pop)

    def eta_seconds(self, seconds_per_step: float, tokens_per_s: float) -> float:
        """Time left for this process: the rest of this base and the bases after it in its group,
        steps at the measured pace, snapshots at the measured scoring time (before the first, at
        an estimated 3x the training throughput, forward passes being about a third of a step)."""
        per_base = self.cycles[-1].first_step + self.cycles[-1].steps
        later = len(self.layout.bases) - 1 - self.layout.bases.index(self.base)
        steps_left = per_base - self.step + later * per_base
        scores_left = len(self.cycles) - self.cycles_done + later * len(self.cycles)
        targets = self.data.fitness.size + self.data.val.size
        per_score = np.mean(self.scoring_seconds) if self.scoring_seconds else targets / (3 * tokens_per_s)
        return steps_left * seconds_per_step + scores_left * per_score

    # --- the whole trajectory ----------------------------------------------------------------
    def synced_clock(self) -> float:
        """perf_counter once the device has finished the work queued so far."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def run(self):
        args, total_steps = self.args, self.cycles[-1].first_step + self.cycles[-1].steps
        self.resume()
        if self.step >= total_steps:
            self.log.line(f"[b{self.base}] already complete")
            return
        self.last_checkpoint = started = time.time()
        # tokens/s counts training steps only (not scoring or checkpoints). The clock is read at log
        # points and checkpoints, after a device sync: no per-step sync stalls the queue.
        tokens_done, train_seconds, first_step = 0, 0.0, self.step
        for cycle in self.cycles[self.cycles_done:]:
            distill = self.teacher_for(cycle) is not None
            mark = self.synced_clock()
            for i in range(self.step - cycle.first_step, cycle.steps):
                loss = self.train_step(cycle, i, distill)
                tokens_done += cycle.batch_seqs * args.seq_len
                if self.step % args.log_every == 0 or i == cycle.steps - 1:
                    if self.layout.group is not None:
                        all_reduce_(loss, self.layout.group)
                        loss /= self.layout.group_size
                    check_finite(loss, self.base, cycle.index, self.step)
                    now = self.synced_clock()
                    train_seconds, mark = train_seconds + now - mark, now
                    rate = tokens_done / max(train_seconds, 1e-9)
                    epoch = (cycle.first_pos + (i + 1) * cycle.batch_seqs * args.seq_len) / len(self.stream)
                    g = self.optimizer.param_groups[0]
                    self.log.line(f"[b{self.base}] cycle {cycle.index}/{len(self.cycles)} step {self.step}/"
                                  f"{total_steps} | loss {loss.item():.4f}" + (" (distill)" if distill else "")
                                  + f" | lr x{g['lr'] / g['peak_lr']:.3f} wd x{g['weight_decay'] / max(g['peak_wd'], 1e-12):.3f}"
                                  f" | epoch {epoch:.2f} | {rate:,.0f} tok/s | {clock(time.time() - started)} "
                                  f"elapsed, ETA {clock(self.eta_seconds(train_seconds / (self.step - first_step), rate))}")
                    self.log.event("step", base=self.base, cycle=cycle.index, step=self.step, loss=loss.item(),
                                   epoch=epoch, tokens_per_s=rate, distill=distill)
                if i < cycle.steps - 1 and time.time() - self.last_checkpoint > args.checkpoint_minutes * 60:
                    check_finite(loss, self.base, cycle.index, self.step)  # never checkpoint NaN weights
                    now = self.synced_clock()
                    train_seconds += now - mark
                    self.save_checkpoint()
                    mark = self.synced_clock()
            self.snapshot(cycle)
            start, end = args.snapshot_noise
            if cycle.index < len(self.cycles) and (start > 0 or end > 0):
                gen = torch.Generator(device=self.device).manual_seed(_seed(args.seed, self.base, cycle.index, 7))
                add_snapshot_noise(self.model, noise_scale(cycle.index, len(self.cycles), start, end), gen)
            self.cycles_done = cycle.index
            self.save_checkpoint()


# =============================================================================================
# Preflight plan: what a run costs before it starts
# =============================================================================================
# `--dry-run` prints this and stops; every run prints it at the top and refuses a run whose files
# cannot fit on the disk. The model (whatever GPT(cfg) is), its teacher and the optimiser are built
# and stepped on fake tensors: shapes and dtypes only, no memory, no GPU, any size. The trace runs
# on the CPU under CPU bf16 autocast (what CUDA autocast does to matmuls); attention FLOPs are the
# dense square, what SDPA computes (a sliding window under FlexAttention does less).
# Pinned torch internals (torch 2.5 to 2.13), used here only: torch._subclasses.fake_tensor.
# FakeTensorMode; symbolic_shapes.ShapeEnv(allow_scalar_outputs) so an optimiser's .item() is a
# symbol; torch.utils.flop_counter.{FlopCounterMode, sdpa_flop_count, sdpa_backward_flop_count};
# torch.distributed._tools.mem_tracker.MemTracker.

H100_BF16_TFLOPS = 989.0   # dense bf16 peak of one H100 SXM
SLOWRUN_SPLIT = dict(train=100_000_000, val=10_000_000, vocab=50257)  # assumed when the data is not there yet
GIB = 2 ** 30


def _flop_formulas() -> dict:
    """FLOPs of the CPU SDPA kernel the trace runs into (FlopCounterMode knows the CUDA ones)."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)
    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def trace_step(cfg: GPTConfig, args, device_batch: int, checkpoint: bool, distill: bool, memory: bool = True) -> dict:
    """One micro-batch of training on fake tensors: FLOPs of each part and (`memory`: the slow
    part) the peak memory of weights, gradients, optimiser state, teacher and activations together."""
    formulas, flops, cpu, kernels = _flop_formulas(), {}, torch.device("cpu"), dict(_kernels)
    _kernels["autocast"] = "bf16"  # the training code's own autocast, on the CPU
    try:
        return _trace(cfg, args, device_batch, checkpoint, distill, memory, formulas, flops, cpu)
    finally:
        _kernels.update(kernels)


def _trace(cfg, args, device_batch, checkpoint, distill, memory, formulas, flops, cpu) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.utils.flop_counter import FlopCounterMode
    with FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True)):
        model = GPT(cfg)
        if checkpoint:
            if not hasattr(model, "checkpoint_blocks"):
                raise UsageError("this model has no activation checkpointing; drop --checkpoint-activations")
            model.checkpoint_blocks = True
        optimizer = build_optimizer(model, args)
        for p in model.parameters():  # a first step creates the optimiser state; it counts the step's FLOPs
            p.grad = torch.zeros_like(p)
        with FlopCounterMode(display=False, custom_mapping=formulas) as fc:
            optimizer.step()
        flops["optimizer"] = fc.get_total_flops()
        optimizer.zero_grad(set_to_none=True)
        # The teacher keeps requires_grad here (MemTracker hooks every parameter); run under no_grad
        # and without autocast's weight cache (micro_batch_loss), it holds what a run's frozen teacher holds.
        teacher = GPT(cfg).eval() if distill else None
        idx = torch.randint(0, cfg.vocab_size, (device_batch, cfg.seq_len + 1))
        if teacher is not None:  # its forward alone, for its FLOPs (the step below runs it again)
            with torch.no_grad(), autocast_for(cpu, cache=False), \
                    FlopCounterMode(display=False, custom_mapping=formulas) as fc:
                teacher(idx[:, :-1])
            flops["teacher"] = fc.get_total_flops()
        snapshot_teacher = SnapshotTeacher(teacher) if teacher is not None else None
        with FlopCounterMode(display=False, custom_mapping=formulas) as fc:
            micro_batch_loss(model, model, snapshot_teacher, idx, args, cpu).backward()
        flops["student"] = fc.get_total_flops() - flops.get("teacher", 0)
        model.zero_grad(set_to_none=True)
        peak = None
        # memory in a pass of its own: under FlopCounterMode, checkpointed blocks keep what a run
        # frees (6.7x the memory per sequence in a small trace)
        if memory:
            tracker = MemTracker()
            tracker.track_external(model, optimizer, *([teacher] if teacher is not None else []))
            with tracker:
                micro_batch_loss(model, model, snapshot_teacher, idx, args, cpu).backward()
                optimizer.step()
            peak = max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
        params = sum(p.numel() for p in model.parameters())
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
    tokens = device_batch * cfg.seq_len
    return {"params": params, "optimizer_state_bytes": state, "peak_bytes": peak,
            "student_flops_per_token": flops["student"] / tokens,
            "teacher_flops_per_token": flops.get("teacher", 0) / tokens, "optimizer_flops": flops["optimizer"]}


@dataclasses.dataclass
class PlanTarget:
    processes: int
    device: str             # "cuda" or "cpu": what the snapshots are saved in (bf16 or fp32)
    train_tokens: int
    fitness_tokens: int
    val_tokens: int
    assumed_data: bool


def plan_run(args, cfg: GPTConfig, cycles: list[Cycle], target: PlanTarget, traces=None) -> dict:
    """The plan; memory is traced for CUDA targets and --dry-run (a CPU run's tests skip its cost).
    `traces`: (distilling step, plain step) from trace_step, to reuse them for several layouts."""
    distills = bool(args.distil_from) or (0 < args.distill_from_cycle <= args.cycles and args.cycles > 1)
    teachers = (args.distil_k or 1) if args.distil_from else 1  # an ensemble: at most K members' forwards
    memory = target.device == "cuda" or args.dry_run
    if traces is not None:
        step, plain = traces if distills else (traces[1], traces[1])
        memory = memory and step["peak_bytes"] is not None and plain["peak_bytes"] is not None
    else:
        step = trace_step(cfg, args, args.device_batch, args.checkpoint_activations, distills, memory)
        plain = trace_step(cfg, args, args.device_batch, args.checkpoint_activations, False) \
            if distills and memory else step
    groups = args.groups or math.gcd(args.bases, target.processes)
    group_size = target.processes // groups
    rate = args.peak_tflops * 1e12 * args.mfu  # FLOP/s per process
    muon = plain["optimizer_flops"] / group_size  # orthogonalisation sharded over the group
    fwd = step["teacher_flops_per_token"] or plain["student_flops_per_token"] / 3  # a forward is ~1/3 of fwd+bwd

    def step_seconds(c: Cycle, distill: bool) -> float:
        per_token = plain["student_flops_per_token"] + (teachers * step["teacher_flops_per_token"] if distill else 0.0)
        return (c.batch_seqs * cfg.seq_len * per_token / group_size + muon) / rate

    eval_seconds = (target.fitness_tokens + target.val_tokens) * fwd / group_size / rate
    base_seconds = sum(c.steps * step_seconds(c, bool(args.distil_from) or 0 < args.distill_from_cycle <= c.index
                                              and c.index > 1)
                       + eval_seconds for c in cycles)
    epoch_seconds = (target.train_tokens * plain["student_flops_per_token"] / group_size
                     + target.train_tokens / (args.batch_seqs * cfg.seq_len) * muon) / rate
    weight_bytes = step["params"] * (2 if target.device == "cuda" else 4)
    head_bytes = cfg.padded_vocab * cfg.d_model * (2 if target.device == "cuda" else 4)
    bodies = -(-teachers // group_size)  # member i's body on group rank i mod W (EnsembleTeacher)
    cache_bytes = 2 * (target.fitness_tokens + (target.val_tokens if args.val_probs else 0))
    checkpoint_bytes = 4 * step["params"] + step["optimizer_state_bytes"]
    snapshots = args.bases * args.cycles
    return {
        "target": dataclasses.asdict(target), "groups": groups, "group_size": group_size, "params": step["params"],
        "student_flops_per_token": plain["student_flops_per_token"], "teacher_flops_per_token": fwd,
        "optimizer_flops_per_step": plain["optimizer_flops"],
        "step_tokens": args.batch_seqs * cfg.seq_len,
        "peak_gib": plain["peak_bytes"] / GIB if memory else None,
        # the trace holds one teacher; an ensemble spread over the group adds, per process, the
        # bodies of its share of the members and the other members' heads (bf16 on CUDA)
        "peak_gib_distilling": (step["peak_bytes"] + (bodies - 1) * weight_bytes
                                + (teachers - bodies) * head_bytes) / GIB if distills and memory else None,
        "teachers": teachers, "teacher_bodies": bodies,
        "snapshot_gib": (weight_bytes + cache_bytes) / GIB, "snapshots": snapshots,
        "disk_gib": (snapshots * (weight_bytes + cache_bytes) + (args.bases + groups) * checkpoint_bytes) / GIB,
        "hours_per_epoch": epoch_seconds / 3600,
        "hours": math.ceil(args.bases / groups) * base_seconds / 3600,
    }


def _gib(x: float) -> str:
    return f"{x:.1f} GiB" if x >= 0.1 else f"{x * 1024:.1f} MiB"


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h >= 1 else f"{h * 60:.1f} min" if h >= 1 / 60 else f"{h * 3600:.1f} s"


def plan_lines(plan: dict, args) -> list[str]:
    t = plan["target"]
    peak = "traced for CUDA runs and --dry-run" if plan["peak_gib"] is None else \
        _gib(plan["peak_gib"]) + (f", distilling {_gib(plan['peak_gib_distilling'])}"
                                  if plan["peak_gib_distilling"] is not None else "") + " (estimate)"
    return [
        f"plan: {plan['params']:,} parameters | {t['processes']} process(es) on {t['device']}, {plan['groups']} group(s)"
        f" of {plan['group_size']} | data {t['train_tokens']:,} train, {t['fitness_tokens']:,} fitness, "
        f"{t['val_tokens']:,} val tokens" + (" (assumed: Slowrun's split; the data is not there yet)"
                                             if t["assumed_data"] else ""),
        f"plan: FLOPs per token: student {plan['student_flops_per_token']:.3e} (forward + backward), teacher "
        f"{plan['teacher_flops_per_token']:.3e} (forward) | per step of {plan['step_tokens']:,} tokens: student "
        f"{plan['step_tokens'] * plan['student_flops_per_token']:.3e}, teacher "
        f"{plan['step_tokens'] * plan['teacher_flops_per_token'] * plan['teachers']:.3e} (distilling"
        + (f": {plan['teachers']} ensemble members at most, {plan['teacher_bodies']} held by each process"
           if plan["teachers"] > 1 else "") + "), Muon "
        f"{plan['optimizer_flops_per_step']:.3e} ({plan['optimizer_flops_per_step'] / plan['group_size']:.3e} on "
        f"each of {plan['group_size']} process(es): sharded)",
        f"plan: peak memory per process at --device-batch {args.device_batch}"
        f"{' with' if args.checkpoint_activations else ' without'} activation checkpointing: {peak}",
        f"plan: disk: {plan['snapshots']} snapshots x {_gib(plan['snapshot_gib'])} (weights and caches) + "
        f"checkpoints = {_gib(plan['disk_gib'])}",
        f"plan: at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s per process: {_hours(plan['hours_per_epoch'])} "
        f"per epoch of one base, {_hours(plan['hours'])} for the population (estimate)",
    ]


def check_disk(plan: dict, run_dir: Path):
    """Refuse, with the numbers, a run whose snapshots, caches and checkpoints cannot fit."""
    import shutil
    have = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()) if run_dir.exists() else 0
    place = run_dir
    while not place.exists():
        place = place.parent
    free = shutil.disk_usage(place).free
    need = plan["disk_gib"] * GIB - have
    if need > free:
        raise UsageError(f"the run needs {need / GIB:.1f} GiB more for {plan['snapshots']} snapshots "
                         f"({plan['snapshot_gib']:.2f} GiB each) and checkpoints, and {place} has "
                         f"{free / GIB:.1f} GiB free; free space, choose another --runs-dir, or pass --val-probs 0")


# =============================================================================================
# Importing the reference's snapshots: score them into an ordinary run directory
# =============================================================================================

def import_slowrun(args, data: RunData, cfg: GPTConfig, cycles: list[Cycle], run_dir: Path, log: RunLog, device):
    """The reference saves model_{i}.pt, numbering node n's cycles n*C .. n*C + C-1: each becomes
    snapshot b{n}c{cycle} with its fitness and validation probabilities, so fit_prior.py and
    eval.py read it like a trained run. Snapshots already imported are kept (a rerun resumes)."""
    files = sorted(Path(args.import_slowrun).glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise UsageError(f"{args.import_slowrun} holds no model_{{i}}.pt; give the reference's checkpoint folder")
    for path in files:
        base, c = divmod(int(path.stem.split("_")[1]), args.cycles)
        if base >= args.bases:
            raise UsageError(f"{path}: beyond --bases {args.bases} x --cycles {args.cycles}; give the layout it was "
                             f"trained with")
        cycle, sid = cycles[c], snapshot_id(base, c + 1)
        if (run_dir / "snapshots" / f"{sid}.json").exists():
            continue
        model = GPT(cfg)
        model.load_state_dict(slowrun_state_dict(torch.load(path, map_location="cpu", weights_only=True), cfg))
        state = snapshot_state(model, device)
        model = model_from_state(cfg, state, device)  # score what is saved, as training does
        fitness = token_probs(model, data.fitness, args.seq_len, args.eval_batch, device)
        val = token_probs(model, data.val, args.seq_len, args.eval_batch, device)
        base_epochs = (cycle.first_pos + cycle.steps * cycle.batch_seqs * args.seq_len) / data.train.size
        record = snapshot_record(sid, base, c + 1, cycle.first_step + cycle.steps, base_epochs, fitness, val, data,
                                 bool(args.val_probs)) | {"imported_from": str(path)}
        save_snapshot(run_dir, record, state, fitness, val if args.val_probs else None)
        log.line(f"[b{base}] imported {path} as {sid} | val {record['val_loss']:.4f} nats | "
                 f"fitness {record['fitness_loss']:.4f}")
        log.event("snapshot", **record)


# =============================================================================================
# Main
# =============================================================================================

def model_config(args, vocab_size: int) -> GPTConfig:
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                    mlp_hidden=args.mlp_hidden, seq_len=args.seq_len, short_window=args.short_window,
                    dropout=args.dropout, loop_start=args.loop_layers[0], loop_end=args.loop_layers[1],
                    loop_repeats=args.loop_repeats, iha=args.iha, mtp_weight=args.mtp_weight,
                    zero_out_init=args.zero_out_init)
    cfg.check()
    return cfg


def setup_distributed(timeout_minutes: float) -> tuple[int, int, torch.device]:
    if dist.is_initialized():  # a group the caller started (the tests' fake world of 8)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return dist.get_world_size(), dist.get_rank(), device
    if "RANK" not in os.environ:
        return 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    timeout = datetime.timedelta(minutes=timeout_minutes)  # torch's default is 30 minutes (gloo)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timeout)
        return dist.get_world_size(), dist.get_rank(), torch.device("cuda", local)
    dist.init_process_group("gloo", timeout=timeout)
    return dist.get_world_size(), dist.get_rank(), torch.device("cpu")


class PeerTimeout(UsageError):
    pass


class Peers:
    """Signs of life of every process through the rendezvous store: a daemon thread bumps this
    process's counter every few seconds, and a stopped (hung node) or dead process stops bumping.
    So a failed collective can name the rank that stopped answering, and the end of training waits
    for slower process groups as long as they are alive, not for a fixed time."""

    def __init__(self, world: int, rank: int, timeout_minutes: float):
        self.world, self.rank, self.timeout_s = world, rank, timeout_minutes * 60
        self.beat_s = min(2.0, self.timeout_s / 4)
        self.store = dist.distributed_c10d._get_default_store()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self):
        while not self.stopping.is_set():
            try:
                self.store.add(f"q0/alive/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                return
            self.stopping.wait(self.beat_s)

    def close(self):
        """Stop beating before the process group (and its store) goes: a store call in flight at
        teardown aborts the process ("terminate called without an active exception")."""
        self.stopping.set()
        self.thread.join()

    def _beats(self, ranks) -> dict[int, int]:
        return {r: self.store.add(f"q0/alive/{r}", 0) for r in ranks}

    def silent(self) -> list[int]:
        """Ranks that show no sign of life over three beats."""
        try:
            before = self._beats(range(self.world))
            time.sleep(3 * self.beat_s)
            return [r for r, n in self._beats(range(self.world)).items() if n == before[r]]
        except Exception:  # noqa: BLE001 - no store, no names
            return []

    def join(self):
        """Wait until every process has finished, failing if an unfinished one shows no sign of
        life for the collective timeout."""
        self.store.add(f"q0/done/{self.rank}", 1)
        last = {r: (-1, time.monotonic()) for r in range(self.world)}
        while waiting := [r for r in range(self.world) if self.store.add(f"q0/done/{r}", 0) == 0]:
            now = time.monotonic()
            for r, n in self._beats(waiting).items():
                if n != last[r][0]:
                    last[r] = (n, now)
                elif now - last[r][1] > self.timeout_s:
                    raise PeerTimeout(self.hung_message([r]))
            time.sleep(min(1.0, self.beat_s))

    def hung_message(self, ranks: list[int]) -> str:
        return (f"rank {', '.join(map(str, ranks))} stopped answering for --collective-timeout-minutes "
                f"{self.timeout_s / 60:g} (its process or node hung or died); rerun the same command to resume")


def dry_run(args) -> int:
    """The plan alone: from the data when it is there, else (slowrun) from Slowrun's split."""
    try:
        try:
            data = load_data(args)
            sizes, vocab, assumed = (data.train.size, data.fitness.size, data.val.size), data.vocab_size, False
        except DataError:
            if args.preset != "slowrun":
                raise
            fitness = args.fitness_tokens
            sizes = (args.train_tokens or SLOWRUN_SPLIT["train"] - fitness, fitness, args.val_tokens or SLOWRUN_SPLIT["val"])
            vocab, assumed = SLOWRUN_SPLIT["vocab"], True
        processes = args.plan_gpus or int(os.environ.get("WORLD_SIZE", "1"))
        device = "cuda" if args.plan_gpus or torch.cuda.is_available() else "cpu"
        cycles = plan_cycles(args, sizes[0])
        make_layout(args, processes, 0, cycles, create_groups=False)
        plan = plan_run(args, model_config(args, vocab), cycles, PlanTarget(processes, device, *sizes, assumed))
        print("\n".join(plan_lines(plan, args)))
        check_disk(plan, Path(args.runs_dir) / args.run_name)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(args)
    world, rank, device = setup_distributed(args.collective_timeout_minutes)
    set_kernels(attention=args.attention, autocast=args.autocast)
    # heartbeats need a real rendezvous store (the tests' fake world of 8 has one without counters)
    peers = Peers(world, rank, args.collective_timeout_minutes) if world > 1 and dist.get_backend() != "fake" else None
    try:
        return train(args, world, rank, device, peers)
    except UsageError as e:  # a full disk, a tampered snapshot, a hung peer: whichever rank meets it says so
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError:  # a collective that failed (torch.distributed's errors are RuntimeErrors)
        silent = [r for r in peers.silent() if r != rank] if peers else []
        if not silent:
            raise
        print(f"error: {peers.hung_message(silent)}", file=sys.stderr, flush=True)
        return 2
    finally:
        if peers is not None:
            peers.close()


def train(args, world: int, rank: int, device: torch.device, peers: Peers | None) -> int:
    lock = None  # RunLock: held (its fd open) until this process exits
    try:
        data = load_data(args)
        cfg = model_config(args, data.vocab_size)
        cycles = plan_cycles(args, data.train.size)
        layout = make_layout(args, world, rank, cycles)
        if args.import_slowrun and world > 1:
            raise UsageError("--import-slowrun runs in one process; drop torchrun")
        run_dir = Path(args.runs_dir) / args.run_name
        distil = distil_members(args, data) if args.distil_from else None  # every rank checks and loads them
        if distil:  # the teacher is part of the population: a resume must find the same members
            args.distil_teacher = [{"snapshot": f"{d['run_dir']}:{d['record']['id']}",
                                    "weights_sha256": d["record"]["weights_sha256"], "weight": d["weight"]}
                                   for d in distil]
        resumed, plan = False, None
        if rank == 0:
            plan = plan_run(args, cfg, cycles, PlanTarget(world, device.type, data.train.size, data.fitness.size,
                                                          data.val.size, assumed_data=False))
            check_disk(plan, run_dir)
            run_dir, resumed, lock = prepare_run_dir(args, data, cfg, cycles)
        ok = [True]
    except UsageError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        ok = [False]
    except OSError as e:  # a read-only --runs-dir, a full disk
        if rank == 0:
            print(f"error: cannot write {e.filename} ({e.strerror}); choose another --runs-dir", file=sys.stderr)
        ok = [False]
    if world > 1:  # every rank learns whether all accepted the run (rank 0 checks the run dir) before anything starts
        ok = [all_reduce_(torch.tensor([0.0 if ok[0] else 1.0])).item() == 0]
    if not ok[0]:
        if world > 1:
            if peers is not None:
                peers.close()
            dist.destroy_process_group()
        return 2
    if rank > 0 and layout.group_rank == 0 and lock is None:
        lock = RunLock(run_dir, rank)  # every writer holds its slot of the run's lock for its life

    wandb_run = None
    if args.wandb_project and rank == 0:
        try:
            import wandb
        except ImportError:
            print("error: --wandb-project needs wandb: pip install wandb", file=sys.stderr)
            return 2
        wandb_run = wandb.init(project=args.wandb_project, name=args.run_name, config=vars(args), resume="allow")
    log = RunLog(run_dir, enabled=layout.group_rank == 0, wandb_run=wandb_run)
    if rank == 0:
        if resumed:
            log.line(f"resuming {run_dir} (world size {world})")
        else:
            log_header(log, args, world)
        for line in plan_lines(plan, args):
            log.line(line)
        epochs = sum(c.epochs for c in cycles)
        log.line(f"run {run_dir} | {args.bases} bases x {args.cycles} cycles = {args.bases * args.cycles} snapshots | "
                 f"{epochs:g} epochs per base, budget {epochs * args.bases:g} epochs | train {data.train.size:,} "
                 f"tokens, fitness {data.fitness.size:,}, val {data.val.size:,} | {layout.groups} group(s) of "
                 f"{layout.group_size} process(es) on {device.type}")
    if world > 1:
        barrier()
    try:
        if args.import_slowrun:
            import_slowrun(args, data, cfg, cycles, run_dir, log, device)
        if distil and rank == 0:
            log.line(f"teacher: {args.distil_from}, budget K={args.distil_k}: " + ", ".join(
                f"{d['run_dir'].name}:{d['record']['id']} {d['weight']:.3f}" for d in distil)
                + f" | {len(distil)} teacher forward passes per training token | student from {args.distil_init}")
        for base in [] if args.import_slowrun else layout.bases:
            BaseTrainer(args, base, layout, data, cfg, cycles, run_dir, log, device, distil).run()
    except UsageError as e:  # a diverged loss, an unloadable checkpoint: torchrun stops the other ranks
        if layout.group_rank == 0:
            print(f"error: {e}", file=sys.stderr)
            log.line(f"error: {e}", echo=False)
        return 2
    if peers is not None:
        peers.join()  # slower groups may still be training: wait while they are alive
    if rank == 0:
        records = list_snapshots(run_dir)
        manifest = {**load_run(run_dir), "snapshots": records}
        atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=1))
        pop = PopulationTracker(run_dir).update()
        uniform = f"{pop['uniform_val_loss']:.4f}" if pop["uniform_val_loss"] is not None else "n/a"
        log.line(f"done: {pop['snapshots']} snapshots, {pop['epochs_spent']:.2f} epochs spent | best single "
                 f"{pop['best_single_val_loss']:.4f} ({pop['best_single']}) | uniform ensemble val {uniform} | "
                 f"next: python fit_prior.py {run_dir} && python eval.py {run_dir} --prior {run_dir}/prior.json")
    if world > 1:
        if peers is not None:
            peers.close()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
