"""The token file formats train_q0.py reads: ours (.q0t), Slowrun's .pt and modded-nanogpt's .bin."""
import hashlib
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_q0 import DataError, read_tokens, write_shard  # noqa: E402

GPT2 = dict(vocab_size=50257, bos_id=50256, tokenizer="gpt2")


def documents_stream(bos_id=50256, vocab_size=50257, docs=20, seed=0) -> np.ndarray:
    """`docs` documents of random length, each BOS then ids drawn from the rest of the vocabulary."""
    rng = np.random.default_rng(seed)
    pieces = []
    for _ in range(docs):
        body = rng.integers(0, vocab_size - 1, rng.integers(1, 50))
        body[body >= bos_id] += 1
        pieces.append(np.append(bos_id, body))
    return np.concatenate(pieces)


def write_modded_bin(path: Path, tokens: np.ndarray, magic=20240520, version=1, declared=None):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, tokens.size if declared is None else declared
    path.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())


def assert_one_line_error(path: Path, expected: str, **kwargs):
    with pytest.raises(DataError) as caught:
        read_tokens(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and expected in message
    assert "python data/" in message  # names the command that rebuilds the file


def test_q0t_round_trip_and_header_layout(tmp_path):
    tokens = documents_stream()
    path = tmp_path / "train.q0t"
    info = write_shard(path, tokens, text_bytes=1234, **GPT2)
    raw = path.read_bytes()
    assert len(raw) == 256 + 2 * tokens.size
    magic, version, token_bytes, n, vocab, bos, docs, text_bytes = struct.unpack_from("<8sIIQIIQQ", raw)
    assert (magic, version, token_bytes, n, vocab, bos) == (b"Q0TOKENS", 1, 2, tokens.size, 50257, 50256)
    assert (docs, text_bytes) == (20, 1234)
    assert raw[48:80].rstrip(b"\0") == b"gpt2"
    assert raw[80:112] == hashlib.sha256(tokens.astype(np.uint16).tobytes()).digest()
    assert raw[112:256] == bytes(144)
    assert info["sha256"] == hashlib.sha256(raw).hexdigest()

    found = read_tokens(path)
    assert np.array_equal(found.tokens, tokens)
    assert (found.format, found.tokenizer, found.vocab_size, found.bos_id, found.text_bytes) == \
        ("q0", "gpt2", 50257, 50256, 1234)


def test_q0t_uses_four_byte_tokens_above_65536(tmp_path):
    tokens = np.array([70000, 5, 69999, 70000, 1])
    write_shard(tmp_path / "big.q0t", tokens, vocab_size=70001, bos_id=70000, tokenizer="gpt2", text_bytes=3)
    assert (tmp_path / "big.q0t").stat().st_size == 256 + 4 * tokens.size
    assert np.array_equal(read_tokens(tmp_path / "big.q0t").tokens, tokens)


def test_write_shard_never_overwrites(tmp_path):
    path = tmp_path / "val.q0t"
    write_shard(path, documents_stream(), text_bytes=1, **GPT2)
    before = path.read_bytes()
    with pytest.raises(DataError):
        write_shard(path, documents_stream(seed=1), text_bytes=1, **GPT2)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_reads_slowrun_pt(tmp_path):
    tokens = documents_stream()
    starts = np.flatnonzero(tokens == 50256)
    path = tmp_path / "fineweb_val.pt"
    # Exactly what Slowrun's prepare_data.py saves.
    torch.save(dict(tokens=torch.from_numpy(tokens.astype(np.uint16)), doc_starts=torch.from_numpy(starts),
                    bos_id=50256, seq_shuffle_seed=42, seq_size=2049), path)
    found = read_tokens(path)
    assert np.array_equal(found.tokens, tokens)
    assert (found.format, found.tokenizer, found.vocab_size, found.bos_id, found.text_bytes) == \
        ("slowrun", "gpt2", 50257, 50256, None)


def test_reads_modded_bin(tmp_path):
    tokens = documents_stream()
    path = tmp_path / "fineweb_val_000000.bin"
    write_modded_bin(path, tokens)
    found = read_tokens(path)
    assert np.array_equal(found.tokens, tokens)
    assert (found.format, found.vocab_size, found.bos_id) == ("modded", 50257, 50256)


@pytest.fixture
def shard(tmp_path) -> Path:
    path = tmp_path / "val.q0t"
    write_shard(path, documents_stream(), text_bytes=10, **GPT2)
    return path


def test_truncated_payload(shard):
    shard.write_bytes(shard.read_bytes()[:-3])
    assert_one_line_error(shard, "truncated")


def test_truncated_header(shard):
    shard.write_bytes(shard.read_bytes()[:100])
    assert_one_line_error(shard, "truncated")


def test_corrupted_payload(shard):
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1  # one flipped bit in the last token
    shard.write_bytes(bytes(raw))
    assert_one_line_error(shard, "SHA-256")


def test_wrong_magic(shard):
    shard.write_bytes(b"NOTQ0TOK" + shard.read_bytes()[8:])
    assert_one_line_error(shard, "magic")


def test_wrong_version(shard):
    raw = bytearray(shard.read_bytes())
    raw[8:12] = struct.pack("<I", 2)
    shard.write_bytes(bytes(raw))
    assert_one_line_error(shard, "version")


def test_vocab_mismatch(tmp_path):
    path = tmp_path / "val.q0t"
    write_shard(path, documents_stream(bos_id=0, vocab_size=256), vocab_size=256, bos_id=0,
                tokenizer="bytes", text_bytes=10)
    assert_one_line_error(path, "vocabulary", expect_vocab=50257)


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "train.q0t", "not found")


def test_modded_bin_corruptions(tmp_path):
    tokens = documents_stream()
    path = tmp_path / "fineweb_train_000001.bin"
    write_modded_bin(path, tokens, magic=12345)
    assert_one_line_error(path, "magic")
    path.unlink()
    write_modded_bin(path, tokens, version=7)
    assert_one_line_error(path, "version")
    path.unlink()
    write_modded_bin(path, tokens, declared=tokens.size + 10)
    assert_one_line_error(path, "truncated")
