"""Tokenizer throughput: fineweb_edu.py's batched pipeline vs a naive one-document-per-task Pool.imap.

    python -m tools.bench_tokenize --source ../shared/data/tinyshakespeare/input.txt

Input: the source's documents, repeated until they hold about --tokens GPT-2 tokens. A single .txt file is cut
at paragraph boundaries into documents of about --doc-chars characters (default 4,000: FineWeb-Edu documents
average roughly 1,000 tokens), since one huge document, or thousands of 50-token paragraphs, would not
measure what FineWeb-Edu costs per document. Timed on the same documents with the same worker count:

  naive     Pool.imap(tokenize one document) with one document per task, each returned as a uint16 array
  batched   fineweb_edu.tokenize_stream: ~1 MB of documents per task, encoded straight to numpy
  build     fineweb_edu.build end to end: the documents written to a .jsonl first (untimed), then read back,
            tokenized, cut into 10M-token shards, written and hashed

naive and batched must give identical tokens (checked).
"""

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from itertools import cycle
from pathlib import Path

import numpy as np
import tiktoken

import fineweb_edu


def naive_encode(doc: str) -> np.ndarray:
    enc = tiktoken.get_encoding("gpt2")
    return np.array([enc.eot_token] + enc.encode_ordinary(doc), dtype=np.uint16)


def naive(docs: list[str], workers: int) -> list[np.ndarray]:
    with multiprocessing.Pool(workers) as pool:
        return list(pool.imap(naive_encode, docs))  # chunksize=1: one document per task


def batched(docs: list[str], workers: int) -> list[np.ndarray]:
    with fineweb_edu.worker_pool(workers) as pool:
        return list(fineweb_edu.tokenize_stream(docs, pool))


def paragraph_documents(text: str, doc_chars: int) -> list[str]:
    """Consecutive paragraphs joined into documents of at least doc_chars characters (the last one shorter)."""
    docs, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph)
        if size >= doc_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def load_documents(source: str, tokens: int, doc_chars: int) -> list[str]:
    """Documents of `source`, repeated, holding about `tokens` tokens (estimated from a 1 MB sample)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        docs = iter(paragraph_documents(path.read_bytes().decode("utf-8"), doc_chars))
    else:
        docs = fineweb_edu.resolve_source(source).documents()
    enc = tiktoken.get_encoding("gpt2")
    sample, chars = [], 0
    while chars < tokens * 6 and (doc := next(docs, None)) is not None:  # GPT-2 tokens are < 6 chars on average
        sample.append(doc)
        chars += len(doc)
    head = "".join(sample)[: 1 << 20]
    need_chars = tokens * len(head) / len(enc.encode_ordinary(head))
    out, chars = [], 0
    for doc in cycle(sample):
        if chars >= need_chars:
            return out
        out.append(doc)
        chars += len(doc)


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a .txt/.jsonl/.parquet file or a folder of them")
    parser.add_argument("--tokens", type=int, default=30_000_000, help="about this many tokens (default 30M)")
    parser.add_argument("--doc-chars", type=int, default=4000, help="document size for a single .txt (default 4000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes for both (default: all cores)")
    parser.add_argument("--skip-build", action="store_true", help="leave out the end-to-end build")
    args = parser.parse_args()

    docs = load_documents(args.source, args.tokens, args.doc_chars)
    chars = sum(map(len, docs))
    print(f"{len(docs):,} documents, {chars / 1e6:.1f}M characters, {args.workers} workers, {os.cpu_count()} cores")
    naive_s, naive_out = timed(naive, docs, args.workers)
    batched_s, batched_out = timed(batched, docs, args.workers)
    tokens = np.concatenate(naive_out)
    assert np.array_equal(tokens, np.concatenate(batched_out)), "naive and batched tokens differ"
    rows = [("naive", naive_s), ("batched", batched_s)]
    del naive_out, batched_out
    if not args.skip_build:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "docs.jsonl"
            source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
            build_s, manifest = timed(fineweb_edu.build, str(source), Path(tmp) / "out", 10_000_000, None, args.workers)
            assert sum(t["tokens"] for t in manifest["totals"].values()) == len(tokens)
        rows.append(("build", build_s))
    print(f"\n{len(tokens):,} tokens ({len(tokens) / len(docs):,.0f} per document)")
    for name, seconds in rows:
        rate = len(tokens) / seconds
        print(f"{name:8s} {seconds:7.2f} s {rate / 1e6:7.2f} M tokens/s {rate / args.workers / 1e6:6.2f} M/s per "
              f"worker {naive_s / seconds:5.2f}x naive")


if __name__ == "__main__":
    main()
