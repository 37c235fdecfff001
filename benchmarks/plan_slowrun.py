"""The preflight plan of the 1.8B slowrun preset on 8 H100s, as README's table (an estimate).

    python benchmarks/plan_slowrun.py            # fake-tensor traces at full size: minutes on 2 cores

Traces one distilling micro-batch (the larger peak) at device batch 1, 2, 4, 8, with and without
activation checkpointing, and one plain micro-batch at the default batch; then the plan of the
record population (5 bases x 96 cycles) and of --epochs 256 from the same traces. Memory is per
process (weights, gradients, optimiser state, teacher, activations; DDP's gradients are bucket
views); hours assume --mfu of --peak-tflops per GPU. No data is read: Slowrun's split is assumed.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_q0 as q0  # noqa: E402

SPLIT = q0.SLOWRUN_SPLIT


def target(args, gpus=8):
    fitness = args.fitness_tokens
    return q0.PlanTarget(gpus, "cuda", SPLIT["train"] - fitness, fitness, SPLIT["val"], assumed_data=True)


def main():
    base = q0.parse_args(["--dry-run"])
    cfg = q0.model_config(base, SPLIT["vocab"])
    peaks, t0 = {}, time.time()
    for checkpoint in (False, True):
        for batch in (1, 2, 4, 8):
            trace = q0.trace_step(cfg, base, batch, checkpoint, distill=True)
            peaks[checkpoint, batch] = trace
            print(f"traced device batch {batch}, checkpointing {'on' if checkpoint else 'off'}: "
                  f"{trace['peak_bytes'] / q0.GIB:.1f} GiB ({time.time() - t0:.0f} s)", flush=True)
    plain = {c: q0.trace_step(cfg, base, base.device_batch, c, distill=False) for c in (False, True)}
    print(f"\n{cfg.n_layer} layers (applications per token: {cfg.encoder_layers + len(cfg.decoder_order())}), "
          f"{peaks[False, 1]['params']:,} parameters; FLOPs per token: student (forward + backward, chunked "
          f"loss) {peaks[False, 1]['student_flops_per_token']:.3e}, teacher forward "
          f"{peaks[False, 1]['teacher_flops_per_token']:.3e}; Muon {peaks[False, 1]['optimizer_flops']:.3e} "
          f"per step in all (1/8 on each GPU, sharded)")
    print(f"default --device-batch {base.device_batch}: plain step peak {plain[False]['peak_bytes'] / q0.GIB:.1f} GiB "
          f"without checkpointing, {plain[True]['peak_bytes'] / q0.GIB:.1f} GiB with\n")
    print("| device batch | peak per GPU, distilling, no checkpointing | with --checkpoint-activations |")
    print("| ---: | ---: | ---: |")
    for batch in (1, 2, 4, 8):
        print(f"| {batch} | {peaks[False, batch]['peak_bytes'] / q0.GIB:.1f} GiB | "
              f"{peaks[True, batch]['peak_bytes'] / q0.GIB:.1f} GiB |")
    print("\n| population | snapshots | FLOPs per step (524,288 tokens; distilling) | snapshot disk | all files | "
          f"hours per epoch | hours at {base.mfu:.0%} MFU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, flags in (("record: 5 bases x 96 cycles", []), ("--epochs 256", ["--epochs", "256"])):
        args = q0.parse_args(["--dry-run", *flags])
        cycles = q0.plan_cycles(args, SPLIT["train"] - args.fitness_tokens)
        tr = (peaks[False, args.device_batch], plain[False])
        plan = q0.plan_run(args, cfg, cycles, target(args), traces=tr)
        step = plan["step_tokens"] * (plan["student_flops_per_token"] + plan["teacher_flops_per_token"]) \
            + plan["optimizer_flops_per_step"]
        print(f"| {name} ({args.bases} x {args.cycles}) | {plan['snapshots']} | {step:.3e} | "
              f"{plan['snapshot_gib']:.2f} GiB each | {plan['disk_gib']:,.0f} GiB | {plan['hours_per_epoch']:.3f} | "
              f"{plan['hours']:,.1f} |")


if __name__ == "__main__":
    main()
