"""The house: which file may import which (README, "Layout"), and a log that holds the code of
every project file a run imports."""
import ast
import hashlib
import re
import subprocess
import sys
from argparse import Namespace

from conftest import REPO

import q0_run
import train_q0 as q0

PROJECT = {"train_q0", "q0_run", "fit_prior", "eval", "tasks", "sample", "import_slowrun", "study", "data"}


def imports_of(path) -> set[str]:
    """Top-level names of every module a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_no_arrow_runs_back_up():
    """data/ stands on nothing of q0's; q0_run.py on data/ only; the trainer on both; the companions
    on q0_run and, for forward passes, the trainer (eval.py also refits the curve's prior with
    fit_prior.py's solver and scores tasks.py's downstream tasks; sample.py chooses an ensemble with
    eval.py's prior reader; study.py runs the others as commands and reads their files). Neither the
    trainer nor q0_run imports a companion, and nothing imports study.py."""
    for path in (REPO / "data").glob("*.py"):
        assert imports_of(path) & PROJECT <= {"data"}, path
    assert imports_of(REPO / "q0_run.py") & PROJECT == {"data"}
    assert imports_of(REPO / "train_q0.py") & PROJECT == {"data", "q0_run"}
    assert imports_of(REPO / "fit_prior.py") & PROJECT <= {"data", "q0_run"}
    assert imports_of(REPO / "eval.py") & PROJECT <= {"data", "q0_run", "train_q0", "fit_prior", "tasks"}
    assert imports_of(REPO / "tasks.py") & PROJECT <= {"data", "q0_run", "train_q0"}
    assert imports_of(REPO / "sample.py") & PROJECT <= {"data", "q0_run", "train_q0", "eval"}
    assert imports_of(REPO / "tools" / "import_slowrun.py") & PROJECT <= {"data", "q0_run", "train_q0"}
    assert imports_of(REPO / "study.py") & PROJECT <= {"data", "q0_run", "train_q0", "fit_prior", "eval"}
    for path in [REPO / "train_q0.py", REPO / "q0_run.py", *REPO.glob("*.py"), *(REPO / "tools").glob("*.py")]:
        assert "study" not in imports_of(path) or path.name == "study.py", path  # nothing stands on the study


def loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after `statement` (run from the repository root)."""
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_what_each_floor_loads():
    """data/ runs without torch; q0_run and fit_prior.py never load the trainer, and eval.py loads it
    only to run forward passes (--forward)."""
    data = loaded_after("import data.shards, data.text, data.fineweb, data.shakespeare, data.tokenizers")
    assert "torch" not in data and "train_q0" not in data
    for statement in ("import q0_run", "import fit_prior", "import eval", "import tasks"):
        assert "train_q0" not in loaded_after(statement), statement


def test_the_log_embeds_every_file_the_run_imports(tmp_path):
    """Each of the trainer's project files in the log under its own header with its SHA-256, the
    text whole: a record is reproducible from its log."""
    files = q0_run.code_files(q0)
    assert {p.name for p in files} == {"train_q0.py", "q0_run.py", "shards.py"}
    log = q0_run.RunLog(tmp_path, enabled=True)
    q0_run.log_header(log, Namespace(seed=0), 1, files)
    text = (tmp_path / "log.txt").read_text()
    headers = re.findall(r"^# (\S+) \(sha256 ([0-9a-f]{64})\)$", text, flags=re.M)
    assert [name for name, _ in headers] == [str(p.relative_to(REPO)) for p in files]
    for (name, digest), path in zip(headers, files):
        assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.read_text() in text, name
