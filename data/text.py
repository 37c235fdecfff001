"""Your own text as q0 shards: then `python train_q0.py --preset cpu --data-dir OUT`.

    python data/text.py my_texts/ --tokenizer bytes --out data/mine
    python data/text.py a.md b.md notes/ --tokenizer gpt2 --out data/notes --val-docs 20
    python data/text.py chats.jsonl --field body --tokenizer gpt2 --out data/chats --val-fraction 0.05

SOURCE is a file or a folder (searched recursively, hidden entries skipped, in sorted order of
the path). A .txt or .md file is one document; in a .jsonl file every line is one JSON record
and its --field (a nested one with dots: meta.text) is one document. Documents keep this order in
the shards; empty or blank ones are skipped, and a leading UTF-8 byte-order mark is not text.
Line endings are written as \n (--newlines lf, the default): \r\n and a lone \r become \n, and a
note says how many documents had them. Otherwise the same words tokenise differently by the editor
that saved them, and sources that mix endings hold \r in some documents and not others (a split
could then measure the \r bytes it happens to hold: per-byte losses moved by about 2% on a mixed
corpus). --newlines keep writes the bytes as they are, and notes a mix.

The validation split is whole documents, never trained on: --val-files (those files), --val-docs
N, or --val-fraction F (default 0.1) of the documents. Documents are chosen by the SHA-256 of
their text, so the choice does not depend on the order or the number of processes, and a
training document with the same text as a validation one is dropped. (train_q0.py carves its
fitness set from the front of the training shard.)

Writes OUT/train.q0t, OUT/val.q0t and OUT/manifest.json (the command, the SHA-256 of every source
and output file). A rerun checks the sources and the shards against the manifest and never
overwrites a file. GPT-2 tokenisation runs on --workers processes (default: all cores).
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import multiprocessing
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python data/text.py`: make `data` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.shards import (CHOICE, PATH, TEXT, ArgumentParser, DataError, Range, UsageError,  # noqa: E402
                         at_least, check_or_write_manifest, command, parse_checked, recorded_manifest,
                         machine_error, path_arg, refuse_other_build, verify_files, write_shard)
from data.tokenizers import get_tokenizer  # noqa: E402

SUFFIXES = (".txt", ".md", ".jsonl")
DEFAULT_VAL_FRACTION = 0.1
PARALLEL_BYTES = 4 << 20  # below this much GPT-2 text, worker processes cost more than they save


@dataclasses.dataclass
class Source:
    path: Path
    name: str  # how the manifest and the messages name it


@dataclasses.dataclass
class Document:
    name: str  # file, or file:line for a JSON Lines record
    text: str
    digest: bytes = b""

    def __post_init__(self):
        self.digest = hashlib.sha256(self.text.encode("utf-8")).digest()


# --- finding and reading the sources -----------------------------------------------------------

def find_sources(paths) -> list[Source]:
    """Files named, and the .txt/.md/.jsonl files under folders named, in a fixed order."""
    out = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted((p for p in given.rglob("*") if p.is_file() and p.suffix in SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(given).parts)),
                           key=lambda p: p.relative_to(given).as_posix())
            if not found:
                raise DataError(f"{given} holds no {'/'.join(SUFFIXES)} files; point at a folder of text")
            out += [Source(p, str(p)) for p in found]
        elif given.is_file():
            if given.suffix not in SUFFIXES:
                raise DataError(f"{given}: not a {'/'.join(SUFFIXES)} file; rename it, or convert it to text")
            out.append(Source(given, str(given)))
        else:
            raise DataError(f"{given} not found; give a file or a folder of text")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise DataError("a file is named twice among the sources; give each once")
    return out


def decode(raw: bytes, name: str, nul_is_bos: bool) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: not UTF-8 at byte offset {e.start} ({raw[e.start:e.start + 4]!r}); "
                        "convert it to UTF-8 (iconv -t UTF-8) or leave it out") from None
    if nul_is_bos and "\0" in text:
        raise DataError(f"{name}: a NUL byte at byte offset {raw.index(bytes(1))}, which the bytes tokenizer "
                        "reserves for BOS; remove it, or use --tokenizer gpt2")
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark (Windows editors write one) is not text


def read_documents(source: Source, field: str, nul_is_bos: bool) -> tuple[list[Document], str, int]:
    """(documents, SHA-256 of the file, its size); one line naming file and place on bad input."""
    raw = source.path.read_bytes()
    text = decode(raw, source.name, nul_is_bos=False)
    if source.path.suffix != ".jsonl":
        if nul_is_bos:
            decode(raw, source.name, nul_is_bos)
        return [Document(source.name, text)], hashlib.sha256(raw).hexdigest(), len(raw)
    docs = []
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may sit inside a string
        if not line.strip():
            continue
        where = f"{source.name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e.msg}); one JSON record per line") from None
        value = field_value(record, field)
        if not isinstance(value, str):
            raise DataError(f"{where}: no text field {field!r} in this record ({record_fields(record)}); name the "
                            f"field with --field, a nested one with dots (--field meta.text)")
        if nul_is_bos and "\0" in value:
            raise DataError(f"{where}: a NUL character in the text, which the bytes tokenizer reserves for BOS; "
                            "remove it, or use --tokenizer gpt2")
        docs.append(Document(where, value))
    return docs, hashlib.sha256(raw).hexdigest(), len(raw)


def field_value(record, field: str):
    """record[field]; for a name with dots that no key has whole (meta.text), the nested field."""
    if not isinstance(record, dict):
        return None
    if field in record:
        return record[field]
    value = record
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def record_fields(record, prefix: str = "") -> str:
    """The text fields a record has, nested ones with dots, for the message that names none."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            elif isinstance(v, str):
                yield prefix + k
    names = list(walk(record, prefix))
    return "its text fields: " + (", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "none")


# --- the validation split ----------------------------------------------------------------------

def choose_val(docs: list[Document], val: dict) -> set[int]:
    """Indices of the validation documents: by file, by count, or by fraction, each whole."""
    if "files" in val:
        wanted = set(val["files"])
        chosen = {i for i, d in enumerate(docs) if d.name.rsplit(":", 1)[0] in wanted
                  or d.name in wanted}
    else:
        count = val["docs"] if "docs" in val else max(1, round(val["fraction"] * len(docs)))
        by_hash = sorted(range(len(docs)), key=lambda i: (docs[i].digest, i))
        chosen = set(by_hash[:count])
    if not chosen:
        raise DataError("the validation split would be empty; give --val-docs, --val-files or --val-fraction")
    if len(chosen) >= len(docs):
        raise DataError(f"the validation split would take all {len(docs)} documents, leaving nothing to train on; "
                        "give fewer with --val-docs/--val-fraction, or more text")
    return chosen


# --- tokenising -------------------------------------------------------------------------------

def _encode(args) -> np.ndarray:
    name, text = args
    tokenizer = get_tokenizer(name)  # cached per worker process
    if name == "bytes":
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    else:
        body = np.array(tokenizer.encode(text), dtype=np.uint32)
    return np.concatenate([[tokenizer.bos_id], body]).astype(np.uint32)


def tokenize(texts: list[str], tokenizer, workers: int, desc: str) -> np.ndarray:
    """[BOS] + tokens of every text, in order; worker processes for large GPT-2 inputs."""
    total = sum(len(t) for t in texts)
    jobs = [(tokenizer.name, t) for t in texts]
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    with tqdm(total=total, unit="char", unit_scale=True, desc=desc, disable=None, file=sys.stderr) as bar:
        if tokenizer.name != "bytes" and workers > 1 and total > PARALLEL_BYTES:
            with multiprocessing.Pool(workers) as pool:
                pieces = []
                for text, piece in zip(texts, pool.imap(_encode, jobs, chunksize=16)):  # imap keeps the order
                    pieces.append(piece.astype(dtype))
                    bar.update(len(text))
        else:
            pieces = []
            for job in jobs:
                pieces.append(_encode(job).astype(dtype))
                bar.update(len(job[1]))
    return np.concatenate(pieces)


# --- the build --------------------------------------------------------------------------------

def line_endings(docs: list[Document], newlines: str, settings: dict) -> list[Document]:
    """The documents with \r\n and lone \r written as \n (newlines "lf") or as they are ("keep"),
    and a note when any holds a \r. Only then is the choice part of the build's settings: a
    corpus without \r builds the same either way (and as builds before the flag did)."""
    with_cr = sum("\r" in d.text for d in docs)
    if not with_cr:
        return docs
    settings["newlines"] = newlines
    if newlines == "keep":
        if with_cr < len(docs):
            print(f"note: line endings are mixed: {with_cr:,} of {len(docs):,} documents hold \\r and the rest do "
                  f"not; they are kept as text (--newlines lf writes every ending as \\n)")
        return docs
    print(f"note: {with_cr:,} of {len(docs):,} documents had \\r\\n or \\r line endings: written as \\n "
          f"(--newlines keep keeps them)")
    return [Document(d.name, d.text.replace("\r\n", "\n").replace("\r", "\n")) for d in docs]


def build(sources: list[Source], *, tokenizer_name: str, out: Path, val: dict, command: str,
          field: str = "text", workers: int = 1, about: dict | None = None,
          newlines: str = "lf") -> tuple[dict, bool]:
    """Tokenise the sources into out/{train,val}.q0t and out/manifest.json, or verify an earlier
    build of the same sources and settings. Returns (manifest, verified)."""
    tokenizer = get_tokenizer(tokenizer_name)
    docs, listed, empty = [], [], 0
    for source in sources:
        found, digest, size = read_documents(source, field, nul_is_bos=tokenizer.name == "bytes")
        kept = nonblank(found)
        empty += len(found) - len(kept)
        docs += kept
        listed.append(dict(name=source.name, bytes=size, sha256=digest, docs=len(kept)))
    return build_documents(docs, listed, tokenizer=tokenizer, out=out, val=val, command=command,
                           settings=dict(field=field, val=val), empty=empty, workers=workers, about=about,
                           newlines=newlines)


def nonblank(docs: list[Document]) -> list[Document]:
    return [d for d in docs if d.text.strip()]  # blank lines alone are no document


def build_documents(docs: list[Document], listed: list[dict], *, tokenizer, out: Path, val: dict, command: str,
                    settings: dict, empty: int = 0, workers: int = 1, about: dict | None = None,
                    newlines: str = "lf") -> tuple[dict, bool]:
    """build() on documents already read and not blank (`listed`: their sources, for the manifest;
    `empty`: the blank ones skipped). A corpus that is not a folder of files starts here
    (data/python_docs.py)."""
    if not docs:
        raise DataError(f"no text in {len(listed)} source file(s) (every document is empty or blank); point at "
                        f"files that hold text")
    docs = line_endings(docs, newlines, settings)
    chosen = choose_val(docs, val)
    val_digests = {docs[i].digest for i in chosen}
    train = [d for i, d in enumerate(docs) if i not in chosen and d.digest not in val_digests]
    if not train:
        raise DataError("every training document repeats a validation one; give fewer validation documents")
    manifest = dict(format="q0-data", version=1, command=command, **(about or {}), tokenizer=tokenizer.name,
                    vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                    settings=settings, sources=listed, empty_documents_skipped=empty,
                    duplicates_of_val_dropped=len(docs) - len(chosen) - len(train),
                    val_documents=[docs[i].name for i in sorted(chosen)], files={})
    recorded = recorded_manifest(out)
    if recorded is not None:  # an earlier build: the same one is verified, another refused
        refuse_other_build(out, recorded, manifest)
        verify_files(out, recorded)
        return recorded, True
    token_bytes = tokenizer.token_byte_lengths()
    for split, split_docs in (("train", train), ("val", [docs[i] for i in sorted(chosen)])):
        tokens = tokenize([d.text for d in split_docs], tokenizer, workers, split)
        manifest["files"][f"{split}.q0t"] = write_shard(
            out / f"{split}.q0t", tokens, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
            tokenizer=tokenizer.name, token_bytes=token_bytes, command=command)
    return manifest, check_or_write_manifest(out, manifest)


def report(out: Path, manifest: dict, verified: bool, seconds: float):
    for name, info in manifest["files"].items():
        print(f"{out / name}: {info['bytes']:,} bytes, {info['tokens']:,} tokens, {info['docs']:,} documents, "
              f"sha256 {info['sha256']}")
    print(f"{'verified' if verified else 'built'} in {seconds:.1f}s")


RANGES = {
    "sources": PATH, "tokenizer": CHOICE, "out": PATH, "field": TEXT, "newlines": CHOICE,
    "val_docs": at_least(1), "val_files": PATH, "val_fraction": Range(lo=0, hi=1, lo_open=True, hi_open=True),
    "workers": at_least(1),
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help=".txt/.md/.jsonl files or folders of them")
    p.add_argument("--tokenizer", choices=("bytes", "gpt2"), required=True)
    p.add_argument("--out", type=path_arg, required=True, help="output folder (a new one, or an earlier build's)")
    p.add_argument("--field", default="text",
                   help="the text field of .jsonl records, a nested one with dots: meta.text (default: %(default)s)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-docs", type=int, help="this many validation documents")
    val.add_argument("--val-files", nargs="+", metavar="FILE", help="these source files are the validation set")
    val.add_argument("--val-fraction", type=float,
                     help=f"this fraction of the documents (default {DEFAULT_VAL_FRACTION})")
    p.add_argument("--newlines", choices=("lf", "keep"), default="lf",
                   help="lf: write \\r\\n and \\r line endings as \\n; keep: write the bytes as they are "
                        "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="GPT-2 tokeniser processes (default: all cores)")
    return p


CORPUS_RANGES = {"tokenizer": CHOICE, "out": PATH}


def corpus_parser(description: str, default_out: Path) -> ArgumentParser:
    """--tokenizer and --out: the flags of a corpus q0 builds itself (data/shakespeare.py,
    data/python_docs.py), written to <out>/<tokenizer>/."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", choices=("bytes", "gpt2"), default="bytes")
    p.add_argument("--out", type=path_arg, default=default_out,
                   help="folder holding <tokenizer>/ (default: %(default)s)")
    return p


def build_corpus(build, args) -> tuple[dict, bool, float]:
    """(manifest, verified, seconds) of build(tokenizer, out); what the file system refused is one
    line (a full or read-only disk is a DiskError already)."""
    started = time.perf_counter()
    try:
        manifest, verified = build(args.tokenizer, args.out)
    except OSError as e:
        raise os_error(e) from None
    return manifest, verified, time.perf_counter() - started


def canonical_command(args) -> str:
    """The command as the manifest records it: the flags that shape the output, in one order."""
    words = ["python", "data/text.py", *map(str, map(Path, args.sources)), "--tokenizer", args.tokenizer]
    if args.field != "text":
        words += ["--field", args.field]
    if args.newlines != "lf":
        words += ["--newlines", args.newlines]
    if args.val_docs is not None:
        words += ["--val-docs", str(args.val_docs)]
    elif args.val_files:
        words += ["--val-files", *map(str, map(Path, args.val_files))]
    elif args.val_fraction is not None:
        words += ["--val-fraction", f"{args.val_fraction:g}"]
    return shlex.join(words + ["--out", str(args.out)])


def os_error(e: OSError) -> UsageError:
    """What the file system refused (an unreadable source, say) as one line, for every data command.
    A full or read-only disk under a file being written is a DiskError already (atomic_write)."""
    if e.filename is None or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # a write: a full disk
        return machine_error(e) or UsageError(f"{e.strerror or e}; check the paths and their permissions")
    return UsageError(f"{e.strerror or e}: {e.filename}; check the path and its permissions")


@command
def main(argv=None) -> int:
    args = parse_checked(build_parser(), RANGES, argv)
    if args.val_docs is not None:
        val = {"docs": args.val_docs}
    elif args.val_files:
        val = {"files": [str(Path(f)) for f in args.val_files]}
    else:
        val = {"fraction": args.val_fraction if args.val_fraction is not None else DEFAULT_VAL_FRACTION}
    started = time.perf_counter()
    try:
        if args.out.exists() and not args.out.is_dir():
            raise DataError(f"--out {args.out} is a file; give a folder")
        sources = find_sources(args.sources)
        known = {s.name for s in sources}
        missing = [f for f in val.get("files", []) if f not in known]
        if missing:
            raise DataError(f"--val-files {missing[0]} is not one of the sources' files; name it as found "
                            f"under a SOURCE, e.g. {sources[0].name}")
        manifest, verified = build(sources, tokenizer_name=args.tokenizer, out=args.out, val=val,
                                   command=canonical_command(args), field=args.field, workers=args.workers,
                                   newlines=args.newlines)
    except OSError as e:  # an unreadable source, say
        raise os_error(e) from None
    total = sum(s["bytes"] for s in manifest["sources"])
    print(f"sources: {len(manifest['sources']):,} files, {total:,} bytes, "
          f"{sum(s['docs'] for s in manifest['sources']):,} documents "
          f"({manifest['empty_documents_skipped']} empty skipped, "
          f"{manifest['duplicates_of_val_dropped']} duplicates of validation documents dropped)")
    report(args.out, manifest, verified, time.perf_counter() - started)
    print(f"next: python train_q0.py --preset cpu --data-dir {shlex.quote(str(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
