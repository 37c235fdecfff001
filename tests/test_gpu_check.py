"""benchmarks/gpu_check.py on this machine's CPU: every check it can run passes, the CUDA-only ones are
named as skipped, a mismatch or a check that raises is a FAIL line and exit code 1, bad flags exit 2."""
import sys

import pytest

from conftest import REPO, run_command
import train_q0 as q0

sys.path.insert(0, str(REPO / "benchmarks"))

SCRIPT = "benchmarks/gpu_check.py"
CPU_CHECKS = ["flex vs SDPA forward", "Muon sharded vs whole", "compiled vs eager step", "snapshot scored and saved",
              "tokens/s and MFU", "distil step, chain teacher", "peak memory, chain teacher",
              "distil step, ensemble teacher", "peak memory, ensemble teacher"]


def check_lines(stdout: str) -> dict[str, tuple[str, str]]:
    """{check name: (status, figures)} of the lines `ok   NAME: ...`, `FAIL NAME: ...`, `skip NAME: ...`."""
    out = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("ok", "FAIL", "skip"):
            name, _, figures = rest.strip().partition(": ")
            out[name] = (status, figures)
    return out


def test_the_whole_check_on_a_cpu_passes_and_names_the_cuda_pieces_skipped():
    r = run_command(SCRIPT, "--cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = check_lines(r.stdout)
    assert {n: s for n, (s, _) in lines.items() if s != "ok"} == {"flex vs SDPA backward": "skip"}, r.stdout
    assert "no CUDA" in lines["flex vs SDPA backward"][1]
    assert [n for n in lines if lines[n][0] == "ok"] == CPU_CHECKS  # every check, in order
    assert "MFU n/a" in lines["tokens/s and MFU"][1]
    assert "exactly equal" in lines["Muon sharded vs whole"][1]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith(f"gpu_check: {len(CPU_CHECKS)} ok, 0 FAIL, 1 skipped in ")
    assert " s on CPU (1 thread of " in last


def test_a_mismatch_fails_its_line_and_the_exit_code(monkeypatch):
    """The block mask one token too wide (an off-by-one in the window): flex no longer matches SDPA
    with a window; full causal still does."""
    real = q0._window_block_mask
    monkeypatch.setattr(q0, "_window_block_mask", lambda T, window, device: real(T, window + 1, device))
    r = run_command(SCRIPT, "--cpu", "--only", "attention")
    assert r.returncode == 1, r.stdout + r.stderr
    status, figures = check_lines(r.stdout)["flex vs SDPA forward"]
    assert status == "FAIL" and "window 16: flex" in figures
    assert r.stdout.strip().splitlines()[-1].startswith("gpu_check: 0 ok, 1 FAIL, 1 skipped")


def test_a_check_that_raises_is_a_fail_line_and_the_next_check_runs(monkeypatch):
    def broken(G, group=None):
        raise RuntimeError("all_gather timed out")
    monkeypatch.setattr(q0, "sharded_polar_express", broken)
    r = run_command(SCRIPT, "--cpu", "--only", "muon,attention")
    assert r.returncode == 1
    lines = check_lines(r.stdout)
    assert lines["Muon sharded vs whole"] == ("FAIL", "RuntimeError: all_gather timed out")
    assert lines["flex vs SDPA forward"][0] == "ok"
    assert "Traceback" in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--only", "speed,nonsense"], "--only speed,nonsense: choose among"),
    (["--n-layer", "0"], "--n-layer 0"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_flags_are_one_error_line_and_exit_code_2(flags, message):
    r = run_command(SCRIPT, "--cpu", *flags)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and message in r.stderr and len(r.stderr.splitlines()) == 1


def test_a_smaller_model_keeps_the_record_proportions():
    import gpu_check
    args = q0.parse_args(["--preset", "slowrun"])
    assert gpu_check.shrunk(args, 0.5) == ["--n-layer", "15", "--loop-layers", "7", "12"]
    q0.parse_args(["--preset", "slowrun", *gpu_check.shrunk(args, 0.1)])  # a model train_q0 accepts
