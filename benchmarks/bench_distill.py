"""Training throughput with and without chain distillation, measured side by side.

    python data/shakespeare.py --tokenizer bytes && python benchmarks/bench_distill.py --preset tiny

Runs the trainer's own step (BaseTrainer.train_step) on one model, alternating plain steps and
distillation steps (teacher = a frozen snapshot of the model), so both see the same machine load.
Prints tokens/s of each and their ratio: the cost of the teacher's forward pass.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_q0 as q0  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(q0.PRESETS))
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=5)
    opts, rest = parser.parse_known_args()
    args = q0.parse_args(["--preset", opts.preset, *rest])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = q0.load_data(args)
    cfg = q0.model_config(args, data.vocab_size)
    cycles = q0.plan_cycles(args, data.train.size)
    layout = q0.make_layout(args, 1, 0, cycles)
    with tempfile.TemporaryDirectory() as tmp:
        log = q0.RunLog(Path(tmp), enabled=False)
        trainer = q0.BaseTrainer(args, 0, layout, data, cfg, cycles, Path(tmp), log, device)
        trainer.set_teacher(q0.model_from_state(cfg, q0.snapshot_state(trainer.model, device), device))
        cycle = cycles[0]
        seconds = {False: 0.0, True: 0.0}
        for i in range(opts.warmup + opts.steps):
            for distill in (False, True):
                t0 = time.perf_counter()
                trainer.train_step(cycle, i % cycle.steps, distill).item()
                if i >= opts.warmup:
                    seconds[distill] += time.perf_counter() - t0
    tokens = opts.steps * cycle.batch_seqs * args.seq_len
    plain, distilled = tokens / seconds[False], tokens / seconds[True]
    print(f"preset {opts.preset} on {device.type}, {sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
          f"{cycle.batch_seqs} x {args.seq_len} tokens a step, {opts.steps} steps of each, interleaved")
    print(f"without distillation: {plain:,.0f} tokens/s")
    print(f"with distillation:    {distilled:,.0f} tokens/s")
    print(f"ratio (with / without): {distilled / plain:.3f}")


if __name__ == "__main__":
    main()
