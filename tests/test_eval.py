"""eval.py on synthetic run directories (cached path) and on a tiny real run from train_q0
(cached vs forward passes, one process vs two)."""
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
from conftest import run_train  # noqa: E402
from test_prior import assert_clean_error, cli, make_run, synthetic, val_tokens  # noqa: E402

sys.path.insert(0, str(REPO))
import eval as eval_py  # noqa: E402


def nll_sum(P, w):
    return float(-np.log(w @ P.astype(np.float64)).sum())


@pytest.fixture
def population(tmp_path):
    fit, val = synthetic(6, 800, seed=11), synthetic(6, 600, seed=12)
    run = make_run(tmp_path, "a", fit, val, bases=2, text_bytes=1234)
    assert cli("fit_prior.py", run, "--budgets", "1,2,6").returncode == 0
    return run, fit, val


def test_cached_eval_numbers(population):
    run, fit, val = population
    r = cli("eval.py", run, "--prior", run / "prior.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "eval.json").read_text())
    assert (run / "eval.md").read_text().startswith("# q0 evaluation")
    order = [0, 1, 2, 3, 4, 5]  # make_run: row i is base i % 2, cycle i // 2 = arrival order
    for i, m in zip(order, res["members"]):
        assert m["forward_passes"] == 1
        assert abs(m["loss"] - nll_sum(val[i:i + 1], np.ones(1)) / 600) < 1e-9
        keep = val_tokens(600)[1:] != 0                  # BOS targets carry no bytes and no nats
        assert abs(m["bpb"] - nll_sum(val[i:i + 1, keep], np.ones(1)) / (np.log(2) * 1234)) < 1e-9
    assert res["uniform"]["forward_passes"] == 6
    assert abs(res["uniform"]["loss"] - nll_sum(val, np.full(6, 1 / 6)) / 600) < 1e-9
    prior = json.loads((run / "prior.json").read_text())
    ids = [f"b{i % 2}c{i // 2}" for i in range(6)]
    for b, pb in zip(res["prior"]["budgets"], prior["budgets"]):
        assert b["K"] == pb["K"]
        for kind in ("renormalised", "refitted"):   # members with weight: what a user runs
            assert b[kind]["forward_passes"] == sum(w > 0 for w in pb[f"weights_{kind}"]) <= b["K"]
        for kind in ("renormalised", "refitted"):
            w = np.zeros(6)
            w[[ids.index(m["id"]) for m in pb["members"]]] = pb[f"weights_{kind}"]
            assert abs(b[kind]["loss"] - nll_sum(val, w) / 600) < 1e-9
    curve = res["curve"]
    assert [c["n"] for c in curve] == [1, 2, 3, 4, 5, 6]
    assert [c["epochs"] for c in curve] == [2, 4, 6, 8, 10, 12]  # per base: its latest base_epochs
    assert [c["uniform"]["forward_passes"] for c in curve] == [1, 2, 3, 4, 5, 6]
    assert all(1 <= c["prior"]["forward_passes"] <= c["n"] for c in curve)
    assert abs(curve[-1]["uniform"]["loss"] - res["uniform"]["loss"]) < 1e-12
    assert abs(curve[-1]["prior"]["fitness_loss"] - prior["loss"]) < 1e-6
    assert abs(curve[0]["prior"]["loss"] - res["members"][0]["loss"]) < 1e-12


def test_eval_bpb_na_and_no_prior(tmp_path):
    run = make_run(tmp_path, "a", synthetic(3, 300, 13), synthetic(3, 200, 14), text_bytes=None)
    r = cli("eval.py", run, "--curve-points", "2")
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "eval.json").read_text())
    assert res["uniform"]["bpb"] is None and "n/a" in r.stdout and "prior" not in res
    assert [c["n"] for c in res["curve"]] == [1, 3]


def test_eval_bad_inputs(population, tmp_path):
    run, fit, val = population
    out = tmp_path / "e.json"
    assert_clean_error(cli("eval.py", tmp_path / "nope"), "run.json")
    assert_clean_error(cli("eval.py", run, "--prior", tmp_path / "none.json", "--out", out), "no such prior")
    assert_clean_error(cli("eval.py", run, "--prior", run / "prior.json", "--budgets", "3", "--out", out), "budgets")
    snaps = run / "snapshots"
    rec = json.loads((snaps / "b1c1.json").read_text())
    (snaps / "b1c1.json").write_text(json.dumps(rec | {"weights_sha256": "0" * 64}))  # retrained
    assert_clean_error(cli("eval.py", run, "--prior", run / "prior.json", "--out", out), "b1c1", "SHA-256")
    (snaps / "b1c1.json").write_text(json.dumps(rec))
    np.save(snaps / "b0c0.val.npy", val[1])  # a cache changed behind its record
    assert_clean_error(cli("eval.py", run, "--out", out), "b0c0.val.npy", "SHA-256")
    np.save(snaps / "b0c0.val.npy", val[0])
    shutil.move(snaps / "b1c1.json", tmp_path / "gone.json")  # a snapshot deleted after the fit
    assert_clean_error(cli("eval.py", run, "--prior", run / "prior.json", "--out", out), "b1c1", "gone")
    assert not out.exists()
    assert cli("eval.py", run, "--out", out).returncode == 0
    assert_clean_error(cli("eval.py", run, "--out", out), "exists", "--out")


def test_a_prior_over_two_runs_needs_both(tmp_path):
    """A prior fitted on two runs names the run that was left off the command line (its snapshots
    are on disk), rather than calling them gone."""
    a = make_run(tmp_path, "a", synthetic(2, 300, 15), synthetic(2, 200, 16))
    b = make_run(tmp_path, "b", synthetic(2, 300, 17), synthetic(2, 200, 18))
    assert cli("fit_prior.py", a, b, "--out", tmp_path / "p.json").returncode == 0
    assert_clean_error(cli("eval.py", a, "--prior", tmp_path / "p.json"), f"of {b}, whose run was not given")
    assert cli("eval.py", a, b, "--prior", tmp_path / "p.json").returncode == 0


def test_the_cached_path_never_imports_the_trainer(population, tmp_path):
    """Only --forward runs the model: the cached path stands on q0_run.py, and main returns 0."""
    run, _, _ = population
    code = (f"import sys, eval; code = eval.main([{str(run)!r}, '--out', {str(tmp_path / 'e.json')!r}]); "
            f"sys.exit(code or 'train_q0' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "e.json").is_file(), r.stderr


# ---------------------------------------------------------------------------------------------
# A tiny real run: the cached path against forward passes, and two processes against one
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_run(tmp_path_factory, small_data):
    runs = tmp_path_factory.mktemp("runs")
    run_train(small_data, runs, "--run-name", "t", "--bases", "2", "--cycles", "2")
    run = runs / "t"
    assert cli("fit_prior.py", run).returncode == 0
    return run


def numbers(res):
    """Every loss and bpb in an eval.json, by a stable name."""
    out = {f"member {m['id']}": m for m in res["members"]} | {"uniform": res["uniform"]}
    out |= {f"K={b['K']} {k}": b[k] for b in res["prior"]["budgets"] for k in ("renormalised", "refitted")}
    out |= {f"curve {c['n']} {k}": c[k] for c in res["curve"] for k in ("uniform", "prior")}
    return {f"{name} {q}": v[q] for name, v in out.items() for q in ("loss", "bpb")}


def test_cached_agrees_with_forward_passes(real_run, tmp_path):
    args = [real_run, "--prior", real_run / "prior.json"]
    for extra, name in (([], "c.json"), (["--forward"], "f.json")):
        r = cli("eval.py", *args, *extra, "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
    cached, forward = (numbers(json.loads((tmp_path / n).read_text())) for n in ("c.json", "f.json"))
    assert cached.keys() == forward.keys() and len(cached) == 2 * (4 + 1 + 3 * 2 + 4 * 2)  # 4 snapshots, budgets 1,2,4
    diff = {k: abs(cached[k] - forward[k]) for k in cached}
    assert max(diff.values()) <= 1e-3, diff  # fp16 rounding of the caches (eval.CACHE_TOLERANCE)
    # Each snapshot's forward loss is the one train_q0 logged when it saved the snapshot.
    for rec in (json.loads(p.read_text()) for p in (real_run / "snapshots").glob("b*c*.json")):
        assert abs(forward[f"member {rec['id']} loss"] - rec["val_loss"]) <= 1e-3


def test_two_processes_equal_one(real_run, tmp_path):
    args = [real_run, "--prior", real_run / "prior.json", "--forward"]
    r = cli("eval.py", *args, "--out", tmp_path / "one.json")
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "eval.py"), *map(str, args), "--out", str(tmp_path / "two.json")],
                       cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / n).read_text()) for n in ("one.json", "two.json"))
    assert two["processes"] == 2
    a, b = numbers(one), numbers(two)
    # Same members, same windows; only the order of float64 additions (and fp32 kernels picked
    # for another thread count) differ.
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-6


def test_an_interrupted_eval_is_completed_by_the_rerun(population):
    """eval.md is committed first, eval.json (the completion marker) last: killed in between (it was
    the other way round), the rerun writes both; a finished eval is never overwritten."""
    run, _, _ = population
    args = [sys.executable, str(REPO / "eval.py"), str(run), "--prior", str(run / "prior.json")]
    for n in (1, 2):  # before the .md is committed; after it, before the .json
        r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "Q0_FAULT": f"kill:{n}"})
        assert r.returncode == -9, r.stderr
    assert (run / "eval.md").exists() and not (run / "eval.json").exists()
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "eval.json").read_text())["uniform"]["forward_passes"] == 6
    assert (run / "eval.md").read_text().startswith("# q0 evaluation")
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert_clean_error(subprocess.run(args, cwd=REPO, capture_output=True, text=True), "eval.json exists")


def test_a_prior_knows_its_population(tmp_path):
    """A prior fitted while the run trained (4 of 6 snapshots) is used with a note naming the two it
    never saw; a prior member that changed, even one outside every budget, refuses the prior."""
    fit, val = synthetic(6, 400, seed=5), synthetic(6, 300, seed=6)
    run = make_run(tmp_path, "a", fit[:4], val[:4], bases=2)
    assert cli("fit_prior.py", run, "--budgets", "1").returncode == 0
    later = make_run(tmp_path / "later", "a", fit, val, bases=2)  # the run went on: b0c2, b1c2 arrived
    for p in (later / "snapshots").glob("b?c2.*"):
        shutil.copy(p, run / "snapshots" / p.name)
    r = cli("eval.py", run, "--prior", run / "prior.json")
    assert r.returncode == 0, r.stderr
    assert "fitted on 4 of the 6 snapshots; it gives no weight to" in r.stderr and "a:b1c2" in r.stderr
    res = json.loads((run / "eval.json").read_text())
    assert res["prior"]["snapshots_not_in_prior"] == [f"{run}:b0c2", f"{run}:b1c2"]
    assert "fitted on 4 of the 6 snapshots" in (run / "eval.md").read_text()
    prior = json.loads((run / "prior.json").read_text())
    top = prior["budgets"][0]["members"][0]["id"]
    other = next(m["id"] for m in prior["members"] if m["id"] != top)
    (run / "snapshots" / f"{other}.pt").write_bytes(b"retrained")  # retrained: new weights, new record
    rec = json.loads((run / "snapshots" / f"{other}.json").read_text())
    rec["weights_sha256"] = hashlib.sha256(b"retrained").hexdigest()
    (run / "snapshots" / f"{other}.json").write_text(json.dumps(rec))
    assert_clean_error(cli("eval.py", run, "--prior", run / "prior.json", "--out", tmp_path / "e2.json"),
                       f"snapshot {run}:{other} changed since")


def test_scores_in_token_chunks_equal_the_whole(monkeypatch):
    """The forward path's bounded memory: weightings scored chunk by chunk (here 1,024 tokens of
    5 members) equal the sums over all tokens at once; a member no weighting needs is never read."""
    rng = np.random.default_rng(0)
    P = rng.uniform(0.01, 1, size=(5, 5000)).astype(np.float32)
    P[4] = 0  # not needed: never scored
    W = torch.from_numpy(rng.dirichlet(np.ones(4), size=7))
    W = torch.cat([W, torch.zeros(7, 1, dtype=W.dtype)], 1)
    need = np.array([True] * 4 + [False])
    monkeypatch.setattr(eval_py, "CHUNK_ELEMS", 5 * 1024)
    keep = torch.from_numpy((rng.uniform(size=5000) > 0.1).astype(np.float64))  # targets that carry bytes
    sums, member_sums = eval_py.score_chunks(lambda s, e: P[:, s:e], 5, 5000, W, keep, need)
    whole = torch.from_numpy(P).double()
    np.testing.assert_allclose(sums, eval_py.nll_sums(W @ whole, keep).numpy(), rtol=1e-12)
    np.testing.assert_allclose(member_sums[:4], eval_py.nll_sums(whole[:4], keep).numpy(), rtol=1e-12)
    assert (member_sums[4] == 0).all()


# --- a run still training, a stop after the output, a damaged cache (issue, part 2) -----------------

def test_eval_notes_a_run_still_training(tmp_path):
    """fit_prior.py said so; eval.py scored the first snapshots of a run still training without a word."""
    run = make_run(tmp_path, "a", synthetic(2, 50, seed=1), synthetic(2, 40, seed=2))
    meta = json.loads((run / "run.json").read_text())
    meta["layout"] = {"bases": 1, "cycles": [{}, {}, {}]}
    (run / "run.json").write_text(json.dumps(meta))
    r = cli("eval.py", run)
    assert r.returncode == 0, r.stderr
    assert f"note: {run} has 2 of its 3 snapshots (still training?); this evaluation covers those 2: evaluate again " \
           f"when it finishes" in r.stderr.splitlines()


def test_a_rerun_after_a_stop_between_the_results_and_their_temporary_is_done(population):
    run, _, _ = population
    assert cli("eval.py", run).returncode == 0
    before = (run / "eval.json").read_bytes()
    os.link(run / "eval.json", run / ".eval.json.tmp")  # stopped between os.link and the unlink
    r = cli("eval.py", run)
    assert r.returncode == 0 and r.stderr.startswith(f"note: {run / 'eval.json'} is already complete"), r.stderr
    assert (run / "eval.json").read_bytes() == before and not (run / ".eval.json.tmp").exists()


def test_a_cache_cut_short_is_one_line(population, tmp_path):
    run, _, _ = population
    cache = run / "snapshots" / "b0c1.val.npy"
    cache.write_bytes(cache.read_bytes()[:-10])
    assert_clean_error(cli("eval.py", run, "--out", tmp_path / "e.json"), "b0c1.val.npy",
                       "changed after it was written")
    assert not (tmp_path / "e.json").exists()
