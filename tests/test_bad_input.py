"""No traceback and no silent nonsense: every flag of every command, given a value outside its
range, stops at parse time with one `error:` line naming the flag, exit code 2, nothing written.
The sweep enumerates the parsers, so a flag added without a declared range fails here."""
import argparse
import json
import re
import sys

import numpy as np
import pytest

from conftest import REPO, run_train

sys.path.insert(0, str(REPO))
import eval as eval_cli  # noqa: E402
import fit_prior  # noqa: E402
import import_slowrun  # noqa: E402
import q0_run  # noqa: E402
import sample  # noqa: E402
import study  # noqa: E402
import train_q0  # noqa: E402
from data import fineweb, python_docs, shakespeare, shards, text  # noqa: E402

COMMANDS = {  # name -> (module, the arguments a bad flag is added to)
    "train_q0.py": (train_q0, lambda t: ["--preset", "tiny", "--data-dir", t / "nodata", "--runs-dir", t / "runs"]),
    "fit_prior.py": (fit_prior, lambda t: [t / "norun"]),
    "eval.py": (eval_cli, lambda t: [t / "norun"]),
    "sample.py": (sample, lambda t: [t / "norun"]),
    "study.py": (study, lambda t: ["--data-dir", t / "nodata", "--runs-dir", t / "runs"]),
    "data/text.py": (text, lambda t: [t / "src", "--tokenizer", "bytes", "--out", t / "out"]),
    "data/shakespeare.py": (shakespeare, lambda t: ["--out", t / "out"]),
    "data/python_docs.py": (python_docs, lambda t: ["--out", t / "out"]),
    "data/fineweb.py": (fineweb, lambda t: ["--local-dir", t / "nowhere", "--out", t / "out"]),
}
# The values a new user tried that ended in a traceback or a silent wrong result (issue 13).
REPORTED = [["--epochs", "nan"], ["--epochs", "inf"], ["--cycles", "0"], ["--cycles", "-2"],
            ["--cycle-epochs", "nan"], ["--lr-floor", "1"], ["--batch-seqs", "0"], ["--device-batch", "0"],
            ["--seq-len", "0"], ["--dropout", "-0.5"], ["--n-head", "0"], ["--log-every", "0"], ["--seed", "-1"],
            ["--eval-batch", "0"], ["--lr-matrix", "nan"], ["--distil-temperature", "0"], ["--lr-embed", "-0.1"],
            ["--dropout", "1.0"], ["--train-tokens", "-5"], ["--val-tokens", "1"], ["--batch-seqs", "-8"],
            ["--seq-len", "-4"]]


def parser_of(module) -> argparse.ArgumentParser:
    return module.build_parser()


def bad_values(action: argparse.Action, rule) -> list[str]:
    """Values outside the declared range, plus ones argparse itself must refuse."""
    if rule.kind == "choice":
        return ["no-such-choice"]
    if rule.kind != "number":
        return []  # text, paths and switches: their own tests check what the command does with them
    integer = action.type is int
    out = ["abc"] + (["1.5"] if integer else ["nan", "inf", "-inf"])
    if rule.lo is not None:
        low = rule.lo if rule.lo_open else rule.lo - 1
        if low not in rule.also:
            out.append(f"{low:g}")
        elif integer and rule.lo - 1 != low:
            out.append(f"{rule.lo - 1:g}")
        if not rule.lo_open and rule.lo - 1 in rule.also and rule.lo - 2 >= 0:
            out.append(f"{rule.lo - 1:g}")
    if rule.hi is not None:
        out.append(f"{rule.hi if rule.hi_open else rule.hi + (1 if integer else 0.5):g}")
    return out


def sweep_cases():
    for name, (module, _) in COMMANDS.items():
        for action in parser_of(module)._actions:
            if action.dest == "help" or not action.option_strings:
                continue
            rule = module.RANGES.get(action.dest)
            for value in bad_values(action, rule) if rule else []:
                yield pytest.param(name, action.option_strings[0], value, id=f"{name}{action.option_strings[0]}={value}")
    for flag, value in REPORTED:
        yield pytest.param("train_q0.py", flag, value, id=f"reported{flag}={value}")
    yield pytest.param("eval.py", "--curve-points", "1", id="reported-eval--curve-points=1")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_flag_declares_its_range(name):
    module = COMMANDS[name][0]
    dests = {a.dest for a in parser_of(module)._actions if a.dest != "help"}
    undeclared = sorted(dests - set(module.RANGES))
    assert not undeclared, f"{name}: give these flags a range in RANGES: {undeclared}"
    assert not set(module.RANGES) - dests, f"{name}: RANGES names flags the parser lacks"
    assert all(isinstance(rule, shards.Range) for rule in module.RANGES.values())  # one Range, data/shards.py's


def test_the_runs_flags_are_train_q0s_and_change_no_population():
    """q0_run adds the run's own flags to train_q0's parser; their ranges are in train_q0.RANGES, and
    none of them (nor any research-side placement flag) is part of a population."""
    parser = argparse.ArgumentParser()
    q0_run.add_run_flags(parser)
    run_dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert run_dests == set(q0_run.RUN_RANGES) == q0_run.RUN_FLAGS
    assert {k: train_q0.RANGES[k] for k in run_dests} == q0_run.RUN_RANGES
    assert not train_q0.NON_POPULATION_FLAGS & q0_run.RUN_FLAGS
    population = q0_run.population_config(train_q0.parse_args(["--preset", "tiny"]), train_q0.NON_POPULATION_FLAGS)
    assert not set(population) & (q0_run.RUN_FLAGS | train_q0.NON_POPULATION_FLAGS) and "lr_matrix" in population


def test_a_flag_without_a_range_is_caught():
    parser = train_q0.build_parser()
    parser.add_argument("--new-knob", type=float, default=1.0)
    with pytest.raises(KeyError, match="new_knob"):
        shards.range_errors(parser, parser.parse_args([]), train_q0.RANGES)


def call(module, argv) -> int:
    try:
        code = module.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code


@pytest.mark.parametrize("name, flag, value", list(sweep_cases()))
def test_bad_flag_value_is_one_line_exit_2_nothing_written(name, flag, value, tmp_path, capsys):
    module, base = COMMANDS[name]
    action = next(a for a in parser_of(module)._actions if flag in a.option_strings)
    values = [value] * (action.nargs if isinstance(action.nargs, int) else 1)
    assert call(module, base(tmp_path) + [flag, *values]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert list(tmp_path.iterdir()) == []


# --- bad files and folders: one line, nothing lost -------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(small_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    run_train(small_data, runs, "--cycles", "1")
    run_dir = runs / "tiny-1x1-seed0"
    assert fit_prior.main([str(run_dir)]) == 0  # a command: 0 on success
    return run_dir


def one_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_damaged_prior_json(finished_run, tmp_path, capsys):
    whole = (finished_run / "prior.json").read_text()
    for i, damaged in enumerate([whole[:len(whole) // 2], json.dumps({**json.loads(whole), "budgets": [{}]}),
                                 json.dumps({"format": "q0-prior"})]):
        (tmp_path / f"p{i}.json").write_text(damaged)
        assert call(eval_cli, [finished_run, "--prior", tmp_path / f"p{i}.json", "--out", tmp_path / "e.json"]) == 2
        one_line(capsys, f"p{i}.json", "fit_prior.py")
    assert not (tmp_path / "e.json").exists()


def test_pickles_in_place_of_weights_and_caches_are_refused_without_the_unsafe_hint(finished_run, small_data,
                                                                                   tmp_path, capsys):
    import shutil
    import torch
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "prior.json").unlink()

    Payload = argparse.Namespace  # any class torch does not allow-list: weights_only refuses it
    torch.save({"x": Payload()}, run / "snapshots" / "b0c1.pt")
    with pytest.raises(shards.UsageError) as caught:
        train_q0.load_snapshot_model(run, q0_run.list_snapshots(run)[0], check_sha=False)
    assert "weights_only=False" not in str(caught.value) and "b0c1.pt" in str(caught.value)
    np.save(run / "snapshots" / "b0c1.fitness.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    record = json.loads((run / "snapshots" / "b0c1.json").read_text())
    record["fitness_probs_sha256"] = shards.sha256_file(run / "snapshots" / "b0c1.fitness.npy")
    (run / "snapshots" / "b0c1.json").write_text(q0_run.sealed_json(record))  # a whole record that names it
    assert call(fit_prior, [run]) == 2
    assert "allow_pickle" not in one_line(capsys, "b0c1.fitness.npy")
    torch.save({"x": Payload()}, run / "checkpoints" / "base0.pt")  # the rerun resumes from it
    result = run_train(small_data, tmp_path, "--cycles", "1", "--run-name", "run", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "base0.pt" in result.stderr


def test_unwritable_runs_folder(small_data, finished_run, tmp_path, capsys):
    """A folder that cannot be written (here: a path under a file, which fails for root too, as a
    read-only folder does for everyone else): one line from each command that writes."""
    (tmp_path / "a-file").write_text("mine")
    blocked = tmp_path / "a-file" / "runs"
    result = run_train(small_data, blocked, check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: cannot write") and "--runs-dir" in result.stderr
    assert call(fit_prior, [finished_run, "--out", blocked / "prior.json"]) == 2
    one_line(capsys, "cannot write", "--out")
    assert call(eval_cli, [finished_run, "--out", blocked / "eval.json"]) == 2
    one_line(capsys, "cannot write", "--out")
    (tmp_path / "src").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "src" / name).write_text(f"document {name}")
    assert call(text, [tmp_path / "src", "--tokenizer", "bytes", "--out", blocked]) == 2
    one_line(capsys, "a-file", "permissions")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_a_diverging_loss_stops_before_any_snapshot(small_data, tmp_path):
    result = run_train(small_data, tmp_path, "--lr-embed", "1e30", "--lr-scalar", "1e30", "--log-every", "1",
                       "--cycles", "1", check=False)
    assert result.returncode == 2, result.stdout[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: the training loss is (nan|inf) at step \d+ ", lines[0]), \
        result.stderr
    assert not list(tmp_path.glob("*/snapshots/*")) and not list(tmp_path.glob("*/checkpoints/*"))


def test_parse_errors_raise_usage_errors_and_mains_return_2(tmp_path, capsys):
    """data/shards.ArgumentParser raises a UsageError (no SystemExit, no usage block); train_q0.main
    and import_slowrun.main turn it into one `error:` line and 2."""
    with pytest.raises(shards.UsageError, match="--no-such-flag"):
        train_q0.build_parser().parse_args(["--no-such-flag"])
    with pytest.raises(shards.UsageError, match="--seq-len 0: expected an integer >= 1"):
        train_q0.parse_args(["--seq-len", "0"])
    assert train_q0.main(["--preset", "tiny", "--no-such-flag"]) == 2
    one_line(capsys, "--no-such-flag")
    assert import_slowrun.main([]) == 2                                    # the checkpoint folder comes first
    one_line(capsys, "python tools/import_slowrun.py DIR")
    assert import_slowrun.main([tmp_path / "ckpt", "--preset", "tiny", "--cycles", "0"]) == 2
    one_line(capsys, "--cycles 0")
    assert import_slowrun.main([tmp_path / "ckpt", "--import-slowrun", tmp_path]) == 2  # the retired flag
    one_line(capsys, "--import-slowrun")
    assert list(tmp_path.iterdir()) == []


# --- every write error one line, Ctrl-C one line, the last bad inputs (issue, part 2) ---------------

def no_temporaries(root) -> list:
    from pathlib import Path
    return [str(p) for p in Path(root).rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("case", ["full", "no permission"])
def test_a_write_error_inside_torch_save_is_one_line_and_the_rerun_resumes(case, small_data, tmp_path, monkeypatch):
    """torch.save fails without an errno ("unexpected pos", "cannot be opened"): one line, exit code
    2, no temporary file; the same command then resumes (it was a 48-line traceback, exit code 1)."""
    import builtins
    import errno
    import os
    import torch
    real_save, real_open, real_os_open = torch.save, builtins.open, os.open

    def failing_save(obj, f, *args, **kwargs):
        if str(f).endswith(".b0c1.pt.tmp"):
            if case == "full":
                with real_open(f, "wb") as part:  # a part of the file, then the disk is full
                    part.write(b"PK" * 300)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            raise RuntimeError(f"File {f} cannot be opened.")
        return real_save(obj, f, *args, **kwargs)

    def refusing_open(file, *args, **kwargs):  # the folder refuses this process (EACCES)
        if str(file).endswith(".b0c1.pt.tmp") and case == "no permission":
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_os_open(file, *args, **kwargs)
    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(os, "open", refusing_open)
    result = run_train(small_data, tmp_path, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    expected = ("cannot write .*b0c1\\.pt \\(unexpected pos 704 vs 598\\); check that .*snapshots is writable and "
                "has space, then rerun the same command" if case == "full" else
                "cannot write .*b0c1\\.pt: Permission denied; make .*snapshots writable")
    assert re.match("error: " + expected, lines[0]), lines[0]
    assert not no_temporaries(tmp_path)
    monkeypatch.undo()
    resumed = run_train(small_data, tmp_path)
    assert "resum" in resumed.stdout and not no_temporaries(tmp_path)


@pytest.mark.parametrize("name, code", [("log.txt", "ENOSPC"), ("metrics.jsonl", "EACCES")])
def test_a_log_that_cannot_be_written_is_one_line(name, code, small_data, tmp_path, monkeypatch):
    """log.txt and metrics.jsonl are appended to outside atomic_write: a full disk or a refused
    permission there is one line naming the file (it was a 53-line traceback, exit code 1)."""
    import builtins
    import errno
    real_open, opened = builtins.open, [0]

    def failing_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(name) and "a" in mode:
            opened[0] += 1
            if opened[0] > 5:
                if code == "ENOSPC":  # the write fails, on a file already open: no file name
                    raise OSError(errno.ENOSPC, "No space left on device")
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(q0_run, "open", failing_open, raising=False)
    result = run_train(small_data, tmp_path, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.match(rf"error: (no space left for|cannot write) .*{re.escape(name)}(: it needs more space|: Permission)",
                    lines[0]), lines[0]
    assert lines[0].endswith("then rerun the same command")


def test_ctrl_c_is_one_line_saying_the_same_command_resumes(small_data, tmp_path, monkeypatch):
    """Ctrl-C in the middle of training: one line that says the same command resumes, exit code 130
    (it was a 25-line KeyboardInterrupt traceback); the same command then finishes the run."""
    steps, real_step = [0], train_q0.BaseTrainer.train_step

    def interrupted_step(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] == 20:  # in the second cycle, after the first snapshot and checkpoint
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(train_q0.BaseTrainer, "train_step", interrupted_step)
    try:
        result = run_train(small_data, tmp_path, check=False)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 130 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: interrupted (Ctrl-C); rerun the same command to resume"), lines[0]
    assert not no_temporaries(tmp_path)
    monkeypatch.undo()
    resumed = run_train(small_data, tmp_path)
    assert "[b0] resumed at step 16" in resumed.stdout, resumed.stdout


def test_the_disk_check_says_small_amounts_in_mib(tmp_path, monkeypatch):
    import types
    monkeypatch.setattr(q0_run.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=10 * 2 ** 20))
    plan = {"disk_gib": 0.05, "snapshots": 3, "snapshot_gib": 0.01}
    with pytest.raises(shards.UsageError) as caught:
        q0_run.check_disk(plan, tmp_path / "runs" / "new")
    said = str(caught.value)  # it said "needs 0.1 GiB more ... (0.01 GiB each) ... 0.0 GiB free"
    assert "needs 51.2 MiB more for 3 snapshots (10.2 MiB each)" in said and "10.0 MiB free" in said, said
    assert "0.0 GiB" not in said


@pytest.mark.parametrize("flags", [["--epochs", "1e308"], ["--cycles", "100000000"],
                                   ["--bases", "100000", "--cycles", "2"]])
def test_a_budget_of_more_snapshots_than_a_population_holds_is_refused_up_front(flags, small_data, tmp_path):
    """--epochs 1e308 built ~1e305 cycles in memory with no output (it hung); now one line."""
    with pytest.raises(shards.UsageError, match="snapshots; a population holds at most 100,000"):
        train_q0.parse_args(["--preset", "tiny", *flags])
    result = run_train(small_data, tmp_path, *flags, check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and list(tmp_path.iterdir()) == []


def test_a_cycle_longer_than_a_number_holds_is_refused(small_data, tmp_path):
    result = run_train(small_data, tmp_path, "--cycle-epochs", "1e308", check=False)  # an OverflowError before
    assert result.returncode == 2 and result.stderr.startswith("error: cycle 2 (1e+308 epochs"), result.stderr


def test_a_loop_whose_end_comes_before_its_start_is_refused():
    """--loop-layers 3 1 trained a model without a loop, silently."""
    with pytest.raises(shards.UsageError, match=r"--loop-layers 3 1: the loop's END comes before its START"):
        train_q0.parse_args(["--preset", "tiny", "--loop-layers", "3", "1"])
    train_q0.parse_args(["--preset", "tiny", "--loop-layers", "2", "2"])  # END = START: no loop, as documented


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".hidden"])
def test_a_run_name_stays_under_the_runs_folder(name, small_data, tmp_path):
    """--run-name ../x wrote the run beside --runs-dir."""
    runs = tmp_path / "runs"
    result = run_train(small_data, runs, "--run-name", name, check=False)
    assert result.returncode == 2 and result.stderr.startswith(f"error: --run-name {name!r}: give a plain folder")
    assert list(tmp_path.iterdir()) == []


def test_the_same_run_named_twice_is_refused(finished_run, capsys):
    """fit_prior.py RUN RUN fitted every snapshot twice (and eval.py counted them twice)."""
    for module in (fit_prior, eval_cli):
        assert call(module, [finished_run, str(finished_run) + "/", "--out", finished_run.parent / "x.json"]) == 2
        one_line(capsys, "is named twice among the runs", "give each run once")
    assert not (finished_run.parent / "x.json").exists()


def test_an_empty_out_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch):
    """data/shakespeare.py --out '' (an unset shell variable) wrote into the current folder."""
    monkeypatch.chdir(tmp_path)
    for module, args in ((shakespeare, []), (text, [tmp_path, "--tokenizer", "bytes"])):
        assert call(module, [*args, "--out", ""]) == 2
        assert one_line(capsys) == "error: argument --out: an empty path; give a folder (. for the current one)"
        assert list(tmp_path.iterdir()) == [], module


def test_a_damaged_run_json_names_a_fix_other_than_the_failing_command(finished_run, tmp_path, capsys):
    """It said "rerun the training command that made it": the command that had just failed."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "run.json").write_text((finished_run / "run.json").read_text()[:100])
    assert call(fit_prior, [run, "--out", tmp_path / "p.json"]) == 2
    line = one_line(capsys, "run.json", f"move {run} away and train the run again")
    assert "rerun the training command" not in line


def test_a_shard_given_as_the_data_folder_names_its_folder(small_data, tmp_path):
    """--data-dir DATA/train.q0t said to rebuild the data, which was intact."""
    result = run_train(small_data / "train.q0t", tmp_path, check=False)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: --data-dir {small_data / 'train.q0t'} is a file; give the folder that holds the shards: "
        f"--data-dir {small_data}")


def test_a_failed_import_leaves_no_run_that_blocks_the_corrected_command(small_data, tmp_path):
    """tools/import_slowrun.py that fails (no checkpoints there; weights of another model) left a
    run folder whose population refused the corrected command."""
    import torch
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    runs = tmp_path / "runs"
    result = run_train(small_data, runs, "--cycles", "1", script="tools/import_slowrun.py", before=(ckpt,),
                       check=False)
    assert result.returncode == 2 and "holds no model_{i}.pt" in result.stderr
    assert not runs.exists() or list(runs.iterdir()) == []
    torch.save({"transformer.wte.weight": torch.zeros(3, 3)}, ckpt / "model_0.pt")  # not the flags' model
    result = run_train(small_data, runs, "--cycles", "1", script="tools/import_slowrun.py", before=(ckpt,),
                       check=False)
    assert result.returncode != 0 and not (runs / "tiny-1x1-seed0").exists(), result.stderr
