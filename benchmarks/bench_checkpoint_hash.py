"""Time the SHA-256 a checkpoint carries of its own content (q0_run.state_sha256) on a synthetic
state, on 1 thread and on several, beside hashlib's SHA-256 of the same bytes in one piece, and
what that costs a checkpoint of the 1.8B record (its state is about 28 GB: fp32 weights, Muon and
AdamW state), once when it is written and once when a resume reads it.

    python benchmarks/bench_checkpoint_hash.py [--gib 1] [--threads 1,2] [--state-gb 28]

Tensors are host tensors here; a CUDA state is copied to the host a 64 MiB chunk at a time.
"""
import hashlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import q0_run  # noqa: E402
from data.shards import ArgumentParser, command  # noqa: E402


def synthetic_state(gib: float) -> dict:
    """A checkpoint-shaped dict of about `gib` GiB: matrices of width 2048 in the model and twice
    that in the optimiser (a momentum buffer and a second moment per matrix)."""
    n = max(1, round(gib * (1 << 30) / (3 * 2048 * 2048 * 4)))
    gen = torch.Generator().manual_seed(0)
    model = {f"blocks.{i}.w": torch.randn(2048, 2048, generator=gen) for i in range(n)}
    opt = {i: {"momentum": torch.randn(2048, 2048, generator=gen), "second": torch.randn(2048, 2048, generator=gen)}
           for i in range(n)}
    groups = [{"lr": 0.01, "params": list(range(n))}]
    return {"step": 1, "model": model, "optimizer": {"state": opt, "param_groups": groups}}


@command
def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=1.0, help="size of the synthetic state")
    ap.add_argument("--threads", default="1,2", help="thread counts to time, comma-separated")
    ap.add_argument("--state-gb", type=float, default=28.0, help="the state to extrapolate to (GB)")
    args = ap.parse_args(argv)
    state = synthetic_state(args.gib)
    total = sum(t.numel() * t.element_size() for t in [*state["model"].values()]
                + [v for s in state["optimizer"]["state"].values() for v in s.values()])
    print(f"state: {total / 1e9:.2f} GB in {len(state['model']) * 3} tensors")
    flat = torch.cat([t.reshape(-1) for t in state["model"].values()]).view(torch.uint8).numpy()
    t0 = time.perf_counter()
    hashlib.sha256(flat).digest()
    dt = time.perf_counter() - t0
    print(f"hashlib sha256, one piece of {flat.nbytes / 1e9:.2f} GB: {flat.nbytes / dt / 1e6:,.0f} MB/s")
    for threads in (int(x) for x in args.threads.split(",")):
        t0 = time.perf_counter()
        q0_run.state_sha256(state, threads=threads)
        dt = time.perf_counter() - t0
        rate = total / dt
        print(f"state_sha256, {threads} thread(s): {rate / 1e6:,.0f} MB/s; a {args.state_gb:g} GB checkpoint: "
              f"{args.state_gb * 1e9 / rate:.1f} s to write, the same again to resume")


if __name__ == "__main__":
    sys.exit(main())
