"""Sample text from q0 snapshots: one snapshot, a student run, or a prior's ensemble at budget K.

    python sample.py runs/q0 --snapshot b0c5 --prompt "ROMEO:" --tokens 200     # one snapshot
    python sample.py runs/q0-student --prompt "ROMEO:"                          # a student run: its last snapshot
    python sample.py runs/q0 --prior runs/q0/prior.json --budget 4 --prompt "ROMEO:"
    torchrun --nproc_per_node=2 sample.py runs/q0 --prior runs/q0/prior.json   # members over processes (gloo on CPU)
    python sample.py runs/q0 --prior runs/q0/prior.json --budget 8 --samples 342 --tokens 96 \
        --write-data data/q0-sampled                                           # a student's data (below)

Every member keeps its own KV cache (train_q0.KVCache) and runs one new token a step. The next
token is drawn from the prior-weighted mixture of the members' probabilities, sum_i w_i softmax(z_i / T)
(probabilities are averaged, not logits: the ensemble eval.py scores; the temperature applies to
each member, as in train_q0.EnsembleTeacher; weights refitted for K, as --distil-from uses them),
then cut to --top-k and --top-p. Temperature 0 is greedy: the argmax of the mixture at T = 1.
A prompt starts a document (BOS first); a drawn BOS ends it, and its text stops there. When the
context reaches the shortest member's seq_len, every cache restarts from the last seq_len // 2
tokens (a fresh prefill, counted in the forward tokens): the caches never go past the context the
members were trained on, and --tokens is not bounded by it.

--write-data OUT: sampled-text distillation, the ensemble as a teacher on more text. Each of
--samples documents is BOS, --prompt-tokens real tokens at a seeded random position of the
members' training tokens (inside one document), then --tokens drawn as above (a drawn BOS ends
it). OUT holds the members' fitness set and training tokens as they were (so a student carves the
same fitness set and the prior's checks pass), the documents after them, and the same validation
file; train a student on it with the flags printed (--data-dir OUT --train-tokens ...). Its cost
is printed and recorded in OUT/manifest.json on the epoch axis: the members' forward FLOPs
(prefills and cached steps) over one plain epoch's (a training step's FLOPs on every training
token of the population), both per token as the --dry-run plan counts them.

Under torchrun member i's body lives on rank i mod W (as train_q0.EnsembleTeacher spreads a
teacher): each rank runs its bodies, the members' probabilities are gathered, rank 0 mixes, draws
and sends the tokens back, and prints.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

import eval as q0_eval
import q0_run
import train_q0
from data.shards import (MANIFEST, PATH, TEXT, ArgumentParser, Range, UsageError, _commit, at_least,
                         atomic_write_text, command, find_split, parse_checked, path_arg, sha256_file, write_shard)
from data.tokenizers import get_tokenizer

COLLECTIVE_TIMEOUT_MINUTES = 30.0  # torch's gloo default: a rank waits while another loads its members


# ---------------------------------------------------------------------------------------------
# The next token: the members' probabilities, their mixture, top-k / top-p, the draw
# ---------------------------------------------------------------------------------------------

def member_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z / T) of one member's logits (B, V), float32; T = 0 (greedy) reads as T = 1."""
    return torch.softmax(logits.float() / (temperature or 1.0), dim=-1)


def mixture(probs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i w_i p_i (B, V) in float64, members added in order (the same bits wherever they ran)."""
    out = torch.zeros(probs[0].shape, dtype=torch.float64)
    for p, w in zip(probs, weights):
        out += w * p.double().cpu()
    return out


def restrict(p: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """p (B, V) cut to its top_k most probable tokens (0: all), then to the fewest most probable
    whose mass reaches top_p (1: all), renormalised; the most probable token always stays."""
    ranked, order = p.sort(dim=-1, descending=True)                    # (B, V) each
    before = ranked.cumsum(-1) - ranked                                # mass of the tokens ranked above
    keep = before < top_p * p.sum(-1, keepdim=True)
    if top_k:
        keep[:, top_k:] = False
    keep[:, 0] = True
    kept = torch.zeros_like(p).scatter(-1, order, ranked * keep)      # back to vocabulary order
    return kept / kept.sum(-1, keepdim=True)


def draw(p: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """The next token of every row (B,): the argmax at temperature 0, else drawn from p."""
    if temperature == 0:
        return p.argmax(-1)
    return torch.multinomial(p, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Which snapshots: one, a student run's last, or a prior's budget
# ---------------------------------------------------------------------------------------------

def ids(members) -> str:
    return ", ".join(m.record["id"] for m in members)


def prior_budget(args) -> int:
    """--budget, or the prior's largest."""
    return args.budget or max(b["K"] for b in q0_run.read_prior(Path(args.prior))["budgets"])


def prior_members(args, pop) -> list[tuple[q0_run.Member, float]]:
    """Budget K of the prior (0: its largest), checked against the runs (eval.load_prior): the
    members of nonzero refitted weight."""
    path, k = Path(args.prior), prior_budget(args)
    budgets = sorted(b["K"] for b in q0_run.read_prior(path)["budgets"])
    if k not in budgets:
        raise UsageError(f"--budget {k}: {path} has budgets {budgets}; choose one of them, or fit that budget with "
                         f"`python fit_prior.py RUN_DIR --budgets {k} --out PRIOR`")
    prior, weightings = q0_eval.load_prior(path, pop, [k])
    if prior["unfitted"]:
        print(f"note: {q0_eval.unfitted_note(path, prior['unfitted'], len(pop))}", file=sys.stderr)
    w = next(x["w"] for x in weightings if x["weights"] == "refitted")
    return [(m, float(w[i])) for i, m in enumerate(pop) if w[i] > 0]


def one_member(args, members, students) -> list[tuple[q0_run.Member, float]]:
    """--snapshot ID of the one run given; without it, a student run's last snapshot (the end of
    its schedule, as eval.student_rows scores it)."""
    runs = list(dict.fromkeys(m.run_dir for m in members))
    if len(runs) > 1:
        raise UsageError(f"{len(runs)} runs given: --snapshot and a student take one run; an ensemble over several "
                         f"takes --prior")
    if args.snapshot:
        found = [m for m in members if m.record["id"] == args.snapshot]
        if not found:
            raise UsageError(f"--snapshot {args.snapshot}: {runs[0]} has snapshots {ids(members)}")
        return [(found[0], 1.0)]
    if not students:
        raise UsageError(f"{runs[0]} is a population of {len(members)} snapshots ({ids(members)}): choose one with "
                         f"--snapshot ID, or an ensemble with --prior PATH --budget K")
    return [(max(students, key=lambda m: (m.record["cycle"], m.record["base"])), 1.0)]


def choose(args) -> list[tuple[q0_run.Member, float]]:
    if args.snapshot and args.prior:
        raise UsageError("--snapshot and --prior choose different things; give one of them")
    if args.budget and not args.prior:
        raise UsageError("--budget selects a budget of a prior; give --prior too")
    members = q0_run.load_population(args.runs)
    if args.prior:
        return prior_members(args, q0_eval.split_students(members)[0])  # a prior weights the population only
    return one_member(args, members, [m for m in members if m.run.get("population_config", {}).get("distil_from")])


def prompt_tokens(args, run: dict, seq_len: int) -> list[int]:
    """BOS, then the prompt in the run's tokenizer (data.tokenizers, named in run.json)."""
    try:
        tokenizer = get_tokenizer(run["tokenizer"])
        context = [run["bos_id"], *tokenizer.encode(args.prompt)]
    except ValueError as e:  # an unknown tokenizer name, or a NUL in the prompt of the bytes tokenizer
        raise UsageError(f"--prompt: {e}") from None
    if len(context) > seq_len:
        raise UsageError(f"--prompt is {len(context) - 1} tokens (+1 BOS) and the model's context (seq_len) is "
                         f"{seq_len}; shorten it")
    return context


# ---------------------------------------------------------------------------------------------
# The members, each with its KV cache, spread over processes
# ---------------------------------------------------------------------------------------------

class Ensemble:
    """The chosen members and their weights: member i's body on rank i mod W, with its KV cache.
    start() prefills every cache, step() adds one token; both return each member's probabilities
    of the next token, in member order, on every rank."""

    def __init__(self, chosen, temperature: float, device, rank: int = 0, world: int = 1):
        self.temperature, self.device = temperature, device
        self.weights, self.rank, self.world = [w for _, w in chosen], rank, world
        self.bodies = [train_q0.load_snapshot_model(m.run_dir, m.record, device).requires_grad_(False)
                       for m, _ in chosen[rank::world]]   # load_snapshot_model: weights_only, SHA-256 checked
        self.slots = -(-len(chosen) // world)              # bodies per rank, the last ranks' padded
        self.vocab = chosen[0][0].run["vocab_size"]        # one tokenizer: load_population checked it
        self.caches, self.forward_tokens, self.length = [], 0, 0

    @torch.no_grad()
    def _run(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Each local body over the new tokens idx (B, t); the next token's probabilities of every member."""
        idx = idx.to(self.device)
        with train_q0.autocast_for(self.device, cache=False):
            local = [member_probs(m.logits(m.hidden(idx, cache=c)[:, -1]), self.temperature)
                     for m, c in zip(self.bodies, self.caches)]       # (B, V) each
        self.forward_tokens += idx.numel()
        self.length += idx.size(1)
        if self.world == 1:
            return local
        blank = [torch.zeros(idx.size(0), self.vocab, device=self.device)] * (self.slots - len(local))
        got = q0_run.all_gather(torch.stack(local + blank).cpu())          # W x (slots, B, V)
        return [got[i % self.world][i // self.world] for i in range(len(self.weights))]

    def start(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """New caches, prefilled with idx (B, L)."""
        self.length = 0
        self.caches = [m.new_cache() for m in self.bodies]
        return self._run(idx)

    def step(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return self._run(tokens[:, None])                                # (B,) -> (B, 1)


def next_tokens(ens: Ensemble, probs: list[torch.Tensor], args, generator: torch.Generator) -> torch.Tensor:
    """The next token of every sample (n,): rank 0 mixes, restricts and draws; every rank gets it."""
    if ens.rank == 0:
        tokens = draw(restrict(mixture(probs, ens.weights), args.top_k, args.top_p), args.temperature, generator)
    else:
        tokens = torch.zeros(probs[0].size(0), dtype=torch.int64)
    return tokens if ens.world == 1 else q0_run.all_reduce_(tokens)  # a sum to which the others add zeros


def generate(ens: Ensemble, history: torch.Tensor, args, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(n, --tokens) drawn after the n contexts `history` (n, L), one row each; a full context
    restarts the caches from its last half. `generator` draws them: several calls share one stream."""
    probs, out = ens.start(history), []
    for step in range(args.tokens):
        nxt = next_tokens(ens, probs, args, generator)                 # (n,)
        out.append(nxt)
        history = torch.cat([history, nxt[:, None]], dim=1)
        if step + 1 == args.tokens:
            break
        probs = ens.start(history[:, -(seq_len // 2):]) if ens.length == seq_len else ens.step(nxt)
    return torch.stack(out, dim=1)


def until_bos(row: list[int], bos_id: int) -> list[int]:
    """What was drawn up to a BOS: a drawn BOS ends the document."""
    return row[:row.index(bos_id)] if bos_id in row else row


def texts(run: dict, context: list[int], drawn: torch.Tensor) -> list[str]:
    """Each sample as text: the prompt, then what was drawn up to a BOS (the document's end)."""
    tokenizer = get_tokenizer(run["tokenizer"])
    return [tokenizer.decode(context[1:] + until_bos(row, run["bos_id"])) for row in drawn.tolist()]


# ---------------------------------------------------------------------------------------------
# Sampled-text distillation (--write-data): the samples as a data folder a student trains on
# ---------------------------------------------------------------------------------------------

def members_data(chosen) -> q0_run.RunData:
    """The tokens the members trained on, loaded as their run loaded them (its flags, in run.json)
    and checked against what it recorded: the prompts come from them, and the new folder keeps
    them as they are, so a student carves the same fitness set and the prior's checks pass."""
    runs = {m.run_dir: m.run for m, _ in chosen}
    first = next(iter(runs.values()))
    flags = argparse.Namespace(**first["population_config"])
    data = q0_run.load_data(flags, whole_documents=first["version"] in q0_run.WHOLE_DOCUMENT_FITNESS)  # its carve
    for run_dir, run in runs.items():
        for part in ("fitness", "train"):
            if data.describe[part]["sha256"] != run[part]["sha256"]:
                raise UsageError(f"{run_dir} was trained on other {part} tokens than its flags give from "
                                 f"{flags.data_dir} now; --write-data needs members trained on the same data, run "
                                 f"from the folder they were trained in")
    return data


def training_prompts(train: np.ndarray, bos_id: int, n: int, length: int, seed: int) -> np.ndarray:
    """n real prompts (n, length): windows of the training tokens at seeded random positions, none
    across a document boundary (a BOS inside a sampled document would split it in two)."""
    bos_before = np.concatenate([[0], np.cumsum(train == bos_id)])       # BOS among train[:i]
    clean = np.flatnonzero(bos_before[length:] == bos_before[:-length])  # windows [s, s + length) without one
    if clean.size == 0:
        raise UsageError(f"--prompt-tokens {length}: the training tokens hold no {length} in a row inside one "
                         f"document; lower it")
    starts = np.random.default_rng(seed).choice(clean, size=n)
    return train[starts[:, None] + np.arange(length)]


def sampled_documents(ens: Ensemble, prompts: np.ndarray, args, seq_len: int, bos_id: int) -> list[np.ndarray]:
    """Each prompt continued by --tokens drawn tokens, --batch samples side by side, one stream of
    draws (--seed): a document is BOS, the prompt, then what was drawn up to a drawn BOS."""
    generator, docs, started = torch.Generator().manual_seed(args.seed), [], time.perf_counter()
    for i in range(0, len(prompts), args.batch):
        rows = np.insert(prompts[i:i + args.batch].astype(np.int64), 0, bos_id, axis=1)  # (b, 1 + P)
        drawn = generate(ens, torch.from_numpy(rows), args, seq_len, generator)
        docs += [np.array(row.tolist() + until_bos(d, bos_id)) for row, d in zip(rows, drawn.tolist())]
        if ens.rank == 0:
            print(f"sampled {len(docs):,}/{len(prompts):,} documents in {time.perf_counter() - started:.0f} s",
                  flush=True)
    return docs


def counting_flops() -> FlopCounterMode:
    """FLOPs of what runs inside, counted as the --dry-run plan counts them (its formulas)."""
    return FlopCounterMode(display=False, custom_mapping=q0_run.flop_formulas())


@functools.lru_cache
def flops_per_token(model: str) -> tuple[float, float]:
    """(a forward, a plain training step's forward and backward) FLOPs per token of a run's model
    (run.json's "model", as JSON), counted on one sequence of seq_len tokens: the plan's numbers
    (its teacher and student FLOPs per token), on real tensors in a fraction of a trace's time.
    The optimiser's update is not counted, as in the distillation record."""
    cfg = train_q0.GPTConfig(**json.loads(model))
    gpt, rows, out = train_q0.GPT(cfg), torch.randint(0, cfg.vocab_size, (1, cfg.seq_len + 1)), []
    for training in (False, True):
        with counting_flops() as counted:
            if training:
                train_q0.micro_batch_loss(gpt.train(), gpt, None, rows, torch.device("cpu")).backward()
            else:
                with torch.no_grad():
                    gpt.eval()(rows[:, :-1])
        out.append(counted.get_total_flops() / cfg.seq_len)
    return out[0], out[1]


def sampling_cost(chosen, forward_tokens: int, train_tokens: int) -> dict:
    """Sampling's compute on the epoch axis: the members' forward tokens (forward_tokens each:
    prefills and cached steps) at a full forward's FLOPs per token, in plain epochs, one plain
    epoch being a training step's FLOPs on every training token of the population (its first
    member's run). A cached step attends to fewer keys than a full forward and runs the head once,
    but recomputes IHA's mixed weights per call, for all its rows: counted around the sampling, the
    members ran 6% fewer FLOPs than this on the cpu preset at --batch 64, and 1-2% more on the tiny
    one at 2 rows (tests/test_sample.py)."""
    models = [json.dumps(m.run["model"], sort_keys=True) for m, _ in chosen]
    forward = sum(flops_per_token(m)[0] for m in models) * forward_tokens
    train = flops_per_token(models[0])[1] * train_tokens
    return {"member_forward_tokens": forward_tokens * len(chosen), "forward_flops": forward,
            "population_train_tokens": train_tokens, "plain_epoch_flops": train, "plain_epochs": forward / train}


def write_folder(out: Path, data: q0_run.RunData, docs: list[np.ndarray], token_bytes: np.ndarray, manifest: dict):
    """OUT/train.q0t (the members' fitness and training tokens as they were, then the documents),
    their validation file(s) copied, and OUT/manifest.json, built under a temporary name and
    renamed into place: a folder under OUT's name is whole."""
    building = out.with_name(f".{out.name}.building")
    shutil.rmtree(building, ignore_errors=True)  # what a killed writer left: the output is claimed (claim_output)
    tokens = np.concatenate([data.fitness, data.train, *docs])
    files = {"train.q0t": write_shard(building / "train.q0t", tokens, vocab_size=data.vocab_size, bos_id=data.bos_id,
                                      tokenizer=data.tokenizer, token_bytes=token_bytes, command=manifest["command"])}
    for val in find_split(manifest["sampled"]["data_dir"], "val"):
        shutil.copyfile(val, building / val.name)
        files[val.name] = {"bytes": val.stat().st_size, "sha256": sha256_file(val)}
    atomic_write_text(building / MANIFEST, json.dumps({**manifest, "files": files}, indent=2) + "\n")
    _commit(os.rename, building, out)


def distil_data(args, chosen, seq_len: int, device, argv) -> dict:
    """--write-data: sample --samples documents from real training prompts, write them after the
    members' tokens as a new data folder, and count what it cost; the manifest, on rank 0."""
    data = members_data(chosen)
    if args.prompt_tokens + 1 > seq_len:
        raise UsageError(f"--prompt-tokens {args.prompt_tokens} (+1 BOS) is more than the model's context "
                         f"(seq_len) of {seq_len}; lower it")
    prompts = training_prompts(data.train, data.bos_id, args.samples, args.prompt_tokens, args.seed)
    ens = start_ensemble(args, chosen, device)
    started = time.perf_counter()
    docs = sampled_documents(ens, prompts, args, seq_len, data.bos_id)
    seconds = time.perf_counter() - started
    finish(ens)
    if ens.rank != 0:
        return {}
    token_bytes = data.token_bytes if data.token_bytes is not None else \
        get_tokenizer(data.tokenizer).token_byte_lengths()       # (a format that does not record them)
    manifest = data_manifest(args, chosen, data, docs, token_bytes, ens.forward_tokens, argv)
    manifest["sampled"]["seconds"] = round(seconds, 1)
    write_folder(Path(args.write_data), data, docs, token_bytes, manifest)
    return manifest


def data_manifest(args, chosen, data: q0_run.RunData, docs: list[np.ndarray], token_bytes: np.ndarray,
                  forward_tokens: int, argv) -> dict:
    """What OUT/manifest.json records (its files added when written): the command, how the documents
    were drawn and what they hold, what drawing them cost, and the flags a student trains on them with."""
    added = sum(d.size for d in docs)
    drawn = np.concatenate([d[1 + args.prompt_tokens:] for d in docs])
    return {
        "format": "q0-data", "version": 1, "command": shlex.join(["python", "sample.py", *map(str, argv)]),
        "tokenizer": data.tokenizer, "vocab_size": data.vocab_size, "bos_id": data.bos_id,
        "sampled": {"data_dir": str(chosen[0][0].run["population_config"]["data_dir"]),
                    "prior": args.prior, "budget": prior_budget(args) if args.prior else None,
                    "members": [{"snapshot": m.name, "weight": w} for m, w in chosen],
                    "documents": len(docs), "prompt_tokens": args.prompt_tokens, "tokens": args.tokens,
                    "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
                    "batch": args.batch,
                    "ended_by_bos": sum(d.size < 1 + args.prompt_tokens + args.tokens for d in docs),
                    "added_tokens": int(added), "drawn_tokens": int(drawn.size),
                    "sampled_bytes": int(token_bytes[drawn].sum()),
                    **sampling_cost(chosen, forward_tokens, data.train.size)},
        "student_flags": ["--data-dir", str(args.write_data), "--fitness-tokens", str(data.fitness.size),
                          "--train-tokens", str(data.train.size + added)],
    }


def report_data(manifest: dict, args):
    """What was written, what it cost, and how a student trains on it."""
    s = manifest["sampled"]
    print(f"wrote {args.write_data}: {s['documents']:,} documents (BOS, {s['prompt_tokens']} training tokens, "
          f"{s['tokens']} drawn; {s['ended_by_bos']} ended early by a drawn BOS): {s['added_tokens']:,} tokens after "
          f"the members' {s['population_train_tokens']:,} training tokens, {s['sampled_bytes']:,} bytes drawn, in "
          f"{s['seconds']:.1f} s")
    print(f"cost: {s['member_forward_tokens']:,} member forward tokens ({plural(len(s['members']), 'member')}, "
          f"prefills and cached steps), {s['forward_flops']:.3e} FLOPs = {s['plain_epochs']:.2f} plain epochs of "
          f"the population ({s['population_train_tokens']:,} training tokens, {s['plain_epoch_flops']:.3e} FLOPs "
          f"each)")
    teacher = f" --distil-from {args.prior} --distil-k {s['budget']}" if args.prior else ""
    print(f"next: python train_q0.py (the members' flags: --preset ...){teacher} "
          f"{shlex.join(manifest['student_flags'])}")


RANGES = {"runs": PATH, "snapshot": TEXT, "prior": PATH, "budget": at_least(0), "prompt": TEXT,
          "tokens": at_least(1), "temperature": at_least(0), "top_k": at_least(0),
          "top_p": Range(lo=0, hi=1, lo_open=True), "seed": at_least(0), "samples": at_least(1), "device": TEXT,
          "write_data": PATH, "prompt_tokens": at_least(1), "batch": at_least(1)}


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (a prior's population may span several)")
    ap.add_argument("--snapshot", help="one snapshot of the run, by id (b0c5)")
    ap.add_argument("--prior", help="prior.json from fit_prior.py: sample its ensemble at --budget")
    ap.add_argument("--budget", type=int, default=0, help="the prior's budget K (0: its largest)")
    ap.add_argument("--prompt", default="", help="text the samples continue (after a BOS)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens to draw per sample")
    ap.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="draw from the K most probable tokens only (0: all)")
    ap.add_argument("--top-p", type=float, default=1.0, help="draw from the fewest tokens holding this mass (1: all)")
    ap.add_argument("--seed", type=int, default=0, help="the draws' seed: the same seed, the same samples")
    ap.add_argument("--samples", type=int, default=1, help="samples drawn side by side")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = ap.add_argument_group("sampled-text distillation: the samples as a student's data (README)")
    g.add_argument("--write-data", type=path_arg, metavar="OUT",
                   help="a new data folder: the members' data, then --samples documents (BOS, --prompt-tokens real "
                        "training tokens, --tokens drawn); prints and records what sampling cost in plain epochs")
    g.add_argument("--prompt-tokens", type=int, help="training tokens each document starts from (default 32)")
    g.add_argument("--batch", type=int, help="documents drawn side by side (default 64)")
    return ap


def describe(chosen) -> str:
    """The snapshot, or the ensemble's members and weights."""
    if len(chosen) == 1:
        return chosen[0][0].name
    return "ensemble of " + ", ".join(f"{m.record['id']} {w:.3f}" for m, w in chosen)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


def start_ensemble(args, chosen, device) -> Ensemble:
    """The members on this process (under torchrun: its share, the group joined first)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), 0
    if world > 1:
        _, rank, local = q0_run.setup_distributed(COLLECTIVE_TIMEOUT_MINUTES, cuda=device.type == "cuda")
        device = local if device.type == "cuda" and device.index is None else device
    return Ensemble(chosen, args.temperature, device, rank, world)


def finish(ens: Ensemble):
    if ens.world > 1:
        dist.destroy_process_group()  # an open gloo group aborts at interpreter exit


def check_write_data(args):
    """--write-data's prompts are real training tokens, and its two flags mean nothing without it."""
    if args.write_data is None:
        if args.prompt_tokens is not None or args.batch is not None:
            raise UsageError("--prompt-tokens and --batch shape --write-data's documents; give --write-data OUT too")
        return
    if args.prompt:
        raise UsageError("--prompt: --write-data's documents start from real training tokens (--prompt-tokens N "
                         "of them); drop --prompt")
    args.prompt_tokens = 32 if args.prompt_tokens is None else args.prompt_tokens
    args.batch = 64 if args.batch is None else args.batch


def print_samples(args, chosen, seq_len: int, device):
    """--samples texts after --prompt, printed by rank 0 with what they cost."""
    run = chosen[0][0].run
    context = prompt_tokens(args, run, seq_len)
    ens = start_ensemble(args, chosen, device)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    drawn = generate(ens, torch.tensor([context] * args.samples), args, seq_len, generator)
    seconds = time.perf_counter() - started
    finish(ens)
    if ens.rank != 0:
        return
    print("\n---\n".join(texts(run, context, drawn)))
    print(f"sampled {args.samples} x {args.tokens} tokens in {seconds:.2f} s: {drawn.numel() / seconds:,.1f} tokens/s | "
          f"{describe(chosen)} | {plural(len(chosen), 'member')}, {ens.forward_tokens:,} forward tokens per member | "
          f"{plural(ens.world, 'process')} of {plural(torch.get_num_threads(), 'thread')} on {device.type}")


@command
def main(argv=None):
    args = parse_checked(build_parser(), RANGES, argv)
    argv = sys.argv[1:] if argv is None else argv
    check_write_data(args)
    device = q0_eval.checked_device(args)
    chosen = choose(args)
    seq_len = min(m.run["model"]["seq_len"] for m, _ in chosen)
    if not args.write_data:
        print_samples(args, chosen, seq_len, device)
        return 0
    # claimed before any work: an existing folder is refused, never overwritten
    with q0_run.claim_output(args.write_data, "--write-data", hold=os.environ.get("RANK", "0") == "0"):
        manifest = distil_data(args, chosen, seq_len, device, argv)
    if manifest:
        report_data(manifest, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
