"""data/python_docs.py: Python's own documentation as a corpus (reference topics and the
standard library's docstrings, read with ast, never imported)."""
import sys
from pathlib import Path

import numpy as np

from conftest import REPO

sys.path.insert(0, str(REPO))
from data import python_docs  # noqa: E402
from data.shards import read_tokens  # noqa: E402

MODULE = '''"""A module."""


class Box:
    """A box."""

    def open(self):
        """Open it."""


async def fetch():
    """Fetch."""


def undocumented():
    pass
'''


def fake_stdlib(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text('"""The package."""\n')
    (root / "box.py").write_text(MODULE)
    (root / "broken.py").write_text("def (:\n")                 # test data that does not parse
    (root / "quiet.py").write_text("x = 1\n")                    # no docstring: no document
    for left_out in ("test", "site-packages"):
        (root / left_out).mkdir()
        (root / left_out / "m.py").write_text('"""Left out."""\n')
    return root


def test_module_documents_are_the_docstrings_in_source_order(tmp_path):
    docs, source = python_docs.module_documents(fake_stdlib(tmp_path / "lib"))
    assert [d.name for d in docs] == ["module:box", "module:pkg"]
    assert docs[0].text == "box\n\nA module.\n\nBox\n\nA box.\n\nBox.open\n\nOpen it.\n\nfetch\n\nFetch.\n"
    assert source["docs"] == 2 and source["unparsed_files"] == 1


def test_the_build_has_both_kinds_and_a_rerun_verifies(tmp_path, capsys):
    lib = fake_stdlib(tmp_path / "lib")
    manifest, verified = python_docs.build("bytes", tmp_path / "out", stdlib=lib)
    assert not verified and [s["name"] for s in manifest["sources"]] == ["pydoc_data.topics",
                                                                         "standard library docstrings"]
    assert manifest["sources"][0]["docs"] > 50  # the reference topics `help()` shows
    docs = {d.name: d.text for d in python_docs.topic_documents()[0] + python_docs.module_documents(lib)[0]}
    first = min(set(docs) - set(manifest["val_documents"]))  # the training stream: sorted names, modules first
    train = read_tokens(tmp_path / "out" / "bytes" / "train.q0t")
    assert bytes(train.tokens[1:1 + len(docs[first].encode())].astype(np.uint8)) == docs[first].encode()
    again, verified = python_docs.build("bytes", tmp_path / "out", stdlib=lib)
    assert verified and again["files"] == manifest["files"]
