"""What the first 8xH100 run needs before its first step, proven on a CPU: a memory plan that
counts what a DDP process really holds, a device that cannot hold it refused up front, the most
expensive micro-batch run first (so a run that cannot fit fails in minute one, not at cycle 9),
a start that no slow rank can time out, and an end where no process polls a store that is gone."""
import os
import subprocess
import sys
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO, run_command, run_train
import q0_run
import train_q0 as q0
from data.shards import UsageError
from test_gpu_path import free_port


def tiny_trace(**how) -> dict:
    args = q0.parse_args(["--preset", "tiny"])
    cfg = q0.model_config(args, 256)
    return q0_run.trace_step(q0, cfg, args, 4, checkpoint=False, distill=True, **how)


def test_the_plan_counts_ddps_gradient_buckets_and_the_teacher_in_its_dtype():
    """DDP's buckets hold every gradient all run (fp32: 4 bytes a parameter at the activations'
    peak too); a bf16 teacher holds half an fp32 one. The trace sees both."""
    plain, ddp = tiny_trace(), tiny_trace(ddp=True)
    assert ddp["peak_bytes"] - plain["peak_bytes"] == 4 * plain["params"]
    bf16 = tiny_trace(teacher_dtype=torch.bfloat16)
    saved = plain["peak_bytes"] - bf16["peak_bytes"]
    assert 2 * plain["params"] <= saved <= 2.5 * plain["params"]  # the weights, and the rotary tables
    assert q0_run.planned_bytes(1e9, "cuda") == pytest.approx(1e9 * (1 + q0_run.ALLOCATOR_SLACK)
                                                              + q0_run.CUDA_OUTSIDE_ALLOCATOR_GIB * q0_run.GIB)
    assert q0_run.planned_bytes(1e9, "cpu") == 1e9
    assert q0_run.held_dtype("cuda") == torch.bfloat16 and q0_run.held_dtype("cpu") == torch.float32


def test_a_plan_that_does_not_fit_its_device_is_refused_with_the_numbers(small_data):
    args = q0.parse_args(["--preset", "tiny", "--data-dir", str(small_data)])
    cfg = q0.model_config(args, 256)
    cycles = q0.plan_cycles(args, 4096)
    target = q0_run.PlanTarget(2, "cuda", 4096, 1000, 2048, False, device_gib=0.001)
    plan = q0_run.plan_run(q0, args, cfg, cycles, target, 4)
    assert plan["ddp_buckets"] and plan["teacher_dtype"] == "bfloat16"  # 2 processes, 1 base: DDP
    assert plan["planned_gib"] == pytest.approx(q0_run.planned_bytes(plan["traced_gib"] * q0_run.GIB, "cuda")
                                                / q0_run.GIB)
    assert "DOES NOT FIT" in q0_run.plan_lines(plan)[2]
    with pytest.raises(UsageError, match=r"the plan needs 2\.\d GiB per process at --device-batch 4 and the "
                                         r"device has 0\.0 GiB; pass a smaller --device-batch"):
        q0_run.check_memory(plan)
    q0_run.check_memory(plan, device_gib=80.0)  # an H100 holds it


def test_the_first_step_fails_fast_when_its_largest_micro_batch_cannot_fit(small_data, tmp_path):
    """The probe runs one distilling micro-batch, with a chain teacher held, before the first step:
    under a memory cap it cannot meet, the run stops there, having trained nothing."""
    ok = run_train(small_data, tmp_path, "--run-name", "fits")
    log = (tmp_path / "fits" / "log.txt").read_text()
    probe = [line for line in log.splitlines() if line.startswith("[b0] first-step probe")]
    assert len(probe) == 1 and "distilling micro-batch of 8 x 32 holding a chain teacher" in probe[0], probe
    peak = float(probe[0].split("peak ")[1].split()[0])  # MiB at this size
    assert peak > 0 and ok.returncode == 0
    failed = run_train(small_data, tmp_path, "--run-name", "capped", "--device-memory-gib", f"{peak / 2048:.6f}",
                       check=False)
    assert failed.returncode == 2
    errors = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: the first step does not fit: a distilling micro-batch"), \
        failed.stderr
    assert "--device-batch" in errors[0]
    capped = tmp_path / "capped"
    assert not [line for line in (capped / "log.txt").read_text().splitlines() if line.startswith("[b0] cycle")]
    assert not list((capped / "snapshots").glob("*.json"))


def test_the_probe_leaves_no_trace_in_the_population(small_data, tmp_path):
    """Bit for bit the run it was before: the probe's gradients are dropped, its stand-in freed, and
    the optimiser's state it creates early is the zeros the first step creates."""
    run_train(small_data, tmp_path, "--run-name", "a")
    before = q0.BaseTrainer.probe
    try:
        q0.BaseTrainer.probe = lambda self: None
        run_train(small_data, tmp_path, "--run-name", "b")
    finally:
        q0.BaseTrainer.probe = before
    for snap in sorted((tmp_path / "a" / "snapshots").glob("*.pt")):
        a, b = (q0_run.load_weights(p) for p in (snap, tmp_path / "b" / "snapshots" / snap.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), snap.name


# --- the start: no rank waits in a collective while another works --------------------------------

def _slow_rank0_worker(rank: int, port: int, data: str, runs: str, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    check_disk = q0_run.check_disk

    def slow_check_disk(plan, run_dir):  # rank 0's own start-up work (the disk, the run directory), made slow
        time.sleep(8)
        check_disk(plan, run_dir)
    q0_run.check_disk = slow_check_disk
    args = q0.parse_args(["--preset", "tiny", "--data-dir", data, "--runs-dir", runs, "--fitness-tokens", "1000",
                          "--collective-timeout-minutes", "0.05"])  # 3 s: less than rank 0's start
    try:
        run = q0_run.start(q0, args, q0.NON_POPULATION_FLAGS)
        result = f"started {run.plan is not None}"
    except Exception as e:  # noqa: BLE001 - the failure is the result
        result = f"failed {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(result)
    if dist.is_initialized():
        q0_run._teardown()


def test_a_slow_start_on_rank_0_does_not_time_out_the_others(small_data, tmp_path):
    """Rank 0 alone checks the disk and writes the run directory; with a collective timeout
    shorter than that, the others used to fail in the start's first collective. The start's
    collectives have their own timeout, and every rank traces its own plan."""
    mp.spawn(_slow_rank0_worker, args=(free_port(), str(small_data), str(tmp_path / "runs"), str(tmp_path)),
             nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["started True", "started True"]


def _leaving_worker(rank: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)  # rank 0 hosts the store: no torchrun agent
    peers = q0_run.Peers(2, rank, timeout_minutes=1)
    if rank == 0:
        time.sleep(3)  # rank 1 finishes first and polls the store while rank 0 ends
    try:
        peers.join()
        result = "joined"
    except Exception as e:  # noqa: BLE001 - the failure is the result
        result = f"failed {type(e).__name__}: {e}"
    peers.close()
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(result)
    if rank == 0:
        os._exit(0)  # the store goes with its host, at once
    time.sleep(2)


def test_no_process_polls_the_store_after_its_host_has_gone(tmp_path):
    mp.spawn(_leaving_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["joined", "joined"]


def test_the_lowest_live_rank_names_a_silent_one():
    """The heartbeat thread's watch, on a store of this process's own (rank 1 beats, rank 2 never
    does): rank 0 names rank 2 once it is silent for the timeout, rank 1 leaves it to rank 0, and a
    rank that has finished (q0/done) is never named. Finding 17: a frozen process used to be named
    only when every other group had finished training."""
    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
    said = {0: [], 1: []}
    peers = [q0_run.Peers(3, rank, timeout_minutes=0.02, store=store) for rank in (0, 1)]  # 1.2 s
    for p in peers:
        p._report = lambda silent, rank=p.rank: said[rank].append(silent)  # in place of os._exit
    try:
        store.add("q0/done/2", 1)  # finished: silent, yet never named
        time.sleep(4 * peers[0].timeout_s)
        assert said == {0: [], 1: []}
        store.set("q0/done/2", "0")  # unfinished from now on
        deadline = time.monotonic() + 60  # a hang guard: the watch names it after about 1.5 s
        while not said[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2 * peers[0].watch_s)
        assert said[0][0] == [2] and said[1] == []
    finally:
        for p in peers:
            p.close()


# --- the dry run ---------------------------------------------------------------------------------

def test_dry_run_prints_the_whole_plan_and_exits_0_where_the_disk_cannot_hold_the_run(small_data, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setattr(q0_run.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1024))
    result = run_command("train_q0.py", "--preset", "tiny", "--data-dir", small_data, "--fitness-tokens", "1000",
                         "--runs-dir", tmp_path, "--dry-run", "--plan-gpus", "8")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("plan: tracing a distilling micro-batch") and "traced a plain" in lines[3]
    disk = next(line for line in lines if line.startswith("plan: disk:"))
    assert ": 0.0 MiB free) needs " in disk, disk
    assert "CANNOT hold the run there (a run is refused)" in disk
    memory = next(line for line in lines if line.startswith("plan: peak memory"))
    assert "DDP's gradient buckets and a bfloat16 teacher" in memory and "79.6 GiB" in memory, memory
    assert "the reference record's 32%" in lines[-1]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    refused = run_train(small_data, tmp_path, "--fitness-tokens", "1000", check=False)
    assert refused.returncode == 2 and "error: the run needs" in refused.stderr


def test_the_progress_of_a_slow_trace_is_said_while_it_runs():
    said = []
    progress = q0_run.Progress(said.append, every=0.05)
    with progress.step("a micro-batch"):
        time.sleep(0.3)
    assert said[0] == "plan: tracing a micro-batch on fake tensors ..." and said[-1].startswith("plan: traced")
    assert any("still tracing a micro-batch" in line for line in said[1:-1])


def test_the_reference_allocator_setting_is_on_and_a_users_own_wins():
    code = "import os, train_q0; print(os.environ['PYTORCH_ALLOC_CONF'])"
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_ALLOC_CONF"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert out.stdout.strip() == "expandable_segments:True", out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**env, "PYTORCH_ALLOC_CONF": "max_split_size_mb:64"})
    assert out.stdout.strip() == "max_split_size_mb:64", out.stderr
