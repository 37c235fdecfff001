"""The teacher on more text: bytes sampled from the prior's ensemble, appended to the student's data.

    python records/2026-11-24_distil-cpu/more_text.py --prior runs/study/q0-e64-s0/prior.json \
        --k 8 --samples 342 --out data/shakespeare/bytes-sampled

Each sample starts from a real prompt (--prompt bytes at a random position of the training
tokens) and continues --length - --prompt bytes drawn from the ensemble's mixture
sum_i w_i softmax(z_i), the distribution eval.py scores (temperature 1). A sample is a document:
BOS, prompt, continuation. The new data folder holds the members' fitness set and training
tokens unchanged (so the prior's checks pass), the samples after them, and the same validation
file; train a student on it with `--train-tokens` as printed. No KV cache: every sampled byte
runs each member over its whole context, so sampling G bytes costs about
K x G x (prompt + length) / 2 forward tokens; the script prints what it spent.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import q0_run  # noqa: E402
import train_q0 as q0  # noqa: E402
from data.shards import find_split, load_split, write_shard  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", required=True, help="the population's prior.json (fit_prior.py)")
    p.add_argument("--k", type=int, default=8, help="its budget K (the student's --distil-k)")
    p.add_argument("--samples", type=int, default=342, help="documents to sample")
    p.add_argument("--prompt", type=int, default=32, help="real bytes each sample continues")
    p.add_argument("--length", type=int, default=128, help="bytes per sample, prompt included")
    p.add_argument("--batch", type=int, default=64, help="samples drawn together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="the new data folder (must not exist)")
    a = p.parse_args()
    if a.out.exists():
        p.error(f"{a.out} exists; choose another --out (nothing there is overwritten)")
    if not 0 < a.prompt < a.length:
        p.error("--prompt must be positive and shorter than --length")
    return a


@torch.no_grad()
def sample(models, weights, prompts: torch.Tensor, new: int, gen: torch.Generator) -> torch.Tensor:
    """Continue (n, P) prompts by `new` bytes from the mixture of the members' next-byte distributions."""
    seq, w = prompts, torch.tensor(weights, dtype=torch.float64)
    for _ in range(new):
        p = sum(wi * torch.softmax(m(seq)[:, -1].double(), dim=-1) for wi, m in zip(w, models))  # (n, V)
        nxt = torch.multinomial(p / p.sum(-1, keepdim=True), 1, generator=gen)                  # (n, 1)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def main():
    a = parse()
    args = q0.parse_args(["--preset", "cpu", "--distil-from", str(a.prior), "--distil-k", str(a.k)])
    data = q0_run.load_data(args)
    _, members = q0_run.distil_members(Path(args.distil_from), args.distil_k, data, args.seq_len)
    models = [q0.load_snapshot_model(m["run_dir"], m["record"]).eval() for m in members]
    weights = [m["weight"] for m in members]
    rng = np.random.default_rng(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    starts = rng.integers(0, data.train.size - a.prompt, size=a.samples)
    prompts = np.stack([data.train[s:s + a.prompt] for s in starts]).astype(np.int64)
    bos = data.bos_id
    prompts[prompts == bos] = ord(" ")  # a prompt across a document boundary: no BOS inside a document
    t0, docs = time.perf_counter(), []
    for i in range(0, a.samples, a.batch):
        out = sample(models, weights, torch.from_numpy(prompts[i:i + a.batch]), a.length - a.prompt, gen)
        out[out == bos] = ord(" ")  # a sampled BOS would split the document: the byte stands for a space
        docs.append(out.numpy())
        print(f"{i + out.size(0)}/{a.samples} samples, {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    samples = np.concatenate(docs)                                      # (n, length)
    text = np.concatenate([np.full((samples.shape[0], 1), bos), samples], axis=1).ravel()
    source = load_split(args.data_dir, "train")
    kept = data.fitness.size + data.train.size  # the members' fitness set and training tokens, as they were
    assert np.array_equal(source.tokens[:kept], np.concatenate([data.fitness, data.train]))
    tokens = np.concatenate([source.tokens[:kept], text]).astype(np.int64)
    a.out.mkdir(parents=True)
    command = "python " + " ".join(sys.argv)
    write_shard(a.out / "train.q0t", tokens, vocab_size=source.vocab_size, bos_id=bos, tokenizer=source.tokenizer,
                token_bytes=source.token_bytes, command=command)
    shutil.copyfile(find_split(args.data_dir, "val")[0], a.out / "val.q0t")
    forward_tokens = len(models) * a.samples * sum(range(a.prompt, a.length))
    report = {"prior": str(a.prior), "k": len(models), "samples": a.samples, "prompt": a.prompt,
              "length": a.length, "sampled_bytes": int(samples.shape[0] * (a.length - a.prompt)),
              "added_tokens": int(text.size), "student_train_tokens": int(data.train.size + text.size),
              "seconds": round(seconds, 1), "member_forward_tokens": forward_tokens,
              "first_sample": bytes(samples[0].astype(np.uint8)).decode("utf-8", "replace")}
    (a.out / "sampled.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    print(f"train a student on it with --data-dir {a.out} --train-tokens {report['student_train_tokens']}")


if __name__ == "__main__":
    main()
