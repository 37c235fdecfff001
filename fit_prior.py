"""q0's learned prior: one weight vector over every snapshot, fitted on the held-out fitness set.

    python fit_prior.py runs/q0 [runs/q0-node1 ...] [--budgets 1,2,4] [--out PATH] [--solver em]

Minimises f(w) = mean_t -log(sum_i w_i p_i(y_t)) over the simplex, where p_i(y_t) is snapshot
i's cached probability of the true next fitness token. Then, for each inference budget K, keeps
the K largest weights, renormalised (the published rule), and also refits weights on those K
alone. Writes prior.json (never overwriting a file) and prints a table.

Every solver but adamw stops on a certificate, not a step count. With g_i = mean_t p_i / mix_t,
for any v on the simplex, by Jensen, f(w) - f(v) = mean_t log(Pv/Pw) <= log mean_t(Pv/Pw)
= log sum_i v_i g_i <= log max_i g_i. So log max_i g_i (computed in float64) bounds the distance
to the optimum in nats per token; it is the KKT condition max_i g_i <= 1 read as a number.
Default: active-set Newton (fast: 1,000 snapshots x 132K tokens in about 1.5 s on 2 cores).
--solver em: EM, w_i <- w_i g_i, accelerated by SQUAREM (Varadhan & Roland 2008); slower.
--solver adamw: the public code (AdamW lr 0.5, 300 steps); its gap is reported, not bounded.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import q0_run
from data.shards import CHOICE, PATH, TEXT, ArgumentParser, command, parse_checked
from q0_run import Member, load_matrix, load_population, parse_budgets

TOL = 1e-6               # nats per token: the certified distance to the optimum
FP32_MARGIN = 1e-4             # g_i above 1 + this in an fp32 pass: surely wanted
CHUNK_ELEMS = 1 << 24    # float64 verification passes convert this many fp32 entries at a time
MAX_EM_STEPS = 20000  # a safety net; a stop here is reported, not hidden
ADAMW_LR, ADAMW_STEPS = 0.5, 300  # the public code's solver
PRIOR_VERSION = 2      # prior.json's format (read by eval.py --prior and train_q0.py --distil-from); 2: sealed


# ---------------------------------------------------------------------------------------------
# The population (q0_run.load_population: every snapshot of the runs, checked to be comparable)
# ---------------------------------------------------------------------------------------------

def unfinished_runs(members: list[Member]) -> list[str]:
    """A note per run that has fewer snapshots than its layout plans (still training, or stopped):
    the prior records exactly which snapshots it saw, and eval.py names the ones it missed."""
    return q0_run.unfinished_notes(members, "this prior", "refit")


# ---------------------------------------------------------------------------------------------
# The solvers: active-set Newton (the default, which eval.py's curve refits with), EM and AdamW
# ---------------------------------------------------------------------------------------------

class Mixture:
    """f and g = -grad f of the mixture loss for a probability matrix P (M, T). Iterates use the
    float32 matrix (two BLAS matrix-vector passes per EM step); exact=True redoes the same two
    passes in float64, chunk by chunk, so a certificate is not an artefact of fp32 rounding."""

    def __init__(self, P: torch.Tensor, exact: bool = False):
        self.P, self.exact = P, exact

    def restrict(self, idx) -> "Mixture":
        return self if len(idx) == len(self.P) else Mixture(self.P[torch.as_tensor(idx)], self.exact)

    def loss_grad(self, w: np.ndarray) -> tuple[float, np.ndarray]:
        P, T = self.P, self.P.shape[1]
        if not self.exact:
            mix = torch.from_numpy(w.astype(np.float32)) @ P
            g = (P @ mix.reciprocal()).double() / T
            return float(-mix.double().log().mean()), g.numpy()
        rows = max(1, CHUNK_ELEMS // T)
        nz = np.flatnonzero(w)  # an active-set iterate has few members with weight
        mix = torch.zeros(T, dtype=torch.float64)
        for s in range(0, len(nz), rows):
            i = torch.from_numpy(nz[s:s + rows])
            mix += torch.from_numpy(w[nz[s:s + rows]]) @ P[i].double()
        r = mix.reciprocal()
        g = torch.cat([P[s:s + rows].double() @ r for s in range(0, len(P), rows)]) / T
        return float(-mix.log().mean()), g.numpy()


@dataclasses.dataclass
class Fit:
    w: np.ndarray
    loss: float
    gap: float  # certified bound on loss - optimum, nats per token
    steps: int  # EM-map evaluations (each: two passes over P)
    seconds: float


def gap_bound(g: np.ndarray) -> float:
    return max(0.0, math.log(float(g.max())))


def _restricted(PS: torch.Tensor, wS: np.ndarray):
    """Loss, g and the scaled rows A = p_i / mix on the working set, in float64."""
    mix = torch.from_numpy(wS) @ PS
    A = PS / mix
    return float(-mix.log().mean()), A.mean(1).numpy(), A


def _newton(PS: torch.Tensor, wS: np.ndarray, tol: float, max_steps: int = 100):
    """Newton's method on the simplex face spanned by the working set: the KKT system
    [H 1; 1' 0][d; l] = [g; 0] with H = A A' / T, a fraction-to-boundary step and Armijo
    backtracking. A member whose weight reaches 0 is dropped (the outer loop re-adds it if the
    full KKT check says it is wanted). Returns the kept positions, their weights, step count."""
    keep = np.arange(len(wS))
    T = PS.shape[1]
    steps = 0
    while steps < max_steps:
        Pk = PS[torch.from_numpy(keep)] if len(keep) < len(PS) else PS
        f, g, A = _restricted(Pk, wS)
        if gap_bound(g) <= tol:
            break
        steps += 1
        A32 = A.float()
        del A
        H = (A32 @ A32.T).double().numpy() / T
        n = len(keep)
        H[np.diag_indices(n)] += 1e-12 * max(1.0, np.trace(H) / n)  # duplicates make H singular
        # Members at zero that Newton would push negative leave the face; solve again without them.
        while True:
            K = np.block([[H, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
            d = np.linalg.solve(K, np.append(g, 0.0))[:n]
            out = (wS <= 0) & (d < 0)
            if not out.any():
                break
            inside = ~out
            keep, wS, g, H, n = keep[inside], wS[inside], g[inside], H[np.ix_(inside, inside)], int(inside.sum())
            Pk = Pk[torch.from_numpy(inside)]
        neg = d < 0
        tmax = float(np.min(-wS[neg] / d[neg])) if neg.any() else np.inf
        t, slope = min(1.0, tmax), -float(g @ d)  # directional derivative of f, negative
        while t > 1e-14:
            wt = np.maximum(wS + t * d, 0.0)
            ft = float(-(torch.from_numpy(wt / wt.sum()) @ Pk).log().mean())
            if ft <= f + 1e-4 * t * slope:
                break
            t /= 2
        else:
            break  # no descent left at float64 resolution: the outer check decides
        blocked = np.argmin(np.where(neg, -wS / np.where(neg, d, 1), np.inf))
        wS = np.maximum(wS + t * d, 0.0)
        if t == tmax:
            wS[blocked] = 0.0
        wS /= wS.sum()
        alive = wS > 0
        keep, wS = keep[alive], wS[alive]
    return keep, wS, steps


def fit_newton(P: torch.Tensor, tol: float = TOL, max_rounds: int = 200) -> Fit:
    """Active-set Newton (in the spirit of mix-SQP, Kim et al. 2020): Newton on a small working
    set, whose Hessian costs |S|^2 T, with one pass over all M members per round to check the
    certificate and add the members it says are wanted (g_i > 1). fp32 passes while iterating;
    the certificate that stops it is recomputed in float64."""
    t0 = time.perf_counter()
    M = len(P)
    w = np.full(M, 1.0 / M)
    exact = False
    steps = 0
    S = np.empty(0, dtype=np.int64)
    for _ in range(max_rounds):
        f, g = Mixture(P, exact).loss_grad(w)
        steps += 1
        gap = gap_bound(g)
        if exact and gap <= tol:
            break
        # fp32 sums over T tokens carry ~1e-6 relative error: good for finding members that
        # are wanted, not for certifying 1e-6. When fp32 sees nothing to add, go float64.
        wanted = np.setdiff1d(np.flatnonzero(g > (1.0 if exact else 1.0 + FP32_MARGIN)), S)
        if not len(wanted) and not exact:
            exact = True
            continue
        add = wanted[np.argsort(-g[wanted], kind="stable")[:max(16, len(S))]]
        S = np.concatenate([S, add])
        PS = P[torch.from_numpy(S)].double()
        wS = np.where(w[S] > 0, w[S], 0.0)
        if wS.sum() == 0:
            wS[:] = 1.0
        wS /= wS.sum()
        keep, wS, n = _newton(PS, wS, tol / 4)
        steps += n
        S = S[keep]
        w = np.zeros(M)
        w[S] = wS
    return Fit(w, f, gap, steps, time.perf_counter() - t0)



def _em(w, g):
    w = w * g
    return w / w.sum()


def fit_em(mix: Mixture, w0: np.ndarray, tol: float = TOL, max_steps: int = MAX_EM_STEPS) -> Fit:
    """SQUAREM-accelerated EM (scheme S3), monotone by safeguard, stopped by the certificate.
    w0 must be strictly positive: EM never revives a zero weight."""
    t0, steps = time.perf_counter(), 0

    def evaluate(w):
        nonlocal steps
        steps += 1
        f, g = mix.loss_grad(w)
        return f, g, gap_bound(g)

    w0 = np.asarray(w0, dtype=np.float64) / np.sum(w0)
    f0, g0, gap0 = evaluate(w0)
    while gap0 > tol and steps < max_steps:
        w1 = _em(w0, g0)
        f1, g1, gap1 = evaluate(w1)
        if gap1 <= tol:
            w0, f0, g0, gap0 = w1, f1, g1, gap1
            break
        w2 = _em(w1, g1)
        r, v = w1 - w0, (w2 - w1) - (w1 - w0)
        nv = np.linalg.norm(v)
        alpha = min(-1.0, -np.linalg.norm(r) / nv) if nv > 0 else -1.0
        # Extrapolate; back off toward alpha = -1 (which is exactly w2, an EM iterate and so
        # never worse than w1) while the point leaves the simplex or the loss goes up.
        for _ in range(4):
            wp = w0 - 2 * alpha * r + alpha * alpha * v
            if wp.min() > 0:
                wp /= wp.sum()
                fp, gp, gapp = evaluate(wp)
                if fp <= f1:
                    break
            alpha = (alpha - 1) / 2
        else:
            wp = w2
            fp, gp, gapp = evaluate(wp)
        w0, f0, g0, gap0 = wp, fp, gp, gapp
    return Fit(w0, f0, gap0, steps, time.perf_counter() - t0)


def fit_adamw(P: torch.Tensor, lr: float = ADAMW_LR, steps: int = ADAMW_STEPS) -> Fit:
    """The public code's solver (gradient_select.py): w = softmax(alpha), alpha from 1e-4 N(0, 1)
    (generator seed 0), AdamW without weight decay, gradient norm clipped at 1, probabilities
    floored at 1e-12, a fixed step count. Its gap is measured, not guaranteed."""
    t0 = time.perf_counter()
    P = P.float()
    noise = torch.randn(len(P), generator=torch.Generator(device=P.device).manual_seed(0), device=P.device)
    alpha = (1e-4 * noise).requires_grad_(True)
    opt = torch.optim.AdamW([alpha], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = -(torch.softmax(alpha, 0) @ P).clamp_min(1e-12).log().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([alpha], max_norm=1.0)
        opt.step()
    w = torch.softmax(alpha.detach().double(), 0).numpy()
    f, g = Mixture(P, exact=True).loss_grad(w)
    return Fit(w, f, gap_bound(g), steps, time.perf_counter() - t0)


def fit(P: torch.Tensor, solver: str = "newton") -> Fit:
    if solver == "adamw":
        return fit_adamw(P)
    if solver == "em":
        return fit_em(Mixture(P, exact=True), np.full(len(P), 1.0 / len(P)))
    return fit_newton(P)


def mixture_loss(P: torch.Tensor, w: np.ndarray) -> float:
    return Mixture(P, exact=True).loss_grad(np.asarray(w, dtype=np.float64))[0]


def top_k(w: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest weights, largest first; ties go to the earlier arrival."""
    return np.argsort(-w, kind="stable")[:k]


def budget_fit(P: torch.Tensor, w: np.ndarray, k: int, solver: str = "newton", full: Fit | None = None) -> dict:
    """Budget K: the top-K members renormalised, and the same members refitted alone (for
    K = M that refit is the full fit: pass it as `full` to skip solving again)."""
    idx = top_k(w, k)
    renorm = w[idx] / w[idx].sum()
    dense = np.zeros(len(P))
    dense[idx] = renorm
    if k < len(P):
        refit = fit(P[torch.from_numpy(idx)], solver)
    else:  # all members: fit in place (no copy of P), then read the weights in idx order
        refit = full or fit(P, solver)
        refit = dataclasses.replace(refit, w=refit.w[idx])
    return {"idx": idx, "renormalised": renorm, "refitted": refit.w,
            "loss_renormalised": mixture_loss(P, dense), "fit": refit}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def member_ref(m: Member, base: Path) -> dict:
    """How prior.json names a snapshot: run directory relative to the prior file (so the tree
    can move), snapshot id, and the weights' SHA-256 (so a retrained snapshot is caught)."""
    return {"run": os.path.relpath(m.run_dir.resolve(), base.resolve()), "id": m.record["id"],
            "weights_sha256": m.record["weights_sha256"]}


def build_prior(members, full: Fit, budgets: list[dict], solver: str, out: Path, uniform: float) -> dict:
    run = members[0].run
    base = out.parent
    return {
        **q0_run.json_header("q0-prior", PRIOR_VERSION),
        "runs": sorted({os.path.relpath(m.run_dir.resolve(), base.resolve()) for m in members}),
        "tokenizer": run.get("tokenizer"),
        "fitness": {"sha256": run["fitness"].get("sha256"), "tokens": run["fitness"].get("tokens"),
                    "targets": run["fitness"]["targets"]},
        "solver": {"name": solver, "steps": full.steps, "seconds": round(full.seconds, 4),
                   "gap_bound": full.gap, "tol": None if solver == "adamw" else TOL},
        "loss_uniform": uniform,
        "members": [member_ref(m, base) | {"weight": float(w)} for m, w in zip(members, full.w)],
        "loss": full.loss,
        "budgets": [{
            "K": len(b["idx"]),
            "members": [member_ref(members[i], base) for i in b["idx"]],
            "weights_renormalised": [float(x) for x in b["renormalised"]],
            "weights_refitted": [float(x) for x in b["refitted"]],
            "loss_renormalised": b["loss_renormalised"], "loss_refitted": b["fit"].loss,
            "refit_steps": b["fit"].steps, "refit_gap_bound": b["fit"].gap,
        } for b in budgets],
    }


def table(prior: dict, members) -> str:
    s = prior["solver"]
    lines = [
        f"fitness set: {prior['fitness']['targets']} targets, sha256 {str(prior['fitness']['sha256'])[:12]}, "
        f"tokenizer {prior['tokenizer']}; {len(members)} snapshots",
        f"solver {s['name']}: {s['steps']} steps, {s['seconds']:.2f} s, "
        f"certified within {s['gap_bound']:.1e} nats/token of the optimum"
        if s["name"] != "adamw" else
        f"solver adamw: {s['steps']} steps, {s['seconds']:.2f} s, gap bound {s['gap_bound']:.1e} nats/token",
        f"fitness loss: uniform over all {len(members)} = {prior['loss_uniform']:.4f}, prior = {prior['loss']:.4f}",
        "",
        f"{'K':>5} {'forward passes':>14} {'renormalised':>13} {'refitted':>9}  top members (renormalised weight)",
    ]
    for b in prior["budgets"]:
        top = ", ".join(f"{r['id']} {w:.3f}" for r, w in zip(b["members"][:4], b["weights_renormalised"]))
        more = f", +{b['K'] - 4}" if b["K"] > 4 else ""
        passes = sum(w > 0 for w in b["weights_renormalised"])  # members with weight: what a user runs
        lines.append(f"{b['K']:>5} {passes:>14} {b['loss_renormalised']:>13.4f} {b['loss_refitted']:>9.4f}  {top}{more}")
    return "\n".join(lines)


RANGES = {"runs": PATH, "out": PATH, "budgets": TEXT, "solver": CHOICE}


def build_parser() -> argparse.ArgumentParser:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (a population may span several)")
    ap.add_argument("--out", help="prior file to write (default: <first run>/prior.json); never overwritten")
    ap.add_argument("--budgets", help="inference budgets K, comma-separated (default 1,2,4,... and M)")
    ap.add_argument("--solver", choices=["newton", "em", "adamw"], default="newton",
                    help="newton: active-set Newton, certified (default); em: SQUAREM-accelerated EM, "
                         "certified, slower; adamw: the public code's 300 AdamW steps, gap reported")
    return ap


def fit_population(args, out: Path) -> tuple[dict, list[Member]]:
    """The prior of the runs' population: every snapshot's fitness cache, the full fit, each budget."""
    members = load_population(args.runs)
    for note in unfinished_runs(members):
        print(note)
    ks = parse_budgets(args.budgets, len(members))
    P = load_matrix(members, "fitness")
    full = fit(P, args.solver)
    budgets = [budget_fit(P, full.w, k, args.solver, full) for k in ks]
    uniform = mixture_loss(P, np.full(len(P), 1.0 / len(P)))
    return build_prior(members, full, budgets, args.solver, out, uniform), members


@command
def main(argv=None):
    args = parse_checked(build_parser(), RANGES, argv)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "prior.json"
    with q0_run.claim_output(out):  # held from before any work: nothing is computed for nothing
        prior, members = fit_population(args, out)
        q0_run.write_output(out, q0_run.sealed_json(prior) + "\n")
    print(table(prior, members))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
