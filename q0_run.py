"""What makes a q0 run safe to kill, rerun, resume and plan: everything train_q0.py is not.

train_q0.py holds the experiment (model, optimiser, schedule, distillation, the training loop);
this module holds the run around it, in reading order:
  flags of the run        the plumbing flags (runs, logs, timeouts, preflight) and their ranges
  files                   weights files, atomic torch writes, the run lock, output claims
  collectives             every collective, on the device its group's backend takes
  data for one run        the training stream's tokens, the fitness set, the validation set
  the run directory       run.json, logs, snapshot files and records, caches, checkpoints
  the prior               prior.json and its members (--distil-from and eval.py share them), the
                          population it is fitted on and its certified fit (fit_prior.py, eval.py)
  population layout       bases on process groups, the device batch
  preflight plan          FLOPs, memory, disk and hours, traced on fake tensors
  processes               process groups, heartbeats, start and finish of a training run
It never imports train_q0.py. Where it needs the experiment (the model config, the cycles, the
pieces the preflight traces), train_q0.py hands itself in as `exp` (see `Experiment`). The ground
floor below it, data/shards.py, holds the error convention, flag ranges, atomic writes and the
token file format.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from data import shards
from data.shards import (PATH, REPO_ROOT, SWITCH, TEXT, DataError, UsageError, _commit, _disk_error,
                         _rebuild_hint, _tmp_name, at_least, atomic_save_npy, atomic_write, atomic_write_text,
                         carve_fitness, load_split, read_tokens, sha256_file, tokens_sha256)


class Experiment(Protocol):
    """What this module uses of train_q0.py, which hands itself in (`exp`): the run's shape, and
    for the preflight trace the model, its optimiser, a teacher and one micro-batch's loss."""
    KERNELS: dict                                     # attention and autocast kernels, set by main

    def model_config(self, args, vocab_size: int): ...
    def plan_cycles(self, args, train_tokens: int) -> list: ...
    def device_batch_cap(self, args) -> int: ...
    def distils(self, args, cycle_index: int) -> bool: ...
    def GPT(self, cfg): ...                           # noqa: N802
    def build_optimizer(self, model, args, process_group=None): ...
    def SnapshotTeacher(self, model): ...             # noqa: N802
    def micro_batch_loss(self, forward, model, teacher, rows, device, seeds, alpha, temperature): ...
    def autocast_for(self, device, cache: bool = True): ...


# =============================================================================================
# Flags of the run: where it is written, how it logs and times out, what the preflight assumes
# =============================================================================================
# None of these changes the population: a resumed run may change any of them.

H100_BF16_TFLOPS = 989.0   # dense bf16 peak of one H100 SXM


def add_run_flags(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("snapshots, logs and runs")
    g.add_argument("--runs-dir", default="runs")
    g.add_argument("--run-name", default="", help="default: <preset>-<bases>x<cycles>-seed<seed>")
    g.add_argument("--log-every", type=int, default=10, help="steps between training-loss lines")
    g.add_argument("--checkpoint-minutes", type=float, default=30.0,
                   help="also checkpoint this often within a cycle (cycle ends always checkpoint)")
    g.add_argument("--collective-timeout-minutes", type=float, default=10.0,
                   help="a process that does not answer a collective (or, at the end, show signs of life) "
                        "for this long fails the run with an error naming its rank")
    g.add_argument("--startup-timeout-minutes", type=float, default=30.0,
                   help="the same, for the start: joining the job and the collectives before the first step "
                        "(every process traces the plan and compiles before it; that may take minutes)")
    g.add_argument("--wandb-project", default="", help="also log to Weights & Biases (needs wandb installed)")
    g = parser.add_argument_group("preflight plan (printed at the top of every run)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan (parameters, FLOPs, memory, disk, hours) and exit; no data needed")
    g.add_argument("--plan-gpus", type=int, default=0,
                   help="plan for this many CUDA processes (default: this launch's processes and device)")
    g.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the hours assume")
    g.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS,
                   help="peak bf16 TFLOP/s of one process's device (default: H100 SXM, dense)")
    g.add_argument("--device-memory-gib", type=float, default=0,
                   help="memory of each process's device that the plan and the first-step probe must fit in "
                        "(0: the CUDA device's own, an H100's 79.6 with --plan-gpus; a CPU run: unchecked)")


RUN_RANGES = {
    "runs_dir": PATH, "run_name": TEXT, "log_every": at_least(1), "checkpoint_minutes": at_least(0),
    "collective_timeout_minutes": at_least(0, lo_open=True), "startup_timeout_minutes": at_least(0, lo_open=True),
    "wandb_project": TEXT, "dry_run": SWITCH,
    "plan_gpus": at_least(0), "mfu": shards.Range(lo=0, hi=1, lo_open=True), "peak_tflops": at_least(0, lo_open=True),
    "device_memory_gib": at_least(0),
}
RUN_FLAGS = set(RUN_RANGES)


# =============================================================================================
# Files: weights, atomic torch writes, one writer per run (a crash never leaves half a file under
# a real name, and the same command, rerun, repairs whatever a crash left)
# =============================================================================================

def load_weights(path, device="cpu", mmap: bool = False) -> dict:
    """torch.load with weights_only: anything but plain tensors (a pickled object, a damaged file)
    is refused in one line. mmap: tensors backed by the file (pages read when touched)."""
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, a damaged zip, a missing file: one answer
        raise UsageError(f"{path} is not a q0 weights file that loads safely ({type(e).__name__}); move it away "
                         f"and rerun the command that wrote it") from None


def _tensor_bytes(obj) -> int:
    """What torch.save of obj takes on disk, generously: tensor payloads plus record overheads."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size() + 512
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values()) + 64
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj) + 64
    return 64


def _canonical(obj):
    """The same values as the same bytes. pickle writes a string or tuple once and then refers to
    it by identity, so an optimizer state loaded from a checkpoint (fresh key strings) pickled
    differently from one built in this process (interned literals): strings interned, containers
    rebuilt unshared, torch.save's output depends on the values alone."""
    if isinstance(obj, str):
        return sys.intern(obj)
    if isinstance(obj, dict):
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_canonical(v) for v in obj)
    return obj


def atomic_torch_save(obj, path):
    obj = _canonical(obj)
    atomic_write(path, lambda tmp: torch.save(obj, tmp), size=_tensor_bytes(obj) + 65536)


def _lock(fd: int, exclusive_range: tuple[int, int] | None) -> bool:
    """A POSIX record lock on [start, start+length) (length 0: to the end of the file and beyond),
    released by the kernel when the process dies; False if another process holds part of it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, exclusive_range[1], exclusive_range[0])
        return True
    except OSError:
        return False


class RunLock:
    """One writer per run folder. Every process of a trainer holds its own 16-byte slot of
    <run>/.lock (its pid written there) for its whole life; the first rank takes the whole file
    at once before keeping slot 0, so it fails while any process of another trainer is alive
    (torchrun's workers can outlive a kill of torchrun itself). A dead writer holds nothing."""

    SLOT = 16

    def __init__(self, run_dir: Path, rank: int):
        self.path = Path(run_dir) / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        whole = (0, 0) if rank == 0 else (rank * self.SLOT, self.SLOT)
        if not _lock(self.fd, whole):
            pids = self.holders()
            os.close(self.fd)
            raise UsageError(f"{run_dir} is in use by another trainer (pid {', '.join(pids) or 'unknown'}); "
                             f"wait for it to finish or stop it, then rerun")
        if rank == 0:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 0, self.SLOT)  # keep slot 0 only
        os.pwrite(self.fd, f"{os.getpid():>{self.SLOT - 1}}\n".encode(), rank * self.SLOT)

    def holders(self) -> list[str]:
        """The pids written in the slots that another process holds now."""
        raw = os.pread(self.fd, 1 << 20, 0)
        out = []
        for i in range(0, max(1, len(raw) // self.SLOT)):
            if _lock(self.fd, (i * self.SLOT, self.SLOT)):
                fcntl.lockf(self.fd, fcntl.LOCK_UN, self.SLOT, i * self.SLOT)
            else:
                out.append(raw[i * self.SLOT:(i + 1) * self.SLOT].decode(errors="replace").strip() or "?")
        return out


def _exists(path, flag: str) -> UsageError:
    return UsageError(f"{path} exists and is never overwritten; choose another path with {flag}")


@contextlib.contextmanager
def claim_output(path, flag: str = "--out", hold: bool = True):
    """A command's output (fit_prior.py's prior, eval.py's results), claimed before any work so
    nothing is computed for nothing: a file that exists is refused (never overwritten), and so is
    one another process is writing, at once. Held until the `with` ends, however it ends (one
    process may run several commands). hold=False: refuse what a writer would, hold nothing (the
    ranks that do not write). An flock on the file's temporary name, not RunLock's record locks:
    atomic_write opens and closes that name, which would drop a record lock but not an flock."""
    path = Path(path)
    if path.exists():
        _written_before_a_stop(path, hold)
        raise _exists(path, flag)
    if not hold:
        yield None
        return
    tmp = _tmp_name(path)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only folder, a path under a file
        raise UsageError(f"cannot write {path} ({e.strerror}); choose a writable path with {flag}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UsageError(f"{path} is being written by another process; wait for it to finish") from None
    try:
        yield fd
    finally:
        with contextlib.suppress(OSError):  # a command that stopped before writing leaves no temporary
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                tmp.unlink()
        os.close(fd)


def _written_before_a_stop(path: Path, hold: bool):
    """The output exists and so does its temporary name, both naming one file: a command stopped
    after linking its output into place, before removing the temporary name. The output is
    complete, so the rerun's work is done: the temporary name goes (unless its writer is alive),
    and shards.Finished says so (a note, exit code 0)."""
    tmp = _tmp_name(path)
    try:
        if not os.path.samefile(tmp, path):
            return
        fd = os.open(tmp, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # its writer is still finishing: the output is refused as any existing one
    finally:
        os.close(fd)
    if hold:
        tmp.unlink(missing_ok=True)
    raise shards.Finished(f"{path} is already complete: this command wrote it before it was stopped; nothing "
                          f"left to do (move it away to compute it again)")


def write_output(path, content, flag: str = "--out", replace: bool = False):
    """Write a command's output atomically; unless replace, never over a file: it is linked into
    place, which fails if the name exists, even one that appeared a moment ago. `content`: the
    text, or a function that writes the file it is given (a figure)."""
    write = content if callable(content) else (lambda tmp: tmp.write_text(content))
    try:
        atomic_write(path, write, size=None if callable(content) else len(content.encode()), replace=replace)
    except UsageError:
        if Path(path).exists() and not replace:
            raise _exists(path, flag) from None
        raise
    except OSError as e:  # not a full disk or a read-only folder (atomic_write says those itself)
        raise UsageError(f"cannot write {e.filename or path} ({e.strerror}); choose a writable path with "
                         f"{flag}") from None


# =============================================================================================
# Collectives: every one goes through these, on the device its group's backend takes
# =============================================================================================
# NCCL takes CUDA tensors only, gloo takes CPU tensors. Each helper looks the group's backend up
# by the device type the group serves and hands it the tensor on the device that backend takes,
# so no caller can give NCCL a host tensor (the crash this prevents: an all_reduce of a CPU tensor
# under NCCL raises "No backend type associated with device type cpu"). The tests run them in a
# "cuda:gloo" group, which refuses CPU tensors through torch.distributed's own calls as NCCL does,
# so a collective that bypasses these fails there.
# Pinned torch internals (torch 2.5 to 2.13): ProcessGroup._device_types, ProcessGroup._get_backend
# and the backend objects' allreduce / allgather / alltoall_base returning a Work.

def group_backend(group=None):
    """(backend, device it takes) of a process group (None: the world)."""
    group = group if group is not None else dist.group.WORLD
    types = [d.type for d in group._device_types]
    backend = group._get_backend(torch.device("cuda" if "cuda" in types else types[0]))
    if "NCCL" in type(backend).__name__:
        return backend, torch.device("cuda", torch.cuda.current_device())
    return backend, torch.device("cpu")


def all_reduce_(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `t` over the group, in place; `t` may live anywhere."""
    backend, device = group_backend(group)
    x = t if t.device == device else t.to(device)
    backend.allreduce([x]).wait()
    if x is not t:
        t.copy_(x)
    return t


def all_gather(t: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's `t` (same shape everywhere), in rank order, on `t`'s device."""
    backend, device = group_backend(group)
    x = t.contiguous() if t.device == device else t.to(device).contiguous()
    out = [torch.empty_like(x) for _ in range(backend.size())]
    backend.allgather([out], [x]).wait()
    return out if t.device == device else [o.to(t.device) for o in out]


def all_to_all(parts: list[torch.Tensor], group=None) -> list[torch.Tensor]:
    """parts[j] (one shape for all) goes to group rank j; returns what each rank sent this one, in
    rank order, on the parts' device. gloo has no all-to-all: there every rank gathers all parts."""
    backend, device = group_backend(group)
    x = torch.stack(parts).to(device)                                   # (W, ...)
    if "NCCL" in type(backend).__name__:
        out = torch.empty_like(x)
        backend.alltoall_base(out, x, [], []).wait()  # equal splits along dim 0
        received = out.unbind(0)
    else:
        received = [p[dist.get_rank(group)] for p in all_gather(x, group)]
    return [r.to(parts[0].device) for r in received]


def barrier(group=None):
    """A barrier that is an all_reduce of one number, so it runs wherever all_reduce_ does."""
    all_reduce_(torch.zeros(1), group)


# =============================================================================================
# Data for one run: training stream, fitness set, validation set
# =============================================================================================

@dataclasses.dataclass
class RunData:
    train: np.ndarray
    fitness: np.ndarray
    val: np.ndarray
    vocab_size: int
    bos_id: int
    tokenizer: str
    val_bytes: int | None
    describe: dict
    token_bytes: np.ndarray | None = None  # UTF-8 bytes of every token id (BOS 0), from the data files


def load_data(args, whole_documents: bool = False) -> RunData:
    """The run's three token sets. `whole_documents`: the fitness carve of run format 3 and older
    (whole documents to at least --fitness-tokens), for resuming such a run."""
    train_file, val_file = load_split(args.data_dir, "train"), load_split(args.data_dir, "val")
    if (train_file.vocab_size, train_file.tokenizer, train_file.bos_id) != \
            (val_file.vocab_size, val_file.tokenizer, val_file.bos_id):
        raise DataError(f"{train_file.path} ({train_file.tokenizer}, vocabulary {train_file.vocab_size}) and "
                        f"{val_file.path} ({val_file.tokenizer}, vocabulary {val_file.vocab_size}) do not match; "
                        f"rebuild both with: {_rebuild_hint(args.data_dir, train_file.command)}")
    token_bytes = val_file.token_bytes
    if train_file.token_bytes is not None and token_bytes is not None \
            and not np.array_equal(train_file.token_bytes, token_bytes):
        raise DataError(f"{train_file.path} and {val_file.path} record different token byte lengths; "
                        f"rebuild both with: {_rebuild_hint(args.data_dir, train_file.command)}")
    fitness, train = carve_fitness(train_file.tokens, train_file.bos_id, args.fitness_tokens, whole_documents)
    if args.train_tokens:
        if args.train_tokens > train.size:
            raise UsageError(f"--train-tokens {args.train_tokens} exceeds the {train.size} training tokens left "
                             f"after the fitness carve")
        train = train[:args.train_tokens]
    if args.val_tokens > val_file.tokens.size:
        raise UsageError(f"--val-tokens {args.val_tokens} exceeds the {val_file.tokens.size} validation tokens in "
                         f"{val_file.path}; lower it, or 0 for all")
    val = val_file.tokens[:args.val_tokens] if args.val_tokens else val_file.tokens
    if train.size < (args.seq_len + 1):
        raise UsageError(f"only {train.size} training tokens, fewer than one sequence of {args.seq_len + 1}")
    if token_bytes is not None:
        val_bytes = int(token_bytes[val[1:].astype(np.int64)].sum())
    else:
        val_bytes = val_file.text_bytes if (val_file.text_bytes is not None and val.size == val_file.tokens.size) \
            else None
    describe = {
        "train": {"path": train_file.path, "format": train_file.format, "tokens": int(train.size),
                  "sha256": tokens_sha256(train)},
        "fitness": {"tokens": int(fitness.size), "targets": int(fitness.size - 1),
                    "sha256": tokens_sha256(fitness)},
        "val": {"path": val_file.path, "format": val_file.format, "tokens": int(val.size),
                "targets": int(val.size - 1), "text_bytes": val_bytes, "sha256": tokens_sha256(val)},
    }
    return RunData(np.ascontiguousarray(train), np.ascontiguousarray(fitness), np.ascontiguousarray(val),
                   train_file.vocab_size, train_file.bos_id, train_file.tokenizer, val_bytes, describe, token_bytes)


# =============================================================================================
# The run directory: config, logs, snapshots, caches, checkpoints
# =============================================================================================
# runs/<name>/run.json           everything that defines the population, written once
#            /log.txt            this file's code, arguments, versions, hardware, then every line
#            /metrics.jsonl      the same events as JSON, one a line
#            /snapshots/bBcC.{pt,json,fitness.npy,val.npy}   weights, record, cached probabilities
#            /checkpoints/baseB.pt                            resume state of base B
#            /manifest.json      run.json plus every snapshot record, written at the end

RUN_VERSION = 4  # 2: the record's model (looping, IHA, MTP, separate q/k/v) and optimiser; 3: sealed;
#                  4: the fitness set is exactly --fitness-tokens (3 and older: whole documents, at least)
RUN_VERSIONS = (2, 3, 4)  # the same model: a run of format 2 reads and resumes, its unsealed files accepted
WHOLE_DOCUMENT_FITNESS = (2, 3)  # run formats whose fitness carve took whole documents only
SEALED_RUN_VERSION = 3  # from this format on, run.json, every record and checkpoint carries its SHA-256


def check_run_version(run: dict, run_dir) -> None:
    if run.get("version") not in RUN_VERSIONS:
        raise UsageError(f"{run_dir} was written by an older q0 (run format {run.get('version')}, this code writes "
                         f"{RUN_VERSION}): its model differs; retrain it, or use the q0 version that trained it")


def sealed_run(run: dict) -> bool:
    """Whether a run's files must carry their SHA-256 (its format is 3 or later); format 2's did not."""
    return isinstance(run.get("version"), int) and run["version"] >= SEALED_RUN_VERSION


def retrain_fix(run_dir, sid: str) -> str:
    """The repair of a snapshot (its weights, record or caches) that changed after it was written: its
    files and its base's checkpoint moved away, the base trains again (on a CPU, bitwise the same)."""
    base = sid[1:sid.index("c")] if sid.startswith("b") and "c" in sid else "B"
    run_dir = Path(run_dir)
    return (f"move {run_dir / 'snapshots' / sid}.* and {run_dir / 'checkpoints' / f'base{base}.pt'} away, then rerun "
            f"the run's training command: base {base} trains again from its first step")


def snapshot_id(base: int, cycle: int) -> str:
    return f"b{base}c{cycle}"


def load_run(run_dir) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise UsageError(f"{run_dir} is not a q0 run (no run.json); train one with: python train_q0.py")
    return read_json(path, f"nothing can resume or read the run without it: restore it from a copy, or move "
                           f"{Path(run_dir)} away and train the run again", sealed=sealed_run)


def read_json(path, fix: str, sealed=False) -> dict:
    """A JSON file, whole, and (check_seal) unchanged since it was written; `sealed`: it must carry a
    seal (or a function of its content that says so: its format's version)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable or not whole JSON ({type(e).__name__}); {fix}") from None
    return check_seal(obj, path, fix, sealed)


# Sealed JSON: every JSON file q0 writes and reads back (run.json, snapshot records, prior.json; and
# manifest.json and eval.json, for readers elsewhere) ends with a key "sha256": the SHA-256 of the
# canonical JSON (keys sorted, no spaces, ASCII) of the rest. sealed_json writes it, check_seal
# (read_json, read_prior) checks it and hands back the rest. A file of a format from before seals
# has none and is accepted; a format that seals its files refuses one without (a flip in the key).
SEAL = "sha256"


def _seal_of(obj: dict) -> str:
    rest = json.loads(json.dumps({k: v for k, v in obj.items() if k != SEAL}))  # as a reader will see it
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed_json(obj: dict) -> str:
    """The text of a JSON file q0 writes: obj, indented, then its seal."""
    return json.dumps({**{k: v for k, v in obj.items() if k != SEAL}, SEAL: _seal_of(obj)}, indent=1)


def check_seal(obj, path, fix: str, sealed):
    """obj as read from `path`, its seal checked and removed; `fix` is the repair an error names."""
    if not isinstance(obj, dict) or SEAL not in obj:
        if sealed(obj) if callable(sealed) else sealed:
            raise UsageError(f"{path} carries no SHA-256 seal, which its format's files carry (it changed after it "
                             f"was written); {fix}")
        return obj
    if obj[SEAL] != _seal_of(obj):
        raise UsageError(f"{path} does not match the SHA-256 sealed in it (it changed after it was written); {fix}")
    return {k: v for k, v in obj.items() if k != SEAL}


def json_header(kind: str, version: int) -> dict:
    """The first keys of every JSON file q0 writes (run.json "q0-run", prior.json "q0-prior",
    eval.json "q0-eval"): what it is, its format's version, when it was written (UTC)."""
    return {"format": kind, "version": version,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


SNAPSHOT_FILES = ("weights", "fitness_probs", "val_probs")


def list_snapshots(run_dir) -> list[dict]:
    """Snapshot records present on disk, in population order (cycle, then base). A record is the
    snapshot's completion marker (written after its files, removed before them): one whose files
    are gone was tampered with, and nothing may be computed from it. Each is checked (read_record)."""
    sealed = sealed_run(load_run(run_dir))
    records = [read_record(run_dir, p.stem, sealed) for p in Path(run_dir, "snapshots").glob("b*c*.json")]
    for r in records:
        missing = [r[k] for k in SNAPSHOT_FILES if r.get(k) and not (Path(run_dir) / r[k]).is_file()]
        if missing:
            raise UsageError(f"snapshot {r['id']} of {run_dir} is missing {', '.join(missing)}; "
                             f"{retrain_fix(run_dir, r['id'])}")
    return sorted(records, key=lambda r: (r["cycle"], r["base"]))


def read_record(run_dir, sid: str, sealed: bool | None = None) -> dict:
    """Snapshot `sid`'s record (snapshots/<sid>.json), unchanged since it was written: its seal
    matches (required in a sealed run; `sealed` None: run.json says) and it names itself."""
    path = Path(run_dir) / "snapshots" / f"{sid}.json"
    fix = retrain_fix(run_dir, sid)
    record = read_json(path, fix, sealed_run(load_run(run_dir)) if sealed is None else sealed)
    if not isinstance(record, dict) or record.get("id") != sid:
        raise UsageError(f"{path} is not the record of snapshot {sid}; {fix}")
    return record


def snapshot_weights(run_dir, record: dict, check_sha: bool = True) -> tuple[dict, Path]:
    """A snapshot's model config (GPTConfig's fields, as run.json records them) and its weights
    file, checked: present, unchanged since written (SHA-256), written by this run format. The one
    way a snapshot's weights are loaded (a teacher, a student's init, eval.py --forward)."""
    run = load_run(run_dir)
    path = Path(run_dir) / record["weights"]
    if not path.exists():
        raise UsageError(f"snapshot {record['id']} is missing its weights {path}")
    if check_sha and sha256_file(path) != record["weights_sha256"]:
        raise UsageError(f"{path} does not match the SHA-256 in its record: the file changed since it was "
                         f"written; {retrain_fix(run_dir, record['id'])}")
    check_run_version(run, run_dir)
    return run["model"], path


def load_val_tokens(run: dict) -> np.ndarray:
    """A run's validation tokens, found from run.json (relative to here or to the repository) and
    checked against the SHA-256 recorded when it trained."""
    v = run["val"]
    paths = [Path(p) if Path(p).exists() else REPO_ROOT / p for p in str(v["path"]).split(",")]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"validation tokens {', '.join(missing)} (run.json val.path) not found; run from the "
                         f"directory training ran in, or rebuild the data")
    tokens = np.concatenate([read_tokens(p).tokens for p in paths])[:v["tokens"]]
    if tokens_sha256(tokens) != v["sha256"]:
        raise UsageError(f"validation tokens {v['path']} differ from the run's (sha256 {v['sha256'][:12]}); "
                         f"rebuild the data the run was trained on")
    return tokens


# Flags renamed or retired since a run was written: a resume of that run compares what they mean.
RENAMED_FLAGS = {"distill_from_cycle": "distil_from_cycle", "distill_alpha": "distil_alpha",
                 "distill_temperature": "distil_temperature"}
RETIRED_FLAGS = {"import_slowrun": ""}  # now a companion command (tools/import_slowrun.py)


def population_config(args, non_population: set, teacher: list[dict] | None = None) -> dict:
    """The flags that define the population (a resume must repeat them), and an ensemble student's
    teacher: the members it learns from are part of its population."""
    out = {k: v for k, v in sorted(vars(args).items()) if k not in non_population | RUN_FLAGS}
    return out | ({"distil_teacher": teacher} if teacher else {})


def _current_names(config: dict) -> dict:
    return {RENAMED_FLAGS.get(k, k): v for k, v in config.items() if RETIRED_FLAGS.get(k, object()) != v}


def epochs_spent(records: list[dict]) -> float:
    """Compute that produced a set of snapshots: each base counted up to its latest snapshot."""
    latest = {}
    for r in records:
        latest[r["base"]] = max(latest.get(r["base"], 0.0), r["base_epochs"])
    return sum(latest.values())


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
         "platform": platform.platform(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return v


class RunLog:
    """Text for people (stdout + log.txt) and JSON lines for scripts (metrics.jsonl).
    Only the first rank of each process group writes; lines carry their base."""

    def __init__(self, run_dir: Path, enabled: bool, wandb_run=None):
        self.run_dir, self.enabled, self.wandb = run_dir, enabled, wandb_run

    def line(self, text: str, echo: bool = True):
        if not self.enabled:
            return
        if echo:
            print(text, flush=True)
        self._append("log.txt", text + "\n")

    def event(self, kind: str, **fields):
        if not self.enabled:
            return
        record = {"event": kind, "time": round(time.time(), 3), **fields}
        self._append("metrics.jsonl", json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in fields.items() if isinstance(v, (int, float))})

    def _append(self, name: str, text: str):
        """A line appended to a log (not synced: the log is for reading, the run's state is in its
        atomic files); a full or read-only disk is one line that names the file."""
        path = self.run_dir / name
        try:
            with open(path, "a") as f:
                f.write(text)
        except OSError as e:
            raise _disk_error(path, None, e) or shards.machine_error(e) or e from None


def check_same_run(run_dir: Path, population: dict, data: RunData):
    """A rerun resumes only the same population trained on the same tokens (by content: data
    replaced at the same path between a crash and the resume is caught)."""
    run = load_run(run_dir)
    old, pop = _current_names(run["population_config"]), population
    changed = sorted(k for k in set(old) | set(pop) if old.get(k) != pop.get(k))
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} ({old.get(k)} -> {pop.get(k)})" for k in changed)
        raise UsageError(f"run {run_dir} exists with a different population: {flags}; "
                         f"rerun with its flags to resume, or choose a new --run-name")
    for split in ("train", "fitness", "val"):
        was, now = run[split].get("sha256"), data.describe[split]["sha256"]
        if was is not None and was != now:
            where = data.describe["val" if split == "val" else "train"]["path"]
            raise DataError(f"the {split} tokens in {where} differ from those run {run_dir} trained on (sha256 "
                            f"{was[:12]}, now {now[:12]}); restore that data, or choose a new --run-name")


def sweep_temporaries(run_dir: Path) -> int:
    """Remove the temporary files killed writers left (each as large as its file); only the run's
    lock holder calls this, so no live writer owns them."""
    litter = [p for folder in ("snapshots", "checkpoints") for p in (run_dir / folder).glob(".*.tmp*")]
    litter += [p for name in ("run.json", "manifest.json") for p in run_dir.glob(f".{name}.tmp*")]
    for p in litter:
        p.unlink(missing_ok=True)
    return len(litter)


def _mkdir(path: Path):
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(path, None, e) or e


def epochs_per_base(cycles: list) -> float:
    """The epochs one base trains: its cycles' (the budget is this times the bases)."""
    return sum(c.epochs for c in cycles)


def code_files(exp) -> list[Path]:
    """The project files a training run imports: the experiment, this module, the ground floor."""
    return [Path(exp.__file__).resolve(), Path(__file__).resolve(), Path(shards.__file__).resolve()]


def _code_name(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def prepare_run_dir(args, data: RunData, model_cfg, cycles: list, population: dict,
                    code: list[Path]) -> tuple[Path, bool, RunLock]:
    """Create the run, or check that a rerun means the same population on the same data; either
    way take the run's lock. Returns (dir, resumed, lock). A new run is built under a temporary
    name and renamed into place, so a folder under the run's name is complete; a half-built one a
    crash left is rebuilt by the rerun."""
    run_dir = Path(args.runs_dir) / args.run_name
    if (run_dir / "run.json").exists():
        lock = RunLock(run_dir, 0)
        check_run_version(load_run(run_dir), run_dir)
        check_same_run(run_dir, population, data)
        PopulationTracker(run_dir).update()  # every record and validation cache checked before anything runs
        sweep_temporaries(run_dir)
        return run_dir, True, lock
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir} exists and is not a q0 run; choose another --run-name or --runs-dir")
    building = _tmp_name(run_dir)
    _mkdir(building / "snapshots")
    _mkdir(building / "checkpoints")
    lock = RunLock(building, 0)
    per_base = epochs_per_base(cycles)
    run = {
        **json_header("q0-run", RUN_VERSION),
        "population_config": population, "model": dataclasses.asdict(model_cfg),
        "tokenizer": data.tokenizer, "vocab_size": data.vocab_size, "bos_id": data.bos_id,
        "seq_len": args.seq_len, **data.describe,
        "layout": {"bases": args.bases, "cycles": [dataclasses.asdict(c) for c in cycles],
                   "epochs_per_base": per_base, "epoch_budget": per_base * args.bases},
        "code": {_code_name(p): sha256_file(p) for p in code},
    }
    atomic_write_text(building / "run.json", sealed_json(run))
    try:
        _commit(os.rename, building, run_dir)  # an empty folder of that name is replaced
    except OSError as e:
        raise _disk_error(run_dir, None, e) or UsageError(
            f"{run_dir} appeared while this run was being created ({e.strerror}); rerun to resume it") from None
    return run_dir, False, lock


def log_header(log: RunLog, args, world: int, code: list[Path]):
    """The code of every project file the run imports (each under its own header, in the log
    only), then the command, the arguments and the versions."""
    for path in code:
        log.line("=" * 100 + f"\n# {_code_name(path)} (sha256 {sha256_file(path)})\n" + "=" * 100 + "\n"
                 + path.read_text(), echo=False)
    log.line("=" * 100, echo=False)
    log.line("command: " + " ".join([sys.executable] + sys.argv) + f"  (world size {world})")
    log.line("arguments: " + json.dumps(vars(args), sort_keys=True))
    log.line("versions: " + json.dumps(versions()))


# The cached probabilities: p(true next token) of every fitness and validation target, fp16.
PROB_FLOOR = 2.0 ** -24  # fp16's smallest value: a cached probability, and so every log, never sees 0


def probs_to_cache(probs: np.ndarray) -> np.ndarray:
    return np.maximum(probs, PROB_FLOOR).astype(np.float16)


CACHE_KINDS = {"fitness": "fitness", "val": "validation"}  # a record's <kind>_probs, as errors name them


class CachedProbs:
    """One snapshot's cache of `kind` ("fitness" or "val"), checked: float16[targets], the bytes its
    record's SHA-256 names. The one reader of caches (fit_prior.py, eval.py, the population line):
    read() hands out consecutive chunks, hashed on the way, so a file is read from disk once and
    never held whole; check() after the last chunk (the record's hash is of the whole file)."""

    def __init__(self, run_dir, record: dict, kind: str, targets: int):
        self.name, self.fix = f"{run_dir}:{record['id']}", retrain_fix(run_dir, record["id"])
        if record.get(f"{kind}_probs") is None:
            raise UsageError(f"{self.name} has no cached {CACHE_KINDS[kind]} probabilities; evaluate with --forward")
        self.path, self.expect = Path(run_dir) / record[f"{kind}_probs"], record[f"{kind}_probs_sha256"]
        if not self.path.is_file():
            raise UsageError(f"{self.path} is missing (snapshot {self.name}); evaluate with --forward")
        with open(self.path, "rb") as f:
            shape, dtype = self._header(f)
            self.offset, size = f.tell(), os.fstat(f.fileno()).st_size
            f.seek(0)
            self.hash = hashlib.sha256(f.read(self.offset))
        if dtype != np.float16 or shape != (targets,):
            raise UsageError(f"{self.path}: expected float16[{targets}], found {dtype}{list(shape)}")
        if size != self.offset + 2 * targets:  # cut short or added to: not the bytes the record hashed
            raise self._changed()

    def _header(self, f) -> tuple[tuple, np.dtype]:
        """The .npy header, parsed without loading anything: a pickled object array is never unpickled."""
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            why = "pickled objects" if dtype.hasobject else None
        except ValueError as e:  # not .npy at all, or a damaged header
            why = type(e).__name__
        if why:
            raise UsageError(f"{self.path}: not a plain .npy probability cache ({why}); move it away and retrain "
                             f"or rescore snapshot {self.name}")
        return shape, dtype

    def read(self, s: int, e: int) -> np.ndarray:
        """Targets [s, e): call with consecutive chunks from 0, in order (each is hashed)."""
        out = np.empty(e - s, dtype=np.float16)
        with open(self.path, "rb") as f:
            f.seek(self.offset + 2 * s)
            if f.readinto(out) != out.nbytes:  # the file shrank since it was opened
                raise self._changed()
        self.hash.update(out)
        return out

    def check(self):
        if self.hash.hexdigest() != self.expect:
            raise self._changed()

    def _changed(self) -> UsageError:
        return UsageError(f"{self.path}: SHA-256 differs from its snapshot record; the cache changed after it was "
                          f"written; {self.fix}")


def cached_probs(run_dir, record: dict, kind: str, targets: int) -> np.ndarray:
    """A snapshot's whole cache of `kind`, checked before it is used (CachedProbs)."""
    cache = CachedProbs(run_dir, record, kind, targets)
    probs = cache.read(0, targets)
    cache.check()
    return probs


def mean_nll(probs: np.ndarray) -> float:
    return float(-np.log(probs.astype(np.float64)).mean())


def carries_bytes(targets: np.ndarray, bos_id: int) -> np.ndarray:
    """The targets bits per byte counts: all but BOS. A BOS target carries no bytes (the bytes it
    divides by are the documents' text), so it carries no nats either."""
    return targets != bos_id


def nats_to_bpb(nats: float, text_bytes: int | None) -> float | None:
    """Bits per byte of `nats` summed over the targets that carry bytes; None when the bytes are unknown."""
    return nats / (math.log(2) * text_bytes) if text_bytes else None


def bits_per_byte(probs: np.ndarray, targets: np.ndarray, bos_id: int, text_bytes: int | None) -> float | None:
    """The record's bits per byte: the nats of the targets that carry bytes, over their UTF-8 bytes."""
    if not text_bytes:
        return None
    return nats_to_bpb(float(-np.log(probs[carries_bytes(targets, bos_id)].astype(np.float64)).sum()), text_bytes)


def save_snapshot(run_dir: Path, record: dict, state: dict, fitness: np.ndarray, val: np.ndarray | None):
    """Write a snapshot's weights and caches, then its record (last: the record marks it complete)."""
    snap_dir, sid = run_dir / "snapshots", record["id"]
    atomic_torch_save(state, snap_dir / f"{sid}.pt")
    atomic_save_npy(snap_dir / f"{sid}.fitness.npy", probs_to_cache(fitness))
    if val is not None:
        atomic_save_npy(snap_dir / f"{sid}.val.npy", probs_to_cache(val))
    for key in ("weights", "fitness_probs", "val_probs"):
        record[key + "_sha256"] = sha256_file(run_dir / record[key]) if record[key] else None
    atomic_write_text(snap_dir / f"{sid}.json", sealed_json(record))


def snapshot_record(sid: str, base: int, cycle: int, step: int, base_epochs: float, fitness: np.ndarray,
                    val: np.ndarray, data: "RunData", val_probs: bool) -> dict:
    return {"id": sid, "base": base, "cycle": cycle, "step": step, "base_epochs": round(base_epochs, 6),
            "val_loss": mean_nll(val), "val_bpb": bits_per_byte(val, data.val[1:], data.bos_id, data.val_bytes),
            "fitness_loss": mean_nll(fitness), "weights": f"snapshots/{sid}.pt",
            "fitness_probs": f"snapshots/{sid}.fitness.npy", "val_probs": f"snapshots/{sid}.val.npy" if val_probs else None}


class PopulationTracker:
    """The uniform ensemble of every snapshot on disk so far, from the cached validation
    probabilities (read and checked as fit_prior.py and eval.py read them: cached_probs); each file
    is read once (a running sum), so cost stays linear in snapshots."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.records, self.prob_sum, self.all_cached = run_dir, [], 0.0, True

    def update(self) -> dict:
        seen = {r["id"] for r in self.records}
        for r in list_snapshots(self.run_dir):
            if r["id"] in seen:
                continue
            self.records.append(r)
            if r.get("val_probs"):
                targets = load_run(self.run_dir)["val"]["targets"]
                self.prob_sum = self.prob_sum + cached_probs(self.run_dir, r, "val", targets).astype(np.float64)
            else:
                self.all_cached = False  # one member without a cache: no uniform number rather than a wrong one
        n = len(self.records)
        best = min(self.records, key=lambda r: r["val_loss"]) if n else None
        return {"snapshots": n, "epochs_spent": epochs_spent(self.records),
                "uniform_val_loss": mean_nll(self.prob_sum / n) if n and self.all_cached else None,
                "best_single_val_loss": best["val_loss"] if best else None,
                "best_single": best["id"] if best else None}


def population_line(pop: dict) -> str:
    """The population so far, as the snapshot lines and the closing line print it."""
    uniform = f"{pop['uniform_val_loss']:.4f}" if pop["uniform_val_loss"] is not None else "n/a"
    return (f"{pop['snapshots']} snapshots | epochs spent {pop['epochs_spent']:.2f} | best single "
            f"{pop['best_single_val_loss']:.4f} ({pop['best_single']}) | uniform ensemble val {uniform} "
            f"({pop['snapshots']} forward pass{'es' if pop['snapshots'] != 1 else ''})")


HASH_CHUNK = 1 << 26  # bytes of tensor data one hashing thread takes at a time (64 MiB)


def state_sha256(state, threads: int | None = None) -> str:
    """SHA-256 of a checkpoint's content (stored in it as "sha256"): every key and plain value (its
    repr) and every tensor (dtype, shape, then the SHA-256 of each 64 MiB chunk of its bytes, in
    order), in the order the dicts hold them. Chunks are hashed on `threads` threads (hashlib lets
    go of the GIL; default: the cores this process may use, at most 8), a CUDA tensor's copied to
    the host a chunk at a time. The result depends on the content alone: not on the device, the
    thread count or how pickle laid the file out."""
    parts, chunks = [], []

    def walk(x):
        if torch.is_tensor(x):
            flat = x.detach().contiguous().reshape(-1).view(torch.uint8)
            parts.append(f"T{x.dtype}{tuple(x.shape)}:".encode())
            for s in range(0, flat.numel(), HASH_CHUNK):
                parts.append(len(chunks))
                chunks.append(flat[s:s + HASH_CHUNK])
        elif isinstance(x, dict):
            parts.append(b"D%d:" % len(x))
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            parts.append(b"%s%d:" % (b"L" if isinstance(x, list) else b"U", len(x)))
            for v in x:
                walk(v)
        else:
            text = repr(x).encode()
            parts.append(b"S%d:" % len(text) + text)

    walk(state)

    def digest(chunk: torch.Tensor) -> bytes:
        return hashlib.sha256(chunk.cpu().numpy()).digest()

    threads = threads or min(8, len(os.sched_getaffinity(0)))
    if threads > 1 and len(chunks) > 1 and sum(c.numel() for c in chunks) > HASH_CHUNK:
        with ThreadPoolExecutor(threads) as pool:
            digests = list(pool.map(digest, chunks))
    else:
        digests = [digest(c) for c in chunks]
    h = hashlib.sha256()
    for p in parts:
        h.update(digests[p] if isinstance(p, int) else p)
    return h.hexdigest()


class Checkpoints:
    """The resume state of one base: checkpoints/baseB.pt, written by the group's leader (atomic),
    read by every process of the group. It carries the SHA-256 of its own content ("sha256",
    state_sha256): one file, written in one atomic commit, so a kill at any moment leaves a
    checkpoint and its hash that agree, and a resume uses none whose content changed since."""

    def __init__(self, run_dir: Path, base: int, leader: bool):
        self.run_dir, self.base, self.leader = run_dir, base, leader
        self.path = run_dir / "checkpoints" / f"base{base}.pt"
        self.last = time.time()

    def due(self, minutes: float) -> bool:
        return time.time() - self.last > minutes * 60

    def save(self, state: dict):
        if self.leader:
            atomic_torch_save({**state, SEAL: state_sha256(state)}, self.path)
        self.last = time.time()

    def load(self, device) -> dict | None:
        """The checkpoint, its content checked against the SHA-256 in it (a format 2 run's carry none)."""
        if not self.path.exists():
            return None
        state = load_weights(self.path, device)
        fix = f"move it away and rerun the same command: base {self.base} trains again from its first step"
        seal = state.pop(SEAL, None) if isinstance(state, dict) else None
        if seal is None and sealed_run(load_run(self.run_dir)):
            raise UsageError(f"{self.path} carries no SHA-256 of its content, which this run's checkpoints carry; "
                             f"{fix}")
        if seal is not None and seal != state_sha256(state):
            raise UsageError(f"{self.path}: its content does not match the SHA-256 stored in it (the file changed "
                             f"after it was written); {fix}")
        return state

    def drop_unfinished(self, cycles_done: int, cycles: int) -> int:
        """Remove the snapshot files a killed run wrote after its last checkpoint (they are
        recomputed): each record (.json, the completion marker) first, its files after."""
        stale = [] if not self.leader else [
            p for c in range(cycles_done + 1, cycles + 1)
            for p in sorted((self.run_dir / "snapshots").glob(f"{snapshot_id(self.base, c)}.*"),
                            key=lambda p: p.suffix != ".json")]
        for p in stale:
            _commit(p.unlink)
        return len(stale)


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# =============================================================================================
# The prior and its members (--distil-from, and eval.py --prior), its population and its fit
# =============================================================================================

def read_prior(path: Path) -> dict:
    """A prior.json of fit_prior.py, read whole (eval.py --prior and --distil-from share it)."""
    if not path.is_file():
        raise UsageError(f"{path}: no such prior; fit one with `python fit_prior.py RUN_DIR`")
    try:
        prior = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not a whole q0 prior ({type(e).__name__}: {e}); fit it again with "
                         f"`python fit_prior.py RUN_DIR --out NEW.json`") from None
    if not isinstance(prior, dict) or prior.get("format") != "q0-prior":
        raise UsageError(f"{path} is not a q0 prior (fit one with `python fit_prior.py RUN_DIR`)")
    fix = "refit the prior: `python fit_prior.py RUN_DIR --out NEW.json`"
    if prior.get("version") not in PRIOR_VERSIONS:
        raise UsageError(f"{path} is a q0 prior of format {prior.get('version')}, and this code reads formats "
                         f"{', '.join(map(str, PRIOR_VERSIONS))}; {fix}")
    return check_seal(prior, path, fix, sealed=prior["version"] >= SEALED_PRIOR_VERSION)


PRIOR_VERSIONS, SEALED_PRIOR_VERSION = (1, 2), 2  # fit_prior.py writes 2: sealed (sealed_json); 1 was not


def check_prior(path: Path, prior: dict, refs: list[dict], fitness_sha256: str, than: str, records: dict | None = None,
                flag: str = "") -> list[tuple[Path, dict]]:
    """The prior at `path` against the runs that use it (eval.py --prior, --distil-from): fitted on
    their fitness tokens (`than` names those tokens and the fix), and each member in `refs` (its
    population, or a budget's) still there and unchanged since the fit (weights SHA-256). A member's
    record is looked up in `records` ({(run dir, id): record}, the runs given) or, without them, read
    from its run directory. Returns (run dir, record) for each ref. `flag` names the prior's flag."""
    who = f"{flag} {path}" if flag else str(path)
    if prior["fitness"]["sha256"] != fitness_sha256:
        raise UsageError(f"{who} was fitted on another fitness set than {than}")
    out = []
    for ref in refs:
        run_dir = (path.parent / ref["run"]).resolve()  # relative to the prior: the tree may move
        record_path = run_dir / "snapshots" / f"{ref['id']}.json"
        if records is not None:
            record = records.get((run_dir, ref["id"]))
        else:
            record = read_record(run_dir, ref["id"]) if record_path.is_file() else None
        if record is None:
            why = "whose run was not given; give that run too, or" if record_path.is_file() else "which is gone;"
            raise UsageError(f"{who} was fitted on snapshot {ref['id']} of {run_dir}, {why} refit the prior with "
                             f"fit_prior.py")
        if record["weights_sha256"] != ref["weights_sha256"]:
            raise UsageError(f"snapshot {run_dir}:{ref['id']} changed since {path} was fitted (weights SHA-256 "
                             f"differs); refit the prior with fit_prior.py")
        out.append((run_dir, record))
    return out


def distil_members(path: Path, k: int, data: RunData, seq_len: int) -> tuple[int, list[dict]]:
    """Budget K of the prior at `path` (0: its largest), checked against this run's data and the
    disk: (K, its members of nonzero weight, those a user of the ensemble runs, as [{run_dir,
    record, weight, run}], weights refitted for K, as eval.py scores them)."""
    prior = read_prior(path)
    if prior.get("tokenizer") != data.tokenizer:
        raise UsageError(f"--distil-from {path} is a prior of {prior.get('tokenizer')} tokens and this run's data "
                         f"is {data.tokenizer}; distil on the data its members were trained on (--data-dir)")
    budgets = {b["K"]: b for b in prior["budgets"]}
    k = k or max(budgets)
    if k not in budgets:
        larger = "larger than the prior, whose budgets are" if k > max(budgets) else "not a budget of the prior:"
        raise UsageError(f"--distil-k {k} is {larger} {sorted(budgets)}; choose one of them, or fit that budget "
                         f"with `python fit_prior.py RUN_DIR --budgets {k} --out PRIOR`")
    chosen = [(ref, w) for ref, w in zip(budgets[k]["members"], budgets[k]["weights_refitted"]) if w > 0]
    found = check_prior(path, prior, [ref for ref, _ in chosen], tokens_sha256(data.fitness),
                        "this run's (different --data-dir, --fitness-tokens or --train-tokens); use the flags of "
                        "the members' run", flag="--distil-from")
    out = []
    for (run_dir, record), (ref, w) in zip(found, chosen):
        member_run = load_run(run_dir)
        if member_run["vocab_size"] != data.vocab_size or member_run["seq_len"] < seq_len:
            raise UsageError(f"member {ref['id']} of {run_dir} has vocabulary {member_run['vocab_size']} and sequence "
                             f"length {member_run['seq_len']}; the student needs {data.vocab_size} and at most that "
                             f"--seq-len")
        out.append({"run_dir": run_dir, "record": record, "weight": w, "run": member_run})
    return k, out


def teacher_record(members: list[dict]) -> list[dict]:
    """An ensemble student's teacher as run.json records it (a resume must find the same members)."""
    return [{"snapshot": f"{d['run_dir']}:{d['record']['id']}", "weights_sha256": d["record"]["weights_sha256"],
             "weight": d["weight"]} for d in members]


# The population a prior is fitted on: every snapshot of one or more runs, and their fitness
# caches as one matrix (fit_prior.py fits prior.json on it; eval.py refits the curve's prior).

@dataclasses.dataclass
class Member:
    """One snapshot of a population: its run directory (as given), run.json and record."""
    run_dir: Path
    run_index: int  # which of the given runs; two runs may each have a "base 0"
    run: dict
    record: dict

    @property
    def name(self) -> str:
        return f"{self.run_dir}:{self.record['id']}"


def load_population(run_dirs) -> list[Member]:
    """Every snapshot of every run, in arrival order (cycle, run, base). Refuses runs whose
    fitness sets, validation sets or tokenisers differ: their probabilities do not compare."""
    members, first, named = [], None, {}
    for j, d in enumerate(run_dirs):
        d = Path(d)
        if named.setdefault(d.resolve(), d) is not d:  # its snapshots would count twice
            raise UsageError(f"{d} is named twice among the runs (also as {named[d.resolve()]}); give each run once")
        if not (d / "run.json").is_file():
            raise UsageError(f"{d}: not a run directory (no run.json); make one with `python train_q0.py`")
        run = load_run(d)
        ident = {"tokenizer": run.get("tokenizer"), "fitness": run["fitness"].get("sha256"),
                 "fitness targets": run["fitness"].get("targets"), "val": run["val"].get("sha256"),
                 "val targets": run["val"].get("targets")}
        if first is None:
            first = (d, ident)
        for key in ident:
            if ident[key] != first[1][key]:
                raise UsageError(f"{d} and {first[0]} have different {key} ({ident[key]} vs {first[1][key]}); "
                                 f"a prior or ensemble mixes only snapshots scored on the same tokens")
        recs = list_snapshots(d)
        if not recs:
            raise UsageError(f"{d}: no snapshots yet (a snapshot is written at the end of every cycle)")
        members += [Member(d, j, run, r) for r in recs]
    members.sort(key=lambda m: (m.record["cycle"], m.run_index, m.record["base"]))
    return members


def training_pids(run_dir) -> list[str]:
    """The pids of live trainers holding the run's lock (RunLock); none when it is free or unreadable."""
    try:
        fd = os.open(Path(run_dir) / ".lock", os.O_RDWR)
    except OSError:
        return []
    probe = object.__new__(RunLock)
    probe.fd = fd
    try:
        return probe.holders()
    finally:
        os.close(fd)


def unfinished_notes(members: list[Member], what: str, redo: str) -> list[str]:
    """A note per run still training (a live trainer holds its lock) or with fewer snapshots than
    its layout plans (stopped): `what` (this prior, this evaluation) covers only the snapshots so far."""
    notes = []
    for d in dict.fromkeys(m.run_dir for m in members):
        layout = next(m.run for m in members if m.run_dir == d).get("layout")
        have = sum(m.run_dir == d for m in members)
        planned = layout["bases"] * len(layout["cycles"]) if layout else have
        pids = training_pids(d)
        if pids:
            notes.append(f"note: {d} is still training (pid {', '.join(pids)}; {have} of its {planned} snapshots "
                         f"so far); {what} covers those {have}: {redo} when it finishes")
        elif have < planned:
            notes.append(f"note: {d} has {have} of its {planned} snapshots (still training?); {what} covers those "
                         f"{have}: {redo} when it finishes")
    return notes


def load_matrix(members: list[Member], kind: str) -> torch.Tensor:
    """(M, T) float32, one row per snapshot, filled one fp16 file at a time (peak = matrix + one
    file, each checked: CachedProbs). Rows in arrival order, so P[:n] is the population after
    n arrivals, without a copy."""
    targets = members[0].run[kind]["targets"]
    P = torch.empty((len(members), targets), dtype=torch.float32)
    for i, m in enumerate(members):
        P[i] = torch.from_numpy(cached_probs(m.run_dir, m.record, kind, targets))
    return P


def default_budgets(m: int) -> list[int]:
    ks = [1 << i for i in range(m.bit_length()) if (1 << i) < m]
    return ks + [m]


def parse_budgets(text: str | None, m: int) -> list[int]:
    if text is None:
        return default_budgets(m)
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UsageError(f"--budgets {text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not ks or ks[0] < 1 or ks[-1] > m:
        raise UsageError(f"--budgets {text}: each K must be between 1 and the population size {m}")
    return ks


# =============================================================================================
# Population layout: bases on process groups
# =============================================================================================
# The world is cut into G equal process groups (G = gcd(bases, world) unless --groups says);
# group g trains bases g, g+G, g+2G, ... one after another, with DDP inside the group. A base's
# seed, data order and global batch depend only on the base, so 1 GPU, 8 GPUs or 5 nodes give
# the same population (up to floating-point reduction order).

@dataclasses.dataclass
class Layout:
    world: int
    rank: int
    groups: int
    group_index: int
    group: object          # torch ProcessGroup, or None for a single-process group
    group_size: int
    group_rank: int
    bases: list[int]
    device_batch: int      # sequences per forward pass per process (choose_device_batch)


def choose_device_batch(given: int | None, cap: int, size: int, cycles: list) -> int:
    """--device-batch (`given`), checked; without it the largest, up to `cap`, that splits every
    cycle's batch over the group's processes (a placement choice: the global batch is the same)."""
    batches = sorted({c.batch_seqs for c in cycles})
    uneven = [b for b in batches if b % size]
    if uneven:
        raise UsageError(f"a batch of {uneven[0]} sequences does not split over {size} processes; choose a "
                         f"--batch-seqs whose batches ({', '.join(map(str, batches))}) divide by {size}, or another "
                         f"process count")
    per_process = math.gcd(*(b // size for b in batches))
    if given is not None:
        if per_process % given:
            failing = next(b for b in batches if (b // size) % given)
            raise UsageError(f"a batch of {failing} sequences does not split over {size} processes x "
                             f"--device-batch {given}; choose a --device-batch that divides "
                             f"{per_process}, or leave it out")
        return given
    return max(d for d in range(1, min(cap, per_process) + 1) if per_process % d == 0)


def make_layout(args, world: int, rank: int, cycles: list, cap: int, create_groups: bool = True) -> Layout:
    groups = args.groups or math.gcd(args.bases, world)
    if world % groups or args.bases % groups:
        raise UsageError(f"{args.bases} bases cannot be placed evenly on {groups} groups of a world of {world} "
                         f"processes: --groups must divide both the world size and --bases")
    size = world // groups
    device_batch = choose_device_batch(args.device_batch, cap, size, cycles)
    index = rank // size
    group = None
    for g in range(groups):  # every rank must take part in creating every group
        ranks = list(range(g * size, (g + 1) * size))
        pg = dist.new_group(ranks, timeout=datetime.timedelta(minutes=args.collective_timeout_minutes)) \
            if world > 1 and create_groups else None
        if g == index and size > 1:
            group = pg
    return Layout(world, rank, groups, index, group, size, rank - index * size,
                  list(range(index, args.bases, groups)), device_batch)


# =============================================================================================
# Preflight plan: what a run costs before it starts
# =============================================================================================
# `--dry-run` prints this and stops; every run prints it at the top and refuses a run whose files
# cannot fit on the disk. The model (whatever GPT(cfg) is), its teacher and the optimiser are built
# and stepped on fake tensors: shapes and dtypes only, no memory, no GPU, any size. The trace runs
# on the CPU under CPU bf16 autocast (what CUDA autocast does to matmuls); attention FLOPs are the
# dense square, what SDPA computes (a sliding window under FlexAttention does less).
# Pinned torch internals (torch 2.5 to 2.13), used here only: torch._subclasses.fake_tensor.
# FakeTensorMode; symbolic_shapes.ShapeEnv(allow_scalar_outputs) so an optimiser's .item() is a
# symbol; torch.utils.flop_counter.{FlopCounterMode, sdpa_flop_count, sdpa_backward_flop_count};
# torch.distributed._tools.mem_tracker.MemTracker.

SLOWRUN_SPLIT = dict(train=100_000_000, val=10_000_000, vocab=50257)  # assumed when the data is not there yet
GIB = 2 ** 30


def flop_formulas() -> dict:
    """FLOPs of the CPU SDPA kernel the trace runs into (FlopCounterMode knows the CUDA ones)."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten

    def fwd(q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(q, k, v)

    def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, q, k, v)
    return {aten._scaled_dot_product_flash_attention_for_cpu: fwd,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd}


def trace_step(exp: Experiment, cfg, args, device_batch: int, checkpoint: bool, distill: bool,
               memory: bool = True, teacher_dtype: torch.dtype = torch.float32, ddp: bool = False) -> dict:
    """One micro-batch of training on fake tensors: FLOPs of each part and (`memory`: the slow
    part) the peak memory of weights, gradients, optimiser state, teacher and activations together.
    `teacher_dtype`: the dtype the run holds its teacher in (held_dtype); `ddp`: the gradients live
    all run in DDP's buckets (a group of several processes), not only from the backward on."""
    formulas, flops, cpu, kernels = flop_formulas(), {}, torch.device("cpu"), dict(exp.KERNELS)
    exp.KERNELS["autocast"] = "bf16"  # the training code's own autocast, on the CPU
    try:
        return _trace(exp, cfg, args, device_batch, checkpoint, distill, memory, formulas, flops, cpu,
                      teacher_dtype, ddp)
    finally:
        exp.KERNELS.update(kernels)


def _trace(exp: Experiment, cfg, args, device_batch, checkpoint, distill, memory, formulas, flops, cpu,
           teacher_dtype, ddp) -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.utils.flop_counter import FlopCounterMode
    with FakeTensorMode(shape_env=ShapeEnv(allow_scalar_outputs=True)):
        model = exp.GPT(cfg)
        if checkpoint:
            if not hasattr(model, "checkpoint_blocks"):
                raise UsageError("this model has no activation checkpointing; drop --checkpoint-activations")
            model.checkpoint_blocks = True
        optimizer = exp.build_optimizer(model, args)
        for p in model.parameters():  # a first step creates the optimiser state; it counts the step's FLOPs
            p.grad = torch.zeros_like(p)
        with FlopCounterMode(display=False, custom_mapping=formulas) as fc:
            optimizer.step()
        flops["optimizer"] = fc.get_total_flops()
        optimizer.zero_grad(set_to_none=not ddp)  # DDP's buckets (the gradients' storage) stay all run
        # The teacher keeps requires_grad here (MemTracker hooks every parameter); run under no_grad
        # and without autocast's weight cache (micro_batch_loss), it holds what a run's frozen teacher holds.
        teacher = exp.GPT(cfg).eval() if distill else None
        for p in teacher.parameters() if teacher is not None else ():
            p.data = p.data.to(teacher_dtype)  # (Module.to swaps fake tensors, which it cannot here)
        idx = torch.randint(0, cfg.vocab_size, (device_batch, cfg.seq_len + 1))
        if teacher is not None:  # its forward alone, for its FLOPs (the step below runs it again)
            with torch.no_grad(), exp.autocast_for(cpu, cache=False), \
                    FlopCounterMode(display=False, custom_mapping=formulas) as fc:
                teacher(idx[:, :-1])
            flops["teacher"] = fc.get_total_flops()
        snapshot_teacher = exp.SnapshotTeacher(teacher) if teacher is not None else None
        with FlopCounterMode(display=False, custom_mapping=formulas) as fc:
            exp.micro_batch_loss(model, model, snapshot_teacher, idx, cpu, None, args.distil_alpha,
                                 args.distil_temperature).backward()
        flops["student"] = fc.get_total_flops() - flops.get("teacher", 0)
        model.zero_grad(set_to_none=not ddp)
        peak = None
        # memory in a pass of its own: under FlopCounterMode, checkpointed blocks keep what a run
        # frees (6.7x the memory per sequence in a small trace)
        if memory:
            tracker = MemTracker()
            tracker.track_external(model, optimizer, *([teacher] if teacher is not None else []))
            with tracker:
                exp.micro_batch_loss(model, model, snapshot_teacher, idx, cpu, None, args.distil_alpha,
                                 args.distil_temperature).backward()
                optimizer.step()
            peak = max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
        params = sum(p.numel() for p in model.parameters())
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
    tokens = device_batch * cfg.seq_len
    return {"params": params, "optimizer_state_bytes": state, "peak_bytes": peak,
            "student_flops_per_token": flops["student"] / tokens,
            "teacher_flops_per_token": flops.get("teacher", 0) / tokens, "optimizer_flops": flops["optimizer"]}


@dataclasses.dataclass
class PlanTarget:
    processes: int
    device: str             # "cuda" or "cpu": what the snapshots are saved in (bf16 or fp32)
    train_tokens: int
    fitness_tokens: int
    val_tokens: int
    assumed_data: bool
    device_gib: float | None = None  # the memory of each process's device (None: not checked)


# What a CUDA process holds beyond the traced tensors: memory outside torch's allocator (the CUDA
# context, NCCL's buffers, cuBLAS workspaces) and the caching allocator's rounding and
# fragmentation (small with expandable segments, which train_q0 turns on). Both are assumptions
# until a GPU measures them: benchmarks/gpu_check.py prints the measured peak beside the plan's.
CUDA_OUTSIDE_ALLOCATOR_GIB = 2.0
ALLOCATOR_SLACK = 0.05
H100_GIB = 79.6          # an H100 SXM 80GB as torch sees it (81,559 MiB): what --plan-gpus plans for
REFERENCE_MFU = 0.32     # the reference's record in this plan's FLOP convention (3,200 GPU-hours)


def held_dtype(device_type: str) -> torch.dtype:
    """The dtype of weights a run holds but does not train (snapshots, teachers): bf16 on CUDA, as
    the reference holds its teacher and saves its snapshots; exact fp32 on a CPU."""
    return torch.bfloat16 if device_type == "cuda" else torch.float32


def planned_bytes(traced: float, device: str) -> float:
    """The traced peak with what a CUDA process holds beyond it (CUDA_OUTSIDE_ALLOCATOR_GIB, ALLOCATOR_SLACK)."""
    return traced * (1 + ALLOCATOR_SLACK) + CUDA_OUTSIDE_ALLOCATOR_GIB * GIB if device == "cuda" else traced


class Progress:
    """A line before a slow trace and one when it ends, and a line every `every` seconds in
    between, so a slow trace never looks like a hang (--dry-run at the record's size: minutes)."""

    def __init__(self, say=None, every: float = 30.0):
        self.say, self.every = say, every

    @contextlib.contextmanager
    def step(self, what: str):
        if self.say is None:
            yield
            return
        t0, done = time.perf_counter(), threading.Event()
        self.say(f"plan: tracing {what} on fake tensors ...")

        def tick():
            while not done.wait(self.every):
                self.say(f"plan: ... still tracing {what} ({time.perf_counter() - t0:.0f} s)")
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
        self.say(f"plan: traced {what} in {time.perf_counter() - t0:.0f} s")


def plan_run(exp: Experiment, args, cfg, cycles: list, target: PlanTarget, device_batch: int, teachers: int = 1,
             traces=None, progress: Progress | None = None) -> dict:
    """The plan; memory is traced for CUDA targets and --dry-run (a CPU run's tests skip its cost).
    `traces`: (distilling step, plain step) from trace_step, to reuse them for several layouts.
    `teachers`: an ensemble's K, at most K members' forward passes per token (--distil-from)."""
    progress = progress or Progress()
    distills = any(exp.distils(args, c.index) for c in cycles)
    teachers = teachers if args.distil_from else 1
    memory = target.device == "cuda" or args.dry_run
    groups = args.groups or math.gcd(args.bases, target.processes)
    group_size = target.processes // groups
    how = dict(teacher_dtype=held_dtype(target.device), ddp=group_size > 1)  # as the run will hold them
    if traces is not None:
        step, plain = traces if distills else (traces[1], traces[1])
        memory = memory and step["peak_bytes"] is not None and plain["peak_bytes"] is not None
    else:
        with progress.step(f"a {'distilling ' if distills else ''}micro-batch of {device_batch} x {cfg.seq_len}"):
            step = trace_step(exp, cfg, args, device_batch, args.checkpoint_activations, distills, memory, **how)
        plain = step
        if distills and memory:
            with progress.step(f"a plain micro-batch of {device_batch} x {cfg.seq_len}"):
                plain = trace_step(exp, cfg, args, device_batch, args.checkpoint_activations, False, **how)
    rate = args.peak_tflops * 1e12 * args.mfu  # FLOP/s per process
    muon = plain["optimizer_flops"] / group_size  # orthogonalisation sharded over the group
    fwd = step["teacher_flops_per_token"] or plain["student_flops_per_token"] / 3  # a forward is ~1/3 of fwd+bwd

    def step_seconds(c, distill: bool) -> float:
        per_token = plain["student_flops_per_token"] + (teachers * step["teacher_flops_per_token"] if distill else 0.0)
        return (c.batch_seqs * cfg.seq_len * per_token / group_size + muon) / rate

    eval_seconds = (target.fitness_tokens + target.val_tokens) * fwd / group_size / rate
    base_seconds = sum(c.steps * step_seconds(c, exp.distils(args, c.index)) + eval_seconds for c in cycles)
    epoch_seconds = (target.train_tokens * plain["student_flops_per_token"] / group_size
                     + target.train_tokens / (args.batch_seqs * cfg.seq_len) * muon) / rate
    weight_bytes = step["params"] * held_dtype(target.device).itemsize
    head_bytes = cfg.padded_vocab * cfg.d_model * held_dtype(target.device).itemsize
    bodies = -(-teachers // group_size)  # member i's body on group rank i mod W (EnsembleTeacher)
    cache_bytes = 2 * (target.fitness_tokens + (target.val_tokens if args.val_probs else 0))
    checkpoint_bytes = 4 * step["params"] + step["optimizer_state_bytes"]
    snapshots = args.bases * args.cycles
    # the trace holds one teacher; an ensemble spread over the group adds, per process, the
    # bodies of its share of the members and the other members' heads (bf16 on CUDA)
    traced = [plain["peak_bytes"]] + ([step["peak_bytes"] + (bodies - 1) * weight_bytes
                                       + (teachers - bodies) * head_bytes] if distills else []) if memory else []
    planned = [planned_bytes(b, target.device) / GIB for b in traced]
    return {
        "target": dataclasses.asdict(target), "device_batch": device_batch,
        "checkpoint_activations": args.checkpoint_activations, "mfu": args.mfu, "peak_tflops": args.peak_tflops,
        "epochs_per_base": epochs_per_base(cycles), "groups": groups, "group_size": group_size, "params": step["params"],
        "student_flops_per_token": plain["student_flops_per_token"], "teacher_flops_per_token": fwd,
        "optimizer_flops_per_step": plain["optimizer_flops"],
        "step_tokens": args.batch_seqs * cfg.seq_len,
        "traced_gib": max(traced) / GIB if traced else None,
        "peak_gib": planned[0] if planned else None,
        "peak_gib_distilling": planned[1] if len(planned) > 1 else None,
        "planned_gib": max(planned) if planned else None,  # what the device must hold
        "ddp_buckets": how["ddp"], "teacher_dtype": str(how["teacher_dtype"]).removeprefix("torch."),
        "teachers": teachers, "teacher_bodies": bodies,
        "snapshot_gib": (weight_bytes + cache_bytes) / GIB, "snapshots": snapshots,
        "disk_gib": (snapshots * (weight_bytes + cache_bytes) + (args.bases + groups) * checkpoint_bytes) / GIB,
        "hours_per_epoch": epoch_seconds / 3600,
        "hours": math.ceil(args.bases / groups) * base_seconds / 3600,
    }


@contextlib.contextmanager
def peak_memory(device: torch.device, held: list):
    """Measures the peak bytes this process holds while the block runs (`.bytes` once it ends): on
    CUDA the allocator's own count; on a CPU torch's MemTracker over `held` (modules, optimisers)
    and every tensor the block makes."""
    result = argparse.Namespace(bytes=0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = torch.cuda.max_memory_allocated(device)
        return
    from torch.distributed._tools.mem_tracker import MemTracker
    tracker = MemTracker()
    tracker.track_external(*held)
    # MemTracker hooks every parameter of a module it sees run: a frozen teacher's, too (under
    # no_grad they build no graph either way)
    frozen = [p for m in held if isinstance(m, torch.nn.Module) for p in m.parameters() if not p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(True)
        # eager: dynamo meeting MemTracker's dispatch mode would leave GPT.forward uncompiled for good
        with torch.compiler.set_stance("force_eager"), tracker:
            yield result
    finally:
        for p in frozen:
            p.requires_grad_(False)
    result.bytes = max(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())


def check_memory(plan: dict, device_gib: float | None = None):
    """Refuse, with the numbers, a run whose planned peak does not fit its device."""
    device_gib = device_gib or plan["target"]["device_gib"]
    if plan["planned_gib"] is None or device_gib is None or plan["planned_gib"] <= device_gib:
        return
    raise UsageError(f"the plan needs {plan['planned_gib']:.1f} GiB per process at --device-batch "
                     f"{plan['device_batch']} and the device has {device_gib:.1f} GiB; pass a smaller "
                     f"--device-batch or --checkpoint-activations (python train_q0.py --dry-run shows the plan)")


def gib_text(x: float) -> str:
    return f"{x:.1f} GiB" if x >= 0.1 else f"{x * 1024:.1f} MiB"


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h >= 1 else f"{h * 60:.1f} min" if h >= 1 / 60 else f"{h * 3600:.1f} s"


def _memory_line(plan: dict) -> str:
    head = (f"plan: peak memory per process at --device-batch {plan['device_batch']}"
            f"{' with' if plan['checkpoint_activations'] else ' without'} activation checkpointing: ")
    if plan["peak_gib"] is None:
        return head + "traced for CUDA runs and --dry-run"
    held = (["DDP's gradient buckets"] if plan["ddp_buckets"] else []) + \
        ([f"a {plan['teacher_dtype']} teacher"] if plan["peak_gib_distilling"] is not None else [])
    line = head + gib_text(plan["peak_gib"]) + (f", distilling {gib_text(plan['peak_gib_distilling'])}"
                                            if plan["peak_gib_distilling"] is not None else "")
    line += f" (traced {gib_text(plan['traced_gib'])}" + (f" with {' and '.join(held)}" if held else "")
    if plan["target"]["device"] == "cuda":
        line += (f", + {ALLOCATOR_SLACK:.0%} allocator slack + {CUDA_OUTSIDE_ALLOCATOR_GIB:g} GiB outside "
                 f"torch's allocator")
    line += "; an estimate)"
    device = plan["target"]["device_gib"]
    if device is not None:
        spare = device - plan["planned_gib"]
        line += (f" | the device: {gib_text(device)}, " + (f"{gib_text(spare)} to spare" if spare >= 0 else
                                                      f"DOES NOT FIT by {gib_text(-spare)}"))
    return line


def plan_lines(plan: dict, disk: str | None = None) -> list[str]:
    """The plan as a person reads it; `disk`: disk_line's verdict on the machine it runs on."""
    t = plan["target"]
    hours = (f"plan: at {plan['mfu']:.0%} MFU of {plan['peak_tflops']:g} TFLOP/s per process: "
             f"{_hours(plan['hours_per_epoch'])} per epoch of one base, {_hours(plan['hours'])} for the population")
    if plan["mfu"] != REFERENCE_MFU:  # the assumption beside what the reference achieved
        scale = plan["mfu"] / REFERENCE_MFU
        hours += (f"; at the reference record's {REFERENCE_MFU:.0%} (3,200 GPU-hours in this FLOP count): "
                  f"{_hours(plan['hours_per_epoch'] * scale)} and {_hours(plan['hours'] * scale)}")
    return [
        f"plan: {plan['params']:,} parameters | {t['processes']} process(es) on {t['device']}, {plan['groups']} group(s)"
        f" of {plan['group_size']} | data {t['train_tokens']:,} train, {t['fitness_tokens']:,} fitness, "
        f"{t['val_tokens']:,} val tokens" + (" (assumed: Slowrun's split; the data is not there yet)"
                                             if t["assumed_data"] else ""),
        f"plan: FLOPs per token: student {plan['student_flops_per_token']:.3e} (forward + backward), teacher "
        f"{plan['teacher_flops_per_token']:.3e} (forward) | per step of {plan['step_tokens']:,} tokens: student "
        f"{plan['step_tokens'] * plan['student_flops_per_token']:.3e}, teacher "
        f"{plan['step_tokens'] * plan['teacher_flops_per_token'] * plan['teachers']:.3e} (distilling"
        + (f": {plan['teachers']} ensemble members at most, {plan['teacher_bodies']} held by each process"
           if plan["teachers"] > 1 else "") + "), Muon "
        f"{plan['optimizer_flops_per_step']:.3e} ({plan['optimizer_flops_per_step'] / plan['group_size']:.3e} on "
        f"each of {plan['group_size']} process(es): sharded)",
        _memory_line(plan),
        f"plan: disk: {plan['snapshots']} snapshots x {gib_text(plan['snapshot_gib'])} (weights and caches) + "
        f"checkpoints = {gib_text(plan['disk_gib'])}" + (f" | {disk}" if disk else ""),
        hours + " (estimates)",
    ]


def _disk_need(plan: dict, run_dir: Path) -> tuple[float, float, Path]:
    """(bytes the run still needs, bytes free, the folder measured)."""
    have = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file()) if run_dir.exists() else 0
    place = run_dir
    while not place.exists():
        place = place.parent
    return plan["disk_gib"] * GIB - have, shutil.disk_usage(place).free, place


def disk_line(plan: dict, run_dir: Path) -> str:
    need, free, place = _disk_need(plan, run_dir)
    verdict = "it fits" if need <= free else "this machine CANNOT hold the run there (a run is refused)"
    return f"{run_dir} ({place}: {gib_text(free / GIB)} free) needs {gib_text(max(need, 0) / GIB)} more: {verdict}"


def check_disk(plan: dict, run_dir: Path):
    """Refuse, with the numbers, a run whose snapshots, caches and checkpoints cannot fit."""
    need, free, place = _disk_need(plan, run_dir)
    if need > free:
        raise UsageError(f"the run needs {gib_text(need / GIB)} more for {plan['snapshots']} snapshots "
                         f"({gib_text(plan['snapshot_gib'])} each) and checkpoints, and {place} has "
                         f"{gib_text(free / GIB)} free; free space, choose another --runs-dir, or pass --val-probs 0")


# =============================================================================================
# Processes: process groups, heartbeats, the start and the finish of a training run
# =============================================================================================

def setup_distributed(timeout_minutes: float, cuda: bool | None = None) -> tuple[int, int, torch.device]:
    """(world, rank, this process's device): NCCL on cuda:LOCAL_RANK under torchrun, else gloo on
    the CPU. `cuda`: whether to use CUDA (default: where it is available; eval.py --device cpu: not)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if dist.is_initialized():  # a group the caller started (the tests' fake world of 8)
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return dist.get_world_size(), dist.get_rank(), device
    if "RANK" not in os.environ:
        return 1, 0, torch.device("cuda" if cuda else "cpu")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        watch_launcher()
    timeout = datetime.timedelta(minutes=timeout_minutes)  # torch's default is 30 minutes (gloo)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timeout)
        return dist.get_world_size(), dist.get_rank(), torch.device("cuda", local)
    dist.init_process_group("gloo", timeout=timeout)
    return dist.get_world_size(), dist.get_rank(), torch.device("cpu")


def watch_launcher(every_s: float = 1.0):
    """Under torchrun, this worker stops when its launcher is gone. torchrun starts each worker in
    a session of its own, so a launcher killed with its process group (or a node's agent killed)
    leaves its workers running, waiting in a collective for the --startup-timeout-minutes or the
    --collective-timeout-minutes for peers that no launcher will restart. The worker ends at once,
    as a kill would end it: the same command resumes from the last checkpoint."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:  # an orphan is adopted by init or a subreaper
            time.sleep(every_s)
        print(f"error: rank {os.environ.get('RANK', '?')} stops: torchrun's launcher (pid {launcher}) is gone; "
              f"rerun the same command to resume", file=sys.stderr, flush=True)  # one line a worker
        os._exit(2)

    threading.Thread(target=watch, daemon=True, name="q0-launcher-watch").start()


class PeerTimeout(UsageError):
    pass


class Peers:
    """Signs of life of every process through the rendezvous store: a daemon thread bumps this
    process's counter every few seconds, and a stopped (hung node) or dead process stops bumping.
    The same thread watches the others' counters while this process trains: a process silent for
    the collective timeout is named at once by the lowest-ranked live process, which then ends
    (torchrun stops the rest), however long the other process groups would still train. A failed
    collective names the silent rank the same way, and the end of training waits for slower
    process groups as long as they are alive, not for a fixed time."""

    def __init__(self, world: int, rank: int, timeout_minutes: float, store=None):
        self.world, self.rank, self.timeout_s = world, rank, timeout_minutes * 60
        self.beat_s = min(2.0, self.timeout_s / 4)
        self.watch_s = max(self.beat_s, self.timeout_s / 8)  # world^2 store reads per watch, all processes
        self.watching = True   # off once this process reports a failure itself, or waits in join()
        self.log = None        # the run's log (RunLog), once it is open: a hung peer is written there too
        self.store = store or dist.distributed_c10d._get_default_store()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name="q0-heartbeat")
        self.thread.start()

    def _beat(self):
        seen, next_watch = {}, time.monotonic() + self.watch_s
        while not self.stopping.is_set():
            try:
                self.store.add(f"q0/alive/{self.rank}", 1)
                if self.watching and time.monotonic() >= next_watch:
                    self._watch(seen)
                    next_watch = time.monotonic() + self.watch_s
            except Exception:  # noqa: BLE001 - the store is gone: the job is ending anyway
                return
            self.stopping.wait(self.beat_s)

    def _watch(self, seen: dict):
        """`seen`: rank -> (its last counter, when it last changed). Ranks that have finished
        (q0/done) are not watched: they stop beating when they leave."""
        now = time.monotonic()
        unfinished = [r for r in range(self.world) if r != self.rank and not self.store.add(f"q0/done/{r}", 0)]
        for r, n in self._beats(unfinished).items():
            if seen.get(r, (None,))[0] != n:
                seen[r] = (n, now)
        silent = [r for r in unfinished if now - seen[r][1] > self.timeout_s]
        if silent and self.watching and self.rank == min(set(range(self.world)) - set(silent)):
            self._report(silent)

    def _report(self, silent: list[int]):
        """Said once, by one process, on stderr and in the run's log; then this process ends, as a
        collective that timed out would end it (nothing half-written is used: the same command
        resumes from the last checkpoint)."""
        message = f"error: {self.hung_message(silent)}"
        if self.log is not None:
            with contextlib.suppress(Exception):
                self.log.line(message, echo=False)
        print(message, file=sys.stderr, flush=True)
        os._exit(2)

    def close(self):
        """Stop beating before the process group (and its store) goes: a store call in flight at
        teardown aborts the process ("terminate called without an active exception")."""
        self.stopping.set()
        self.thread.join()

    def _beats(self, ranks) -> dict[int, int]:
        return {r: self.store.add(f"q0/alive/{r}", 0) for r in ranks}

    def silent(self) -> list[int]:
        """Ranks that show no sign of life over three beats."""
        try:
            before = self._beats(range(self.world))
            time.sleep(3 * self.beat_s)
            return [r for r, n in self._beats(range(self.world)).items() if n == before[r]]
        except Exception:  # noqa: BLE001 - no store, no names
            return []

    def join(self):
        """Wait until every process has finished, failing if an unfinished one shows no sign of
        life for the collective timeout. Then each process says it is leaving, and rank 0 (which
        hosts the store when no torchrun agent does) leaves last: no process polls a store that is gone."""
        self.watching = False  # from here the wait itself names a silent process
        try:
            self.store.add(f"q0/done/{self.rank}", 1)
            self._wait("done", range(self.world), fail=True)
            if self.rank == 0:
                self._wait("left", range(1, self.world), fail=False)
            else:
                self.store.add(f"q0/left/{self.rank}", 1)
        except (RuntimeError, OSError):  # the store went with its host: rank 0 failed or was killed
            if self.rank == 0:
                raise
            raise PeerTimeout("rank 0, which held the job's rendezvous store, exited before this process "
                              "finished (its own error says why); rerun the same command to resume") from None

    def _wait(self, key: str, ranks, fail: bool):
        """Until every rank in `ranks` has bumped q0/<key>/<rank>; one silent for the timeout fails the
        run (`fail`) or is left behind (a process that finished its work and died leaving)."""
        last = {r: (-1, time.monotonic()) for r in ranks}
        while waiting := [r for r in ranks if self.store.add(f"q0/{key}/{r}", 0) == 0]:
            now = time.monotonic()
            for r, n in self._beats(waiting).items():
                if n != last[r][0]:
                    last[r] = (n, now)
                elif now - last[r][1] > self.timeout_s:
                    if fail:
                        raise PeerTimeout(self.hung_message([r]))
                    return
            time.sleep(min(1.0, self.beat_s))

    def hung_message(self, ranks: list[int]) -> str:
        return (f"rank {', '.join(map(str, ranks))} stopped answering for --collective-timeout-minutes "
                f"{self.timeout_s / 60:g} (its process or node hung or died); rerun the same command to resume")


@dataclasses.dataclass
class Run:
    """A training run as start() resolved it, once: what every base's trainer is handed. Nothing
    writes into `args` after parse_args; what the flags leave open (the device batch, the teacher's
    budget K) is resolved here, in the layout and the members."""
    args: argparse.Namespace
    cfg: object                    # the experiment's GPTConfig
    data: RunData
    cycles: list                   # the experiment's Cycles, the same for every base
    layout: Layout
    run_dir: Path
    log: RunLog
    device: torch.device
    distil: list[dict] | None = None   # --distil-from's members (distil_members), or None
    distil_k: int = 0                  # the prior's budget they are
    plan: dict | None = None           # the preflight plan (rank 0)
    lock: RunLock | None = None        # held (its fd open) until this process exits

    @contextlib.contextmanager
    def training(self):
        """A UsageError while training (a diverged loss, an unloadable checkpoint) is said once per
        group, by its leader, and written to log.txt too; torchrun stops the other processes."""
        try:
            yield
        except UsageError as e:
            if self.layout.group_rank == 0:
                with contextlib.suppress(UsageError):  # the log itself may be what failed
                    self.log.line(f"error: {e}", echo=False)
            else:
                e.quiet = True
            raise


class _Process:
    """This process's place in the job, for the error report: its rank, and its peers' heartbeats."""
    rank: int = 0
    peers: Peers | None = None
    started: bool = False  # past start(): every process speaks for itself


PROCESS = _Process()


def reports_errors(main):
    """train_q0.main's error convention: a UsageError is one `error:` line (said by rank 0 before the
    run starts, then by whichever process meets it) and exit code 2; a failed collective whose peer
    stopped answering names that rank. An OSError the machine caused (a full disk under a print, a
    log line) is one line too (shards.machine_error); Ctrl-C is one line from rank 0 and exit code
    130: the same command resumes. The heartbeats stop last."""
    @functools.wraps(main)
    def run(argv=None) -> int:
        PROCESS.rank, PROCESS.peers, PROCESS.started = int(os.environ.get("RANK", "0")), None, False
        try:
            return main(argv) or 0
        except KeyboardInterrupt:
            if PROCESS.rank == 0:
                shards.say("error: interrupted (Ctrl-C); rerun the same command to resume from the last checkpoint "
                           "(nothing is lost but the steps since)")
            return shards.INTERRUPTED
        except (UsageError, OSError) as e:
            error = e if isinstance(e, UsageError) else shards.machine_error(e)
            if error is None:
                raise
            if not getattr(e, "quiet", False) and (PROCESS.started or PROCESS.rank == 0):
                shards.say(f"error: {error}")
            return 2
        except RuntimeError:  # a collective that failed (torch.distributed's errors are RuntimeErrors)
            peers = PROCESS.peers
            if peers:
                peers.watching = False  # this process names the silent rank itself
            silent = [r for r in peers.silent() if r != PROCESS.rank] if peers else []
            if not silent:
                raise
            print(f"error: {peers.hung_message(silent)}", file=sys.stderr, flush=True)
            return 2
        finally:
            if PROCESS.peers is not None:
                PROCESS.peers.close()
    return run


def _refused(world: int, error: BaseException | None):
    """Every process learns whether all accepted the run (rank 0 checks the run directory) before
    anything starts; a refusal is said once, by rank 0, and every process exits with code 2."""
    if world > 1:
        failed = all_reduce_(torch.tensor([0.0 if error is None else 1.0])).item() > 0
        if failed:
            _teardown()
            if error is None or PROCESS.rank != 0:
                error = UsageError("refused on another rank")
                error.quiet = True
    if error is not None:
        raise error


def _shape(exp: Experiment, args, train_tokens: int, vocab_size: int, world: int, rank: int,
           create_groups: bool = True):
    """The model config, the cycles and the layout: a run's and a dry run's, the same way."""
    cfg = exp.model_config(args, vocab_size)
    cycles = exp.plan_cycles(args, train_tokens)
    return cfg, cycles, make_layout(args, world, rank, cycles, exp.device_batch_cap(args), create_groups)


def device_memory_gib(args, device: torch.device) -> float | None:
    """What each process's device holds (--device-memory-gib, else a CUDA device's own; None: unchecked)."""
    if args.device_memory_gib:
        return args.device_memory_gib
    return torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None


def start(exp: Experiment, args, non_population: set) -> Run:
    """Processes, data, the layout, the teacher's members, the plan, the run directory and its
    lock, the log and its header: everything before the first step, checked on every process.
    Every process traces the plan itself (each checks its own device), so none waits in a
    collective while another traces; the start's collectives have --startup-timeout-minutes."""
    world, rank, device = setup_distributed(args.startup_timeout_minutes)
    PROCESS.rank = rank
    # heartbeats need a real rendezvous store (the tests' fake world of 8 has one without counters)
    if world > 1 and dist.get_backend() != "fake":
        PROCESS.peers = Peers(world, rank, args.collective_timeout_minutes)
    run_dir, lock, plan, resumed, error = Path(args.runs_dir) / args.run_name, None, None, False, None
    try:
        data = load_data(args)
        if _older_carve(run_dir, data):
            data = load_data(args, whole_documents=True)
        cfg, cycles, layout = _shape(exp, args, data.train.size, data.vocab_size, world, rank)
        distil_k, distil = distil_members(Path(args.distil_from), args.distil_k, data, args.seq_len) \
            if args.distil_from else (0, None)  # every rank checks and loads them
        population = population_config(args, non_population, teacher_record(distil) if distil else None)
        target = PlanTarget(world, device.type, data.train.size, data.fitness.size, data.val.size, False,
                            device_memory_gib(args, device))
        plan = plan_run(exp, args, cfg, cycles, target, layout.device_batch, teachers=distil_k or 1,
                        progress=Progress(_say) if rank == 0 and target.device == "cuda" else None)
        check_memory(plan)
        if rank == 0:
            check_disk(plan, run_dir)
            run_dir, resumed, lock = prepare_run_dir(args, data, cfg, cycles, population, code_files(exp))
    except UsageError as e:
        error = e
    except OSError as e:  # a read-only --runs-dir, a full disk
        error = UsageError(f"cannot write {e.filename or args.runs_dir} ({e.strerror}); choose another --runs-dir")
    _refused(world, error)
    PROCESS.started = True
    if rank > 0 and layout.group_rank == 0:
        lock = RunLock(run_dir, rank)  # every writer holds its slot of the run's lock for its life
    run = Run(args, cfg, data, cycles, layout, run_dir, _open_log(args, run_dir, layout), device, distil,
              distil_k, plan, lock)
    if PROCESS.peers is not None:
        PROCESS.peers.log = run.log
    if rank == 0:
        _header(exp, run, resumed, world)
    if world > 1:
        barrier()
    return run


def _older_carve(run_dir: Path, data: RunData) -> bool:
    """Whether the run being resumed carved its fitness set by whole documents: a run of format 3
    or older whose recorded fitness tokens are not this carve's (a run whose documents ended at
    --fitness-tokens has the same tokens either way)."""
    if not (run_dir / "run.json").is_file():
        return False
    run = load_run(run_dir)
    return run.get("version") in WHOLE_DOCUMENT_FITNESS and \
        run.get("fitness", {}).get("sha256") != data.describe["fitness"]["sha256"]


def _say(line: str):
    print(line, flush=True)


def _open_log(args, run_dir: Path, layout: Layout) -> RunLog:
    wandb_run = None
    if args.wandb_project and layout.rank == 0:
        try:
            import wandb
        except ImportError:
            raise UsageError("--wandb-project needs wandb: pip install wandb") from None
        wandb_run = wandb.init(project=args.wandb_project, name=args.run_name, config=vars(args), resume="allow")
    return RunLog(run_dir, enabled=layout.group_rank == 0, wandb_run=wandb_run)


def _header(exp: Experiment, run: Run, resumed: bool, world: int):
    args, log, layout, data = run.args, run.log, run.layout, run.data
    if resumed:
        log.line(f"resuming {run.run_dir} (world size {world})")
    else:
        log_header(log, args, world, code_files(exp))
    for line in plan_lines(run.plan):
        log.line(line)
    epochs = run.plan["epochs_per_base"]
    log.line(f"run {run.run_dir} | {args.bases} bases x {args.cycles} cycles = {args.bases * args.cycles} snapshots | "
             f"{epochs:g} epochs per base, budget {epochs * args.bases:g} epochs | train {data.train.size:,} "
             f"tokens, fitness {data.fitness.size:,}, val {data.val.size:,} | {layout.groups} group(s) of "
             f"{layout.group_size} process(es) on {run.device.type}")
    if run.distil:
        log.line(f"teacher: {args.distil_from}, budget K={run.distil_k}: " + ", ".join(
            f"{d['run_dir'].name}:{d['record']['id']} {d['weight']:.3f}" for d in run.distil)
            + f" | {len(run.distil)} teacher forward passes per training token | student from {args.distil_init}")


def finish(run: Run) -> int:
    """Wait for slower process groups while they are alive, then (rank 0) the manifest and the
    population's closing line; the process group goes last."""
    if PROCESS.peers is not None:
        PROCESS.peers.join()
    if run.layout.rank == 0:
        records = list_snapshots(run.run_dir)
        manifest = {**load_run(run.run_dir), "snapshots": records}
        atomic_write_text(run.run_dir / "manifest.json", sealed_json(manifest))
        pop = PopulationTracker(run.run_dir).update()
        run.log.line(f"done: {population_line(pop)} | next: python fit_prior.py {run.run_dir} && "
                     f"python eval.py {run.run_dir} --prior {run.run_dir}/prior.json")
    if run.layout.world > 1:
        _teardown()
    return 0


def _teardown():
    """The heartbeats stop before the process group (and its store) goes."""
    if PROCESS.peers is not None:
        PROCESS.peers.close()
        PROCESS.peers = None
    dist.destroy_process_group()


def dry_run(exp: Experiment, args) -> int:
    """The plan alone, wherever it runs: from the data when it is there, else (slowrun) from
    Slowrun's split. It says whether this machine's --runs-dir could hold the run; a run is still
    refused up front when it cannot."""
    try:
        data = load_data(args)
        sizes, vocab, assumed = (data.train.size, data.fitness.size, data.val.size), data.vocab_size, False
    except DataError:
        if args.preset != "slowrun":
            raise
        fitness = args.fitness_tokens
        sizes = (args.train_tokens or SLOWRUN_SPLIT["train"] - fitness, fitness, args.val_tokens or SLOWRUN_SPLIT["val"])
        vocab, assumed = SLOWRUN_SPLIT["vocab"], True
    processes = args.plan_gpus or int(os.environ.get("WORLD_SIZE", "1"))
    cuda = bool(args.plan_gpus) or torch.cuda.is_available()
    device_gib = args.device_memory_gib or (H100_GIB if args.plan_gpus else
                                            device_memory_gib(args, torch.device("cuda")) if cuda else None)
    cfg, cycles, layout = _shape(exp, args, sizes[0], vocab, processes, 0, create_groups=False)
    target = PlanTarget(processes, "cuda" if cuda else "cpu", *sizes, assumed, device_gib)
    plan = plan_run(exp, args, cfg, cycles, target, layout.device_batch, teachers=args.distil_k or 1,
                    progress=Progress(_say))
    print("\n".join(plan_lines(plan, disk_line(plan, Path(args.runs_dir) / args.run_name))), flush=True)
    return 0
