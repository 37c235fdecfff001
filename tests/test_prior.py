"""fit_prior.py: the solver against independent optima, budgets, prior.json, and bad inputs.

Run directories here are synthetic but follow INTERFACES.md's layout exactly (run.json,
snapshots/bBcC.json records, fp16 .fitness.npy/.val.npy caches); test_eval.py reuses make_run.
"""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import fit_prior  # noqa: E402
import q0_run  # noqa: E402
from conftest import BYTES_TABLE, run_command  # noqa: E402
from data.shards import tokens_sha256, write_shard  # noqa: E402


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def synthetic(m: int, t: int, seed: int) -> np.ndarray:
    """(m, t) fp16 probabilities with shared token difficulty and per-member noise."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(-1.5, 2.0, t)[None] + rng.normal(0, 0.3, (m, 1)) + rng.normal(0, 1.0, (m, t))
    return np.maximum(1 / (1 + np.exp(-logit)), 2.0 ** -24).astype(np.float16)


def val_tokens(targets: int) -> np.ndarray:
    """Bytes-tokenizer validation tokens for a synthetic run: a document starts every 97 tokens."""
    tokens = np.random.default_rng(targets).integers(1, 256, targets + 1).astype(np.uint16)
    tokens[::97] = 0
    return tokens


def make_run(root: Path, name: str, fit: np.ndarray, val: np.ndarray | None, bases: int = 1,
             fitness_sha: str = "f" * 64, tokenizer: str = "bytes", text_bytes: int | None = 5000,
             cycle_epochs: float = 2.0) -> Path:
    """A run directory as train_q0 writes it; snapshot i is base i % bases, cycle i // bases."""
    d = root / name
    (d / "snapshots").mkdir(parents=True)
    tv = val.shape[1] if val is not None else 10
    tokens = val_tokens(tv)
    write_shard(d / "val.q0t", tokens, vocab_size=256, bos_id=0, tokenizer="bytes", token_bytes=BYTES_TABLE,
                command="python -m pytest tests  # make_run of tests/test_prior.py")
    (d / "run.json").write_text(json.dumps({
        "format": "q0-run", "version": 2, "tokenizer": tokenizer, "vocab_size": 256, "bos_id": 0, "seq_len": 32,
        "fitness": {"tokens": fit.shape[1] + 1, "targets": fit.shape[1], "sha256": fitness_sha},
        "val": {"path": str(d / "val.q0t"), "tokens": tv + 1, "targets": tv, "text_bytes": text_bytes,
                "sha256": tokens_sha256(tokens)}}))
    for i in range(len(fit)):
        b, c = i % bases, i // bases
        sid = f"b{b}c{c}"
        snap = d / "snapshots"
        (snap / f"{sid}.pt").write_bytes(f"weights of {name} {sid}".encode())
        np.save(snap / f"{sid}.fitness.npy", fit[i])
        rec = {"id": sid, "base": b, "cycle": c, "step": 10 * (c + 1), "base_epochs": cycle_epochs * (c + 1),
               "val_loss": None, "val_bpb": None, "fitness_loss": float(-np.log(fit[i].astype(np.float64)).mean()),
               "weights": f"snapshots/{sid}.pt", "weights_sha256": sha(snap / f"{sid}.pt"),
               "fitness_probs": f"snapshots/{sid}.fitness.npy",
               "fitness_probs_sha256": sha(snap / f"{sid}.fitness.npy"), "val_probs": None, "val_probs_sha256": None}
        if val is not None:
            np.save(snap / f"{sid}.val.npy", val[i])
            rec |= {"val_probs": f"snapshots/{sid}.val.npy", "val_probs_sha256": sha(snap / f"{sid}.val.npy")}
        (snap / f"{sid}.json").write_text(json.dumps(rec))
    return d


def cli(script: str, *args, cwd=REPO):
    return run_command(script, *args, cwd=cwd)


def assert_clean_error(r, *words):
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()
    assert len(last) == 1 and last[0].startswith("error: "), r.stderr  # one line, no traceback
    for w in words:
        assert w in last[0], last[0]


def loss(P: np.ndarray, w: np.ndarray) -> float:
    return float(-np.log(w @ P.astype(np.float64)).mean())


# ---------------------------------------------------------------------------------------------
# The solver
# ---------------------------------------------------------------------------------------------

def test_newton_matches_simplex_grid_search():
    P = synthetic(3, 400, seed=1).astype(np.float64)
    # Brute force: a 1/500 grid over the simplex, then a 1e-5 grid around its best point.
    step = 1 / 500
    a, b = np.meshgrid(np.arange(0, 1 + step / 2, step), np.arange(0, 1 + step / 2, step), indexing="ij")
    ok = a + b <= 1 + 1e-12
    W = np.stack([a[ok], b[ok], np.clip(1 - a[ok] - b[ok], 0, None)], 1)
    best = W[np.argmin(-np.log(W @ P).mean(1))]
    da, db = np.meshgrid(np.linspace(-2 * step, 2 * step, 401), np.linspace(-2 * step, 2 * step, 401), indexing="ij")
    W = np.stack([best[0] + da.ravel(), best[1] + db.ravel(), best[2] - da.ravel() - db.ravel()], 1)
    W = W[(W >= 0).all(1)]
    grid = float((-np.log(W @ P).mean(1)).min())
    res = fit_prior.fit(torch.from_numpy(P.astype(np.float32)))
    assert res.gap <= fit_prior.TOL
    assert res.loss <= grid + 1e-9               # never worse than any point of the grid
    assert res.loss >= grid - 1e-6                # and the grid, at 1e-5 spacing, comes within 1e-6
    assert abs(res.w.sum() - 1) < 1e-12 and (res.w >= 0).all()


def projected_gradient(P: np.ndarray, steps: int = 30000) -> float:
    """Independent reference: projected gradient with a fixed step on the simplex."""
    def project(v):  # Euclidean projection onto the simplex (Duchi et al. 2008)
        u = np.sort(v)[::-1]
        css = np.cumsum(u) - 1
        k = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
        return np.maximum(v - css[k] / (k + 1), 0)
    w = np.full(len(P), 1 / len(P))
    lr = 0.5 * P.mean() ** 2  # gradients scale like 1/mix; small and steady wins
    for _ in range(steps):
        w = project(w + lr * (P / (w @ P)).mean(1))
    return loss(P, w)


@pytest.mark.parametrize("seed", [2, 3])
def test_newton_matches_projected_gradient_and_em(seed):
    P = synthetic(12, 2000, seed).astype(np.float64)
    P32 = torch.from_numpy(P.astype(np.float32))
    newton, em = fit_prior.fit(P32), fit_prior.fit(P32, "em")
    ref = projected_gradient(P)
    assert newton.gap <= fit_prior.TOL and em.gap <= fit_prior.TOL
    assert newton.loss <= ref + 1e-9 and newton.loss >= ref - 1e-6
    assert abs(newton.loss - em.loss) <= 1e-6
    # The certificate is a true bound: loss minus the best loss any solver found.
    assert newton.loss - min(ref, em.loss) <= newton.gap + 1e-12


def test_adamw_is_close_but_not_certified():
    P = torch.from_numpy(synthetic(8, 2000, seed=4).astype(np.float32))
    a, n = fit_prior.fit(P, "adamw"), fit_prior.fit(P)
    assert a.steps == 300 and n.loss <= a.loss + 1e-9 and a.loss - n.loss < 1e-2


def test_budgets_refitted_never_worse_than_renormalised():
    P = torch.from_numpy(synthetic(20, 3000, seed=5).astype(np.float32))
    full = fit_prior.fit(P)
    for k in q0_run.default_budgets(20):
        b = fit_prior.budget_fit(P, full.w, k)
        assert len(b["idx"]) == k and list(b["idx"]) == list(np.argsort(-full.w, kind="stable")[:k])
        assert abs(b["renormalised"].sum() - 1) < 1e-12
        assert b["fit"].loss <= b["loss_renormalised"] + fit_prior.TOL
    assert abs(fit_prior.budget_fit(P, full.w, 20)["loss_renormalised"] - full.loss) < 1e-9
    assert q0_run.default_budgets(20) == [1, 2, 4, 8, 16, 20]
    assert q0_run.default_budgets(16) == [1, 2, 4, 8, 16]


def test_duplicate_members_do_not_break_newton():
    p = synthetic(4, 1000, seed=6)
    P = torch.from_numpy(np.concatenate([p, p[:2]]).astype(np.float32))  # two exact copies
    res = fit_prior.fit(P)
    assert res.gap <= fit_prior.TOL


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def test_cli_writes_prior_and_never_overwrites(tmp_path):
    fit = synthetic(6, 500, seed=7)
    run = make_run(tmp_path, "a", fit, None, bases=2)
    r = cli("fit_prior.py", run, "--budgets", "1,3,6")
    assert r.returncode == 0, r.stderr
    assert "forward passes" in r.stdout and "certified" in r.stdout
    prior = json.loads((run / "prior.json").read_text())
    assert prior["fitness"]["sha256"] == "f" * 64 and prior["solver"]["name"] == "newton"
    assert [b["K"] for b in prior["budgets"]] == [1, 3, 6]
    w = np.array([m["weight"] for m in prior["members"]])
    assert abs(w.sum() - 1) < 1e-12
    ids = [m["id"] for m in prior["members"]]
    assert ids == ["b0c0", "b1c0", "b0c1", "b1c1", "b0c2", "b1c2"]  # arrival order (cycle, base)
    for b in prior["budgets"]:
        assert len(b["members"]) == len(b["weights_refitted"]) == b["K"]
        assert b["loss_refitted"] <= b["loss_renormalised"] + 1e-6
        assert all(m["run"] == "." and len(m["weights_sha256"]) == 64 for m in b["members"])
    # The weights reproduce the reported loss on the caches.
    P = fit[[int(i[1]) + 2 * int(i[3]) for i in ids]]  # b{b}c{c} -> row b + 2c
    assert abs(loss(P, w) - prior["loss"]) < 1e-9
    before = (run / "prior.json").read_bytes()
    assert_clean_error(cli("fit_prior.py", run), "--out", "exists")
    assert (run / "prior.json").read_bytes() == before
    r = cli("fit_prior.py", run, "--out", tmp_path / "p2.json", "--solver", "adamw")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "p2.json").read_text())["members"][0]["run"] == "a"


def test_cli_population_spans_two_runs(tmp_path):
    a = make_run(tmp_path, "a", synthetic(3, 400, seed=8), None)
    b = make_run(tmp_path, "b", synthetic(2, 400, seed=9), None)
    r = cli("fit_prior.py", a, b, "--out", tmp_path / "p.json")
    assert r.returncode == 0, r.stderr
    prior = json.loads((tmp_path / "p.json").read_text())
    assert [(m["run"], m["id"]) for m in prior["members"]] == \
        [("a", "b0c0"), ("b", "b0c0"), ("a", "b0c1"), ("b", "b0c1"), ("a", "b0c2")]


def test_cli_bad_inputs(tmp_path):
    fit = synthetic(3, 400, seed=10)
    a = make_run(tmp_path, "a", fit, None)
    assert_clean_error(cli("fit_prior.py", tmp_path / "missing"), "missing", "run.json")
    other = make_run(tmp_path, "b", fit, None, fitness_sha="e" * 64)
    assert_clean_error(cli("fit_prior.py", a, other, "--out", tmp_path / "x.json"), "fitness")
    other = make_run(tmp_path, "c", fit, None, tokenizer="gpt2")
    assert_clean_error(cli("fit_prior.py", a, other, "--out", tmp_path / "x.json"), "tokenizer")
    assert_clean_error(cli("fit_prior.py", a, "--budgets", "4"), "--budgets")
    np.save(a / "snapshots" / "b0c1.fitness.npy", fit[0])  # a cache rewritten after its record
    assert_clean_error(cli("fit_prior.py", a), "b0c1.fitness.npy", "SHA-256")
    (a / "snapshots" / "b0c1.fitness.npy").unlink()
    assert_clean_error(cli("fit_prior.py", a), "missing")
    assert not (a / "prior.json").exists() and not (tmp_path / "x.json").exists()


def test_cli_refuses_a_snapshot_record_without_its_files(tmp_path):
    """A record (the completion marker) whose weights are gone is never trusted: a crash while the
    trainer removed an unfinished snapshot could once leave one, and a prior was fitted on it."""
    run = make_run(tmp_path, "a", synthetic(3, 50, seed=1), None)
    (run / "snapshots" / "b0c1.pt").unlink()
    assert_clean_error(cli("fit_prior.py", run), "b0c1", "is missing snapshots/b0c1.pt",
                       "rerun the run's training command")
    assert not (run / "prior.json").exists()


def test_cli_a_second_writer_of_the_same_prior_is_refused(tmp_path):
    run = make_run(tmp_path, "a", synthetic(3, 50, seed=1), None)
    with q0_run.claim_output(run / "prior.json"):  # another fit_prior.py, writing it now
        assert_clean_error(cli("fit_prior.py", run), "prior.json is being written by another process")
    assert cli("fit_prior.py", run).returncode == 0  # that writer ended: its claim went with it
    assert (run / "prior.json").is_file() and not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary


def test_main_returns_its_exit_code_and_releases_its_claim(tmp_path, capsys):
    """In one process, as the tests and a notebook run it: 2 and one `error:` line for bad input, 0
    for a prior written; a refused command leaves no temporary, and its claim ends with it."""
    run = make_run(tmp_path, "a", synthetic(3, 50, seed=1), None)
    assert fit_prior.main([str(run), "--budgets", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --budgets 9: each K must be between 1 and"), err
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert fit_prior.main([str(run)]) == 0 and (run / "prior.json").is_file()
    assert fit_prior.main([str(run)]) == 2 and "prior.json exists" in capsys.readouterr().err


def test_fit_prior_never_imports_the_trainer():
    """fit_prior.py stands on q0_run.py and data/shards.py alone: the experiment is not its floor."""
    r = subprocess.run([sys.executable, "-c", "import sys, fit_prior; sys.exit('train_q0' in sys.modules)"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cli_notes_a_run_still_training(tmp_path):
    run = make_run(tmp_path, "a", synthetic(2, 50, seed=1), None)
    meta = json.loads((run / "run.json").read_text())
    meta["layout"] = {"bases": 1, "cycles": [{}, {}, {}]}
    (run / "run.json").write_text(json.dumps(meta))
    r = cli("fit_prior.py", run)
    assert r.returncode == 0 and f"note: {run} has 2 of its 3 snapshots (still training?)" in r.stdout


# A live trainer's lock (q0_run.RunLock): slot 0 held, its pid written there, as the first rank keeps it.
HOLD_LOCK = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644); "
             "fcntl.lockf(fd, fcntl.LOCK_EX, 16, 0); os.pwrite(fd, f'{os.getpid():>15}\\n'.encode(), 0); "
             "print('held', flush=True); time.sleep(60)")


def test_cli_notes_a_run_whose_trainer_is_alive(tmp_path):
    """A run still training (its lock held by a live trainer) was fitted without a word when its
    snapshots so far matched no plan (here: no layout recorded)."""
    run = make_run(tmp_path, "a", synthetic(2, 50, seed=1), None)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cli("fit_prior.py", run)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 0 and f"note: {run} is still training (pid {holder.pid}; 2 of its 2 snapshots so far)" \
        in r.stdout, r.stdout
    assert cli("fit_prior.py", run, "--out", tmp_path / "p2.json").stdout.count("note:") == 0  # it ended


def test_cli_a_rerun_after_a_stop_between_the_prior_and_its_temporary_is_done(tmp_path):
    """Stopped after linking prior.json into place, before removing its temporary name: the prior is
    complete, and the rerun (it exited 2: "exists") says so, removes the leftover and exits 0."""
    import os
    run = make_run(tmp_path, "a", synthetic(3, 50, seed=1), None)
    assert cli("fit_prior.py", run).returncode == 0
    prior, before = run / "prior.json", (run / "prior.json").read_bytes()
    os.link(prior, run / ".prior.json.tmp")  # what the stop leaves: both names, one file
    r = cli("fit_prior.py", run)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == f"note: {prior} is already complete: this command wrote it before it was stopped; " \
                               f"nothing left to do (move it away to compute it again)"
    assert prior.read_bytes() == before and not (run / ".prior.json.tmp").exists()
    assert_clean_error(cli("fit_prior.py", run), "prior.json exists")  # a finished prior is never overwritten
