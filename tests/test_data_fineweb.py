"""data/fineweb.py on a local stand-in stream: Slowrun's split, both sources, reruns, downloads.

No test touches the network: the stream is a folder laid out like the hub repositories.
"""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import fineweb  # noqa: E402
from data.shards import DataError, read_tokens, sha256_file  # noqa: E402
from data.tokenizers import get_tokenizer  # noqa: E402

FILE_TOKENS = 3000  # tokens per pre-tokenised file: small, so documents straddle file boundaries
WORDS = "the of and to in a is that for it as was with be by on not he I this are or his café naïve 東京 🙂".split()


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """Texts, their token stream, document starts, and the stream as kjj0/fineweb10B-gpt2 lays it out."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, rng.integers(3, 120))) + ".\n" for _ in range(200)]
    tokenizer = get_tokenizer("gpt2")
    docs = [np.array([tokenizer.bos_id] + tokenizer.encode(text), dtype=np.uint16) for text in texts]
    stream = np.concatenate(docs)
    starts = np.cumsum([0] + [d.size for d in docs[:-1]])
    folder = tmp_path_factory.mktemp("kjj0")
    for index, begin in enumerate(range(0, stream.size, FILE_TOKENS)):
        chunk = stream[begin:begin + FILE_TOKENS]
        header = np.zeros(256, dtype=np.int32)
        header[:3] = 20240520, 1, chunk.size
        (folder / fineweb.source_file_name("pretokenized", index)).write_bytes(header.tobytes() + chunk.tobytes())
    return dict(texts=texts, stream=stream, starts=starts, folder=folder)


def run(*args) -> int:
    """The command's exit code: 0, or 2 with one `error:` line on stderr."""
    return fineweb.main([str(a) for a in args])


def split_flags(stand_in, out, val_tokens, train_tokens) -> list:
    return ["--local-dir", stand_in["folder"], "--out", out, "--val-tokens", val_tokens, "--train-tokens", train_tokens]


def build_split(stand_in, out, val_tokens, train_tokens, *extra):
    assert run(*split_flags(stand_in, out, val_tokens, train_tokens), *extra) == 0
    return read_tokens(out / "val.q0t"), read_tokens(out / "train.q0t")


def last_error_line(capsys) -> str:
    """The one `error:` line, after the progress bars that precede it on stderr."""
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("error")]
    assert errors == err[-1:], err
    return err[-1]


def test_validation_cut_inside_a_document(stand_in, tmp_path):
    stream, starts = stand_in["stream"], stand_in["starts"]
    k = next(i for i in range(5, len(starts)) if starts[i + 1] - starts[i] > 10)
    val_tokens = int(starts[k]) + 7  # seven tokens into document k
    train_tokens = 2 * FILE_TOKENS + 11  # crosses two file boundaries, ends inside a document
    val, train = build_split(stand_in, tmp_path, val_tokens, train_tokens)

    assert np.array_equal(val.tokens, stream[:val_tokens])  # cut exactly, the straddler truncated
    next_start = int(starts[k + 1])  # the rest of document k is dropped ...
    assert np.array_equal(train.tokens, stream[next_start:next_start + train_tokens])  # ... train starts whole
    assert train.tokens[0] == 50256 and val.tokens[0] == 50256
    byte_lengths = get_tokenizer("gpt2").token_byte_lengths()
    assert val.text_bytes == byte_lengths[val.tokens].sum()
    assert train.text_bytes == byte_lengths[train.tokens].sum()
    # Whole documents in validation count exactly their UTF-8 bytes.
    assert byte_lengths[stream[:starts[k]]].sum() == sum(len(t.encode()) for t in stand_in["texts"][:k])


def test_validation_cut_on_a_document_boundary(stand_in, tmp_path):
    stream, starts = stand_in["stream"], stand_in["starts"]
    val_tokens = int(starts[20])  # validation ends exactly where document 20 begins
    val, train = build_split(stand_in, tmp_path, val_tokens, 500)
    assert np.array_equal(val.tokens, stream[:val_tokens])
    assert np.array_equal(train.tokens, stream[val_tokens:val_tokens + 500])


def test_sidecar_and_rerun_verify_without_overwriting(stand_in, tmp_path, capsys):
    build_split(stand_in, tmp_path, 1000, 2000)
    recorded = json.loads((tmp_path / "manifest.json").read_text())
    assert recorded["settings"]["val_tokens"] == 1000 and recorded["settings"]["source"] == "pretokenized"
    command = (f"python data/fineweb.py --val-tokens 1000 --train-tokens 2000 --local-dir {stand_in['folder']} "
               f"--out {tmp_path}")
    assert recorded["command"] == read_tokens(tmp_path / "val.q0t").command == command  # what rebuilds them
    for name in ("val.q0t", "train.q0t"):
        assert recorded["files"][name]["sha256"] == sha256_file(tmp_path / name)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    capsys.readouterr()

    build_split(stand_in, tmp_path, 1000, 2000)
    assert "verified" in capsys.readouterr().out
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    assert run(*split_flags(stand_in, tmp_path, 1000, 3000)) == 2  # other settings: refused, nothing touched
    assert "different split" in last_error_line(capsys)
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}

    raw = bytearray((tmp_path / "train.q0t").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "train.q0t").write_bytes(bytes(raw))
    assert run(*split_flags(stand_in, tmp_path, 1000, 2000)) == 2
    assert "SHA-256" in last_error_line(capsys)
    assert (tmp_path / "train.q0t").read_bytes() == bytes(raw)

    (tmp_path / "manifest.json").write_text("{not json")  # a damaged manifest: one line, nothing replaced
    assert run(*split_flags(stand_in, tmp_path, 1000, 2000)) == 2
    assert "not a manifest" in last_error_line(capsys)
    assert (tmp_path / "manifest.json").read_text() == "{not json"


def test_partial_output_without_sidecar_is_refused(stand_in, tmp_path, capsys):
    (tmp_path / "val.q0t").write_bytes(b"left over by a crash")
    assert run(*split_flags(stand_in, tmp_path, 1000, 2000)) == 2
    assert "without" in last_error_line(capsys)
    assert (tmp_path / "val.q0t").read_bytes() == b"left over by a crash"


def test_out_that_is_a_file_is_refused(stand_in, tmp_path, capsys):
    (tmp_path / "out").write_text("mine")
    assert run(*split_flags(stand_in, tmp_path / "out", 1000, 2000)) == 2
    assert last_error_line(capsys).startswith("error: --out ") and (tmp_path / "out").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stream_too_short(stand_in, tmp_path, capsys):
    assert run(*split_flags(stand_in, tmp_path, 1000, stand_in["stream"].size)) == 2
    assert last_error_line(capsys).startswith("error: the stream ended")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="the parquet source needs pyarrow")
def test_parquet_source_gives_the_same_shards(stand_in, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = tmp_path / "fineweb"
    texts = stand_in["texts"]
    for index, part in enumerate((texts[:77], texts[77:])):
        path = folder / fineweb.source_file_name("parquet", index)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": part, "id": [str(i) for i in range(len(part))]}), path)
    build_split(stand_in, tmp_path / "from_bin", 1234, 4321)
    assert run("--source", "parquet", "--local-dir", folder, "--out", tmp_path / "from_parquet", "--val-tokens",
               1234, "--train-tokens", 4321, "--workers", 2) == 0
    for name in ("val.q0t", "train.q0t"):
        assert sha256_file(tmp_path / "from_bin" / name) == sha256_file(tmp_path / "from_parquet" / name)


def test_hub_fetcher_retries_then_reports_missing_files(tmp_path):
    from huggingface_hub.errors import EntryNotFoundError
    calls = []

    def flaky_download(repo_id, filename, repo_type, revision):
        calls.append((repo_id, filename, repo_type, revision))
        if filename == "absent.bin":
            raise EntryNotFoundError("404")
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return str(tmp_path / filename)

    fetch = fineweb.hub_fetcher("kjj0/fineweb10B-gpt2", "abc123", download=flaky_download, first_wait_s=0)
    assert fetch("fineweb_val_000000.bin") == tmp_path / "fineweb_val_000000.bin"
    assert calls == [("kjj0/fineweb10B-gpt2", "fineweb_val_000000.bin", "dataset", "abc123")] * 3
    with pytest.raises(FileNotFoundError):
        fetch("absent.bin")

    def always_down(*args, **kwargs):
        raise TimeoutError("timed out")
    with pytest.raises(DataError, match=f"after {fineweb.DOWNLOAD_ATTEMPTS} attempts"):
        fineweb.hub_fetcher("r", "v", download=always_down, first_wait_s=0)("f.bin")


def test_default_sources_are_pinned():
    for source in fineweb.SOURCES.values():
        assert len(source["revision"]) == 40 and int(source["revision"], 16) >= 0
    assert fineweb.source_file_name("pretokenized", 0) == "fineweb_val_000000.bin"
    assert fineweb.source_file_name("pretokenized", 1) == "fineweb_train_000001.bin"
    assert fineweb.source_file_name("parquet", 0) == "sample/10BT/000_00000.parquet"
