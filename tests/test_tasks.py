"""Downstream tasks (tasks.py, eval.py --tasks): the scoring against oracles, the next-line task's
construction, and the standard tasks' hub path end to end on local stand-ins in their formats."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import TORCHRUN_2, documents, run_train, shakespeare_paragraphs, write_bytes_shard  # noqa: E402
from test_prior import assert_clean_error, cli  # noqa: E402

sys.path.insert(0, str(REPO))
import q0_run  # noqa: E402
import tasks  # noqa: E402
import train_q0  # noqa: E402


# ---------------------------------------------------------------------------------------------
# A tiny real run whose training text (lower case) and validation text (upper case) share no line
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cased_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cased_data")
    train = [d.lower() for d in documents(shakespeare_paragraphs("hamlet"))[:40]]
    val = [d.upper() for d in documents(shakespeare_paragraphs("macbeth"))[:5]]
    write_bytes_shard(folder / "train.q0t", train)
    write_bytes_shard(folder / "val.q0t", val)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, cased_data) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    run_train(cased_data, runs, "--run-name", "t", "--bases", "1", "--cycles", "2")
    assert cli("fit_prior.py", runs / "t", "--budgets", "1,2").returncode == 0
    return runs / "t"


def val_text(run_dir: Path) -> str:
    run = q0_run.load_run(run_dir)
    tokens = q0_run.load_val_tokens(run)
    return bytes(tokens[tokens != 0].astype(np.uint8)).decode()


def test_next_line_is_held_out_deterministic_and_at_chance(run, cased_data):
    r = q0_run.load_run(run)
    task, again = tasks.next_line_task(r), tasks.next_line_task(r)
    assert task.items == again.items and len(task.items) >= 20
    assert task.source["val_sha256"] == r["val"]["sha256"] and task.chance == 0.25
    text = val_text(run)
    train = bytes(np.fromfile(cased_data / "train.q0t", dtype=np.uint8)).decode(errors="replace")
    for it in task.items:
        assert len(it.choices) == 4 and len(set(it.choices)) == 4
        assert it.context + it.choices[it.gold] in text           # the true next line, verbatim
        for piece in (it.context, *it.choices):
            assert piece in text and piece.strip() not in train     # validation text only
            assert piece == piece.upper()


def test_next_line_construction_on_known_text():
    """Every line with 3 before it is an item; the gold position is uniform; an unterminated last
    piece is no line; a document without 4 distinct lines makes none."""
    lines = [f"line {i}: " + "x" * (i % 7) for i in range(400)]
    doc = "\n".join(lines) + "\npartial"
    items = tasks.next_line_items([doc, "a\nb\na\nb\n"])
    assert len(items) == 400 - 3
    assert not any("partial" in c for it in items for c in it.choices)
    counts = np.bincount([it.gold for it in items], minlength=4) / len(items)
    assert counts.min() > 0.18 and counts.max() < 0.32, counts
    first = next(it for it in items if it.context.startswith("line 0:"))
    assert first.context == "\n".join(lines[:3]) + "\n" and first.choices[first.gold] == lines[3] + "\n"
    assert tasks.next_line_items([doc, "a\nb\na\nb\n"]) == items


# ---------------------------------------------------------------------------------------------
# Scoring: windows, the oracle of a full forward, the mixture, acc_norm by bytes
# ---------------------------------------------------------------------------------------------

def test_windows_keep_the_rightmost_tokens():
    assert tasks.windows(3, 6, 8) == [(0, 3, 6)]              # fits: one window, all context
    assert tasks.windows(20, 25, 8) == [(16, 20, 25)]         # a long context: its rightmost tokens
    assert tasks.windows(3, 10, 4) == [(5, 6, 10), (1, 3, 6)]  # a continuation longer than seq_len


def test_choice_sums_equal_a_full_forward(run):
    """The batched rows give each continuation token the log-probability token_probs gives it in a
    forward pass over the (rightmost seq_len + 1 tokens of the) context and continuation alone."""
    r = q0_run.load_run(run)
    record = q0_run.list_snapshots(run)[-1]
    model = train_q0.load_snapshot_model(run, record)
    S = r["seq_len"]
    items = [tasks.Item("A SHORT ONE\n", ("GO.\n", "STAY HERE A WHILE.\n"), 0),
             tasks.Item("THE CONTEXT IS LONGER THAN THE WINDOW OF THIS TINY MODEL, BY FAR. ", ("YES", "NO"), 1, " ")]
    layout = tasks.build_layout([tasks.Task("t", items, {})], r)
    logp = tasks.Forward(layout, r["bos_id"], batch_size=3)(model, q0_run.Member(run, 0, r, record))
    sums = tasks.choice_sums(layout, logp)
    for c, (ctx, cont) in enumerate(layout.sequences):
        seq = np.array(ctx + cont)[-(S + 1):]
        p = train_q0.token_probs(model, seq, S, 4, "cpu")
        oracle = float(np.log(p[-len(cont):].astype(np.float64)).sum())
        assert abs(sums[c] - oracle) < 1e-4 * max(1.0, abs(oracle)), (c, sums[c], oracle)
    assert len(layout.sequences[2][0]) > S  # the long context was cut to its rightmost tokens


def test_the_mixture_at_k1_is_the_member_alone():
    rng = np.random.default_rng(0)
    LP = np.log(rng.uniform(1e-6, 1, size=(3, 50))).astype(np.float32)
    for i in range(3):
        w = np.zeros(3)
        w[i] = 1.0
        assert np.array_equal(tasks.mixture_logprobs(LP, w), LP[i].astype(np.float64))
    w = np.array([0.2, 0.0, 0.8])  # and two members: log of the weighted mean of probabilities
    np.testing.assert_allclose(tasks.mixture_logprobs(LP, w), np.log(w @ np.exp(LP.astype(np.float64))), rtol=1e-12)


def test_acc_norm_divides_by_bytes():
    """'éé' is 2 characters, 4 bytes; 'abc' 3 and 3. By sum 'abc' wins; per byte 'éé' (-1.1 against
    -1.2); per character it would be 'abc' again (-2.2 against -1.2)."""
    item = tasks.Item("x", ("éé", "abc"), 0)
    layout = tasks.build_layout([tasks.Task("t", [item], {})], {"tokenizer": "bytes", "bos_id": 0})
    assert list(layout.n_bytes) == [4, 3]
    (res,) = tasks.accuracy(layout, np.array([-4.4, -3.6]), 1)
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0


def test_eval_scores_next_line_and_the_k1_prior_as_its_member(run, tmp_path):
    out = tmp_path / "e.json"
    r = cli("eval.py", run, "--prior", run / "prior.json", "--tasks", "next-line", "--task-items", "30",
            "--parts", "members,uniform,prior", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["version"] == 3
    (task,) = res["tasks"]
    assert task["name"] == "next-line" and task["items"] == 30 and task["chance"] == 0.25
    rows = task["scores"]
    assert [x["what"] for x in rows] == ["snapshot"] * 2 + ["uniform"] + ["prior"] * 4
    top = json.loads((run / "prior.json").read_text())["budgets"][0]["members"][0]["id"]
    alone = next(x for x in rows if x["what"] == "snapshot" and x["id"] == top)
    for x in rows[3:5]:  # K=1, both weightings: the snapshot alone
        assert (x["K"], x["forward_passes"], x["acc"], x["acc_norm"]) == (1, 1, alone["acc"], alone["acc_norm"])
    assert "## Downstream tasks" in r.stdout and "| next-line | uniform, all | 2 | 30 | 25.0% |" in r.stdout


# ---------------------------------------------------------------------------------------------
# The standard tasks: the hub path on local stand-ins in each task's original format
# ---------------------------------------------------------------------------------------------

HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
     "ctx_b": "then", "ctx": "", "split": "val", "split_type": "indomain", "label": 3, "source_id": "x",
     "endings": [", the man adds wax.", ", the man puts on a christmas coat.", ", the man continues.",
                 ", the man clears the windshield."]},
    {"ind": 9, "activity_label": "Baking cookies", "ctx_a": "[header] How to bake. [title] Preheat.",
     "ctx_b": "you", "ctx": "", "split": "val", "split_type": "zeroshot", "label": "0", "source_id": "y",
     "endings": ["mix the dough [step] well.", "sing.", "fly away.", "stop."]},
]
ARC = [
    {"id": "q1", "question": {"stem": "Which is a liquid?", "choices": [
        {"text": "ice", "label": "A"}, {"text": "water", "label": "B"}, {"text": "rock", "label": "C"},
        {"text": "wood", "label": "D"}]}, "answerKey": "B"},
    {"id": "q2", "question": {"stem": "What do plants need?", "choices": [
        {"text": "light", "label": "1"}, {"text": "noise", "label": "2"}, {"text": "salt", "label": "3"},
        {"text": "dark", "label": "4"}]}, "answerKey": "1"},
]
PIQA = [{"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "shout at it."},
        {"goal": "To dry a towel,", "sol1": "soak it.", "sol2": "hang it in the sun."}]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Stand-in files served by a stand-in hf_hub_download, pinned in HUB_TASKS by their SHA-256."""
    folder = tmp_path / "hub"
    folder.mkdir()
    files = {"hellaswag_val.jsonl": HELLASWAG, "ARC-Easy-Test.jsonl": ARC, "ARC-Challenge-Test.jsonl": ARC[:1],
             "valid.jsonl": PIQA}
    for name, rows in files.items():
        (folder / name).write_text("".join(json.dumps(x) + "\n" for x in rows))
    (folder / "valid-labels.lst").write_text("0\n1\n")
    calls = []

    def download(repo_id, filename, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type, revision))
        return str(folder / filename)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    for name, spec in tasks.HUB_TASKS.items():
        sha = tuple(hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in spec.files)
        monkeypatch.setitem(tasks.HUB_TASKS, name, tasks.HubTask(spec.parse, spec.files, f"stand-in/{name}",
                                                                 f"{len(name):040d}", sha))
    return folder, calls


def test_standard_tasks_end_to_end_on_stand_ins(run, hub, tmp_path):
    folder, calls = hub
    out = tmp_path / "e.json"
    r = cli("eval.py", run, "--tasks", "hellaswag,arc-easy,arc-challenge,piqa", "--parts", "members,uniform",
            "--out", out)
    assert r.returncode == 0, r.stderr
    assert ("stand-in/piqa", "valid-labels.lst", "dataset", f"{4:040d}") in calls and len(calls) == 5
    res = {t["name"]: t for t in json.loads(out.read_text())["tasks"]}
    assert [(res[n]["items"], res[n]["chance"]) for n in ("hellaswag", "arc-easy", "arc-challenge", "piqa")] == \
        [(2, 0.25), (2, 0.25), (1, 0.25), (2, 0.5)]
    src = res["piqa"]["source"]
    assert src["revision"] == f"{4:040d}" and [f["pinned"] for f in src["files"]] == [True, True]
    assert src["files"][1]["sha256"] == hashlib.sha256(b"0\n1\n").hexdigest()
    assert all(len(t["scores"]) == 3 for t in res.values())  # 2 snapshots and the uniform ensemble
    hs = tasks.hub_task("hellaswag", None).items
    assert hs[1].context == "Baking cookies: How to bake.. Preheat. You" and hs[1].choices[0] == "mix the dough well."
    assert hs[0].gold == 3 and hs[0].delimiter == " "
    arc = tasks.hub_task("arc-easy", None).items
    assert [it.gold for it in arc] == [1, 0] and arc[0].context == "Question: Which is a liquid?\nAnswer:"
    assert [it.gold for it in tasks.hub_task("piqa", None).items] == [0, 1]


def test_a_sha256_mismatch_is_refused(run, hub, tmp_path, monkeypatch):
    folder, calls = hub
    (folder / "ARC-Easy-Test.jsonl").write_text(json.dumps(ARC[1]) + "\n")  # changed behind its pin
    out = tmp_path / "e.json"
    r = cli("eval.py", run, "--tasks", "arc-easy", "--out", out)
    assert_clean_error(r, "ARC-Easy-Test.jsonl", "SHA-256", "not used")
    assert not out.exists()
    # a local copy is checked against the same pin; with no pin it is used, its SHA-256 recorded
    assert_clean_error(cli("eval.py", run, "--tasks", "arc-easy", "--task-file",
                           f"arc-easy={folder / 'ARC-Easy-Test.jsonl'}", "--out", out), "SHA-256", "not used")
    monkeypatch.setitem(tasks.HUB_TASKS, "arc-easy", tasks.HubTask(tasks.arc_items, ("ARC-Easy-Test.jsonl",)))
    assert_clean_error(cli("eval.py", run, "--tasks", "arc-easy", "--out", out), "no hub revision and SHA-256",
                       "--task-file arc-easy=ARC-Easy-Test.jsonl")
    r = cli("eval.py", run, "--tasks", "arc-easy", "--task-file", f"arc-easy={folder / 'ARC-Easy-Test.jsonl'}",
            "--parts", "uniform", "--out", out)
    assert r.returncode == 0 and "is checked against no pin" in r.stderr, r.stderr
    (f,) = json.loads(out.read_text())["tasks"][0]["source"]["files"]
    assert f["pinned"] is False and f["sha256"] == hashlib.sha256((folder / "ARC-Easy-Test.jsonl").read_bytes()).hexdigest()


def test_bad_task_flags_are_one_line(run, cased_data, tmp_path):
    out = tmp_path / "e.json"
    assert_clean_error(cli("eval.py", run, "--tasks", "next-line,lambada", "--out", out), "--tasks", "arc-easy")
    assert_clean_error(cli("eval.py", run, "--task-items", "5", "--out", out), "give --tasks too")
    assert_clean_error(cli("eval.py", run, "--tasks", "piqa", "--task-file", "piqa=valid.jsonl", "--out", out),
                       "valid.jsonl,valid-labels.lst")
    assert_clean_error(cli("eval.py", run, "--tasks", "next-line", "--task-file", "piqa=a,b", "--out", out),
                       "not among --tasks")
    assert_clean_error(cli("eval.py", run, "--tasks", "next-line", "--task-items", "0", "--out", out), "--task-items")
    shutil.move(cased_data / "val.q0t", tmp_path / "val.q0t")  # a run whose validation text is gone
    try:
        assert_clean_error(cli("eval.py", run, "--tasks", "next-line", "--out", out), "validation tokens", "not found")
    finally:
        shutil.move(tmp_path / "val.q0t", cased_data / "val.q0t")
    assert not out.exists()


def test_task_rows_are_spread_into_fixed_shapes():
    """Every forward is [batch, seq_len]; each target is scored by exactly one row position, and
    predicted from the tokens before it."""
    items = [tasks.Item("ab\n", ("cdefghij\n", "k\n"), 0), tasks.Item("", ("xy", "z"), 1, " ")]
    layout = tasks.build_layout([tasks.Task("t", items, {})], {"tokenizer": "bytes", "bos_id": 0})
    rows = tasks.build_rows(layout, 4)
    inputs, targets, where = tasks.padded(rows, range(len(rows.tokens)), len(rows.tokens) + 1, 4, 0)
    assert inputs.shape == (len(rows.tokens) + 1, 4) and (where[-1] == -1).all()
    assert sorted(where[where >= 0]) == list(range(layout.n_targets))
    flat = [t for _, cont in layout.sequences for t in cont]
    assert all(targets[r, p] == flat[where[r, p]] for r, p in zip(*np.nonzero(where >= 0)))
    assert torch.equal(torch.from_numpy(layout.choice_of), torch.tensor([0] * 10 + [1] * 3 + [2] * 3 + [3] * 2))


def test_two_processes_score_the_tasks_as_one(run, tmp_path):
    """Under torchrun the members' task forward passes are spread over the processes, as eval.py's
    validation forward passes are (forward_members), and every number is the one process's."""
    args = [run, "--prior", run / "prior.json", "--forward", "--tasks", "next-line", "--task-items", "20"]
    assert cli("eval.py", *args, "--out", tmp_path / "one.json").returncode == 0
    r = subprocess.run([*TORCHRUN_2, str(REPO / "eval.py"), *map(str, args), "--out", str(tmp_path / "two.json")],
                       cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / n).read_text()) for n in ("one.json", "two.json"))
    assert two["processes"] == 2 and len(one["tasks"][0]["scores"]) == 7
    assert one["tasks"] == two["tasks"]
