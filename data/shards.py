"""q0's ground floor: what every command shares, in numpy and the standard library only.

The one error convention (`UsageError`: one `error:` line, exit code 2, nothing lost), command
lines whose every flag is checked against its range, hashing, atomic writes (and the fault hook
the crash tests drive them with), and the token shard format, writer and readers in one place.
Nothing here imports torch at module level (the Slowrun `.pt` reader imports it inside its one
function) or any other q0 file: `data/` commands run on it alone, and `q0_run.py` builds on it.

.q0t version 3, little-endian (README, "The shard format"):
  0 magic b"Q0TOKENS" | 8 u32 version | 12 u32 bytes per token (2 or 4) | 16 u64 num_tokens
  24 u32 vocab_size | 28 u32 bos_id | 32 u64 num_docs | 40 u64 text_bytes (UTF-8 bytes of the
  documents) | 48 32s tokenizer name | 80 32s sha256 of the token payload | 112 32s sha256 of the
  metadata block | 144 u64 payload offset | 152 u32 command length | 156 32s sha256 of the header
  (these 256 bytes, this field zero) | zero to 256
  256: the metadata block: vocab_size x u16, the UTF-8 bytes of each token id (BOS 0, what bits
       per byte divides by), then the command that rebuilds the file (UTF-8), NUL-padded to a
       multiple of 8
  payload offset: num_tokens token ids
Version 2 (still read): the same, with no header digest (bytes 156-255 zero); version 1 (still
read): the payload follows the 256-byte header; no metadata block.
Every document starts with bos_id, so document boundaries are recoverable from tokens alone.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import struct
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- errors: one convention for every command -------------------------------------------------

class UsageError(Exception):
    """Bad input (flags, data, files, disk): reported as one `error: ...` line, exit code 2, with
    nothing the user has overwritten. Raised anywhere; caught once, by a command's main."""


class DataError(UsageError):
    """Data on disk that cannot be used as it is; the message names the command that rebuilds it."""


class DiskError(UsageError):
    """A write that the disk refused: full, or read-only. Nothing under a real name was touched."""


class Finished(Exception):
    """Nothing left to do: the command's output is already complete (a rerun after a stop that came
    after the output was written). One `note:` line, exit code 0."""


# What the machine, not the code, refuses (a full or read-only disk, a permission, a failing
# device): one line wherever it surfaces, a print to a full disk included. Other OSErrors are bugs
# and keep their traceback.
_SPACE, _PERMISSION = "free some space (or write elsewhere)", "fix its permissions (or write elsewhere)"
MACHINE_ERRNOS = {errno.ENOSPC: _SPACE, errno.EDQUOT: _SPACE, errno.EFBIG: _SPACE, errno.EACCES: _PERMISSION,
                  errno.EPERM: _PERMISSION, errno.EROFS: "make it writable (or write elsewhere)",
                  errno.EIO: "check the disk"}
INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells report it


def machine_error(err: BaseException) -> UsageError | None:
    """An OSError the machine caused, as one line that says what to do; None for any other."""
    code = getattr(err, "errno", None)
    if not isinstance(err, OSError) or code not in MACHINE_ERRNOS:
        return None
    where = f"{err.filename}: " if err.filename else "a write (to the log, the output or the terminal): "
    return UsageError(f"{where}{os.strerror(code)}; {MACHINE_ERRNOS[code]}, then rerun the same command")


def command(main):
    """A command's main: a UsageError raised anywhere inside becomes one `error:` line on stderr and
    the return value 2 (`sys.exit(main())` makes it the exit code), and so does an OSError the
    machine caused (machine_error); Ctrl-C is one line and 130; Finished is one `note:` line and 0;
    otherwise main's value, or 0."""
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except Finished as e:
            print(f"note: {e}", file=sys.stderr, flush=True)
            return 0
        except KeyboardInterrupt:
            say("error: interrupted (Ctrl-C); nothing is left half-written: rerun the same command to finish")
            return INTERRUPTED
        except (UsageError, OSError) as e:
            error = e if isinstance(e, UsageError) else machine_error(e)
            if error is None:
                raise
            say(f"error: {error}")
            return 2
    return run


def say(line: str):
    """One line on stderr, even when the disk that holds stderr is the full one."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr, flush=True)


# --- command lines: one error line, every flag checked against its range ----------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one `error: ...` line and exit code 2, no usage block."""

    def error(self, message):
        raise UsageError(message)


def path_arg(text: str) -> Path:
    """argparse's type for an output folder: an empty one (an unset shell variable, say) is refused,
    not read as Path('') == '.', the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder (. for the current one)")
    return Path(text)


# Every flag's meaningful values, checked once right after parsing. Every flag has an entry (a
# test enumerates the parser): a flag added without one fails the tests.
@dataclasses.dataclass(frozen=True)
class Range:
    """kind "number": finite, within [lo, hi] (an end left out when open), or one of `also`
    (0 for "all", say); "text", "path", "choice", "switch": argparse or the code checks them."""
    kind: str = "number"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()

    def accepts(self, value) -> bool:
        if self.kind != "number" or value is None or value in self.also:
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
UNIT = Range(lo=0, hi=1)  # a fraction, both ends allowed


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


def parse_checked(parser: argparse.ArgumentParser, ranges: dict, argv=None) -> argparse.Namespace:
    """Parse, then check every flag against its declared range: the first failure is a UsageError."""
    args = parser.parse_args(argv)
    errors = range_errors(parser, args, ranges)
    if errors:
        raise UsageError(errors[0])
    return args


def typed_flags(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The destinations of the flags the user typed, not left to a default or a preset. `parser`,
    a fresh one, is spent: its defaults are cleared so that only typed flags are set."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()
    return set(vars(parser.parse_known_args(argv)[0]))


# --- files: hashing, atomic writes (a crash never leaves half a file under a real name) --------

def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# Fault injection for the crash tests: Q0_FAULT=kill:N SIGKILLs this process just before its N-th
# commit (a rename, link or unlink that changes what a name holds), stop:N freezes it there
# (SIGSTOP: a hung node), enospc:N makes that commit's write fail as on a full disk.
# Q0_FAULT_RANK limits it to one torchrun rank. Nothing else reads these variables.
_COMMITS = [0]


def _fault(kind: str) -> bool:
    """Count one commit; act on Q0_FAULT when this is the one it names."""
    if kind == "commit":
        _COMMITS[0] += 1
    spec = os.environ.get("Q0_FAULT", "")
    if not spec or os.environ.get("Q0_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return False
    action, _, n = spec.partition(":")
    if int(n) != _COMMITS[0] + (kind == "write"):
        return False
    if kind == "commit" and action in ("kill", "stop"):
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
    return kind == "write" and action == "enospc"


def _commit(op, *paths):
    """Every change of what a name holds goes through here (os.replace, os.rename, os.link, unlink)."""
    _fault("commit")
    op(*paths)


def _tmp_name(path: Path) -> Path:
    """One temporary name per file, the same in every process: one writer per run (RunLock) and
    per output (claim_output) means a rerun reuses what a killed writer left instead of adding to it."""
    return path.with_name(f".{path.name}.tmp")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _disk_error(path: Path, size: int | None, err: BaseException) -> DiskError | None:
    """One line for a full disk or a read-only folder; None for any other failure."""
    code = getattr(err, "errno", None)
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return DiskError(f"cannot write {path}: {os.strerror(code)}; make {path.parent} writable (or write "
                         f"elsewhere), then rerun the same command")
    free = shutil.disk_usage(next(p for p in path.parents if p.exists())).free
    # torch.save reports a full disk as a RuntimeError without errno ("unexpected pos ..."): the
    # free space left says what happened
    if code in (errno.ENOSPC, errno.EDQUOT) or (isinstance(err, RuntimeError) and free < max(size or 0, 1 << 20)):
        need = f"{_human(size)}" if size else "more space"
        return DiskError(f"no space left for {path}: it needs {need}, {_human(free)} free on its disk; free "
                         f"some space (or write elsewhere), then rerun the same command")
    return None


def _write_failed(path: Path, tmp: Path, size: int | None, err: RuntimeError) -> DiskError:
    """torch's writer fails without an errno ("unexpected pos ...", "cannot be opened"): the
    temporary name, written to again, says why (full, read-only, no permission); else its words."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # not open(): its close may fail
        try:                                                                # and keep the file open
            left = 1 << 16
            while left > 0:
                left -= os.write(fd, bytes(left))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as probe:  # (kept in no local: its traceback holds this frame)
        found = _disk_error(path, size, probe)
    else:
        found = _disk_error(path, size, err)
    if found is not None:
        return found
    said = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    said = said.split("] . ", 1)[-1] if said.startswith("[enforce fail") else said  # torch's source line
    return DiskError(f"cannot write {path} ({said}); check that {path.parent} is writable and has space, then "
                     f"rerun the same command")


def _fsync(path: Path):
    """Make what `path` (a file or a folder) holds durable: a rename is on disk only once its folder is."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system without fsync of folders
            raise
    finally:
        os.close(fd)


def atomic_write(path, write, size: int | None = None, replace: bool = True):
    """Write through a temporary file, then commit it under its real name: os.replace, or with
    replace=False os.link, which refuses a name that exists. Durable: the file is synced before
    its rename and its folder after, so a power cut keeps either the old file or the whole new one.
    `size`, the bytes the file will take, turns a full disk into one line before anything is
    written; any failure of the write is one line, and the temporary file goes."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if size is not None and shutil.disk_usage(path.parent).free < size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if _fault("write"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        failed = None
        try:
            write(tmp)
        except RuntimeError as e:  # torch.save's: no errno
            failed = _write_failed(path, tmp, size, e)
        if failed is not None:  # raised here, not in the handler: torch's frames (its open file) go with e
            raise failed
        _fsync(tmp)
        _commit(os.replace if replace else os.link, tmp, path)
        _fsync(path.parent)
    except FileExistsError as e:
        if e.filename2 is None:  # not os.link refusing the real name: mkdir met a file where a folder goes
            raise UsageError(f"{e.filename} is a file where a folder was expected; give a folder") from None
        raise UsageError(f"{path} exists and is never overwritten; choose another path") from None
    except OSError as e:
        raise _disk_error(path, size, e) or e
    finally:
        if os.path.lexists(tmp):  # (unlink of a missing name fails on a read-only disk)
            tmp.unlink()


def atomic_write_bytes(path, data: bytes, replace: bool = True):
    atomic_write(path, lambda tmp: tmp.write_bytes(data), size=len(data), replace=replace)


def atomic_write_text(path, text: str, replace: bool = True):
    atomic_write(path, lambda tmp: tmp.write_text(text), size=len(text.encode()), replace=replace)


def atomic_save_npy(path, array: np.ndarray):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write, size=array.nbytes + 4096)


# --- the shard format: writer --------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_VERSIONS, SHARD_HEADER_BYTES = b"Q0TOKENS", 3, (1, 2, 3), 256
SHARD_STRUCT = struct.Struct("<8sIIQIIQQ32s32s32sQI")
HEADER_SEAL = slice(156, 188)  # version 3: SHA-256 of the 256-byte header with these 32 bytes zero
MANIFEST = "manifest.json"  # beside the shards: settings, sources, files and the rebuilding command
MODDED_MAGIC, MODDED_VERSION = 20240520, 1


# The commands that build the default --data-dir of each preset: named when that folder is empty.
DEFAULT_DATA_COMMANDS = {"data/shakespeare/bytes": "python data/shakespeare.py --tokenizer bytes",
                         "data/shakespeare/gpt2": "python data/shakespeare.py --tokenizer gpt2",
                         "data/fineweb": "python data/fineweb.py"}


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
    header = header.ljust(SHARD_HEADER_BYTES, b"\0")
    header = header[:HEADER_SEAL.start] + hashlib.sha256(header).digest() + header[HEADER_SEAL.stop:]
    raw = header + meta + payload
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


# --- the shard format: readers (ours, and the two formats Slowrun and modded-nanogpt users have) ---

def _rebuild_hint(path, recorded: str | None = None) -> str:
    """The command that rebuilds a data file: the one it (or the manifest beside it) records, or,
    for a folder with neither, the data command that makes such a folder."""
    if recorded:
        return recorded
    folder = Path(path) if Path(path).is_dir() or not Path(path).suffix else Path(path).parent
    try:
        return json.loads((folder / "manifest.json").read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for default, command in DEFAULT_DATA_COMMANDS.items():
        if folder.resolve() == (REPO_ROOT / default).resolve() or folder == Path(default):
            return command
    if Path(path).suffix in (".pt", ".bin"):  # FineWeb in Slowrun's or modded-nanogpt's layout
        return "python data/fineweb.py"
    return f"python data/text.py YOUR_TEXT --tokenizer bytes --out {folder}"


@dataclasses.dataclass
class TokenFile:
    tokens: np.ndarray
    vocab_size: int
    bos_id: int
    tokenizer: str
    text_bytes: int | None  # None: not recorded by the format
    path: str
    format: str
    token_bytes: np.ndarray | None = None  # UTF-8 bytes of every token id (BOS 0); None: not recorded
    command: str | None = None             # the command that rebuilds the file, as recorded in it


def _read_q0t(path: Path) -> TokenFile:
    raw = path.read_bytes()
    if len(raw) < SHARD_HEADER_BYTES:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes); rebuild it with: {_rebuild_hint(path)}")
    magic, version, tok_bytes, n, vocab, bos, _docs, text_bytes, tok_name, digest, meta_digest, offset, cmd_len = \
        SHARD_STRUCT.unpack_from(raw)
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: not a q0 token shard (bad magic); rebuild it with: {_rebuild_hint(path)}")
    if version not in SHARD_VERSIONS:
        raise DataError(f"{path}: shard version {version}, this code reads versions 1, 2 and 3; "
                        f"rebuild it with: {_rebuild_hint(path)}")
    token_bytes, command, meta_ok = None, None, True
    if version == 1:
        offset = SHARD_HEADER_BYTES
    else:
        meta = memoryview(raw)[SHARD_HEADER_BYTES:offset]
        meta_ok = offset <= len(raw) and 2 * vocab + cmd_len <= len(meta) and \
            hashlib.sha256(meta).digest() == meta_digest
        text = bytes(meta[2 * vocab:]).rstrip(b"\0") if meta_ok else b""
        if meta_ok and len(text) == cmd_len:  # the command that rebuilds the file (header or not, it agrees)
            command = text.decode("utf-8", errors="replace")
    head = bytearray(raw[:SHARD_HEADER_BYTES])
    seal, head[HEADER_SEAL] = bytes(head[HEADER_SEAL]), bytes(32)
    # version 3 seals its header (tokenizer, vocabulary, BOS, counts, both digests, offsets); in 1 and
    # 2 those bytes are zero (a version 3 file whose version field changed is caught here too)
    if (hashlib.sha256(head).digest() != seal) if version >= 3 else any(raw[HEADER_SEAL.start:SHARD_HEADER_BYTES]):
        raise DataError(f"{path}: header does not match the SHA-256 in it (corrupted); rebuild it with: "
                        f"{_rebuild_hint(path, command)}")
    if not meta_ok:
        raise DataError(f"{path}: metadata do not match the SHA-256 in the header (corrupted or truncated); "
                        f"rebuild it with: {_rebuild_hint(path)}")
    if version > 1:
        token_bytes = np.frombuffer(raw, dtype="<u2", count=vocab, offset=SHARD_HEADER_BYTES).astype(np.int64)
    hint = _rebuild_hint(path, command)
    if tok_bytes not in (2, 4) or len(raw) != offset + n * tok_bytes:
        raise DataError(f"{path}: size {len(raw)} bytes does not match the header's {n} tokens "
                        f"(truncated?); rebuild it with: {hint}")
    tok_name = tok_name.rstrip(b"\0").decode("ascii", errors="replace")
    if hashlib.sha256(memoryview(raw)[offset:]).digest() != digest:
        raise DataError(f"{path}: tokens do not match the SHA-256 in the header (corrupted); rebuild it with: {hint}")
    if version == 1 and tok_name == "bytes":  # one byte per id but BOS, by the tokenizer's definition
        token_bytes = np.ones(vocab, dtype=np.int64)
        token_bytes[bos] = 0
    tokens = np.frombuffer(raw, dtype=np.uint16 if tok_bytes == 2 else np.uint32, offset=offset)
    return TokenFile(tokens, vocab, bos, tok_name, text_bytes, str(path), "q0", token_bytes, command)


def _read_modded_bin(path: Path) -> TokenFile:
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header.size < 256 or header[0] != MODDED_MAGIC or header[1] != MODDED_VERSION:
        raise DataError(f"{path}: not a modded-nanogpt shard (magic {MODDED_MAGIC}, version 1); "
                        f"rebuild it with: {_rebuild_hint(path)}")
    n = int(header[2])
    tokens = np.fromfile(path, dtype=np.uint16, offset=256 * 4)
    if tokens.size != n:
        raise DataError(f"{path}: holds {tokens.size} tokens, header says {n} (truncated?); "
                        f"rebuild it with: {_rebuild_hint(path)}")
    return TokenFile(tokens, 50257, 50256, "gpt2", None, str(path), "modded")


def _read_slowrun_pt(path: Path) -> TokenFile:
    import torch  # the one reader that needs it: Slowrun saved its tokens with torch.save
    try:
        d = torch.load(path, weights_only=True, map_location="cpu")
        tokens = d["tokens"].numpy() if torch.is_tensor(d["tokens"]) else np.asarray(d["tokens"])
        bos = int(d.get("bos_id", 50256))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise DataError(f"{path}: not a readable Slowrun token file ({type(e).__name__}); "
                        f"rebuild it with: {_rebuild_hint(path)}") from None
    return TokenFile(tokens, int(d.get("vocab_size", 50257)), bos, "gpt2", None, str(path), "slowrun")


def read_tokens(path, expect_vocab: int | None = None) -> TokenFile:
    """Read any of the three formats, check it, and fail with one line that names the fix."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} not found; build it with: {_rebuild_hint(path)}")
    if path.suffix == ".pt":
        tf = _read_slowrun_pt(path)
    elif path.suffix == ".bin":
        tf = _read_modded_bin(path)
    else:
        tf = _read_q0t(path)
    hint = _rebuild_hint(path, tf.command)
    if expect_vocab is not None and tf.vocab_size != expect_vocab:
        raise DataError(f"{path}: vocabulary {tf.vocab_size} does not match the model's {expect_vocab}; "
                        f"rebuild the data with the model's tokenizer ({hint})")
    if tf.tokens.size < 2 or int(tf.tokens.max()) >= tf.vocab_size:
        raise DataError(f"{path}: token ids outside the vocabulary of {tf.vocab_size}, or fewer than 2 tokens; "
                        f"rebuild it with: {hint}")
    return tf


def find_split(data_dir, split: str) -> list[Path]:
    """The file(s) of one split in any of the three layouts, ours first."""
    d = Path(data_dir)
    if d.is_file():  # a shard itself, not the folder that holds it
        raise DataError(f"--data-dir {d} is a file; give the folder that holds the shards: --data-dir {d.parent}")
    for candidate in (d / f"{split}.q0t", d / f"fineweb_{split}.pt"):
        if candidate.exists():
            return [candidate]
    modded = sorted(d.glob(f"*_{split}_*.bin"))
    if modded:
        return modded
    if d.is_dir() and any(p.suffix in (".txt", ".md", ".jsonl") for p in d.iterdir()):
        raise DataError(f"{d} holds text, not token shards; make them with: python data/text.py {d} "
                        f"--tokenizer bytes --out {d}-q0, then pass --data-dir {d}-q0")
    raise DataError(f"no {split} data in {d} (looked for {split}.q0t, fineweb_{split}.pt, *_{split}_*.bin); "
                    f"build it with: {_rebuild_hint(d)}")


def load_split(data_dir, split: str) -> TokenFile:
    files = [read_tokens(p) for p in find_split(data_dir, split)]
    first = files[0]
    for f in files[1:]:
        if (f.vocab_size, f.tokenizer) != (first.vocab_size, first.tokenizer):
            raise DataError(f"{f.path}: tokenizer differs from {first.path}; rebuild with {_rebuild_hint(f.path)}")
    if len(files) == 1:
        return first
    text = None if any(f.text_bytes is None for f in files) else sum(f.text_bytes for f in files)
    return dataclasses.replace(first, tokens=np.concatenate([f.tokens for f in files]), text_bytes=text,
                               path=",".join(f.path for f in files))


# --- documents in a token stream ----------------------------------------------------------------

def doc_starts(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    starts = np.flatnonzero(tokens == bos_id)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    return starts


def carve_fitness(tokens: np.ndarray, bos_id: int, fitness_tokens: int, whole_documents: bool = False):
    """Split the fitness set off the front of the training stream: (fitness, train), exactly
    `fitness_tokens` tokens (or the whole stream's documents but the last, if fewer).

    Whole documents while each fits in what is left to carve, then the leading tokens of the next
    one. The rest of that document is used for nothing: no document is split between the prior's
    data and the training data (on a corpus of one document there is no other choice: the rest of
    it is the training data). The fitness set is identical for every member and never trained on;
    it is where the prior is fitted, so it must not be the validation set. Sized in tokens, not
    documents: its forward passes at every snapshot cost the same on any corpus (a corpus whose
    first document is 465K tokens used to score all of it, 14x the training tokens).
    `whole_documents`: the carve of run format 3 and older (whole documents, at least
    `fitness_tokens`), kept so that such runs resume on the same tokens.
    """
    if whole_documents:
        return _carve_whole_documents(tokens, bos_id, fitness_tokens)
    if fitness_tokens + 1 < tokens.size:
        starts = np.append(doc_starts(tokens, bos_id), tokens.size)
        whole = int(np.searchsorted(starts, fitness_tokens, side="right")) - 1  # documents that fit entirely
        if starts[whole] == fitness_tokens:  # documents end exactly there
            rest = tokens[fitness_tokens:]
        else:
            split_end = int(starts[whole + 1])  # the document the carve splits ends here
            rest = tokens[split_end:] if split_end < tokens.size else \
                _as_document(tokens[fitness_tokens:split_end], bos_id)
        if rest.size >= 2:  # a target to train on
            return tokens[:fitness_tokens], rest
    raise UsageError(f"the fitness set (--fitness-tokens {fitness_tokens:,}) would leave nothing of the "
                     f"{tokens.size:,} training tokens to train on; lower --fitness-tokens")


def _carve_whole_documents(tokens: np.ndarray, bos_id: int, fitness_tokens: int):
    starts = np.append(doc_starts(tokens, bos_id), tokens.size)
    cut_index = int(np.searchsorted(starts, fitness_tokens, side="left"))
    if cut_index >= starts.size - 1:
        raise UsageError(f"the fitness set (--fitness-tokens {fitness_tokens}, whole documents) would take all "
                         f"{tokens.size} training tokens; lower --fitness-tokens")
    cut = int(starts[max(cut_index, 1)])
    return tokens[:cut], tokens[cut:]


def _as_document(tokens: np.ndarray, bos_id: int) -> np.ndarray:
    """The tail of a split document made a document of its own (a BOS first)."""
    return np.concatenate([np.array([bos_id], dtype=tokens.dtype), tokens])


def tokens_sha256(tokens: np.ndarray) -> str:
    """Identity of a token sequence, independent of how it was stored (hashed in chunks: the
    training set of a real run is 100M tokens)."""
    h = hashlib.sha256()
    for s in range(0, tokens.size, 1 << 22):
        h.update(np.ascontiguousarray(tokens[s:s + (1 << 22)], dtype="<i8").tobytes())
    return h.hexdigest()


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
