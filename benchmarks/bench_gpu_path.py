"""The GPU path's pieces on this machine's CPU, side by side in one run.

    python data/shakespeare.py --tokenizer bytes && python benchmarks/bench_gpu_path.py

1. Training tokens/s of the tiny and cpu presets, eager against torch.compile (the trainer's own
   step, BaseTrainer.train_step; compilation is warm-up, not timed).
2. Muon: one optimiser step with the matrices stacked by shape (what train_q0 runs) against one
   matrix at a time, on the cpu preset's model and on a wider one.
3. The loss from hidden states with a GPT-2-sized head: whole logits (the tests' oracle,
   tests/conftest.py's distillation_loss) against chunked ones (chunked_distillation_loss), forward
   + backward with a teacher: time and peak memory (torch's MemTracker over real tensors).
Timings alternate between the variants so both see the same machine load.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))
import q0_run  # noqa: E402
import train_q0 as q0  # noqa: E402
from conftest import distillation_loss  # noqa: E402  (the unchunked loss: the tests' oracle)


def trainer(preset: str, compile_: str, tmp: Path):
    args = q0.parse_args(["--preset", preset, "--compile", compile_])
    data = q0_run.load_data(args)
    cfg = q0.model_config(args, data.vocab_size)
    cycles = q0.plan_cycles(args, data.train.size)
    layout = q0_run.make_layout(args, 1, 0, cycles, q0.device_batch_cap(args))
    run = q0_run.Run(args, cfg, data, cycles, layout, tmp, q0_run.RunLog(tmp, enabled=False), torch.device("cpu"))
    return q0.BaseTrainer(run, 0)


def tokens_per_second(preset: str, steps: int, warmup: int):
    with tempfile.TemporaryDirectory() as tmp:
        runs = {c: trainer(preset, c, Path(tmp)) for c in ("off", "on")}
        cycle = runs["off"].cycles[0]
        seconds = {c: 0.0 for c in runs}
        for i in range(warmup + steps):
            for c, t in runs.items():
                t0 = time.perf_counter()
                t.train_step(cycle, i % cycle.steps, None).item()
                seconds[c] += (time.perf_counter() - t0) if i >= warmup else 0.0
    tokens = steps * cycle.batch_seqs * runs["off"].args.seq_len
    eager, compiled = tokens / seconds["off"], tokens / seconds["on"]
    print(f"{preset:>5}: eager {eager:10,.0f} tokens/s | compiled {compiled:10,.0f} tokens/s | "
          f"compiled / eager {compiled / eager:.2f}")


def muon_step(model, args, per_matrix: bool) -> float:
    opt = q0.build_optimizer(model, args)
    if per_matrix:  # one group per matrix: the same rule, no stacking
        groups = []
        for g in opt.param_groups:
            groups += [dict(g, params=[p]) for p in g["params"]] if g["kind"] == "muon" else [g]
        opt = q0.MuonAdamW(groups, momentum=args.muon_momentum)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # state created
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def muon(rounds: int):
    for preset, flags in (("cpu", []), ("cpu, width 512", ["--d-model", "512", "--mlp-hidden", "1536"])):
        args = q0.parse_args(["--preset", "cpu", *flags])
        model = q0.GPT(q0.model_config(args, 256))
        matrices = sum(len(g["params"]) for g in q0.build_optimizer(model, args).param_groups if g["kind"] == "muon")
        shapes = sum(g["kind"] == "muon" for g in q0.build_optimizer(model, args).param_groups)
        t = {False: 0.0, True: 0.0}
        for _ in range(rounds):
            for per_matrix in (False, True):
                t[per_matrix] += muon_step(model, args, per_matrix)
        print(f"Muon, {preset} ({matrices} matrices in {shapes} shapes): stacked {t[False] / rounds * 1e3:8.1f} ms | "
              f"per matrix {t[True] / rounds * 1e3:8.1f} ms | per matrix / stacked {t[True] / t[False]:.2f}")


def loss_once(chunked: bool, model, teacher, x, y, tx):
    from torch.distributed._tools.mem_tracker import MemTracker
    h = x.detach().requires_grad_()
    tracker = MemTracker()
    tracker.track_external(model, teacher)
    t0 = time.perf_counter()
    with tracker:
        if chunked:
            loss = q0.chunked_distillation_loss(model, h, y, q0.SnapshotTeacher(teacher), tx, 0.45, 1.2)
        else:
            loss = distillation_loss(model.logits(h), y, teacher.logits(tx), 0.45, 1.2)
        loss.backward()
    seconds = time.perf_counter() - t0
    peak = max(s["Total"] for s in tracker.get_tracker_snapshot("peak").values())
    return seconds, peak, loss.item()


def loss(rounds: int, tokens: int):
    args = q0.parse_args(["--preset", "cpu"])
    cfg = q0.model_config(args, 50257)  # a GPT-2 vocabulary: the head dominates the loss
    torch.manual_seed(0)
    model, teacher = q0.GPT(cfg), q0.GPT(cfg).eval().requires_grad_(False)
    x, tx = torch.randn(1, tokens, cfg.d_model), torch.randn(1, tokens, cfg.d_model)
    y = torch.randint(0, cfg.vocab_size, (1, tokens))
    t, peak, values = {False: 0.0, True: 0.0}, {}, {}
    for _ in range(rounds):
        for chunked in (False, True):
            s, peak[chunked], values[chunked] = loss_once(chunked, model, teacher, x, y, tx)
            t[chunked] += s
    print(f"loss of {tokens:,} tokens x {cfg.padded_vocab:,} vocabulary with a teacher (chunks of "
          f"{q0.LOSS_CHUNK_TOKENS:,}): whole {t[False] / rounds:.2f} s, peak {peak[False] / 2 ** 20:,.0f} MiB | "
          f"chunked {t[True] / rounds:.2f} s, peak {peak[True] / 2 ** 20:,.0f} MiB | "
          f"time chunked / whole {t[True] / t[False]:.2f}, peak chunked / whole {peak[True] / peak[False]:.2f} "
          f"| loss {values[False]:.6f} vs {values[True]:.6f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps of each kind")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--rounds", type=int, default=3, help="timed Muon steps and losses of each kind")
    ap.add_argument("--loss-tokens", type=int, default=8192,
                    help="tokens of the loss comparison (16384: the whole logits need over 20 GB of host memory)")
    ap.add_argument("--presets", default="tiny,cpu")
    opts = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for preset in opts.presets.split(","):
        tokens_per_second(preset, opts.steps, opts.warmup)
    muon(opts.rounds)
    loss(opts.rounds, opts.loss_tokens)


if __name__ == "__main__":
    main()
