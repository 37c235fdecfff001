"""The two tokenisers q0 knows: GPT-2 BPE ("gpt2") and raw UTF-8 bytes ("bytes").

get_tokenizer(name) returns an object with .name, .vocab_size, .bos_id, .encode(text) (ordinary
text, never special tokens), .decode(ids) and .token_byte_lengths() (UTF-8 bytes per id, BOS 0;
bits per byte divides by their sum).

GPT-2's merge ranks are a 0.8 MB file that tiktoken downloads from openaipublic.blob.core.windows.net.
Many training machines reach PyPI and nothing else, so the ranks are taken, in this order, from:
our verified cache (~/.cache/q0, or $Q0_CACHE_DIR), tiktoken's own cache or its download when that
host answers, an installed `whisper` package, and finally the openai-whisper sdist on PyPI, which
ships the identical file. Every source is checked against the same SHA-256.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import tiktoken

from data.shards import UsageError

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
WHISPER_SDIST = "openai-whisper==20250625"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
# tiktoken's r50k_base split pattern, copied so the encoding does not depend on tiktoken internals.
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


class TokenizerUnavailable(UsageError):
    """The GPT-2 ranks could not be found anywhere: a UsageError, so a data command reports it as one
    `error:` line and exit code 2."""


def q0_cache_dir() -> Path:
    return Path(os.environ.get("Q0_CACHE_DIR") or Path.home() / ".cache" / "q0")


def _verified(data: bytes | None) -> bytes | None:
    return data if data is not None and hashlib.sha256(data).hexdigest() == GPT2_RANKS_SHA256 else None


def _tiktoken_cache_file() -> Path:
    # Where tiktoken.load.read_file_cached keeps the file: checked first so that a machine that once
    # had the network never needs it again.
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") \
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return Path(cache_dir) / hashlib.sha1(GPT2_RANKS_URL.encode()).hexdigest()


def _host_answers(host: str, timeout_s: float = 3.0) -> bool:
    # tiktoken's download has no timeout and can hang for minutes behind a firewall; ask first.
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def ranks_from_tiktoken() -> bytes | None:
    if not (_tiktoken_cache_file().exists() or _host_answers("openaipublic.blob.core.windows.net")):
        return None
    from tiktoken.load import read_file_cached
    return read_file_cached(GPT2_RANKS_URL, GPT2_RANKS_SHA256)


def ranks_from_installed_whisper() -> bytes | None:
    spec = importlib.util.find_spec("whisper")  # locates the package without importing it (and torch)
    if spec is None or spec.origin is None:
        return None
    asset = Path(spec.origin).parent / "assets" / "gpt2.tiktoken"
    return asset.read_bytes() if asset.exists() else None


def ranks_from_pypi_sdist() -> bytes | None:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                               "--no-binary", ":all:", WHISPER_SDIST, "-d", tmp],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"pip download {WHISPER_SDIST} failed: {done.stderr.strip().splitlines()[-1:]}")
        (sdist,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                if member.name.endswith("/" + WHISPER_MEMBER):
                    return archive.extractfile(member).read()
    return None


RANK_SOURCES = (("tiktoken", ranks_from_tiktoken),
                ("an installed whisper package", ranks_from_installed_whisper),
                (f"the {WHISPER_SDIST} sdist on PyPI", ranks_from_pypi_sdist))


def load_gpt2_ranks(cache_dir: Path | None = None, sources=RANK_SOURCES) -> bytes:
    """The r50k_base ranks file, verified; the first source that delivers it fills our cache."""
    cache_file = (cache_dir or q0_cache_dir()) / "gpt2.tiktoken"
    if cache_file.exists() and _verified(cache_file.read_bytes()):
        return cache_file.read_bytes()
    failures = []
    for description, source in sources:
        try:
            data = source()
        except Exception as error:  # noqa: BLE001 - a failing source only means: try the next one
            failures.append(f"{description}: {type(error).__name__}: {error}")
            continue
        if _verified(data):
            # Not shards.atomic_write: its one fixed temporary name assumes one writer, and this
            # cache is shared by every process on the machine that loads the ranks at once.
            tmp = cache_file.with_name(f".{cache_file.name}.tmp{os.getpid()}")
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data)
                os.replace(tmp, cache_file)
            except OSError:  # a full or read-only cache: the verified ranks serve uncached
                pass
            finally:
                if os.path.lexists(tmp):  # (unlink of a missing name fails on a read-only disk)
                    tmp.unlink()
            return data
        failures.append(f"{description}: {'unavailable' if data is None else 'SHA-256 mismatch'}")
    raise TokenizerUnavailable(f"cannot load the GPT-2 BPE ranks ({'; '.join(failures)}); place the file with "
                       f"sha256 {GPT2_RANKS_SHA256} at {cache_file}")


class Gpt2Tokenizer:
    name, vocab_size, bos_id = "gpt2", 50257, 50256

    def __init__(self, ranks_file: bytes):
        ranks = {base64.b64decode(token): int(rank)
                 for token, rank in (line.split() for line in ranks_file.splitlines() if line)}
        self.encoding = tiktoken.Encoding(name="r50k_base", pat_str=R50K_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={ENDOFTEXT: self.bos_id}, explicit_n_vocab=self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(map(int, ids)))

    @functools.cache
    def token_byte_lengths(self) -> np.ndarray:
        lengths = [len(self.encoding.decode_single_token_bytes(i)) for i in range(self.bos_id)]
        return np.array(lengths + [0], dtype=np.int64)


class BytesTokenizer:
    """One token per UTF-8 byte. Byte 0 (NUL) is BOS: real text never contains it, and encode checks."""
    name, vocab_size, bos_id = "bytes", 256, 0

    def encode(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        if b"\0" in data:
            raise ValueError("text contains a NUL byte, which the bytes tokenizer reserves for BOS")
        return list(data)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.bos_id] = 0
        return lengths


@functools.cache
def get_tokenizer(name: str):
    if name == "gpt2":
        return Gpt2Tokenizer(load_gpt2_ranks())
    if name == "bytes":
        return BytesTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; choose 'gpt2' or 'bytes'")
