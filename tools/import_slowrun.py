"""Score the reference's snapshots into a q0 run directory, so that fit_prior.py and eval.py
read them like a population q0 trained.

    python tools/import_slowrun.py checkpoints/RUN_ID --bases 5 --cycles 96 --run-name slowrun-reference
    python fit_prior.py runs/slowrun-reference && python eval.py runs/slowrun-reference --prior runs/slowrun-reference/prior.json

The reference (Slowrun's unlimited/train.py at a200723) saves model_{i}.pt, numbering node n's
cycles n*C .. n*C + C-1: each becomes snapshot b{n}c{cycle} with its fitness and validation
probabilities. The flags after the folder are train_q0.py's: the model flags must be the ones
the snapshots were trained with (the defaults are the record's), and --bases/--cycles its layout.
Snapshots already imported are kept (a rerun resumes). The reference's parameter names live
here, not in the trainer.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python tools/import_slowrun.py`
import q0_run  # noqa: E402
import train_q0 as q0  # noqa: E402
from data.shards import UsageError  # noqa: E402

def slowrun_config(ref: dict) -> q0.GPTConfig:
    """Our GPTConfig for the reference's GPTConfig fields (plus `dupe_layers`: [start, end] or None)."""
    if ref.get("n_kv_head", ref["n_head"]) != ref["n_head"]:
        raise UsageError(f"n_kv_head {ref['n_kv_head']} != n_head {ref['n_head']}: q0's model has no grouped-query "
                         f"attention (the record does not use it)")
    d, T = ref["n_embd"], ref["sequence_len"]
    loop = ref.get("dupe_layers") or (0, 0)
    return q0.GPTConfig(vocab_size=ref["vocab_size"], n_layer=ref["n_layer"], d_model=d, n_head=ref["n_head"],
                     mlp_hidden=256 * ((8 * d // 3 + 255) // 256), seq_len=T, short_window=T // 2,
                     dropout=ref.get("dropout", 0.0), window_pattern=ref.get("window_pattern", "SSSL").upper(),
                     loop_start=loop[0], loop_end=loop[1], iha=bool(ref.get("use_iha", False)),
                     mtp_weight=float(ref.get("mtp_weight", 0.0)))


_SLOWRUN_NAMES = [  # (reference name pattern, ours) - block-level names under transformer.h.{i}.
    ("attn.c_q.weight", "attn.q.weight"), ("attn.c_k.weight", "attn.k.weight"),
    ("attn.c_v.weight", "attn.v.weight"), ("attn.c_proj.weight", "attn.proj.weight"),
    ("attn.attn_gate.weight", "attn.gate.weight"), ("attn.ve_gate.weight", "attn.value_gate.weight"),
    ("attn.q_mix", "attn.q_mix"), ("attn.k_mix", "attn.k_mix"), ("attn.v_mix", "attn.v_mix"),
    ("mlp.c_gate.weight", "mlp.gate.weight"), ("mlp.c_fc.weight", "mlp.up.weight"),
    ("mlp.c_proj.weight", "mlp.down.weight"),
]


def from_slowrun(state_dict: dict, config: dict) -> q0.GPT:
    """Our GPT holding a snapshot saved by the reference (`model_{i}.pt`), for its configuration
    given as the reference's GPTConfig fields plus `dupe_layers` ([start, end] or None)."""
    cfg = slowrun_config(config)
    cfg.check()
    model = q0.GPT(cfg)
    model.load_state_dict(slowrun_state_dict(state_dict, cfg, iha_mix_v=config.get("iha_mix_v", True)))
    return model


def slowrun_state_dict(state_dict: dict, cfg: q0.GPTConfig, iha_mix_v: bool = True) -> dict:
    """The reference's parameter names and layouts renamed to ours (fp32), checked both ways."""
    with torch.device("meta"):
        names = {n: p.shape for n, p in q0.GPT(cfg).named_parameters()}
    sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state_dict.items()}
    absent = [k for k in ("transformer.wte.weight", "lm_head.weight", "resid_lambdas", "x0_lambdas", "skip_weights")
              if k not in sd]
    if absent:
        raise UsageError(f"reference state dict lacks {absent[:4]}; give a model_{{i}}.pt the reference saved")
    ours = {"embed.weight": sd.pop("transformer.wte.weight"), "head.weight": sd.pop("lm_head.weight"),
            "resid_scale": sd.pop("resid_lambdas"), "x0_scale": sd.pop("x0_lambdas"),
            # the reference indexes skip weights by decoder position i - n/2, ours by encoder layer n-1-i
            "skip_scale": sd.pop("skip_weights").flip(0)}
    if cfg.n_layer % 2:
        raise UsageError(f"n_layer {cfg.n_layer}: the reference's U-Net needs an even layer count")
    prefixes = [(f"transformer.h.{i}.", f"blocks.{i}.") for i in range(cfg.n_layer)] + [("mtp_block.", "mtp_block.")]
    for ref_prefix, our_prefix in prefixes:
        for ref_name, our_name in _SLOWRUN_NAMES:
            if ref_prefix + ref_name in sd:
                ours[our_prefix + our_name] = sd.pop(ref_prefix + ref_name)
    for i in range(cfg.n_layer):
        if f"ve_projs.{i}.weight" in sd:
            ours[f"blocks.{i}.attn.value_embed.weight"] = sd.pop(f"ve_projs.{i}.weight")
    if "mtp_proj.weight" in sd:
        ours["mtp_proj.weight"] = sd.pop("mtp_proj.weight")
    if cfg.iha and not iha_mix_v:  # v unmixed: the identity mixes exactly that
        for name, shape in names.items():
            if name.endswith("attn.v_mix"):
                ours[name] = torch.eye(shape[0])
    unknown = sorted(sd) + sorted(set(ours) - set(names))  # left over, or renamed to a name q0's model lacks
    if unknown:
        raise UsageError(f"reference state dict has entries q0's model does not know: {unknown[:4]}; "
                         f"check the configuration given with it")
    missing = set(names) - set(ours)
    if missing:
        raise UsageError(f"reference state dict lacks {sorted(missing)[:4]}; check the configuration given with it")
    return {k: v.float() for k, v in ours.items()}


def import_snapshots(run: q0_run.Run, folder: Path):
    """Every model_{i}.pt of `folder` not yet in the run, scored as training scores a snapshot."""
    args, data, cycles, device = run.args, run.data, run.cycles, run.device
    files = sorted(folder.glob("model_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not files:
        raise UsageError(f"{folder} holds no model_{{i}}.pt; give the reference's checkpoint folder")
    for path in files:
        base, c = divmod(int(path.stem.split("_")[1]), args.cycles)
        if base >= args.bases:
            raise UsageError(f"{path}: beyond --bases {args.bases} x --cycles {args.cycles}; give the layout it was "
                             f"trained with")
        cycle, sid = cycles[c], q0_run.snapshot_id(base, c + 1)
        if (run.run_dir / "snapshots" / f"{sid}.json").exists():
            continue
        model = q0.GPT(run.cfg)
        try:
            model.load_state_dict(slowrun_state_dict(q0_run.load_weights(path), run.cfg))
        except RuntimeError as e:  # shapes: the model flags are not the ones the reference trained with
            said = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
            raise UsageError(f"{path} does not fit the model the flags describe ({said}); give the model flags "
                             f"it was trained with") from None
        state = q0.snapshot_state(model, device)
        model = q0.model_from_state(run.cfg, state, device)  # score what is saved, as training does
        fitness = q0.token_probs(model, data.fitness, args.seq_len, args.eval_batch, device)
        val = q0.token_probs(model, data.val, args.seq_len, args.eval_batch, device)
        base_epochs = cycle.pos(cycle.steps, args.seq_len) / data.train.size
        record = q0_run.snapshot_record(sid, base, c + 1, cycle.first_step + cycle.steps, base_epochs, fitness, val,
                                        data, bool(args.val_probs)) | {"imported_from": str(path)}
        q0_run.save_snapshot(run.run_dir, record, state, fitness, val if args.val_probs else None)
        run.log.line(f"[b{base}] imported {path} as {sid} | val {record['val_loss']:.4f} nats | "
                     f"fitness {record['fitness_loss']:.4f}")
        run.log.event("snapshot", **record)


@q0_run.reports_errors
def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not argv or argv[0].startswith("-"):
        raise UsageError("give the reference's checkpoint folder first: python tools/import_slowrun.py DIR [train_q0.py "
                         "flags]")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("tools/import_slowrun.py runs in one process; drop torchrun")
    args = q0.parse_args(argv[1:])
    folder = Path(argv[0])
    if not sorted(folder.glob("model_*.pt")):  # before a run folder is made for nothing
        raise UsageError(f"{folder} holds no model_{{i}}.pt; give the reference's checkpoint folder")
    q0.set_kernels(attention=args.attention, autocast=args.autocast)
    new = not (Path(args.runs_dir) / args.run_name / "run.json").exists()
    run = q0_run.start(q0, args, q0.NON_POPULATION_FLAGS)
    try:
        import_snapshots(run, folder)
    except BaseException:
        # a run this command made and nothing imported into it: removed, so that the corrected
        # command (other model flags, another layout) is not refused as a different population
        if new and not list((run.run_dir / "snapshots").glob("*.json")):
            shutil.rmtree(run.run_dir, ignore_errors=True)
        raise
    return q0_run.finish(run)


if __name__ == "__main__":
    sys.exit(main())
