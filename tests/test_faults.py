"""Crash consistency: the trainer killed just before each of its file commits (a rename, link or
unlink; Q0_FAULT=kill:N, data/shards.py's fault hooks), then the same command rerun. Every rerun
must end bitwise identical to an uninterrupted run, with no stray file. The default suite runs a
few commits; `pytest -m slow tests/test_faults.py` runs the whole campaign on 1 process, on
torchrun with 2 processes and on two loopback "nodes" (c10d rendezvous on 127.0.0.1), and prints
its counts: trials, identical, corrupt, hung."""
import contextlib
import gc
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import (REPO, TINY, TORCHRUN_2, documents, run_command, run_train, shakespeare_paragraphs,
                      write_bytes_shard)

import q0_run
from data import shards

# 2 bases x 3 cycles of 2 steps, distillation, a checkpoint after every step: 39 commits on 1 process
FLAGS = ("--bases", "2", "--cycles", "3", "--distil-from-cycle", "2", "--checkpoint-minutes", "0",
         "--train-tokens", "512", "--val-tokens", "512", "--collective-timeout-minutes", "0.2")
RUN = "tiny-2x3-seed0"
ENV = {"OMP_NUM_THREADS": "1"}  # torchrun's workers get one thread: the same arithmetic everywhere
# A launch that takes longer than HUNG_PACE clean launches counts as hung: measured on this
# machine by the clean reference launch (the `pace` fixture), so a busy machine slows the limit too.
HUNG_PACE = 10
PACE = {"launch_s": None}  # seconds of one clean launch; None until the reference has run


def launch(mode: str, data: Path, runs: Path, env: dict | None = None, grace_s: float | None = None,
           extra: tuple = ()) -> tuple[int | None, str]:
    """Train FLAGS in `mode`; (exit code, or None if it hung; its output). Two "nodes" are two
    torchrun launchers meeting at a c10d rendezvous on 127.0.0.1, one process each. Once one
    launcher has failed, the others get `grace_s` to follow; then they count as hung and are
    stopped, their workers too (found by the pids in the run's lock: torchrun's workers can
    outlive their launcher). Both limits are multiples of a clean launch's time (PACE); before one
    is measured (the reference itself) a launch is waited for without limit."""
    hung_s = HUNG_PACE * PACE["launch_s"] if PACE["launch_s"] else math.inf
    grace_s = grace_s if grace_s is not None else hung_s / 3
    cmd = [str(REPO / "train_q0.py"), *TINY, "--data-dir", str(data), "--runs-dir", str(runs), *FLAGS, *extra]
    full_env = {**os.environ, **ENV, **(env or {})}
    if mode == "1 process":
        launchers = [(sys.executable,)]
    elif mode == "2 processes":
        launchers = [TORCHRUN_2]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        node = (sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=q0-{port}")
        launchers = [node, node]
    runs.mkdir(parents=True, exist_ok=True)
    logs = [runs.parent / f"{runs.name}.launcher{i}.log" for i in range(len(launchers))]
    procs = [subprocess.Popen([*launcher, *cmd], cwd=REPO, env=full_env, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT) for launcher, log in zip(launchers, logs)]
    deadline, failed_at = time.time() + hung_s, None
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
            failed_at = time.time()
        if failed_at is not None and time.time() - failed_at > grace_s:
            break
        time.sleep(0.2)
    hung = any(p.poll() is None for p in procs)
    if hung:
        stop_workers(runs / RUN)
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=hung_s / 4)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    stop_workers(runs / RUN)
    out = "\n".join(log.read_text() for log in logs)
    return (None if hung else max((p.returncode for p in procs), key=abs)), out


def stop_workers(run_dir: Path):
    """SIGKILL the trainers still holding a slot of this run's lock (ours: the run is a temporary folder)."""
    lock = run_dir / ".lock"
    if not lock.exists():
        return
    raw = lock.read_bytes()
    for i in range(0, len(raw), q0_run.RunLock.SLOT):
        pid = raw[i:i + q0_run.RunLock.SLOT].strip()
        if not pid.isdigit():
            continue
        try:
            if str(run_dir.parent).encode() in Path(f"/proc/{int(pid)}/cmdline").read_bytes():
                os.kill(int(pid), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def digest(runs: Path) -> dict:
    """Every file of the runs folder: bytes for weights, caches and checkpoints, values for the JSON
    files (run.json's creation time aside, and so the seal over it), presence for the logs (they
    carry times)."""
    out = {}
    for p in sorted(runs.rglob("*")):
        if p.is_dir():
            continue
        rel = str(p.relative_to(runs))
        if p.suffix == ".json":
            d = json.loads(p.read_text())
            d.pop("created", None)
            d.pop(q0_run.SEAL, None)
            out[rel] = d
        elif p.name in ("log.txt", "metrics.jsonl", ".lock"):
            out[rel] = "present"
        else:
            out[rel] = shards.sha256_file(p)
    return out


def incomplete_records(run_dir: Path) -> list[str]:
    """Snapshot records (completion markers) whose files are not all there."""
    bad = []
    for p in (run_dir / "snapshots").glob("b*c*.json"):
        r = json.loads(p.read_text())
        if any(r.get(k) and not (run_dir / r[k]).is_file() for k in ("weights", "fitness_probs", "val_probs")):
            bad.append(r["id"])
    return bad


@pytest.fixture(scope="module")
def fault_data(small_data) -> Path:
    return small_data  # read only: a test that changes data works on a copy


@pytest.fixture(scope="module")
def reference(fault_data, tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("reference")
    started = time.monotonic()
    code, out = launch("1 process", fault_data, runs)
    PACE["launch_s"] = time.monotonic() - started
    assert code == 0, out
    return digest(runs)


def trial(mode: str, data: Path, runs: Path, faults: list[str], reference: dict) -> str:
    """Run with each fault in turn (each must kill), then rerun clean: identical, corrupt, hung or
    'finished' (the fault named no commit: the run completed)."""
    for fault in faults:
        code, out = launch(mode, data, runs, {"Q0_FAULT": fault})
        if code is None:
            return "hung"
        if code == 0:
            return "finished"
        assert not incomplete_records(runs / RUN) if (runs / RUN).exists() else True, \
            f"{fault}: a snapshot record outlived its files"
    code, out = launch(mode, data, runs)
    if code is None:
        return "hung"
    if code != 0:
        print(out[-3000:])
        return "corrupt"
    got = digest(runs)
    if got != reference:
        extra, missing = sorted(set(got) - set(reference)), sorted(set(reference) - set(got))
        differ = sorted(k for k in set(got) & set(reference) if got[k] != reference[k])
        print(f"{mode} {faults}: stray {extra}, missing {missing}, different {differ}")
        return "corrupt"
    return "identical"


# --- the default suite: the commits that found bugs --------------------------------------------

# Two of the four run by default; the other two, like every commit, in the slow campaign below.
@pytest.mark.parametrize("faults", [
    ["kill:1"],                      # run.json written in the folder being built
    pytest.param(["kill:2"], marks=pytest.mark.slow),  # the folder renamed into place
    ["kill:6"],                      # inside a snapshot: its weights and caches written, not its record
    pytest.param(["kill:8", "kill:2", "kill:3"], marks=pytest.mark.slow),
    # after b0c1's record, before its checkpoint; then the rerun killed while removing that
    # unfinished snapshot (its record goes first)
])
def test_killed_at_a_commit_the_rerun_is_bitwise_identical(faults, fault_data, reference, tmp_path):
    assert trial("1 process", fault_data, tmp_path, faults, reference) == "identical"


def test_temporary_files_are_reused_and_swept(fault_data, reference, tmp_path):
    """A kill inside a write leaves its temporary file; the rerun removes it (finding 7)."""
    code, _ = launch("1 process", fault_data, tmp_path, {"Q0_FAULT": "kill:4"})  # b0c1.pt written, not renamed
    assert code != 0 and (tmp_path / RUN / "snapshots" / ".b0c1.pt.tmp").exists()
    assert trial("1 process", fault_data, tmp_path, [], reference) == "identical"


@pytest.mark.slow  # kill:1 runs by default in test_killed_at_a_commit_the_rerun_is_bitwise_identical
def test_a_half_built_run_folder_is_finished_by_the_rerun(fault_data, tmp_path, reference):
    """Killed between creating the run folder and writing run.json, the folder was refused forever
    (finding 1): now it is built under a temporary name and renamed into place."""
    code, _ = launch("1 process", fault_data, tmp_path, {"Q0_FAULT": "kill:1"})
    assert code != 0 and not (tmp_path / RUN).exists() and (tmp_path / f".{RUN}.tmp").is_dir()
    code, out = launch("1 process", fault_data, tmp_path, {"Q0_FAULT": "kill:3"})
    assert code != 0 and (tmp_path / RUN / "run.json").is_file(), out
    assert not (tmp_path / f".{RUN}.tmp").exists()


# --- the campaign ----------------------------------------------------------------------------

@pytest.mark.slow
def test_two_loopback_nodes_equal_one_process(fault_data, reference, tmp_path):
    code, out = launch("2 nodes", fault_data, tmp_path)
    assert code == 0, out
    assert digest(tmp_path) == reference


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["1 process", "2 processes", "2 nodes"])
def test_campaign(mode, fault_data, reference, tmp_path):
    """Every commit of `mode` (until a fault names none: the run finished), and on 1 process also
    the rerun itself killed at each of its first commits after a kill that left unfinished
    snapshots to remove (finding 2's case). Prints the counts: trials, identical, corrupt, hung."""
    plans = [[f"kill:{n}"] for n in range(1, 80)]
    if mode == "1 process":
        plans += [[f"kill:{n}", f"kill:{m}"] for n in (7, 8, 13, 14, 27) for m in (1, 2, 3, 4, 5)]
    counts, singles_done = {"trials": 0, "identical": 0, "corrupt": 0, "hung": 0}, False
    for i, faults in enumerate(plans):
        if singles_done and len(faults) == 1:
            continue
        result = trial(mode, fault_data, tmp_path / str(i), faults, reference)
        if result == "finished":  # the fault named no commit: past the run's last one
            singles_done = singles_done or len(faults) == 1
            continue
        counts["trials"] += 1
        counts[result] += 1
        print(f"{mode} {faults}: {result}", flush=True)
    print(f"campaign, {mode}:", json.dumps(counts), flush=True)
    assert counts["trials"] and counts["identical"] == counts["trials"], counts


def test_a_frozen_node_fails_the_other_naming_its_rank(fault_data, tmp_path, reference):
    """Rank 1 (the second "node") stops dead (SIGSTOP) at its first commit; rank 0 finishes its base
    and waits for it for --collective-timeout-minutes 0.2 only, then names it (finding 3: it waited
    for gloo's default 30 minutes)."""
    t0 = time.time()
    code, out = launch("2 nodes", fault_data, tmp_path, {"Q0_FAULT": "stop:1", "Q0_FAULT_RANK": "1"}, grace_s=5)
    assert code is None, out  # the frozen node's launcher waits on its frozen worker: stopped by launch()
    assert "error: rank 1 stopped answering for --collective-timeout-minutes 0.2" in out, out
    assert time.time() - t0 < 150


@pytest.mark.slow  # in-process twin: tests/test_memory_and_startup.py::test_the_lowest_live_rank_names_a_silent_one
def test_a_frozen_process_is_named_while_the_other_group_still_trains(fault_data, tmp_path, reference):
    """Two process groups (a base each): rank 1 stops dead at its first commit while rank 0 has
    1,000 cycles to train. Rank 0's heartbeat thread names rank 1 after the collective timeout and
    ends, so torchrun stops the job. It used to be said only after rank 0 had trained its whole
    base (finding 17). Rank 0 still training when it is said: its last snapshot was never written."""
    code, out = launch("2 processes", fault_data, tmp_path, {"Q0_FAULT": "stop:1", "Q0_FAULT_RANK": "1"},
                       extra=("--cycles", "1000", "--run-name", RUN))
    assert code == 1, out  # torchrun's own code when a worker failed (rank 0's: 2)
    assert "error: rank 1 stopped answering for --collective-timeout-minutes 0.2" in out, out
    assert not (tmp_path / RUN / "snapshots/b0c1000.json").exists()
    assert "error: rank 1 stopped answering" in (tmp_path / RUN / "log.txt").read_text()


def test_workers_stop_when_their_launcher_is_killed_during_the_start(fault_data, tmp_path, reference):
    """torchrun's process group killed while its workers start (rank 0 stopped at its first commit,
    run.json, and rank 1 waiting for it in the start's first collective): the workers run in sessions
    of their own, so they used to wait for the whole timeout (finding 16). Rank 1 now sees its
    launcher gone and ends with one line; the same command then completes, identical."""
    hung_s = HUNG_PACE * PACE["launch_s"]
    cmd = [*TORCHRUN_2, str(REPO / "train_q0.py"), *TINY, "--data-dir", str(fault_data), "--runs-dir",
           str(tmp_path), *FLAGS, "--collective-timeout-minutes", "5"]  # no heartbeat timeout meanwhile
    log = tmp_path.parent / f"{tmp_path.name}.launcher.log"
    env = {**os.environ, **ENV, "Q0_FAULT": "stop:1", "Q0_FAULT_RANK": "0"}
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + hung_s
    while not (workers := children(launcher.pid)) or not any(state(w) == "T" for w in workers):
        assert time.monotonic() < deadline and launcher.poll() is None, log.read_text()
        time.sleep(0.1)
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait()
    running = [w for w in workers if state(w) != "T"]
    while any(state(w) not in (None, "Z") for w in running) and time.monotonic() < deadline:
        time.sleep(0.1)
    for w in workers:  # the stopped one, and any still running (the test then fails)
        with contextlib.suppress(ProcessLookupError):
            os.kill(w, signal.SIGKILL)
    assert running and all(state(w) in (None, "Z") for w in running), log.read_text()
    assert f"error: rank 1 stops: torchrun's launcher (pid {launcher.pid}) is gone" in log.read_text()
    code, out = launch("2 processes", fault_data, tmp_path, extra=("--collective-timeout-minutes", "5"))
    assert code == 0 and digest(tmp_path) == reference, out


def children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()] if Path(f"/proc/{pid}/task").exists() else []


def state(pid: int) -> str | None:
    """A process's state letter (R, S, T: stopped, Z: a zombie), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def snapshot_losses(run_dir: Path) -> dict:
    return {r["id"]: r["val_loss"] for r in q0_run.list_snapshots(run_dir)}


@pytest.mark.slow  # in-process twin: tests/test_train.py::test_device_batch_moves_only_the_reduction_order
def test_placement_flags_may_change_on_resume(fault_data, reference, tmp_path):
    """Killed after base 0's first cycle, a run resumes with another --device-batch (4 micro-batches
    a step instead of 1); one on two processes (a group per base) resumes on one group (both
    processes train each base in turn, DDP). The first was accepted but changed the dropout masks,
    the second refused though it changes nothing but rounding. Tiny models amplify rounding (Muon
    orthogonalises the near-zero gradients of zero-initialised layers into full-size steps), so
    the losses agree to 1e-2 here; tests/test_train.py's one-step test is the exact one."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert launch("1 process", fault_data, one, {"Q0_FAULT": "kill:9"})[0] == -signal.SIGKILL
    code, out = launch("1 process", fault_data, one, extra=("--device-batch", "2"))
    assert code == 0 and "[b0] resumed at step 2 after 1 cycles" in out, out
    code, out = launch("2 processes", fault_data, two, {"Q0_FAULT": "kill:9", "Q0_FAULT_RANK": "0"})
    assert code != 0 and (two / RUN / "snapshots/b0c1.json").exists(), out
    code, out = launch("2 processes", fault_data, two, extra=("--groups", "1", "--device-batch", "4"))
    assert code == 0 and "1 group(s) of 2 process(es)" in out, out
    ref = {k.removeprefix(f"{RUN}/snapshots/").removesuffix(".json"): v["val_loss"]
           for k, v in reference.items() if k.endswith(".json") and "/snapshots/" in k}
    for runs in (one, two):
        mine = snapshot_losses(runs / RUN)
        assert mine.keys() == ref.keys()
        for k, v in ref.items():
            assert mine[k] == pytest.approx(v, abs=1e-2), (runs, k)


# --- one writer, the same data, a full disk ---------------------------------------------------

def test_one_writer_per_run_folder(fault_data, tmp_path, reference):
    """A second trainer meets the first one's lock with one line naming its pid, whether the holder
    is the first rank or an orphaned torchrun worker of another rank; a dead holder holds nothing."""
    code, _ = launch("1 process", fault_data, tmp_path, {"Q0_FAULT": "kill:8"})  # a run to resume
    assert code == -signal.SIGKILL
    for rank in (0, 1):
        held = q0_run.RunLock(tmp_path / RUN, rank)  # this process plays the live writer
        code, out = launch("1 process", fault_data, tmp_path)
        os.close(held.fd)
        assert code == 2 and f"error: {tmp_path / RUN} is in use by another trainer (pid {os.getpid()})" in out, out
    code, out = launch("1 process", fault_data, tmp_path)
    assert code == 0, out


def test_a_resume_checks_the_training_tokens(fault_data, tmp_path, reference):
    """Training data replaced at the same path between a crash and the resume is refused (it was
    trained on silently)."""
    data = tmp_path / "data"
    shutil.copytree(fault_data, data)
    code, _ = launch("1 process", data, tmp_path / "runs", {"Q0_FAULT": "kill:8"})
    assert code == -signal.SIGKILL
    (data / "train.q0t").unlink()
    write_bytes_shard(data / "train.q0t", documents(shakespeare_paragraphs("hamlet"))[1:41])
    code, out = launch("1 process", data, tmp_path / "runs")
    assert code == 2, out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "tokens in" in error[0] and "differ from those run" in error[0], out


def test_a_full_disk_is_one_line_and_the_rerun_completes(fault_data, reference, tmp_path):
    """The disk fills as b0c1.pt is written (injected ENOSPC): one line naming the file, the space
    it needs and the space free; nothing lost, and the rerun is bitwise identical."""
    code, out = launch("1 process", fault_data, tmp_path, {"Q0_FAULT": "enospc:4"})
    assert code == 2, out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "no space left for" in error[0] and "b0c1.pt: it needs" in error[0], out
    assert " free on its disk" in error[0] and "Traceback" not in out
    assert trial("1 process", fault_data, tmp_path, [], reference) == "identical"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root to mount: skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_real_full_and_read_only_disks(tiny_disk):
    import torch
    big = {"w": torch.zeros(1 << 19)}  # 2 MiB
    with pytest.raises(shards.DiskError, match=r"no space left for .*big\.pt: it needs 2\.1 MiB, 1\.0 MiB free"):
        q0_run.atomic_torch_save(big, tiny_disk / "big.pt")  # refused before writing a byte
    with pytest.raises(shards.DiskError, match=r"no space left for .*raw\.pt: it needs more space, \d+ B free"):
        shards.atomic_write(tiny_disk / "raw.pt", lambda tmp: torch.save(big, tmp))  # torch's own RuntimeError
    assert not list(tiny_disk.iterdir())  # no temporary file left
    gc.collect()  # torch's failed writer, in a reference cycle, may still hold the unlinked file open: EBUSY
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(shards.DiskError, match=r"cannot write .*x\.json: Read-only file system"):
        shards.atomic_write_text(tiny_disk / "x.json", "{}")


# --- one flipped byte in each file a command reads back: refused in one line, nothing used --------
# Each case takes a run (interrupted, or finished with its prior; put back after), flips one bit of
# one byte of a file where a bit flip keeps the file well-formed (a digit of a JSON value, a byte of
# a tensor's or a cache's data, a header field), runs the command that reads the file back, and
# requires exit code 2, one `error:` line naming the file, and every file as it was (logs and
# temporaries aside).

def tensor_byte(path: Path) -> int:
    """A byte in the middle of the largest tensor's data in a torch.save zip (stored, not deflated)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)  # the local file header
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def npy_byte(path: Path) -> int:
    """A byte in the middle of a .npy file's data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
        start = f.tell()
    return start + (path.stat().st_size - start) // 2


def json_digit(key: str, last: bool = False):
    """The last digit of the first run of digits in the value of `key`, at its first (or last)
    occurrence: a bit flip turns one digit into another (never a leading 1 into 0), so the file
    stays JSON."""
    def where(path: Path) -> int:
        raw = path.read_bytes()
        at = (raw.rindex if last else raw.index)(f'"{key}":'.encode()) + len(key) + 3
        while not chr(raw[at]).isdigit():
            at += 1
        while chr(raw[at + 1]).isdigit():
            at += 1
        return at
    return where


def tokenizer_byte(path: Path) -> int:
    return 48  # the shard header's tokenizer name: "bytes" becomes "cytes"


def flip(path: Path, at: int):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 1
    path.write_bytes(bytes(raw))


def files_now(root: Path) -> dict:
    """Every file under root by content; logs (appended to by any rerun), the lock and killed
    writers' temporaries (a rerun sweeps them) aside."""
    return {str(p.relative_to(root)): shards.sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("log.txt", "metrics.jsonl", ".lock") and not p.name.endswith(".tmp")}


@pytest.fixture(scope="module")
def interrupted(fault_data, tmp_path_factory) -> Path:
    """data/ and runs/: FLAGS killed at commit 9, base 0 inside its second cycle: b0c1's weights,
    caches and record and the checkpoint after b0c1 written. The rerun resumes from that checkpoint,
    distils from b0c1 (the chain teacher) and reads b0c1's validation cache (the population line)."""
    root = tmp_path_factory.mktemp("interrupted")
    shutil.copytree(fault_data, root / "data")
    code, out = launch("1 process", root / "data", root / "runs", {"Q0_FAULT": "kill:9"})
    assert code == -signal.SIGKILL, out
    snaps = root / "runs" / RUN / "snapshots"
    assert (snaps / "b0c1.json").is_file() and not (snaps / "b0c2.json").exists()
    return root


@pytest.fixture(scope="module")
def finished(fault_data, tmp_path_factory) -> Path:
    """data/ and runs/: FLAGS run to the end (2 bases x 3 cycles), its prior.json fitted."""
    root = tmp_path_factory.mktemp("finished")
    shutil.copytree(fault_data, root / "data")
    run_train(root / "data", root / "runs", *FLAGS)
    assert run_command("fit_prior.py", root / "runs" / RUN).returncode == 0
    return root


def best_member(root: Path) -> str:
    """The prior member --distil-init best starts the student from (the lowest fitness loss)."""
    prior = json.loads((root / "runs" / RUN / "prior.json").read_text())
    members = {m["id"] for m in prior["budgets"][-1]["members"]}
    records = [json.loads(p.read_text()) for p in (root / "runs" / RUN / "snapshots").glob("b*c*.json")]
    return min((r for r in records if r["id"] in members), key=lambda r: r["fitness_loss"])["id"]


def command_for(what: str, root: Path) -> subprocess.CompletedProcess:
    run, out = root / "runs" / RUN, root / "out"
    if what == "train":  # the same command rerun: it resumes
        return run_train(root / "data", root / "runs", *FLAGS, check=False)
    if what == "fit_prior":
        return run_command("fit_prior.py", run, "--out", out / "prior.json")
    if what == "eval":
        return run_command("eval.py", run, "--prior", run / "prior.json", "--out", out / "eval.json")
    if what == "eval --forward":
        return run_command("eval.py", run, "--forward", "--parts", "members", "--out", out / "eval.json")
    if what == "student":  # an ensemble student started from the prior's best member
        return run_train(root / "data", root / "runs", "--distil-from", run / "prior.json", "--distil-init", "best",
                         "--epochs", "1", "--run-name", "student", check=False)
    raise ValueError(what)


# kind: (state, files (the same byte flipped in each), where, the command that reads them back)
FLIPS = {
    "checkpoint": ("interrupted", [f"runs/{RUN}/checkpoints/base0.pt"], tensor_byte, "train"),
    "teacher snapshot": ("interrupted", [f"runs/{RUN}/snapshots/b0c1.pt"], tensor_byte, "train"),
    "record": ("interrupted", [f"runs/{RUN}/snapshots/b0c1.json"], json_digit("val_loss"), "train"),
    "run.json": ("interrupted", [f"runs/{RUN}/run.json"], json_digit("epoch_budget"), "train"),
    "cache": ("interrupted", [f"runs/{RUN}/snapshots/b0c1.val.npy"], npy_byte, "train"),
    "shard": ("interrupted", ["data/train.q0t", "data/val.q0t"], tokenizer_byte, "train"),
    "snapshot": ("finished", [f"runs/{RUN}/snapshots/b1c2.pt"], tensor_byte, "eval --forward"),
    "record, eval": ("finished", [f"runs/{RUN}/snapshots/b1c2.json"], json_digit("base_epochs"), "eval"),
    "run.json, fit_prior": ("finished", [f"runs/{RUN}/run.json"], json_digit("fitness"), "fit_prior"),
    "cache, fit_prior": ("finished", [f"runs/{RUN}/snapshots/b0c1.fitness.npy"], npy_byte, "fit_prior"),
    "prior.json": ("finished", [f"runs/{RUN}/prior.json"], json_digit("weights_refitted", last=True), "eval"),
    "student's init snapshot": ("finished", ["BEST"], tensor_byte, "student"),
}


@pytest.fixture
def pristine(request, tmp_path):
    """The state a case names, given to it in place (a run's flags hold its --data-dir: a copy
    elsewhere is another population), and put back as it was after the case."""
    def take(state: str) -> Path:
        root = request.getfixturevalue(state)
        shutil.copytree(root, tmp_path / "pristine", symlinks=True)
        taken.append(root)
        return root
    taken = []
    yield take
    for root in taken:
        shutil.rmtree(root)
        shutil.move(tmp_path / "pristine", root)


@pytest.mark.parametrize("kind", list(FLIPS))
def test_a_flipped_byte_is_refused_in_one_line(kind, pristine):
    state, names, where, what = FLIPS[kind]
    root = pristine(state)
    if names == ["BEST"]:
        names = [f"runs/{RUN}/snapshots/{best_member(root)}.pt"]
    for name in names:
        flip(root / name, where(root / name))
    before = files_now(root)
    result = command_for(what, root)
    assert result.returncode == 2, f"{kind}: accepted (exit {result.returncode})\n{result.stderr[-2000:]}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert Path(names[0]).name in errors[0], errors[0]
    print(f"{kind} | {what} | {errors[0]}")
    after = files_now(root)
    if what == "student":  # refused as it loads its first member: its new run folder is all it wrote
        after = {k: v for k, v in after.items() if not k.startswith("runs/student/")}
    assert after == before, f"{kind}: files changed by the refused command"


@pytest.mark.parametrize("kind", ["checkpoint", pytest.param("record", marks=pytest.mark.slow)])
def test_the_repair_the_error_names_completes_the_run_bitwise(kind, pristine, reference):
    """The refusal's own words, followed: what it says to move away is moved, the same command is
    rerun, and the run ends bitwise identical to the uninterrupted one (the base trains again)."""
    _, names, where, _ = FLIPS[kind]
    root = pristine("interrupted")
    flip(root / names[0], where(root / names[0]))
    code, out = launch("1 process", root / "data", root / "runs")  # a process of its own: it ends, its lock goes
    assert code == 2, out
    error = next(line for line in out.splitlines() if line.startswith("error:"))
    said = re.search(r"move (\S+) and (\S+) away|(move it) away", error)
    assert said, error
    moved = root / "moved"
    moved.mkdir()
    for pattern in filter(None, said.groups()):
        for p in [root / names[0]] if pattern == "move it" else Path("/").glob(pattern.lstrip("/")):
            shutil.move(p, moved / p.name)
    code, out = launch("1 process", root / "data", root / "runs")
    assert code == 0, out
    got, manifest = digest(root / "runs"), f"{RUN}/manifest.json"
    assert got[manifest]["snapshots"] == reference[manifest]["snapshots"]
    same = set(reference) - {f"{RUN}/run.json", manifest}  # those two hold this copy's --data-dir
    assert got.keys() == reference.keys() and {k: got[k] for k in same} == {k: reference[k] for k in same}


def test_runs_before_seals_resume_and_sealed_files_need_theirs(pristine, tmp_path):
    """A run of format 3 refuses a checkpoint or a record without its seal (one flip in the key's
    name must not turn a file into one from before seals). A run of format 2 (no seals anywhere:
    runs trained before them) resumes to the end, and fit_prior.py reads it."""
    import torch
    root = pristine("interrupted")
    run = root / "runs" / RUN
    ckpt, record = run / "checkpoints" / "base0.pt", run / "snapshots" / "b0c1.json"
    state = torch.load(ckpt, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != q0_run.SEAL}, ckpt)
    result = command_for("train", root)
    assert result.returncode == 2 and "base0.pt carries no SHA-256 of its content" in result.stderr, result.stderr
    text = record.read_text()
    record.write_text(text.replace('"sha256":', '"sha257":'))
    result = command_for("train", root)
    assert result.returncode == 2 and "b0c1.json carries no SHA-256 seal" in result.stderr, result.stderr
    for p in [run / "run.json", *run.glob("snapshots/*.json")]:
        d = {k: v for k, v in json.loads(p.read_text()).items() if k not in ("sha256", "sha257")}
        p.write_text(json.dumps(d | ({"version": 2} if p.name == "run.json" else {}), indent=1))
    result = command_for("train", root)
    assert result.returncode == 0, result.stderr
    assert run_command("fit_prior.py", run, "--out", tmp_path / "prior.json").returncode == 0


def test_every_file_a_run_writes_carries_its_hash(finished, tmp_path):
    """run.json, every record, manifest.json, prior.json and eval.json are sealed (their seal
    matches); every checkpoint holds the SHA-256 of its own content."""
    import torch
    run = finished / "runs" / RUN
    for p in [run / "run.json", run / "manifest.json", run / "prior.json", *run.glob("snapshots/*.json")]:
        assert q0_run.check_seal(json.loads(p.read_text()), p, "", sealed=True), p
    assert run_command("eval.py", run, "--out", tmp_path / "eval.json").returncode == 0
    assert q0_run.check_seal(json.loads((tmp_path / "eval.json").read_text()), "eval.json", "", sealed=True)
    for p in run.glob("checkpoints/*.pt"):
        state = torch.load(p, weights_only=True)
        assert state.pop("sha256") == q0_run.state_sha256(state), p


def test_priors_before_seals_read_and_sealed_ones_need_theirs(finished, tmp_path):
    prior = json.loads((finished / "runs" / RUN / "prior.json").read_text())
    unsealed = {k: v for k, v in prior.items() if k != "sha256"}
    (tmp_path / "v2.json").write_text(json.dumps(unsealed))
    with pytest.raises(shards.UsageError, match="v2.json carries no SHA-256 seal.*fit_prior.py"):
        q0_run.read_prior(tmp_path / "v2.json")
    (tmp_path / "v1.json").write_text(json.dumps(unsealed | {"version": 1}))  # fit_prior.py's format until seals
    assert q0_run.read_prior(tmp_path / "v1.json")["budgets"] == prior["budgets"]


def test_the_checkpoint_hash_is_of_the_content_alone(monkeypatch, tmp_path):
    """The same content gives the same hash whatever the threads, the chunking, the layout in memory
    or a trip through torch.save; one flipped bit, a changed number or a tuple for a list changes it."""
    import torch
    monkeypatch.setattr(q0_run, "HASH_CHUNK", 4096)  # many chunks, on several threads
    gen = torch.Generator().manual_seed(0)
    state = {"base": 0, "step": 3, "model": {"w": torch.randn(300, 100, generator=gen),
                                             "b": torch.zeros(3, dtype=torch.bfloat16), "s": torch.tensor(0.5)},
             "optimizer": {"state": {0: {"m": torch.ones(5)}},
                           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0], "name": None}]}}
    one = q0_run.state_sha256(state, threads=1)
    assert q0_run.state_sha256(state, threads=4) == one
    torch.save(state, tmp_path / "s.pt")
    assert q0_run.state_sha256(torch.load(tmp_path / "s.pt", weights_only=True)) == one
    t = state["model"]["w"]
    state["model"]["w"] = t.t().contiguous().t()  # the same values, another memory layout
    assert q0_run.state_sha256(state) == one
    state["model"]["w"] = t.clone()
    state["model"]["w"].view(torch.int32).view(-1)[12345] ^= 1  # one bit of one weight
    assert q0_run.state_sha256(state) != one
    state["model"]["w"] = t
    for change in ({"step": 4}, {"optimizer": {**state["optimizer"], "param_groups": [
            {**state["optimizer"]["param_groups"][0], "betas": [0.9, 0.95]}]}}):
        assert q0_run.state_sha256(state | change) != one
    assert q0_run.state_sha256(state) == one
