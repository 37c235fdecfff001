"""The CUDA path in one run: each piece of a training run checked against its reference, one line each.

    python benchmarks/gpu_check.py                     # one GPU: the record's model (slowrun preset), 1 x 2048
    python benchmarks/gpu_check.py --n-layer 12 --loop-layers 6 9   # any train_q0.py flag picks the model
    python benchmarks/gpu_check.py --cpu               # what a CPU can check (the tiny preset, under a minute)

Without CUDA it runs on the CPU with the tiny preset and names the CUDA-only pieces as skipped. Checks,
in order (each prints `ok   NAME: figures`, `FAIL NAME: figures` or `skip NAME: why`):

1. FlexAttention against SDPA, both against a float64 brute force, at the model's head shape for its
   short window and full causal: forward, and on CUDA the gradients of q, k and v (torch has no CPU
   backward for FlexAttention). CUDA runs train_q0.flex_attend (the compiled kernel) in bf16, a CPU
   the unfused flex_attention in fp32.
2. Muon shard by shard against whole: train_q0.sharded_polar_express over 8 ranks (threads sharing a
   stand-in process group) against polar_express of the whole stack, for every stack of the model's
   Muon groups.
3. Compiled against eager: one training step (BaseTrainer.train_step) of two trainers from the same
   weights on the same batch: the loss, and how far apart the two updates land. CUDA compiles with
   inductor, a CPU with aot_eager (inductor takes minutes on 2 cores; --backend inductor).
4. A snapshot scored and saved (BaseTrainer.snapshot into a temporary run), read back (its SHA-256
   checked) and scored again: the cached probabilities against the new ones.
5. Tokens/s of timed training steps after warm-up, and MFU = tokens/s x the plan's student FLOPs per
   token / --peak-tflops (CUDA only).
6. A distilling step with the chain teacher (the snapshot of check 4, held as a run holds it) and with
   an ensemble teacher (two saved snapshots loaded by BaseTrainer.load_ensemble): finite loss, and the
   trainer's loss of a micro-batch equal to tests/conftest.py's distillation_loss from whole logits.
7. The peak memory of each distilling step beside the plan's trace (q0_run.trace_step) of the same
   shapes: on CUDA the allocator's peak (must stay within MEMORY_MARGIN of the trace) and the process's
   (reserved + outside the allocator, must stay within the plan's q0_run.planned_bytes); on a CPU
   torch's MemTracker over the real tensors under the trace's bf16 autocast.

The trace runs beside the checks (a process of its own on CUDA: minutes at the record's size). The
last line sums up; the exit code is 1 if any check failed, 2 for bad flags. No data is read: the
tokens are random, written as shards into a temporary folder.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import math
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import q0_run  # noqa: E402
import train_q0 as q0  # noqa: E402
from data.shards import ArgumentParser, UsageError, command, write_shard  # noqa: E402

CHECKS = ("attention", "muon", "compile", "snapshot", "speed", "distil")
MEMORY_MARGIN = 0.10      # a measured peak may exceed the trace by this much
SHARDS = 8                # Muon's orthogonalisation is split over the 8 GPUs of the record
ENSEMBLE_WEIGHTS = (0.6, 0.4)

# Tolerances, by the dtype the piece runs in on this device (fp32 on a CPU, bf16 on CUDA).
# attention, against float64: flex's error at most 2x SDPA's own plus FLOOR, and neither's above CEILING,
# both as fractions of the largest value (bf16 rounds an output by up to 2^-9 of it; measured: 0.2-0.4%)
ATTENTION_FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3}
ATTENTION_CEILING = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6}
# Muon: the sharded result against the whole, as a fraction of the largest value (a CPU: exactly equal;
# CUDA's batched bf16 GEMMs may pick another kernel for a stack of 8 matrices than for the whole stack)
MUON_TOLERANCE = {"cpu": 0.0, "cuda": 1e-2}
# compiled vs eager: loss (relative) and the two updates' difference over the update's size (Frobenius)
COMPILE_LOSS = {"cpu": 1e-5, "cuda": 5e-3}
COMPILE_UPDATE = {"cpu": 1e-3, "cuda": 0.1}
# the trainer's loss against the oracle (relative, plus an absolute floor for the KL-only loss)
ORACLE = {"cpu": (1e-5, 1e-6), "cuda": (1e-3, 1e-4)}
# a rescored snapshot against its cache: the fp16 cache's rounding (2^-11) and, compiled scorer, bf16 kernels
SNAPSHOT_TOLERANCE = {False: 1e-3, True: 3e-2}


# =============================================================================================
# Output: one line a check, a summary, the exit code
# =============================================================================================

class Report:
    def __init__(self):
        self.counts = {"ok": 0, "FAIL": 0, "skip": 0}
        self.t0 = time.perf_counter()

    def line(self, status: str, name: str, text: str):
        self.counts[status] += 1
        print(f"{status:<4} {name}: {text}", flush=True)

    def result(self, name: str, passed: bool, text: str, seconds: float | None = None):
        self.line("ok" if passed else "FAIL", name, text + (f" ({seconds:.1f} s)" if seconds is not None else ""))

    def skip(self, name: str, why: str):
        self.line("skip", name, why)

    @contextlib.contextmanager
    def guard(self, name: str):
        """A check that raises is a FAIL line (its traceback on stderr), and the next check runs."""
        try:
            yield
        except (KeyboardInterrupt, UsageError):
            raise
        except Exception as e:  # noqa: BLE001 - every failure is reported as the check's own
            traceback.print_exc(file=sys.stderr)
            first = (str(e).strip().splitlines() or [""])[0][:300]
            self.line("FAIL", name, f"{type(e).__name__}: {first}")

    def summary(self, where: str) -> int:
        c = self.counts
        print(f"gpu_check: {c['ok']} ok, {c['FAIL']} FAIL, {c['skip']} skipped in "
              f"{time.perf_counter() - self.t0:.0f} s on {where}", flush=True)
        return 1 if c["FAIL"] else 0


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(x: float) -> str:
    return q0_run.gib_text(x / q0_run.GIB)


def free_memory(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# =============================================================================================
# The plan's trace: the one call to q0_run.trace_step, and a process to run it beside the checks
# =============================================================================================

def trace(cfg, args, device_batch: int, device_type: str, distill: bool, memory: bool) -> dict:
    """q0_run.trace_step as a run on `device_type` plans it (one process, its teacher in the held dtype)."""
    return q0_run.trace_step(q0, cfg, args, device_batch=device_batch, checkpoint=args.checkpoint_activations,
                             distill=distill, memory=memory, teacher_dtype=q0_run.held_dtype(device_type), ddp=False)


def plan_traces(cfg, args, device_batch: int, device_type: str, memory: bool) -> dict:
    """A plain micro-batch's FLOPs (the plan's student FLOPs per token) and a distilling one's peak."""
    t0 = time.perf_counter()
    return {"plain": trace(cfg, args, device_batch, device_type, distill=False, memory=False),
            "distilling": trace(cfg, args, device_batch, device_type, distill=True, memory=memory),
            "seconds": time.perf_counter() - t0}


def _traces_worker(conn, *a):
    try:
        conn.send(("ok", plan_traces(*a)))
    except BaseException as e:  # noqa: BLE001 - said by the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


class Traces:
    """plan_traces now (a CPU: seconds) or in a process of its own (CUDA: the checks go on meanwhile)."""

    def __init__(self, cfg, args, device_batch: int, device_type: str, memory: bool, background: bool):
        self.value, self.process = None, None
        if not background:
            self.value = plan_traces(cfg, args, device_batch, device_type, memory)
            return
        ctx = multiprocessing.get_context("spawn")  # CPU work only; never a forked CUDA context
        self.conn, child = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_traces_worker, args=(child, cfg, args, device_batch, device_type, memory),
                                   daemon=True)
        self.process.start()
        child.close()

    def get(self) -> dict:
        if self.value is None:
            try:
                status, value = self.conn.recv()
            except EOFError:
                status, value = "error", f"the tracing process died (exit code {self.process.exitcode})"
            self.process.join()
            if status != "ok":
                raise RuntimeError(f"q0_run.trace_step failed: {value}")
            self.value = value
        return self.value

    def close(self):
        if self.process is not None and self.process.is_alive():
            self.process.terminate()


# =============================================================================================
# 1. FlexAttention against SDPA
# =============================================================================================

def brute_attention(q, k, v, window: int) -> torch.Tensor:
    """The convention by brute force: query i sees key j iff 0 <= i - j <= window."""
    i = torch.arange(q.size(-2), device=q.device)
    distance = i[:, None] - i[None, :]
    scores = (q @ k.mT) / math.sqrt(q.size(-1))
    return torch.softmax(scores.masked_fill(~((distance >= 0) & (distance <= window)), -torch.inf), -1) @ v


def cpu_flex(q, k, v, window: int) -> torch.Tensor:
    """The unfused flex_attention with train_q0's block mask (compiling it takes 20 s on 2 cores)."""
    from torch.nn.attention.flex_attention import flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without")
        return flex_attention(q, k, v, block_mask=q0._window_block_mask(q.size(-2), window, q.device))


def attention_errors(kernels: dict, q, k, v, window: int, grad: bool) -> dict:
    """Max |kernel - float64| of the output (and of dq, dk, dv) for each kernel, and max |reference|."""
    inputs = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    ref = brute_attention(*inputs, window)
    g = torch.randn_like(ref) if grad else None
    want = [ref] + (list(torch.autograd.grad(ref, inputs, g)) if grad else [])
    out = {"scale": [w.abs().max().item() for w in want]}
    for name, fn in kernels.items():
        xs = [t.detach().requires_grad_(grad) for t in (q, k, v)]
        y = fn(*xs, window)
        got = [y] + (list(torch.autograd.grad(y, xs, g.to(y.dtype))) if grad else [])
        out[name] = [(a.double() - b).abs().max().item() for a, b in zip(got, want)]
    return out


def check_attention(report: Report, cfg, device: torch.device):
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    T = cfg.seq_len if cuda else 200  # a CPU: not a multiple of the 128-token block either
    B, H, D = 1, cfg.n_head, cfg.d_model // cfg.n_head
    windows = {f"window {min(cfg.short_window, T - 1)}": min(cfg.short_window, T - 1), "causal": T}  # as the model
    kernels = {"flex": q0.flex_attend if cuda else cpu_flex, "sdpa": q0.sdpa_attend}
    floor, ceiling = ATTENTION_FLOOR[dtype], ATTENTION_CEILING[dtype]
    rule = f"flex's error <= 2x SDPA's + {floor:g} x max|ref|, both <= {ceiling:.2g} x max|ref|"
    shape = f"{B}x{H}x{T}x{D} {str(dtype).removeprefix('torch.')}"
    parts = ("forward", "backward") if cuda else ("forward",)
    results = {p: [] for p in parts}
    t0 = time.perf_counter()
    with report.guard("flex vs SDPA"):
        try:
            for label, window in windows.items():
                torch.manual_seed(0)
                q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype) for _ in range(3))
                e = attention_errors(kernels, q, k, v, window, grad=cuda)
                for p, idx in (("forward", [0]), ("backward", [1, 2, 3])):
                    if p not in results:
                        continue
                    flex, sdpa = max(e["flex"][i] for i in idx), max(e["sdpa"][i] for i in idx)
                    limit = max(min(2 * e["sdpa"][i] + floor * e["scale"][i], ceiling * e["scale"][i]) for i in idx)
                    ok = all(e["flex"][i] <= 2 * e["sdpa"][i] + floor * e["scale"][i]
                             and max(e["flex"][i], e["sdpa"][i]) <= ceiling * e["scale"][i] for i in idx)
                    results[p].append((ok, f"{label}: flex {flex:.2e}, sdpa {sdpa:.2e} (flex's limit {limit:.2e})"))
                del q, k, v, e
        finally:
            free_memory(device)
            if cuda:  # the check's shapes would count toward the recompile limit eager flex_attend calls share
                torch._dynamo.reset()
        seconds = time.perf_counter() - t0
        kernel = "train_q0.flex_attend, compiled" if cuda else "unfused flex_attention"
        for p in parts:
            what = "output" if p == "forward" else "dq, dk, dv"
            report.result(f"flex vs SDPA {p}", all(ok for ok, _ in results[p]),
                          f"max |{what} - float64| at {shape}: " + "; ".join(t for _, t in results[p])
                          + f" | {rule} | {kernel}", seconds if p == parts[-1] else None)
    if not cuda:
        report.skip("flex vs SDPA backward", "no CUDA (torch has no CPU backward for FlexAttention)")


# =============================================================================================
# 2. Muon: sharded_polar_express over 8 ranks against polar_express of the whole stack
# =============================================================================================

class ThreadGroup:
    """A stand-in process group of `ranks` threads: what sharded_polar_express asks of a group (its
    size, this rank, an all-gather) answered in one process, so its own code runs shard by shard."""

    def __init__(self, ranks: int):
        self.ranks, self.local = ranks, threading.local()
        self.barrier = threading.Barrier(ranks, timeout=600)
        self.slots: list = [None] * ranks

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.local.rank] = t
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # every rank has read them before a next gather writes
        return out

    @contextlib.contextmanager
    def installed(self):
        size, rank, gather = dist.get_world_size, dist.get_rank, q0_run.all_gather

        def world_size(group=None):
            return self.ranks if group is self else size(group)

        def get_rank(group=None):
            return self.local.rank if group is self else rank(group)

        def all_gather(t, group=None):
            return self.all_gather(t) if group is self else gather(t, group)
        with mock.patch.object(dist, "get_world_size", world_size), mock.patch.object(dist, "get_rank", get_rank), \
                mock.patch.object(q0_run, "all_gather", all_gather):
            yield

    def run(self, fn) -> list:
        """fn() on every rank (a thread each); their results, in rank order."""
        results, errors = [None] * self.ranks, []

        def rank_main(r: int):
            self.local.rank = r
            try:
                results[r] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier.abort()
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(self.ranks)]
        with self.installed():
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return results


def muon_stacks(cfg, args) -> list[tuple[int, int, int]]:
    """(matrices, rows, cols) of every Muon group of the model (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = q0.GPT(cfg)
    return [(len(g["params"]), *g["params"][0].shape) for g in q0.build_optimizer(model, args).param_groups
            if g["kind"] == "muon"]


def check_muon(report: Report, cfg, args, device: torch.device):
    t0 = time.perf_counter()
    with report.guard("Muon sharded vs whole"):
        tol = MUON_TOLERANCE[device.type]
        worst, unequal_ranks, stacks = 0.0, 0, muon_stacks(cfg, args)
        for n, rows, cols in stacks:
            torch.manual_seed(n * rows + cols)
            G = torch.randn(n, rows, cols, device=device)
            whole = q0.polar_express(G)
            group = ThreadGroup(SHARDS)
            per_rank = group.run(functools.partial(q0.sharded_polar_express, G, group))
            unequal_ranks += sum(not torch.equal(r, per_rank[0]) for r in per_rank)
            worst = max(worst, max(((r.float() - whole.float()).abs().max() / whole.float().abs().max()).item()
                                   for r in per_rank))
            del G, whole, per_rank
            free_memory(device)
        matrices = sum(n for n, _, _ in stacks)
        shapes = ", ".join(f"{n}x{r}x{c}" for n, r, c in stacks)
        passed = worst <= tol and unequal_ranks == 0
        report.result("Muon sharded vs whole", passed,
                      f"{matrices} matrices in {len(stacks)} stacks ({shapes}) over {SHARDS} ranks: max |sharded - "
                      f"whole| = {worst:.2e} of max |whole| (limit {tol:g}{': exactly equal' if tol == 0 else ''}), "
                      f"ranks {'identical' if unequal_ranks == 0 else f'DIFFER ({unequal_ranks})'}",
                      time.perf_counter() - t0)


# =============================================================================================
# The trainers: a temporary run of random tokens, BaseTrainer as main() builds it
# =============================================================================================

def write_data(folder: Path, vocab: int, bos: int, tokenizer: str, seq_len: int, train_tokens: int):
    """train.q0t: a first document of 2 x seq_len tokens (the fitness set is its head, --fitness-tokens 64), then
    documents of seq_len / 2 to 2 x seq_len tokens; val.q0t: one document of 2 x seq_len + 1 tokens."""
    rng = np.random.default_rng(0)

    def doc(n: int) -> np.ndarray:
        x = rng.integers(0, vocab - 1, n - 1)
        x[x >= bos] += 1  # every id but BOS
        return np.concatenate([[bos], x])
    train = [doc(2 * seq_len + 1)]
    while sum(d.size for d in train[1:]) < train_tokens:
        train.append(doc(int(rng.integers(seq_len // 2 + 2, 2 * seq_len + 1))))
    token_bytes = np.ones(vocab, dtype=np.int64)
    token_bytes[bos] = 0
    fields = dict(vocab_size=vocab, bos_id=bos, tokenizer=tokenizer, token_bytes=token_bytes,
                  command="python benchmarks/gpu_check.py  # random tokens")
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / "train.q0t", np.concatenate(train), **fields)
    write_shard(folder / "val.q0t", doc(2 * seq_len + 1), **fields)


@contextlib.contextmanager
def compile_backend(backend: str | None):
    """torch.compile with this backend while a trainer is built (its Stepper compiles the model then)."""
    if backend is None:
        yield
        return
    real = torch.compile
    with mock.patch.object(torch, "compile", functools.partial(real, backend=backend)):
        yield


class Trainers:
    """The temporary run: data, run directory (run.json, as q0_run.prepare_run_dir writes it), and
    BaseTrainers of it for a given --compile."""

    def __init__(self, argv: list[str], work: Path, device: torch.device):
        self.argv, self.work, self.device = argv, work, device
        self.args = self.parse()
        slowrun = self.args.preset == "slowrun"
        vocab, bos, tokenizer = (50257, 50256, "gpt2") if slowrun else (256, 0, "bytes")
        write_data(work / "data", vocab, bos, tokenizer, self.args.seq_len,
                   16 * self.args.batch_seqs * self.args.seq_len)
        self.data = q0_run.load_data(self.args)
        self.cfg = q0.model_config(self.args, self.data.vocab_size)
        self.cycles = q0.plan_cycles(self.args, self.data.train.size)
        self.layout = q0_run.make_layout(self.args, 1, 0, self.cycles, q0.device_batch_cap(self.args))
        population = q0_run.population_config(self.args, q0.NON_POPULATION_FLAGS)
        self.run_dir, _, self.lock = q0_run.prepare_run_dir(self.args, self.data, self.cfg, self.cycles, population,
                                                            q0_run.code_files(q0))

    def parse(self, *more: str):
        return q0.parse_args([*self.argv, "--data-dir", str(self.work / "data"), "--runs-dir", str(self.work / "runs"),
                              *more])

    def trainer(self, compile_: str, backend: str | None = None) -> q0.BaseTrainer:
        args = self.parse("--compile", compile_)
        run = q0_run.Run(args, self.cfg, self.data, self.cycles, self.layout, self.run_dir,
                         q0_run.RunLog(self.run_dir, enabled=False), self.device)
        with compile_backend(backend):
            return q0.BaseTrainer(run, 0)

    def close(self):
        with contextlib.suppress(OSError, AttributeError):  # the run's lock (prepare_run_dir's)
            os.close(self.lock.fd)


def model_argv(device: torch.device, rest: list[str]) -> list[str]:
    """train_q0.py's flags for the check: the device's default model and a small run around it (two
    cycles of 16 steps, chain distillation from the second), then the user's flags, which win."""
    if device.type == "cuda":
        model = ["--preset", "slowrun", "--device-batch", "1", "--batch-seqs", "8"]
    else:
        model = ["--preset", "tiny", "--device-batch", "8", "--batch-seqs", "8"]  # MemTracker: one micro-batch a step
    run = ["--cycles", "2", "--first-cycle-epochs", "1", "--cycle-epochs", "1", "--batch-schedule", "1",
           "--distil-from-cycle", "2", "--fitness-tokens", "64", "--train-tokens", "0", "--val-tokens", "0",
           "--run-name", "gpu-check"]
    return model + run + rest


def shrunk(args, ratio: float) -> list[str]:
    """Flags for a model of fewer layers, about `ratio` of the memory: the looped block scaled with it."""
    n = max(2, min(args.n_layer - 1, int(args.n_layer * ratio)))
    start, end = args.loop_layers
    flags = ["--n-layer", str(n)]
    if end > start:
        s = n // 2
        flags += ["--loop-layers", str(s), str(min(n, s + max(1, round((end - start) * n / args.n_layer))))]
    return flags


# =============================================================================================
# The checks that need a trainer
# =============================================================================================

def state_on_host(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def check_compile(report: Report, trainers: Trainers, opts) -> q0.BaseTrainer:
    """One step eager and one compiled from the same weights; returns the trainer the next checks use
    (the run's own choice for the device: compiled on CUDA, eager on a CPU)."""
    device, cycle = trainers.device, trainers.cycles[0]
    cuda = device.type == "cuda"
    backend = opts.backend or ("inductor" if cuda else "aot_eager")
    t0 = time.perf_counter()
    eager = trainers.trainer("off")
    w0 = state_on_host(eager.model)
    loss_e = eager.train_step(cycle, 0, None).item()
    w_e = state_on_host(eager.model)
    if cuda:  # the record's model twice does not fit beside itself
        del eager
        free_memory(device)
    compiled = trainers.trainer("on", None if backend == "inductor" else backend)
    loss_c = compiled.train_step(cycle, 0, None).item()
    seconds = time.perf_counter() - t0
    diff = update = 0.0
    worst = 0.0
    for k, v in compiled.model.state_dict().items():
        c = v.detach().double()
        e, w = w_e[k].to(device, torch.float64), w0[k].to(device, torch.float64)
        diff += (c - e).square().sum().item()
        update += (e - w).square().sum().item()
        worst = max(worst, (c - e).abs().max().item())
    rel_update = math.sqrt(diff / max(update, 1e-30))
    rel_loss = abs(loss_c - loss_e) / max(abs(loss_e), 1e-12)
    lt, ut = COMPILE_LOSS[device.type], COMPILE_UPDATE[device.type]
    ok = math.isfinite(loss_c) and rel_loss <= lt and rel_update <= ut
    report.result("compiled vs eager step", ok,
                  f"{backend}: loss {loss_c:.6f} vs {loss_e:.6f} (rel {rel_loss:.1e}, limit {lt:g}); |W_compiled - "
                  f"W_eager| = {rel_update:.1e} of the step's update (limit {ut:g}), max {worst:.1e}", seconds)
    if cuda:
        main = compiled
        if not opts.compile_teachers:  # the teachers and the scorer eager: their compiles are minutes
            main.use_compile = False
    else:  # a CPU run trains eagerly
        main = eager
        del compiled
        torch._dynamo.reset()
    del w0, w_e
    free_memory(device)
    return main


def check_snapshot(report: Report, trainer: q0.BaseTrainer, cycle, name: str = "snapshot scored and saved"):
    """BaseTrainer.snapshot (scores fitness and validation, saves, keeps the chain teacher), then the
    saved files read back and scored again."""
    device, args, run_dir = trainer.device, trainer.args, trainer.run_dir
    sid = q0_run.snapshot_id(trainer.base, cycle.index)
    t0 = time.perf_counter()
    trainer.snapshot(cycle)
    seconds = time.perf_counter() - t0
    record = q0_run.read_json(run_dir / "snapshots" / f"{sid}.json", "rerun")
    targets = trainer.data.val.size - 1
    cached = q0_run.cached_probs(run_dir, record, "val", targets).astype(np.float64)
    weights = q0_run.load_weights(run_dir / record["weights"], mmap=True)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in weights.values()})
    size = (run_dir / record["weights"]).stat().st_size
    del weights
    model = q0.load_snapshot_model(run_dir, record, device)  # its SHA-256 checked
    again = q0.token_probs(model, trainer.data.val, args.seq_len, args.eval_batch, device).astype(np.float64)
    del model
    free_memory(device)
    rel = float(np.max(np.abs(again - cached) / cached))
    tol = SNAPSHOT_TOLERANCE[trainer.use_compile]
    nll = q0_run.mean_nll(again)
    held = str(next(trainer.teacher.model.parameters()).dtype).removeprefix("torch.") if trainer.teacher else "nothing"
    want = str(q0_run.held_dtype(device.type)).removeprefix("torch.")  # the weights saved, and the teacher kept
    ok = rel <= tol and abs(nll - record["val_loss"]) <= 2 * tol and held == want and dtypes == [want]
    report.result(name, ok,
                  f"{sid}: val {record['val_loss']:.4f} nats ({targets:,} targets), scored and saved in "
                  f"{seconds:.1f} s "
                  f"({gib(size)}, {'/'.join(dtypes)}); read back (SHA-256 checked) and rescored: max |dp|/p "
                  f"{rel:.1e} (limit {tol:g}: the fp16 cache{', a compiled scorer' if trainer.use_compile else ''}), "
                  f"val {nll:.4f}; kept as the chain teacher in {held}")
    return record


def check_speed(report: Report, trainer: q0.BaseTrainer, traces: Traces, opts):
    device, args, cycle = trainer.device, trainer.args, trainer.cycles[0]
    first = trainer.step
    for i in range(opts.warmup):
        trainer.train_step(cycle, (first + i) % cycle.steps, None)
    sync(device)
    t0 = time.perf_counter()
    losses = [trainer.train_step(cycle, (first + opts.warmup + i) % cycle.steps, None) for i in range(opts.steps)]
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = opts.steps * cycle.batch_seqs * args.seq_len
    rate = tokens / seconds
    plan = traces.get()["plain"]
    flops = rate * plan["student_flops_per_token"]
    muon = plan["optimizer_flops"] * opts.steps / seconds
    finite = all(math.isfinite(x.item()) for x in losses)
    head = (f"{rate:,.0f} tokens/s over {opts.steps} steps of {cycle.batch_seqs} x {args.seq_len} tokens "
            f"({seconds / opts.steps:.2f} s/step, after {opts.warmup} warm-up); {flops / 1e12:.3g} TFLOP/s of the "
            f"plan's student FLOPs ({plan['student_flops_per_token']:.3e}/token)")
    if device.type == "cuda":
        peak = args.peak_tflops * 1e12
        mfu, with_muon = flops / peak, (flops + muon) / peak
        report.result("tokens/s and MFU", finite and mfu <= 1,
                      head + f" | MFU {mfu:.1%} of {args.peak_tflops:g} TFLOP/s (--peak-tflops); {with_muon:.1%} "
                      f"counting the step's unsharded Muon ({plan['optimizer_flops']:.2e} FLOPs; 1/{SHARDS} of it "
                      f"per GPU on {SHARDS})")
    else:
        report.result("tokens/s and MFU", finite, head + " | MFU n/a on a CPU (--peak-tflops is a GPU's)")


def oracle_losses(model, teacher, members, weights, rows, device, args) -> list[tuple[float, float, float]]:
    """(alpha, the trainer's micro-batch loss, the oracle's) at the run's alpha and at 1 (the KL alone):
    micro_batch_loss with eager teachers against tests/conftest.py's distillation_loss from whole logits."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(1, str(ROOT / "tests"))
    from conftest import distillation_loss  # the tests' oracle (needs pytest importable)
    T, out = args.distil_temperature, []
    model.eval()
    try:
        with torch.no_grad():
            with q0.autocast_for(device):
                x, mtp = model(rows[:, :-1], rows[:, 1:], hidden=True)
                logits = model.logits(x)
                with q0.autocast_for(device, cache=False):
                    lps = [torch.log_softmax(m(rows[:, :-1]).float() / T, -1) + math.log(w)
                           for m, w in zip(members, weights)]
                teacher_logits = T * torch.logsumexp(torch.stack(lps), 0)  # log_softmax(. / T) gives the mixture
            for alpha in (args.distil_alpha, 1.0):
                got = q0.micro_batch_loss(model, model, teacher, rows, device, None, alpha, T).item()
                with q0.autocast_for(device):
                    want = distillation_loss(logits, rows[:, 1:], teacher_logits, alpha, T, mtp,
                                             model.cfg.mtp_weight).item()
                out.append((alpha, got, want))
    finally:
        model.train()
    return out


def check_distil(report: Report, trainer: q0.BaseTrainer, traces: Traces, kind: str, teacher, members: list,
                 weights: tuple):
    """One distilling training step (its peak memory measured, then check_memory) and the oracle's
    loss of a micro-batch."""
    device, args, cycle = trainer.device, trainer.args, trainer.cycles[1]
    name = f"distil step, {kind} teacher"
    held = [trainer.model, trainer.optimizer, *members]
    kernels, measured = dict(q0.KERNELS), None
    t0 = time.perf_counter()
    with report.guard(name):
        if device.type == "cpu":  # the trace's autocast, so the memory compares like with like
            q0.set_kernels(attention=kernels["attention"], autocast="bf16")
        try:
            free_memory(device)
            with q0_run.peak_memory(device, held) as peak:
                loss = trainer.train_step(cycle, trainer.step % cycle.steps, teacher).item()
            reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
        finally:
            q0.KERNELS.update(kernels)
        measured, step_seconds = peak.bytes, time.perf_counter() - t0
        B = trainer.layout.device_batch
        rows = torch.from_numpy(trainer.stream.batch(cycle.pos(0, args.seq_len), B, args.seq_len)).to(device)
        eager = q0.SnapshotTeacher(members[0]) if len(members) == 1 else \
            q0.EnsembleTeacher([q0.SnapshotTeacher(m) for m in members], list(weights))
        try:
            compared = oracle_losses(trainer.model, eager, members, weights, rows, device, args)
            rtol, atol = ORACLE[device.type]
            worst = max(abs(g - w) / (rtol * abs(w) + atol) for _, g, w in compared)
            oracle = ("; ".join(f"alpha {a:g}: {g:.6f} vs {w:.6f}" for a, g, w in compared)
                      + f" (limit {rtol:g} rel + {atol:g})")
        except ImportError as e:
            worst, oracle = 0.0, f"oracle not run: tests/conftest.py needs {e.name}"
        dtype = str(next(members[0].parameters()).dtype).removeprefix("torch.")
        report.result(name, math.isfinite(loss) and worst <= 1,
                      f"{len(members)} teacher bod{'y' if len(members) == 1 else 'ies'} in {dtype}"
                      f"{', compiled' if trainer.use_compile else ', eager'}: step loss {loss:.4f} in "
                      f"{step_seconds:.1f} s"
                      f" | a micro-batch's loss vs the oracle from whole logits: {oracle}", time.perf_counter() - t0)
    if measured is not None:
        check_memory(report, trainer, traces, kind, measured, reserved, len(members))


def check_memory(report: Report, trainer: q0.BaseTrainer, traces: Traces, kind: str, measured: int,
                 reserved: int | None, bodies: int):
    """The measured peak of a distilling step against the trace: one teacher body traced, each further
    ensemble member adds its weights in the held dtype (plan_run's rule for members on one process)."""
    name = f"peak memory, {kind} teacher"
    device = trainer.device
    with report.guard(name):
        step = traces.get()["distilling"]
        body = step["params"] * q0_run.held_dtype(device.type).itemsize
        traced = step["peak_bytes"] + (bodies - 1) * body
        ratio = measured / traced
        ok = ratio <= 1 + MEMORY_MARGIN
        B, T = trainer.layout.device_batch, trainer.args.seq_len
        text = (f"micro-batches of {B} x {T}: measured {gib(measured)} vs traced {gib(traced)} (x{ratio:.2f}, limit "
                f"x{1 + MEMORY_MARGIN:.2f}; the trace took {traces.get()['seconds']:.0f} s)")
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            outside = (total - free) - torch.cuda.memory_reserved(device)
            process = reserved + outside
            planned = q0_run.planned_bytes(traced, "cuda")
            ok = ok and process <= planned
            text += (f" | the process: reserved {gib(reserved)} + {gib(outside)} outside torch's allocator = "
                     f"{gib(process)} vs planned {gib(planned)} (traced + {q0_run.ALLOCATOR_SLACK:.0%} + "
                     f"{q0_run.CUDA_OUTSIDE_ALLOCATOR_GIB:g} GiB) of the device's {gib(total)}")
        else:
            text += " | CPU: torch's MemTracker over the real tensors, bf16 autocast as traced"
        report.result(name, ok, text)


def check_ensemble(report: Report, trainer: q0.BaseTrainer, traces: Traces, first: dict):
    """A second snapshot, then both loaded as a prior's members are (BaseTrainer.load_ensemble)."""
    ensemble = None
    with report.guard("distil step, ensemble teacher"):
        second = trainer.cycles[1]
        trainer.snapshot(second)  # the student has moved on: a member unlike the first
        trainer.teacher = None
        free_memory(trainer.device)
        record = q0_run.read_json(trainer.run_dir / "snapshots" / f"{q0_run.snapshot_id(trainer.base, second.index)}"
                                  f".json", "rerun")
        ensemble = trainer.load_ensemble([{"run_dir": trainer.run_dir, "record": r, "weight": w}
                                          for r, w in zip((first, record), ENSEMBLE_WEIGHTS)])
    if ensemble is not None:
        check_distil(report, trainer, traces, "ensemble", ensemble, [m.model for m in ensemble.members],
                     ENSEMBLE_WEIGHTS)


# =============================================================================================
# Main
# =============================================================================================

def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                       epilog="Any other flag is train_q0.py's (e.g. --preset, --n-layer, --seq-len, --device-batch, "
                              "--batch-seqs, --peak-tflops, --device-memory-gib) and picks the model and its shapes.")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is available")
    p.add_argument("--only", default=",".join(CHECKS),
                   help=f"comma-separated checks to run, of {', '.join(CHECKS)} (distil includes snapshot and memory)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed training steps before them")
    p.add_argument("--backend", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend of the compiled-vs-eager step (default: inductor on CUDA, aot_eager "
                        "on a CPU, where inductor takes minutes)")
    p.add_argument("--compile-teachers", action="store_true",
                   help="compile the scorer and the teachers as a run does (CUDA: minutes of compiling more)")
    return p


def parse(argv) -> tuple:
    opts, rest = build_parser().parse_known_args(argv)
    only = {c.strip() for c in opts.only.split(",") if c.strip()}
    unknown = only - set(CHECKS)
    if unknown or not only:
        raise UsageError(f"--only {opts.only}: choose among {', '.join(CHECKS)}")
    if "distil" in only:
        only.add("snapshot")
    opts.only = only
    if opts.steps < 1 or opts.warmup < 0:
        raise UsageError("--steps must be at least 1 and --warmup at least 0")
    return opts, rest


@command
def main(argv=None) -> int:
    opts, rest = parse(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not opts.cpu \
        else torch.device("cpu")
    cuda = device.type == "cuda"
    argv = model_argv(device, rest)
    q0.parse_args(argv)  # bad flags: one error line before any work
    report, kernels, threads = Report(), dict(q0.KERNELS), torch.get_num_threads()
    if not cuda:  # the tiny model's ops are too small to share: one thread is faster, and steady on a busy machine
        torch.set_num_threads(1)
    where = (f"{torch.cuda.get_device_name(device)} ({gib(torch.cuda.get_device_properties(device).total_memory)})"
             if cuda else f"CPU (1 thread of {threads})")
    traces = None
    with tempfile.TemporaryDirectory(prefix="q0-gpu-check-") as tmp:
        trainers = Trainers(argv, Path(tmp), device)
        try:
            args, cfg = trainers.args, trainers.cfg
            q0.set_kernels(attention=args.attention, autocast=args.autocast)
            with torch.device("meta"):
                params = sum(p.numel() for p in q0.GPT(cfg).parameters())
            print(f"gpu_check: torch {torch.__version__} on {where} | preset {args.preset}: {params:,} parameters, "
                  f"{cfg.n_layer} layers, width {cfg.d_model}, {cfg.n_head} heads, vocabulary {cfg.vocab_size:,} | "
                  f"device batch {trainers.layout.device_batch} x {args.seq_len}, {args.batch_seqs} sequences a step",
                  flush=True)
            trainer_checks = opts.only & {"compile", "snapshot", "speed", "distil"}
            if opts.only & {"speed", "distil"} or (cuda and trainer_checks):  # cuda: fit() asks the plan
                traces = Traces(cfg, args, trainers.layout.device_batch, device.type,
                                memory="distil" in opts.only or cuda, background=cuda)
            if "attention" in opts.only:
                check_attention(report, cfg, device)
            if "muon" in opts.only:
                check_muon(report, cfg, args, device)
            if trainer_checks and cuda:
                trainers, traces = fit(trainers, traces, opts, rest, device)
            if trainer_checks:
                run_trainer_checks(report, trainers, traces, opts)
        finally:
            if traces is not None:
                traces.close()
            trainers.close()
            q0.KERNELS.update(kernels)
            torch._dynamo.reset()
            torch.set_num_threads(threads)
    return report.summary(where)


MODEL_FLAGS = ("--preset", "--n-layer", "--d-model", "--mlp-hidden", "--seq-len", "--device-batch",
               "--checkpoint-activations")


def fit(trainers: Trainers, traces: Traces | None, opts, rest: list[str], device):
    """The record's model where the plan says it fits this device, else fewer layers until it does. A
    device of an H100's memory or more takes the record's model as planned (the preset is sized for
    it), without waiting for the trace; a model picked by flags is taken as given."""
    args = trainers.args
    device_gib = q0_run.device_memory_gib(args, device)
    given = any(a.split("=")[0] in MODEL_FLAGS for a in rest)
    if traces is None or given or device_gib >= q0_run.H100_GIB * 0.98:
        return trainers, traces
    bodies = 2 if "distil" in opts.only else 1  # the ensemble step holds two teacher bodies
    for _ in range(4):
        step = traces.get()["distilling"]
        body = step["params"] * q0_run.held_dtype("cuda").itemsize
        need = q0_run.planned_bytes(step["peak_bytes"] + (bodies - 1) * body, "cuda") / q0_run.GIB
        if need <= device_gib or args.n_layer <= 2:
            break
        flags = shrunk(args, device_gib / need * 0.95)
        print(f"gpu_check: {args.n_layer} layers plan {need:.1f} GiB and the device has {device_gib:.1f} GiB: "
              f"the largest model that fits, by the plan, is tried instead: {' '.join(flags)}", flush=True)
        trainers.close()
        trainers = Trainers(trainers.argv + flags, trainers.work / f"layers-{flags[1]}", device)
        args = trainers.args
        traces.close()
        traces = Traces(trainers.cfg, args, trainers.layout.device_batch, "cuda", True, background=False)
    return trainers, traces


def run_trainer_checks(report: Report, trainers: Trainers, traces: Traces | None, opts):
    device = trainers.device
    trainer = None
    if "compile" in opts.only:
        with report.guard("compiled vs eager step"):
            trainer = check_compile(report, trainers, opts)
    if trainer is None:
        with report.guard("trainer"):
            trainer = trainers.trainer("auto")
            if device.type == "cuda" and not opts.compile_teachers:
                trainer.use_compile = False
    if trainer is None:
        return
    first = None
    if "snapshot" in opts.only:
        with report.guard("snapshot scored and saved"):
            first = check_snapshot(report, trainer, trainers.cycles[0])
    if "speed" in opts.only:
        with report.guard("tokens/s and MFU"):
            check_speed(report, trainer, traces, opts)
    if "distil" in opts.only and first is not None and trainer.teacher is not None:
        teacher = trainer.teacher
        check_distil(report, trainer, traces, "chain", teacher, [teacher.model], (1.0,))
        del teacher
        trainer.teacher = None
        check_ensemble(report, trainer, traces, first)
    elif "distil" in opts.only:
        report.line("FAIL", "distil step", "no chain teacher: the snapshot check failed")


if __name__ == "__main__":
    sys.exit(main())
