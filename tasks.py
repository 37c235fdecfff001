"""Downstream tasks for eval.py: zero-shot multiple choice, scored for snapshots, ensembles and students.

    python eval.py runs/q0 --prior runs/q0/prior.json --tasks next-line [--task-items 200]
    python eval.py runs/q0 --tasks hellaswag --task-file hellaswag=hellaswag_val.jsonl

Scoring is the standard zero-shot form (lm-evaluation-harness's, and nanochat's CORE): an item is
a context and N choices; each choice's continuation (the task's delimiter, then the choice) is
scored by its summed log-probability given the context.
  acc       the choice with the largest sum;
  acc_norm  the largest sum divided by the choice's length in UTF-8 bytes (the harness divides by
            len(choice), the characters of the choice without its delimiter: the same for ASCII).
Each context is BOS, then its text: an item is a document of its own, as CORE scores it. Tokens
follow the harness: the context's trailing whitespace moves to the continuation, whose tokens are
those of context + continuation after the context's. A sequence longer than seq_len + 1 keeps its
rightmost tokens; a continuation longer than seq_len is scored in several windows, each with as
much context as fits. An ensemble scores each continuation token with log(sum_i w_i p_i(y_t)),
the mixture eval.py scores on the validation set; one member alone is log p_i(y_t) exactly.

The tasks: next-line (NEXT_LINE_DOC), built from the run's validation text, so a byte-level CPU
model can do it; and hellaswag, arc-easy, arc-challenge, piqa, read from their original files:
a hub download at the revision and SHA-256 pinned in HUB_TASKS, or a local copy (--task-file).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import q0_run
from data.shards import UsageError, sha256_file

# ---------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]   # as the task states them; each continuation is delimiter + choice
    gold: int
    delimiter: str = ""


@dataclasses.dataclass
class Task:
    name: str
    items: list[Item]
    source: dict               # what the items were built from, with its SHA-256

    @property
    def chance(self) -> float:
        return float(np.mean([1 / len(it.choices) for it in self.items]))


# ---------------------------------------------------------------------------------------------
# next-line: built from the run's held-out validation text
# ---------------------------------------------------------------------------------------------

NEXT_LINE_CONTEXT_LINES = 3
NEXT_LINE_CHOICES = 4
NEXT_LINE_SEED = 0
NEXT_LINE_DOC = """next-line: which of four lines comes next, in the run's held-out validation text.

Built from the run's validation tokens exactly as it scored them (run.json "val": the tokens and
their SHA-256, checked by q0_run.load_val_tokens; whole documents held out of training, never
trained on), cut into documents at BOS and decoded to text. A line is a piece of a document that
ends with a newline and holds a non-space character (an unterminated last piece, such as text cut
by --val-tokens, is no line). Every line with at least 3 lines before it in its document is an
item: the context is the document's text from the start of the 3rd line before it up to its own
start (verbatim, blank lines included); the choices are that line and 3 other lines of the same
document, each with its newline, all 4 of different text, the 3 drawn uniformly (rejecting
repeats) by numpy's default_rng([0, document, line]), which also places the true line at a
uniformly drawn position. Chance is exactly 1/4. Items come in the order of
default_rng([0]).permutation, so --task-items N is a fixed sample spread over the text.
Deterministic: the same validation tokens give the same items."""


def complete_lines(text: str) -> list[tuple[int, str]]:
    """(offset, text) of every newline-terminated line of `text` with a non-space character."""
    out, pos = [], 0
    for line in text.split("\n")[:-1]:  # the last piece has no newline
        if line.strip():
            out.append((pos, line))
        pos += len(line) + 1
    return out


def _distractors(rng: np.random.Generator, texts: list[str], true: str) -> list[str]:
    """Lines of other text than `true` and than each other, by rejection: the caller makes sure
    enough distinct texts exist."""
    picked: list[str] = []
    while len(picked) < NEXT_LINE_CHOICES - 1:
        t = texts[int(rng.integers(len(texts)))]
        if t != true and t not in picked:
            picked.append(t)
    return picked


def document_items(text: str, doc: int, seed: int = NEXT_LINE_SEED) -> list[Item]:
    lines = complete_lines(text)
    texts = [t for _, t in lines]
    if len(set(texts)) < NEXT_LINE_CHOICES:  # no 3 other distinct lines to draw
        return []
    items = []
    for i in range(NEXT_LINE_CONTEXT_LINES, len(lines)):
        rng = np.random.default_rng([seed, doc, i])
        picked = _distractors(rng, texts, texts[i])
        gold = int(rng.integers(NEXT_LINE_CHOICES))
        choices = picked[:gold] + [texts[i]] + picked[gold:]
        context = text[lines[i - NEXT_LINE_CONTEXT_LINES][0]:lines[i][0]]
        items.append(Item(context, tuple(c + "\n" for c in choices), gold))
    return items


def next_line_items(documents: list[str], seed: int = NEXT_LINE_SEED) -> list[Item]:
    items = [it for d, text in enumerate(documents) for it in document_items(text, d, seed)]
    order = np.random.default_rng([seed]).permutation(len(items))
    return [items[i] for i in order]


def validation_documents(run: dict) -> list[str]:
    """The run's validation tokens (checked against run.json), as the text of each document."""
    from data.tokenizers import get_tokenizer  # (tiktoken: imported only where a task needs it)
    tokens = q0_run.load_val_tokens(run)
    tok = get_tokenizer(run["tokenizer"])
    cuts = np.flatnonzero(tokens == run["bos_id"])
    return [tok.decode(doc[doc != run["bos_id"]]) for doc in np.split(tokens, cuts) if doc.size]


def next_line_task(run: dict) -> Task:
    items = next_line_items(validation_documents(run))
    if not items:
        raise UsageError(f"--tasks next-line: the validation text of {run.get('run_name', 'the run')} has no line with "
                         f"{NEXT_LINE_CONTEXT_LINES} lines before it and {NEXT_LINE_CHOICES - 1} other distinct lines; "
                         f"train with more --val-tokens")
    v = run["val"]
    return Task("next-line", items, {"kind": "validation text", "val_tokens": v["tokens"], "val_sha256": v["sha256"],
                                     "seed": NEXT_LINE_SEED, "context_lines": NEXT_LINE_CONTEXT_LINES})


# ---------------------------------------------------------------------------------------------
# Standard tasks: the original files, in their own formats, prompts as lm-evaluation-harness's
# ---------------------------------------------------------------------------------------------

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _hellaswag_clean(text: str) -> str:
    """The harness's HellaSwag preprocess: WikiHow's bracketed markers out, double spaces single."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_items(paths: list[Path]) -> list[Item]:
    """hellaswag_val.jsonl (rowanz/hellaswag): ctx_a, ctx_b, activity_label, endings, label."""
    out = []
    for d in read_jsonl(paths[0]):
        query = _hellaswag_clean(f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}")
        out.append(Item(query, tuple(_hellaswag_clean(e) for e in d["endings"]), int(d["label"]), " "))
    return out


def arc_items(paths: list[Path]) -> list[Item]:
    """ARC-{Easy,Challenge}-Test.jsonl (AI2's ARC-V1-Feb2018): question.stem, question.choices
    [{text, label}], answerKey."""
    out = []
    for d in read_jsonl(paths[0]):
        q = d["question"]
        labels = [c["label"] for c in q["choices"]]
        out.append(Item(f"Question: {q['stem']}\nAnswer:", tuple(c["text"] for c in q["choices"]),
                        labels.index(d["answerKey"]), " "))
    return out


def piqa_items(paths: list[Path]) -> list[Item]:
    """PIQA's valid.jsonl (goal, sol1, sol2) and valid-labels.lst (0 or 1, one a line)."""
    docs, labels = read_jsonl(paths[0]), Path(paths[1]).read_text().split()
    if len(docs) != len(labels):
        raise ValueError(f"{len(docs)} items but {len(labels)} labels")
    return [Item(f"Question: {d['goal']}\nAnswer:", (d["sol1"], d["sol2"]), int(y), " ") for d, y in zip(docs, labels)]


@dataclasses.dataclass(frozen=True)
class HubTask:
    """Where a standard task's original file(s) come from. The hub path downloads `files` from
    the dataset repo `repo_id` at `revision` (a commit) and checks each against its SHA-256 before
    use; with any of them None the task is not pinned and only a local copy (--task-file) scores."""
    parse: Callable[[list[Path]], list[Item]]
    files: tuple[str, ...]
    repo_id: str | None = None
    revision: str | None = None
    sha256: tuple[str | None, ...] = ()

    @property
    def pinned(self) -> bool:
        return bool(self.repo_id and self.revision and len(self.sha256) == len(self.files) and all(self.sha256))


# Not pinned: no dataset repo on the Hugging Face hub holding these files in their original JSON
# Lines formats could be verified (its commit and every file's SHA-256) when this was written; the
# canonical copies are parquet conversions, which need pyarrow. To pin a task, fill in repo_id,
# revision (40 hex digits) and each file's SHA-256 (a Git LFS pointer's `oid sha256:`).
HUB_TASKS = {
    "hellaswag": HubTask(hellaswag_items, ("hellaswag_val.jsonl",)),
    "arc-easy": HubTask(arc_items, ("ARC-Easy-Test.jsonl",)),
    "arc-challenge": HubTask(arc_items, ("ARC-Challenge-Test.jsonl",)),
    "piqa": HubTask(piqa_items, ("valid.jsonl", "valid-labels.lst")),
}
TASKS = ("next-line", *HUB_TASKS)


def hub_download(name: str, spec: HubTask, i: int) -> Path:
    """One pinned file through huggingface_hub (its cache, or the hub), as a local path."""
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(spec.repo_id, spec.files[i], repo_type="dataset", revision=spec.revision))
    except Exception as e:  # noqa: BLE001 - offline, gone, refused: one line, and the way round it
        raise UsageError(f"--tasks {name}: cannot download {spec.files[i]} of {spec.repo_id} at {spec.revision[:12]} "
                         f"({type(e).__name__}); reach the hub, or give a local copy: --task-file "
                         f"{name}={','.join(spec.files)}") from None


def checked_file(name: str, path: Path, expect: str | None, where: str) -> dict:
    """A task file and its SHA-256, refused when it differs from the pinned one (then never read)."""
    if not path.is_file():
        raise UsageError(f"--task-file {name}: {path} not found; give the path of its {where}")
    got = sha256_file(path)
    if expect is not None and got != expect:
        raise UsageError(f"{name}: {path} has SHA-256 {got}, not the pinned {expect} ({where}); it is not used: "
                         f"remove it (from the hub cache, if downloaded) and fetch it again, or give the pinned file")
    return {"file": str(path), "sha256": got, "pinned": expect is not None}


def hub_task(name: str, local: list[Path] | None) -> Task:
    """A standard task from its pinned hub files, or from local copies (checked against the pins
    that exist; an unpinned copy is used as given, its SHA-256 recorded)."""
    spec = HUB_TASKS[name]
    if local is None and not spec.pinned:
        raise UsageError(f"--tasks {name}: no hub revision and SHA-256 are pinned for {', '.join(spec.files)} in "
                         f"tasks.HUB_TASKS; pin them there, or score a local copy: --task-file "
                         f"{name}={','.join(spec.files)}")
    sha = spec.sha256 or (None,) * len(spec.files)
    paths = local or [hub_download(name, spec, i) for i in range(len(spec.files))]
    files = [checked_file(name, Path(p), sha[i], spec.files[i]) for i, p in enumerate(paths)]
    for f in files:
        if not f["pinned"]:
            print(f"note: {name}: {f['file']} (sha256 {f['sha256']}) is checked against no pin (tasks.HUB_TASKS has "
                  f"none); the results record its SHA-256", file=sys.stderr)
    try:
        items = spec.parse([Path(f["file"]) for f in files])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise UsageError(f"--tasks {name}: {', '.join(str(p) for p in paths)} is not in {name}'s format "
                         f"({', '.join(spec.files)}: {type(e).__name__}: {e})") from None
    source = {"kind": "local files" if local else "hub", "repo_id": spec.repo_id, "revision": spec.revision,
              "files": files}
    return Task(name, items, source)


# ---------------------------------------------------------------------------------------------
# Flags: --tasks, --task-items, --task-file
# ---------------------------------------------------------------------------------------------

def parse_flags(tasks: str, task_files: list[str] | None) -> tuple[list[str], dict[str, list[Path]]]:
    """The task names, and the local files given for standard tasks; refused before any work."""
    names = [t for t in tasks.split(",") if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names or len(set(names)) != len(names):
        raise UsageError(f"--tasks {tasks}: give each task once, from {','.join(TASKS)}")
    local = {}
    for spec in task_files or []:
        name, _, paths = spec.partition("=")
        if name not in HUB_TASKS or not paths:
            raise UsageError(f"--task-file {spec}: expected TASK=PATH[,PATH] for one of {','.join(HUB_TASKS)}")
        if name not in names:
            raise UsageError(f"--task-file {spec}: {name} is not among --tasks {tasks}; add it there")
        local[name] = [Path(p) for p in paths.split(",")]
        if len(local[name]) != len(HUB_TASKS[name].files):
            raise UsageError(f"--task-file {spec}: {name} reads {len(HUB_TASKS[name].files)} file(s), "
                             f"{','.join(HUB_TASKS[name].files)}, in that order")
    return names, local


def load_tasks(names: list[str], local: dict[str, list[Path]], run: dict, cap: int | None) -> list[Task]:
    """Every task's items (the first `cap` of each), each file checked before it is read."""
    out = []
    for name in names:
        task = next_line_task(run) if name == "next-line" else hub_task(name, local.get(name))
        for it in task.items:
            if not it.choices or not all(c.strip() for c in it.choices) or not 0 <= it.gold < len(it.choices):
                raise UsageError(f"--tasks {name}: an item has an empty choice or a gold index outside its choices; "
                                 f"check the file")
        task.items = task.items[:cap] if cap else task.items
        out.append(task)
    return out


# ---------------------------------------------------------------------------------------------
# Tokens and forward rows: every continuation token of every choice is one target
# ---------------------------------------------------------------------------------------------

def encode_pair(tok, bos_id: int, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(BOS + context tokens, continuation tokens), split as the harness splits them."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tok.encode(context)
    return [bos_id] + ctx, tok.encode(context + continuation)[len(ctx):]


def windows(n_ctx: int, n: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(start, first target, end) of the windows that score targets n_ctx..n-1 of a sequence of n
    tokens: the last window ends at the sequence's end and keeps its rightmost seq_len + 1 tokens;
    earlier ones (a continuation longer than seq_len) cover the targets before it, the same way."""
    if n_ctx < 1 or seq_len < 1:  # (the context holds BOS at least: each target has a token before it)
        raise ValueError(f"windows need a context token and seq_len >= 1, not {n_ctx} and {seq_len}")
    out, end = [], n
    while end > n_ctx:
        start = max(0, end - seq_len - 1)
        first = max(n_ctx, start + 1)
        out.append((start, first, end))
        end = first
    return out


@dataclasses.dataclass
class Layout:
    """The targets of every task: their tokens by choice, each choice's slice of the targets."""
    sequences: list[tuple[list[int], list[int]]]   # per choice: (context tokens, continuation tokens)
    choice_of: np.ndarray                           # int64[targets]: the choice each target scores
    n_bytes: np.ndarray                             # int64[choices]: UTF-8 bytes of each choice (acc_norm)
    items: list[tuple[int, int, int, int]]          # (task, first choice, choices, gold) per item

    @property
    def n_targets(self) -> int:
        return int(self.choice_of.size)


def build_layout(tasks: list[Task], run: dict) -> Layout:
    from data.tokenizers import get_tokenizer
    tok = get_tokenizer(run["tokenizer"])
    seqs, owner, n_bytes, items = [], [], [], []
    for t, task in enumerate(tasks):
        for it in task.items:
            items.append((t, len(seqs), len(it.choices), it.gold))
            for c in it.choices:
                ctx, cont = encode_pair(tok, run["bos_id"], it.context, it.delimiter + c)
                owner += [len(seqs)] * len(cont)
                seqs.append((ctx, cont))
                n_bytes.append(len(c.encode("utf-8")))
    return Layout(seqs, np.asarray(owner, dtype=np.int64), np.asarray(n_bytes, dtype=np.int64), items)


@dataclasses.dataclass
class Rows:
    """Forward rows of one sequence length, ragged (padded a batch at a time, so memory is the
    tokens, not rows x seq_len): each row's tokens (inputs, then the last target) and, for each
    input position, the index of the target it scores (-1: none)."""
    tokens: list[np.ndarray]
    where: list[np.ndarray]


def build_rows(layout: Layout, seq_len: int) -> Rows:
    rows = Rows([], [])
    at = 0  # index of the choice's first target
    for ctx, cont in layout.sequences:
        seq = np.asarray(ctx + cont, dtype=np.int32)
        for start, first, end in windows(len(ctx), len(seq), seq_len):
            # input position p predicts seq[start + p + 1]: target start + p + 1 - len(ctx) when scored
            pos = np.arange(start + 1, end)
            rows.tokens.append(seq[start:end])
            rows.where.append(np.where(pos >= first, at + pos - len(ctx), -1))
        at += len(cont)
    return rows


def padded(rows: Rows, take: range, batch_size: int, seq_len: int, pad: int) -> tuple[np.ndarray, ...]:
    """(inputs, targets, where) of rows `take`, [batch_size, seq_len]: short rows padded after their
    tokens with `pad`, missing rows with rows that score nothing."""
    inputs = np.full((batch_size, seq_len), pad, dtype=np.int64)
    targets = np.zeros((batch_size, seq_len), dtype=np.int64)
    where = np.full((batch_size, seq_len), -1, dtype=np.int64)
    for r, i in enumerate(take):
        n = len(rows.where[i])
        inputs[r, :n], targets[r, :n], where[r, :n] = rows.tokens[i][:-1], rows.tokens[i][1:], rows.where[i]
    return inputs, targets, where


@torch.no_grad()
def target_logprobs(model, rows: Rows, n_targets: int, batch_size: int, seq_len: int, pad: int) -> np.ndarray:
    """log p(target) of every target, float32, from forward passes of [batch_size, seq_len] on the
    model's device (one shape); each row is its own context from its first position, and a row's
    padding, after its tokens, never reaches them (causal attention)."""
    import train_q0  # the model: only forward passes need the trainer
    device = next(model.parameters()).device
    out = np.zeros(n_targets, dtype=np.float32)
    model.eval()
    for s in range(0, len(rows.tokens), batch_size):
        inputs, targets, where = padded(rows, range(s, min(len(rows.tokens), s + batch_size)), batch_size, seq_len, pad)
        w = train_q0.to_device(torch.from_numpy(inputs), device)
        y = train_q0.to_device(torch.from_numpy(targets), device).flatten()
        logp = torch.empty(y.numel(), dtype=torch.float32, device=device)
        with train_q0.autocast_for(device):
            x = model(w, hidden=True).flatten(0, 1)
            for c in train_q0.token_chunks(x.size(0)):
                z = model.logits(x[c]).float()
                logp[c] = z.gather(-1, y[c, None]).squeeze(-1) - z.logsumexp(-1)
        where = where.reshape(-1)
        keep = where >= 0
        out[where[keep]] = logp.cpu().numpy()[keep]
    return out


class Forward:
    """What eval.py's member loop runs for the tasks: each member's log p of every target, at its
    run's sequence length (rows built once per length)."""

    def __init__(self, layout: Layout, bos_id: int, batch_size: int):
        self.layout, self.bos_id, self.batch_size = layout, bos_id, batch_size
        self.rows: dict[int, Rows] = {}

    def __call__(self, model, member) -> np.ndarray:
        seq_len = member.run["seq_len"]
        if seq_len not in self.rows:
            self.rows[seq_len] = build_rows(self.layout, seq_len)
        return target_logprobs(model, self.rows[seq_len], self.layout.n_targets, self.batch_size, seq_len,
                               self.bos_id)


# ---------------------------------------------------------------------------------------------
# Accuracy: a member alone, or a weighting's mixture, per task
# ---------------------------------------------------------------------------------------------

def choice_sums(layout: Layout, logp: np.ndarray) -> np.ndarray:
    """Summed log-probability of each choice's continuation, from log p of every target."""
    return np.bincount(layout.choice_of, weights=logp.astype(np.float64), minlength=len(layout.sequences))


def mixture_logprobs(LP: np.ndarray, w: np.ndarray) -> np.ndarray:
    """log sum_i w_i p_i(y_t) of every target, over the members with weight (float64)."""
    idx = np.flatnonzero(w)
    lp = torch.from_numpy(LP[idx].astype(np.float64)) + torch.from_numpy(np.log(w[idx]))[:, None]
    return torch.logsumexp(lp, dim=0).numpy()


def accuracy(layout: Layout, sums: np.ndarray, n_tasks: int) -> list[dict]:
    """acc and acc_norm of each task, with their binomial standard errors sqrt(p (1 - p) / n)."""
    hits = [[[], []] for _ in range(n_tasks)]
    for t, first, n, gold in layout.items:
        s = sums[first:first + n]
        hits[t][0].append(int(np.argmax(s)) == gold)
        hits[t][1].append(int(np.argmax(s / layout.n_bytes[first:first + n])) == gold)
    out = []
    for acc, norm in hits:
        a, b, n = float(np.mean(acc)), float(np.mean(norm)), len(acc)
        out.append({"acc": a, "acc_norm": b, "acc_stderr": math.sqrt(a * (1 - a) / n),
                    "acc_norm_stderr": math.sqrt(b * (1 - b) / n)})
    return out


def score(tasks: list[Task], layout: Layout, LP: np.ndarray, scored: list[dict]) -> list[dict]:
    """Per task: its items, chance, source, and a row per scored thing. `scored`: dicts with a
    label ("what") and either "member" (an index into LP's rows) or "w" (a weighting over them)."""
    out = [{"name": t.name, "items": len(t.items), "chance": t.chance, "source": t.source, "scores": []}
           for t in tasks]
    for s in scored:
        logp = LP[s["member"]] if "member" in s else mixture_logprobs(LP, s["w"])
        passes = 1 if "member" in s else int(np.count_nonzero(s["w"]))
        label = {k: v for k, v in s.items() if k not in ("member", "w")}
        for task, acc in zip(out, accuracy(layout, choice_sums(layout, logp), len(tasks))):
            task["scores"].append(label | {"forward_passes": passes} | acc)
    return out


def label(row: dict) -> str:
    """How a scored thing reads in the table."""
    if row["what"] == "snapshot":
        return f"snapshot {Path(row['run']).name}:{row['id']}"
    if row["what"] == "prior":
        return f"prior K={row['K']}, {row['weights']}"
    if row["what"] == "student":
        return f"student {Path(row['run']).name} ({row['id']}; teacher K={row['teacher_K']})"
    return "uniform, all"


def markdown(results: list[dict]) -> list[str]:
    out = ["## Downstream tasks", "",
           "Zero-shot multiple choice: acc by summed log-probability of each choice, acc_norm by that sum over "
           "its UTF-8 bytes; +- one binomial standard error.", "",
           "| task | snapshot, ensemble or student | forward passes | items | chance | acc | acc_norm |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for t in results:
        for r in t["scores"]:
            out.append(f"| {t['name']} | {label(r)} | {r['forward_passes']} | {t['items']} | {t['chance']:.1%} | "
                       f"{r['acc']:.1%} +- {r['acc_stderr']:.1%} | {r['acc_norm']:.1%} +- {r['acc_norm_stderr']:.1%} |")
    return out + [""]
