"""Sample text from q0 snapshots: one snapshot, a student run, or a prior's ensemble at budget K.

    python sample.py runs/q0 --snapshot b0c5 --prompt "ROMEO:" --tokens 200     # one snapshot
    python sample.py runs/q0-student --prompt "ROMEO:"                          # a student run: its last snapshot
    python sample.py runs/q0 --prior runs/q0/prior.json --budget 4 --prompt "ROMEO:"
    torchrun --nproc_per_node=2 sample.py runs/q0 --prior runs/q0/prior.json   # members over processes (gloo on CPU)

Every member keeps its own KV cache (train_q0.KVCache) and runs one new token a step. The next
token is drawn from the prior-weighted mixture of the members' probabilities, sum_i w_i softmax(z_i / T)
(probabilities are averaged, not logits: the ensemble eval.py scores; the temperature applies to
each member, as in train_q0.EnsembleTeacher; weights refitted for K, as --distil-from uses them),
then cut to --top-k and --top-p. Temperature 0 is greedy: the argmax of the mixture at T = 1.
A prompt starts a document (BOS first); a drawn BOS ends it, and its text stops there. When the
context reaches the shortest member's seq_len, every cache restarts from the last seq_len // 2
tokens (a fresh prefill, counted in the forward tokens): the caches never go past the context the
members were trained on, and --tokens is not bounded by it.

Under torchrun member i's body lives on rank i mod W (as train_q0.EnsembleTeacher spreads a
teacher): each rank runs its bodies, the members' probabilities are gathered, rank 0 mixes, draws
and sends the tokens back, and prints.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import eval as q0_eval
import q0_run
import train_q0
from data.shards import PATH, TEXT, ArgumentParser, Range, UsageError, at_least, command, parse_checked
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


def prior_members(args, pop) -> list[tuple[q0_run.Member, float]]:
    """Budget K of the prior (0: its largest), checked against the runs (eval.load_prior): the
    members of nonzero refitted weight."""
    path = Path(args.prior)
    budgets = sorted(b["K"] for b in q0_run.read_prior(path)["budgets"])
    k = args.budget or budgets[-1]
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
        tokens = torch.zeros(args.samples, dtype=torch.int64)
    return tokens if ens.world == 1 else q0_run.all_reduce_(tokens)  # a sum to which the others add zeros


def generate(ens: Ensemble, context: list[int], args, seq_len: int) -> torch.Tensor:
    """(samples, tokens) drawn after `context`; a full context restarts the caches from its last half."""
    generator = torch.Generator().manual_seed(args.seed)
    history = torch.tensor([context] * args.samples)                    # (n, L)
    probs, out = ens.start(history), []
    for step in range(args.tokens):
        nxt = next_tokens(ens, probs, args, generator)                 # (n,)
        out.append(nxt)
        history = torch.cat([history, nxt[:, None]], dim=1)
        if step + 1 == args.tokens:
            break
        probs = ens.start(history[:, -(seq_len // 2):]) if ens.length == seq_len else ens.step(nxt)
    return torch.stack(out, dim=1)


def texts(run: dict, context: list[int], drawn: torch.Tensor) -> list[str]:
    """Each sample as text: the prompt, then what was drawn up to a BOS (the document's end)."""
    tokenizer, out = get_tokenizer(run["tokenizer"]), []
    for row in drawn.tolist():
        ends = row.index(run["bos_id"]) if run["bos_id"] in row else len(row)
        out.append(tokenizer.decode(context[1:] + row[:ends]))
    return out


RANGES = {"runs": PATH, "snapshot": TEXT, "prior": PATH, "budget": at_least(0), "prompt": TEXT,
          "tokens": at_least(1), "temperature": at_least(0), "top_k": at_least(0),
          "top_p": Range(lo=0, hi=1, lo_open=True), "seed": at_least(0), "samples": at_least(1), "device": TEXT}


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
    return ap


def checked_device(args) -> torch.device:
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a torch device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here; give --device cpu")
    return device


def describe(chosen) -> str:
    """The snapshot, or the ensemble's members and weights."""
    if len(chosen) == 1:
        return chosen[0][0].name
    return "ensemble of " + ", ".join(f"{m.record['id']} {w:.3f}" for m, w in chosen)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 'es' if word.endswith('s') else 's'}"


@command
def main(argv=None):
    args = parse_checked(build_parser(), RANGES, argv)
    device = checked_device(args)
    chosen = choose(args)
    run = chosen[0][0].run
    seq_len = min(m.run["model"]["seq_len"] for m, _ in chosen)
    context = prompt_tokens(args, run, seq_len)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), 0
    if world > 1:
        _, rank, local = q0_run.setup_distributed(COLLECTIVE_TIMEOUT_MINUTES, cuda=device.type == "cuda")
        device = local if device.type == "cuda" and device.index is None else device
    ens = Ensemble(chosen, args.temperature, device, rank, world)
    started = time.perf_counter()
    drawn = generate(ens, context, args, seq_len)
    seconds = time.perf_counter() - started
    if world > 1:
        dist.destroy_process_group()  # an open gloo group aborts at interpreter exit
    if rank != 0:
        return 0
    print("\n---\n".join(texts(run, context, drawn)))
    print(f"sampled {args.samples} x {args.tokens} tokens in {seconds:.2f} s: {drawn.numel() / seconds:,.1f} tokens/s | "
          f"{describe(chosen)} | {plural(len(chosen), 'member')}, {ens.forward_tokens:,} forward tokens per member | "
          f"{plural(world, 'process')} of {plural(torch.get_num_threads(), 'thread')} on {device.type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
