"""Incremental decoding (train_q0.KVCache) against the full forward, and sample.py: the next-token
distribution, seeds, greedy decoding, the ensemble, a student run, two processes, bad input."""
import argparse
import json
import os
import subprocess

import numpy as np
import pytest
import torch

from conftest import REPO, TORCHRUN_2, run_train
import test_eval
from test_prior import assert_clean_error, cli

import q0_run
import sample
import train_q0 as q0
from data import shards

real_run = test_eval.real_run  # the fixture: a tiny run of 2 bases x 2 cycles and its prior (fit_prior.py)


# ---------------------------------------------------------------------------------------------
# The KV cache: a prefill, then one token at a time, gives the full forward's logits
# ---------------------------------------------------------------------------------------------

def perturbed(cfg: q0.GPTConfig, seed: int = 0) -> q0.GPT:
    """A model in eval mode whose every weight is moved off its init: the gates (zero at init) open,
    the IHA mixes leave the identity, so each piece the decode path must carry changes the logits."""
    torch.manual_seed(seed)
    model = q0.GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def decoded_logits(model: q0.GPT, idx: torch.Tensor, prefill: int) -> tuple[torch.Tensor, q0.KVCache]:
    """Logits (B, T, V) of idx from a prefill of its first `prefill` tokens, then one token per call."""
    cache = model.new_cache()
    with torch.no_grad():
        parts = [model.decode(idx[:, :prefill], cache)]
        parts += [model.decode(idx[:, t:t + 1], cache) for t in range(prefill, idx.size(1))]
    return torch.cat(parts, dim=1), cache


def assert_decode_is_forward(model: q0.GPT, prefill: int = 5):
    T = model.cfg.seq_len
    idx = torch.randint(0, model.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)                                                 # (B, T, V)
    got, cache = decoded_logits(model, idx, prefill)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
    # one entry per block application: a looped layer's runs each keep their own keys
    assert len(cache.kv) == model.cfg.encoder_layers + len(model.cfg.decoder_order()) and cache.pos == T


def test_decode_equals_the_forward_on_the_tiny_preset_looped_and_windowed():
    cfg = q0.model_config(q0.parse_args(["--preset", "tiny", "--loop-repeats", "2"]), 256)
    assert cfg.decoder_order() == [2, 2, 2, 3]                           # layer 2 applied three times
    assert cfg.window(0) < cfg.seq_len - 1 and cfg.iha and cfg.dropout > 0  # a window shorter than the sequence
    assert_decode_is_forward(perturbed(cfg))


def test_decode_equals_the_forward_with_iha_mixing_heads():
    """IHA on (the default), its head-mixing matrices far from the identity; and the same model
    without IHA, whose logits differ (the mixes are live in the comparison above)."""
    cfg = q0.GPTConfig(vocab_size=80, n_layer=4, d_model=32, n_head=4, mlp_hidden=48, seq_len=24, short_window=6,
                       loop_start=2, loop_end=4, loop_repeats=1, iha=True)
    model = perturbed(cfg)
    assert (model.blocks[2].attn.q_mix - torch.eye(4)).abs().max() > 0.1
    assert_decode_is_forward(model, prefill=1)
    plain = perturbed(q0.GPTConfig(**{**vars(cfg), "iha": False}))
    idx = torch.randint(0, 80, (1, 24))
    with torch.no_grad():
        assert not torch.allclose(plain(idx), model(idx), atol=1e-3)
    assert_decode_is_forward(plain, prefill=1)


def test_decode_equals_the_forward_with_value_embeddings_in_the_loop():
    """Value embeddings (of x0, through their gate) on layers 1, 3, 5, layer 3 inside the loop and
    run three times; zeroing them changes the logits, so the comparison covers them."""
    cfg = q0.GPTConfig(vocab_size=64, n_layer=6, d_model=32, n_head=2, mlp_hidden=64, seq_len=20, short_window=3,
                       loop_start=3, loop_end=5, loop_repeats=2)
    model = perturbed(cfg, seed=2)
    assert [i for i, b in enumerate(model.blocks) if b.attn.value_embed is not None] == [1, 3, 5]
    assert_decode_is_forward(model, prefill=9)
    idx = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        before = model(idx)
        for b in model.blocks:
            if b.attn.value_embed is not None:
                b.attn.value_embed.weight.zero_()
        assert not torch.allclose(model(idx), before, atol=1e-3)


def test_the_cache_refuses_past_seq_len_and_training_mode():
    cfg = q0.GPTConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, mlp_hidden=32, seq_len=8, short_window=2)
    model = perturbed(cfg)
    cache = model.new_cache()
    with torch.no_grad():
        model.decode(torch.zeros(1, 6, dtype=torch.long), cache)
        with pytest.raises(q0.UsageError, match="holds the model's 8 positions .* and 6 are taken: 3 more"):
            model.decode(torch.zeros(1, 3, dtype=torch.long), cache)
        assert cache.pos == 6                                             # refused before anything moved
        model.decode(torch.zeros(1, 2, dtype=torch.long), cache)         # exactly full is fine
        model.train()
        with pytest.raises(ValueError, match="eval mode"):
            model.decode(torch.zeros(1, 1, dtype=torch.long), model.new_cache())


# ---------------------------------------------------------------------------------------------
# The next-token distribution
# ---------------------------------------------------------------------------------------------

def support(p: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in p]


def test_top_k_and_top_p_restrict_the_support():
    p = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.15],                      # ranked: 1, 3, 4, 2, 0
                      [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float64)
    assert support(sample.restrict(p)) == [set(range(5))] * 2           # 0 and 1: all
    assert support(sample.restrict(p, top_k=2))[0] == {1, 3}
    assert len(support(sample.restrict(p, top_k=2))[1]) == 2
    assert support(sample.restrict(p, top_p=0.6))[0] == {1, 3}          # 0.5 is short of 0.6; 0.7 reaches it
    assert support(sample.restrict(p, top_p=0.8))[0] == {1, 3, 4}
    assert len(support(sample.restrict(p, top_p=0.55))[1]) == 3
    assert support(sample.restrict(p, top_p=1e-9))[0] == {1}            # the most probable token always stays
    assert support(sample.restrict(p, top_k=2, top_p=0.8))[0] == {1, 3}  # both: the smaller support
    cut = sample.restrict(p, top_p=0.8)
    torch.testing.assert_close(cut.sum(-1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(cut[0, [1, 3, 4]], p[0, [1, 3, 4]] / 0.85)  # renormalised, in vocabulary order


def test_the_mixture_averages_probabilities_and_draws_are_seeded():
    z = torch.randn(3, 2, 7)
    probs = [sample.member_probs(z[i], 0.7) for i in range(3)]
    torch.testing.assert_close(probs[0], torch.softmax(z[0] / 0.7, -1))
    mix = sample.mixture(probs, [0.5, 0.3, 0.2])
    torch.testing.assert_close(mix, sum(w * torch.softmax(z[i].double() / 0.7, -1) for i, w in enumerate([0.5, 0.3, 0.2])))
    a, b = (sample.draw(mix, 1.0, torch.Generator().manual_seed(4)) for _ in range(2))
    assert torch.equal(a, b)
    assert torch.equal(sample.draw(mix, 0, None), mix.argmax(-1))


# ---------------------------------------------------------------------------------------------
# sample.py on a tiny trained run (test_eval's real_run: 2 bases x 2 cycles and its prior)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_prior(real_run):
    """real_run's prior with its budgets' refitted weights spread over their members (the tiny fit
    gives one snapshot all the weight): an ensemble whose every member counts. Beside prior.json,
    since a prior names its runs relative to itself; sealed like fit_prior.py's."""
    prior = q0_run.read_prior(real_run / "prior.json")
    for b in prior["budgets"]:
        b["weights_refitted"] = [x / sum(range(1, b["K"] + 1)) for x in range(b["K"], 0, -1)]  # K, ..., 1
    path = real_run / "prior-mixed.json"
    path.write_text(q0_run.sealed_json(prior) + "\n")
    return path


def texts(r) -> str:
    """The samples sample.py printed (all but its last line, the speed)."""
    assert r.returncode == 0, r.stderr
    lines = r.stdout.rstrip("\n").split("\n")
    assert lines[-1].startswith("sampled ") and " tokens/s | " in lines[-1] and "forward tokens per member" in lines[-1]
    return "\n".join(lines[:-1])


def test_the_same_seed_gives_the_same_samples(real_run):
    args = [real_run, "--snapshot", "b1c2", "--prompt", "KING", "--tokens", "40", "--samples", "2"]
    first = texts(cli("sample.py", *args, "--seed", "5"))
    assert first == texts(cli("sample.py", *args, "--seed", "5"))
    assert first != texts(cli("sample.py", *args, "--seed", "6"))
    assert first.startswith("KING") and first.count("\n---\n") == 1     # two samples


def greedy_reference(model: q0.GPT, context: list[int], n: int, seq_len: int) -> list[int]:
    """n greedy tokens, each the argmax of a full forward over the window the sampler holds: the
    whole history until it fills seq_len, then (its restart) the last seq_len // 2 tokens onward."""
    history, start = list(context), 0
    for _ in range(n):
        with torch.no_grad():
            z = model(torch.tensor([history[start:]]))[0, -1]
        history.append(int(z.argmax()))
        if len(history) - start > seq_len:
            start = len(history) - seq_len // 2
    return history[len(context):]


def test_greedy_decoding_is_the_argmax_of_the_full_forward(real_run):
    """Temperature 0 and --top-k 1 both give the greedy continuation, past seq_len (32) included."""
    member = next(m for m in q0_run.load_population([real_run]) if m.record["id"] == "b0c2")
    model = q0.load_snapshot_model(member.run_dir, member.record)
    args = sample.build_parser().parse_args([str(real_run), "--tokens", "70", "--temperature", "0", "--prompt", "KING"])
    context = sample.prompt_tokens(args, member.run, 32)
    ens = sample.Ensemble([(member, 1.0)], 0.0, torch.device("cpu"))
    drawn = sample.generate(ens, torch.tensor([context]), args, 32, torch.Generator())
    assert drawn[0].tolist() == greedy_reference(model, context, 70, 32)
    # 69 tokens fed back (the last is not), three of them as restarts from the last 16 tokens
    assert ens.forward_tokens == len(context) + (69 - 3) + 3 * 16
    common = [real_run, "--snapshot", "b0c2", "--prompt", "KING", "--tokens", "70"]
    assert texts(cli("sample.py", *common, "--temperature", "0")) == texts(cli("sample.py", *common, "--top-k", "1"))


def test_the_ensemble_mixes_its_members_probabilities(real_run):
    """The first step of a two-member ensemble: sum_i w_i softmax(z_i / T) of the members' full forwards."""
    a, b = (m for m in q0_run.load_population([real_run]) if m.record["id"] in ("b0c2", "b1c2"))
    ens = sample.Ensemble([(a, 0.3), (b, 0.7)], 0.8, torch.device("cpu"))
    idx = torch.tensor([[0, 75, 73, 78, 71]])
    got = sample.mixture(ens.start(idx), ens.weights)
    with torch.no_grad():
        want = sum(w * torch.softmax(q0.load_snapshot_model(m.run_dir, m.record)(idx)[:, -1].double() / 0.8, -1)
                   for m, w in ((a, 0.3), (b, 0.7)))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_the_prior_at_k1_samples_as_its_snapshot_alone(real_run, mixed_prior):
    prior = json.loads((real_run / "prior.json").read_text())
    top = next(b for b in prior["budgets"] if b["K"] == 1)["members"][0]["id"]
    flags = ["--prompt", "KING", "--tokens", "30", "--seed", "3", "--top-p", "0.9"]
    alone = texts(cli("sample.py", real_run, "--snapshot", top, *flags))
    assert alone == texts(cli("sample.py", real_run, "--prior", real_run / "prior.json", "--budget", "1", *flags))
    r = cli("sample.py", real_run, "--prior", mixed_prior, *flags)  # its largest budget: 4 members
    assert texts(r) != alone and "| 4 members, 49 forward tokens per member |" in r.stdout


def test_a_student_run_samples_its_last_snapshot(real_run, small_data, tmp_path):
    run_train(small_data, tmp_path, "--run-name", "s", "--cycles", "2", "--distil-from", real_run / "prior.json",
              "--distil-k", "1")
    flags = ["--prompt", "KING", "--tokens", "20", "--seed", "1"]
    assert texts(cli("sample.py", tmp_path / "s", *flags)) == texts(cli("sample.py", tmp_path / "s", "--snapshot",
                                                                           "b0c2", *flags))


def test_two_processes_sample_as_one(real_run, mixed_prior):
    """Under torchrun the members are spread over the ranks (member i on rank i mod 2): the same samples."""
    args = [str(real_run), "--prior", str(mixed_prior), "--prompt", "KING", "--tokens", "40",
            "--samples", "2", "--seed", "2"]
    one = cli("sample.py", *args)
    r = subprocess.run([*TORCHRUN_2, str(REPO / "sample.py"), *args], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert texts(r) == texts(one) and "| 4 members" in r.stdout and "| 2 processes of 1 thread" in r.stdout


def test_bad_input_is_one_line(real_run, tmp_path):
    prior = real_run / "prior.json"
    for args, words in [((real_run, "--snapshot", "b7c7"), ("--snapshot b7c7", "b0c1")),
                        ((real_run, "--prior", prior, "--budget", "3"), ("--budget 3", "[1, 2, 4]")),
                        ((real_run, "--snapshot", "b0c1", "--prompt", "x" * 32), ("--prompt is 32 tokens", "32")),
                        ((real_run,), ("population of 4 snapshots", "--snapshot ID")),
                        ((real_run, "--budget", "2"), ("--prior",)),
                        ((real_run, "--snapshot", "b0c1", "--prior", prior), ("give one of them",)),
                        ((real_run, "--snapshot", "b0c1", "--top-p", "0"), ("--top-p 0",)),
                        ((tmp_path, "--snapshot", "b0c1"), ("no run.json",))]:
        r = cli("sample.py", *args)
        assert_clean_error(r, *words)
        assert r.returncode == 2 and r.stdout == ""


# ---------------------------------------------------------------------------------------------
# --write-data: sampled-text distillation's data folder (the 4-member ensemble of mixed_prior)
# ---------------------------------------------------------------------------------------------

# 5 documents of BOS + 8 prompt tokens + 30 drawn, 2 side by side: 39 tokens > seq_len 32, so every
# row's caches restart once (from the last 16 tokens)
WRITE = ["--samples", "5", "--tokens", "30", "--prompt-tokens", "8", "--batch", "2"]


def written(real_run, prior, out, *flags) -> dict:
    r = cli("sample.py", real_run, "--prior", prior, "--write-data", out, *WRITE, *flags)
    assert r.returncode == 0, r.stderr
    assert "plain epochs of the population" in r.stdout and f"--data-dir {out}" in r.stdout
    return json.loads((out / "manifest.json").read_text())


def student_data(real_run, manifest: dict) -> q0_run.RunData:
    """The folder as a student loads it: the members' flags, then the flags the command printed."""
    flags = json.loads((real_run / "run.json").read_text())["population_config"]
    given = dict(zip(manifest["student_flags"][::2], manifest["student_flags"][1::2]))
    return q0_run.load_data(argparse.Namespace(**{**flags, "data_dir": given["--data-dir"],
                                                  "fitness_tokens": int(given["--fitness-tokens"]),
                                                  "train_tokens": int(given["--train-tokens"])}))


def test_write_data_keeps_the_members_tokens_then_adds_documents_from_real_prompts(real_run, mixed_prior,
                                                                                   small_data, tmp_path):
    manifest = written(real_run, mixed_prior, tmp_path / "d")
    run = json.loads((real_run / "run.json").read_text())
    data, T = student_data(real_run, manifest), run["train"]["tokens"]
    # the fitness set, training tokens and validation tokens the members' run recorded, bit for bit
    assert data.describe["fitness"]["sha256"] == run["fitness"]["sha256"]
    assert shards.tokens_sha256(data.train[:T]) == run["train"]["sha256"]
    assert data.describe["val"]["sha256"] == run["val"]["sha256"]
    assert (tmp_path / "d" / "val.q0t").read_bytes() == (small_data / "val.q0t").read_bytes()
    q0_run.distil_members(mixed_prior, 4, data, 32)  # a student's --distil-from accepts the folder
    added, real = data.train[T:], data.train[:T]
    docs = np.split(added, np.flatnonzero(added == 0))[1:]               # each from its BOS
    windows = {tuple(real[i:i + 8]) for i in range(T - 7)}
    assert added[0] == 0 and len(docs) == 5 and added.size == manifest["sampled"]["added_tokens"]
    for doc in docs:  # BOS, a real prompt from inside one training document, then drawn tokens
        assert 9 <= doc.size <= 39 and tuple(doc[1:9]) in windows and 0 not in doc[1:9]
    assert manifest["sampled"]["drawn_tokens"] == added.size - 5 * 9 == manifest["sampled"]["sampled_bytes"]
    assert sorted(m["weight"] for m in manifest["sampled"]["members"]) == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_write_data_draws_the_continuation_from_the_model(real_run, tmp_path):
    """Greedy, from one snapshot: every document continues its prompt as the full forward's argmax does
    (the restart past seq_len included), up to a drawn BOS."""
    member = next(m for m in q0_run.load_population([real_run]) if m.record["id"] == "b0c2")
    model = q0.load_snapshot_model(member.run_dir, member.record)
    r = cli("sample.py", real_run, "--snapshot", "b0c2", "--temperature", "0", "--write-data", tmp_path / "g", *WRITE)
    assert r.returncode == 0, r.stderr
    data = student_data(real_run, json.loads((tmp_path / "g" / "manifest.json").read_text()))
    added = data.train[json.loads((real_run / "run.json").read_text())["train"]["tokens"]:]
    for doc in np.split(added, np.flatnonzero(added == 0))[1:]:
        greedy = sample.until_bos(greedy_reference(model, doc[:9].tolist(), 30, 32), 0)
        assert doc[9:].tolist() == greedy


def test_write_data_is_reproducible_by_seed(real_run, mixed_prior, tmp_path):
    sha = [written(real_run, mixed_prior, tmp_path / name, "--seed", seed)["files"]["train.q0t"]["payload_sha256"]
           for name, seed in (("a", "3"), ("b", "3"), ("c", "4"))]  # the tokens (the file records its command)
    assert sha[0] == sha[1] != sha[2]


def test_write_data_counts_its_cost_on_the_epoch_axis(real_run, mixed_prior, tmp_path, monkeypatch):
    """The member forward tokens are the ones the members ran (counted at GPT.hidden), the FLOPs
    they really ran within 2% of what it records, and a plain epoch's FLOPs the training tokens'
    at the plan's FLOPs per token of a plain step (--dry-run's trace)."""
    run = json.loads((real_run / "run.json").read_text())
    fed, hidden = [], q0.GPT.hidden

    def counting(self, idx, seeds=None, cache=None):
        if cache is not None:  # a prefill or a cached step of sampling
            fed.append(idx.numel())
        return hidden(self, idx, seeds, cache)
    monkeypatch.setattr(q0.GPT, "hidden", counting)
    sample.flops_per_token(json.dumps(run["model"], sort_keys=True))  # counted before the run below, not in it
    with sample.counting_flops() as ran:
        cost = written(real_run, mixed_prior, tmp_path / "d")["sampled"]
    # per row and member: the prefill of 9, 28 cached steps, one restart from the last 16 tokens
    assert cost["member_forward_tokens"] == sum(fed) == 4 * 5 * (9 + 28 + 16)
    assert 1 < ran.get_total_flops() / cost["forward_flops"] < 1.02  # IHA's weights, mixed at every cached step
    args = argparse.Namespace(**{**vars(q0.parse_args([])), **run["population_config"]})
    plan = q0_run.trace_step(q0, q0.GPTConfig(**run["model"]), args, 1, False, False, memory=False)
    assert cost["plain_epoch_flops"] == run["train"]["tokens"] * plan["student_flops_per_token"]
    assert cost["plain_epochs"] == pytest.approx(cost["forward_flops"] / cost["plain_epoch_flops"], rel=1e-12)


def test_training_prompts_never_cross_a_document_boundary():
    train = np.array([0, 5, 6, 7, 0, 8, 9, 0, 1, 2])
    prompts = sample.training_prompts(train, 0, 50, 2, seed=1)
    assert {tuple(p) for p in prompts} == {(5, 6), (6, 7), (8, 9), (1, 2)}
    assert (prompts == sample.training_prompts(train, 0, 50, 2, seed=1)).all()
    with pytest.raises(sample.UsageError, match="--prompt-tokens 4: the training tokens hold no 4 in a row"):
        sample.training_prompts(train, 0, 1, 4, seed=1)


def test_write_data_refuses_bad_input_in_one_line(real_run, mixed_prior, tmp_path):
    out = tmp_path / "new"
    base = [real_run, "--prior", mixed_prior]
    for args, words in [((*base, "--write-data", tmp_path), (str(tmp_path), "never overwritten", "--write-data")),
                        ((*base, "--write-data", out, "--prompt", "KING"), ("--prompt", "drop --prompt")),
                        ((*base, "--prompt-tokens", "8"), ("--prompt-tokens", "give --write-data")),
                        ((*base, "--write-data", out, "--prompt-tokens", "32"), ("--prompt-tokens 32", "seq_len")),
                        ((*base, "--write-data", ""), ("--write-data", "empty path")),
                        ((*base, "--write-data", out, "--batch", "0"), ("--batch 0",))]:
        r = cli("sample.py", *args)
        assert_clean_error(r, *words)
        assert r.returncode == 2 and r.stdout == "" and not out.exists()
