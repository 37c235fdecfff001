"""records/: the CPU study's numbers (the rerun with the record's model) are the ones its files and
the READMEs show, its ratio arithmetic is right, and every record run's log holds the code that
trained it."""
import importlib.util
import json
import math

import pytest

from conftest import REPO, logged_code

SCRIPT = REPO / "records" / "2026-11-23_shakespeare-cpu" / "study.py"
RECORD = REPO / "records" / "2026-11-24_record-model-cpu"  # its README; the study's output in study/


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def summary():
    return json.loads((RECORD / "study" / "study.json").read_text())


def test_epochs_to_reach_interpolates_in_log_epochs(study):
    curve = [(8, 2.2), (16, 2.0), (32, 1.9)]
    assert study.epochs_to_reach(curve, 2.3) == 8                     # reached at the first point
    assert study.epochs_to_reach(curve, 2.1) == pytest.approx(8 * math.sqrt(2))  # halfway in log2
    assert study.epochs_to_reach(curve, 1.9) == pytest.approx(32)
    assert study.epochs_to_reach(curve, 1.8) is None                   # never reached: no ratio


def test_tables_are_generated_from_the_json_and_copied_verbatim(study, summary):
    md = study.markdown(summary)
    assert (RECORD / "study" / "study.md").read_text() == md + "\n"
    tables = md[:md.index("Epochs really spent")].strip()
    assert tables in (RECORD / "README.md").read_text()


def test_the_two_corpora_record_is_the_reports_own_and_the_readme_copies_it():
    """records/2026-12-05_two-corpora-cpu: each study.md is study.py's markdown of its study.json,
    README's Shakespeare table is copied from it, and the side-by-side table is summary.py's."""
    import study as current
    record = REPO / "records" / "2026-12-05_two-corpora-cpu"
    readme = (REPO / "README.md").read_text()
    for corpus in ("shakespeare", "python-docs"):
        md = current.markdown(json.loads((record / corpus / "study.json").read_text()))
        assert (record / corpus / "study.md").read_text() == md + "\n"
        if corpus == "shakespeare":
            assert md[md.index("| epochs | single"):md.index("Epochs really spent")].strip() in readme
    spec = importlib.util.spec_from_file_location("two_corpora_summary", record / "summary.py")
    summary_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary_py)
    side_by_side = "\n".join(summary_py.headline([(name, summary_py.load(folder)) for name, folder in summary_py.CORPORA]))
    assert side_by_side in readme and side_by_side in (record / "README.md").read_text()


def assert_log_holds_the_code(run_dir):
    """A run written since the trainer became train_q0.py + q0_run.py + data/shards.py: each file under
    its own header, its text hashing to the header's and run.json's SHA-256 (conftest.logged_code).
    A run written before (run.json records no "code"; the records committed so far): the log embeds
    the one file the trainer was, whose main() it shows once."""
    run = json.loads((run_dir / "run.json").read_text())
    if "code" in run:
        code = logged_code(run_dir)
        assert "train_q0.py" in code and code["train_q0.py"].count("\ndef main(") == 1
    else:
        assert (run_dir / "log.txt").read_text().count("def main(") == 1


def test_record_runs_hold_the_numbers_the_tables_show(summary):
    top = summary["table"][-1]
    runs = [r["run"] for r in summary["q0"][str(int(top["budget"]))]]
    for run, loss in zip(runs, top["q0_prior"]):
        folder = RECORD / "study" / "runs" / run
        assert_log_holds_the_code(folder)
        prior = json.loads((folder / "prior.json").read_text())
        evaluation = json.loads((folder / "eval.json").read_text())
        full = max(evaluation["prior"]["budgets"], key=lambda b: b["K"])
        assert full["K"] == len(prior["members"]) and full["refitted"]["loss"] == loss
    records = (REPO / "records" / "README.md").read_text()
    for column in ("q0_prior", "baseline", "best_single"):
        assert f"{sum(top[column]) / len(top[column]):.4f}" in records


def test_every_record_runs_log_holds_its_code():
    folders = sorted(p.parent for p in (REPO / "records").rglob("run.json") if (p.parent / "log.txt").is_file())
    assert folders  # the committed records have runs
    for folder in folders:
        assert_log_holds_the_code(folder)
