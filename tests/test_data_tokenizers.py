"""data/tokenizers.py: GPT-2 BPE without openaipublic, and the bytes tokeniser."""
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import shakespeare, text, tokenizers  # noqa: E402
from data.shards import UsageError  # noqa: E402
from data.tokenizers import TokenizerUnavailable, get_tokenizer, load_gpt2_ranks  # noqa: E402

SAMPLE = "To be, or not to be: that is the question.\n  Whether 'tis nobler — café, 東京 🙂 <|endoftext|>"


def test_gpt2_matches_known_ids_and_round_trips():
    gpt2 = get_tokenizer("gpt2")
    assert (gpt2.vocab_size, gpt2.bos_id) == (50257, 50256)
    assert gpt2.encode("Hello world") == [15496, 995]
    ids = gpt2.encode(SAMPLE)
    assert gpt2.bos_id not in ids  # special-token text is ordinary text
    assert gpt2.decode(ids) == SAMPLE
    lengths = gpt2.token_byte_lengths()
    assert lengths.shape == (50257,) and lengths[gpt2.bos_id] == 0
    assert lengths[ids].sum() == len(SAMPLE.encode("utf-8"))


def test_bytes_tokenizer():
    raw = get_tokenizer("bytes")
    assert (raw.vocab_size, raw.bos_id) == (256, 0)
    ids = raw.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and raw.decode(ids) == SAMPLE
    assert raw.token_byte_lengths()[ids].sum() == len(ids) and raw.token_byte_lengths()[0] == 0
    with pytest.raises(ValueError, match="NUL"):
        raw.encode("a\0b")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


@pytest.fixture
def good_ranks() -> bytes:
    return load_gpt2_ranks()  # the user's verified cache, or the real sources on first use


def test_ranks_come_from_the_first_verified_source(tmp_path, good_ranks):
    tried = []

    def source(name, result):
        def fetch():
            tried.append(name)
            if isinstance(result, Exception):
                raise result
            return result
        return name, fetch

    sources = [source("corrupt", good_ranks[:-1] + b"x"), source("broken", OSError("no route")),
               source("absent", None), source("good", good_ranks), source("never", good_ranks)]
    assert load_gpt2_ranks(tmp_path, sources) == good_ranks
    assert tried == ["corrupt", "broken", "absent", "good"]
    assert (tmp_path / "gpt2.tiktoken").read_bytes() == good_ranks


def test_ranks_load_offline_from_the_cache(tmp_path, good_ranks, monkeypatch):
    (tmp_path / "gpt2.tiktoken").write_bytes(good_ranks)

    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    ranks = load_gpt2_ranks(tmp_path, sources=[("network", no_network)])
    assert tokenizers.Gpt2Tokenizer(ranks).encode("Hello world") == [15496, 995]


def test_a_tampered_cache_is_not_trusted(tmp_path, good_ranks):
    (tmp_path / "gpt2.tiktoken").write_bytes(good_ranks.replace(b" 0\n", b" 1\n", 1))
    assert load_gpt2_ranks(tmp_path, sources=[("good", lambda: good_ranks)]) == good_ranks
    with pytest.raises(TokenizerUnavailable) as caught:
        load_gpt2_ranks(tmp_path / "empty", sources=[("absent", lambda: None)])
    assert "\n" not in str(caught.value) and tokenizers.GPT2_RANKS_SHA256 in str(caught.value)
    assert isinstance(caught.value, UsageError)  # what the data commands report as one `error:` line


@pytest.mark.parametrize("command", ["text", "shakespeare"])
def test_unavailable_ranks_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, command):
    def unavailable(name):
        raise TokenizerUnavailable(f"cannot load the GPT-2 BPE ranks (tested); place the file with sha256 "
                                   f"{tokenizers.GPT2_RANKS_SHA256} at {tmp_path / 'gpt2.tiktoken'}")
    monkeypatch.setattr(text, "get_tokenizer", unavailable)  # (data/shakespeare.py builds with data/text.py)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("first document\n")
    (tmp_path / "src" / "b.txt").write_text("second document\n")
    argv = {"text": [str(tmp_path / "src"), "--tokenizer", "gpt2", "--out", str(tmp_path / "out")],
            "shakespeare": ["--tokenizer", "gpt2", "--out", str(tmp_path / "out")]}[command]
    assert {"text": text, "shakespeare": shakespeare}[command].main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: cannot load the GPT-2 BPE ranks (tested); place the file with "
                                         f"sha256 {tokenizers.GPT2_RANKS_SHA256} at {tmp_path / 'gpt2.tiktoken'}"]
    assert captured.out == "" and not (tmp_path / "out").exists()


def test_the_bundled_encoding_equals_tiktokens_own(good_ranks):
    # Where tiktoken has the file cached, its r50k_base and ours must be the same encoding.
    from tiktoken_ext.openai_public import r50k_pat_str
    assert tokenizers.R50K_PATTERN == r50k_pat_str
    ours = get_tokenizer("gpt2").encoding
    assert ours.n_vocab == 50257 and ours.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert np.array_equal(ours.encode_ordinary(SAMPLE), get_tokenizer("gpt2").encode(SAMPLE))
