"""Throughput of a training step (forward + backward + optimizer) and of the data loader alone.

    python -m tools.bench --preset tiny --device cpu --loss both            # chunked vs full-logits loss
    python -m tools.bench --preset gpt2-124m --batch-size 64                   # one GPU: bf16, compiled
    python -m tools.bench --preset gpt2-124m-modern --batch-size 64            # any train_gpt2.py flag works too
    python -m tools.bench --device cpu --moe-experts 8 --mlp swiglu-oss --moe both  # experts: grouped vs dense


Prints median step time, tokens/s, MFU (device peak from gpt2/runtime.py's table) and peak memory, compiled or
not (`--compile both`: each), after warm-up steps; then the loader's batches/s, to show the GPU never waits on data.
"""

import argparse
import itertools
import statistics
import tempfile
import time

import numpy as np
import torch

from gpt2.config import PRESETS, TrainConfig, parse_config
from gpt2.models import build_model
from gpt2.optim import build_optimizers
from gpt2.runtime import autocast, autocast_dtype, mfu_peak, pick_device
from model import LOSS_CHUNK_ELEMENTS


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def bench_steps(cfg: TrainConfig, device, dtype, use_compile: bool, steps: int, warmup: int, loss_mode: str,
                moe_dense: bool = False) -> dict:
    """moe_dense: the experts evaluated as MoE.dense_reference does (every expert on every token)."""
    torch.manual_seed(0)
    model = build_model(cfg.model, loss_chunk_elements=LOSS_CHUNK_ELEMENTS if loss_mode == "chunked" else 0).to(device)
    for layer in model.moe_layers() if moe_dense else []:
        layer.forward = layer.dense_reference
    optimizers = build_optimizers(cfg, model, device.type)
    step_model = torch.compile(model) if use_compile else model
    # a few different batches, so no step reuses the last one's inputs from cache
    batches = [torch.randint(0, 50257, (cfg.batch_size, cfg.seq_len + 1), device=device) for _ in range(4)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            _, loss = step_model(batch[:, :-1], batch[:, 1:], return_logits=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tok_per_s = cfg.batch_size * cfg.seq_len / dt
    peak = mfu_peak(device, dtype)
    return {
        "compile": use_compile, "loss": loss_mode, "moe_dense": moe_dense, "step_ms": dt * 1000, "tok_per_s": tok_per_s,
        "mfu": model.flops_per_token(cfg.seq_len) * tok_per_s / peak if peak else None,
        "mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def bench_loader(cfg: TrainConfig, device, data_dir: str | None, seconds: float = 3.0) -> float:
    """Batches/s of ShardLoader.next_batch including the copy to the device. Without --data-dir it reads
    shards of random words in a temporary folder (the loader's speed does not depend on the text)."""
    from fineweb_edu import build
    from gpt2.dataloader import ShardLoader

    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:  # ~8 batches of random words, in paragraphs of 100 words
            data_dir, rng = tmp, np.random.default_rng(0)
            words = np.array(["the", "model", "learns", "tokens", "fast", "GPU", "data", "never", "waits", "on"])
            paragraphs = [" ".join(rng.choice(words, 100)) for _ in range(cfg.batch_size * cfg.seq_len // 12)]
            with open(f"{tmp}/words.txt", "w") as f:
                f.write("\n\n".join(paragraphs))
            build(f"{tmp}/words.txt", tmp, shard_size=4 * cfg.batch_size * cfg.seq_len, txt_docs="paragraphs")
        loader = ShardLoader(data_dir, "train", cfg.batch_size, cfg.seq_len, device=device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            x, y = loader.next_batch()
            n += 1
        sync(device)
        return n / (time.perf_counter() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--compile", default="auto", choices=["auto", "0", "1", "both"],
                        help="auto: as the training loop (on for CUDA only)")
    parser.add_argument("--loss", default="auto", choices=["auto", "chunked", "full", "both"],
                        help="chunked: no full logits; full: logits + F.cross_entropy; auto: as the training loop "
                             "(full on CUDA, chunked elsewhere)")
    parser.add_argument("--moe", default="grouped", choices=["grouped", "dense", "both"],
                        help="with --moe-experts: each expert on its own tokens (the model's) or on every token "
                             "(MoE.dense_reference, the earlier evaluation)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--data-dir", help="time the loader on these shards (default: temporary random shards)")
    args, train_flags = parser.parse_known_args(argv)  # the rest are train_gpt2.py flags (--batch-size 64, --mlp relu2)
    cfg, _ = parse_config(["--preset", args.preset, *train_flags])
    if args.moe != "grouped" and not cfg.model.moe_experts:
        parser.error(f"--moe {args.moe} compares the experts' evaluations: add --moe-experts E (e.g. 8)")
    device = pick_device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    label = torch.cuda.get_device_name(device) if cuda else f"{device.type} ({torch.get_num_threads()} threads)"
    print(f"{args.preset}: n_layer {cfg.model.n_layer}, n_embd {cfg.model.n_embd}, B {cfg.batch_size}, "
          f"T {cfg.seq_len} | {label} | {dtype} | torch {torch.__version__}")
    compiles = {"auto": [cuda], "0": [False], "1": [True], "both": [False, True]}[args.compile]
    losses = {"auto": ["full" if cuda else "chunked"], "both": ["chunked", "full"]}.get(args.loss, [args.loss])
    moes = {"grouped": [False], "dense": [True], "both": [False, True]}[args.moe]
    for use_compile, loss_mode, moe_dense in itertools.product(compiles, losses, moes):
        r = bench_steps(cfg, device, dtype, use_compile, args.steps, args.warmup, loss_mode, moe_dense)
        moe = f" | moe {'dense' if moe_dense else 'grouped':7s}" if cfg.model.moe_experts else ""
        head = f"compile {int(use_compile)} | loss {loss_mode:7s}{moe}"
        print(f"{head}: {r['step_ms']:8.1f} ms/step | {r['tok_per_s']:>10,.0f} tok/s"
              + (f" | MFU {r['mfu']:.1%}" if r["mfu"] else "")
              + (f" | peak mem {r['mem_gb']:.2f} GiB" if r["mem_gb"] else ""))
    bps = bench_loader(cfg, device, args.data_dir)
    print(f"loader: {bps:,.0f} batches/s = {bps * cfg.batch_size * cfg.seq_len:,.0f} tok/s "
          f"(B {cfg.batch_size}, T {cfg.seq_len})")


if __name__ == "__main__":
    main()
