"""The token file formats, all in data/shards.py: ours (.q0t, its writer and reader), Slowrun's .pt
and modded-nanogpt's .bin (read only), and finding a split's files in a data folder."""
import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.shards import (DataError, UsageError, encode_shard, find_split, load_split, read_tokens,  # noqa: E402
                         write_shard)

GPT2_TABLE = np.random.default_rng(0).integers(1, 20, 50257)
GPT2_TABLE[50256] = 0
GPT2 = dict(vocab_size=50257, bos_id=50256, tokenizer="gpt2", token_bytes=GPT2_TABLE,
            command="python data/text.py corpus --tokenizer gpt2 --out somewhere")


def documents_stream(bos_id=50256, vocab_size=50257, docs=20, seed=0) -> np.ndarray:
    """`docs` documents of random length, each BOS then ids drawn from the rest of the vocabulary."""
    rng = np.random.default_rng(seed)
    pieces = []
    for _ in range(docs):
        body = rng.integers(0, vocab_size - 1, rng.integers(1, 50))
        body[body >= bos_id] += 1
        pieces.append(np.append(bos_id, body))
    return np.concatenate(pieces)


def spec_v2(tokens, vocab, bos, tokenizer, table, command, dtype=np.uint16) -> bytes:
    """A version 2 file built from README's table alone, independently of data/shards.py."""
    payload = np.asarray(tokens).astype(dtype).tobytes()
    meta = np.asarray(table).astype("<u2").tobytes() + command.encode()
    meta += bytes(-len(meta) % 8)
    header = (b"Q0TOKENS" + struct.pack("<IIQIIQQ", 2, np.dtype(dtype).itemsize, len(tokens), vocab, bos,
                                        int((np.asarray(tokens) == bos).sum()), int(np.asarray(table)[tokens].sum()))
              + tokenizer.encode().ljust(32, b"\0") + hashlib.sha256(payload).digest()
              + hashlib.sha256(meta).digest() + struct.pack("<QI", 256 + len(meta), len(command.encode())))
    return header.ljust(256, b"\0") + meta + payload


def spec_v3(*args, **kwargs) -> bytes:
    """A version 3 file from README's table alone: version 2's, version 3 in its field, and at 156 the
    SHA-256 of the 256-byte header with those 32 bytes zero."""
    raw = bytearray(spec_v2(*args, **kwargs))
    raw[8:12] = struct.pack("<I", 3)
    raw[156:188] = hashlib.sha256(bytes(raw[:256])).digest()
    return bytes(raw)


def write_modded_bin(path: Path, tokens: np.ndarray, magic=20240520, version=1, declared=None):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, tokens.size if declared is None else declared
    path.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())


def assert_one_line_error(path: Path, expected: str, command="python data/", **kwargs):
    with pytest.raises(DataError) as caught:
        read_tokens(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and expected in message, message
    assert command in message, message  # names the command that rebuilds the file


def test_writer_and_reader_agree_on_every_field(tmp_path):
    """write_shard writes, read_tokens reads: every field comes back, at README's offsets."""
    tokens = documents_stream()
    path = tmp_path / "train.q0t"
    info = write_shard(path, tokens, **GPT2)
    raw = path.read_bytes()
    assert raw == spec_v3(tokens, 50257, 50256, "gpt2", GPT2_TABLE, GPT2["command"])  # the writer is README's
    found = read_tokens(path)
    assert np.array_equal(found.tokens, tokens) and np.array_equal(found.token_bytes, GPT2_TABLE)
    assert (found.format, found.tokenizer, found.vocab_size, found.bos_id, found.command) == \
        ("q0", "gpt2", 50257, 50256, GPT2["command"])
    assert found.text_bytes == info["text_bytes"] == GPT2_TABLE[tokens].sum()
    assert info["sha256"] == hashlib.sha256(raw).hexdigest() and info["docs"] == 20
    assert info["payload_sha256"] == hashlib.sha256(tokens.astype(np.uint16).tobytes()).hexdigest()


def test_reader_reads_a_file_built_from_the_spec(tmp_path):
    """The other way: a file built from README's table alone, read by read_tokens."""
    tokens, table = documents_stream(bos_id=0, vocab_size=256), np.array([0] + [1] * 255)
    (tmp_path / "val.q0t").write_bytes(spec_v2(tokens, 256, 0, "bytes", table, "make it ✓"))
    found = read_tokens(tmp_path / "val.q0t")
    assert np.array_equal(found.tokens, tokens) and np.array_equal(found.token_bytes, table)
    assert (found.tokenizer, found.vocab_size, found.bos_id, found.command, found.text_bytes) == \
        ("bytes", 256, 0, "make it ✓", table[tokens].sum())


def test_every_byte_of_the_header_is_covered(tmp_path):
    """A version 3 header is sealed: one bit flipped in any of its 256 bytes (the tokenizer's name,
    a count, the version itself: 3 read as 2 or 1 meets bytes that must be zero) is refused in one
    line that names the file and the command that rebuilds it, never read as other data."""
    tokens, table = documents_stream(bos_id=0, vocab_size=256), np.array([0] + [1] * 255)
    path = tmp_path / "val.q0t"
    write_shard(path, tokens, vocab_size=256, bos_id=0, tokenizer="bytes", token_bytes=table,
                command="python data/text.py corpus --tokenizer bytes --out somewhere")
    good = path.read_bytes()
    for at in range(256):
        for bit in (0, 7):
            raw = bytearray(good)
            raw[at] ^= 1 << bit
            path.write_bytes(bytes(raw))
            assert_one_line_error(path, "")
    path.write_bytes(good)
    assert read_tokens(path).tokenizer == "bytes"


def test_version_1_shards_still_read(tmp_path):
    """Version 1 (no metadata block): bytes shards get their table from the tokenizer's definition."""
    for tokenizer, vocab, bos in (("bytes", 256, 0), ("gpt2", 50257, 50256)):
        tokens = documents_stream(bos_id=bos, vocab_size=vocab)
        payload = tokens.astype(np.uint16).tobytes()
        header = struct.pack("<8sIIQIIQQ32s32s", b"Q0TOKENS", 1, 2, tokens.size, vocab, bos, 20, 99,
                             tokenizer.encode(), hashlib.sha256(payload).digest())
        path = tmp_path / f"{tokenizer}.q0t"
        path.write_bytes(header.ljust(256, b"\0") + payload)
        found = read_tokens(path)
        assert np.array_equal(found.tokens, tokens) and found.text_bytes == 99 and found.command is None
        if tokenizer == "bytes":
            assert found.token_bytes[0] == 0 and (found.token_bytes[1:] == 1).all()
        else:
            assert found.token_bytes is None  # bits per byte only for the whole file, from text_bytes


def test_four_byte_tokens_above_65536(tmp_path):
    tokens, table = np.array([70000, 5, 69999, 70000, 1]), np.ones(70001, dtype=np.int64)
    table[70000] = 0
    info = write_shard(tmp_path / "big.q0t", tokens, vocab_size=70001, bos_id=70000, tokenizer="gpt2",
                       token_bytes=table, command="x")
    assert info["bytes"] == 256 + (2 * 70001 + 1 + 7) // 8 * 8 + 4 * tokens.size
    assert np.array_equal(read_tokens(tmp_path / "big.q0t").tokens, tokens)


def test_write_shard_keeps_identical_files_and_never_overwrites(tmp_path):
    path = tmp_path / "val.q0t"
    write_shard(path, documents_stream(), **GPT2)
    before = path.read_bytes()
    assert write_shard(path, documents_stream(), **GPT2)["sha256"] == hashlib.sha256(before).hexdigest()
    with pytest.raises(DataError, match="differs"):
        write_shard(path, documents_stream(seed=1), **GPT2)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    with pytest.raises(DataError, match="byte-length table"):
        encode_shard(documents_stream(), **{**GPT2, "token_bytes": np.ones(50257)})  # BOS must count 0


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
    write_shard(path, documents_stream(), **GPT2)
    return path


def flip(path: Path, offset: int):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1
    path.write_bytes(bytes(raw))


def test_truncated_payload(shard):
    shard.write_bytes(shard.read_bytes()[:-3])
    assert_one_line_error(shard, "truncated", GPT2["command"])  # the command recorded in the file


def test_corrupted_payload_and_metadata(shard, tmp_path):
    flip(shard, -1)  # one flipped bit in the last token
    assert_one_line_error(shard, "SHA-256", GPT2["command"])
    flip(shard, -1)
    flip(shard, 300)  # a byte length
    assert_one_line_error(shard, "metadata")


def test_unreadable_header_names_the_manifest_command(shard, tmp_path):
    shard.write_bytes(b"NOTQ0TOK" + shard.read_bytes()[8:])
    assert_one_line_error(shard, "magic", "python data/text.py YOUR_TEXT")  # nothing recorded: the generic one
    (tmp_path / "manifest.json").write_text(json.dumps({"command": "python data/text.py mine --out here"}))
    assert_one_line_error(shard, "magic", "python data/text.py mine --out here")
    shard.write_bytes(shard.read_bytes()[:100])
    assert_one_line_error(shard, "truncated", "python data/text.py mine --out here")


def test_wrong_version(shard):
    raw = bytearray(shard.read_bytes())
    raw[8:12] = struct.pack("<I", 4)
    shard.write_bytes(bytes(raw))
    assert_one_line_error(shard, "version")


def test_vocab_mismatch(tmp_path):
    path = tmp_path / "val.q0t"
    write_shard(path, documents_stream(bos_id=0, vocab_size=256), vocab_size=256, bos_id=0, tokenizer="bytes",
                token_bytes=np.array([0] + [1] * 255), command="python data/shakespeare.py --tokenizer bytes")
    assert_one_line_error(path, "vocabulary", "python data/shakespeare.py --tokenizer bytes", expect_vocab=50257)


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "train.q0t", "not found", "python data/text.py")


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


def test_data_errors_are_usage_errors():
    """What a data file gets wrong is reported like a bad flag: one `error:` line, exit code 2."""
    assert issubclass(DataError, UsageError)


def test_find_and_load_a_split_in_each_layout(tmp_path):
    ours, modded, slowrun, text_folder = (tmp_path / name for name in ("ours", "modded", "slowrun", "text"))
    tokens = documents_stream()
    write_shard(ours / "val.q0t", tokens, **GPT2)
    assert find_split(ours, "val") == [ours / "val.q0t"]
    assert np.array_equal(load_split(ours, "val").tokens, tokens)
    # modded-nanogpt's shards, in name order, concatenated into one stream
    modded.mkdir()
    write_modded_bin(modded / "fineweb_train_000002.bin", tokens[100:])
    write_modded_bin(modded / "fineweb_train_000001.bin", tokens[:100])
    assert [p.name for p in find_split(modded, "train")] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    found = load_split(modded, "train")
    assert np.array_equal(found.tokens, tokens) and found.path.count(",") == 1 and found.text_bytes is None
    slowrun.mkdir()
    torch.save(dict(tokens=torch.from_numpy(tokens.astype(np.uint16)), bos_id=50256), slowrun / "fineweb_val.pt")
    assert find_split(slowrun, "val") == [slowrun / "fineweb_val.pt"]
    # a folder of text, and one with nothing of the split: one line naming the command that makes it
    text_folder.mkdir()
    (text_folder / "notes.md").write_text("not shards")
    with pytest.raises(DataError) as caught:
        find_split(text_folder, "train")
    assert "\n" not in str(caught.value) and f"python data/text.py {text_folder} --tokenizer bytes" in str(caught.value)
    with pytest.raises(DataError) as caught:
        find_split(ours, "train")
    assert "\n" not in str(caught.value) and "train.q0t" in str(caught.value) and "python data/" in str(caught.value)
