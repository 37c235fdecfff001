"""study.py: the epochs-to-match arithmetic and the equal-cost table on curves made up here, the
corpus's name and validation slice from data/text.py's manifest, bad input in one line, and the
whole study on the tiny preset (in this process; the same command as a process of its own is the
slow test)."""
import json
import math
import os
import subprocess
import sys
import types

import pytest

from conftest import REPO, TINY, run_command

import study
from data import text


# --- the arithmetic, on made-up curves ------------------------------------------------------------

def test_epochs_to_reach_interpolates_in_log_epochs():
    curve = [(8, 2.2), (16, 2.0), (32, 1.9)]
    assert study.epochs_to_reach(curve, 2.3) == 8                                 # there at the first point
    assert study.epochs_to_reach(curve, 2.1) == pytest.approx(8 * math.sqrt(2))  # halfway in log2
    assert study.epochs_to_reach(curve, 2.0) == 16                                # exactly at a point
    assert study.epochs_to_reach(curve, 1.9) == pytest.approx(32)
    assert study.epochs_to_reach(curve, 1.8) is None                              # never reached: no ratio
    assert study.epochs_to_reach(list(reversed(curve)), 2.1) == pytest.approx(8 * math.sqrt(2))  # any order
    bumpy = [(1, 3.0), (2, 2.0), (4, 2.5), (8, 1.5)]
    assert study.epochs_to_reach(bumpy, 2.2) < 2  # the first crossing, not a later one


def result(epochs, prior, ks, snapshots):
    return {"epochs": epochs, "prior_val": prior, "k_val": {str(k): v for k, v in ks.items()}, "snapshots": snapshots}


# Two seeds of q0 over the budgets 1, 2, 4, 8 (epochs really spent 1, 2, 4, 8), and a baseline of
# E* = 4 epochs with 1..3 members, one group (each seed is held to it).
Q0 = {"1": [result(1, 3.0, {1: 3.0}, 1), result(1, 3.0, {1: 3.0}, 1)],
      "2": [result(2, 2.5, {1: 2.7, 2: 2.6, 3: 2.55}, 5), result(2, 2.6, {1: 2.8, 2: 2.7, 3: 2.65}, 5)],
      "4": [result(4, 2.0, {1: 2.4, 2: 2.2, 3: 2.1}, 9), result(4, 2.2, {1: 2.5, 2: 2.3, 3: 2.25}, 9)],
      "8": [result(8, 1.8, {1: 2.3, 2: 2.0, 3: 1.95}, 17), result(8, 1.9, {1: 2.4, 2: 2.1, 3: 2.0}, 17)]}
BASELINE = {"1": {"members": 1, "epochs": 4.0, "val": [2.25]}, "2": {"members": 2, "epochs": 8.0, "val": [2.0]},
            "3": {"members": 3, "epochs": 12.0, "val": [1.85]}}


def test_ratios_against_every_member_count_per_seed():
    prior = study.ratio_tables(Q0, BASELINE, [0, 1])["q0_prior"]
    assert [r["members"] for r in prior] == [1, 2, 3]
    one, two, three = prior
    # m = 1 (2.25 at 4 epochs): seed 0 halfway between 2 and 4 epochs in log2, seed 1 at 7/8 of the way
    assert one["q0_epochs"] == pytest.approx([2 ** 1.5, 2 ** 1.875])
    assert one["ratio"] == pytest.approx([4 / 2 ** 1.5, 4 / 2 ** 1.875])
    assert two["q0_epochs"] == pytest.approx([4, 2 ** (2 + 2 / 3)]) and two["ratio"][0] == pytest.approx(2)
    # m = 3 (1.85 at 12 epochs): seed 1's curve ends at 1.9, so it never reaches it: no ratio
    assert three["q0_epochs"][0] == pytest.approx(2 ** 2.75) and three["ratio"][0] == pytest.approx(12 / 2 ** 2.75)
    assert three["q0_epochs"][1] is None and three["ratio"][1] is None
    assert not any(one["at_first_point"] + three["at_first_point"])
    # the seed-mean curves (1.85, 2.05 at 8 ... ) against the mean baseline: 2.0 is met between 4 and 8 epochs
    assert two["mean_curves"]["q0_epochs"] == pytest.approx(2 ** (2 + 0.1 / 0.25))


def test_k_variant_holds_q0_to_m_forward_passes():
    k = study.ratio_tables(Q0, BASELINE, [0, 1])["q0_k_match"]
    # m = 2: K=2 at every budget but the first, which has one snapshot (K=1 is all it has)
    assert k[1]["q0_epochs"][0] == pytest.approx(8)   # seed 0's K=2 curve: 3.0, 2.6, 2.2, 2.0
    assert k[0]["q0_epochs"][0] is None               # K=1 never gets to 2.25 (2.3 at 8 epochs)
    assert k[2]["q0_epochs"] == [None, None]          # K=3 ends at 1.95 and 2.0, above 1.85


def test_flat_baseline_and_a_target_met_at_the_first_budget():
    flat = {str(m): {"members": m, "epochs": 4.0 * m, "val": [2.25]} for m in (1, 2, 3)}
    rows = study.ratio_tables(Q0, flat, [0, 1])["q0_prior"]
    assert len({tuple(r["q0_epochs"]) for r in rows}) == 1  # the same loss, the same epochs to reach it
    assert [r["ratio"][0] for r in rows] == pytest.approx([m * 4 / 2 ** 1.5 for m in (1, 2, 3)])
    easy = {"1": {"members": 1, "epochs": 4.0, "val": [3.5]}}
    row = study.ratio_tables(Q0, easy, [0, 1])["q0_prior"][0]
    assert row["q0_epochs"] == [1, 1] and row["at_first_point"] == [True, True]  # an upper bound on the epochs
    reach, ratio, per_seed = study.ratio_cell(row, [0, 1])
    assert ratio.startswith("≥ 4.00x") and "s0 ≥4.00x" in per_seed


def test_baseline_groups_pair_with_seeds():
    grouped = {"1": {"members": 1, "epochs": 4.0, "val": [2.25, 2.0]}}
    row = study.ratio_tables(Q0, grouped, [0, 1])["q0_prior"][0]
    assert row["target"] == [2.25, 2.0]  # seed 0 against group 0, seed 1 against group 1
    assert study.paired([2.25, 2.0, 2.1], 2) == pytest.approx([2.1166666, 2.1166666])  # otherwise the mean


def test_the_single_model_is_refined_beyond_a_wide_gap():
    """E* = 16 with 32 next: 20 and 24 are tried (Python's docs); E* = 12 with 14 next: nothing."""
    wide = types.SimpleNamespace(single_max=0)
    assert study.refinement(wide, [8, 12, 14, 16, 32], 16) == [20, 24]
    assert study.refinement(wide, [8, 12, 14, 16, 20, 24, 32], 24) == []
    assert study.refinement(wide, [8, 12, 14, 16, 32], 12) == []
    assert study.refinement(wide, [8, 12, 14, 16, 32], 32) == []  # the longest: nothing above to place
    assert study.refinement(types.SimpleNamespace(single_max=22), [8, 16, 32], 16) == [20]


def test_equal_cost_is_signed_and_per_seed():
    assert study.equal_cost([2.0, 2.1], [2.05]) == pytest.approx([-0.05, 0.05])
    assert study.equal_cost([2.0, 2.1], [2.1, 2.0]) == pytest.approx([-0.1, 0.1])
    assert study.signed(-1e-17) == "+0.0000" and study.signed(-0.05) == "-0.0500"


def test_not_reached_is_said_in_the_tables():
    ratios = study.ratio_tables(Q0, BASELINE, [0, 1])
    reach, ratio, per_seed = study.ratio_cell(ratios["q0_prior"][2], [0, 1])
    assert (reach, ratio) == ("not reached by seed 1", "-") and per_seed == "s0 1.78x, s1 not reached"
    assert study.ratio_cell(ratios["q0_k_match"][2], [0, 1])[:2] == ("not reached", "not reached")
    summary = {"baseline": {"member_epochs": 4, "member_epochs_spent": 4.0, "groups": [[100, 101, 102]],
                            "by_members": BASELINE}, "seeds": [0, 1], "ratios": ratios, "best_baseline_members": 3}
    md = "\n".join(study.ratio_lines(summary))
    assert "| 3 (best) | 1.8500 | 12.0 | not reached by seed 1 | - | s0 1.78x, s1 not reached |" in md
    assert "q0, K = baseline members: not reached epochs" not in md and "not reached" in md.split("\n")[-1]
    assert "| 1 | 2.2500 | 4.0 | 3.2 ± 0.4 | 1.25x ± 0.16 | s0 1.41x, s1 1.09x | 1.26x |" in md


# --- the corpus: its name and what the validation slice covers -----------------------------------

@pytest.fixture
def text_data(tmp_path):
    src = tmp_path / "my_texts"
    src.mkdir()
    for name, size in (("a.txt", 400), ("b.txt", 100), ("c.txt", 60)):
        (src / name).write_text("x" * (size - 1) + "\n")
    out = tmp_path / "mine"
    assert text.main([str(src), "--tokenizer", "bytes", "--out", str(out),
                      "--val-files", str(src / "b.txt"), str(src / "c.txt")]) == 0
    return src, out


def test_corpus_named_from_the_manifest(text_data, tmp_path):
    src, out = text_data
    manifest = json.loads((out / "manifest.json").read_text())
    assert study.corpus_name(out, manifest, "bytes") == "my_texts-bytes"
    assert study.corpus_name(out, {"command": "python data/shakespeare.py --tokenizer bytes"}, "bytes") \
        == "shakespeare-bytes"
    assert study.corpus_name(out, {"command": "python data/text.py a.md b.md notes/ --tokenizer gpt2 --out x"},
                             "gpt2") == "a+2-gpt2"
    assert study.corpus_name(tmp_path / "My Data", None, "bytes") == "my-data-bytes"  # no manifest: the folder


def test_val_slice_names_the_documents_it_reaches(text_data):
    src, out = text_data
    manifest = json.loads((out / "manifest.json").read_text())
    b, c = str(src / "b.txt"), str(src / "c.txt")
    assert manifest["val_documents"] == [b, c]  # the shard holds b (BOS + 100 bytes), then c (BOS + 60)
    one = study.val_slice(out, manifest, 50)
    assert (one["reached"], one["last_in_part"], one["documents"]) == (1, True, 2)
    assert study.describe_val(one) == (f"the first 50 bytes of the validation split (162), which reach 1 of its 2 "
                                       f"held-out documents ({b}, {c}): {b} (in part)")
    two = study.val_slice(out, manifest, 120)
    assert (two["reached"], two["last_in_part"]) == (2, True) and "reach 2 of its 2" in study.describe_val(two)
    exact = study.val_slice(out, manifest, 101)  # b whole, c not begun
    assert (exact["reached"], exact["last_in_part"]) == (1, False)
    assert study.describe_val(study.val_slice(out, manifest, 162)).startswith("all 162 bytes of the validation split")
    assert study.val_slice(out, None, 50)["names"] is None  # no manifest: counted, not named


# --- bad input: one line, exit code 2, nothing written ---------------------------------------------

def one_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]


@pytest.mark.parametrize("flags, needles", [
    (["--", "--seed", "3"], ["--seed after --", "sets it"]),
    (["--", "--epochs", "4"], ["--epochs after --"]),
    (["--", "--no-such-flag"], ["flags after --", "--no-such-flag"]),
    (["--", "--lr-matrix", "nan"], ["flags after --", "--lr-matrix nan"]),
    (["--single-max", "0.5"], ["--single-max 0.5", "smallest budget"]),
    (["--budgets", "1e300"], ["--budgets 1e+300", "smaller budget"]),
    (["--budgets", "0"], ["--budgets 0"]),
    (["--workers", "0"], ["--workers 0"]),
    (["--student-budgets", "3"], ["--student-budgets 3", "not in --budgets"]),
    (["--student-epochs", "0"], ["--student-epochs 0"]),
    (["--search-budgets", "3"], ["--search-budgets 3", "layouts at 1, 2"]),
])
def test_bad_input_is_one_line(small_data, tmp_path, capsys, flags, needles):
    i = flags.index("--") if "--" in flags else len(flags)
    argv = ["--preset", "tiny", "--data-dir", small_data, "--runs-dir", tmp_path / "runs", *flags[:i], "--",
            *TINY[2:], *flags[i + 1:]]
    assert study.main([str(a) for a in argv]) == 2
    one_error(capsys, *needles)
    assert list(tmp_path.iterdir()) == []


def test_bad_folders_are_one_line(small_data, tmp_path, capsys):
    (tmp_path / "a-file").write_text("mine")
    assert study.main(["--data-dir", str(tmp_path / "nodata")]) == 2
    one_error(capsys, "no train data", str(tmp_path / "nodata"))
    tiny = ["--preset", "tiny", "--data-dir", str(small_data)]
    assert study.main([*tiny, "--runs-dir", str(tmp_path / "a-file"), "--", *TINY[2:]]) == 2
    one_error(capsys, "--runs-dir", "is a file")
    assert study.main(["--data-dir", str(small_data), "--runs-dir", str(tmp_path)]) == 2  # the cpu preset's sizes
    one_error(capsys, "--val-tokens 32768 exceeds")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_failed_run_is_one_line_and_starts_no_other(small_data, tmp_path, monkeypatch, capsys):
    """The run's own last line (here a traceback's, not an error line a previous attempt left in
    the same log) and where its output is; the runs queued behind it never start."""
    started = []

    def crashing(script, args, log):
        started.append(args[args.index("--run-name") + 1])
        with open(log, "a") as out:
            out.write("Traceback (most recent call last):\nRuntimeError: boom\n")
        return 1
    monkeypatch.setattr(study, "run_script", crashing)
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "single-e2-s0.out").write_text("error: an earlier attempt's\n")
    argv = ["--preset", "tiny", "--data-dir", small_data, "--runs-dir", runs, "--budgets", "1", "2", "--seeds", "0",
            "--workers", "1", "--", *TINY[2:]]
    assert study.main([str(a) for a in argv]) == 2
    one_error(capsys, "train_q0.py (run single-e2-s0) failed: RuntimeError: boom", str(runs / "single-e2-s0.out"))
    assert started == ["single-e2-s0"]  # longest first; single-e1-s0 was never started


def row(budget, student=None):
    return {"budget": budget, "single_own_schedule": [2.0], "best_single": [2.0], "best_single_epochs": budget,
            "baseline": [1.9], "baseline_members": 1, "baseline_epochs_spent": budget, "q0_prior": [1.8],
            "q0_prior_forward_passes": [3], "q0_k_match": [1.85], "k_match": [1], "q0_epochs_spent": [budget],
            "margin_over_best_single": 0.2, "student": student}


def test_the_student_column_only_where_students_exist():
    without = study.main_table({"table": [row(8), row(16)]})
    assert "student" not in without[1] and without[3] == ("| 8 | 2.0000 | 2.0000 (8) | 1.9000 (1) | 1.8000 (3) | "
                                                           "1.8500 (K=1) | +0.2000 |")
    with_one = study.main_table({"table": [row(8), row(16, {"val": [1.7], "epochs": [32.0]})]})
    assert "q0 student, 1 forward pass" in with_one[1]
    assert with_one[3].endswith("| +0.2000 | - |") and with_one[4].endswith("| +0.2000 | 1.7000 (32) |")


# --- the whole study ---------------------------------------------------------------------------------

def in_process(script: str, args: list[str], log) -> int:
    """study.run_script's twin: the command's main in this process (conftest.run_command)."""
    result = run_command(script, *args)
    with open(log, "a") as out:
        out.write(result.stdout + result.stderr)
    return result.returncode


def study_argv(data, runs, workers=1, *flags):
    return ["--preset", "tiny", "--data-dir", data, "--runs-dir", runs, "--budgets", "1", "2", "--seeds", "0",
            "--workers", workers, "--student-epochs", "1", *flags, "--", *TINY[2:]]


def check_report(data, runs):
    """The report's numbers are the runs' own, every member count has its ratios, and the markdown
    says what the validation slice covers."""
    s = json.loads((runs / "report" / "study.json").read_text())
    md = (runs / "report" / "study.md").read_text()
    assert [r["budget"] for r in s["table"]] == [1, 2] and s["corpus"]["name"] == study.slug(f"{data.name}-bytes")
    assert "first 2,048 bytes of the validation split (8,624), which reach 2 of its 5 held-out documents" in md
    q0_run = runs / s["q0"]["2"][0]["run"]
    full = max(json.loads((q0_run / "eval.json").read_text())["prior"]["budgets"], key=lambda b: b["K"])
    assert s["table"][1]["q0_prior"] == [full["refitted"]["loss"]]
    e_star = s["baseline"]["member_epochs"]
    members = math.floor(2 / e_star)
    for key in ("q0_prior", "q0_k_match"):
        assert [r["members"] for r in s["ratios"][key]] == list(range(1, members + 1))
    one = json.loads((runs / f"baseline-e{e_star:g}-g0-m1.json").read_text())["uniform"]["loss"]
    assert s["baseline"]["by_members"]["1"]["val"] == [one]
    assert s["table"][1]["equal_cost"] == pytest.approx([s["table"][1]["q0_k_match"][0] - s["table"][1]["baseline"][0]])
    assert "## Epochs to match the ensemble baseline" in md and "## Equal inference cost" in md
    student = json.loads((runs / "students" / "st-e2-s0" / "manifest.json").read_text())["snapshots"]
    pick = min(student, key=lambda x: x["fitness_loss"])  # one forward pass, chosen on the fitness set
    groups = s["baseline"]["groups"][0]
    member = min(groups, key=lambda m: s["baseline"]["members"][str(m)]["fitness"])
    assert s["one_pass"] == [{"budget": 2, "student": [pick["val_loss"]],
                              "student_epochs": [s["q0"]["2"][0]["epochs"] + pick["base_epochs"]],
                              "best_member": [s["baseline"]["members"][str(member)]["val"]], "best_member_seeds": [member],
                              "group_members": len(groups), "student_minus_member": [pytest.approx(
                                  pick["val_loss"] - s["baseline"]["members"][str(member)]["val"])],
                              "q0_prior": s["table"][1]["q0_prior"],
                              "q0_prior_forward_passes": s["table"][1]["q0_prior_forward_passes"]}]
    assert "## One forward pass: the student against the baseline's best member" in md
    return s


def test_the_whole_study_in_process(small_data, tmp_path, monkeypatch):
    """Every stage on the tiny preset (2 budgets, 1 seed), each command in this process, first
    without the allocation search; then a rerun with it reuses every finished run, the recipe's
    own layout included, and resumes the one cut before its end. Twin of
    test_the_whole_study_as_a_command (40 to 60 s on 2 shared cores, 30 s of CPU)."""
    monkeypatch.setattr(study, "run_script", in_process)
    data, runs = small_data, tmp_path / "runs"
    first = run_command("study.py", *study_argv(data, runs, 1, "--no-allocations"))
    assert first.returncode == 0, first.stderr[-3000:]
    s = check_report(data, runs)
    assert s["q0"]["2"][0]["run"] == "q0-e2-s0" and not s["allocations"]
    (runs / "q0-e1-s0" / "manifest.json").unlink()  # stopped after its last snapshot, before the manifest
    again = run_command("study.py", *study_argv(data, runs))
    assert again.returncode == 0, again.stderr[-3000:]
    trained = [line.split()[1] for line in again.stdout.splitlines() if line.startswith("training ")]
    assert sorted(trained) == ["alloc-e1-p1-f0.5-c0.25", "alloc-e1-p1-f0.5-c0.5", "alloc-e2-p1-f1-c0.5",
                               "alloc-e2-p1-f1.5-c0.25", "q0-e1-s0"]  # the recipe's layout at 2: q0-e2-s0
    assert "resumed" in (runs / "q0-e1-s0.out").read_text()
    s2 = check_report(data, runs)
    assert [t["run"] for t in s2["allocations"]["2"]] == ["alloc-e2-p1-f1-c0.5", "q0-e2-s0", "alloc-e2-p1-f1.5-c0.25"]
    assert s2["q0"]["2"][0]["run"] == "q0-e2-s0" and s2["table"] == s["table"]


@pytest.mark.slow
def test_the_whole_study_as_a_command(small_data, tmp_path):
    """`python study.py`, two training processes side by side: about 2 minutes on 2 shared cores
    (in-process twin: test_the_whole_study_in_process)."""
    data, runs = small_data, tmp_path / "runs"
    result = subprocess.run([sys.executable, str(REPO / "study.py"), *map(str, study_argv(data, runs, workers=2))],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    check_report(data, runs)
    assert "## Epochs to match the ensemble baseline" in result.stdout
