"""The 8xH100 path proven on a CPU: collectives on the device their backend takes (a "cuda:gloo"
group refuses CPU tensors exactly as NCCL does), attention kernels, compilation without graph
breaks or recompiles, bf16 autocast, a world of 8 in one process, and the dry-run's counts."""
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO, cpu_run, distillation_loss
import q0_run
import train_q0 as q0
from data import shards
from data.shards import UsageError

TINY_CFG = dict(vocab_size=256, n_layer=2, d_model=32, n_head=2, mlp_hidden=64, seq_len=16, short_window=8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- collectives in a group that takes CUDA tensors only ----------------------------------------

def _cuda_gloo_worker(rank: int, port: int, tokens: np.ndarray, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("cuda:gloo", rank=rank, world_size=2)
    try:
        result = {}
        try:  # NCCL's refusal, reproduced: what token_probs used to do
            dist.all_reduce(torch.ones(2))
            result["refused"] = ""
        except RuntimeError as e:
            result["refused"] = str(e)
        t = torch.full((3,), float(rank + 1))
        result["all_reduce"] = q0_run.all_reduce_(t).tolist()
        result["all_gather"] = [x.tolist() for x in q0_run.all_gather(torch.full((2,), float(rank)))]
        q0_run.barrier()
        sub = dist.new_group([0, 1])
        torch.manual_seed(0)
        model = q0.GPT(q0.GPTConfig(**TINY_CFG))
        result["probs"] = q0.token_probs(model, tokens, 16, 2, "cpu", sub)
        result["muon"] = muon_steps(sub), muon_steps(None)  # sharded over the 2 ranks, and not
        parts = [torch.full((2,), 10.0 * rank + j) for j in range(2)]
        result["all_to_all"] = [x.tolist() for x in q0_run.all_to_all(parts)]
        result["ensemble"] = {k: sharded_ensemble(rank, k, sub) for k in (3, 1)}  # 1 member: rank 1 holds no body
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def ensemble_members(k: int) -> tuple[list[q0.GPT], list[float]]:
    members = []
    for seed in range(k):
        torch.manual_seed(seed)
        members.append(q0.GPT(q0.GPTConfig(**TINY_CFG)).eval().requires_grad_(False))
        with torch.no_grad():  # members that disagree: random heads, not the zero init
            members[-1].head.weight.normal_(0, 0.5)
    return members, [0.5, 0.3, 0.2][:k] if k > 1 else [1.0]


def ensemble_rows(rank: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(rank))  # each rank its own rows


def sharded_ensemble(rank: int, k: int, group) -> torch.Tensor:
    """The ensemble teacher's log-probabilities of this rank's rows, member i's body on rank i mod 2."""
    members, w = ensemble_members(k)
    held = [q0.SnapshotTeacher(m) if i % 2 == rank else q0.MemberHead(m.head.weight, m.cfg)
            for i, m in enumerate(members)]
    teacher = q0.EnsembleTeacher(held, w, group)
    with torch.no_grad():
        return teacher.log_probs(teacher.features(ensemble_rows(rank)).flatten(0, 1), 1.3)


def muon_steps(group, steps: int = 3) -> dict:
    """Weights of the tiny preset's model after Muon steps on fixed gradients (identical on every
    rank, as DDP leaves them), with the orthogonalisation sharded over `group` or not."""
    args = q0.parse_args(["--preset", "tiny"])
    torch.manual_seed(0)
    model = q0.GPT(q0.model_config(args, 256))
    opt = q0.build_optimizer(model, args, group)
    for step in range(steps):
        torch.manual_seed(100 + step)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_collectives_token_probs_and_the_spread_ensemble_in_a_group_that_refuses_cpu_tensors(small_data, tmp_path):
    tokens = shards.read_tokens(small_data / "val.q0t").tokens[:150]
    mp.spawn(_cuda_gloo_worker, args=(free_port(), tokens, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    single = q0.token_probs(q0.GPT(q0.GPTConfig(**TINY_CFG)), tokens, 16, 2, "cpu")
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "No backend type associated with device type cpu" in r["refused"]
        assert r["all_reduce"] == [3.0, 3.0, 3.0]
        assert r["all_gather"] == [[0.0, 0.0], [1.0, 1.0]]
        np.testing.assert_allclose(r["probs"], single, rtol=1e-6)  # each window scored once, summed
        assert r["all_to_all"] == [[float(rank)] * 2, [10.0 + rank] * 2]
        for k, got in r["ensemble"].items():  # the members spread over the group: one body per rank
            members, w = ensemble_members(k)
            teacher = q0.EnsembleTeacher([q0.SnapshotTeacher(m) for m in members], w)
            with torch.no_grad():
                want = teacher.log_probs(teacher.features(ensemble_rows(rank)).flatten(0, 1), 1.3)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        sharded, whole = r["muon"]
        assert sharded.keys() == whole.keys()
        for k in whole:  # each matrix is orthogonalised alone, on one rank or the other
            torch.testing.assert_close(sharded[k], whole[k], rtol=0, atol=0, msg=k)


# --- attention kernels ---------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_flex_attention_forward_equals_sdpa():
    """FlexAttention (the CUDA kernel, here its CPU forward) against the SDPA path within 1e-6,
    and SDPA against the convention by brute force; T = 200 is not a multiple of the block size."""
    from torch.nn.attention.flex_attention import flex_attention
    T = 200
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 16) for _ in range(3))
    i = torch.arange(T)
    distance = i[:, None] - i[None, :]
    for window in (0, 37, T - 1, 500):  # query i sees key j iff 0 <= i - j <= window
        scores = ((q @ k.mT) / 4.0).masked_fill(~((distance >= 0) & (distance <= window)), -torch.inf)
        reference = q0.sdpa_attend(q, k, v, window)
        torch.testing.assert_close(reference, torch.softmax(scores, -1) @ v, atol=1e-6, rtol=0)
        unfused = flex_attention(q, k, v, block_mask=q0._window_block_mask(T, window, "cpu"))  # eager reference
        torch.testing.assert_close(unfused, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(q0.flex_attend(q, k, v, 37), q0.sdpa_attend(q, k, v, 37), atol=1e-6, rtol=0)
    traced = torch.compile(lambda a, b, c: q0.flex_attend(a, b, c, 37), fullgraph=True)  # as inside a model
    torch.testing.assert_close(traced(q, k, v), q0.sdpa_attend(q, k, v, 37), atol=1e-6, rtol=0)


# --- compilation, precision ----------------------------------------------------------------------

def trainer_for(small_data, tmp_path, *flags):
    """A BaseTrainer of the tiny preset on the small corpus (bytes: 256 tokens), as main() builds it
    (one process), with a plain model: no looping, no MTP."""
    args = q0.parse_args(["--preset", "tiny", "--fitness-tokens", "1000", "--train-tokens", "4096",
                          "--val-tokens", "2048", "--data-dir", str(small_data), *flags])
    q0.set_kernels(attention=args.attention, autocast=args.autocast)
    cfg = q0.GPTConfig(vocab_size=256, n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head,
                       mlp_hidden=args.mlp_hidden, seq_len=args.seq_len, short_window=args.short_window,
                       dropout=args.dropout)
    return q0.BaseTrainer(cpu_run(args, tmp_path, cfg), 0)


def test_compiled_run_has_one_graph_and_no_recompiles(small_data, tmp_path, monkeypatch):
    """Graph breaks and recompiles are decided by dynamo before any backend runs, so the backend
    here is aot_eager (seconds) rather than inductor (minutes on 2 cores); the numbers from
    inductor are checked against eager below. Four cycles: the batch changes 6 -> 8 -> 6
    sequences, the first snapshot evaluates, distillation switches on at cycle 3."""
    from torch._dynamo.utils import counters
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend="aot_eager", **kw))
    torch._dynamo.reset()
    counters.clear()
    rc = q0.main(["--preset", "tiny", "--fitness-tokens", "1000", "--train-tokens", "4096", "--val-tokens", "2048",
                  "--data-dir", str(small_data), "--runs-dir", str(tmp_path), "--compile", "on", "--cycles", "4",
                  "--device-batch", "2", "--distil-from-cycle", "3", "--cycle-epochs", "0.5",
                  "--first-cycle-epochs", "0.5"])
    assert rc == 0 and len(q0_run.list_snapshots(tmp_path / "tiny-1x4-seed0")) == 4
    assert dict(counters["graph_break"]) == {}
    # two graphs of GPT.forward in all: the student's training step, and the no-grad forward shared by
    # the teacher and the snapshot evaluation (a fresh module each cycle, compiled once)
    assert counters["frames"]["total"] == 2 and counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def first_steps(trainer, steps: int, distill_from: int = 0) -> list[float]:
    """Losses of the first training steps (distilling from the weights at step `distill_from` on,
    when it is positive)."""
    cycle, out = trainer.cycles[0], []
    for i in range(steps):
        if distill_from and i == distill_from:
            trainer.set_teacher(q0.model_from_state(trainer.cfg, q0.snapshot_state(trainer.model, trainer.device),
                                                    trainer.device))
        teacher = trainer.teacher if distill_from and i >= distill_from else None
        out.append(trainer.train_step(cycle, i, teacher).item())
    return out


@pytest.mark.slow
def test_inductor_compiled_steps_match_eager(small_data, tmp_path):
    """The real backend: three steps (the third distilling), compiled by inductor against eager
    (about 100 s on 2 cores, nearly all of it compiling)."""
    torch._dynamo.reset()
    compiled = first_steps(trainer_for(small_data, tmp_path, "--compile", "on"), 3, distill_from=2)
    eager = first_steps(trainer_for(small_data, tmp_path, "--compile", "off"), 3, distill_from=2)
    torch._dynamo.reset()
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=5e-5)  # fp32: fused kernels reorder sums only


def test_bf16_autocast_on_cpu_runs_the_same_code_close_to_fp32(small_data, tmp_path):
    bf16 = first_steps(trainer_for(small_data, tmp_path, "--autocast", "bf16"), 4, distill_from=2)
    fp32 = first_steps(trainer_for(small_data, tmp_path, "--autocast", "off"), 4, distill_from=2)
    np.testing.assert_allclose(bf16, fp32, rtol=0, atol=5e-4)  # measured: at most 3.2e-4 nats per step
    assert bf16 != fp32  # autocast really ran in bf16


# --- a world of 8 in one process -----------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:divide by zero")  # hallucinated sums: other ranks' windows score 0
def test_world_of_eight_runs_main_through_the_default_layout(small_data, tmp_path, capsys, monkeypatch):
    """torch's fake process group plays one rank of 8 (its collectives hallucinate, so only the
    structure is checked: layouts, DDP over a group of 8, micro-batch split, evaluation spread over
    the group, every collective accepted). The default 5 bases land on one group of 8; 8 bases on
    8 groups of one, where rank 5 trains base 5 only."""
    from torch.nn.parallel import DistributedDataParallel
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def local_gradients(_, bucket):  # the fake group's futures carry no tensor: keep this rank's
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    class LocalGradientDDP(DistributedDataParallel):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.register_comm_hook(None, local_gradients)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", LocalGradientDDP)
    common = ["--preset", "tiny", "--fitness-tokens", "1000", "--train-tokens", "4096", "--val-tokens", "2048",
              "--data-dir", str(small_data), "--runs-dir", str(tmp_path), "--cycles", "2", "--batch-seqs", "8",
              "--device-batch", "1", "--batch-schedule", "1", "--first-cycle-epochs", "0.25", "--cycle-epochs", "0.25"]
    for rank, flags in [(0, ["--bases", "5"]), (0, ["--bases", "8"]), (5, ["--bases", "8"])]:
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
        assert q0.main(common + flags) == 0
        assert not dist.is_initialized()  # main() closed it
    out = capsys.readouterr().out
    assert "1 group(s) of 8 process(es)" in out and "8 group(s) of 1 process(es)" in out
    five = sorted(r["id"] for r in q0_run.list_snapshots(tmp_path / "tiny-5x2-seed0"))
    assert five == sorted(f"b{b}c{c}" for b in range(5) for c in (1, 2))  # the leader of the one group wrote all
    eight = sorted(r["id"] for r in q0_run.list_snapshots(tmp_path / "tiny-8x2-seed0"))
    assert eight == ["b0c1", "b0c2", "b5c1", "b5c2"]  # ranks 0 and 5 each trained their own base


# --- the preflight plan --------------------------------------------------------------------------

class CountingMode(torch.overrides.TorchFunctionMode):
    """FLOPs counted by hand at the Python level on real tensors, independently of the trace's
    dispatch-level FlopCounterMode: 2 m k n for every F.linear and matmul (those of `head` apart),
    4 B H T S D for every attention call (the dense square)."""

    def __init__(self, head: torch.Tensor):
        super().__init__()
        self.head_weight, self.matmul, self.head, self.attention = head, 0, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear:
            flops = 2 * out.numel() * args[1].shape[1]
            self.matmul += flops
            self.head += flops if args[1] is self.head_weight else 0  # GPT.logits: F.linear of head.weight
        elif func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
            self.matmul += 2 * out.numel() * args[0].shape[-1]
        elif func is torch.nn.functional.scaled_dot_product_attention:
            B, H, T, D = args[0].shape
            self.attention += 4 * B * H * T * args[1].shape[-2] * D
        return out


def direct_counts(args, batch: int):
    """Parameters, and FLOPs per token of real forwards of the model: a teacher's (evaluation) and a
    training one (with MTP). A backward costs twice a matmul's forward and 2.5 times attention's
    (FlopCounterMode's convention: the scores are recomputed); the chunked loss recomputes the head
    (student, MTP and teacher) in the backward pass. Muon: 5 Polar Express steps of X X^T, A A and
    (bA + cA A) X per matrix."""
    cfg = q0.model_config(args, 256)
    torch.manual_seed(0)
    model = q0.GPT(cfg)
    idx = torch.randint(0, 256, (batch, cfg.seq_len + 1))
    tokens = idx[:, 1:].numel()
    with CountingMode(model.head.weight) as teacher:
        model.eval()(idx[:, :-1])
    with CountingMode(model.head.weight) as train:
        model.train()(idx[:, :-1], idx[:, 1:])
    student = 3 * train.matmul + 3.5 * train.attention + train.head + teacher.head
    muon = 0
    for group in q0.build_optimizer(model, args).param_groups:
        for p in group["params"] if group["kind"] == "muon" else []:
            m, n = sorted(p.shape)
            muon += len(q0.POLAR_EXPRESS) * (4 * m * m * n + 2 * m ** 3)
    params = sum(p.numel() for p in model.parameters())
    return params, (teacher.matmul + teacher.attention) / tokens, student / tokens, muon


def test_plan_counts_match_a_direct_count():
    """The tiny preset's model: looped layers, IHA, value embeddings, MTP, sliding windows."""
    args = q0.parse_args(["--preset", "tiny", "--seq-len", "64", "--short-window", "20", "--device-batch", "2"])
    params, forward, student, muon = direct_counts(args, batch=2)
    cfg = q0.model_config(args, 256)
    traced = q0_run.trace_step(q0, cfg, args, device_batch=2, checkpoint=False, distill=True)
    assert traced["params"] == params
    assert traced["teacher_flops_per_token"] == pytest.approx(forward, rel=1e-9)
    assert traced["student_flops_per_token"] == pytest.approx(student, rel=1e-9)
    assert traced["optimizer_flops"] == pytest.approx(muon, rel=1e-9)
    plain, checkpointed = (q0_run.trace_step(q0, cfg, args, device_batch=2, checkpoint=c, distill=False)
                           for c in (False, True))
    assert traced["peak_bytes"] > plain["peak_bytes"] >= 8 * params + plain["optimizer_state_bytes"]  # + activations
    assert checkpointed["peak_bytes"] < plain["peak_bytes"]  # --checkpoint-activations recomputes each block
    assert checkpointed["student_flops_per_token"] > plain["student_flops_per_token"]  # ... at a cost


def test_checkpointing_keeps_only_block_inputs_per_sequence():
    """The traced memory a sequence adds: checkpointed blocks keep their inputs, not their attention
    and MLP activations (the trace once counted FLOPs in the same pass and lost most of the saving)."""
    args = q0.parse_args(["--preset", "tiny", "--seq-len", "512", "--short-window", "128", "--mtp-weight", "0"])
    cfg = q0.model_config(args, 256)
    per_sequence = {}
    for checkpoint in (False, True):
        peak = [q0_run.trace_step(q0, cfg, args, b, checkpoint, distill=False)["peak_bytes"] for b in (1, 2)]
        per_sequence[checkpoint] = peak[1] - peak[0]
    # what stays per sequence is the logits (vocabulary 256) and each block's input: 0.30 measured, 0.56 before
    assert per_sequence[True] < 0.4 * per_sequence[False]


def test_chunked_loss_equals_the_whole_loss_and_its_gradients():
    args = q0.parse_args(["--preset", "tiny"])
    cfg = q0.model_config(args, 256)
    torch.manual_seed(0)
    model, teacher = q0.GPT(cfg), q0.GPT(cfg).eval().requires_grad_(False)
    idx = torch.randint(0, 256, (4, cfg.seq_len + 1))
    grads = []
    for chunked in (True, False):
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout masks
        x, mtp = model(idx[:, :-1], idx[:, 1:], hidden=True)
        tx = teacher(idx[:, :-1], hidden=True)
        if chunked:  # 128 tokens in chunks of 7: the last one short
            loss = q0.chunked_distillation_loss(model, x, idx[:, 1:], q0.SnapshotTeacher(teacher), tx, 0.45, 1.2, mtp,
                                                0.3, chunk=7)
        else:
            loss = distillation_loss(model.logits(x), idx[:, 1:], teacher.logits(tx), 0.45, 1.2, mtp, 0.3)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_micro_batch_loss_is_the_whole_loss_with_the_models_mtp_weight():
    """A training step's loss of one micro-batch (B, T + 1) rows: the forward's hidden states through
    the chunked loss, with and without a teacher, MTP weighted by the model's own config."""
    args = q0.parse_args(["--preset", "tiny"])
    cfg = q0.model_config(args, 256)
    assert cfg.mtp_weight > 0
    torch.manual_seed(0)
    model, teacher = q0.GPT(cfg).eval(), q0.GPT(cfg).eval().requires_grad_(False)  # eval: no dropout
    rows = torch.randint(0, 256, (3, cfg.seq_len + 1))
    cpu = torch.device("cpu")
    for t in (None, q0.SnapshotTeacher(teacher)):
        got = q0.micro_batch_loss(model, model, t, rows, cpu, None, 0.45, 1.2)
        with torch.no_grad():
            x, mtp = model(rows[:, :-1], rows[:, 1:], hidden=True)
            teacher_logits = teacher(rows[:, :-1]) if t is not None else None
            want = distillation_loss(model.logits(x), rows[:, 1:], teacher_logits, 0.45, 1.2, mtp, cfg.mtp_weight)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        assert got.requires_grad


def test_dry_run_prints_the_plan_and_a_run_that_cannot_fit_is_refused(small_data, tmp_path):
    import subprocess
    import sys
    cmd = [sys.executable, str(REPO / "train_q0.py"), "--preset", "tiny", "--data-dir", str(small_data),
           "--fitness-tokens", "1000", "--runs-dir", str(tmp_path), "--dry-run", "--distil-from-cycle", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    params = sum(p.numel() for p in q0.GPT(q0.model_config(q0.parse_args(["--preset", "tiny"]), 256)).parameters())
    assert [line.split(":")[1].strip().split()[0] for line in lines] == [f"{params:,}", "FLOPs", "peak", "disk", "at"]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    plan = {"disk_gib": 1e9, "snapshots": 480, "snapshot_gib": 3.39}
    with pytest.raises(UsageError, match=r"needs 1000000000.0 GiB more for 480 snapshots .* GiB free"):
        q0_run.check_disk(plan, tmp_path / "runs" / "new")


def test_row_dropout_masks_follow_the_row_and_compile_with_inductor():
    """A row's mask depends on its seed and site only (not on its neighbours in the micro-batch),
    keeps 1-p of the elements, is independent across rows and sites, and inductor's code gives the
    eager masks bit for bit (its index arithmetic once overflowed on a multiplied element index)."""
    x, seeds = torch.ones(4, 64, 128), torch.tensor([1, 2, 3, 4])
    y = q0.row_dropout(x, 0.25, True, seeds, 3)
    assert torch.equal(q0.row_dropout(x[1:3], 0.25, True, seeds[1:3], 3), y[1:3])
    dropped = (y == 0).float()
    assert abs(dropped.mean().item() - 0.25) < 0.01 and torch.allclose(y[y != 0], torch.tensor(1 / 0.75))
    other_site = (q0.row_dropout(x, 0.25, True, seeds, 4) == 0).float()
    for a, b in ((dropped[0], dropped[1]), (dropped[0].flatten()[1:], dropped[1].flatten()[:-1]), (dropped, other_site)):
        assert abs((a * b).mean().item() - 0.25 ** 2) < 0.01  # independent: P(both dropped) = p^2
    assert torch.equal(q0.row_dropout(x, 0.25, False, seeds, 3), x)
    compiled = torch.compile(lambda t, s: q0.row_dropout(t, 0.25, True, s, 3))
    assert torch.equal(compiled(x, seeds), y)
