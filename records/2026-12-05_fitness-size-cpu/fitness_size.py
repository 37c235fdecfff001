"""How large must the fitness set be? The prior fitted on the first N fitness targets, scored on validation.

    python records/2026-12-05_fitness-size-cpu/fitness_size.py RUN [RUN ...] --sizes 2048,4096,...

Each RUN is one population (a run of `train_q0.py` whose fitness set is at least the largest N).
`token_probs` scores a stream in windows of seq_len that each start a fresh context at a multiple
of seq_len, so the first N targets of a snapshot's fitness cache are exactly what scoring the
first N + 1 fitness tokens alone gives: the prior fitted on that prefix is the prior a run with
`--fitness-tokens N+1` fits (from the same snapshots). For every N: the validation loss of the
full prior (every snapshot, refitted), of the K = 1 choice (the best snapshot on the fitness
prefix), and the gap to the prior fitted on validation itself (a floor no held-out set reaches).
Numbers in nats per token; validation from the runs' own caches.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import fit_prior  # noqa: E402
import q0_run  # noqa: E402


def measure(run: Path, sizes: list[int]) -> dict:
    members = q0_run.load_population([run])
    fitness, val = q0_run.load_matrix(members, "fitness"), q0_run.load_matrix(members, "val")
    floor = fit_prior.fit(val).loss
    uniform = fit_prior.mixture_loss(val, np.full(len(members), 1.0 / len(members)))
    rows = []
    for n in [s for s in sizes if s <= fitness.shape[1]] + [fitness.shape[1]]:
        prefix = fitness[:, :n].contiguous()
        w = fit_prior.fit(prefix).w
        best = int(np.argmax(prefix.double().log().mean(1).numpy()))
        rows.append({"targets": n, "prior_val": fit_prior.mixture_loss(val, w),
                     "k1_val": fit_prior.mixture_loss(val[best:best + 1], np.ones(1)),
                     "k1": members[best].record["id"], "weighted": int((w > 1e-3).sum())})
    for r in rows:
        r["gap_to_floor"] = r["prior_val"] - floor
    return {"run": str(run), "members": len(members), "val_floor": floor, "val_uniform": uniform, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--sizes", default="2048,4096,8192,16384,32768,65536")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = [measure(run, sizes) for run in args.runs]
    for res in results:
        print(f"{res['run']}: {res['members']} snapshots; validation: uniform ensemble {res['val_uniform']:.4f}, "
              f"prior fitted on validation itself {res['val_floor']:.4f}")
        print("| fitness targets | prior, val | over the floor | weighted | K=1 pick | K=1, val |")
        print("|---:|---:|---:|---:|---|---:|")
        for r in res["rows"]:
            print(f"| {r['targets']:,} | {r['prior_val']:.4f} | +{r['gap_to_floor']:.4f} | {r['weighted']} | "
                  f"{r['k1']} | {r['k1_val']:.4f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
