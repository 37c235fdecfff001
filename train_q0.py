"""q0: hyper-epoch pretraining, the experiment.

A fixed dataset, a large compute budget: instead of training one model for many epochs (it
saturates after ~16), train a *population*. A few parallel trajectories ("bases") run a
cyclic, anti-correlated LR / weight-decay schedule and save a snapshot at the end of every
cycle; each cycle distils from the previous snapshot of its own base (chain distillation);
fit_prior.py then weights the snapshots and eval.py scores the probability-averaged ensemble.

    python train_q0.py --preset cpu                   # a laptop CPU, a few minutes
    python train_q0.py --preset cpu --epochs 64       # the CPU record: the budget recipe picks the layout
    torchrun --nproc_per_node=8 train_q0.py           # the 1.8B Slowrun configuration, 8xH100

Read top to bottom: configuration, attention and model, optimiser, cyclic schedule, chain
distillation and teachers, snapshot scoring, training one base, main. Everything that makes a
run safe to kill, rerun, resume and plan (the run directory, checkpoints, locks, process groups,
the preflight plan) is in q0_run.py beside this file; an experiment never needs to open it. The
log of every run embeds both files, and data/shards.py, each under its own header.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import math
import os
import sys
import time
from contextlib import nullcontext

# The reference's allocator setting: CUDA memory in segments that grow in place, so what one phase
# of a cycle frees (scoring, a teacher) is reused by the next instead of fragmenting. Read at the
# first CUDA allocation; a user's own setting wins.
os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import q0_run
from data import shards
from data.shards import CHOICE, PATH, SWITCH, UNIT, Range, UsageError, at_least, doc_starts

# =============================================================================================
# Configuration
# =============================================================================================
# Flags default to the 1.8B Slowrun q0 record configuration (5 bases x 96 cycles x 2 epochs,
# 480 snapshots). A preset replaces the size-related defaults; explicit flags override both.

PRESETS = {
    # The defaults below; a device batch of 1 (the reference's micro-batch is 2): with DDP's gradient
    # buckets, a bf16 teacher and the allocator's slack counted, the --dry-run plan puts 2 sequences
    # of 2048 over an H100's 79.6 GiB and 1 at 58 GiB; checkpointing 2 costs ~1/3 more compute.
    "slowrun": dict(device_batch=1),
    # README's main job: bytes-level Shakespeare, 32K training tokens, so a 1.2M-parameter model
    # overfits within the 16-epoch budget: the data-limited regime q0 is for. The fitness set is
    # the first 32,768 tokens of the first play: priors within 0.001 nats of the whole play's
    # (99,743 tokens, every CPU record before 2026-12-05) at half the scoring
    # (records/2026-12-05_fitness-size-cpu). One base: 6 epochs, then five 2-epoch cycles distilling. The record's
    # architecture with two choices measured at this scale (--epochs 16, seed 0, q0 prior loss;
    # records/2026-11-24_record-model-cpu): modded-nanogpt's zero init of the residual branches
    # (1.9912 against 2.0612 with the record's init) and no layer looping (2.0661 looping layer 2
    # four more times, 1.5x the time, against 2.0612).
    "cpu": dict(
        data_dir="data/shakespeare/bytes", n_layer=4, d_model=128, n_head=4, mlp_hidden=384,
        seq_len=128, short_window=64, batch_seqs=32, device_batch=8, fitness_tokens=32768,
        train_tokens=32768, val_tokens=32768, bases=1, cycles=6, cycle_epochs=2.0,
        first_cycle_epochs=6.0, distil_from_cycle=2, lr_matrix=0.02, lr_embed=0.05,
        lr_head=0.004, lr_scalar=0.02, weight_decay=0.2, eval_batch=32,
        loop_layers=[2, 2], zero_out_init=True,
    ),
    # The tests: seconds per run on their short documents; every piece of the architecture on (layer
    # 2 looped once more), and a fitness set of 2,048 tokens (the head of the first play) beside 4K
    # training tokens: the whole play would make scoring most of a run.
    "tiny": dict(
        data_dir="data/shakespeare/bytes", d_model=32, n_head=2, mlp_hidden=64,
        seq_len=32, short_window=16, batch_seqs=8, device_batch=8, fitness_tokens=2048,
        train_tokens=4096, val_tokens=2048, bases=1, cycles=3, cycle_epochs=1.0,
        first_cycle_epochs=1.0, distil_from_cycle=2, lr_matrix=0.02, lr_embed=0.05,
        lr_head=0.004, lr_scalar=0.02, weight_decay=0.2, eval_batch=16,
        n_layer=4, loop_layers=[2, 3], loop_repeats=1,
    ),
}



def build_parser() -> argparse.ArgumentParser:
    p = shards.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
                   help="this many tokens carved from the front of the training data: whole documents while "
                        "they fit, then the head of the next (its tail unused); never trained on; the prior "
                        "is fitted on them")
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
                        "cap (slowrun: 1, as 2 does not fit an 80 GB H100 while distilling; cpu, tiny: 8), "
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
    g = p.add_argument_group("chain distillation (--distill-* spellings are accepted too)")
    g.add_argument("--distil-from-cycle", "--distill-from-cycle", type=int, default=9,
                   help="first cycle that distils from the previous snapshot (0: never)")
    g.add_argument("--distil-alpha", "--distill-alpha", type=float, default=0.45,
                   help="weight a of the teacher: (1-a) CE + a T^2 KL (chain and ensemble distillation alike; "
                        "with --distil-from the default is 0.8)")
    g.add_argument("--distil-temperature", "--distill-temperature", type=float, default=1.2,
                   help="temperature T of the KL term")
    g = p.add_argument_group("ensemble distillation: one student of a prior's ensemble, at 1 forward pass")
    g.add_argument("--distil-from", default="",
                   help="prior.json from fit_prior.py: every cycle learns from its --distil-k ensemble (log of the "
                        "weighted mean of the members' probabilities at --distil-temperature); with --epochs E "
                        "the student is one base of E epochs without snapshot noise. The run is an ordinary one")
    g.add_argument("--distil-k", type=int, default=0, help="which budget K of the prior (0: its largest)")
    g.add_argument("--distil-init", choices=["scratch", "best"], default="scratch",
                   help="the student starts from scratch, or as the prior's member with the lowest fitness loss")
    g = p.add_argument_group("evaluation and kernels")
    g.add_argument("--val-probs", type=int, choices=[0, 1], default=1,
                   help="cache every snapshot's validation probabilities (what eval.py's fast path reads)")
    g.add_argument("--eval-batch", type=int, default=8, help="sequences per forward pass in evaluation")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile the model (auto: on CUDA only)")
    g.add_argument("--attention", choices=ATTENTION_KERNELS, default="auto",
                   help="attention kernel: flex (FlexAttention, block-sparse windows) or sdpa (auto: flex on CUDA)")
    g.add_argument("--autocast", choices=["auto", "bf16", "off"], default="auto",
                   help="bf16 autocast of the forward passes (auto: on CUDA only)")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each block's activations in the backward pass: far less memory, ~1/3 more compute")
    q0_run.add_run_flags(p)  # runs, logs, timeouts, wandb, the preflight plan: none changes the population
    return p


# Every flag's meaningful values, checked once right after parsing. Every flag has an entry (a
# test enumerates the parser): a flag added without one fails the tests.
RANGES = {
    "preset": CHOICE, "data_dir": PATH, "train_tokens": at_least(0), "val_tokens": at_least(2, also=(0,)),
    "fitness_tokens": at_least(2),  # a target to fit on
    "n_layer": at_least(1), "d_model": at_least(2), "n_head": at_least(1), "mlp_hidden": at_least(1),
    "seq_len": at_least(1), "short_window": at_least(1), "dropout": Range(lo=0, hi=1, hi_open=True),
    "loop_layers": at_least(0), "loop_repeats": at_least(0), "iha": SWITCH, "mtp_weight": at_least(0),
    "zero_out_init": SWITCH,
    "batch_seqs": at_least(1), "device_batch": at_least(1), "lr_matrix": at_least(0), "lr_embed": at_least(0),
    "lr_head": at_least(0), "lr_scalar": at_least(0), "lr_iha": at_least(0), "weight_decay": at_least(0),
    "decay_embeddings": SWITCH, "muon_momentum": Range(lo=0, hi=1, hi_open=True), "muon_eq_r": SWITCH,
    "normuon": SWITCH, "cautious_wd": SWITCH, "grad_clip": at_least(0),
    "epochs": at_least(0), "bases": at_least(1), "cycles": at_least(1), "cycle_epochs": at_least(0, lo_open=True),
    "first_cycle_epochs": at_least(0, lo_open=True), "groups": at_least(0), "seed": at_least(0),
    "lr_floor": Range(lo=0, hi=1, hi_open=True), "wd_floor": UNIT, "snapshot_noise": at_least(0),
    "batch_schedule": at_least(0, lo_open=True),
    "distil_from_cycle": at_least(0), "distil_alpha": UNIT, "distil_temperature": at_least(0, lo_open=True),
    "distil_from": PATH, "distil_k": at_least(0), "distil_init": CHOICE,
    "val_probs": CHOICE, "eval_batch": at_least(1), "compile": CHOICE, "attention": CHOICE, "autocast": CHOICE,
    "checkpoint_activations": SWITCH,
} | q0_run.RUN_RANGES

# Flags that do not change the population, besides the run's own (q0_run.RUN_FLAGS): a resumed run
# may change these freely. Placement flags (--device-batch, --groups, and the process count, which
# is no flag) change only the floating-point reduction order: dropout masks are drawn per sequence
# of the global batch, whatever micro-batch or process it lands on (tests/test_train.py measures both).
NON_POPULATION_FLAGS = {"preset", "device_batch", "groups", "eval_batch", "compile", "attention", "autocast",
                        "checkpoint_activations"}


# The --epochs recipe: how a budget of E epochs (summed over bases) splits into bases, cycles and
# cycle lengths. Every base first trains half its budget, at most `first_max` epochs, as one
# stretch before its first snapshot, then runs cycles of 1/8 of its budget, at most `cycle_max`
# epochs: small budgets pack short cycles at the end, large ones run many cycles. One base takes
# budgets up to `one_base` epochs; each doubling beyond adds a base (the published guidance).
# The three numbers depend on the scale, so each preset has its own:
#   cpu, tiny: measured by the CPU study (records/2026-11-23_shakespeare-cpu: 27 allocations at 1
#              to 64 epochs): first 8 (the single model's best is 10), cycles of 1 epoch; at 64
#              epochs two bases beat one and four (at 32, two beat one by 0.011 on one seed).
#              Searched again with the record's model, whose single model is best at 12 to 16
#              epochs, on Python's docs at 8 to 64 epochs and on Shakespeare at 32 and 64
#              (records/2026-12-05_two-corpora-cpu): at 32 and 64 every other layout loses on both
#              corpora (a first stretch of 12 by 0.025 to 0.050 nats, 2-epoch cycles or a second
#              base at 32 by 0.013 to 0.072); 2-epoch cycles gain 0.008 at 16 on Python's docs only.
#              Kept.
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
MAX_SNAPSHOTS = 100_000  # bases x cycles: the record has 480; more is a typo (or --epochs 1e308), refused up front


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
    """The flags, resolved once: the preset's defaults, every range checked, the --epochs recipe's
    layout, an ensemble student's defaults and the run's name. Nothing writes into it afterwards."""
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    # The preset's device batch is a cap, applied once the layout is known (q0_run.choose_device_batch).
    parser.set_defaults(**{k: v for k, v in PRESETS[preset].items() if k != "device_batch"})
    args = shards.parse_checked(parser, RANGES, argv)
    model_config(args, vocab_size=2)  # shapes the model cannot take, before any data is read
    typed = shards.typed_flags(build_parser(), argv)  # typed flags win over the recipe and the student's defaults
    if args.epochs:
        given = {k: getattr(args, k) for k in RECIPE_LAYOUT_FLAGS if k in typed}
        if args.distil_from:  # a student: one base, unless the user says otherwise
            given = {"bases": 1} | given
        vars(args).update(recipe(args.epochs, RECIPES[args.preset], given))
    if args.distil_from and "snapshot_noise" not in typed:
        args.snapshot_noise = [0.0, 0.0]  # a student's snapshots are its own checkpoints, not a population
    if args.distil_from and "distil_alpha" not in typed:
        args.distil_alpha = DISTIL_ALPHA
    if args.bases * args.cycles > MAX_SNAPSHOTS:  # plan_cycles would build them all before a word is said
        n = lambda x: f"{x:,}" if x < 10 ** 12 else f"{float(x):.1e}"  # noqa: E731 - a count of 300 digits is no help
        said = f"--epochs {args.epochs:g} makes {n(args.bases)} bases x {n(args.cycles)} cycles" if args.epochs \
            else f"--bases {n(args.bases)} x --cycles {n(args.cycles)}"
        raise UsageError(f"{said} = {n(args.bases * args.cycles)} snapshots; a population holds at most "
                         f"{MAX_SNAPSHOTS:,}: give a smaller budget")
    if not args.run_name:
        kind = "distil-" if args.distil_from else ""
        args.run_name = f"{args.preset}-{kind}{args.bases}x{args.cycles}-seed{args.seed}"
    if args.run_name in (".", "..") or any(c in args.run_name for c in "/\\\0") or args.run_name.startswith("."):
        raise UsageError(f"--run-name {args.run_name!r}: give a plain folder name (no '/', not starting with '.'); "
                         f"the run goes under --runs-dir")
    return args


def device_batch_cap(args) -> int:
    """Without --device-batch: the largest device batch, up to the preset's (or 8), that divides."""
    return PRESETS[args.preset].get("device_batch", 8)


# =============================================================================================
# Attention: causal, optionally in a sliding window
# =============================================================================================
# Query i sees key j iff 0 <= i - j <= window (the reference's convention; window >= T - 1 is
# plain causal). On CUDA, FlexAttention with a block mask: a window skips the blocks it masks
# out and runs a fused kernel, where a boolean SDPA mask rules out the flash kernels and does the
# whole square. SDPA is the CPU path and the fallback (--attention sdpa). Proven on a CPU:
# FlexAttention's forward, and its op's own (dense) backward past torch's CPU refusal, equal
# SDPA's; fake CUDA tensors take its forward and backward through the compiled graphs in bf16.
# Its fused CUDA kernels are checked against SDPA at start-up (check_flex_attention); a failure
# switches the run to SDPA and says so.

ATTENTION_KERNELS = ("auto", "flex", "sdpa")


KERNELS = {"attention": "auto", "autocast": "auto"}  # set once by main() from --attention, --autocast


def set_kernels(attention: str = "auto", autocast: str = "auto"):
    KERNELS.update(attention=attention, autocast=autocast)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention of (B, H, T, D) tensors; query i sees keys i - window .. i."""
    kernel = KERNELS["attention"]
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


FLEX_CHECK_TOL = 0.05  # of the largest |value|; bf16 kernels measure under 0.01, a mask one key off 0.25


def check_flex_attention(device=None, head_dim: int = 64) -> str | None:
    """Where attention would run FlexAttention (--attention auto on CUDA, or flex), its forward and
    backward through flex_attend against SDPA's, on small random bf16 tensors in a window and plain
    causal. An exception or a gap over FLEX_CHECK_TOL switches attention to SDPA and returns the
    one-line note; None where nothing ran or the check passed. `device`: this process's by default
    (cuda:LOCAL_RANK where CUDA is, else the CPU)."""
    if device is None:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    device, kernel = torch.device(device), KERNELS["attention"]
    if kernel == "sdpa" or (kernel == "auto" and device.type != "cuda"):
        return None
    try:
        gap = _flex_gap(device, head_dim)
        reason = f"output or gradients off SDPA's by {gap:.2g} of their largest value, over {FLEX_CHECK_TOL}"
    except Exception as e:  # noqa: BLE001 -- whatever stops the kernel, it is not proven here
        gap, reason = math.inf, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    finally:  # the check's shapes would count toward the recompile limit eager flex_attend calls share
        torch._dynamo.reset()
    if gap <= FLEX_CHECK_TOL:
        return None
    KERNELS["attention"] = "sdpa"
    return f"attention: FlexAttention failed its start-up check against SDPA ({reason}); using SDPA"


def _flex_gap(device: torch.device, head_dim: int) -> float:
    """The largest gap of flex_attend's output and dq, dk, dv from SDPA's (fp32, of the same bf16
    inputs), each relative to its largest |value|; T = 300 is not a multiple of the block size."""
    gap, T = 0.0, 300
    generator = torch.Generator(device).manual_seed(0)  # the run's random streams untouched
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext(), torch.enable_grad():
        for window in (37, T - 1):
            q, k, v, dout = (torch.randn(2, 2, T, head_dim, device=device, generator=generator).bfloat16()
                             for _ in range(4))
            inputs = [t.requires_grad_() for t in (q, k, v)]
            out = flex_attend(*inputs, window)
            got = [out, *torch.autograd.grad(out, inputs, dout)]
            exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
            ref = sdpa_attend(*exact, window)
            for a, b in zip(got, [ref, *torch.autograd.grad(ref, exact, dout.float())]):
                err = ((a.float() - b).abs().max() / b.abs().max()).item()
                gap = max(gap, err if math.isfinite(err) else math.inf)
    return gap


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
        if self.loop_end < self.loop_start:
            raise UsageError(f"--loop-layers {self.loop_start} {self.loop_end}: the loop's END comes before its "
                             f"START; give START END with END > START (or END = START for no loop)")
        if self.loop_end > self.loop_start and not (
                self.encoder_layers <= self.loop_start < self.loop_end <= self.n_layer):
            raise UsageError(f"--loop-layers {self.loop_start} {self.loop_end}: the looped block must lie in the "
                             f"decoder, layers {self.encoder_layers} to {self.n_layer} of --n-layer {self.n_layer}")


def model_config(args, vocab_size: int) -> GPTConfig:
    """The model the flags describe (checked: one line naming the flag it cannot take)."""
    cfg = GPTConfig(vocab_size=vocab_size, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                    mlp_hidden=args.mlp_hidden, seq_len=args.seq_len, short_window=args.short_window,
                    dropout=args.dropout, loop_start=args.loop_layers[0], loop_end=args.loop_layers[1],
                    loop_repeats=args.loop_repeats, iha=args.iha, mtp_weight=args.mtp_weight,
                    zero_out_init=args.zero_out_init)
    cfg.check()
    return cfg


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


class KVCache:
    """Keys and values for incremental decoding (GPT.decode, sample.py): the tokens given so far,
    kept per block APPLICATION, not per layer: a looped layer runs several times on different
    inputs, so each application (its attention's dropout site, unique per application) has its own
    entry. Every entry is allocated at seq_len on first use, in the dtype and device of the keys it
    gets; a sliding-window layer keeps them all and masks (simple; memory 2 x applications x B x
    seq_len x d_model). It REFUSES to go past seq_len rather than sliding: RoPE's tables and the
    training context end there, and a slid cache would hold keys computed from a longer context
    than the model ever saw; a caller that wants more starts a new cache from the last tokens."""

    def __init__(self, seq_len: int):
        self.seq_len, self.pos, self.kv = seq_len, 0, {}

    def reserve(self, t: int) -> int:
        """Room for t new tokens, or one line saying why not; returns their first position."""
        if self.pos + t > self.seq_len:
            raise UsageError(f"the KV cache holds the model's {self.seq_len} positions (its --seq-len) and {self.pos} "
                             f"are taken: {t} more do not fit; start a new cache from the last tokens")
        return self.pos

    def advance(self, t: int):
        """After every application has stored its t new keys and values."""
        self.pos += t

    def attend(self, site: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        """Causal attention of the new tokens' (B, H, t, hd) q over every cached key of `site` and the
        new ones, query at position p seeing keys p - window .. p (sdpa_attend's mask, offset)."""
        B, H, t, hd = k.shape
        if site not in self.kv:
            self.kv[site] = (k.new_zeros(B, H, self.seq_len, hd), v.new_zeros(B, H, self.seq_len, hd))
        keys, values = self.kv[site]                                      # (B, H, seq_len, hd) each
        end = self.pos + t
        keys[:, :, self.pos:end], values[:, :, self.pos:end] = k, v
        distance = torch.arange(self.pos, end, device=q.device)[:, None] - torch.arange(end, device=q.device)
        visible = (distance >= 0) & (distance <= window)                  # (t, end)
        return F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=visible)


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

    def forward(self, x: torch.Tensor, x0: torch.Tensor, rope, seeds=None, site: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
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
        # CUDA autocast runs rms_norm in fp32 beside a bf16 v, and FlexAttention takes the mix as it
        # comes: one dtype, v's (a no-op on the CPU, whose autocast keeps rms_norm in bf16)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if cache is None:
            y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.window)  # (B, H, T, hd)
        else:  # decoding: this application's earlier keys and values join the new ones
            y = cache.attend(site, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.window)
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

    def forward(self, x: torch.Tensor, x0: torch.Tensor, rope, seeds=None, site: int = 0,
                cache: KVCache | None = None) -> torch.Tensor:
        """site: which block application this is (dropout masks, and KV cache entries, differ per application)."""
        x = x + self.attn(norm(x), x0, rope, seeds, 2 * site, cache)
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

    def _layer(self, i: int, x: torch.Tensor, x0: torch.Tensor, rope, seeds, site: int,
               cache: KVCache | None = None) -> torch.Tensor:
        """One block application, the residual/x0 mix before it (applied on every pass)."""
        x = self.resid_scale[i] * x + self.x0_scale[i] * x0
        if self.checkpoint_blocks and self.training:
            return torch.utils.checkpoint.checkpoint(self.blocks[i], x, x0, rope, seeds, site, use_reentrant=False)
        return self.blocks[i](x, x0, rope, seeds, site, cache)

    def hidden(self, idx: torch.Tensor, seeds: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The normed final hidden states (B, T, D): an encoder that keeps its outputs, then the
        decoder (looped block included) that adds encoder output n-1-i before layer i. With a
        cache (decoding; training never passes one), idx are the tokens after the cached ones:
        everything but attention is per token, so the same loop serves, attention reading the cache."""
        T, n = idx.size(1), self.cfg.n_layer
        if cache is None:
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        else:
            rope = self._decode_rope(cache, T)
        x0 = norm(self.embed(idx))
        x, skips = x0, []
        for i in range(self.cfg.encoder_layers):
            x = self._layer(i, x, x0, rope, seeds, site=i, cache=cache)
            skips.append(x)
        for site, i in enumerate(self.cfg.decoder_order(), start=self.cfg.encoder_layers):
            if n - 1 - i < len(skips):
                x = x + self.skip_scale[n - 1 - i] * skips[n - 1 - i]
            x = self._layer(i, x, x0, rope, seeds, site, cache)
        if cache is not None:
            cache.advance(T)
        return norm(x)

    def _decode_rope(self, cache: KVCache, T: int):
        """RoPE of the T new tokens: positions offset by the cache's length (refused past seq_len)."""
        if self.training:  # dropout would draw new masks on every call: decoding is for eval mode
            raise ValueError("GPT.decode and hidden(cache=...) run in eval mode; call model.eval() first")
        s = cache.reserve(T)
        return self.rope_cos[s:s + T], self.rope_sin[s:s + T]             # (T, hd/2) each

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.seq_len)

    def decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, t, V) of t new tokens idx (B, t) that follow the cache's (a prompt's prefill, then
        one token at a time), their keys and values added to it: equal to the last t positions of
        forward() over the whole sequence (tests/test_sample.py)."""
        return self.logits(self.hidden(idx, cache=cache))

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


# =============================================================================================
# Optimiser: Muon for the block matrices, AdamW for embedding, head, scalars and head mixing
# =============================================================================================
# Muon, as the record runs it, on matrices stacked by shape: Nesterov momentum; MuonEq-R (each
# row of the update normalised); 5 Polar Express steps in bf16 (arXiv:2505.16932's
# coefficients); NorMuon (a running second moment along the reduction dimension rescales the
# update, keeping its norm); LR x sqrt(max(1, rows/cols)); cautious weight decay (only where the
# update and the weight agree in sign) scaled by that LR. The scalars meet the tensors in the
# record's dtypes: it hands each to its step as an fp32 tensor (fp32() here), cast to the
# gradient's dtype (momentum) or the bf16 update's (beta2, LR, WD), AdamW's kept in fp32. In
# double, 1 - 0.95 is not fp32's, and a bf16 element it flips Polar Express amplifies (steps off
# by up to 5e-3 from the record's).

POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def fp32(x: float) -> torch.Tensor:
    """A scalar of the step as the record hands it over: an fp32 tensor (on the CPU), so that
    1 - momentum, lr * wd, beta ** t, ... are computed in fp32 (or cast on), not in double."""
    return torch.tensor(x, dtype=torch.float32)


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
    return torch.cat(q0_run.all_gather(mine, group))[:G.size(0)]


def muon_direction(grad, momentum_buf, moment_buf, momentum: float, beta2: float, eq_r: bool, normuon: bool,
                   group=None):
    """The update direction of a stack of matrices (n, rows, cols); advances both buffers. Every
    rank of `group` holds the same gradients (DDP averaged them), so all but the orthogonalisation
    runs everywhere and the state stays identical on every rank."""
    momentum = fp32(momentum).to(grad.dtype)
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
    moment_buf.lerp_(v_mean.to(moment_buf.dtype), 1 - fp32(beta2).to(u.dtype))
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

    @torch.no_grad()
    def init_state(self):
        """The buffers the first step would create (zeros), created now (the first-step probe holds
        them); a step that finds them goes on as if it had made them."""
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_state(group["params"])
            else:
                for p in group["params"]:
                    self._adamw_state(p)

    def _muon_state(self, params: list) -> dict:
        state = self.state[params[0]]  # the stack's buffers live with its first matrix
        if not state:
            (rows, cols), like = params[0].shape, dict(dtype=params[0].dtype, device=params[0].device)
            state["momentum"] = torch.zeros(len(params), rows, cols, **like)
            state["moment"] = torch.zeros(len(params), rows, 1, **like) if rows >= cols else \
                torch.zeros(len(params), 1, cols, **like)
        return state

    def _adamw_state(self, p) -> dict:
        state = self.state[p]
        if not state:
            state["step"], state["exp_avg"], state["exp_avg_sq"] = 0, torch.zeros_like(p), torch.zeros_like(p)
        return state

    def _muon(self, group):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        state, (rows, cols) = self._muon_state(params), params[0].shape
        P = torch.stack(params)                                         # (n, rows, cols)
        u = muon_direction(torch.stack([p.grad for p in params]), state["momentum"], state["moment"],
                           group["momentum"], group["beta2"], group["eq_r"], group["normuon"], self.process_group)
        lr = fp32(group["lr"] * max(1.0, rows / cols) ** 0.5).to(u.dtype)
        wd = fp32(group["weight_decay"]).to(u.dtype)
        decay = lr * wd * P
        if group["cautious"]:
            decay = decay * ((u * P) >= 0)
        P.sub_(lr * u + decay)
        torch._foreach_copy_(params, list(P.unbind(0)))

    def _adamw(self, p, group):
        state = self._adamw_state(p)
        state["step"] += 1
        t, lr, wd, eps = (fp32(x) for x in (state["step"], group["lr"], group["weight_decay"], group["eps"]))
        beta1, beta2 = (fp32(b) for b in group["betas"])
        p.mul_(1 - lr * wd)
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].lerp_(p.grad.square(), 1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt() + eps
        p.add_(state["exp_avg"] / denom, alpha=(-lr / (1 - beta1 ** t)).item())  # the record's order, not addcdiv's


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

    def pos(self, step_in_cycle: int, seq_len: int) -> int:
        """The stream position (tokens) where step `step_in_cycle` of this cycle starts."""
        return self.first_pos + step_in_cycle * self.batch_seqs * seq_len


def plan_cycles(args, train_tokens: int) -> list[Cycle]:
    cycles, step, pos = [], 0, 0
    for c in range(1, args.cycles + 1):
        epochs = args.first_cycle_epochs if c == 1 else args.cycle_epochs
        middle = args.cycles >= 4 and args.cycles / 4 <= c - 1 < 3 * args.cycles / 4
        batch = args.batch_seqs if middle or args.cycles < 4 else max(1, round(args.batch_seqs * args.batch_schedule))
        exact = epochs * train_tokens / (batch * args.seq_len)
        if not math.isfinite(exact):
            raise UsageError(f"cycle {c} ({epochs:g} epochs of {train_tokens} tokens) has more steps than a number "
                             f"holds; give a shorter cycle")
        steps = round(exact)
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
# Chain distillation: the loss, and the teachers
# =============================================================================================
LOSS_CHUNK_TOKENS = 4096  # tokens whose fp32 logits (x vocabulary) exist at once in the loss: 0.8 GB at 50K


def token_chunks(n: int, size: int = LOSS_CHUNK_TOKENS) -> list[slice]:
    """The slices a head runs over, a chunk of tokens at a time (the loss, and scoring)."""
    return [slice(s, s + size) for s in range(0, n, size)]


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
    for s in token_chunks(x.size(0), chunk):
        c, k = torch.utils.checkpoint.checkpoint(
            _chunk_terms, model, x[s], targets[s], teacher, teacher_x[s] if teacher is not None else None,
            temperature, use_reentrant=False)
        ce, kl = ce + c, kl + k
    loss = ce / x.size(0)
    if mtp is not None and mtp_weight > 0:
        loss = loss + mtp_weight * mtp
    if teacher is None:
        return loss
    return (1 - alpha) * loss + alpha * temperature ** 2 * kl / x.size(0)



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
        rows = torch.cat(q0_run.all_gather(idx, self.group))                            # (W*B, T)
        # one dtype on every rank (the heads'), and zeros where a rank has fewer bodies than ceil(K/W)
        # each body runs every rank's rows as that rank's micro-batch of B, the shapes a one-process
        # teacher runs: where a kernel's rounding depends on the batch (a BLAS's blocking), the
        # spread teacher still gives the one-process teacher's bits
        mine = [torch.cat([m.features(r) for r in rows.split(B)]).to(m.head_weight.dtype)
                for m in self.members[self.rank::W]]                                     # (W*B, T, D)
        head = self.members[0].head_weight
        blank = head.new_zeros(rows.size(0), rows.size(1), head.size(1))
        f = torch.stack(mine + [blank] * (-(-K // W) - len(mine)), dim=2)      # (W*B, T, slots, D)
        got = q0_run.all_to_all(list(f.split(B)), self.group)                           # rank s: (B, T, slots, D)
        return torch.stack([got[i % W][:, :, i // W] for i in range(K)], dim=2)  # (B, T, K, D)

    def log_probs(self, f: torch.Tensor, temperature: float) -> torch.Tensor:
        out = None
        for i, m in enumerate(self.members):  # f: (n, K, D)
            lp = m.log_probs(f[:, i], temperature) + self.log_w[i]
            out = lp if out is None else torch.logaddexp(out, lp)
        return out


Teacher = SnapshotTeacher | EnsembleTeacher


def chain_distills(args, cycle_index: int) -> bool:
    """Chain distillation: from --distil-from-cycle on (never the first cycle), the previous
    snapshot of the base teaches the cycle."""
    return 0 < args.distil_from_cycle <= cycle_index and cycle_index > 1


def distils(args, cycle_index: int) -> bool:
    """Whether a cycle learns from a teacher: every cycle of an ensemble student (--distil-from),
    else the cycles chain distillation teaches."""
    return bool(args.distil_from) or chain_distills(args, cycle_index)


# =============================================================================================
# Snapshot scoring: every target token's probability, the same tokens whatever the hardware
# =============================================================================================
def autocast_for(device: torch.device, cache: bool = True):
    """bf16 autocast on CUDA (--autocast auto), or wherever --autocast bf16 asks (the CPU tests).
    cache=False: no bf16 copies of weights kept for a backward pass (the teacher has none)."""
    mode = KERNELS["autocast"]
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
            for s in token_chunks(x.size(0)):  # logits a chunk at a time, as in training
                z = model.logits(x[s]).float()  # log p(y) = z_y - logsumexp(z)
                logp[s] = z.gather(-1, targets[s, None]).squeeze(-1) - z.logsumexp(-1)
        src, dst = (to_device(torch.from_numpy(np.concatenate(x)), device) for x in (src, dst))
        out.index_copy_(0, dst, logp[src].exp())
    model.train(was_training)
    if world > 1:
        q0_run.all_reduce_(out, group)  # each position was filled by exactly one rank
    return out.cpu().numpy()


# =============================================================================================
# Training one base
# =============================================================================================

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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto the device without stalling the host (pinned, asynchronous on CUDA)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def micro_batch_loss(forward, model: GPT, teacher: Teacher | None, rows: torch.Tensor, device,
                     seeds: torch.Tensor | None = None, alpha: float = 0.45, temperature: float = 1.2) -> torch.Tensor:
    """The loss of one micro-batch (B, T + 1) as training runs it (and the preflight traces it):
    `forward` (DDP and compiled as configured) gives hidden states, the loss makes logits in chunks."""
    with autocast_for(device):
        x, mtp = forward(rows[:, :-1], rows[:, 1:], hidden=True, seeds=seeds)
        teacher_x = None
        if teacher is not None:
            with torch.no_grad(), autocast_for(device, cache=False):
                teacher_x = teacher.features(rows[:, :-1])
        return chunked_distillation_loss(model, x, rows[:, 1:], teacher, teacher_x, alpha, temperature, mtp,
                                         model.cfg.mtp_weight)


def micro_batches_of(group_rank: int, group_size: int, micro_batches: int) -> list[int]:
    """Which micro-batches of the global batch this process runs (one per accumulation step).
    Rank r takes r, r+W, r+2W, ...: together the ranks cover every micro-batch exactly once."""
    return list(range(group_rank, micro_batches, group_size))


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2 ** 63 - 1)


def snapshot_state(model: GPT, device: torch.device) -> dict:
    """The weights as saved: bf16 on GPU (half the disk), exact fp32 on CPU."""
    dtype = q0_run.held_dtype(device.type)
    return {k: v.detach().to(dtype).cpu().clone() for k, v in model.state_dict().items()}


def model_from_state(cfg: GPTConfig, state: dict, device, dtype: torch.dtype = torch.float32) -> GPT:
    """A frozen copy of saved weights, built directly on `device` (no host-side model) in `dtype`:
    eval mode, no gradients, so autocast keeps no bf16 weight copies for a backward that never comes."""
    with torch.device(device):
        model = GPT(cfg).to(dtype)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def load_snapshot_model(run_dir, record: dict, device="cpu", check_sha=True) -> GPT:
    """A saved snapshot as a model in eval mode (its file checked: q0_run.snapshot_weights)."""
    cfg, path = q0_run.snapshot_weights(run_dir, record, check_sha)
    model = GPT(GPTConfig(**cfg))
    model.load_state_dict(q0_run.load_weights(path))
    return model.to(device).eval()


def load_snapshot_head(run_dir, record: dict, device, dtype) -> tuple[torch.Tensor, GPTConfig]:
    """A snapshot's head weight alone (an ensemble member whose body another process holds): the
    file is memory-mapped, so the rest of it is never read into this process."""
    cfg, path = q0_run.snapshot_weights(run_dir, record)
    head = q0_run.load_weights(path, mmap=True)["head.weight"].to(device, dtype, copy=True)  # not a view of the file
    return head, GPTConfig(**cfg)


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

    def __init__(self, args, model: GPT, layout: q0_run.Layout, device: torch.device, compiled):
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
        args, lay, B = self.args, self.layout, self.layout.device_batch
        mine = micro_batches_of(lay.group_rank, lay.group_size, batch.shape[0] // B)
        loss_sum = torch.zeros((), device=self.device)
        for a, k in enumerate(mine):
            rows = to_device(torch.from_numpy(batch[k * B:(k + 1) * B]), self.device)
            row_seeds = to_device(torch.tensor(seeds[k * B:(k + 1) * B], dtype=torch.int64), self.device)
            sync = nullcontext() if (self.ddp is None or a == len(mine) - 1) else self.ddp.no_sync()
            with sync:  # dropout masks follow the rows (row_dropout), not the micro-batch
                loss = micro_batch_loss(self.forward, self.model, teacher, rows, self.device, row_seeds, args.distil_alpha,
                                        args.distil_temperature)
                (loss / len(mine)).backward()
            loss_sum += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / len(mine)


class BaseTrainer:
    """One base's trajectory (the driver; its Stepper makes each update): cycles of training, a
    snapshot at the end of each, noise, checkpoints and resume. The teacher is decided in one
    place (teacher_for, after_snapshot): the prior's ensemble when one is given (ensemble
    distillation, every cycle), else the previous snapshot (chain distillation)."""

    def __init__(self, run: q0_run.Run, base: int):
        args, cfg, device = run.args, run.cfg, run.device
        self.args, self.base, self.layout, self.data, self.cfg = args, base, run.layout, run.data, cfg
        self.cycles, self.run_dir, self.log, self.device = run.cycles, run.run_dir, run.log, device
        self.plan = run.plan
        self.held_dtype = q0_run.held_dtype(device.type)  # teachers and snapshots: bf16 on CUDA, fp32 on a CPU
        self.leader = self.layout.group_rank == 0
        self.use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
        self.stream = TrainStream(self.data.train, self.data.bos_id, args.seed, base)
        self.checkpoints = q0_run.Checkpoints(run.run_dir, base, self.leader)
        torch.manual_seed(_seed(args.seed, base))  # the initialisation depends on the base only
        self.model = GPT(cfg).to(device)
        if run.distil and args.distil_init == "best":  # the student starts as the prior's best member
            best = min(run.distil, key=lambda m: m["record"]["fitness_loss"])
            if best["run"]["model"] != dataclasses.asdict(cfg):
                raise UsageError(f"--distil-init best: member {best['record']['id']} of {best['run_dir']} has another "
                                 f"architecture than the student; give the members' model flags or --distil-init scratch")
            _, path = q0_run.snapshot_weights(best["run_dir"], best["record"])  # checked against its SHA-256
            self.model.load_state_dict(q0_run.load_weights(path))
        self.stepper = Stepper(args, self.model, self.layout, device, self.compiled)
        self.optimizer = self.stepper.optimizer
        self.ensemble = self.load_ensemble(run.distil) if run.distil else None
        self.teacher: SnapshotTeacher | None = None  # the chain teacher, while a cycle needs it
        self.step, self.cycles_done = 0, 0
        self.tracker = q0_run.PopulationTracker(run.run_dir)
        self.scoring_seconds: list[float] = []  # per snapshot, for the ETA
        self.log.line(f"[b{base}] {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                      f"{sum(c.steps for c in self.cycles)} steps")

    def compiled(self, module):
        return torch.compile(module) if self.use_compile else module

    # --- the teacher: every decision about it is made here -----------------------------------
    def set_teacher(self, model: GPT | None):
        self.teacher = SnapshotTeacher(model, self.compiled(model)) if model is not None else None

    def load_ensemble(self, distil: list[dict]) -> EnsembleTeacher:
        """The prior's members, frozen and compiled like the student, bf16 on CUDA: member i's body on
        group rank i mod W, its head on every rank (EnsembleTeacher)."""
        dtype = self.held_dtype
        size, rank = self.layout.group_size, self.layout.group_rank
        members = []
        for i, d in enumerate(distil):
            if i % size == rank:
                model = load_snapshot_model(d["run_dir"], d["record"]).to(self.device, dtype).requires_grad_(False)
                members.append(SnapshotTeacher(model, self.compiled(model)))
            else:
                members.append(MemberHead(*load_snapshot_head(d["run_dir"], d["record"], self.device, dtype)))
        return EnsembleTeacher(members, [d["weight"] for d in distil], self.layout.group)

    def teacher_for(self, cycle: Cycle) -> Teacher | None:
        """The prior's ensemble (--distil-from) in every cycle; else, from --distil-from-cycle on, the
        previous snapshot of this base (kept from its scoring, or read back after a resume)."""
        if self.ensemble is not None:
            return self.ensemble
        if not chain_distills(self.args, cycle.index):
            return None
        if self.teacher is None:
            self.load_teacher(cycle.index - 1)
        return self.teacher

    def after_snapshot(self, scorer: SnapshotTeacher, cycle_index: int):
        """The snapshot just scored teaches the next cycle if chain distillation wants it, held as
        the reference holds its teacher (bf16 on CUDA: half the memory of the fp32 scorer); else it goes."""
        keep = self.ensemble is None and chain_distills(self.args, cycle_index + 1)
        if keep:
            scorer.model.to(self.held_dtype)
        self.teacher = scorer if keep else None

    def load_teacher(self, cycle: int):
        """The previous snapshot of this base, exactly as saved (before any noise)."""
        record = q0_run.read_record(self.run_dir, q0_run.snapshot_id(self.base, cycle))
        _, path = q0_run.snapshot_weights(self.run_dir, record)  # checked against its record's SHA-256
        state = q0_run.load_weights(path)
        self.set_teacher(model_from_state(self.cfg, state, self.device, self.held_dtype))

    # --- the most expensive step, first -------------------------------------------------------
    def probe(self):
        """One micro-batch at the run's shapes, forward and backward, holding what its most
        expensive step holds: the optimiser's state and the largest teacher the run will hold (the
        prior's ensemble, or a chain teacher in its dtype, a stand-in with no values). A run that
        cannot fit fails here, in its first minute, not when distillation starts (cycle 9 of the
        record, hours in). Nothing of it stays: the stand-in goes, the gradients are dropped."""
        args, device, B = self.args, self.device, self.layout.device_batch
        self.optimizer.init_state()  # what the first step would create, created now (zeros either way)
        teacher, kind = self.ensemble, "the prior's ensemble"
        if teacher is None and any(chain_distills(args, c.index) for c in self.cycles[self.cycles_done:]):
            with torch.device("meta"):
                stand_in = GPT(self.cfg).to(self.held_dtype)
            stand_in = stand_in.to_empty(device=device).eval().requires_grad_(False)
            teacher, kind = SnapshotTeacher(stand_in, self.compiled(stand_in)), "a chain teacher"
        rows = torch.zeros(B, args.seq_len + 1, dtype=torch.int64, device=device)
        seeds = torch.zeros(B, dtype=torch.int64, device=device)
        sync = self.stepper.ddp.no_sync() if self.stepper.ddp is not None else nullcontext()
        held = [self.model, self.optimizer] + ([] if teacher is None else [m.model for m in getattr(
            teacher, "members", [teacher]) if isinstance(m, SnapshotTeacher)])
        what = (f"a {'distilling ' if teacher is not None else ''}micro-batch of {B} x {args.seq_len}"
                + (f" holding {kind}" if teacher is not None else ""))
        cap = q0_run.device_memory_gib(args, device)
        try:
            with q0_run.peak_memory(device, held) as peak, sync:
                micro_batch_loss(self.stepper.forward, self.model, teacher, rows, device, seeds, args.distil_alpha,
                                 args.distil_temperature).backward()
        except torch.OutOfMemoryError as e:
            raise UsageError(f"the first step does not fit: {what} ran out of the device's memory ({cap:.1f} GiB; "
                             f"{str(e).splitlines()[0]}); pass a smaller --device-batch or "
                             f"--checkpoint-activations") from None
        finally:
            self.model.zero_grad(set_to_none=True)
        gib = peak.bytes / q0_run.GIB
        plan = self.plan and self.plan.get("traced_gib")
        self.log.line(f"[b{self.base}] first-step probe: {what}: peak {q0_run.gib_text(gib)}"
                      + (f" (the plan traced {q0_run.gib_text(plan)})" if plan else "")
                      + (f" of the device's {q0_run.gib_text(cap)}" if cap else ""))
        if cap and gib > cap:
            raise UsageError(f"the first step does not fit: {what} peaks at {gib:.2f} GiB and "
                             f"--device-memory-gib is {cap:g}; pass a smaller --device-batch or "
                             f"--checkpoint-activations")

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self):
        self.checkpoints.save({"base": self.base, "step": self.step, "cycles_done": self.cycles_done,
                               "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})

    def resume(self):
        ckpt = self.checkpoints.load(self.device)
        if ckpt is None:
            return
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.cycles_done = ckpt["step"], ckpt["cycles_done"]
        removed = self.checkpoints.drop_unfinished(self.cycles_done, len(self.cycles))
        self.log.line(f"[b{self.base}] resumed at step {self.step} after {self.cycles_done} cycles"
                      + (f"; removed {removed} files of unfinished snapshots" if removed else ""))

    # --- one optimiser step ------------------------------------------------------------------
    def train_step(self, cycle: Cycle, step_in_cycle: int, teacher: Teacher | None) -> torch.Tensor:
        args = self.args
        self.stepper.schedule(step_in_cycle, cycle.steps)
        batch = self.stream.batch(cycle.pos(step_in_cycle, args.seq_len), cycle.batch_seqs, args.seq_len)
        seeds = [_seed(args.seed, self.base, self.step, r) for r in range(cycle.batch_seqs)]
        loss = self.stepper.step(batch, seeds, teacher)
        self.step += 1
        return loss

    # --- snapshot ----------------------------------------------------------------------------
    def snapshot(self, cycle: Cycle):
        args, sid = self.args, q0_run.snapshot_id(self.base, cycle.index)
        state = snapshot_state(self.model, self.device)
        self.teacher = None  # the last cycle's teacher goes before its successor is built
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
        base_epochs = cycle.pos(cycle.steps, args.seq_len) / len(self.stream)
        record = q0_run.snapshot_record(sid, self.base, cycle.index, self.step, base_epochs, fitness, val, self.data,
                                        bool(args.val_probs))
        val_loss, bpb = record["val_loss"], record["val_bpb"]
        if self.leader:
            q0_run.save_snapshot(self.run_dir, record, state, fitness, val if args.val_probs else None)
            pop = self.tracker.update()
            self.log.line(f"[b{self.base}] snapshot {sid} | step {self.step} | base epochs {base_epochs:.2f} | "
                          f"val {val_loss:.4f} nats" + (f" {bpb:.4f} bpb" if bpb else "")
                          + f" | fitness {record['fitness_loss']:.4f} | scored in {self.scoring_seconds[-1]:.1f}s")
            self.log.line(f"[b{self.base}] population: {q0_run.population_line(pop)}")
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

    def log_step(self, cycle: Cycle, i: int, loss: torch.Tensor, distill: bool, rate: float, elapsed: float,
                 seconds_per_step: float):
        total_steps = self.cycles[-1].first_step + self.cycles[-1].steps
        epoch = cycle.pos(i + 1, self.args.seq_len) / len(self.stream)
        g = self.optimizer.param_groups[0]
        self.log.line(f"[b{self.base}] cycle {cycle.index}/{len(self.cycles)} step {self.step}/{total_steps} | "
                      f"loss {loss.item():.4f}" + (" (distill)" if distill else "")
                      + f" | lr x{g['lr'] / g['peak_lr']:.3f} wd x{g['weight_decay'] / max(g['peak_wd'], 1e-12):.3f}"
                      f" | epoch {epoch:.2f} | {rate:,.0f} tok/s | {q0_run.clock(elapsed)} elapsed, "
                      f"ETA {q0_run.clock(self.eta_seconds(seconds_per_step, rate))}")
        self.log.event("step", base=self.base, cycle=cycle.index, step=self.step, loss=loss.item(),
                       epoch=epoch, tokens_per_s=rate, distill=distill)

    def run(self):
        args, total_steps = self.args, self.cycles[-1].first_step + self.cycles[-1].steps
        self.resume()
        if self.step >= total_steps:
            self.log.line(f"[b{self.base}] already complete")
            return
        self.probe()
        self.checkpoints.last = started = time.time()
        # tokens/s counts training steps only (not scoring or checkpoints). The clock is read at log
        # points and checkpoints, after a device sync: no per-step sync stalls the queue.
        tokens_done, train_seconds, first_step = 0, 0.0, self.step
        for cycle in self.cycles[self.cycles_done:]:
            teacher = self.teacher_for(cycle)
            mark = self.synced_clock()
            for i in range(self.step - cycle.first_step, cycle.steps):
                loss = self.train_step(cycle, i, teacher)
                tokens_done += cycle.batch_seqs * args.seq_len
                if self.step % args.log_every == 0 or i == cycle.steps - 1:
                    if self.layout.group is not None:
                        q0_run.all_reduce_(loss, self.layout.group)
                        loss /= self.layout.group_size
                    check_finite(loss, self.base, cycle.index, self.step)
                    now = self.synced_clock()
                    train_seconds, mark = train_seconds + now - mark, now
                    self.log_step(cycle, i, loss, teacher is not None, tokens_done / max(train_seconds, 1e-9),
                                  time.time() - started, train_seconds / (self.step - first_step))
                if i < cycle.steps - 1 and self.checkpoints.due(args.checkpoint_minutes):
                    check_finite(loss, self.base, cycle.index, self.step)  # never checkpoint NaN weights
                    now = self.synced_clock()
                    train_seconds += now - mark
                    self.save_checkpoint()
                    mark = self.synced_clock()
            teacher = None  # the cycle's teacher goes before the snapshot builds its scorer
            self.snapshot(cycle)
            start, end = args.snapshot_noise
            if cycle.index < len(self.cycles) and (start > 0 or end > 0):
                gen = torch.Generator(device=self.device).manual_seed(_seed(args.seed, self.base, cycle.index, 7))
                add_snapshot_noise(self.model, noise_scale(cycle.index, len(self.cycles), start, end), gen)
            self.cycles_done = cycle.index
            self.save_checkpoint()


# =============================================================================================
# Main
# =============================================================================================

@q0_run.reports_errors  # bad input anywhere: one `error:` line, exit code 2 (a hung peer is named)
def main(argv=None) -> int:
    args = parse_args(argv)
    set_kernels(attention=args.attention, autocast=args.autocast)
    note = None if args.dry_run else check_flex_attention(head_dim=args.d_model // args.n_head)  # may pick SDPA
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {note}", file=sys.stderr, flush=True)
    experiment = sys.modules[__name__]  # handed to q0_run, which never imports this file
    if args.dry_run:
        return q0_run.dry_run(experiment, args)
    run = q0_run.start(experiment, args, NON_POPULATION_FLAGS)  # processes, data, layout, run dir, lock, plan
    with run.training():
        for base in run.layout.bases:  # this process's group trains its bases one after another
            BaseTrainer(run, base).run()
    return q0_run.finish(run)  # wait for the other groups; the manifest and the population's numbers


if __name__ == "__main__":
    sys.exit(main())
