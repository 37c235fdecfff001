"""train_q0.py: the schedule, the losses, the optimiser, the data order, and whole runs on a CPU
(one process, two processes under torchrun with gloo, and a run killed with SIGKILL and resumed)."""
import json
import math
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, TORCHRUN_2, cpu_run, distillation_loss, logged_code, run_train
import q0_run
import train_q0 as q0
from data import shards
from data.shards import UsageError, write_shard


def args_for(**overrides):
    args = q0.parse_args(["--preset", "tiny"])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


# --- schedule --------------------------------------------------------------------------------

def test_lr_and_weight_decay_at_cycle_boundaries():
    """Whatever its shape within a cycle (linear in the record: tests/test_fidelity.py), the LR starts
    a cycle at its peak, falls strictly, and reaches its floor at the snapshot; weight decay is
    anti-correlated with it."""
    floor, wd_floor = 0.08, 0.7
    for steps in (50, 7, 2):
        assert q0.lr_multiplier(0, steps, floor) == 1.0                       # a cycle starts at peak LR
        assert q0.lr_multiplier(steps - 1, steps, floor) == pytest.approx(floor)  # and snapshots at the floor
        mids = [q0.lr_multiplier(i, steps, floor) for i in range(steps)]
        assert all(a > b for a, b in zip(mids, mids[1:]))                     # falls, strictly
        assert all(floor - 1e-12 <= m <= 1.0 for m in mids)
        wds = [q0.wd_multiplier(m, floor, wd_floor) for m in mids]
        assert all(a < b for a, b in zip(wds, wds[1:]))                       # WD rises as the LR falls
    assert q0.lr_multiplier(0, 1, floor) == 1.0                               # a one-step cycle: its peak
    assert q0.wd_multiplier(1.0, floor, wd_floor) == pytest.approx(wd_floor)  # low WD while exploring
    assert q0.wd_multiplier(floor, floor, wd_floor) == pytest.approx(1.0)     # full WD at the snapshot
    # anti-correlated: the public formula at a middle point
    lr = 0.5
    assert q0.wd_multiplier(lr, floor, wd_floor) == pytest.approx(wd_floor + (1 - wd_floor) * (1 - lr) / (1 - floor))


def test_the_stepper_sets_every_groups_lr_and_decay_from_the_schedule(small_data, tmp_path):
    """Each step, every optimiser group runs at its peak LR and peak decay times the schedule's
    multipliers (whatever the groups are)."""
    args = q0.parse_args([*TINY, "--data-dir", str(small_data)])
    stepper = q0.BaseTrainer(cpu_run(args, tmp_path), 0).stepper
    for i in (0, 3, 9):
        stepper.schedule(i, 10)
        lr = q0.lr_multiplier(i, 10, args.lr_floor)
        wd = q0.wd_multiplier(lr, args.lr_floor, args.wd_floor)
        for g in stepper.optimizer.param_groups:
            assert g["lr"] == pytest.approx(g["peak_lr"] * lr) and g["weight_decay"] == pytest.approx(g["peak_wd"] * wd)


def test_plan_cycles_layout_and_batch_schedule():
    """Every cycle's steps spend its epochs at its batch, and the cycles follow each other in steps
    and stream positions (the record's quarters of batch sizes: tests/test_fidelity.py)."""
    args = args_for(cycles=8, first_cycle_epochs=3.0, cycle_epochs=1.0, batch_seqs=8, batch_schedule=0.75, seq_len=32)
    cycles = q0.plan_cycles(args, train_tokens=8 * 32 * 10)   # 10 full-batch steps per epoch
    assert {c.batch_seqs for c in cycles} == {6, 8}           # the whole batch, or 0.75 of it
    for c in cycles:
        assert c.steps == round(c.epochs * 2560 / (c.batch_seqs * 32))
        assert c.pos(c.steps, 32) == c.first_pos + c.steps * c.batch_seqs * 32
    assert cycles[0].steps == round(3 * 2560 / (6 * 32)) and cycles[0].epochs == 3.0
    assert cycles[2].steps == 10
    assert cycles[0].first_step == cycles[0].first_pos == 0
    for a, b in zip(cycles, cycles[1:]):
        assert b.first_step == a.first_step + a.steps
        assert b.first_pos == a.first_pos + a.steps * a.batch_seqs * 32
    assert {c.batch_seqs for c in q0.plan_cycles(args_for(cycles=8, batch_seqs=8, batch_schedule=1.0), 4096)} == {8}
    with pytest.raises(UsageError, match="shorter than one step"):
        q0.plan_cycles(args_for(cycle_epochs=0.01, cycles=2), train_tokens=4096)


@pytest.mark.parametrize("preset", sorted(q0.RECIPES))
@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 8, 16, 32, 64, 100, 128, 256, 512, 1024])
def test_recipe_spends_the_budget_and_adds_a_base_per_doubling(epochs, preset):
    rule = q0.RECIPES[preset]
    r = q0.recipe(epochs, rule)
    assert r["bases"] * (r["first_cycle_epochs"] + (r["cycles"] - 1) * r["cycle_epochs"]) == pytest.approx(epochs)
    assert r["bases"] == max(1, math.ceil(math.log2(epochs / rule.one_base) - 1e-9) + 1)
    assert r["first_cycle_epochs"] <= rule.first_max
    if r["cycles"] > 1:  # short cycles after the first stretch, at most cycle_max (+ rounding)
        assert r["cycle_epochs"] <= rule.cycle_max * 1.05
        assert r["cycle_epochs"] <= r["first_cycle_epochs"]


def test_recipe_published_guidance_at_slowrun_scale():
    bases = {e: q0.recipe(e, q0.RECIPES["slowrun"])["bases"] for e in (64, 128, 256, 512)}
    assert bases == {64: 1, 128: 1, 256: 2, 512: 3}  # one base up to 128 epochs, one more per doubling


def test_recipe_explicit_flags_win_and_contradictions_are_refused():
    cpu = q0.RECIPES["cpu"]
    assert q0.recipe(64, cpu) == {"bases": 2, "first_cycle_epochs": 8.0, "cycles": 25, "cycle_epochs": 1.0}
    assert q0.recipe(64, cpu, {"bases": 1}) == {"bases": 1, "first_cycle_epochs": 8.0, "cycles": 57,
                                                "cycle_epochs": 1.0}
    assert q0.recipe(64, cpu, {"cycles": 5})["cycle_epochs"] == pytest.approx(6.0)  # 2 bases of 8 + 4 x 6
    assert q0.recipe(64, cpu, {"cycles": 5, "cycle_epochs": 4.0})["first_cycle_epochs"] == pytest.approx(16.0)
    with pytest.raises(UsageError, match="--epochs -3: expected a finite number >= 0"):
        q0.parse_args(["--preset", "cpu", "--epochs", "-3"])
    with pytest.raises(UsageError, match="spends 38 epochs"):
        q0.recipe(64, cpu, {"cycles": 5, "cycle_epochs": 4.0, "first_cycle_epochs": 3.0})
    args = q0.parse_args(["--preset", "cpu", "--epochs", "16", "--cycle-epochs", "4"])
    assert (args.bases, args.first_cycle_epochs, args.cycles, args.cycle_epochs) == (1, 8.0, 3, 4.0)
    args = q0.parse_args(["--preset", "tiny", "--cycles", "7"])  # no --epochs: the preset's layout, untouched
    assert (args.cycles, args.first_cycle_epochs, args.cycle_epochs) == (7, 1.0, 1.0)


def test_the_old_distill_spellings_parse_to_the_same_values():
    """--distill-from-cycle, --distill-alpha and --distill-temperature (before the --distil-* renaming)
    still parse, to the same destinations and values as the new spellings."""
    new = q0.parse_args(["--preset", "tiny", "--distil-from-cycle", "3", "--distil-alpha", "0.6",
                         "--distil-temperature", "1.5"])
    old = q0.parse_args(["--preset", "tiny", "--distill-from-cycle", "3", "--distill-alpha", "0.6",
                         "--distill-temperature", "1.5"])
    assert vars(old) == vars(new)
    assert (new.distil_from_cycle, new.distil_alpha, new.distil_temperature) == (3, 0.6, 1.5)
    assert not any(k.startswith("distill") for k in vars(new))
    with pytest.raises(UsageError, match="--distil-temperature 0: expected a finite number > 0"):
        q0.parse_args(["--preset", "tiny", "--distill-temperature", "0"])  # checked as the new flag


def test_noise_scale_decays_from_start_to_end():
    assert q0.noise_scale(1, 10, 0.25, 0.05) == pytest.approx(0.25)
    assert q0.noise_scale(9, 10, 0.25, 0.05) == pytest.approx(0.05)  # the last noise: after snapshot 9 of 10
    values = [q0.noise_scale(c, 10, 0.25, 0.05) for c in range(1, 10)]
    assert all(a > b for a, b in zip(values, values[1:]))


# --- losses and optimiser ----------------------------------------------------------------------

def test_distillation_loss_matches_its_formula():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    a, T = 0.45, 1.2
    ce = -torch.log_softmax(student, -1).gather(-1, y[..., None]).mean()
    p_t = torch.softmax(teacher / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / T, -1))).sum(-1).mean()
    expected = (1 - a) * ce + a * T ** 2 * kl
    assert distillation_loss(student, y, teacher, a, T).item() == pytest.approx(expected.item(), rel=1e-6)
    assert distillation_loss(student, y).item() == pytest.approx(ce.item(), rel=1e-6)
    assert distillation_loss(student, y, student, a, T).item() == pytest.approx((1 - a) * ce.item(), rel=1e-5)


@pytest.mark.parametrize("shape", [(32, 64), (96, 24), (48, 48)])
def test_polar_express_orthogonalises(shape):
    torch.manual_seed(1)
    U, _, Vh = torch.linalg.svd(torch.randn(*shape), full_matrices=False)
    G = U @ torch.diag(torch.logspace(-2, 0, min(shape))) @ Vh * 7.0  # condition number 100
    X = q0.polar_express(G).float()  # bf16, as the record computes it
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.7 and s.max() < 1.2     # all singular values pushed towards 1
    cos = (X * (U @ Vh)).sum() / (X.norm() * (U @ Vh).norm())
    assert cos > 0.98                            # and the direction is the polar factor's


# Flags that change which parameters the optimiser groups hold: the invariants below hold for each
# (a new flag of that kind belongs here).
OPTIMIZER_VARIANTS = [[], ["--no-iha"], ["--mtp-weight", "0"], ["--no-decay-embeddings"]]


@pytest.mark.parametrize("flags", OPTIMIZER_VARIANTS, ids=lambda f: " ".join(f) or "defaults")
def test_optimizer_groups_and_weight_decay(flags):
    """Every parameter in exactly one group, of a kind the optimiser knows, Muon's groups matrices of
    one shape, every group starting at its peaks (which groups the record has: tests/test_fidelity.py)."""
    args = q0.parse_args(["--preset", "tiny", "--no-cautious-wd", *flags])
    model = q0.GPT(q0.model_config(args, 256))
    opt = q0.build_optimizer(model, args)
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    for g in opt.param_groups:
        assert g["kind"] in ("muon", "adamw") and g["params"]
        assert g["peak_lr"] >= 0 and g["peak_wd"] >= 0
        assert (g["lr"], g["weight_decay"]) == (g["peak_lr"], g["peak_wd"])
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert muon and all(p.ndim == 2 for g in muon for p in g["params"])  # Muon orthogonalises matrices
    assert all(len({p.shape for p in g["params"]}) == 1 for g in muon)  # stacked by shape
    for p in model.parameters():                                        # vectors and scalars: AdamW
        if p.ndim < 2:
            assert next(g for g in opt.param_groups if any(q is p for q in g["params"]))["kind"] == "adamw"
    # with a zero gradient (and no cautious mask), a Muon step is pure decoupled weight decay
    p = muon[0]["params"][0]
    before = p.detach().clone()
    for q in model.parameters():
        q.grad = torch.zeros_like(q)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = (0.1, 0.5) if g is muon[0] else (0.0, 0.0)
    opt.step()
    scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
    torch.testing.assert_close(p.detach(), before * (1 - 0.1 * scale * 0.5), atol=1e-3, rtol=1e-2)  # bf16 lr x wd


# --- data ------------------------------------------------------------------------------------

def test_carve_fitness_takes_whole_documents_then_the_head_of_one():
    """Exactly --fitness-tokens: whole documents while they fit, then the head of the next one,
    whose tail neither set gets (unless it is the corpus's last document: then it is the training
    data, BOS first)."""
    tokens = np.array([0, 5, 6, 0, 7, 0, 8, 9, 9, 0, 4], dtype=np.uint16)
    fitness, train = shards.carve_fitness(tokens, 0, 5)           # documents end at 5
    assert fitness.tolist() == [0, 5, 6, 0, 7] and train.tolist() == [0, 8, 9, 9, 0, 4]
    fitness, train = shards.carve_fitness(tokens, 0, 4)           # the second document split: its tail unused
    assert fitness.tolist() == [0, 5, 6, 0] and train.tolist() == [0, 8, 9, 9, 0, 4]
    fitness, train = shards.carve_fitness(tokens, 0, 2)           # the head of the first document
    assert fitness.tolist() == [0, 5] and train.tolist() == [0, 7, 0, 8, 9, 9, 0, 4]
    one = np.array([0, 1, 2, 3, 4, 5, 6], dtype=np.uint16)        # one document: its tail is the training data
    fitness, train = shards.carve_fitness(one, 0, 3)
    assert fitness.tolist() == [0, 1, 2] and train.tolist() == [0, 3, 4, 5, 6]
    for too_many in (10, 11, 20):
        with pytest.raises(UsageError, match="fitness"):
            shards.carve_fitness(tokens, 0, too_many)
    # run format 3 and older, resumed: whole documents, at least --fitness-tokens
    fitness, train = shards.carve_fitness(tokens, 0, 4, whole_documents=True)
    assert fitness.tolist() == [0, 5, 6, 0, 7] and train.tolist() == [0, 8, 9, 9, 0, 4]
    assert shards.carve_fitness(tokens, 0, 1, whole_documents=True)[0].tolist() == [0, 5, 6]


def test_a_run_of_format_3_resumes_on_its_whole_document_fitness_set(tmp_path):
    """Run formats 3 and older carved whole documents: such a run resumes on that carve, unless
    its recorded fitness tokens are the new carve's (documents that ended at --fitness-tokens)."""
    data = types.SimpleNamespace(describe={"fitness": {"sha256": "new"}})
    for version, recorded, older in ((3, "old", True), (3, "new", False), (q0_run.RUN_VERSION, "old", False)):
        run = tmp_path / f"v{version}-{recorded}"
        run.mkdir()
        (run / "run.json").write_text(q0_run.sealed_json({"version": version, "fitness": {"sha256": recorded}}))
        assert q0_run._older_carve(run, data) is older
    assert q0_run._older_carve(tmp_path / "new", data) is False


def test_data_order_is_seeded_per_base_and_epoch_and_independent_of_processes():
    tokens = np.concatenate([[0] + [d] * (d + 1) for d in range(1, 30)]).astype(np.uint16)
    stream = q0.TrainStream(tokens, 0, seed=3, base=1)
    n = len(stream)
    for e in range(3):  # each epoch is a reshuffle of the same documents
        assert sorted(stream.epoch(e).tolist()) == sorted(tokens.tolist())
    assert not np.array_equal(stream.epoch(0), stream.epoch(1))
    assert np.array_equal(stream.window(n - 5, 10), np.concatenate([stream.epoch(0)[-5:], stream.epoch(1)[:5]]))
    again = q0.TrainStream(tokens, 0, seed=3, base=1)
    assert np.array_equal(again.batch(123, 8, 16), stream.batch(123, 8, 16))
    assert not np.array_equal(q0.TrainStream(tokens, 0, seed=3, base=2).epoch(0), stream.epoch(0))
    # the global batch's micro-batches, spread over any number of processes, each run exactly once
    for world in (1, 2, 4, 8):
        taken = sorted(k for r in range(world) for k in q0.micro_batches_of(r, world, 8))
        assert taken == list(range(8))


def test_token_probs_covers_every_target_once(small_data):
    torch.manual_seed(0)
    model = q0.GPT(q0.GPTConfig(vocab_size=256, n_layer=4, d_model=32, n_head=2, mlp_hidden=64, seq_len=16,
                                short_window=8, loop_start=2, loop_end=3, mtp_weight=0.3))
    tokens = shards.read_tokens(small_data / "val.q0t").tokens[:101]
    probs = q0.token_probs(model, tokens, seq_len=16, batch_size=3, device="cpu")
    assert probs.shape == (100,) and (probs > 0).all()
    # the reference: one window at a time
    for start in range(0, 100, 16):
        x = torch.from_numpy(tokens[start:start + 17].astype(np.int64))[None]
        logp = torch.log_softmax(model(x[:, :-1]), -1).gather(-1, x[:, 1:, None]).squeeze()
        np.testing.assert_allclose(probs[start:start + 16], logp.exp().detach().numpy().reshape(-1), rtol=1e-5)


# --- whole runs ------------------------------------------------------------------------------

def snapshot_losses(run_dir):
    return {r["id"]: r["val_loss"] for r in q0_run.list_snapshots(run_dir)}


@pytest.fixture(scope="module")
def two_bases(small_data, tmp_path_factory):
    """2 bases x 3 cycles, distillation from cycle 2, in one process."""
    runs = tmp_path_factory.mktemp("runs")
    result = run_train(small_data, runs, "--bases", "2", "--cycles", "3", "--distil-from-cycle", "2")
    return runs / "tiny-2x3-seed0", result


def test_population_run_writes_everything(two_bases):
    run_dir, result = two_bases
    records = q0_run.list_snapshots(run_dir)
    assert [r["id"] for r in records] == ["b0c1", "b1c1", "b0c2", "b1c2", "b0c3", "b1c3"]
    run = q0_run.load_run(run_dir)
    for r in records:
        for key in ("weights", "fitness_probs", "val_probs"):
            assert shards.sha256_file(run_dir / r[key]) == r[key + "_sha256"]
        fit, val = np.load(run_dir / r["fitness_probs"]), np.load(run_dir / r["val_probs"])
        assert fit.dtype == np.float16 and fit.size == run["fitness"]["targets"]
        assert val.size == run["val"]["targets"] == 2047
        assert q0_run.mean_nll(val) == pytest.approx(r["val_loss"], abs=2e-3)   # the cache is the same numbers
        keep = q0_run.load_val_tokens(run)[1:] != run["bos_id"]  # bits per byte leaves BOS targets out
        bpb = -np.log(val[keep].astype(np.float64)).sum() / (math.log(2) * run["val"]["text_bytes"])
        assert r["val_bpb"] == pytest.approx(bpb, rel=1e-3)  # the fp16 cache's rounding
        model = q0.load_snapshot_model(run_dir, r)                     # weights_only, SHA-checked
        assert isinstance(model, q0.GPT)
    assert records[-1]["base_epochs"] == pytest.approx(3.0, abs=0.05)
    assert "(distill)" in result.stdout and "cycle 1/3" in result.stdout
    assert "population: 6 snapshots" in result.stdout and "uniform ensemble val" in result.stdout
    log = (run_dir / "log.txt").read_text()
    assert '"bases": 2' in log                                          # the arguments
    code = logged_code(run_dir)                                         # and the code, each file under its header
    assert sorted(code) == ["data/shards.py", "q0_run.py", "train_q0.py"]
    for path, text in code.items():                                     # the code this run was trained by
        assert text == (REPO / path).read_text() and run["code"][path] == shards.sha256_file(REPO / path)
    assert "def chunked_distillation_loss" in code["train_q0.py"] and "def log_header" in code["q0_run.py"]
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "snapshot" for e in events) == 6
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert len(manifest["snapshots"]) == 6
    # later cycles learn: every base's last snapshot beats its first
    losses = snapshot_losses(run_dir)
    assert losses["b0c3"] < losses["b0c1"] and losses["b1c3"] < losses["b1c1"]


def test_rerun_of_a_finished_run_changes_nothing_and_changed_flags_are_refused(two_bases, small_data):
    run_dir, _ = two_bases
    before = {p.name: shards.sha256_file(p) for p in (run_dir / "snapshots").iterdir()}
    again = run_train(small_data, run_dir.parent, "--bases", "2", "--cycles", "3", "--distil-from-cycle", "2")
    assert "already complete" in again.stdout
    assert {p.name: shards.sha256_file(p) for p in (run_dir / "snapshots").iterdir()} == before
    changed = run_train(small_data, run_dir.parent, "--bases", "2", "--cycles", "3", "--distil-from-cycle", "2",
                        "--lr-matrix", "0.05", "--run-name", "tiny-2x3-seed0", check=False)
    assert changed.returncode == 2
    assert "--lr-matrix (0.02 -> 0.05)" in changed.stderr and len(changed.stderr.strip().splitlines()) == 1


def test_two_processes_give_the_same_population(two_bases, small_data, tmp_path):
    run_dir, _ = two_bases
    # two bases on two processes: one base per process group
    run_train(small_data, tmp_path, "--bases", "2", "--cycles", "3", "--distil-from-cycle", "2",
              launcher=TORCHRUN_2)
    assert snapshot_losses(tmp_path / "tiny-2x3-seed0") == snapshot_losses(run_dir)
    # one base on two processes (DDP) against one process accumulating the same two micro-batches;
    # under torchrun the device batch is chosen (4 of the preset's at most 8), as in README's example
    run_train(small_data, tmp_path / "one", launcher=TORCHRUN_2)
    run_train(small_data, tmp_path / "ddp_ref", "--device-batch", "4")
    ddp, ref = snapshot_losses(tmp_path / "one/tiny-1x3-seed0"), snapshot_losses(tmp_path / "ddp_ref/tiny-1x3-seed0")
    assert ddp.keys() == ref.keys()
    for k in ref:
        assert ddp[k] == pytest.approx(ref[k], abs=1e-4)


@pytest.mark.slow  # kill and resume runs in the default suite as tests/test_faults.py's kills at a commit
def test_killed_run_resumes_bitwise(small_data, tmp_path):
    flags = ["--cycles", "3", "--distil-from-cycle", "2", "--checkpoint-minutes", "0.0003"]
    run_train(small_data, tmp_path / "whole", *flags)
    runs = tmp_path / "killed"
    run_dir = runs / "tiny-1x3-seed0"
    for marker in ("checkpoints/base0.pt", "snapshots/b0c1.json"):  # one kill in cycle 1, one in cycle 2
        cmd = [sys.executable, str(REPO / "train_q0.py"), *TINY, "--data-dir", str(small_data),
               "--runs-dir", str(runs), *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        deadline = time.time() + 120
        while not (run_dir / marker).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    resumed = run_train(small_data, runs, *flags)
    assert "resumed at step" in resumed.stdout
    whole = q0_run.list_snapshots(tmp_path / "whole/tiny-1x3-seed0")
    again = q0_run.list_snapshots(run_dir)
    assert [r["id"] for r in again] == ["b0c1", "b0c2", "b0c3"]
    for a, b in zip(whole, again):
        wa = torch.load(tmp_path / "whole/tiny-1x3-seed0" / a["weights"], weights_only=True)
        wb = torch.load(run_dir / b["weights"], weights_only=True)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), a["id"]
        assert a["val_loss"] == b["val_loss"]


# --- bad input: one line, exit code 2, nothing trained ----------------------------------------

def one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_data_names_the_command(tmp_path):
    result = run_train(tmp_path / "nowhere", tmp_path, check=False)
    one_line_error(result, "python data/")
    assert not (tmp_path / "tiny-1x3-seed0").exists()


def test_bad_layouts_and_sizes_are_refused(small_data, tmp_path):
    one_line_error(run_train(small_data, tmp_path, "--bases", "3", "--groups", "2", check=False), "evenly")
    one_line_error(run_train(small_data, tmp_path, "--device-batch", "3", check=False), "--device-batch")
    one_line_error(run_train(small_data, tmp_path, "--fitness-tokens", "10000000", check=False), "fitness")
    one_line_error(run_train(small_data, tmp_path, "--cycle-epochs", "0.001", check=False), "shorter than one step")
    assert not any(tmp_path.glob("*/snapshots/*.pt"))


def test_device_batch_is_chosen_to_divide_unless_given():
    args = q0.parse_args(["--preset", "cpu"])
    cycles = q0.plan_cycles(args, 32768)
    assert sorted({c.batch_seqs for c in cycles}) == [24, 32]
    cap = q0.device_batch_cap(args)
    assert args.device_batch is None and cap == 8
    assert q0_run.choose_device_batch(None, cap, 1, cycles) == 8   # the preset's, when it divides
    assert q0_run.choose_device_batch(None, cap, 2, cycles) == 4   # 12 and 16 sequences per process
    assert q0_run.choose_device_batch(None, cap, 8, cycles) == 1   # 3 and 4
    with pytest.raises(UsageError, match="does not split over 3 processes"):
        q0_run.choose_device_batch(None, cap, 3, cycles)
    args = q0.parse_args(["--preset", "cpu", "--device-batch", "8"])
    assert q0_run.choose_device_batch(args.device_batch, cap, 1, cycles) == 8
    with pytest.raises(UsageError, match="--device-batch 8"):
        q0_run.choose_device_batch(args.device_batch, cap, 2, cycles)  # given: checked, never changed
    layout = q0_run.make_layout(q0.parse_args(["--preset", "cpu"]), 1, 0, cycles, cap)
    assert layout.device_batch == 8 and layout.bases == [0]
    # 1, not the reference's 2: with DDP's buckets and a bf16 teacher the plan puts 2 over an H100
    assert q0.device_batch_cap(q0.parse_args(["--preset", "slowrun"])) == 1


def test_epochs_flag_resolves_the_recipe_layout_that_spends_the_budget():
    """The in-process twin of the end-to-end test below: --epochs 3 resolves, at parse time, to the
    recipe's layout, whose cycles spend 3 epochs of the training tokens; a layout that cannot spend
    the budget is one line."""
    args = q0.parse_args([*TINY, "--epochs", "3", "--device-batch", "2"])
    assert {k: getattr(args, k) for k in q0.RECIPE_LAYOUT_FLAGS} == q0.recipe(3, q0.RECIPES["tiny"])
    cycles = q0.plan_cycles(args, args.train_tokens)
    assert len(cycles) == args.cycles
    spent = cycles[-1].pos(cycles[-1].steps, args.seq_len) / args.train_tokens
    assert spent == pytest.approx(3, abs=0.02)
    with pytest.raises(UsageError, match="--epochs 3 .* spends 4"):
        q0.parse_args([*TINY, "--epochs", "3", "--cycles", "2", "--cycle-epochs", "1", "--first-cycle-epochs", "3"])


@pytest.mark.slow  # end to end as a child process; its in-process twin is the test above
def test_epochs_flag_trains_the_recipe_layout(small_data, tmp_path):
    run_train(small_data, tmp_path, "--epochs", "3", "--device-batch", "2", "--run-name", "budget3")
    run = json.loads((tmp_path / "budget3" / "run.json").read_text())
    assert {k: run["population_config"][k] for k in q0.RECIPE_LAYOUT_FLAGS} == q0.recipe(3, q0.RECIPES["tiny"])
    records = q0_run.list_snapshots(tmp_path / "budget3")
    assert len(records) == q0.recipe(3, q0.RECIPES["tiny"])["cycles"]
    assert q0_run.epochs_spent(records) == pytest.approx(3, abs=0.02)
    one_line_error(run_train(small_data, tmp_path, "--epochs", "3", "--cycles", "2", "--cycle-epochs", "1",
                             "--first-cycle-epochs", "3", "--run-name", "bad", check=False), "--epochs 3", "spends 4")
    assert not (tmp_path / "bad").exists()


def test_mismatched_vocabularies_are_refused(small_data, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.q0t").write_bytes((small_data / "train.q0t").read_bytes())
    tokens = shards.read_tokens(small_data / "val.q0t").tokens
    table = np.ones(50257, dtype=np.int64)
    table[0] = 0
    write_shard(tmp_path / "data" / "val.q0t", tokens, vocab_size=50257, bos_id=0, tokenizer="gpt2",
                token_bytes=table, command="python data/text.py elsewhere --tokenizer gpt2 --out data")
    one_line_error(run_train(tmp_path / "data", tmp_path / "runs", check=False), "do not match")


def test_an_unrelated_folder_is_never_overwritten(small_data, tmp_path):
    (tmp_path / "tiny-1x3-seed0").mkdir()
    (tmp_path / "tiny-1x3-seed0" / "notes.txt").write_text("mine")
    one_line_error(run_train(small_data, tmp_path, check=False), "not a q0 run")
    assert (tmp_path / "tiny-1x3-seed0" / "notes.txt").read_text() == "mine"


# --- placement flags: what they do to the numbers ---------------------------------------------

def one_step_weights(small_data, tmp_path, device_batch: int) -> dict:
    """The weights after one optimiser step from the same (random, non-degenerate) weights."""
    args = q0.parse_args([*TINY, "--data-dir", str(small_data), "--device-batch", str(device_batch)])
    run = cpu_run(args, tmp_path)
    assert run.layout.device_batch == device_batch
    trainer = q0.BaseTrainer(run, 0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    trainer.train_step(run.cycles[0], 0, None)
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_device_batch_moves_only_the_reduction_order(small_data, tmp_path):
    """Dropout masks are drawn per sequence of the global batch, so one step with the batch of 8 in
    one micro-batch, in 4 or in 8 gives the same weights up to float rounding, which Muon's bf16
    Polar Express turns into about 1e-3 of a matrix's norm (masks drawn per micro-batch moved them
    by 0.79 of it: a population flag in disguise)."""
    ref = one_step_weights(small_data, tmp_path, 8)
    for device_batch in (2, 1):
        got = one_step_weights(small_data, tmp_path, device_batch)
        gap = max(((ref[k] - got[k]).norm() / ref[k].norm()).item() for k in ref)
        assert gap < 1e-2, (device_batch, gap)


def test_every_preset_key_is_a_flag():
    """A preset sets flags' defaults; a key that names no flag would be a silent stray attribute
    (as a renamed flag left in a preset once was: its runs quietly stopped distilling)."""
    dests = {a.dest for a in q0.build_parser()._actions}
    for name, preset in q0.PRESETS.items():
        assert set(preset) <= dests, (name, sorted(set(preset) - dests))
