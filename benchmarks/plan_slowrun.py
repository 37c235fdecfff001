"""The preflight plan of the 1.8B slowrun preset on 8 H100s, as README's table (an estimate).

    python benchmarks/plan_slowrun.py            # fake-tensor traces at full size: an hour or more on 2 cores
    python benchmarks/plan_slowrun.py 8 1c 2c    # only these memory cells (B: batch B, c: checkpointing on)

Traces one distilling micro-batch (the larger peak) at the preset's device batch first: FLOPs, and the plan of
the record population (5 bases x 96 cycles) and of --epochs 256; then the peak at device batch 1,
2, 4, 8 with and without activation checkpointing, one line per trace as it finishes. Memory is per
process (weights, DDP's gradient buckets, optimiser state, a bf16 teacher, activations); hours assume --mfu of --peak-tflops per GPU. No data is read: Slowrun's split is assumed.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import q0_run  # noqa: E402
import train_q0 as q0  # noqa: E402

SPLIT = q0_run.SLOWRUN_SPLIT
DEVICE_BATCH = q0.PRESETS["slowrun"]["device_batch"]  # the preset's: what the plans and FLOPs are traced at
HOW = dict(teacher_dtype=q0_run.held_dtype("cuda"), ddp=True)  # 8 GPUs: one or two groups, DDP in each


def target(args, gpus=8):
    fitness = args.fitness_tokens
    return q0_run.PlanTarget(gpus, "cuda", SPLIT["train"] - fitness, fitness, SPLIT["val"], assumed_data=True,
                             device_gib=q0_run.H100_GIB)


ORDER = [(1, False), (2, False), (2, True), (4, True), (8, True), (1, True), (4, False), (8, False)]


def cells(argv: list[str]) -> list[tuple[int, bool]]:
    try:
        return [(int(a.rstrip("c")), a.endswith("c")) for a in argv] or ORDER
    except ValueError:
        print("error: memory cells are a device batch with an optional c for checkpointing (e.g. 8 2c); "
              "give none for all", file=sys.stderr)
        sys.exit(2)


def main():
    order = cells(sys.argv[1:])
    base = q0.parse_args(["--dry-run"])
    cfg = q0.model_config(base, SPLIT["vocab"])
    t0 = time.time()
    first = q0_run.trace_step(q0, cfg, base, DEVICE_BATCH, False, distill=True,
                              memory=(DEVICE_BATCH, False) in order, **HOW)  # FLOPs (and a cell)
    plain = q0_run.trace_step(q0, cfg, base, DEVICE_BATCH, False, distill=False, memory=False, **HOW)
    print(f"{cfg.n_layer} layers ({cfg.encoder_layers + len(cfg.decoder_order())} block applications per token), "
          f"{first['params']:,} parameters; FLOPs per token: student (forward + backward, chunked loss) "
          f"{plain['student_flops_per_token']:.3e} ({first['student_flops_per_token']:.3e} distilling: the KL "
          f"term), teacher forward {first['teacher_flops_per_token']:.3e}; Muon "
          f"{first['optimizer_flops']:.3e} per step in all (1/8 on each GPU, sharded) ({time.time() - t0:.0f} s)\n")
    ref = q0_run.REFERENCE_MFU
    print("| population | snapshots | FLOPs per step (524,288 tokens; distilling) | snapshot disk | all files | "
          f"hours per epoch | hours at {base.mfu:.0%} MFU | hours at {ref:.0%} MFU (the reference's) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, flags in (("record", []), ("--epochs 256", ["--epochs", "256"])):
        args = q0.parse_args(["--dry-run", *flags])
        cycles = q0.plan_cycles(args, SPLIT["train"] - args.fitness_tokens)
        plan = q0_run.plan_run(q0, args, cfg, cycles, target(args), DEVICE_BATCH, traces=(first, plain))
        step = plan["step_tokens"] * (plan["student_flops_per_token"] + plan["teacher_flops_per_token"]) \
            + plan["optimizer_flops_per_step"]
        print(f"| {name}: {args.bases} bases x {args.cycles} cycles | {plan['snapshots']} | {step:.3e} | "
              f"{plan['snapshot_gib']:.2f} GiB each | {plan['disk_gib']:,.0f} GiB | {plan['hours_per_epoch']:.3f} | "
              f"{plan['hours']:,.1f} | {plan['hours'] * base.mfu / ref:,.1f} |", flush=True)
    print(f"\npeak memory per GPU of a distilling micro-batch (the larger peak) with DDP's gradient buckets and a "
          f"bf16 teacher: traced, and planned (+{q0_run.ALLOCATOR_SLACK:.0%} + {q0_run.CUDA_OUTSIDE_ALLOCATOR_GIB:g} "
          f"GiB) against an H100's {q0_run.H100_GIB} GiB:", flush=True)
    for batch, checkpoint in order:
        trace = first if (batch, checkpoint) == (DEVICE_BATCH, False) else \
            q0_run.trace_step(q0, cfg, base, batch, checkpoint, True, **HOW)
        planned = q0_run.planned_bytes(trace["peak_bytes"], "cuda") / q0_run.GIB
        print(f"| device batch {batch} | checkpointing {'on ' if checkpoint else 'off'} | traced "
              f"{trace['peak_bytes'] / q0_run.GIB:.1f} GiB | planned {planned:.1f} GiB | "
              f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
