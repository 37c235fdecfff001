"""The record, pinned: the 1.8B Slowrun q0 record's model, optimiser and schedule, against the
reference's own numbers (qlabs-eng/slowrun, unlimited/train.py at a200723) and its exact shapes.

Every other test module checks invariants that any variant of the experiment keeps (every
parameter in exactly one optimiser group, the LR at its peak when a cycle starts and at its
floor at the snapshot, chunked losses equal to whole ones, ...). This module alone fails when the
model, its optimiser or its schedule is no longer the record's: a researcher's variant (another
MLP, another optimiser group, another LR shape) fails here and only here, each failure saying so.

tests/fixtures/slowrun_small.pt holds weights, inputs and the outputs of the reference's own
forward and Muon step (fp32 on a CPU), made by tests/fixtures/make_slowrun_fixture.py;
tests/fixtures/slowrun_optimizer.pt two whole steps of its optimiser on a small model
(make_slowrun_optimizer_fixture.py). The reference's code itself is not part of q0.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import distillation_loss, run_train
import import_slowrun
import q0_run
import train_q0 as q0
from data.shards import UsageError

FIXTURE = Path(__file__).parent / "fixtures" / "slowrun_small.pt"
OPTIMIZER_FIXTURE = Path(__file__).parent / "fixtures" / "slowrun_optimizer.pt"
RECORD_PARAMETERS = 1_870_172_811        # the reference's GPT at its defaults (MTP included), counted on meta
RECORD_PARAMETERS_NO_MTP = 1_810_403_019
NOT_THE_RECORD = "your model is no longer the record's"


def assert_record(cond, what: str):
    assert cond, f"{NOT_THE_RECORD}: {what}"


def assert_record_close(got, want, what: str, **tolerance):
    """torch.testing.assert_close, its failure prefixed with what it means."""
    try:
        torch.testing.assert_close(got, want, **tolerance)
    except AssertionError as e:
        raise AssertionError(f"{NOT_THE_RECORD}: {what}\n{e}") from None


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


def reference_model(fx, **config):
    state = {k: v.float() for k, v in fx["state_dict"].items()}
    try:
        return import_slowrun.from_slowrun(state, {**fx["config"], **config}).eval()
    except UsageError as e:
        raise AssertionError(f"{NOT_THE_RECORD}: the reference's weights do not load into it ({e})") from None


def record_config(**changes) -> q0.GPTConfig:
    args = q0.parse_args(["--preset", "slowrun"])
    for k, v in changes.items():
        setattr(args, k, v)
    return q0.model_config(args, 50257)


# --- the model ------------------------------------------------------------------------------------

def test_default_model_is_the_records_shape_and_size():
    cfg = record_config()
    with torch.device("meta"):
        model = q0.GPT(cfg)
        no_mtp = q0.GPT(record_config(mtp_weight=0.0))
    n = sum(p.numel() for p in model.parameters())
    assert_record(n == RECORD_PARAMETERS, f"{n:,} parameters at the defaults, the record has {RECORD_PARAMETERS:,}")
    n = sum(p.numel() for p in no_mtp.parameters())
    assert_record(n == RECORD_PARAMETERS_NO_MTP,
                  f"{n:,} parameters without MTP, the record has {RECORD_PARAMETERS_NO_MTP:,}")
    order = cfg.decoder_order()
    assert_record(order == list(range(15, 25)) * 5 + list(range(25, 30)), f"decoder order {order}")
    assert_record(cfg.encoder_layers + len(order) == 70, "the record applies 70 blocks per token")
    windows = [cfg.window(i) for i in (0, 1, 2, 3, 28, 29)]
    assert_record(windows == [1024, 1024, 1024, 2048, 1024, 2048], f"windows {windows} of layers 0-3, 28, 29")
    with_ve = [i for i, b in enumerate(model.blocks) if b.attn.value_embed is not None]
    assert_record(with_ve == list(range(1, 30, 2)), f"value embeddings on layers {with_ve}")
    assert_record(model.mtp_block.attn.value_embed is None, "the MTP block has a value embedding")


def test_the_records_init():
    """The record's output projections start at N(0, 1/sqrt(d)) (--zero-out-init: at zero)."""
    record = q0.GPT(q0.model_config(q0.parse_args(["--preset", "tiny"]), 256))
    std = record.blocks[0].attn.proj.weight.std().item()
    assert_record(std == pytest.approx(32 ** -0.5, rel=0.2), f"attention output projection std {std:.4f}")


@torch.no_grad()
def test_from_slowrun_gives_the_reference_logits(fx):
    model = reference_model(fx)                                   # layers 3-4 looped, IHA, MTP, windows
    assert_record_close(model(fx["idx"]), fx["logits_loop"], "logits of the looped model", atol=1e-4, rtol=0)
    assert_record_close(model(fx["idx"][:, :20]), fx["logits_short"], "logits of a short input", atol=1e-4, rtol=0)
    assert_record_close(reference_model(fx, dupe_layers=None)(fx["idx"]), fx["logits_plain"],
                        "logits without looping", atol=1e-4, rtol=0)


@torch.no_grad()
def test_from_slowrun_gives_the_reference_training_loss_with_mtp(fx):
    logits, mtp = reference_model(fx)(fx["idx"], fx["targets"])
    loss = distillation_loss(logits, fx["targets"], mtp=mtp, mtp_weight=fx["config"]["mtp_weight"])
    want = fx["loss_loop"].item()
    assert_record(loss.item() == pytest.approx(want, abs=1e-5),
                  f"training loss {loss.item():.6f}, the reference's {want:.6f}")


def test_from_slowrun_refuses_what_it_cannot_hold(fx):
    state = {k: v.float() for k, v in fx["state_dict"].items()}
    for change, config, message in [({**state, "extra.weight": torch.zeros(1)}, fx["config"], "does not know"),
                                    ({k: v for k, v in state.items() if "mtp" not in k}, fx["config"], "lacks"),
                                    (state, {**fx["config"], "n_kv_head": 1}, "grouped-query"),
                                    # renamed to names the model lacks (IHA mixing of a model without IHA)
                                    (state, {**fx["config"], "use_iha": False}, "does not know")]:
        try:
            import_slowrun.from_slowrun(change, config)
            raised = ""
        except UsageError as e:
            raised = str(e)
        assert_record(message in raised, f"from_slowrun raised {raised!r}, not {message!r}")


def test_import_slowrun_scores_reference_snapshots_into_a_run(fx, small_data, tmp_path):
    """The reference's model_{i}.pt files become an ordinary run that fit_prior.py and eval.py read:
    `python tools/import_slowrun.py DIR [train_q0.py flags]`."""
    from test_prior import cli
    ckpt = tmp_path / "reference"
    ckpt.mkdir()
    for i in range(3):  # three snapshots of one node, saved as the reference saves them (bf16)
        torch.manual_seed(i)
        torch.save({k: (v.float() + 0.01 * i * torch.randn_like(v.float())).bfloat16()
                    for k, v in fx["state_dict"].items()}, ckpt / f"model_{i}.pt")
    shape = ["--n-layer", "6", "--d-model", "32", "--n-head", "2", "--mlp-hidden", "256", "--seq-len", "64",
             "--short-window", "32", "--loop-layers", "3", "5", "--loop-repeats", "4", "--mtp-weight", "0.3"]
    flags = [*shape, "--bases", "1", "--cycles", "3", "--run-name", "imported"]
    result = run_train(small_data, tmp_path / "runs", *flags, script="tools/import_slowrun.py", before=(ckpt,), check=False)
    assert_record(result.returncode == 0, f"import_slowrun.py failed:\n{result.stderr[-2000:]}")
    assert result.stdout.count("] imported ") == 3
    run = tmp_path / "runs" / "imported"
    records = q0_run.list_snapshots(run)
    assert [r["id"] for r in records] == ["b0c1", "b0c2", "b0c3"]
    # the snapshot's numbers are those of from_slowrun's model on the run's validation tokens
    state = torch.load(ckpt / "model_2.pt", weights_only=True)
    model = import_slowrun.from_slowrun(state, {**fx["config"], "vocab_size": 256}).eval()
    val = q0_run.load_val_tokens(q0_run.load_run(run))
    assert records[2]["val_loss"] == pytest.approx(q0_run.mean_nll(q0.token_probs(model, val, 64, 16, "cpu")), abs=1e-6)
    assert cli("fit_prior.py", run).returncode == 0
    assert cli("eval.py", run, "--prior", run / "prior.json").returncode == 0
    again = run_train(small_data, tmp_path / "runs", *flags, script="tools/import_slowrun.py", before=(ckpt,))
    assert "] imported " not in again.stdout  # a rerun keeps them


# --- the optimiser ------------------------------------------------------------------------------

def test_muon_step_is_the_references(fx):
    """Two steps of our Muon (MuonEq-R, bf16 Polar Express, NorMuon, cautious decay) equal the
    reference's fused update on a tall and a wide matrix."""
    for name, m in fx["muon"].items():
        p = torch.nn.Parameter(m["p0"].clone())
        opt = q0.MuonAdamW([dict(kind="muon", params=[p], lr=m["lr"], weight_decay=m["weight_decay"])],
                           momentum=m["momentum"], beta2=m["beta2"])
        for step, (g, want) in enumerate(zip(m["grads"], m["after"])):
            p.grad = g.clone()
            opt.step()
            assert_record_close(p.detach(), want, f"Muon step {step} of the {name} matrix", atol=1e-7, rtol=0)


def test_optimizer_step_is_the_references():
    """Two whole steps of build_optimizer's optimiser at the record's flags (every Muon stack, its
    Polar Express in bf16, and every AdamW group) equal two steps of the reference's own, from the
    same weights and real gradients (tests/fixtures/make_slowrun_optimizer_fixture.py)."""
    ox = torch.load(OPTIMIZER_FIXTURE, weights_only=True)
    model = reference_model(dict(state_dict=ox["state_dict"], config=ox["config"]))
    opt = q0.build_optimizer(model, q0.parse_args(["--preset", "slowrun"]))
    params = dict(model.named_parameters())
    for step, s in enumerate(ox["steps"]):
        for name, g in import_slowrun.slowrun_state_dict(s["grads"], model.cfg).items():
            params[name].grad = g
        for g in opt.param_groups:  # as Stepper.schedule sets them
            g["lr"], g["weight_decay"] = g["peak_lr"] * s["lr_mult"], g["peak_wd"] * s["wd_mult"]
        opt.step()
        for name, want in import_slowrun.slowrun_state_dict(s["after"], model.cfg).items():
            assert_record_close(params[name].detach(), want, f"{name} after optimiser step {step}", atol=1e-6, rtol=0)


def test_optimizer_groups_are_the_records():
    args = q0.parse_args(["--preset", "tiny"])
    model = q0.GPT(q0.model_config(args, 256))
    opt = q0.build_optimizer(model, args)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = by_param[id(p)]
        rule = (g["kind"], g["peak_lr"], g["peak_wd"])
        if name.endswith(("q_mix", "k_mix", "v_mix")):
            assert_record(rule == ("adamw", args.lr_iha, 0.0), f"{name} is optimised by {rule}")
        elif name in ("embed.weight", "head.weight"):
            assert_record(g["kind"] == "adamw" and g["peak_wd"] == args.weight_decay, f"{name} is optimised by {rule}")
        elif p.ndim == 2:                          # attention, MLP, gates, value embeddings, MTP
            assert_record(rule == ("muon", args.lr_matrix, args.weight_decay), f"{name} is optimised by {rule}")
    scalar = {n: by_param[id(getattr(model, n))] for n in ("resid_scale", "skip_scale", "x0_scale")}
    assert_record(scalar["resid_scale"]["peak_lr"] == scalar["skip_scale"]["peak_lr"]
                  == pytest.approx(0.01 * args.lr_scalar), "residual and skip scalars at 0.01x --lr-scalar")
    assert_record(scalar["x0_scale"]["betas"] == (0.96, 0.95), "x0 scalars with betas (0.96, 0.95)")
    assert_record(scalar["x0_scale"]["peak_lr"] == args.lr_scalar, "x0 scalars at --lr-scalar")


# --- the schedule ------------------------------------------------------------------------------

def test_the_lr_falls_linearly_within_a_cycle():
    steps, floor = 50, 0.08
    mults = [q0.lr_multiplier(i, steps, floor) for i in range(steps)]
    assert_record(np.allclose(np.diff(mults), np.diff(mults)[0]), "the LR no longer falls linearly within a cycle")


def test_the_records_batch_schedule():
    """Quarters: 0.75 of the batch in the first and last quarter of the cycles, the whole batch between."""
    args = q0.parse_args(["--preset", "tiny", "--cycles", "8", "--first-cycle-epochs", "3", "--cycle-epochs", "1",
                          "--batch-seqs", "8", "--batch-schedule", "0.75", "--seq-len", "32"])
    batches = [c.batch_seqs for c in q0.plan_cycles(args, train_tokens=8 * 32 * 10)]
    assert_record(batches == [6, 6, 8, 8, 8, 8, 6, 6], f"batches {batches} of 8 cycles")
