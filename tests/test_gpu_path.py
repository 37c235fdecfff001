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

from conftest import REPO  # noqa: F401  (puts the repository on sys.path)
import train_q0 as q0

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
        result["all_reduce"] = q0.all_reduce_(t).tolist()
        result["all_gather"] = [x.tolist() for x in q0.all_gather(torch.full((2,), float(rank)))]
        q0.barrier()
        sub = dist.new_group([0, 1])
        torch.manual_seed(0)
        model = q0.GPT(q0.GPTConfig(**TINY_CFG))
        result["probs"] = q0.token_probs(model, tokens, 16, 2, "cpu", sub)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_collectives_and_token_probs_in_a_group_that_refuses_cpu_tensors(small_data, tmp_path):
    tokens = q0.read_tokens(small_data / "val.q0t").tokens[:150]
    mp.spawn(_cuda_gloo_worker, args=(free_port(), tokens, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    single = q0.token_probs(q0.GPT(q0.GPTConfig(**TINY_CFG)), tokens, 16, 2, "cpu")
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "No backend type associated with device type cpu" in r["refused"]
        assert r["all_reduce"] == [3.0, 3.0, 3.0]
        assert r["all_gather"] == [[0.0, 0.0], [1.0, 1.0]]
        np.testing.assert_allclose(r["probs"], single, rtol=1e-6)  # each window scored once, summed


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
