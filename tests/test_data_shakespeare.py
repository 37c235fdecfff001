"""data/shakespeare.py (data/text.py on the plays): the split by play, both tokenisers, reruns that
verify and never overwrite, and the tokens the CPU record was trained on."""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data import shakespeare  # noqa: E402
from data.shards import DataError, read_tokens  # noqa: E402
from data.tokenizers import get_tokenizer  # noqa: E402

# SHA-256 of the token payloads of the bytes shards the CPU record trained on (format version 1):
# the format changed, the tokens must not.
RECORD_PAYLOADS = {"train.q0t": "d7f0df7568431c7fd4deeb2bde759feb9d8107a4e2185f96cfac5303609a39c1",
                   "val.q0t": "625a340ef994ffdbc292cecdbc4529623bb56fff27e0c8446d279993402f12ad"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Both tokenisers' shards, built once into a temporary folder."""
    out = tmp_path_factory.mktemp("shakespeare")
    return out, {name: shakespeare.build(name, out)[0] for name in ("bytes", "gpt2")}


def documents(tokens: np.ndarray, bos_id: int) -> list[np.ndarray]:
    starts = list(np.flatnonzero(tokens == bos_id)) + [tokens.size]
    return [tokens[a + 1:b] for a, b in zip(starts[:-1], starts[1:])]


def test_split_is_deterministic_disjoint_and_by_whole_play():
    plays = shakespeare.find_plays()
    train, val = shakespeare.split_plays(plays)
    assert (train, val) == shakespeare.split_plays(reversed(list(plays)))
    assert val == sorted(shakespeare.VAL_PLAYS) and len(val) == 4
    assert not set(train) & set(val) and set(train) | set(val) == set(plays)
    assert len(plays) == 38


@pytest.mark.parametrize("name", ["bytes", "gpt2"])
def test_shards_hold_one_play_per_document(built, name):
    out, manifests = built
    manifest, tokenizer, plays = manifests[name], get_tokenizer(name), shakespeare.find_plays()
    for split in ("train", "val"):
        shard = read_tokens(out / name / f"{split}.q0t", expect_vocab=tokenizer.vocab_size)
        slugs = [s["name"] for s in manifest["sources"] if (s["name"] in manifest["val_documents"]) == (split == "val")]
        texts = [plays[slug].read_text(encoding="utf-8") for slug in slugs]
        docs = documents(shard.tokens, tokenizer.bos_id)
        assert len(docs) == len(slugs) == manifest["files"][f"{split}.q0t"]["docs"]
        assert [tokenizer.decode(d) for d in docs] == texts
        assert shard.text_bytes == sum(len(t.encode("utf-8")) for t in texts)
        assert shard.text_bytes == tokenizer.token_byte_lengths()[shard.tokens].sum()
        assert np.array_equal(shard.token_bytes, tokenizer.token_byte_lengths())
        assert shard.command == f"python data/shakespeare.py --tokenizer {name} --out {out}"
        assert manifest["files"][f"{split}.q0t"]["tokens"] == shard.tokens.size
    on_disk = json.loads((out / name / "manifest.json").read_text())
    assert on_disk == manifest and on_disk["val_documents"] == sorted(shakespeare.VAL_PLAYS)


def test_bytes_tokens_are_the_records(built):
    out, manifests = built
    for name, digest in RECORD_PAYLOADS.items():
        assert manifests["bytes"]["files"][name]["payload_sha256"] == digest
        tokens = read_tokens(out / "bytes" / name).tokens
        assert hashlib.sha256(tokens.astype(np.uint16).tobytes()).hexdigest() == digest


def test_rerun_verifies_and_never_overwrites(built):
    out, manifests = built
    before = {p: p.stat().st_mtime_ns for p in (out / "bytes").iterdir()}
    assert shakespeare.build("bytes", out) == (manifests["bytes"], True)
    assert before == {p: p.stat().st_mtime_ns for p in (out / "bytes").iterdir()}


def test_changed_shard_is_reported_not_replaced(tmp_path):
    shakespeare.build("bytes", tmp_path)
    val = tmp_path / "bytes" / "val.q0t"
    raw = bytearray(val.read_bytes())
    raw[-2] ^= 1  # the low byte of the last token: still a valid byte id, but different text
    val.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="SHA-256"):  # the manifest's hash of the file
        shakespeare.build("bytes", tmp_path)
    assert val.read_bytes() == bytes(raw)


def test_command_line(tmp_path, capsys):
    assert shakespeare.main(["--tokenizer", "bytes", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "validation plays: julius-caesar, macbeth, the-tempest, twelfth-night" in printed
    assert printed.count("sha256") == 2 and "built" in printed
    assert shakespeare.main(["--tokenizer", "bytes", "--out", str(tmp_path)]) == 0
    assert "verified" in capsys.readouterr().out
    val = tmp_path / "bytes" / "val.q0t"
    raw = bytearray(val.read_bytes())
    raw[-2] ^= 1
    val.write_bytes(bytes(raw))
    assert shakespeare.main(["--tokenizer", "bytes", "--out", str(tmp_path)]) == 2  # one line, nothing replaced
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "SHA-256" in lines[0], captured.err
    assert captured.out == "" and val.read_bytes() == bytes(raw)
