"""data/text.py: a folder of one's own text into shards that train_q0.py trains on, and every bad
input as one line (exit code 2) with nothing written. Also: data/ imports neither torch nor the
trainer (train_q0.py, q0_run.py)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_train, shakespeare_paragraphs

sys.path.insert(0, str(REPO))
from data import text  # noqa: E402
from data.shards import read_tokens  # noqa: E402
from data.tokenizers import get_tokenizer  # noqa: E402


def corpus(folder: Path, docs: int = 30) -> list[str]:
    """Hamlet's paragraphs as .txt/.md files in nested folders and one .jsonl file; returns the texts
    in the order the command reads them (sorted paths; the .jsonl records in line order)."""
    paragraphs = shakespeare_paragraphs("hamlet")
    texts = ["\n\n".join(paragraphs[4 * i:4 * i + 4]) + "\n" for i in range(docs)]
    for i, body in enumerate(texts[:docs - 5]):
        path = folder / ("act1" if i < 10 else "act2") / f"scene{i:02d}.{'md' if i % 3 else 'txt'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
    records = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts[docs - 5:])]
    (folder / "zz.jsonl").write_text("\n".join(records[:2]) + "\n\n" + "\n".join(records[2:]) + "\n")
    (folder / ".hidden.txt").write_text("never read")
    (folder / "notes.pdf").write_bytes(b"%PDF")
    return texts


def documents(tokens: np.ndarray, bos_id: int) -> list[np.ndarray]:
    starts = list(np.flatnonzero(tokens == bos_id)) + [tokens.size]
    return [tokens[a + 1:b] for a, b in zip(starts[:-1], starts[1:])]


def main(*args) -> int:
    """The command's exit code: 0, or 2 with one `error:` line on stderr."""
    return text.main([str(a) for a in args])


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]


def test_data_imports_neither_torch_nor_the_trainer():
    code = ("import sys; import data.text, data.shakespeare, data.python_docs, data.fineweb, data.shards, "
            "data.tokenizers; "
            "bad = {'torch', 'train_q0', 'q0_run'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("name", ["bytes", "gpt2"])
def test_folder_to_shards_whole_documents_deterministic_split(tmp_path, name, capsys):
    texts = corpus(tmp_path / "src")
    assert main(tmp_path / "src", "--tokenizer", name, "--out", tmp_path / "out", "--val-docs", 4) == 0
    tokenizer = get_tokenizer(name)
    train, val = (read_tokens(tmp_path / "out" / f"{s}.q0t") for s in ("train", "val"))
    train_docs = [tokenizer.decode(d) for d in documents(train.tokens, tokenizer.bos_id)]
    val_docs = [tokenizer.decode(d) for d in documents(val.tokens, tokenizer.bos_id)]
    assert len(val_docs) == 4 and not set(val_docs) & set(train_docs)
    assert sorted(train_docs + val_docs) == sorted(texts)
    assert train_docs == [t for t in texts if t not in val_docs]  # training keeps the reading order
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert len(manifest["sources"]) == 26 and manifest["sources"][-1]["docs"] == 5
    assert val.command == manifest["command"] == \
        f"python data/text.py {tmp_path / 'src'} --tokenizer {name} --val-docs 4 --out {tmp_path / 'out'}"
    assert val.text_bytes == sum(len(t.encode()) for t in val_docs)
    assert np.array_equal(val.token_bytes, tokenizer.token_byte_lengths())
    printed = capsys.readouterr().out
    assert printed.count("sha256") == 2 and "built" in printed and "next: python train_q0.py" in printed
    # The choice is by content: another order of the same documents gives the same validation set.
    chosen = text.choose_val([text.Document(str(i), t) for i, t in enumerate(texts)], {"docs": 4})
    again = text.choose_val([text.Document(str(i), t) for i, t in enumerate(reversed(texts))], {"docs": 4})
    assert {texts[i] for i in chosen} == {texts[::-1][i] for i in again} == set(val_docs)


def test_rerun_verifies_other_settings_are_refused_and_a_crash_completes(tmp_path, capsys):
    corpus(tmp_path / "src")
    flags = [tmp_path / "src", "--tokenizer", "bytes", "--out", tmp_path / "out"]
    assert main(*flags) == 0
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert main(*flags) == 0
    assert "verified" in capsys.readouterr().out
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert main(*flags, "--val-docs", "2") == 2
    one_line_error(capsys, "different build", "settings")
    (tmp_path / "src" / "act1" / "scene00.txt").write_text("changed")
    assert main(*flags) == 2
    one_line_error(capsys, "sources")
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    # a build interrupted before its manifest: the rerun keeps the identical shard and finishes
    (tmp_path / "src" / "act1" / "scene00.txt").write_text("changed back")
    assert main(*flags[:-1], tmp_path / "again") == 0
    (tmp_path / "again" / "manifest.json").unlink()
    (tmp_path / "again" / "val.q0t").unlink()
    assert main(*flags[:-1], tmp_path / "again") == 0
    assert (tmp_path / "again" / "manifest.json").exists() and (tmp_path / "again" / "val.q0t").exists()


def test_gpt2_on_worker_processes_gives_the_same_tokens(tmp_path, monkeypatch):
    texts = corpus(tmp_path / "src")
    tokenizer = get_tokenizer("gpt2")
    serial = text.tokenize(texts, tokenizer, workers=1, desc="serial")
    monkeypatch.setattr(text, "PARALLEL_BYTES", 0)
    assert np.array_equal(text.tokenize(texts, tokenizer, workers=2, desc="parallel"), serial)


@pytest.mark.parametrize("case", ["empty folder", "not utf-8", "nul byte", "val takes all", "bad json",
                                  "no field", "out is a file", "missing source", "unknown val file",
                                  "val fraction 1"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    src, out, extra = tmp_path / "src", tmp_path / "out", []
    src.mkdir()
    (src / "a.txt").write_text("first document\n")
    (src / "b.txt").write_text("second document\n")
    needles = {"empty folder": ["holds no"], "not utf-8": ["c.txt", "not UTF-8 at byte offset 7"],
               "nul byte": ["c.txt", "NUL byte at byte offset 3", "--tokenizer gpt2"],
               "val takes all": ["all 2 documents"], "bad json": ["d.jsonl:2", "not JSON"],
               "no field": ["d.jsonl:1", "'text'", "--field"], "out is a file": ["--out"],
               "missing source": ["not found"], "unknown val file": ["--val-files"],
               "val fraction 1": ["--val-fraction 1"]}[case]
    if case == "empty folder":
        (src / "a.txt").unlink()
        (src / "b.txt").unlink()
    elif case == "not utf-8":
        (src / "c.txt").write_bytes(b"caf\xc3\xa9: \xff\xfe")
    elif case == "nul byte":
        (src / "c.txt").write_bytes(b"abc\0def")
    elif case == "val takes all":
        extra = ["--val-docs", "2"]
    elif case == "bad json":
        (src / "d.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n')
    elif case == "no field":
        (src / "d.jsonl").write_text('{"body": "elsewhere"}\n')
    elif case == "out is a file":
        out.write_text("mine")
    elif case == "missing source":
        src = tmp_path / "nowhere"
    elif case == "unknown val file":
        extra = ["--val-files", tmp_path / "elsewhere.txt"]
    elif case == "val fraction 1":
        extra = ["--val-fraction", "1"]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(src, "--tokenizer", "bytes", "--out", out, *extra) == 2
    one_line_error(capsys, *needles)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_what_the_file_system_refuses_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("first document\n")
    (tmp_path / "src" / "b.txt").write_text("second document\n")

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(Path, "read_bytes", refused)  # (as root, chmod 000 would not refuse)
    assert main(tmp_path / "src", "--tokenizer", "bytes", "--out", tmp_path / "out") == 2
    one_line_error(capsys, "Permission denied", "a.txt", "check the path and its permissions")
    assert not (tmp_path / "out").exists()


def test_the_script_exits_2_with_one_line_on_a_bad_flag(tmp_path):
    done = subprocess.run([sys.executable, "data/text.py", "--workers", "-1", str(tmp_path), "--tokenizer", "bytes",
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.splitlines() == ["error: --workers -1: expected an integer >= 1"], done.stderr
    assert list(tmp_path.iterdir()) == []


def test_own_text_trains_with_the_two_readme_commands(tmp_path):
    corpus(tmp_path / "src", docs=40)
    done = subprocess.run([sys.executable, "data/text.py", str(tmp_path / "src"), "--tokenizer", "bytes",
                           "--out", str(tmp_path / "data"), "--val-docs", "3"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    result = run_train(tmp_path / "data", tmp_path / "runs", "--val-tokens", "0", "--cycles", "2")
    assert "done: 2 snapshots" in result.stdout and " bpb" in result.stdout
    run = json.loads((tmp_path / "runs" / "tiny-1x2-seed0" / "run.json").read_text())
    val = read_tokens(tmp_path / "data" / "val.q0t")
    assert run["val"]["text_bytes"] == val.text_bytes  # bits per byte over the whole validation text


# --- a full disk, byte-order marks, blank files, nested fields (issue, part 2) ---------------------

def two_documents(folder: Path) -> Path:
    folder.mkdir()
    (folder / "a.txt").write_text("first document\n" * 20)
    (folder / "b.txt").write_text("second document\n" * 20)
    return folder


def test_a_full_disk_is_one_line_that_says_what_to_do_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    """ENOSPC raised where no file is named (a write to an open file) said "No space left on device:
    None; check the path and its permissions"; a report printed to a full disk was a traceback."""
    import errno
    src = two_documents(tmp_path / "src")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(text, "tokenize", full)
        assert main(src, "--tokenizer", "bytes", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "None" not in err, err
    assert "No space left on device; free some space (or write elsewhere), then rerun the same command" in err

    class FullDisk:  # stdout redirected to a file on the full disk
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass
    with monkeypatch.context() as m:
        m.setattr(sys, "stdout", FullDisk())
        assert main(src, "--tokenizer", "bytes", "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "No space left on device" in err, err
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # no temporary outlives the command


def test_a_byte_order_mark_is_not_text(tmp_path, capsys):
    """A UTF-8 BOM stayed in every document as 3 tokens (bytes: EF BB BF)."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.txt").write_bytes(b"\xef\xbb\xbf" + f"document {i}: some text\n".encode())
    (src / "z.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a record"}).encode() + b"\n")
    assert main(src, "--tokenizer", "bytes", "--out", tmp_path / "out", "--val-docs", "1") == 0
    for split in ("train", "val"):
        tf = read_tokens(tmp_path / "out" / f"{split}.q0t")
        for doc in documents(tf.tokens, tf.bos_id):
            assert not bytes(doc.astype(np.uint8)).startswith(b"\xef\xbb\xbf")
            assert bytes(doc.astype(np.uint8)).startswith((b"document", b"a record"))


def test_line_endings_are_written_as_lf_unless_kept(tmp_path, capsys):
    """Sources that mix \r\n, \r and \n: by default every ending is \n (the same tokens as the
    LF-only text) with a note; --newlines keep keeps the bytes and notes the mix; a corpus without
    \r records no setting (its builds are the ones made before the flag)."""
    texts = [f"line one of {i}\nline two\n" for i in range(6)]
    mixed, plain = tmp_path / "mixed", tmp_path / "plain"
    for folder in (mixed, plain):
        folder.mkdir()
    for i, t in enumerate(texts):
        (plain / f"{i}.txt").write_bytes(t.encode())
        (mixed / f"{i}.txt").write_bytes(t.replace("\n", ("\r\n", "\r", "\n")[i % 3]).encode())
    (mixed / "z.jsonl").write_bytes(json.dumps({"text": "a\r\nb"}).encode() + b"\n")
    (plain / "z.jsonl").write_bytes(json.dumps({"text": "a\nb"}).encode() + b"\n")
    for src in (mixed, plain):
        assert main(src, "--tokenizer", "bytes", "--out", tmp_path / f"{src.name}-lf", "--val-docs", "2") == 0
    assert "note: 5 of 7 documents had \\r\\n or \\r line endings: written as \\n" in capsys.readouterr().out
    for split in ("train", "val"):
        a, b = (read_tokens(tmp_path / f"{name}-lf" / f"{split}.q0t").tokens for name in ("mixed", "plain"))
        assert np.array_equal(a, b)
    manifests = [json.loads((tmp_path / f"{n}-lf" / "manifest.json").read_text()) for n in ("mixed", "plain")]
    assert manifests[0]["settings"]["newlines"] == "lf" and "newlines" not in manifests[1]["settings"]
    assert main(mixed, "--tokenizer", "bytes", "--out", tmp_path / "kept", "--val-docs", "2", "--newlines", "keep") == 0
    assert "note: line endings are mixed: 5 of 7 documents hold \\r" in capsys.readouterr().out
    kept = np.concatenate([read_tokens(tmp_path / "kept" / f"{s}.q0t").tokens for s in ("train", "val")])
    assert (kept == ord("\r")).sum() == 2 * 4 + 1  # two endings in each of 4 documents, one in the record


def test_a_folder_of_blank_files_is_refused(tmp_path, capsys):
    """Newline-only files became a 9-token training set without a word."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.txt").write_text("\n" * (i + 1))
    assert main(src, "--tokenizer", "bytes", "--out", tmp_path / "out") == 2
    one_line_error(capsys, "no text in 5 source file(s) (every document is empty or blank)")
    assert not (tmp_path / "out").exists()


def test_a_nested_jsonl_field_is_named_with_dots(tmp_path, capsys):
    """A field inside an object could not be named, and the message did not say so."""
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"id": i, "meta": {"body": f"message number {i}\n" * 5}}) + "\n"
                           for i in range(10)))
    assert main(src, "--tokenizer", "bytes", "--out", tmp_path / "bad") == 2
    one_line_error(capsys, "no text field 'text'", "its text fields: meta.body", "--field meta.text")
    assert main(src, "--tokenizer", "bytes", "--out", tmp_path / "out", "--field", "meta.body") == 0
    tf = read_tokens(tmp_path / "out" / "train.q0t")
    assert bytes(documents(tf.tokens, tf.bos_id)[0].astype(np.uint8)).startswith(b"message number")


def test_ctrl_c_is_one_line_and_the_rerun_finishes(tmp_path, capsys, monkeypatch):
    """Every command's Ctrl-C is one line and exit code 130 (it was a KeyboardInterrupt traceback)."""
    src = two_documents(tmp_path / "src")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(text, "tokenize", interrupted)
        try:
            code = main(src, "--tokenizer", "bytes", "--out", tmp_path / "out")
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped main() as a traceback")
    assert code == 130
    assert capsys.readouterr().err.strip() == \
        "error: interrupted (Ctrl-C); nothing is left half-written: rerun the same command to finish"
    assert main(src, "--tokenizer", "bytes", "--out", tmp_path / "out") == 0
