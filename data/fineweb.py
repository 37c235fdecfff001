"""The real data: Slowrun's FineWeb split, as q0 shards.

    python data/fineweb.py                                  # 10M validation + 100M training tokens
    python data/fineweb.py --val-tokens 100000 --train-tokens 1000000 --out data/fineweb-small
    python data/fineweb.py --source parquet                 # tokenise the raw text yourself (needs pyarrow)

The stream is FineWeb `sample-10BT` in its published order, each document as <|endoftext|> followed by
its GPT-2 tokens. Validation is the first --val-tokens tokens, cut exactly there: the document that
straddles the cut is truncated and the rest of it is dropped. Training starts at the next whole
document and is cut exactly after --train-tokens tokens. That is Slowrun's prepare_data.py.

Sources (both give the same stream; pick with --source):
  pretokenized  kjj0/fineweb10B-gpt2, modded-nanogpt's GPT-2 shards of the same stream (100M tokens a
                file; fineweb_val_000000.bin holds the first 100M, fineweb_train_000001.bin the next 100M).
                About 400 MB to download and nothing to tokenise.
  parquet       HuggingFaceFW/fineweb sample/10BT/*.parquet, tokenised here on all cores.
Downloads go through huggingface_hub (its cache, resumable; HF_TOKEN is used when set) and are
retried with backoff. Writes <out>/val.q0t, <out>/train.q0t and <out>/manifest.json (the command,
settings and SHA-256 of both shards). A rerun verifies the shards against it and never overwrites them.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import multiprocessing
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python data/fineweb.py`: make `data` importable
    sys.path.insert(0, str(REPO_ROOT))
from data.shards import (CHOICE, MANIFEST, MODDED_MAGIC, MODDED_VERSION, PATH, TEXT,  # noqa: E402
                         ArgumentParser, DataError, at_least, atomic_write_bytes, command, parse_checked,
                         path_arg, sha256_file, write_shard)
from data.text import os_error  # noqa: E402
from data.tokenizers import get_tokenizer  # noqa: E402

SOURCES = {
    "pretokenized": dict(repo="kjj0/fineweb10B-gpt2", revision="889765ea1f903759787add96995d81171b632d0c"),
    "parquet": dict(repo="HuggingFaceFW/fineweb", revision="9bb295ddab0e05d785b879661af7260fed5140fc"),
}
DEFAULT_OUT = REPO_ROOT / "data" / "fineweb"
SIDECAR = MANIFEST
DOWNLOAD_ATTEMPTS = 4  # each also retried inside huggingface_hub, for about 20 s


def source_file_name(source: str, index: int) -> str:
    """The index-th file of a source, in stream order, as named in its hub repository."""
    if source == "parquet":
        return f"sample/10BT/{index:03d}_00000.parquet"
    return "fineweb_val_000000.bin" if index == 0 else f"fineweb_train_{index:06d}.bin"


# --- Fetching: a fetch(name) -> local Path function; a missing file raises FileNotFoundError ---------

def hub_fetcher(repo_id: str, revision: str, download=None, first_wait_s: float = 5.0):
    """Fetch files of a hub dataset at a pinned revision, retrying network failures with backoff."""
    from huggingface_hub import errors
    if download is None:
        from huggingface_hub import hf_hub_download as download

    def fetch(name: str) -> Path:
        for attempt in range(DOWNLOAD_ATTEMPTS):
            try:
                return Path(download(repo_id, name, repo_type="dataset", revision=revision))
            except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as error:
                raise DataError(f"{repo_id}@{revision}: {type(error).__name__}; check --revision "
                                "(and HF_TOKEN if the repository is gated)") from None
            except errors.LocalEntryNotFoundError as error:  # hub unreachable: worth another try
                failure = error
            except errors.EntryNotFoundError:
                raise FileNotFoundError(f"{repo_id}@{revision} has no file {name}") from None
            except OSError as error:  # connection resets, timeouts, 5xx
                failure = error
            if attempt + 1 == DOWNLOAD_ATTEMPTS:
                raise DataError(f"could not download {name} from {repo_id} after {DOWNLOAD_ATTEMPTS} attempts "
                                f"({type(failure).__name__}); rerun to resume")
            wait = first_wait_s * 2 ** attempt
            print(f"{name}: {type(failure).__name__}: {failure}; retry in {wait:.0f}s", file=sys.stderr)
            time.sleep(wait)
    return fetch


def folder_fetcher(root: Path):
    """Fetch from a local folder laid out like the hub repository (an offline mirror, or a test)."""
    def fetch(name: str) -> Path:
        path = Path(root) / name
        if not path.exists():
            raise FileNotFoundError(f"no file {path}")
        return path
    return fetch


def stream_files(fetch, source: str):
    """Local paths of the source's files in stream order, fetched only when the stream reaches them."""
    index = 0
    while True:
        try:
            yield fetch(source_file_name(source, index))
        except FileNotFoundError as missing:
            if index == 0:
                raise DataError(f"{missing}: nothing to read for --source {source}") from None
            return
        index += 1


# --- Documents: each a uint16 array that starts with BOS, in stream order ----------------------------

def read_modded_bin(path: Path) -> np.ndarray:
    """modded-nanogpt's shard: 256 int32 (magic, version, token count, ...), then uint16 tokens."""
    header = np.fromfile(path, dtype="<i4", count=256)
    tokens = np.fromfile(path, dtype="<u2", offset=256 * 4) if header.size == 256 else np.zeros(0, "<u2")
    if header.size < 256 or header[0] != MODDED_MAGIC or header[1] != MODDED_VERSION or tokens.size != header[2]:
        raise DataError(f"{path}: not a whole modded-nanogpt shard (bad header, or truncated); delete it from "
                        "the huggingface cache and rerun")
    if tokens.size and int(tokens.max()) >= 50257:
        raise DataError(f"{path}: token ids outside GPT-2's vocabulary; delete it from the huggingface cache and rerun")
    return tokens


def documents_from_token_files(paths, bos_id: int):
    """Cut pre-tokenised files at BOS; a document may continue from one file into the next."""
    carry = np.zeros(0, dtype=np.uint16)
    for path in paths:
        stream = np.concatenate([carry, read_modded_bin(path)])
        starts = np.flatnonzero(stream == bos_id)
        if starts.size == 0 or starts[0] != 0:
            raise DataError(f"{path}: the token stream does not start with <|endoftext|> where a document "
                            "should begin; delete the file from the huggingface cache and rerun")
        for begin, end in zip(starts[:-1], starts[1:]):
            yield stream[begin:end]
        carry = stream[starts[-1]:]
    if carry.size:
        yield carry


def _encode_document(text: str) -> np.ndarray:
    tokenizer = get_tokenizer("gpt2")  # cached per worker process
    return np.array([tokenizer.bos_id] + tokenizer.encode(text), dtype=np.uint16)


def documents_from_parquet_files(paths, workers: int):
    """Tokenise the `text` column on `workers` processes; ordered imap keeps the stream order."""
    import pyarrow.parquet as pq
    with multiprocessing.Pool(workers) as pool:
        for path in paths:
            # One record batch at a time bounds memory: imap would otherwise queue a whole file.
            for batch in pq.ParquetFile(path).iter_batches(batch_size=8192, columns=["text"]):
                yield from pool.imap(_encode_document, batch.column("text").to_pylist(), chunksize=64)


def take_tokens(documents, budget: int, desc: str) -> np.ndarray:
    """The next `budget` tokens of whole documents; the last one is cut and the rest of it is lost."""
    pieces, have = [], 0
    with tqdm(total=budget, unit="tok", unit_scale=True, desc=desc) as bar:
        for document in documents:
            piece = document[:budget - have]
            pieces.append(piece)
            have += piece.size
            bar.update(piece.size)
            if have == budget:
                return np.concatenate(pieces)
    raise DataError(f"the stream ended after {have} of the {budget} {desc} tokens asked for; "
                    "lower --val-tokens/--train-tokens")


# --- The command -------------------------------------------------------------------------------------

def verify_existing(out: Path, settings: dict) -> dict | None:
    """The recorded sidecar if out/ already holds this split (hashes checked); None if out/ is empty."""
    sidecar = out / SIDECAR
    shards = [out / "val.q0t", out / "train.q0t"]
    if not sidecar.exists():
        for shard in shards:
            if shard.exists():
                raise DataError(f"{shard} exists without {sidecar} (an interrupted build?); "
                                "move it away and rerun")
        return None
    try:
        recorded = json.loads(sidecar.read_text())
        digests = {shard: recorded["files"][shard.name]["sha256"] for shard in shards}
    except (ValueError, KeyError, TypeError):  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise DataError(f"{sidecar} is not a manifest this command wrote; move {out} away and rerun") from None
    if recorded.get("settings") != settings:
        raise DataError(f"{out} holds a different split ({recorded.get('settings')}); pass --out for a new one")
    for shard, digest in digests.items():
        if not shard.exists() or sha256_file(shard) != digest:
            raise DataError(f"{shard} is missing or does not match its SHA-256 in {sidecar}; "
                            f"move {out} away and rerun")
    return recorded


def build(out: Path, settings: dict, fetch, workers: int, command: str) -> dict:
    """Write val.q0t and train.q0t from one pass over the stream, then the sidecar (last, atomically)."""
    tokenizer = get_tokenizer("gpt2")
    paths = stream_files(fetch, settings["source"])
    if settings["source"] == "parquet":
        documents = documents_from_parquet_files(paths, workers)
    else:
        documents = documents_from_token_files(paths, tokenizer.bos_id)
    byte_lengths = tokenizer.token_byte_lengths()
    files = {}
    with contextlib.closing(documents):
        for split in ("val", "train"):
            tokens = take_tokens(documents, settings[f"{split}_tokens"], split)
            # The shard carries every token's UTF-8 bytes (GPT-2 BPE is byte level), so a document cut
            # at the split counts only the part kept.
            files[f"{split}.q0t"] = write_shard(out / f"{split}.q0t", tokens, vocab_size=tokenizer.vocab_size,
                                                bos_id=tokenizer.bos_id, tokenizer=tokenizer.name,
                                                token_bytes=byte_lengths, command=command)
    recorded = dict(command=command, settings=settings, files=files)
    atomic_write_bytes(out / SIDECAR, (json.dumps(recorded, indent=2) + "\n").encode())
    return recorded


RANGES = {"source": CHOICE, "val_tokens": at_least(1), "train_tokens": at_least(1), "revision": TEXT,
          "local_dir": PATH, "out": PATH, "workers": at_least(1)}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=sorted(SOURCES), default="pretokenized")
    parser.add_argument("--val-tokens", type=int, default=10_000_000)  # int() accepts 10_000_000
    parser.add_argument("--train-tokens", type=int, default=100_000_000)
    parser.add_argument("--revision", help="hub commit to read (default: the pinned one for --source)")
    parser.add_argument("--local-dir", type=Path, help="read a local folder laid out like the hub repository")
    parser.add_argument("--out", type=path_arg, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokeniser processes")
    return parser


def canonical_command(args) -> str:
    words = ["python", "data/fineweb.py"]
    for flag, value, default in (("--source", args.source, "pretokenized"), ("--val-tokens", args.val_tokens, 10_000_000),
                                 ("--train-tokens", args.train_tokens, 100_000_000), ("--revision", args.revision, None),
                                 ("--local-dir", args.local_dir, None)):
        if value != default:
            words += [flag, str(value)]
    if Path(args.out).resolve() != DEFAULT_OUT:
        words += ["--out", str(args.out)]
    return shlex.join(words)


@command
def main(argv=None) -> int:
    args = parse_checked(build_parser(), RANGES, argv)

    source = SOURCES[args.source]
    origin = (f"folder {args.local_dir.resolve()}" if args.local_dir
              else f"{source['repo']}@{args.revision or source['revision']}")
    settings = dict(source=args.source, origin=origin, val_tokens=args.val_tokens, train_tokens=args.train_tokens)
    started = time.perf_counter()
    try:
        if args.out.exists() and not args.out.is_dir():
            raise DataError(f"--out {args.out} is a file; give a folder")
        if args.source == "parquet" and importlib.util.find_spec("pyarrow") is None:
            raise DataError("--source parquet reads Parquet with pyarrow: pip install pyarrow "
                            "(or use the default --source pretokenized, which needs only numpy)")
        recorded = verify_existing(args.out, settings)
        verb = "verified"
        if recorded is None:
            fetch = (folder_fetcher(args.local_dir) if args.local_dir
                     else hub_fetcher(source["repo"], args.revision or source["revision"]))
            recorded, verb = build(args.out, settings, fetch, args.workers, canonical_command(args)), "built"
    except OSError as e:  # what the file system refused (a full or read-only disk is a DiskError already)
        raise os_error(e) from None
    for name, info in recorded["files"].items():
        print(f"{args.out / name}: {info['bytes']:,} bytes, {info['tokens']:,} tokens, {info['docs']:,} documents, "
              f"sha256 {info['sha256']}")
    print(f"{verb} from {origin} in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
