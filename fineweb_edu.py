"""Tokenize FineWeb-Edu (or local text) with the GPT-2 tokenizer into uint16 .npy shards for training.

    python fineweb_edu.py                              # FineWeb-Edu sample-10BT -> data/fineweb_edu (~10B tokens)
    python fineweb_edu.py --max-tokens 1_000_000_000   # streams only the first ~1B tokens' worth
    python fineweb_edu.py --source fineweb:sample-10BT --out data/fineweb
    python fineweb_edu.py --source input.txt --txt-docs paragraphs --shard-size 100000 --out data/shakespeare

Sources: `fineweb-edu[:CONFIG]` or `fineweb[:CONFIG]` (HuggingFaceFW/..., CONFIG defaults to sample-10BT),
streamed from the Hugging Face hub; or, offline, a .parquet or .jsonl file (a `text` field per row), a .txt
file (one document, or one per blank-line-separated paragraph with --txt-docs paragraphs), or a folder of
such files (read in sorted path order).

Layout: every document becomes <|endoftext|> followed by its tokens; the documents, in source order, are
cut into shards. Shard 0 is the val split: it takes whole documents until it holds --shard-size tokens, and
the document crossing that size goes into it whole, so val is a little over --shard-size and no document is
in both val and train. Train shards (1, 2, ...) hold exactly --shard-size tokens (the last one fewer); a
document may run on from one train shard into the next. --max-tokens caps the total (val can overshoot it by
the rest of one document).

Resuming: shards are written to a temp file and renamed into place, and manifest.json is rewritten
atomically after each one with where the next shard starts in the source (skip `resume_doc` documents, then
`resume_offset` tokens); it is marked complete at the end. Re-running the same command keeps the recorded
shards whose sha256 still matches and continues from the first missing or bad one, so the result is
byte-identical to an uninterrupted run (the source must not change in between). A changed --max-tokens keeps
the shards it leaves unchanged. A resume reads the source's documents before the resume point again, but does
not tokenize them.

Speed: batches of ~1 MB of documents are tokenized on --workers processes (default: all cores); a tqdm bar
shows tokens/s live and the rate is printed at the end. bench_tokenize.py compares it with a naive
one-document-per-task Pool.imap.
"""

import argparse
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import signal
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

from dataloader import MANIFEST, SPLITS, DataError, check_shard, load_manifest, sha256_file
from runtime import atomic_write

HUB_DATASETS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
DEFAULT_SOURCE = "fineweb-edu:sample-10BT"
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".txt")
TXT_DOCS = ("file", "paragraphs")
# settings that decide the shards' content; an --out folder built with other ones is refused
IDENTITY = ("source", "txt_docs", "tokenizer", "dtype", "shard_size")


@dataclass(frozen=True)
class Source:
    spec: str  # as recorded in the manifest: "fineweb-edu:sample-10BT" or an absolute path
    prefix: str  # shard file names start with it
    files: tuple[Path, ...]  # the local files in reading order; empty for the hub
    txt_docs: str = "file"

    def documents(self) -> Iterator[str]:
        if not self.files:
            yield from _hub_documents(*self.spec.split(":"))
            return
        for path in self.files:
            if path.suffix == ".parquet":
                yield from _parquet_documents(path)
            elif path.suffix == ".jsonl":
                yield from _jsonl_documents(path)
            else:
                text = path.read_bytes().decode("utf-8")  # bytes, not read_text: keep \r\n exactly as in the file
                yield from (p for p in text.split("\n\n") if p.strip()) if self.txt_docs == "paragraphs" else [text]


def resolve_source(spec: str, txt_docs: str = "file") -> Source:
    path = Path(spec)
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES))
        if not files:
            raise SystemExit(f"error: --source folder {spec} holds no {'/'.join(LOCAL_SUFFIXES)} files")
    elif path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise SystemExit(f"error: --source {spec}: can read only {'/'.join(LOCAL_SUFFIXES)} files")
        files = (path,)
    else:
        name, _, config = spec.partition(":")
        if name not in HUB_DATASETS:
            hub = ", ".join(n + "[:CONFIG]" for n in HUB_DATASETS)
            raise SystemExit(f"error: unknown --source {spec!r}: it is no existing file or folder, nor one of {hub} "
                             "(CONFIG e.g. sample-10BT, sample-100BT)")
        return Source(f"{name}:{config or 'sample-10BT'}", name.replace("-", "_"), (), txt_docs)
    return Source(str(path.resolve()), re.sub(r"\W+", "_", path.stem), files, txt_docs)


def _hub_documents(name: str, config: str) -> Iterator[str]:
    try:
        import datasets  # imported here only: the training machines need not have it
    except ImportError:
        raise SystemExit("error: streaming from the Hugging Face hub needs `pip install datasets`; "
                         "or pass --source a local .parquet/.jsonl/.txt file") from None
    try:
        ds = datasets.load_dataset(HUB_DATASETS[name], name=config, split="train", streaming=True)
    except Exception as e:  # noqa: BLE001 (no network, unknown config, ...: say which, without a traceback)
        raise SystemExit(f"error: cannot stream {HUB_DATASETS[name]} config {config!r}: {e}") from None
    for batch in ds.select_columns("text").iter(batch_size=1024):
        yield from batch["text"]


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq  # needed for parquet sources only

    file = pq.ParquetFile(path)
    if "text" not in file.schema_arrow.names:
        raise SystemExit(f"error: {path} has no 'text' column (it has {file.schema_arrow.names})")
    for batch in file.iter_batches(batch_size=1024, columns=["text"]):
        if batch.column(0).null_count:
            raise SystemExit(f"error: {path} has rows whose 'text' is null")
        yield from batch.column(0).to_pylist()


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                text = None
            if not isinstance(text, str):
                raise SystemExit(f'error: {path}:{lineno}: each line must be a JSON object with a string "text" field')
            yield text


def encode_batch(docs: list[str]) -> np.ndarray:
    """<|endoftext|> + the GPT-2 tokens of each document, all concatenated, as uint16."""
    enc = tiktoken.get_encoding("gpt2")  # tiktoken caches it: built once per process
    eot = np.array([enc.eot_token], dtype=np.uint32)
    parts = []
    for doc in docs:
        # disallowed_special=() encodes a literal "<|endoftext|>" in the text as plain text, like
        # encode_ordinary; encode_to_numpy skips building a Python list of ints
        parts += (eot, enc.encode_to_numpy(doc, disallowed_special=()))
    return np.concatenate(parts).astype(np.uint16)  # GPT-2's 50257 ids fit


def _batches(docs: Iterable[str], chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def worker_pool(workers: int):
    """A Pool of `workers` tokenizer processes to pass to tokenize_stream; None (in a with) for workers=1.

    Start it before anything starts threads (tqdm's monitor, the hub client): a fork copies other threads'
    locks, which can deadlock the child. Workers ignore Ctrl-C; the main process gets it and stops them.
    """
    if workers == 1:
        return nullcontext()
    return multiprocessing.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN))


def tokenize_stream(docs: Iterable[str], pool: multiprocessing.pool.Pool | None,
                    batch_chars: int = 1 << 20) -> Iterator[np.ndarray]:
    """encode_batch over consecutive batches of ~batch_chars characters of documents, in order.

    Each task is a whole batch, so the inter-process messaging is paid once per ~250k tokens instead of once
    per document. Without a pool it encodes in this process.
    """
    batches = _batches(docs, batch_chars)
    if pool is None:
        yield from map(encode_batch, batches)
        return
    # a few batches in flight per core, enough to keep the workers busy; Pool.imap would instead read the
    # whole source ahead into memory
    pending = deque()
    for batch in batches:
        pending.append(pool.apply_async(encode_batch, (batch,)))
        if len(pending) >= 2 * os.cpu_count():
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _shard_target(settings: dict, tokens_before: int) -> int:
    """How many tokens the next shard takes (val: at least this many); <= 0 once --max-tokens is reached."""
    if settings["max_tokens"] is None:
        return settings["shard_size"]
    return min(settings["shard_size"], settings["max_tokens"] - tokens_before)


def _shard_end(buf: list[np.ndarray], n: int, target: int, whole_docs: bool, eot: int) -> int | None:
    """Where the shard being collected in `buf` (n tokens) ends, or None while more tokens are needed."""
    if n < target:
        return None
    if not whole_docs:
        return target
    # val: run on to the end of the document that holds token target-1, i.e. to the next <|endoftext|>
    start = 0
    for chunk in buf:
        if start + len(chunk) > target:
            hits = np.flatnonzero(chunk[max(target - start, 0) :] == eot)
            if len(hits):
                return max(target, start) + int(hits[0])
        start += len(chunk)
    return None


def _write_atomic(path: Path, write) -> None:
    """write(f) into `path` atomically (readers see the old file or the new one, never half)."""
    with atomic_write(path) as f:
        write(f)


class _ShardWriter:
    """Writes the shards in order and keeps manifest.json up to date after each one."""

    def __init__(self, out: Path, prefix: str, settings: dict, shards: list[dict], eot: int):
        self.out, self.prefix, self.settings, self.shards, self.eot = out, prefix, settings, shards, eot
        self.tokens = sum(s["tokens"] for s in shards)

    def target(self) -> int:
        return _shard_target(self.settings, self.tokens)

    @property
    def split(self) -> str:
        return "train" if self.shards else "val"

    def resume_point(self) -> tuple[int, int]:
        """(documents to skip, tokens of the next document to skip) where the next shard starts."""
        return (self.shards[-1]["resume_doc"], self.shards[-1]["resume_offset"]) if self.shards else (0, 0)

    def write(self, tokens: np.ndarray) -> None:
        name = f"{self.prefix}_{self.split}_{len(self.shards):06d}.npy"
        _write_atomic(self.out / name, lambda f: np.save(f, tokens))
        starts = np.flatnonzero(tokens == self.eot)  # one <|endoftext|> per document start
        docs = sum(s["docs"] for s in self.shards) + len(starts)
        # the next shard starts inside or right after the last document begun (number docs - 1), this far into it
        offset = len(tokens) - int(starts[-1]) if len(starts) else self.resume_point()[1] + len(tokens)
        self.shards.append({"file": name, "split": self.split, "tokens": len(tokens), "docs": len(starts),
                            "sha256": sha256_file(self.out / name), "resume_doc": docs - 1, "resume_offset": offset})
        self.tokens += len(tokens)
        self.save(complete=False)

    def save(self, complete: bool) -> dict:
        totals = {split: {k: sum(s[k] for s in self.shards if s["split"] == split) for k in ("tokens", "docs")}
                  for split in SPLITS}
        manifest = {**self.settings, "complete": complete, "totals": totals, "shards": self.shards}
        _write_atomic(self.out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode() + b"\n"))
        return manifest


def _kept_shards(out: Path, old: dict | None, settings: dict) -> list[dict]:
    """The leading recorded shards that this run would write identically and that are intact on disk."""
    kept, before = [], 0
    for entry in old["shards"] if old else []:
        if _shard_target(old, before) != _shard_target(settings, before):
            break  # a different --max-tokens cuts this shard elsewhere
        try:
            check_shard(out, entry, old, verify=True)
        except DataError as e:
            print(f"rebuilding from {entry['file']}: {e}")
            break
        kept.append(entry)
        before += entry["tokens"]
    return kept


def _fill_shards(writer: _ShardWriter, src: Source, workers: int) -> int:
    """Tokenize the source from the writer's resume point into shards until it or --max-tokens runs out;
    returns the number of tokens tokenized."""
    if (target := writer.target()) <= 0:
        return 0
    skip_docs, skip_tokens = writer.resume_point()
    docs = islice(src.documents(), skip_docs, None)
    buf, n, new_tokens = [], 0, 0
    with worker_pool(workers) as pool, closing(tokenize_stream(docs, pool)) as chunks, \
         tqdm(total=writer.settings["max_tokens"], initial=writer.tokens, unit="tok", unit_scale=True,
              desc=f"{src.prefix} ({workers} workers)") as bar:
        for chunk in chunks:
            chunk, skip_tokens = chunk[skip_tokens:], 0  # a resume point can lie inside the first document
            buf.append(chunk)
            n += len(chunk)
            new_tokens += len(chunk)
            bar.update(len(chunk))
            while (cut := _shard_end(buf, n, target, writer.split == "val", writer.eot)) is not None:
                tokens = np.concatenate(buf)
                writer.write(tokens[:cut])
                buf, n = [tokens[cut:]], n - cut
                if (target := writer.target()) <= 0:
                    return new_tokens
        if n:  # the source ran out: what is left is the last shard
            writer.write(np.concatenate(buf))
    return new_tokens


def build(source: str = DEFAULT_SOURCE, out: str | Path = "data/fineweb_edu", shard_size: int = 100_000_000,
          max_tokens: int | None = None, workers: int | None = None, txt_docs: str = "file") -> dict:
    """Build, resume or extend the shards of `source` in `out`; returns the finished manifest."""
    if shard_size < 1 or (max_tokens is not None and max_tokens < 1) or (workers is not None and workers < 1):
        raise SystemExit("error: --shard-size, --max-tokens and --workers must be positive")
    if txt_docs not in TXT_DOCS:
        raise SystemExit(f"error: --txt-docs must be one of {TXT_DOCS}")
    src = resolve_source(source, txt_docs)
    workers = workers or os.cpu_count()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": src.spec, "txt_docs": txt_docs, "tokenizer": "gpt2", "dtype": "uint16",
                "shard_size": shard_size, "max_tokens": max_tokens}
    try:
        old = load_manifest(out)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    if old and old["shards"] and any(old[k] != settings[k] for k in IDENTITY):
        raise SystemExit(f"error: {out} holds shards of --source {old['source']} (--txt-docs {old['txt_docs']}) with "
                         f"--shard-size {old['shard_size']}, not of these settings: pass another --out, or delete "
                         f"{out} to rebuild it")
    shards = _kept_shards(out, old, settings)
    if old and old["complete"] and old["max_tokens"] == max_tokens and len(shards) == len(old["shards"]):
        print(f"{out} is complete and its {len(shards)} shards match their sha256; nothing to do")
        return old

    writer = _ShardWriter(out, src.prefix, settings, shards, tiktoken.get_encoding("gpt2").eot_token)
    if shards:
        print(f"keeping {len(shards)} shards ({writer.tokens:,} tokens) of the previous run")
    if old:
        writer.save(complete=False)  # forget recorded shards beyond the kept ones before overwriting any of them
    t0 = time.perf_counter()
    new_tokens = _fill_shards(writer, src, workers)
    seconds = time.perf_counter() - t0
    if not writer.shards:
        raise SystemExit(f"error: --source {source} holds no documents")
    manifest = writer.save(complete=True)
    keep = {s["file"] for s in writer.shards}
    for stale in [*out.glob(f"{src.prefix}_val_*.npy*"), *out.glob(f"{src.prefix}_train_*.npy*")]:
        if stale.name not in keep:  # shards past a lowered --max-tokens, temp files of a killed run
            stale.unlink()

    if new_tokens:
        rate = new_tokens / seconds
        print(f"tokenized {new_tokens:,} tokens in {seconds:.1f} s: {rate:,.0f} tokens/s with {workers} workers")
    for split, total in manifest["totals"].items():
        count = sum(s["split"] == split for s in writer.shards)
        print(f"{split}: {count} shards, {total['tokens']:,} tokens, {total['docs']:,} documents")
    if not manifest["totals"]["train"]["tokens"]:
        txt_hint = "; a single .txt file is one document unless split with --txt-docs paragraphs"
        print("warning: no train split, the val shard took every token: lower --shard-size or raise --max-tokens"
              + (txt_hint if txt_docs == "file" else ""))
    print(f"wrote {out / MANIFEST}")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=DEFAULT_SOURCE, help=f"dataset or local path (default {DEFAULT_SOURCE})")
    parser.add_argument("--out", default="data/fineweb_edu", help="output folder (default data/fineweb_edu)")
    parser.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard (default 100_000_000)")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    parser.add_argument("--txt-docs", choices=TXT_DOCS, default="file",
                        help="a .txt file is one document, or one per blank-line-separated paragraph (default file)")
    args = parser.parse_args()
    try:
        build(args.source, args.out, args.shard_size, args.max_tokens, args.workers, args.txt_docs)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: run the same command again to resume") from None


if __name__ == "__main__":
    main()
