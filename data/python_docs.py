"""A second corpus every Python install ships: Python's own documentation, as q0 shards.

    python data/python_docs.py --tokenizer bytes      # or: --tokenizer gpt2

Two kinds of documents, nothing downloaded:
- the reference topics `help()` shows (`pydoc_data.topics`: the language reference's sections),
  one document per topic, named `topic:<name>`;
- the docstrings of the standard library's modules, read from their source with `ast` (never
  imported: importing runs code), one document per module, named `module:<dotted.name>`: the
  module's docstring, then each class's and function's under its qualified name, in source order.
  Test suites, IDLE's tests and installed packages are left out.
Documents are in sorted order of their names (modules, then topics), so the fitness carve takes
the first modules' docstrings (`__future__`, `_aix_support`, ...). The
validation split is 10% of the documents, chosen by the SHA-256 of their text (data/text.py).
The text depends on the Python version: the manifest records it, and a rerun under another
version is refused as a different build.

Writes data/python-docs/<tokenizer>/{train,val}.q0t and manifest.json (data/text.py's format); a
rerun verifies them and never overwrites them.
"""
from __future__ import annotations

import ast
import hashlib
import platform
import shlex
import sys
import sysconfig
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/python_docs.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import text  # noqa: E402
from data.shards import ArgumentParser, DataError, command, parse_checked  # noqa: E402
from data.tokenizers import get_tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "data" / "python-docs"
LEFT_OUT = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def topic_documents() -> tuple[list[text.Document], dict]:
    """The reference topics, and their source entry for the manifest."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("this Python has no pydoc_data (some minimal builds leave it out); use a full "
                        "Python install") from None
    docs = [text.Document(f"topic:{name}", topics[name]) for name in sorted(topics)]
    return docs, _source("pydoc_data.topics", docs)


def docstrings(tree: ast.AST, prefix: str = "") -> list[tuple[str, str]]:
    """(qualified name, docstring) of a module's module, classes and functions, in source order."""
    out = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, DOCUMENTED[1:]):
            name = f"{prefix}{node.name}"
            doc = ast.get_docstring(node)
            if doc:
                out.append((name, doc))
            out += docstrings(node, f"{name}.")
    return out


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_documents(root: Path) -> tuple[list[text.Document], dict]:
    """One document per standard-library module that has a docstring; source files that do not
    parse under this Python (a few are test data) are skipped and counted."""
    docs, skipped = [], 0
    files = sorted(p for p in root.rglob("*.py") if not LEFT_OUT & set(p.relative_to(root).parts))
    for path in files:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            skipped += 1
            continue
        name = module_name(path, root)
        parts = [ast.get_docstring(tree) or ""] + [f"{qual}\n\n{doc}" for qual, doc in docstrings(tree)]
        body = "\n\n".join(p for p in parts if p)
        if body:
            docs.append(text.Document(f"module:{name}", f"{name}\n\n{body}\n"))
    docs.sort(key=lambda d: d.name)
    return docs, {**_source("standard library docstrings", docs), "unparsed_files": skipped}


def _source(name: str, docs: list[text.Document]) -> dict:
    """A manifest entry for documents that are not one file: their bytes and one SHA-256 over
    every (name, text) pair in order."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    return dict(name=name, bytes=sum(len(d.text.encode()) for d in docs), sha256=h.hexdigest(), docs=len(docs))


def command_for(tokenizer_name: str, out_root: Path) -> str:
    words = ["python", "data/python_docs.py", "--tokenizer", tokenizer_name]
    if Path(out_root).resolve() != DEFAULT_OUT:
        words += ["--out", str(out_root)]
    return shlex.join(words)


def build(tokenizer_name: str, out_root: Path = DEFAULT_OUT, stdlib: Path | None = None) -> tuple[dict, bool]:
    """(manifest, verified): data/text.py's build on the topics and the modules' docstrings."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    topics, topic_source = topic_documents()
    modules, module_source = module_documents(stdlib)
    docs = sorted(text.nonblank(topics + modules), key=lambda d: d.name)
    val = {"fraction": text.DEFAULT_VAL_FRACTION}
    about = dict(source=f"Python {platform.python_version()}'s own documentation: the reference topics "
                        f"(pydoc_data) and the standard library's docstrings, one document per topic and per module")
    return text.build_documents(docs, [topic_source, module_source], tokenizer=get_tokenizer(tokenizer_name),
                                out=Path(out_root) / tokenizer_name, val=val,
                                command=command_for(tokenizer_name, out_root),
                                settings=dict(val=val), empty=len(topics) + len(modules) - len(docs), about=about)


RANGES = text.CORPUS_RANGES


def build_parser() -> ArgumentParser:
    return text.corpus_parser(__doc__, DEFAULT_OUT)


@command
def main(argv=None) -> int:
    args = parse_checked(build_parser(), RANGES, argv)
    manifest, verified, seconds = text.build_corpus(build, args)
    for source in manifest["sources"]:
        print(f"{source['name']}: {source['docs']:,} documents, {source['bytes']:,} bytes")
    text.report(args.out / args.tokenizer, manifest, verified, seconds)
    print(f"next: python train_q0.py --preset cpu --data-dir {shlex.quote(str(args.out / args.tokenizer))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
