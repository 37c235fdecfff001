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
        result["batch_variant"] = sharded_ensemble(rank, 3, sub, BatchVariantTeacher)
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


class BatchVariantTeacher(q0.SnapshotTeacher):
    """A body whose rounding depends on the batch it runs, as a BLAS's blocking may on some CPUs (a
    two-process student once scored 4e-4 off the one-process one there): features carry the batch."""

    def features(self, idx: torch.Tensor) -> torch.Tensor:
        return super().features(idx) + 1e-3 * idx.size(0)


def sharded_ensemble(rank: int, k: int, group, body=q0.SnapshotTeacher) -> torch.Tensor:
    """The ensemble teacher's log-probabilities of this rank's rows, member i's body on rank i mod 2."""
    members, w = ensemble_members(k)
    held = [body(m) if i % 2 == rank else q0.MemberHead(m.head.weight, m.cfg)
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
        # each body runs each rank's rows in that rank's batch: a batch-dependent kernel agrees too
        members, w = ensemble_members(3)
        teacher = q0.EnsembleTeacher([BatchVariantTeacher(m) for m in members], w)
        with torch.no_grad():
            want = teacher.log_probs(teacher.features(ensemble_rows(rank)).flatten(0, 1), 1.3)
        torch.testing.assert_close(r["batch_variant"], want, rtol=0, atol=1e-6)
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
    progress = ("plan: tracing ", "plan: traced ", "plan: ... still tracing ")
    lines = [line for line in result.stdout.splitlines() if not line.startswith(progress)]
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


# --- attention on CUDA, proven on a CPU: fake CUDA tensors and FlexAttention's backward ----------

# FakeTensorMode gives tensors on "cuda" (shapes and dtypes, no memory) that dispatch as CUDA ones,
# CUDA autocast included, but a CPU-only torch stops them at the first x[...] (the indexing code
# asks for a CUDA device guard) and at the first backward (the autograd engine asks the CUDA hooks
# for the current stream). This library supplies both, do-nothing; torch looks its CUDA hooks up
# once, so it is loaded before torch, in an interpreter of its own (fake_cuda below).
FAKE_CUDA_CPP = r"""
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>
namespace at::fake_cuda {
struct CUDAHooks : CUDAHooksInterface {  // the name getCUDAHooks() looks up
  CUDAHooks(CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(DeviceIndex) const override { return true; }
  DeviceIndex deviceCount() const override { return 1; }
  DeviceIndex getCurrentDevice() const override { return 0; }
  DeviceIndex current_device() const override { return 0; }
  int getNumGPUs() const override { return 1; }
};
REGISTER_CUDA_HOOKS(CUDAHooks);
}  // namespace at::fake_cuda
namespace {
c10::impl::FakeGuardImpl<c10::DeviceType::CUDA> guard;
c10::impl::DeviceGuardImplRegistrar registrar(c10::DeviceType::CUDA, &guard);
}  // namespace
"""


@pytest.fixture(scope="session")
def fake_cuda(tmp_path_factory):
    """fake_cuda(name): the JSON result of this module's function `name`, called in a fresh interpreter
    with the library above loaded (compiled once, about 2 s). Skipped where torch was built with a
    GPU backend (its own hooks are there) or no C++ compiler is found."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    cxx = shutil.which("g++") or shutil.which("c++")
    if torch.version.cuda or torch.version.hip or not cxx:
        pytest.skip("fake CUDA is built for a CPU-only torch with a C++ compiler")
    folder, torch_dir = tmp_path_factory.mktemp("fake_cuda"), Path(torch.__file__).parent
    (folder / "fake_cuda.cpp").write_text(FAKE_CUDA_CPP)
    so = folder / "fake_cuda.so"
    subprocess.run([cxx, "-shared", "-fPIC", "-std=c++17", "-w", f"-I{torch_dir / 'include'}", str(folder / "fake_cuda.cpp"),
                    f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-o", str(so)],
                   check=True, capture_output=True)

    def call(name: str):
        code = (f"import ctypes, json, sys; ctypes.CDLL({str(so)!r}); sys.path.insert(0, {str(REPO / 'tests')!r}); "
                f"import test_gpu_path as t; t._pretend_cuda(); print(json.dumps(t.{name}()))")
        result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(result.stdout.splitlines()[-1])
    return call


def _pretend_cuda():
    """(fake CUDA) torch.autocast("cuda") asks for a real device and bf16 support before it turns on."""
    import torch.cuda.amp.common
    torch.cuda.amp.common.amp_definitely_not_available = lambda: False
    torch.cuda.is_bf16_supported = lambda *args, **kwargs: True


def attention_dtypes(device: torch.device) -> list[list[str]]:
    """The dtypes of q, k, v reaching attend() in a training forward of the tiny preset's model
    (every layer, the looped ones and MTP's), under the training code's autocast for `device`."""
    from contextlib import nullcontext

    from torch._subclasses.fake_tensor import FakeTensorMode
    seen = []

    def spy(q, k, v, window):
        seen.append([str(t.dtype) for t in (q, k, v)])
        return v.clone()  # of the output's shape; fake CUDA has no kernels to run
    real, q0.attend = q0.attend, spy
    try:
        cfg = q0.model_config(q0.parse_args(["--preset", "tiny"]), 256)
        with FakeTensorMode() if device.type == "cuda" else nullcontext(), device:
            torch.manual_seed(0)
            model = q0.GPT(cfg)
            idx = torch.randint(0, 256, (2, cfg.seq_len + 1))
            with q0.autocast_for(device):
                model(idx[:, :-1], idx[:, 1:])
    finally:
        q0.attend = real
    return seen


def _fake_cuda_attention_dtypes():
    return attention_dtypes(torch.device("cuda"))


def test_attention_gets_one_dtype_under_cuda_autocast(fake_cuda, monkeypatch):
    """CUDA autocast runs rms_norm (the QK norm) in fp32 beside a bf16 v; SDPA would cast them
    itself, FlexAttention takes them as they come. The CPU's bf16 autocast keeps all three bf16,
    so only fake CUDA tensors show the mix; fp32 stays fp32."""
    bf16, fp32 = ["torch.bfloat16"] * 3, ["torch.float32"] * 3
    seen = fake_cuda("_fake_cuda_attention_dtypes")
    assert len(seen) >= 2 and all(d == bf16 for d in seen), f"dtypes of q, k, v reaching attention: {seen}"
    monkeypatch.setitem(q0.KERNELS, "autocast", "bf16")
    assert all(d == bf16 for d in attention_dtypes(torch.device("cpu")))
    monkeypatch.setitem(q0.KERNELS, "autocast", "off")
    assert all(d == fp32 for d in attention_dtypes(torch.device("cpu")))


@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_flex_attention_gradients_equal_sdpas_on_a_cpu(monkeypatch):
    """torch 2.13 refuses FlexAttention's backward on a CPU in one Python check (_validate_device)
    before its autograd runs; past it, the higher-order op's own backward runs (dense, from the
    mask function; the fused CUDA kernel reads the block mask instead, see the fake CUDA trace and
    check_flex_attention). Eager and as traced in a compiled model (aot_eager: inductor has no CPU
    lowering of the backward), dq, dk, dv against SDPA's masked gradients in fp32."""
    import torch.nn.attention.flex_attention as fa
    from torch.nn.attention.flex_attention import flex_attention
    monkeypatch.setattr(fa, "_validate_device", lambda *args: None)
    T = 200  # not a multiple of the block size
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(2, 3, T, 16) for _ in range(4))
    torch._dynamo.reset()
    traced = torch.compile(q0.flex_attend, backend="aot_eager", fullgraph=True)
    for window in (37, T - 1):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(q0.sdpa_attend(*inputs, window), inputs, dout)
        for flex in (lambda a, b, c: flex_attention(a, b, c, block_mask=q0._window_block_mask(T, window, "cpu")),
                     lambda a, b, c: traced(a, b, c, window)):
            got = torch.autograd.grad(flex(*inputs), inputs, dout)
            for name, g, w in zip("qkv", got, want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=lambda m: f"d{name}, window {window}: {m}")
    torch._dynamo.reset()


def _fake_cuda_flex_graphs() -> dict:
    """(fake CUDA) The forward and backward graphs AOTAutograd makes, as torch.compile does on a
    GPU: of flex_attend on bf16 q, k, v in a window, and of the tiny preset's last attention layer
    (plain causal) under the training code's CUDA autocast. For each, every FlexAttention
    node's tensors (dtype, shape) and the gradients autograd hands back."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = {torch.ops.higher_order.flex_attention: "fw", torch.ops.higher_order.flex_attention_backward: "bw"}
    cuda, found = torch.device("cuda"), []

    def described(values) -> list:
        return [[str(t.dtype), list(t.shape)] for t in values if isinstance(t, torch.Tensor)]

    def record(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.target in ops:
                args = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in n.args[:7]]
                found.append({"op": ops[n.target], "in": described(args), "out": described(n.meta["val"][:3])})
        return make_boxed_func(gm.forward)

    def traced(fn, inputs: list) -> dict:
        found.clear()
        torch._dynamo.reset()
        out = torch.compile(fn, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=True)(*inputs)
        grads = torch.autograd.grad(out.float().square().sum(), inputs)
        return {"nodes": list(found), "grads": [[str(g.dtype), list(g.shape), str(g.device)] for g in grads],
                "inputs": [[str(t.dtype), list(t.shape), str(t.device)] for t in inputs]}

    result = {}
    cfg = q0.model_config(q0.parse_args(["--preset", "tiny"]), 256)
    with FakeTensorMode(), cuda:
        q, k, v = (torch.randn(2, 3, 200, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        result["flex_attend, window 37"] = traced(lambda a, b, c: q0.flex_attend(a, b, c, 37), [q, k, v])
        layer = q0.CausalSelfAttention(cfg, cfg.n_layer - 1)  # the long (plain causal) layer, a value embedding
        assert layer.window >= cfg.seq_len - 1 and layer.value_embed is not None
        rope = [t.to(cuda) for t in q0.rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_head)]
        x, x0 = (torch.randn(2, cfg.seq_len, cfg.d_model) for _ in range(2))
        with q0.autocast_for(cuda):
            result["attention layer"] = traced(lambda *weights: layer(x, x0, rope), list(layer.parameters()))
    return result


def test_flex_attention_forward_and_backward_trace_on_fake_cuda(fake_cuda):
    """FlexAttention's backward on CUDA as far as a CPU can follow it: the compiled graphs of the
    forward and the backward hold FlexAttention's forward and backward ops, every tensor between
    them bf16 (the log-sum-exp fp32), dq, dk, dv of q, k, v's dtype and shape, and the gradients
    reach the inputs (of an attention layer: its fp32 weights) on the device."""
    bf16 = "torch.bfloat16"
    for name, r in fake_cuda("_fake_cuda_flex_graphs").items():
        assert [n["op"] for n in r["nodes"]] == ["fw", "bw"], name
        fw, bw = r["nodes"]
        (q, k, v), (out, lse, _) = fw["in"], fw["out"]
        assert q[0] == k[0] == v[0] == out[0] == bf16 and lse == ["torch.float32", q[1][:3]], (name, fw)
        assert bw["in"] == [q, k, v, out, lse, out], (name, bw)  # q, k, v, out, log-sum-exp, grad of out
        assert bw["out"] == [q, k, v], (name, bw)                # dq, dk, dv
        assert r["grads"] == r["inputs"], name
        assert all(device == "cuda:0" for *_, device in r["grads"]), name


def test_a_flex_attention_that_fails_its_start_up_check_gives_way_to_sdpa(monkeypatch):
    """check_flex_attention runs where attention would be FlexAttention: on CUDA (auto) or asked
    for (flex). A kernel that raises, or whose numbers are off, hands attention to SDPA with one
    note; one that agrees with SDPA leaves it be. On a CPU, asking for flex is the raising case."""
    kernels = lambda attention: monkeypatch.setitem(q0.KERNELS, "attention", attention)  # noqa: E731
    for attention, device in (("auto", "cpu"), ("sdpa", "cpu"), ("sdpa", "cuda")):  # nothing to check
        kernels(attention)
        assert q0.check_flex_attention(device) is None and q0.KERNELS["attention"] == attention
    kernels("flex")  # torch's own refusal: no FlexAttention backward on a CPU
    assert q0.check_flex_attention("cpu") == (
        "attention: FlexAttention failed its start-up check against SDPA (NotImplementedError: FlexAttention "
        "does not support backward on CPU. Please set the input requires_grad to False or use another device.); "
        "using SDPA")
    assert q0.KERNELS["attention"] == "sdpa"
    kernels("flex")  # a kernel that runs, a key off
    monkeypatch.setattr(q0, "flex_attend", lambda q, k, v, window: q0.sdpa_attend(q, k, v, window - 1))
    note = q0.check_flex_attention(torch.device("cpu"), head_dim=16)
    assert note.startswith("attention: FlexAttention failed its start-up check against SDPA (output or gradients "
                           "off SDPA's by 0.")
    assert note.endswith(" of their largest value, over 0.05); using SDPA")
    assert q0.KERNELS["attention"] == "sdpa"
    kernels("flex")  # NaN is off too
    monkeypatch.setattr(q0, "flex_attend", lambda q, k, v, window: q0.sdpa_attend(q, k, v, window) * torch.nan)
    assert "(output or gradients off SDPA's by inf " in q0.check_flex_attention("cpu", 16) and q0.KERNELS["attention"] == "sdpa"
    kernels("flex")  # a kernel that agrees (bf16 against fp32)
    monkeypatch.setattr(q0, "flex_attend", q0.sdpa_attend)
    assert q0.check_flex_attention("cpu", 16) is None and q0.KERNELS["attention"] == "flex"
    kernels("auto")  # auto on CUDA checks: a failure there, without a GPU (the check's own work stood in for)
    monkeypatch.setattr(q0, "_flex_gap", lambda device, head_dim: 1 / 0)
    assert "(ZeroDivisionError: division by zero)" in q0.check_flex_attention("cuda")
    assert q0.KERNELS["attention"] == "sdpa"


def test_main_notes_the_fallback_once_on_rank_zero(capsys, monkeypatch):
    """main() checks right after setting the kernels, before the run starts (stopped there)."""
    def stop(*args):
        raise UsageError("stopped after the start-up check")
    monkeypatch.setattr(q0_run, "start", stop)
    monkeypatch.setitem(q0.KERNELS, "attention", "auto")
    monkeypatch.setattr(q0_run.PROCESS, "rank", q0_run.PROCESS.rank)  # main() sets it from RANK
    for rank, notes in (("0", 1), ("3", 0)):
        monkeypatch.setenv("RANK", rank)
        assert q0.main(["--preset", "tiny", "--attention", "flex"]) == 2 and q0.KERNELS["attention"] == "sdpa"
        err = capsys.readouterr().err
        assert sum(line.startswith("note: attention: FlexAttention failed") for line in err.splitlines()) == notes, err


@pytest.mark.slow
def test_a_run_that_asks_for_flex_on_a_cpu_trains_on_sdpa_and_says_so_once(small_data, tmp_path, capsys, monkeypatch):
    """Without the check, the first backward would stop it (a whole run: 25 to 80 s on 2 cores)."""
    monkeypatch.setitem(q0.KERNELS, "attention", "auto")  # main() sets it; restored afterwards
    rc = q0.main(["--preset", "tiny", "--fitness-tokens", "1000", "--train-tokens", "4096", "--val-tokens", "2048",
                  "--data-dir", str(small_data), "--runs-dir", str(tmp_path), "--cycles", "1", "--attention", "flex"])
    err = capsys.readouterr().err
    assert rc == 0 and q0.KERNELS["attention"] == "sdpa"
    notes = [line for line in err.splitlines() if line.startswith("note: attention: ")]
    assert len(notes) == 1 and "(NotImplementedError: FlexAttention does not support backward on CPU." in notes[0]
