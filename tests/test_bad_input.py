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
import train_q0  # noqa: E402
from data import fineweb, shakespeare, shards, text  # noqa: E402

COMMANDS = {  # name -> (module, the arguments a bad flag is added to)
    "train_q0.py": (train_q0, lambda t: ["--preset", "tiny", "--data-dir", t / "nodata", "--runs-dir", t / "runs"]),
    "fit_prior.py": (fit_prior, lambda t: [t / "norun"]),
    "eval.py": (eval_cli, lambda t: [t / "norun"]),
    "data/text.py": (text, lambda t: [t / "src", "--tokenizer", "bytes", "--out", t / "out"]),
    "data/shakespeare.py": (shakespeare, lambda t: ["--out", t / "out"]),
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
    (run / "snapshots" / "b0c1.json").write_text(json.dumps(record))
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
