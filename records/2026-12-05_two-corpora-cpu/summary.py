"""The two corpora side by side, from the study's own reports (study.json in each folder here):
the allocation search with the record's model, the paper's two numbers, equal inference cost and
the student against the best baseline member. Prints markdown; writes nothing.

    python records/2026-12-05_two-corpora-cpu/summary.py
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from study import mean, signed, spread  # noqa: E402 - the report's own formatting

CORPORA = [("Shakespeare", "shakespeare"), ("Python docs", "python-docs")]


def load(folder: str) -> dict:
    return json.loads((HERE / folder / "study.json").read_text())


def allocation_table(studies: list[tuple[str, dict]]) -> list[str]:
    """Every layout tried at 8 to 64 epochs on both corpora (seed 0): q0 with its prior minus the
    recipe's layout (study.ALLOCATIONS lists it first) on the same corpus (negative: better), and q0
    at K = 1 (the prior's single heaviest snapshot)."""
    out = ["| budget | bases x first + cycles of | " + " | ".join(
        f"{name}: prior (minus the recipe's); K = 1" for name, _ in studies) + " | mean difference, prior (searched corpora) |",
           "|---|---|" + "---|" * len(studies) + "---|"]
    for b in ("8", "16", "32", "64"):
        trials = [s["allocations"].get(b) for _, s in studies]
        layouts = next(ts for ts in trials if ts)
        for i, t0 in enumerate(layouts):
            diffs = [ts[i]["prior_val"] - ts[0]["prior_val"] for ts in trials if ts]
            cells = [f"{ts[i]['prior_val']:.4f} ({signed(ts[i]['prior_val'] - ts[0]['prior_val'])}); "
                     f"{ts[i]['k_val']['1']:.4f}" if ts else "not searched" for ts in trials]
            out.append(f"| {b} | {t0['bases']} x {t0['first']:g} + {t0['cycle']:g}{' (recipe)' if i == 0 else ''} | "
                       + " | ".join(cells) + f" | {signed(mean(diffs))} |")
    return out


def headline(studies: list[tuple[str, dict]]) -> list[str]:
    out = ["| | " + " | ".join(name for name, _ in studies) + " |", "|---|" + "---|" * len(studies)]

    def row(label, fn):
        out.append(f"| {label} | " + " | ".join(fn(s) for _, s in studies) + " |")

    def best_baseline(s):
        m = s["best_baseline_members"]
        b = s["baseline"]["by_members"][str(m)]
        return f"{spread(b['val'])} ({m} x {s['baseline']['member_epochs']:g} = {b['epochs']:.0f} epochs)"

    def ratio(key):
        def cell(s):
            r = next(x for x in s["ratios"][key] if x["members"] == s["best_baseline_members"])
            if None in r["ratio"]:
                return "not reached by " + ", ".join(f"seed {sd}" for sd, x in zip(s["seeds"], r["ratio"]) if x is None)
            return f"{spread(r['q0_epochs'], 1)} epochs, **{spread(r['ratio'], 2, 'x')}**"
        return cell

    def single(s):
        pts = s["single"]
        best = min(pts.values(), key=lambda p: mean(p["fitness"]))
        last = max(pts.values(), key=lambda p: p["epochs"])
        return f"{spread(best['val'])} at {best['epochs']:g}; {spread(last['val'])} at {last['epochs']:g}"

    def at(budget, fn):
        return lambda s: fn(next(r for r in s["table"] if r["budget"] == budget), s)

    row("single model: best (E*), then its longest schedule", single)
    row("ensemble baseline's best", best_baseline)
    row("q0 to reach it, learned prior", ratio("q0_prior"))
    row("q0 to reach it, K = baseline members", ratio("q0_k_match"))
    for b in (16, 32, 64):
        row(f"equal inference cost at {b} epochs (q0 - baseline)",
            at(b, lambda r, s: f"{signed(mean(r['equal_cost']))} ({', '.join(signed(d) for d in r['equal_cost'])}; "
                               f"K={r['baseline_members']})"))
    row("q0 at 64 epochs, learned prior (forward passes)",
        at(64, lambda r, s: f"{spread(r['q0_prior'])} ({'/'.join(map(str, r['q0_prior_forward_passes']))})"))
    row("student at 64, 1 forward pass (epochs incl. its own)",
        lambda s: next((f"{spread(p['student'])} ({mean(p['student_epochs']):.0f})" for p in s["one_pass"]), "-"))
    row("best baseline member, 1 forward pass",
        lambda s: next((f"{spread(p['best_member'])} ({s['baseline']['member_epochs']:g} epochs)"
                        for p in s["one_pass"]), "-"))
    return out


def main():
    studies = [(name, load(folder)) for name, folder in CORPORA if (HERE / folder / "study.json").is_file()]
    print("\n".join(["## The paper's numbers at this scale", ""] + headline(studies) +
                    ["", "## The allocation search (seed 0)", ""] + allocation_table(studies)))


if __name__ == "__main__":
    main()
