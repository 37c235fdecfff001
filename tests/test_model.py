"""The model and optimiser against direct computations: what holds for any variant of them.

The record's own numbers (its parameter count, the reference's logits and Muon step, its
optimiser groups) are pinned in tests/test_fidelity.py alone.
tests/fixtures/slowrun_small.pt also holds the public prior solver's result (fit_prior's test).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

import train_q0 as q0

FIXTURE = Path(__file__).parent / "fixtures" / "slowrun_small.pt"


@pytest.fixture(scope="module")
def fx():
    return torch.load(FIXTURE, weights_only=True)


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
    record = q0.GPT(q0.model_config(q0.parse_args(["--preset", "tiny"]), 256))  # its std: tests/test_fidelity.py
    for block in record.blocks:
        assert block.attn.proj.weight.any() and block.mlp.down.weight.any()
    assert record.head.weight.any() and record.x0_scale.all()
