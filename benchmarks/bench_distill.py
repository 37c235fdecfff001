"""Training throughput without a teacher, with chain distillation and with an ensemble teacher,
measured side by side.

    python data/shakespeare.py --tokenizer bytes && python benchmarks/bench_distill.py --preset cpu --ensemble 8

Runs the trainer's own step (BaseTrainer.train_step) on one model, alternating plain steps,
chain-distillation steps (teacher: a frozen snapshot of the model) and, with --ensemble K,
ensemble-distillation steps (K frozen snapshots, uniform weights: what --distil-from runs), so all
see the same machine load. Prints tokens/s of each and the ratios: the teachers' cost.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import q0_run  # noqa: E402
import train_q0 as q0  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(q0.PRESETS))
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ensemble", type=int, default=0, help="also time an ensemble teacher of K members")
    opts, rest = parser.parse_known_args()
    args = q0.parse_args(["--preset", opts.preset, *rest])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = q0_run.load_data(args)
    cfg = q0.model_config(args, data.vocab_size)
    cycles = q0.plan_cycles(args, data.train.size)
    layout = q0_run.make_layout(args, 1, 0, cycles, q0.device_batch_cap(args))
    with tempfile.TemporaryDirectory() as tmp:
        run = q0_run.Run(args, cfg, data, cycles, layout, Path(tmp), q0_run.RunLog(Path(tmp), enabled=False), device)
        trainer = q0.BaseTrainer(run, 0)
        snapshot = q0.snapshot_state(trainer.model, device)
        trainer.set_teacher(q0.model_from_state(cfg, snapshot, device))
        ensemble = q0.EnsembleTeacher([q0.SnapshotTeacher(q0.model_from_state(cfg, snapshot, device))
                                       for _ in range(opts.ensemble)], [1 / max(opts.ensemble, 1)] * opts.ensemble)
        teachers = {"plain": None, "chain": trainer.teacher}
        if opts.ensemble:
            teachers[f"ensemble K={opts.ensemble}"] = ensemble
        cycle = cycles[0]
        seconds = {k: 0.0 for k in teachers}
        for i in range(opts.warmup + opts.steps):
            for kind, teacher in teachers.items():
                t0 = time.perf_counter()
                trainer.train_step(cycle, i % cycle.steps, teacher).item()
                if i >= opts.warmup:
                    seconds[kind] += time.perf_counter() - t0
    tokens = opts.steps * cycle.batch_seqs * args.seq_len
    print(f"preset {opts.preset} on {device.type}, {sum(p.numel() for p in trainer.model.parameters()):,} parameters, "
          f"{cycle.batch_seqs} x {args.seq_len} tokens a step, {opts.steps} steps of each, interleaved")
    for kind in teachers:
        print(f"{kind:>14}: {tokens / seconds[kind]:,.0f} tokens/s | {seconds['plain'] / seconds[kind]:.3f} x plain")


if __name__ == "__main__":
    main()
