"""Ensemble distillation (--distil-from): the ensemble teacher's log-probabilities, a whole student
run that eval.py scores beside the ensemble, and the bad inputs it refuses."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, TORCHRUN_2, run_train

import q0_run
import train_q0 as q0


def tiny_cfg(seed: int) -> q0.GPTConfig:
    torch.manual_seed(seed)
    return q0.GPTConfig(vocab_size=50, n_layer=2, d_model=32, n_head=2, mlp_hidden=32, seq_len=12, short_window=4,
                        loop_start=1, loop_end=1)


def test_ensemble_log_probs_equal_the_mixture():
    """log sum_i w_i softmax(z_i / T), chunk-wise from stacked features, against a direct float64
    computation from each member's logits."""
    members = [q0.GPT(tiny_cfg(s)).eval().requires_grad_(False) for s in range(3)]
    with torch.no_grad():  # members that disagree: random heads, not the zero init
        for m in members:
            m.head.weight.normal_(0, 0.5)
    w, T = [0.5, 0.3, 0.2], 1.7
    teacher = q0.EnsembleTeacher([q0.SnapshotTeacher(m) for m in members], w)
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        f = teacher.features(idx)                                          # (B, T, K, D)
        assert f.shape == (2, 12, 3, 32)
        got = teacher.log_probs(f.flatten(0, 1)[5:17], T)                  # a chunk of 12 tokens
        probs = sum(wi * torch.softmax(m(idx).double() / T, -1) for wi, m in zip(w, members))
    want = probs.log().flatten(0, 1)[5:17]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)
    assert teacher.forward_passes == 3


def test_the_loss_with_one_member_is_chain_distillation():
    """An ensemble of one member at weight 1 is the snapshot teacher: the same loss, to float rounding."""
    student, member = q0.GPT(tiny_cfg(0)), q0.GPT(tiny_cfg(1)).eval().requires_grad_(False)
    idx = torch.randint(0, 50, (2, 13))
    x, mtp = student(idx[:, :-1], idx[:, 1:], hidden=True)
    losses = []
    for teacher in (q0.SnapshotTeacher(member), q0.EnsembleTeacher([q0.SnapshotTeacher(member)], [1.0])):
        with torch.no_grad():
            tx = teacher.features(idx[:, :-1])
        losses.append(q0.chunked_distillation_loss(student, x, idx[:, 1:], teacher, tx, 0.5, 1.3, chunk=5).item())  # noqa: E501
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


@pytest.fixture(scope="module")
def population(small_data, tmp_path_factory):
    """A tiny population of 4 snapshots and its prior."""
    runs = tmp_path_factory.mktemp("distil")
    run_train(small_data, runs, "--cycles", "4", "--run-name", "pop")
    r = subprocess.run([sys.executable, str(REPO / "fit_prior.py"), str(runs / "pop")], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return runs


def test_a_student_is_an_ordinary_run_eval_scores_beside_the_ensemble(small_data, population):
    prior = population / "pop" / "prior.json"
    k = max(b["K"] for b in json.loads(prior.read_text())["budgets"])
    # micro-batches of 4 sequences: those each process of the two-process student below runs
    r = run_train(small_data, population, "--distil-from", str(prior), "--distil-k", str(k), "--epochs", "1",
                  "--device-batch", "4", "--run-name", "student")
    assert f"teacher: {prior}, budget K={k}" in r.stdout
    run = json.loads((population / "student" / "run.json").read_text())
    assert run["layout"]["bases"] == 1 and run["population_config"]["snapshot_noise"] == [0.0, 0.0]
    teacher = run["population_config"]["distil_teacher"]
    assert teacher and all(t["weight"] > 0 for t in teacher)
    # the members as the run resolved them: budget K (0: the prior's largest) and its members of nonzero weight
    args = q0.parse_args([*TINY, "--data-dir", str(small_data), "--distil-from", str(prior)])
    data = q0_run.load_data(args)
    for asked in (0, k):
        got_k, members = q0_run.distil_members(prior, asked, data, args.seq_len)
        assert got_k == k and q0_run.teacher_record(members) == teacher
    assert args.distil_k == 0  # resolved beside the flags, never written into them
    r = subprocess.run([sys.executable, str(REPO / "eval.py"), str(population / "pop"), str(population / "student"),
                        "--prior", str(prior), "--out", str(population / "eval.json")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    res = json.loads((population / "eval.json").read_text())
    assert res["population"] == 4  # the student joins no ensemble
    (st,) = res["students"]
    assert st["forward_passes"] == 1 and st["teacher"]["K"] == k and st["teacher"]["forward_passes"] == len(teacher)
    assert np.isfinite(st["loss"]) and st["loss"] < 5.0
    assert res["uniform"]["forward_passes"] == 4
    assert "| student student (" in (population / "eval.md").read_text()
    # rerun: the same run resumes (complete); a changed teacher budget is another population
    assert "already complete" in run_train(small_data, population, "--distil-from", str(prior), "--distil-k", str(k),
                                           "--epochs", "1", "--run-name", "student").stdout


@pytest.mark.slow  # twin: tests/test_gpu_path.py's spread ensemble on 2 cuda:gloo ranks
def test_two_processes_spread_the_members_and_train_the_same_student(small_data, population):
    """Under torchrun the members' bodies are spread over the group (member i on rank i mod 2, every
    head on both): the student's snapshots score as those of the one-process student that runs the
    same micro-batches (--device-batch 4), to reduction order. (Against one micro-batch of 8 the gap
    is the model's rounding amplified: 4e-6 with the record's model, 6e-5 to 1e-4 with variants.)"""
    prior = population / "pop" / "prior.json"
    k = max(b["K"] for b in json.loads(prior.read_text())["budgets"])
    flags = ("--distil-from", str(prior), "--distil-k", str(k), "--epochs", "1")
    run_train(small_data, population, *flags, "--device-batch", "4", "--run-name", "student")  # the test above's
    r = run_train(small_data, population, *flags, "--run-name", "two", launcher=TORCHRUN_2,
                  env={"OMP_NUM_THREADS": "1"})
    assert "--device-batch 4 " in r.stdout  # the device batch the layout chose for two processes
    assert f"{k} ensemble members at most, {-(-k // 2)} held by each process" in r.stdout
    one, two = ({rec["id"]: rec for rec in json.loads((population / name / "manifest.json").read_text())["snapshots"]}
                for name in ("student", "two"))
    assert one.keys() == two.keys()
    for sid in one:
        assert two[sid]["val_loss"] == pytest.approx(one[sid]["val_loss"], abs=5e-5)  # equal measured


def refused(small_data, runs, *flags) -> str:
    r = run_train(small_data, runs, *flags, check=False)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_bad_teachers_are_refused_in_one_line(small_data, population, tmp_path):
    prior_path = population / "pop" / "prior.json"
    prior = json.loads(prior_path.read_text())
    budgets = sorted(b["K"] for b in prior["budgets"])
    msg = refused(small_data, tmp_path, "--distil-from", str(prior_path), "--distil-k", str(budgets[-1] + 5))
    assert "larger than the prior" in msg and str(budgets) in msg
    # another fitness set: the student's data carved differently
    msg = refused(small_data, tmp_path, "--distil-from", str(prior_path), "--fitness-tokens", "5000")
    assert "another fitness set" in msg
    # another tokenizer
    other = tmp_path / "other.json"
    other.write_text(q0_run.sealed_json(prior | {"tokenizer": "gpt2"}))  # a whole prior, of other tokens
    assert "prior of gpt2 tokens" in refused(small_data, tmp_path, "--distil-from", str(other))
    # a member retrained since the prior was fitted (its record's SHA-256 no longer the prior's)
    copy = tmp_path / "pop"
    shutil.copytree(population / "pop", copy)
    top = prior["budgets"][-1]["members"][0]["id"]
    rec_path = copy / "snapshots" / f"{top}.json"
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(q0_run.sealed_json(rec | {"weights_sha256": "0" * 64}))  # a whole record, retrained
    assert "changed since" in refused(small_data, tmp_path, "--distil-from", str(copy / "prior.json"))
    # not a prior at all, and no file
    assert "not a q0 prior" in refused(small_data, tmp_path, "--distil-from", str(copy / "run.json"))
    assert "no such prior" in refused(small_data, tmp_path, "--distil-from", str(tmp_path / "nope.json"))
    assert not (tmp_path / "tiny-distil-1x3-seed0").exists()  # nothing was created by a refused run
