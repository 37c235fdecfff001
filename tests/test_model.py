"""The record's model and optimiser, against the reference and against direct computations.

tests/fixtures/slowrun_small.pt holds weights, inputs and the outputs of the reference's own
forward and Muon step (qlabs-eng/slowrun, unlimited/train.py at a200723, fp32 on a CPU), made by
tests/fixtures/make_slowrun_fixture.py; the reference's code itself is not part of q0.
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_q0 as q0

FIXTURE = Path(__file__).parent / "fixtures" / "slowrun_small.pt"
RECORD_PARAMETERS = 1_870_172_811        # the reference's GPT at its defaults (MTP included), counted on meta
RECORD_PARAMETERS_NO_MTP = 1_810_403_019


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


def reference_model(fx, **config):
    state = {k: v.float() for k, v in fx["state_dict"].items()}
    return q0.from_slowrun(state, {**fx["config"], **config}).eval()


@torch.no_grad()
def test_from_slowrun_gives_the_reference_logits(fx):
    model = reference_model(fx)                                   # layers 3-4 looped, IHA, MTP, windows
    torch.testing.assert_close(model(fx["idx"]), fx["logits_loop"], atol=1e-4, rtol=0)
    torch.testing.assert_close(model(fx["idx"][:, :20]), fx["logits_short"], atol=1e-4, rtol=0)
    torch.testing.assert_close(reference_model(fx, dupe_layers=None)(fx["idx"]), fx["logits_plain"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_from_slowrun_gives_the_reference_training_loss_with_mtp(fx):
    logits, mtp = reference_model(fx)(fx["idx"], fx["targets"])
    loss = q0.distillation_loss(logits, fx["targets"], mtp=mtp, mtp_weight=fx["config"]["mtp_weight"])
    assert loss.item() == pytest.approx(fx["loss_loop"].item(), abs=1e-5)


def test_from_slowrun_refuses_what_it_cannot_hold(fx):
    state = {k: v.float() for k, v in fx["state_dict"].items()}
    with pytest.raises(q0.UsageError, match="does not know"):
        q0.from_slowrun({**state, "extra.weight": torch.zeros(1)}, fx["config"])
    with pytest.raises(q0.UsageError, match="lacks"):
        q0.from_slowrun({k: v for k, v in state.items() if "mtp" not in k}, fx["config"])
    with pytest.raises(q0.UsageError, match="grouped-query"):
        q0.from_slowrun(state, {**fx["config"], "n_kv_head": 1})


def record_config(**changes) -> q0.GPTConfig:
    args = q0.parse_args(["--preset", "slowrun"])
    for k, v in changes.items():
        setattr(args, k, v)
    return q0.model_config(args, 50257)


def test_default_model_is_the_records_shape_and_size():
    cfg = record_config()
    with torch.device("meta"):
        model = q0.GPT(cfg)
        no_mtp = q0.GPT(record_config(mtp_weight=0.0))
    assert sum(p.numel() for p in model.parameters()) == RECORD_PARAMETERS
    assert sum(p.numel() for p in no_mtp.parameters()) == RECORD_PARAMETERS_NO_MTP
    order = cfg.decoder_order()
    assert order == list(range(15, 25)) * 5 + list(range(25, 30))
    assert cfg.encoder_layers + len(order) == 70                  # block applications per token
    assert [cfg.window(i) for i in (0, 1, 2, 3, 28, 29)] == [1024, 1024, 1024, 2048, 1024, 2048]
    with_ve = [i for i, b in enumerate(model.blocks) if b.attn.value_embed is not None]
    assert with_ve == list(range(1, 30, 2))
    assert model.mtp_block.attn.value_embed is None


def test_looping_is_the_blocks_applied_in_order():
    """The looped forward equals the blocks applied by hand: encoder, then the decoder's order
    with the U-Net skip and the residual/x0 mix before every application."""
    torch.manual_seed(0)
    cfg = q0.GPTConfig(vocab_size=64, n_layer=6, d_model=32, n_head=2, mlp_hidden=64, seq_len=16, short_window=4,
                       loop_start=3, loop_end=5, loop_repeats=2)
    model = q0.GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        idx = torch.randint(0, 64, (2, 16))
        rope = (model.rope_cos[:16], model.rope_sin[:16])
        x0 = q0.norm(model.embed(idx))
        x, skips = x0, []
        for i in [0, 1, 2]:
            x = model.blocks[i](model.resid_scale[i] * x + model.x0_scale[i] * x0, x0, rope)
            skips.append(x)
        for i in [3, 4, 3, 4, 3, 4, 5]:
            x = x + model.skip_scale[5 - i] * skips[5 - i]
            x = model.blocks[i](model.resid_scale[i] * x + model.x0_scale[i] * x0, x0, rope)
        torch.testing.assert_close(model(idx), model.logits(q0.norm(x)))


def test_muon_step_is_the_references(fx):
    """Two steps of our Muon (MuonEq-R, bf16 Polar Express, NorMuon, cautious decay) equal the
    reference's fused update on a tall and a wide matrix."""
    for m in fx["muon"].values():
        p = torch.nn.Parameter(m["p0"].clone())
        opt = q0.MuonAdamW([dict(kind="muon", params=[p], lr=m["lr"], weight_decay=m["weight_decay"])],
                           momentum=m["momentum"], beta2=m["beta2"])
        for g, want in zip(m["grads"], m["after"]):
            p.grad = g.clone()
            opt.step()
            torch.testing.assert_close(p.detach(), want, atol=1e-7, rtol=0)


def test_muon_eq_r_normalises_rows_before_orthogonalising():
    torch.manual_seed(0)
    g = torch.randn(1, 8, 16) * torch.logspace(-2, 2, 8)[None, :, None]   # rows of very different size
    plain = q0.muon_direction(g, torch.zeros_like(g), None, 0.0, 0.95, eq_r=False, normuon=False)
    eq_r = q0.muon_direction(g, torch.zeros_like(g), None, 0.0, 0.95, eq_r=True, normuon=False)
    direct = q0.polar_express(g / g.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(eq_r, direct)
    assert not torch.allclose(plain.float(), eq_r.float(), atol=1e-2)


@pytest.mark.parametrize("shape", [(16, 8), (8, 16)])
def test_normuon_rescales_along_the_reduction_dimension_keeping_the_norm(shape):
    torch.manual_seed(0)
    g = torch.randn(1, *shape)
    moment = torch.zeros(1, shape[0], 1) if shape[0] >= shape[1] else torch.zeros(1, 1, shape[1])
    u = q0.muon_direction(g, torch.zeros_like(g), moment, 0.0, 0.95, eq_r=True, normuon=True).float()
    o = q0.polar_express(g / g.norm(dim=-1, keepdim=True)).float()
    reduce = -1 if shape[0] >= shape[1] else -2
    v = o.square().mean(dim=reduce, keepdim=True)
    torch.testing.assert_close(moment, v * (1 - 0.94921875), rtol=1e-2, atol=0)  # beta2 0.95 rounded to bf16
    direct = o * moment.rsqrt()
    direct = direct * o.norm() / direct.norm()
    torch.testing.assert_close(u, direct, rtol=2e-2, atol=2e-3)
    assert u.norm().item() == pytest.approx(o.norm().item(), rel=1e-2)


def test_cautious_weight_decay_only_where_update_and_weight_agree():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 8))
    p.grad = torch.randn(8, 8)
    before = p.detach().clone()
    opt = q0.MuonAdamW([dict(kind="muon", params=[p], lr=0.01, weight_decay=2.0)], momentum=0.0,
                       eq_r=False, normuon=False)
    u = q0.polar_express(p.grad[None].clone())[0]
    opt.step()
    lr, wd = torch.tensor(0.01, dtype=torch.bfloat16), torch.tensor(2.0, dtype=torch.bfloat16)
    mask = (u.float() * before) >= 0
    direct = before - ((lr * u).float() + (lr * wd).float() * before * mask)
    torch.testing.assert_close(p.detach(), direct, atol=1e-6, rtol=0)
    assert 0 < mask.float().mean() < 1                                    # both cases occur


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.zeros(5, 3))
    theirs.data.copy_(ours.data)
    opt = q0.MuonAdamW([dict(kind="adamw", params=[ours], lr=0.01, weight_decay=0.3, betas=(0.8, 0.95))])
    ref = torch.optim.AdamW([theirs], lr=0.01, weight_decay=0.3, betas=(0.8, 0.95), eps=1e-10)
    for _ in range(5):
        g = torch.randn(5, 3)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), atol=1e-6, rtol=1e-5)


def test_optimizer_groups_are_the_records():
    args = q0.parse_args(["--preset", "tiny"])
    model = q0.GPT(q0.model_config(args, 256))
    opt = q0.build_optimizer(model, args)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    for name, p in names.items():
        g = by_param[id(p)]
        if name.endswith(("q_mix", "k_mix", "v_mix")):
            assert (g["kind"], g["peak_lr"], g["peak_wd"]) == ("adamw", args.lr_iha, 0.0), name
        elif name in ("embed.weight", "head.weight"):
            assert g["kind"] == "adamw" and g["peak_wd"] == args.weight_decay, name
        elif p.ndim == 2:                          # attention, MLP, gates, value embeddings, MTP
            assert (g["kind"], g["peak_lr"], g["peak_wd"]) == ("muon", args.lr_matrix, args.weight_decay), name
    assert by_param[id(model.resid_scale)]["peak_lr"] == by_param[id(model.skip_scale)]["peak_lr"] \
        == pytest.approx(0.01 * args.lr_scalar)
    assert by_param[id(model.x0_scale)]["betas"] == (0.96, 0.95)
    assert by_param[id(model.x0_scale)]["peak_lr"] == args.lr_scalar


def test_snapshot_noise_touches_every_tensor_the_record_perturbs():
    args = q0.parse_args(["--preset", "tiny"])
    model = q0.GPT(q0.model_config(args, 256))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    q0.add_snapshot_noise(model, 0.1, torch.Generator().manual_seed(0))
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (p.numel() > 1 and before[name].std() > 0), name


def test_fit_prior_adamw_is_the_public_solver(fx):
    """fit_prior.py --solver adamw against gradient_select.optimize_alpha's own result."""
    import fit_prior
    P, alpha = fx["prior"]["P"], fx["prior"]["alpha"]
    fit = fit_prior.fit_adamw(P)
    np.testing.assert_allclose(fit.w, torch.softmax(alpha.double(), 0).numpy(), atol=1e-6)


def test_zero_out_init_is_one_flag():
    args = q0.parse_args(["--preset", "tiny", "--zero-out-init"])
    model = q0.GPT(q0.model_config(args, 256))
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.mlp.down.weight.any()
        assert block.attn.q.weight.any()
    assert not model.head.weight.any() and not model.x0_scale.any()
    record = q0.GPT(q0.model_config(q0.parse_args(["--preset", "tiny"]), 256))
    assert record.blocks[0].attn.proj.weight.std().item() == pytest.approx(32 ** -0.5, rel=0.2)


def test_import_slowrun_scores_reference_snapshots_into_a_run(fx, small_data, tmp_path):
    """The reference's model_{i}.pt files become an ordinary run that fit_prior.py and eval.py read."""
    from conftest import run_train
    from test_prior import cli
    ckpt = tmp_path / "reference"
    ckpt.mkdir()
    for i in range(3):  # three snapshots of one node, saved as the reference saves them (bf16)
        torch.manual_seed(i)
        torch.save({k: (v.float() + 0.01 * i * torch.randn_like(v.float())).bfloat16()
                    for k, v in fx["state_dict"].items()}, ckpt / f"model_{i}.pt")
    shape = ["--n-layer", "6", "--d-model", "32", "--n-head", "2", "--mlp-hidden", "256", "--seq-len", "64",
             "--short-window", "32", "--loop-layers", "3", "5", "--loop-repeats", "4", "--mtp-weight", "0.3"]
    flags = [*shape, "--bases", "1", "--cycles", "3", "--import-slowrun", str(ckpt), "--run-name", "imported"]
    result = run_train(small_data, tmp_path / "runs", *flags)
    assert result.stdout.count("] imported ") == 3
    run = tmp_path / "runs" / "imported"
    records = q0.list_snapshots(run)
    assert [r["id"] for r in records] == ["b0c1", "b0c2", "b0c3"]
    # the snapshot's numbers are those of from_slowrun's model on the run's validation tokens
    state = torch.load(ckpt / "model_2.pt", weights_only=True)
    model = q0.from_slowrun(state, {**fx["config"], "vocab_size": 256}).eval()
    val = q0.load_val_tokens(q0.load_run(run))
    assert records[2]["val_loss"] == pytest.approx(q0.mean_nll(q0.token_probs(model, val, 64, 16, "cpu")), abs=1e-6)
    assert cli("fit_prior.py", run).returncode == 0
    assert cli("eval.py", run, "--prior", run / "prior.json").returncode == 0
    assert "] imported " not in run_train(small_data, tmp_path / "runs", *flags).stdout  # a rerun keeps them
