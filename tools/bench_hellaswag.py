"""Examples/s of the batched HellaSwag evaluation against the plain loop of one example per forward pass.
Random-init weights: the speed does not depend on them (and the two must agree on every prediction).

    uv run python -m tools.bench_hellaswag --data ../shared/data/hellaswag/hellaswag_val.jsonl --limit 200
    python -m tools.bench_hellaswag --data ../shared/data/hellaswag/hellaswag_val.jsonl --config 124m \\
        --device cuda --dtype bfloat16 --compile --limit 0 --baseline-limit 500
"""

import argparse
import datetime
import platform
import time

import torch

import hellaswag
from gpt2.runtime import autocast_dtype
from model import GPT, GPTConfig
from tools.bench import sync

CONFIGS = {"small": dict(n_layer=4, n_head=4, n_embd=256), "124m": dict(n_layer=12, n_head=12, n_embd=768)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="val", help="split name or local jsonl, as in hellaswag.py")
    p.add_argument("--limit", type=int, default=200, help="examples for the batched run (0: all)")
    p.add_argument("--baseline-limit", type=int, help="examples for the baseline (default: --limit; 0: skip it)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tokens-per-batch", type=int, help="default: hellaswag's per-device default")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = autocast_dtype(args.dtype, device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_multiple=128, **CONFIGS[args.config])).to(device).eval()
    fwd = torch.compile(model) if args.compile else model
    examples = hellaswag.load_examples(args.data, limit=args.limit or None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{datetime.date.today()} {name} torch {torch.__version__} | {args.config} "
          f"({model.num_params() / 1e6:.1f}M params) {args.dtype} compile={args.compile} "
          f"tokens/batch={args.tokens_per_batch or hellaswag.DEFAULT_TOKENS_PER_BATCH.get(device.type)} "
          f"threads={torch.get_num_threads()}")

    # the first run pays for tokenization (then cached); the second is the steady state
    for run in ("cold", "warm"):
        result = hellaswag.evaluate(fwd, examples, device, dtype=dtype, tokens_per_batch=args.tokens_per_batch)
        print(f"batched {run}: {result['examples_per_s']:.1f} examples/s ({result['count']} examples)")

    n = len(examples) if args.baseline_limit is None else args.baseline_limit
    if n:
        hellaswag.score_one_by_one(fwd, examples[:2], device, dtype=dtype)  # warm-up (and compile)
        sync(device)
        t0 = time.perf_counter()
        plain = hellaswag.score_one_by_one(fwd, examples[:n], device, dtype=dtype)
        sync(device)
        baseline = n / (time.perf_counter() - t0)
        batched = hellaswag.score_endings(fwd, examples[:n], device, dtype=dtype,
                                          tokens_per_batch=args.tokens_per_batch)
        # the prediction of each rule (lowest summed loss, lowest mean loss) per example
        agree = torch.stack([a.argmin(1) == b.argmin(1) for a, b in zip(plain, batched)], 1).all(1)
        agree = agree.float().mean().item()
        print(f"one example per forward: {baseline:.1f} examples/s ({n} examples); "
              f"batched is {result['examples_per_s'] / baseline:.2f}x; predictions agree on {agree:.1%}")


if __name__ == "__main__":
    main()
