"""This record's table, from the runs run.sh leaves: per seed, what sampling cost on the epoch
axis, the student it taught (1 forward pass) and the q0 ensemble it learned from.

    python records/2026-12-05_sampled-text-cpu/table.py --runs-dir RUNS    # after run.sh

Writes results.json and results.md beside this file; a seed whose runs are not finished is left out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
import q0_run  # noqa: E402


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def seed_row(runs: Path, seed: int) -> dict | None:
    pop, student = runs / f"q0-e64-s{seed}", runs / f"st-e64-s{seed}-sampled"
    paths = [runs / f"eval-st-e64-s{seed}-sampled.json", runs / f"data-sampled-s{seed}" / "manifest.json",
             pop / "manifest.json", student / "manifest.json"]
    if not all(p.is_file() for p in paths):
        return None
    evaluation, data, population, trained = map(read, paths)
    budgets = {b["K"]: b["refitted"] for b in evaluation["prior"]["budgets"]}
    full, last = budgets[max(budgets)], evaluation["students"][0]
    picked = min(trained["snapshots"], key=lambda r: r["fitness_loss"])  # on the held-out fitness play, as the record
    real_tokens = data["sampled"]["population_train_tokens"]
    student_tokens = last["epochs"] * trained["train"]["tokens"]
    row = {"seed": seed, "q0_val": full["loss"], "q0_forward_passes": full["forward_passes"],
           "teacher_val": budgets[8]["loss"], "population_epochs": q0_run.epochs_spent(population["snapshots"]),
           "sampling": {k: data["sampled"][k] for k in ("documents", "added_tokens", "sampled_bytes", "ended_by_bos",
                                                         "member_forward_tokens", "plain_epochs", "seconds")},
           "student_val": last["loss"], "student_snapshot": last["id"], "student_epochs": last["epochs"],
           "student_train_tokens": trained["train"]["tokens"], "student_tokens": round(student_tokens),
           "student_fitness_pick": {"id": picked["id"], "val": picked["val_loss"]}}
    row["axis"] = row["population_epochs"] + row["sampling"]["plain_epochs"] + student_tokens / real_tokens
    return row


def markdown(rows: list[dict]) -> str:
    out = ["Validation loss in nats per byte (32,768 validation bytes). Sampling: 342 documents from the prior's K=8 "
           "ensemble, each BOS + 32 real training bytes + 96 drawn at temperature 1. Epochs on the axis: the "
           "population's, sampling's cost in plain epochs, and the student's tokens in epochs of the 32,768 real "
           "ones.", "",
           "| seed | q0 ensemble, full prior (fp) | teacher: prior K=8 | sampling: member forward tokens | sampling: "
           "plain epochs (time) | student, 1 fp (its epochs) | student at or below q0 | epochs on the axis |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["sampling"]
        out.append(f"| {r['seed']} | {r['q0_val']:.4f} ({r['q0_forward_passes']}) | {r['teacher_val']:.4f} | "
                   f"{s['member_forward_tokens']:,} | {s['plain_epochs']:.2f} ({s['seconds']:.0f} s) | "
                   f"{r['student_val']:.4f} ({r['student_epochs']:.2f}) | "
                   f"{'yes' if r['student_val'] <= r['q0_val'] else 'no'} ({r['student_val'] - r['q0_val']:+.4f}) | "
                   f"{r['population_epochs']:.2f} + {s['plain_epochs']:.2f} + "
                   f"{r['student_tokens'] / 32768:.2f} = {r['axis']:.1f} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/sampled-text"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a = ap.parse_args()
    rows = [r for r in (seed_row(a.runs_dir, s) for s in a.seeds) if r is not None]
    (HERE / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = markdown(rows)
    (HERE / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
