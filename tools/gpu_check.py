"""The device check of one GPU machine, as one markdown table: the CUDA tests, a training step's throughput, MFU
and peak memory for the 124M presets at B=16 and B=64 (compiled, bf16, as the loop runs), the same for gpt2-124m
at B=16 with the other LM-head loss (chunked: no full logits; the data for --chunked-loss on CUDA), gpt2-124m at
B=64 with Liger-Kernel's fused LM head + cross-entropy against the full-logits loss (where `uv sync --extra gpu`
installed it; the other rows run without it), gpt2-124m at B=16 with 8 experts (top 2) computed on their own tokens
against every expert on every token (the earlier dense evaluation), gpt2-124m-speedrun at B=16 with each of the
2025-26 switches alone against the preset without it, and how long a 124M checkpoint with its optimizer state takes
to save.

    python3 -m tools.gpu_check > gpu_check.md                # one H100/H200: a few minutes, progress on stderr
    python3 -m tools.gpu_check --dry-run --device cpu         # every section, tiny and on the CPU, in seconds
    python3 -m tools.gpu_check --only cuda-tests,moe-step    # some sections only (the check column, - for spaces)

The training-quality comparison of the presets is tools/gpu_quality.py. On a GPU machine without uv or the
internet, Liger comes along as files: `uv pip install --no-deps --target data/liger liger-kernel==0.8.5` here
(data/ is ignored by git), carry `data`, and run there with PYTHONPATH=data/liger.

Needs what the test suite needs (torch, numpy, tiktoken, pytest and the test data that tests/conftest.py names),
not datasets, uv or the internet. Exits 1 if a check failed; the table still comes out.
"""

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt2.config import parse_config
from gpt2.loss import FUSED_ENV, fused_wanted
from gpt2.models import build_model
from gpt2.optim import build_optimizers
from gpt2.runs import rng_state, save_checkpoint
from gpt2.runtime import autocast_dtype, pick_device
from tools.bench import bench_steps, sync

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ["gpt2-124m", "gpt2-124m-modern", "gpt2-124m-speedrun"]
DRY_MODEL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "32"]  # --dry-run's tiny model
MOE = ["--mlp", "swiglu-oss", "--moe-experts", "8", "--moe-top-k", "2"]  # the experts of tools/ablate.py's moe suite
# the 2025-26 records' switches at their records' sizes (README's table): each a row of the switch-step check
SWITCHES = {"bigram": ["--bigram-rows", "754560"], "smear": ["--smear", "1"], "backout": ["--backout", "1"],
            "mudd": ["--mudd", "1"], "attn-gate": ["--attn-gate", "1"], "mtp 2": ["--mtp", "2"]}
# --only's names: the check column's
CHECKS = ("cuda-tests", "train-step", "fused-loss", "moe-step", "switch-step", "checkpoint-save")


def cuda_tests(dry_run: bool, timeout: float) -> tuple[str, bool]:
    """`pytest -m cuda -q tests/test_cuda.py` in a subprocess: its counts, and ok. That file only, since the GPU
    machine may lack what other test files import (datasets, pyarrow). The dry run hides the GPUs, so that its
    tests are collected and skipped on any machine."""
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if dry_run else None
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        sys.stderr.write((e.stdout or b"").decode(errors="replace"))  # bytes, whatever text= says
        return f"timed out after {timeout:.0f} s", False
    sys.stderr.write(proc.stdout + proc.stderr)
    lines = proc.stdout.strip().splitlines() or [""]
    counts = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b", lines[-1])
    failed = [line.split()[1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    summary = ", ".join(f"{n} {what}" for n, what in counts) or f"pytest exit code {proc.returncode}"
    return summary + (f": {', '.join(failed)}" if failed else ""), proc.returncode == 0


def bench_config(preset: str, batch_size: int, dry_run: bool, *flags: str):
    return parse_config(["--preset", preset, "--batch-size", str(batch_size), *(DRY_MODEL if dry_run else []),
                         *flags])[0]


def loop_loss(device) -> str:
    """The LM-head loss the loop's --chunked-loss auto takes on this device."""
    return "full" if device.type == "cuda" else "chunked"


@contextlib.contextmanager
def fused_loss_env(value: str):
    """GPT2_FUSED_LOSS set to value inside (gpt2/loss.py reads it when a graph is traced), as it was after."""
    before = os.environ.get(FUSED_ENV)
    os.environ[FUSED_ENV] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[FUSED_ENV]
        else:
            os.environ[FUSED_ENV] = before


def measure_step(cfg, device, steps: int, warmup: int, loss_mode: str, fused: bool = False,
                 moe_dense: bool = False) -> dict:
    """bench.py's bench_steps as the loop runs on this device (compiled in bf16 on CUDA, eager on the CPU), with
    Liger's fused loss in place of the full-logits one only if fused, the experts evaluated densely if moe_dense."""
    with fused_loss_env("1" if fused else "0"):
        return bench_steps(cfg, device, autocast_dtype("auto", device), use_compile=device.type == "cuda",
                           steps=steps, warmup=warmup, loss_mode=loss_mode, moe_dense=moe_dense)


def train_step(cfg, device, steps: int, warmup: int, loss_mode: str) -> tuple[str, bool]:
    """A training step's speed and memory with the full-logits or the chunked loss."""
    r = measure_step(cfg, device, steps, warmup, loss_mode)
    result = f"{r['step_ms']:.1f} ms/step, {r['tok_per_s']:,.0f} tok/s"
    result += f", MFU {r['mfu']:.1%}" if r["mfu"] else ""
    result += f", peak {r['mem_gb']:.2f} GiB" if r["mem_gb"] is not None else ""
    return result, True


def fused_step(cfg, device, steps: int, warmup: int) -> tuple[str, bool]:
    """Liger's fused LM head + cross-entropy against the full-logits loss, one right after the other."""
    with fused_loss_env("1"):
        if not fused_wanted(device.type):
            return "skipped: needs CUDA and liger-kernel (`uv sync --extra gpu`)", True
    runs = []
    for fused in (True, False):
        torch._dynamo.reset()  # fused_wanted is decided once per traced graph
        runs.append(measure_step(cfg, device, steps, warmup, "full", fused))
    (f, p), mem = runs, ""
    if f["mem_gb"] is not None:
        mem = f", peak {f['mem_gb']:.2f} vs {p['mem_gb']:.2f} GiB"
    return (f"fused {f['step_ms']:.1f} vs full {p['step_ms']:.1f} ms/step ({f['tok_per_s']:,.0f} vs "
            f"{p['tok_per_s']:,.0f} tok/s, {p['step_ms'] / f['step_ms'] - 1:+.1%} with Liger){mem}"), True


def moe_step(cfg, device, steps: int, warmup: int, loss_mode: str) -> tuple[str, bool]:
    """The experts on their own tokens (the model's evaluation) against every expert on every token
    (MoE.dense_reference), one right after the other."""
    runs = []
    for dense in (False, True):
        torch._dynamo.reset()  # two evaluations of one model class: each its own compile
        runs.append(measure_step(cfg, device, steps, warmup, loss_mode, moe_dense=dense))
    (g, d), mem = runs, ""
    if g["mem_gb"] is not None:
        mem = f", peak {g['mem_gb']:.2f} vs {d['mem_gb']:.2f} GiB"
    return (f"grouped {g['step_ms']:.1f} vs dense {d['step_ms']:.1f} ms/step ({g['tok_per_s']:,.0f} vs "
            f"{d['tok_per_s']:,.0f} tok/s, {d['step_ms'] / g['step_ms'] - 1:+.1%} grouped){mem}"), True


def switch_step(cfg, preset_step, device, steps: int, warmup: int, loss_mode: str) -> tuple[str, bool]:
    """A training step with a switch on against preset_step(), the preset without it (cached: measured once, for
    the first switch row)."""
    b = preset_step()
    torch._dynamo.reset()
    r = measure_step(cfg, device, steps, warmup, loss_mode)
    mem = f", peak {r['mem_gb']:.2f} vs {b['mem_gb']:.2f} GiB" if r["mem_gb"] is not None else ""
    return (f"{r['step_ms']:.1f} vs {b['step_ms']:.1f} ms/step without it ({r['tok_per_s']:,.0f} vs "
            f"{b['tok_per_s']:,.0f} tok/s, {r['step_ms'] / b['step_ms'] - 1:+.1%} time){mem}"), True


def checkpoint_save(cfg, device, log_dir: str) -> tuple[str, bool]:
    """Two saves through gpt2.runs' save_checkpoint of a state shaped like the loop's, optimizer moments filled."""
    model = build_model(cfg.model).to(device)
    optimizers = build_optimizers(cfg, model, device.type)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for opt in optimizers:
        opt.step()  # creates AdamW's exp_avg and exp_avg_sq, as the first real step does
    state = {"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers], "step": 1,
             "loader": {"shard": 0, "pos": 0, "epoch": 0}, "rng": rng_state(), "elapsed": 0.0, "evaluated": True,
             "emas": [], "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(cfg.model)}
    os.makedirs(log_dir, exist_ok=True)
    times = []
    with tempfile.TemporaryDirectory(dir=log_dir) as run_dir:  # on the disk the loop writes to, not a RAM /tmp
        for step in (1, 2):
            sync(device)
            t0 = time.perf_counter()
            path = save_checkpoint(run_dir, {**state, "step": step}, keep=2)
            times.append(time.perf_counter() - t0)
        mb = os.path.getsize(path) / 1e6
    return f"{mb:,.0f} MB in {times[0]:.2f} s, then {times[1]:.2f} s ({mb / min(times):,.0f} MB/s)", True


def sections(args, device) -> list[tuple[str, str, callable]]:
    """(check, setting, run) in the order they run; run() returns (result, ok)."""
    steps, warmup = (2, 1) if args.dry_run else (10, 3)
    tiny, dtype = " (tiny)" if args.dry_run else "", str(autocast_dtype("auto", device)).removeprefix("torch.")
    cuda_cmd = "`pytest -m cuda -q tests/test_cuda.py`"
    out = [("cuda tests", cuda_cmd, lambda: cuda_tests(args.dry_run, args.test_timeout))]
    batch_sizes = (2, 4) if args.dry_run else (16, 64)
    # every preset and batch with the loop's loss, then gpt2-124m's smaller batch with the other one
    other = "chunked" if loop_loss(device) == "full" else "full"
    runs = [(p, b, loop_loss(device)) for p in PRESETS for b in batch_sizes] + [(PRESETS[0], batch_sizes[0], other)]
    for preset, batch_size, loss in runs:
        cfg = bench_config(preset, batch_size, args.dry_run)
        setting = (f"{preset}{tiny} B={batch_size} T={cfg.seq_len}, {dtype}{', compiled' * (device.type == 'cuda')}, "
                   f"{loss} loss")
        out.append(("train step", setting, lambda cfg=cfg, loss=loss: train_step(cfg, device, steps, warmup, loss)))
    cfg = bench_config(PRESETS[0], batch_sizes[1], args.dry_run)
    out.append(("fused loss", f"{PRESETS[0]}{tiny} B={batch_sizes[1]} T={cfg.seq_len}, Liger vs full logits",
                lambda cfg=cfg: fused_step(cfg, device, steps, warmup)))
    cfg = bench_config(PRESETS[0], batch_sizes[0], args.dry_run, *MOE)
    out.append(("moe step", f"{PRESETS[0]}{tiny} B={batch_sizes[0]} T={cfg.seq_len}, 8 swiglu-oss experts top-2, "
                f"{dtype}{', compiled' * (device.type == 'cuda')}, {loop_loss(device)} loss, grouped vs dense",
                lambda cfg=cfg: moe_step(cfg, device, steps, warmup, loop_loss(device))))
    deep = ["--n-layer", "4"] if args.dry_run else []  # backout subtracts block 2L/3's output: 4 layers at least
    base_cfg = bench_config(PRESETS[2], batch_sizes[0], args.dry_run, *deep)
    preset_step = functools.cache(lambda: measure_step(base_cfg, device, steps, warmup, loop_loss(device)))
    for name, flags in SWITCHES.items():
        cfg = bench_config(PRESETS[2], batch_sizes[0], args.dry_run, *deep, *flags)
        out.append(("switch step", f"{PRESETS[2]}{tiny} B={batch_sizes[0]} T={cfg.seq_len}, {dtype}"
                    f"{', compiled' * (device.type == 'cuda')}, {loop_loss(device)} loss, + {name} ({' '.join(flags)})",
                    lambda cfg=cfg: switch_step(cfg, preset_step, device, steps, warmup, loop_loss(device))))
    cfg = bench_config("gpt2-124m", 1, args.dry_run)
    out.append(("checkpoint save", f"gpt2-124m{tiny} model + AdamW state",
                lambda: checkpoint_save(cfg, device, args.log_dir)))
    only = set(args.only.split(",")) if args.only else None
    return [s for s in out if only is None or s[0].replace(" ", "-") in only]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="a tiny model, 2 steps, no compile: checks the script")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--log-dir", default="logs", help="the checkpoint is timed in a temporary folder in here")
    parser.add_argument("--test-timeout", type=float, default=300, help="seconds for the CUDA tests")
    parser.add_argument("--only", help=f"comma-separated checks to run, of {', '.join(CHECKS)}; default: all")
    args = parser.parse_args(argv)
    if args.only and not set(args.only.split(",")) <= set(CHECKS):
        parser.error(f"--only takes checks of {', '.join(CHECKS)}, got {args.only!r}")
    device = pick_device(args.device)
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit(f"gpu_check.py measures a CUDA GPU, and --device {args.device} is {device}: "
                         "on a machine without one, check the script with --dry-run --device cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the loop and bench.py

    rows, all_ok, start = [], True, time.perf_counter()
    for check, setting, run in sections(args, device):
        t0 = time.perf_counter()
        try:
            result, ok = run()
        except Exception as e:  # on a one-shot device run, one broken section must not cost the others
            result, ok = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", False
        all_ok = all_ok and ok
        gc.collect()
        if device.type == "cuda":
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        seconds = time.perf_counter() - t0
        print(f"[gpu_check] {check}, {setting}: {result} ({seconds:.1f} s; {time.perf_counter() - start:.0f} s in all)",
              file=sys.stderr, flush=True)
        rows.append(f"| {check} | {setting} | {result} | {seconds:.1f} |")

    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (dry run)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"## gpu_check: {label}, torch {torch.__version__} (CUDA {torch.version.cuda}), {date}\n")
    print("| check | setting | result | seconds |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n{time.perf_counter() - start:.0f} s in all" + ("" if all_ok else "; a check FAILED"))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
