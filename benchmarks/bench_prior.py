"""Time fit_prior's solver on a synthetic population (default 1,000 snapshots x 132K tokens).

    python benchmarks/bench_prior.py [--snapshots 1000] [--tokens 132000] [--bases 5]

Probabilities are made to look like a q0 population: per-token difficulty shared by everyone,
per-snapshot quality, and noise correlated along each base's chain of snapshots (consecutive
snapshots of a base are near-duplicates, which is what makes mixture fits slow for plain EM).
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fit_prior  # noqa: E402
from data.shards import ArgumentParser, command  # noqa: E402


def synthetic_probs(snapshots: int, tokens: int, bases: int = 5, seed: int = 0) -> np.ndarray:
    """(snapshots, tokens) float16 p(true token), rows in arrival order (cycle, base)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(-2.5, 2.5, tokens).astype(np.float32)
    noise = np.zeros((bases, tokens), np.float32)
    out = np.empty((snapshots, tokens), np.float16)
    for i in range(snapshots):
        b, c = i % bases, i // bases
        noise[b] = 0.8 * noise[b] + 0.6 * rng.standard_normal(tokens, dtype=np.float32)
        quality = 0.4 * np.log1p(c) - 0.1 * b
        logit = difficulty + quality + noise[b]
        out[i] = np.maximum(1 / (1 + np.exp(-logit)), 2.0 ** -24)
    return out


@command
def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--snapshots", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=132_000)
    ap.add_argument("--bases", type=int, default=5)
    ap.add_argument("--adamw", action="store_true", help="also time the public AdamW solver")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    probs = synthetic_probs(args.snapshots, args.tokens, args.bases)
    t1 = time.perf_counter()
    P = torch.empty(probs.shape, dtype=torch.float32)
    for i, row in enumerate(probs):  # as fit_prior streams files: one fp16 row at a time
        P[i] = torch.from_numpy(row)
    t2 = time.perf_counter()
    res = fit_prior.fit(P)
    nz = int((res.w > 1e-4).sum())
    print(f"{args.snapshots} snapshots x {args.tokens} tokens (float32 matrix {P.numel() * 4 / 2**20:.0f} MiB, "
          f"{torch.get_num_threads()} threads): generate {t1 - t0:.1f} s, fp16->fp32 {t2 - t1:.2f} s")
    print(f"newton (default solver): {res.seconds:.2f} s, {res.steps} steps, loss {res.loss:.6f}, "
          f"certified gap {res.gap:.1e} nats/token, {nz} weights > 1e-4")
    if args.adamw:
        a = fit_prior.fit(P, "adamw")
        print(f"adamw: {a.seconds:.2f} s, {a.steps} steps, loss {a.loss:.6f}, gap bound {a.gap:.1e}")


if __name__ == "__main__":
    sys.exit(main())
