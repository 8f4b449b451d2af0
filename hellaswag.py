"""HellaSwag evaluation of a GPT-2 style model, completion style.

Each example is a context and 4 candidate endings. Every ending is scored by the cross-entropy of its tokens
given the context, tokenized as GPT-2 sees it: tokens(context) + tokens(" " + ending). acc picks the ending
with the lowest summed loss, acc_norm the one with the lowest mean loss per token (this is the rule behind
the usual GPT-2 124M reference: acc 0.2859, acc_norm 0.2955 on the 10,042 validation examples).

Scoring is batched: the endings of many examples go through one forward pass, padded to a few fixed
lengths. Under DDP each rank scores every world_size-th example and the counts are summed over ranks.
Scoring runs eagerly, even on the training loop's compiled model (see score_endings).

    python hellaswag.py --model gpt2                          # OpenAI weights (HF name or local HF directory)
    python hellaswag.py --checkpoint logs/<run>/ckpt_<step>.pt   # a checkpoint of train_gpt2.py
    torchrun --nproc_per_node 8 hellaswag.py --model gpt2 --dtype bfloat16
"""

import functools
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import tiktoken
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from gpt2.dataloader import gpt2_tokenizer
from gpt2.hf_io import from_pretrained
from gpt2.runs import load_model
from gpt2.runtime import OneLineParser, atomic_write, autocast, autocast_dtype, setup_distributed, teardown_distributed

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("train", "val", "test")
N_ENDINGS = 4
# Padded sequence lengths are multiples of this (HellaSwag needs at most 3 of them with GPT-2 tokens), and
# the number of rows per forward depends only on the padded length: the forwards have a few shapes.
PAD_MULTIPLE = 64
# Tokens per forward pass (rows x padded length) when the caller does not say. On an H100, GPT-2 124M in
# bf16 scored as fast with 16k as with 32k or 64k (peak 3.9 GiB against 7 and 13: the logits dominate);
# on CPU larger batches gain nothing and their (tokens, vocab) fp32 logits cost 200 KB per token.
DEFAULT_TOKENS_PER_BATCH = {"cuda": 16384, "mps": 8192, "cpu": 2048}


# ---------------------------------------------------------------------- data


def default_cache_dir() -> Path:
    return Path(os.environ.get("HELLASWAG_CACHE_DIR") or Path.home() / ".cache" / "gpt2" / "hellaswag")


def download(split: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the split's jsonl in the cache folder, downloaded first if it is not there yet."""
    path = Path(cache_dir or default_cache_dir()) / f"hellaswag_{split}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    url = URL.format(split=split)
    # atomic: DDP ranks may download at the same time (a temp file each), and an interrupted download never
    # leaves a truncated file that would later be taken for the real one
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_write(path) as f:
            shutil.copyfileobj(response, f)
    except OSError as e:  # urllib's URLError/HTTPError are OSErrors too
        raise RuntimeError(
            f"could not download HellaSwag {split} from {url} ({e}); "
            f"without internet, pass a local copy instead: --data path/to/hellaswag_{split}.jsonl"
        ) from e
    return path


def load_examples(source: str = "val", cache_dir: str | None = None, limit: int | None = None) -> list[dict]:
    """The rows of a HellaSwag jsonl, in file order. source is a split name ('train', 'val', 'test'),
    downloaded into cache_dir, or the path of a local jsonl (read as is: copies of the data differ byte-wise,
    so no checksum is enforced). Scoring uses the keys ctx, endings and label: a file without labels (the test
    split) or without examples is refused here."""
    path = download(source, cache_dir) if source in SPLITS else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{source!r} is neither a HellaSwag split ({', '.join(SPLITS)}) nor a file")
    examples = []
    with open(path, "rb") as f:  # bytes: json.loads names the line of a non-UTF-8 file (UnicodeDecodeError)
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if line.strip():
                examples.append(_parse_example(line, f"{path}:{lineno}"))
    if not examples:  # else the first evaluation fails, after the model is loaded or a run has started
        raise ValueError(f"{path} holds no HellaSwag examples (an empty file?): delete it to download it again")
    return examples


def _parse_example(line: bytes, where: str) -> dict:
    """One jsonl line as an example that evaluate() can score, or a ValueError naming the file and line (a cut
    download, another dataset, the test split without labels) before any model is loaded or run started."""
    try:
        example = json.loads(line)
    except ValueError as e:
        what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "not a JSON object"
        raise ValueError(f"{where}: {what} (a partial or corrupt file? delete it to download it again)") from None
    ok = isinstance(example, dict) and isinstance(example.get("ctx"), str) and isinstance(example.get("endings"), list)
    if not ok or not isinstance(example.get("label", 0), int):
        raise ValueError(f"{where}: a HellaSwag example needs a string 'ctx', a list 'endings' and an int 'label'")
    if "label" not in example:
        raise ValueError(f"{where}: no 'label' to score against (the test split hides them): use val or train")
    if len(example["endings"]) != N_ENDINGS or not example["ctx"]:
        raise ValueError(f"{where}: a HellaSwag example needs {N_ENDINGS} endings and a non-empty 'ctx'")
    return example


# ---------------------------------------------------------------------- tokenization


@functools.cache
def _tokenizer() -> tiktoken.Encoding:
    return gpt2_tokenizer()


@functools.lru_cache(maxsize=1 << 16)  # repeated evaluations during training tokenize only once
def _encode(ctx: str, endings: tuple[str, ...]) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    enc = _tokenizer()
    return tuple(enc.encode_ordinary(ctx)), tuple(tuple(enc.encode_ordinary(" " + e)) for e in endings)


def example_rows(example: dict, block_size: int | None) -> list[tuple[tuple[int, ...], int]]:
    """The example's 4 rows as (context + ending tokens, number of ending tokens). A row longer than
    block_size + 1 tokens (the model reads all but the last) loses context tokens from the left; the ending
    is always scored whole, after at least one context token."""
    if len(example["endings"]) != N_ENDINGS:
        raise ValueError(f"HellaSwag example {example.get('ind')} has {len(example['endings'])} endings, "
                         f"not {N_ENDINGS}")
    ctx, endings = _encode(example["ctx"], tuple(example["endings"]))
    if not ctx:
        raise ValueError(f"HellaSwag example {example.get('ind')} has an empty context")
    rows = []
    for ending in endings:
        if block_size is not None and len(ending) > block_size:
            raise ValueError(f"an ending of {len(ending)} tokens does not fit block_size {block_size}")
        tokens = ctx + ending
        rows.append((tokens if block_size is None else tokens[-(block_size + 1) :], len(ending)))
    return rows


# ---------------------------------------------------------------------- scoring


def score_endings(model, examples: list[dict], device, *, dtype: torch.dtype = torch.float32,
                  tokens_per_batch: int | None = None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean cross-entropy of each ending's tokens: two (len(examples), 4) float32 CPU tensors,
    in the order of examples. model is a GPT (or a compiled one, whose hidden() and logits() run the
    uncompiled code: eager is as fast here on an H100 and saves a compile); the forward runs under autocast
    to dtype (float32: no autocast), the losses are taken in fp32. score_one_by_one is the plain definition.
    progress: a tqdm bar of the examples scored (on stderr)."""
    device = torch.device(device)
    # a GPT, or a compiled one (which forwards attribute access), has a block size to respect
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    budget = tokens_per_batch or DEFAULT_TOKENS_PER_BATCH.get(device.type, 4096)
    rows = [example_rows(ex, block_size) for ex in examples]
    # per ending (flat index example * 4 + ending): row length in tokens, and how many of them are the ending
    lengths = torch.tensor([len(tokens) for r in rows for tokens, _ in r], dtype=torch.long)
    n_scored = torch.tensor([n for r in rows for _, n in r], dtype=torch.long)
    input_len = (lengths.view(-1, N_ENDINGS).amax(1) - 1).tolist()
    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows at once.
    order = sorted(range(len(examples)), key=lambda i: -input_len[i])
    sums = torch.zeros(len(examples) * N_ENDINGS, device=device)  # accumulated on device: no sync per batch
    bar = tqdm(total=len(examples), desc="hellaswag", unit="ex", disable=not progress, leave=False)

    start = 0
    with torch.no_grad(), autocast(device, dtype):
        while start < len(order):
            T = -(-input_len[order[start]] // PAD_MULTIPLE) * PAD_MULTIPLE
            T = T if block_size is None else min(T, block_size)
            # Rows depend only on T (and, for small sets, on their size), so shapes repeat across batches and
            # calls; the last batch of a length is filled up with rows of zeros, scored for nothing.
            n_rows = max(N_ENDINGS, min(budget // T, N_ENDINGS * len(order)) // N_ENDINGS * N_ENDINGS)
            batch = order[start : start + n_rows // N_ENDINGS]
            ids = (torch.tensor(batch)[:, None] * N_ENDINGS + torch.arange(N_ENDINGS)).flatten()
            length, n = lengths[ids], n_scored[ids]
            # all rows' tokens left-aligned in a (rows, T + 1) grid: inputs are its first T columns, targets
            # its last T (a row's final token also lands among the inputs, as padding nobody looks at)
            grid = torch.zeros(n_rows, T + 1, dtype=torch.long)
            t = torch.arange(T + 1)
            grid[: len(ids)][t < length[:, None]] = torch.tensor([tok for i in batch for r in rows[i] for tok in r[0]])
            # input positions whose next token belongs to the ending; right padding is harmless since causal
            # attention keeps it out of every earlier position
            scored = (t[:T] >= (length - 1 - n)[:, None]) & (t[:T] < (length - 1)[:, None])
            positions = scored.flatten().nonzero().squeeze(1)
            targets = grid[: len(ids), 1:].flatten()[positions]
            idx = _to(device, grid[:, :T].contiguous())
            select = _to(device, torch.stack([positions, targets, ids.repeat_interleave(n)]))
            # The LM head runs on the ending positions only: on a small model the vocab-sized projection of
            # every context and padding position would cost more than the whole transformer.
            hidden = model.hidden(idx).flatten(0, 1)[select[0]]
            logits = model.logits(hidden).float()
            sums.index_add_(0, select[2], F.cross_entropy(logits, select[1], reduction="none"))
            start += len(batch)
            bar.update(len(batch))
    bar.close()
    sums = sums.cpu()
    return sums.view(-1, N_ENDINGS), (sums / n_scored).view(-1, N_ENDINGS)


@torch.no_grad()
def score_one_by_one(model, examples: list[dict], device, *, dtype: torch.dtype = torch.float32):
    """What score_endings computes, the plain way: one forward per example over its 4 rows (padded to their own
    longest), the full logits, each row's cross-entropy masked to its ending. Slow; the baseline of
    bench_hellaswag.py and a second code path for the tests."""
    device = torch.device(device)
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    sums, counts = torch.zeros(len(examples), N_ENDINGS, device=device), torch.zeros(len(examples), N_ENDINGS)
    for i, example in enumerate(examples):
        rows = example_rows(example, block_size)
        T = max(len(tokens) for tokens, _ in rows) - 1
        idx, targets = torch.zeros(N_ENDINGS, T, dtype=torch.long), torch.zeros(N_ENDINGS, T, dtype=torch.long)
        mask = torch.zeros(N_ENDINGS, T)
        for r, (tokens, n) in enumerate(rows):
            idx[r, : len(tokens) - 1] = torch.tensor(tokens[:-1])
            targets[r, : len(tokens) - 1] = torch.tensor(tokens[1:])
            mask[r, len(tokens) - 1 - n : len(tokens) - 1] = 1  # the positions that predict an ending token
            counts[i, r] = n
        with autocast(device, dtype):
            logits = model(idx.to(device))[0]
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten(), reduction="none")
        sums[i] = (losses.view(N_ENDINGS, T) * mask.to(device)).sum(1)
    sums = sums.cpu()
    return sums, sums / counts


def _to(device: torch.device, t: torch.Tensor) -> torch.Tensor:
    # From pinned memory the copy queues behind the GPU's work instead of waiting for it, so the next
    # batch is prepared while this one runs.
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def evaluate(model, examples: list[dict], device, *, rank: int = 0, world_size: int = 1,
             dtype: torch.dtype = torch.float32, tokens_per_batch: int | None = None, progress: bool = False) -> dict:
    """acc, acc_norm and count over all examples, and examples/s. Rank r scores examples[r::world_size];
    with torch.distributed initialized and world_size > 1, every rank must call this and all get the same
    result. progress: rank 0 shows a tqdm bar of its share."""
    t0 = time.perf_counter()
    shard = examples[rank::world_size]
    if any("label" not in ex for ex in shard):
        raise ValueError("HellaSwag examples without a label cannot be scored (the test split's labels are hidden)")
    sums, means = score_endings(model, shard, device, dtype=dtype, tokens_per_batch=tokens_per_batch,
                                progress=progress and rank == 0)
    labels = torch.tensor([int(ex["label"]) for ex in shard], dtype=torch.long)
    counts = torch.tensor(
        [(sums.argmin(1) == labels).sum(), (means.argmin(1) == labels).sum(), len(shard)], dtype=torch.float64
    )
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    if distributed:
        counts = counts.to(device)
        dist.all_reduce(counts)
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=counts.device)
    if distributed:  # the slowest rank's time, so that every rank reports the same numbers
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    correct, correct_norm, count = counts.tolist()
    if count == 0:
        raise ValueError("no HellaSwag examples to evaluate")
    return {"acc": correct / count, "acc_norm": correct_norm / count, "count": int(count),
            "examples_per_s": count / elapsed.item()}


# ---------------------------------------------------------------------- command line


def main(argv: list[str] | None = None):
    p = OneLineParser(description="HellaSwag accuracy of a GPT-2 model (completion style)")
    weights = p.add_mutually_exclusive_group(required=True)
    weights.add_argument("--model", help="HF GPT-2 name (gpt2, gpt2-medium, ...) or a local HF model directory")
    weights.add_argument("--checkpoint", help="a checkpoint saved by train_gpt2.py")
    p.add_argument("--data", default="val", help="split to download (train, val, test) or a local jsonl (default val)")
    p.add_argument("--cache-dir", help="download folder (default $HELLASWAG_CACHE_DIR or ~/.cache/gpt2/hellaswag)")
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), or a torch device")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="autocast dtype of the forward")
    p.add_argument("--tokens-per-batch", type=int, help="tokens per forward pass (default by device type)")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1, got {args.limit}")
    try:  # first, so that missing data is reported before any model is loaded
        examples = load_examples(args.data, args.cache_dir, args.limit)
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")

    d = setup_distributed(args.device)  # under torchrun: one process per device, examples split across ranks
    try:
        model = from_pretrained(args.model) if args.model else load_model(args.checkpoint)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    model = model.to(d.device).eval()
    result = evaluate(model, examples, d.device, rank=d.rank, world_size=d.world_size,
                      dtype=autocast_dtype(args.dtype, d.device), tokens_per_batch=args.tokens_per_batch,
                      progress=True)
    if d.master:
        print(f"hellaswag {args.data}: acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} "
              f"count {result['count']} examples/s {result['examples_per_s']:.1f}")
    teardown_distributed()


if __name__ == "__main__":
    main()
