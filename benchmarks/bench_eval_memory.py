"""Host memory of `eval.py --forward` on a large validation set, against the number of weightings.

    python benchmarks/bench_eval_memory.py [--val-tokens 1000000] [--cycles 4] [--old-repo PATH]

Builds a data folder whose validation split is --val-tokens bytes of Shakespeare (the plays after
the first 200K bytes; of those, the first 2,000 are the fitness set), trains a tiny-preset
population of --cycles snapshots on it, fits its prior and runs `eval.py --forward`, reporting the peak resident memory (ru_maxrss) of the eval
process, the number of weightings it scored and the loss it printed. --old-repo: a checkout of an
earlier q0 whose eval.py kept a float64 running sum per weighting per validation token, run on
the same population side by side (its results must equal ours). The folder (--work, default a
temporary one) is reused by a rerun.
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.shards import ArgumentParser, UsageError, command, load_split, write_shard  # noqa: E402


def build_data(folder: Path, val_tokens: int):
    source = load_split(ROOT / "data/shakespeare/bytes", "train")
    if (folder / "val.q0t").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    tokens, bos = source.tokens, source.bos_id
    cut = 200_000
    val = np.concatenate([[bos], tokens[cut:cut + val_tokens - 1]])
    if val.size < val_tokens:
        raise UsageError(f"the plays hold {tokens.size - cut:,} bytes after the training part; lower --val-tokens")
    fields = dict(vocab_size=source.vocab_size, bos_id=bos, tokenizer=source.tokenizer,
                  token_bytes=source.token_bytes, command="python " + " ".join(sys.argv))
    train = np.concatenate([tokens[:2000], [bos], tokens[2000:cut]])  # a 2,000-byte first document: the fitness set
    write_shard(folder / "train.q0t", train, **fields)
    write_shard(folder / "val.q0t", val, **fields)


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        raise UsageError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return r


def eval_rss(repo: Path, run_dir: Path, out: Path) -> tuple[float, dict]:
    """Peak RSS (MiB) of one eval.py --forward process, measured by a fresh parent."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    out.unlink(missing_ok=True)
    out.with_suffix(".md").unlink(missing_ok=True)
    r = run([sys.executable, "-c", probe, sys.executable, str(repo / "eval.py"), str(run_dir), "--forward",
             "--prior", str(run_dir / "prior.json"), "--out", str(out)], repo)
    return int(r.stdout.strip().splitlines()[-1]) / 1024, json.loads(out.read_text())


def weightings(run_dir: Path) -> int:
    """What eval.py scores by default: the uniform ensemble, the prior's weightings, the curve's."""
    import eval as ev
    import q0_run
    pop, _ = ev.split_students(q0_run.load_population([str(run_dir)]))
    _, prior_weightings = ev.load_prior(run_dir / "prior.json", pop, None)
    return 1 + len(prior_weightings) + len(ev.curve_weightings(pop, ev.curve_points(len(pop), 64)))


@command
def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--val-tokens", type=int, default=1_000_000)
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--old-repo", type=Path, help="an earlier q0 checkout to compare with")
    ap.add_argument("--work", type=Path, help="where data and runs go (default: a temporary folder)")
    a = ap.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="q0-eval-memory-"))
    data = work / "data"
    build_data(data, a.val_tokens)
    run_dir = work / "runs" / "pop"
    if not (run_dir / "manifest.json").exists():
        run([sys.executable, str(ROOT / "train_q0.py"), "--preset", "tiny", "--data-dir", str(data), "--runs-dir",
             str(work / "runs"), "--run-name", "pop", "--cycles", str(a.cycles), "--fitness-tokens", "1000",
             "--train-tokens", "4096", "--val-tokens", "0"], ROOT)
    if not (run_dir / "prior.json").exists():
        run([sys.executable, str(ROOT / "fit_prior.py"), str(run_dir)], ROOT)
    rows = [("this checkout", ROOT)] + ([("--old-repo", a.old_repo.resolve())] if a.old_repo else [])
    print(f"{a.val_tokens:,} validation tokens, {a.cycles} snapshots (tiny preset)\n")
    print("| eval.py | weightings | peak RSS | uniform loss | prior loss (largest K) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, repo in rows:
        rss, res = eval_rss(repo, run_dir, work / f"eval-{name.strip('-').replace(' ', '-')}.json")
        prior = res["prior"]["budgets"][-1]
        print(f"| {name} | {weightings(run_dir)} | {rss:,.0f} MiB | {res['uniform']['loss']:.6f} | "
              f"{prior['refitted']['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
