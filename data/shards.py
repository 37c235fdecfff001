"""Writing q0 token shards (.q0t), and what every data command shares: errors, atomic writes,
manifests and flags checked against their ranges. numpy and the standard library only: data/
never imports torch or train_q0.py, whose reader (`read_tokens`) is the other half of this format.

.q0t version 2, little-endian (README, "The shard format"):
  0 magic b"Q0TOKENS" | 8 u32 version | 12 u32 bytes per token (2 or 4) | 16 u64 num_tokens
  24 u32 vocab_size | 28 u32 bos_id | 32 u64 num_docs | 40 u64 text_bytes | 48 32s tokenizer name
  80 32s sha256 of the token payload | 112 32s sha256 of the metadata block | 144 u64 payload offset
  152 u32 command length | zero to 256
  256: the metadata block: vocab_size x u16, the UTF-8 bytes of each token id (BOS 0), then the
       command that rebuilds the file (UTF-8), NUL-padded to a multiple of 8
  payload offset: num_tokens token ids
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = b"Q0TOKENS", 2, 256
SHARD_STRUCT = struct.Struct("<8sIIQIIQQ32s32s32sQI")
MANIFEST = "manifest.json"  # beside the shards: settings, sources, files and the rebuilding command


class DataError(Exception):
    """Bad input or data on disk: one `error:` line, exit code 2, nothing overwritten."""


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path, data: bytes):
    """Write a temporary file, then rename: a crash never leaves half a file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --- the shard -------------------------------------------------------------------------------

def encode_shard(tokens: np.ndarray, *, vocab_size: int, bos_id: int, tokenizer: str,
                 token_bytes: np.ndarray, command: str) -> tuple[bytes, dict]:
    """The file's bytes and what they hold. Deterministic: the same inputs give the same bytes."""
    tokens, token_bytes = np.asarray(tokens), np.asarray(token_bytes)
    if tokens.size == 0 or tokens[0] != bos_id:
        raise DataError(f"the token stream must be non-empty and start with the BOS token {bos_id}")
    if int(tokens.max()) >= vocab_size:
        raise DataError(f"token id {int(tokens.max())} outside the vocabulary of {vocab_size}")
    if token_bytes.shape != (vocab_size,) or token_bytes[bos_id] != 0 or token_bytes.min() < 0 \
            or token_bytes.max() >= 1 << 16:
        raise DataError(f"the byte-length table must hold {vocab_size} lengths below 65536, 0 for BOS")
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    payload = tokens.astype(dtype).tobytes()
    cmd = command.encode("utf-8")
    meta = token_bytes.astype("<u2").tobytes() + cmd
    meta += bytes(-len(meta) % 8)  # the payload starts 8-byte aligned
    offset = SHARD_HEADER_BYTES + len(meta)
    num_docs = int((tokens == bos_id).sum())
    # Exact UTF-8 bytes of the documents (BOS counts 0); a histogram avoids a per-token temporary.
    text_bytes = int(np.bincount(tokens, minlength=vocab_size).astype(np.int64) @ token_bytes.astype(np.int64))
    header = SHARD_STRUCT.pack(SHARD_MAGIC, SHARD_VERSION, np.dtype(dtype).itemsize, tokens.size, vocab_size,
                               bos_id, num_docs, text_bytes, tokenizer.encode("ascii"),
                               hashlib.sha256(payload).digest(), hashlib.sha256(meta).digest(), offset, len(cmd))
    raw = header.ljust(SHARD_HEADER_BYTES, b"\0") + meta + payload
    info = dict(bytes=len(raw), tokens=int(tokens.size), docs=num_docs, text_bytes=text_bytes,
                payload_sha256=hashlib.sha256(payload).hexdigest(), sha256=hashlib.sha256(raw).hexdigest())
    return raw, info


def write_shard(path, tokens: np.ndarray, **fields) -> dict:
    """Write a .q0t shard atomically (fields: see encode_shard). An existing file is never
    overwritten: if it holds exactly these bytes it is kept (a rerun after a crash), else refused."""
    path = Path(path)
    raw, info = encode_shard(tokens, **fields)
    if path.exists():
        if sha256_file(path) != info["sha256"]:
            raise DataError(f"{path} exists and differs from what this command builds now; "
                            "move it away (or choose another --out) and rerun")
        return info
    atomic_write_bytes(path, raw)
    return info


# --- the manifest ----------------------------------------------------------------------------

def refuse_other_build(folder: Path, recorded: dict, manifest: dict):
    """An earlier build in folder must be of the same sources and settings. The command is compared
    only as far as what it builds: paths typed relative or absolute make the same build."""
    keys = sorted(k for k in set(recorded) | set(manifest)
                  if k not in ("files", "command") and recorded.get(k) != manifest.get(k))
    if keys:
        raise DataError(f"{folder} holds a different build ({', '.join(keys)} differ); choose another "
                        f"--out, or move {folder} away and rerun")


def check_or_write_manifest(folder: Path, manifest: dict) -> bool:
    """Write folder/manifest.json last (it marks a finished build); if one exists it must say the
    same, and every file it lists must still match its SHA-256. Returns True if it existed."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode())
        return False
    try:
        recorded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path} is not valid JSON; move {folder} away and rerun") from None
    refuse_other_build(folder, recorded, manifest)
    if recorded.get("files") != manifest["files"]:
        raise DataError(f"{path} lists other files than the ones just written; move {folder} away and rerun")
    return True


def recorded_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify_files(folder: Path, manifest: dict):
    """Every file the manifest lists, checked against its recorded SHA-256."""
    for name, info in manifest["files"].items():
        path = Path(folder) / name
        if not path.exists() or sha256_file(path) != info["sha256"]:
            raise DataError(f"{path} is missing or does not match its SHA-256 in {Path(folder) / MANIFEST}; "
                            f"move {folder} away and rerun: {manifest.get('command', 'the data command')}")


# --- command lines: one error line, every flag checked against its range ----------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line and exit code 2 (no usage block)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# Range mirrors train_q0.Range: data/ runs without torch and train_q0.py imports no project module,
# so neither can import the other; tests/test_bad_input.py checks that the two agree.
@dataclasses.dataclass(frozen=True)
class Range:
    """A flag's meaningful values. kind "number": finite, within [lo, hi] (an end is left out when
    open), or one of `also` (0 for "all", say); "text", "path", "choice", "switch": argparse or
    the command itself checks them. Every flag of every command has one (a test enforces it)."""
    kind: str = "number"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()

    def accepts(self, value) -> bool:
        if self.kind != "number" or value is None:
            return True
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def says(self, integer: bool = False) -> str:
        ends = ([f"{'>' if self.lo_open else '>='} {self.lo:g}"] if self.lo is not None else []) + \
               ([f"{'<' if self.hi_open else '<='} {self.hi:g}"] if self.hi is not None else [])
        return ("an integer " if integer else "a finite number ") + " and ".join(ends) \
            + "".join(f" (or {a:g})" for a in self.also)


def at_least(lo, **kw) -> Range:
    return Range(lo=lo, **kw)


TEXT, PATH, CHOICE, SWITCH = Range("text"), Range("path"), Range("choice"), Range("switch")


def range_errors(parser: argparse.ArgumentParser, args: argparse.Namespace, ranges: dict) -> list[str]:
    """One message per flag whose value is outside its declared range."""
    out = []
    for action in parser._actions:
        if action.dest == "help":
            continue
        rule = ranges[action.dest]  # a KeyError here is a flag without a declared range
        value = getattr(args, action.dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not rule.accepts(v):
                flag = action.option_strings[0] if action.option_strings else action.dest
                out.append(f"{flag} {v:g}: expected {rule.says(action.type is int)}")
                break
    return out


def parse_checked(parser: ArgumentParser, ranges: dict, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    errors = range_errors(parser, args, ranges)
    if errors:
        parser.error(errors[0])
    return args
