"""Tokenize FineWeb-Edu (or local text) with the GPT-2 tokenizer into uint16 .npy shards for training.

    python fineweb_edu.py                              # FineWeb-Edu sample-10BT -> data/fineweb_edu (~10B tokens)
    python fineweb_edu.py --max-tokens 1_000_000_000   # streams only the first ~1B tokens' worth
    python fineweb_edu.py --source fineweb:sample-10BT --out data/fineweb
    python fineweb_edu.py --source input.txt --txt-docs paragraphs --shard-size 100000 --out data/shakespeare

Sources: `fineweb-edu[:CONFIG]` or `fineweb[:CONFIG]` (HuggingFaceFW/..., CONFIG defaults to sample-10BT)
from the Hugging Face hub; or, offline, a .parquet or .jsonl file (a `text` field per row), a .txt file (one
document, or one per blank-line-separated paragraph with --txt-docs paragraphs), or a folder of such files
(read in sorted path order).

Hub downloads: a full build downloads the config's parquet files (in path order, the order `datasets`
streams them in) --downloads at a time into OUT/download, each retried with back-off and resumed where the
connection broke, checked against the size and sha256 the hub lists, and tokenized in file order as they
arrive; a file is deleted once the shards hold all its documents. With --max-tokens the documents are
streamed through `datasets` instead, without downloading whole files. HF_ENDPOINT picks a hub mirror.

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
byte-identical to an uninterrupted run (the source must not change in between). A raised --max-tokens keeps
the shards it leaves unchanged; one lowered below the tokens already built is refused, so no built token is
ever lost. A resume of a local or streamed source reads the documents before the resume
point again, but does not tokenize them; a hub download resume skips the parquet files before it unread (the
manifest records the files, and the rows of each) and keeps the files already downloaded.

Speed: batches of ~1 MB of documents are tokenized on --workers processes (default: all cores); a tqdm bar
shows tokens/s live and the rate is printed at the end. `python -m tools.bench_tokenize` compares it with a naive
one-document-per-task Pool.imap.
"""

import argparse
import http.client
import json
import multiprocessing
import multiprocessing.pool
import os
import re
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import tiktoken
from tqdm import tqdm

from gpt2.dataloader import (
    MANIFEST,
    OFFLINE_HINT,
    SPLITS,
    DataError,
    check_shard,
    gpt2_tokenizer,
    load_manifest,
    sha256_file,
)
from gpt2.runtime import DiskFullError, OneLineParser, atomic_write

HUB_DATASETS = {"fineweb-edu": "HuggingFaceFW/fineweb-edu", "fineweb": "HuggingFaceFW/fineweb"}
DEFAULT_SOURCE = "fineweb-edu:sample-10BT"
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".txt")
TXT_DOCS = ("file", "paragraphs")
# settings that decide the shards' content; an --out folder built with other ones is refused
IDENTITY = ("source", "txt_docs", "tokenizer", "dtype", "shard_size")
DOWNLOAD_DIR = "download"  # under --out: hub parquet files on their way to the tokenizer
DOWNLOAD_ATTEMPTS = 5
RETRY_SECONDS = 2.0  # back-off before the first retry of a download; doubles after each further failure


@dataclass(frozen=True)
class Source:
    spec: str  # as recorded in the manifest: "fineweb-edu:sample-10BT" or an absolute path
    prefix: str  # shard file names start with it
    files: tuple[Path, ...]  # the local files in reading order; empty for the hub
    txt_docs: str = "file"

    def documents(self, skip: int = 0) -> Iterator[str]:
        """The documents in order, from document number `skip` on."""
        yield from islice(self._all_documents(), skip, None)

    def _all_documents(self) -> Iterator[str]:
        if not self.files:
            yield from _hub_documents(*self.spec.split(":"))
            return
        for path in self.files:
            if path.suffix == ".parquet":
                yield from _parquet_documents(path)
            elif path.suffix == ".jsonl":
                yield from _jsonl_documents(path)
            else:
                try:  # bytes, not read_text: keep \r\n exactly as in the file
                    text = path.read_bytes().decode("utf-8")
                except UnicodeDecodeError as e:
                    raise SystemExit(_not_utf8(path, e)) from None
                docs = text.split("\n\n") if self.txt_docs == "paragraphs" else [text]
                yield from (d for d in docs if d.strip())  # a blank file or paragraph is no document


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
        raise SystemExit(f"error: cannot stream {HUB_DATASETS[name]} config {config!r}: {e}; {OFFLINE_HINT}") from None
    for batch in ds.select_columns("text").iter(batch_size=1024):
        yield from batch["text"]


def _parquet_documents(path: Path, skip: int = 0) -> Iterator[str]:
    """The `text` of each row, from row `skip` on; the row groups before it are not read."""
    import pyarrow.parquet as pq  # needed for parquet sources only

    try:
        file = pq.ParquetFile(path)
        if "text" not in file.schema_arrow.names:
            raise SystemExit(f"error: {path} has no 'text' column (it has {file.schema_arrow.names})")
        groups = []
        for i in range(file.num_row_groups):
            rows = file.metadata.row_group(i).num_rows
            if skip >= rows and not groups:
                skip -= rows
            else:
                groups.append(i)
        for batch in file.iter_batches(batch_size=1024, row_groups=groups, columns=["text"]):
            if batch.column(0).null_count:
                raise SystemExit(f"error: {path} has rows whose 'text' is null")
            texts = batch.column(0).to_pylist()
            yield from texts[skip:]
            skip = max(skip - len(texts), 0)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError: an empty, cut or damaged file
        raise SystemExit(f"error: {path} is not a readable parquet file ({e}): copy or download it again") from None


def hub_folder(config: str) -> str:
    """Where a config's parquet files lie in the FineWeb(-Edu) repo, as its dataset card declares."""
    if config == "default":
        return "data"
    if sample := re.fullmatch(r"sample-(\d+BT)", config):
        return f"sample/{sample[1]}"
    return f"data/{config}"  # a single crawl, e.g. CC-MAIN-2024-10


def list_hub_files(name: str, config: str, endpoint: str | None = None) -> list[dict]:
    """The config's parquet files in path order: {"path", "size", "sha256" (None if the hub gives none), "rows"}."""
    try:
        from huggingface_hub import HfApi, RepoFile  # comes with datasets; the training machines need neither
    except ImportError:
        raise SystemExit("error: downloading from the Hugging Face hub needs `pip install huggingface_hub`; "
                         "or pass --source a local .parquet/.jsonl/.txt file") from None
    repo, folder = HUB_DATASETS[name], hub_folder(config)
    try:
        tree = list(HfApi(endpoint=endpoint).list_repo_tree(repo, folder, recursive=True, repo_type="dataset"))
    except Exception as e:  # noqa: BLE001 (no network, unknown config, ...: say which, without a traceback)
        raise SystemExit(f"error: cannot list {folder}/ of {repo} on the hub (config {config!r}): {e}; "
                         f"{OFFLINE_HINT}") from None
    files = sorted((f for f in tree if isinstance(f, RepoFile) and f.path.endswith(".parquet")), key=lambda f: f.path)
    if not files:
        raise SystemExit(f"error: {repo} has no parquet files under {folder}/: is {config!r} one of its configs?")
    return [{"path": f.path, "size": f.size, "sha256": f.lfs.sha256 if f.lfs else None, "rows": None} for f in files]


class _Cancelled(Exception):
    """The build stopped while this download was running."""


def _fetch(url: str, f, size: int, stop: threading.Event) -> None:
    """Append the rest of url's `size` bytes to f, from f.tell() on (an HTTP Range request after a break)."""
    done = f.tell()
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        if done and response.status != 206:  # the server ignored the range and sends the whole file
            f.seek(0)
            f.truncate()
        while block := response.read(1 << 20):
            if stop.is_set():
                raise _Cancelled
            f.write(block)
    if f.tell() != size:  # a dropped connection can end the body early without an error
        raise ConnectionError(f"the connection ended after {f.tell():,} of {size:,} bytes")


def download(url: str, dest: Path, size: int, sha256: str | None, stop: threading.Event | None = None) -> Path:
    """url into dest (atomically), retried with back-off where it broke off; a dest that is already
    complete (size, and sha256 if given) is kept without any request."""
    if dest.is_file() and dest.stat().st_size == size and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest) as f:
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                _fetch(url, f, size, stop or threading.Event())
                break
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:  # not found, forbidden, ...: trying again will not help
                    raise SystemExit(f"error: downloading {url}: {e}") from None
                failure = e
            except (OSError, http.client.HTTPException) as e:
                failure = e
            if attempt == DOWNLOAD_ATTEMPTS:
                raise SystemExit(f"error: downloading {url} failed {attempt} times ({failure}); run the same "
                                 "command again to resume")
            delay = RETRY_SECONDS * 2 ** (attempt - 1)
            tqdm.write(f"{dest.name}: {failure}; retry {attempt} of {DOWNLOAD_ATTEMPTS - 1} in {delay:.0f} s")
            time.sleep(delay)
        f.flush()
        if sha256 is not None and sha256_file(f.name) != sha256:
            raise SystemExit(f"error: {url} does not match the sha256 the hub lists for it: the file changed on "
                             "the hub since this build began; delete the --out folder to rebuild")
    return dest


class HubFiles:
    """The parquet files of a hub config: downloaded `parallel` at a time ahead of the tokenizer into `folder`,
    read in order, deleted once the shards hold every document of theirs.

    `files` (list_hub_files' entries) is recorded in the manifest; each entry's "rows" is filled in when the file is
    first read, so that a resume can find the file and row a document number lies in without the earlier files.
    """

    def __init__(self, name: str, files: list[dict], folder: Path, endpoint: str | None = None, parallel: int = 4):
        self.repo, self.files, self.folder = HUB_DATASETS[name], files, folder
        self.endpoint, self.parallel = endpoint, parallel

    def _get(self, entry: dict, stop: threading.Event) -> Path:
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.repo, entry["path"], repo_type="dataset", endpoint=self.endpoint)
        t0 = time.perf_counter()
        path = download(url, self.folder / entry["path"], entry["size"], entry["sha256"], stop)
        tqdm.write(f"{entry['path']} ready ({entry['size'] / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
        return path

    def documents(self, skip: int = 0) -> Iterator[str]:
        """The documents in order from document number `skip` on; files wholly before it with known rows are
        neither downloaded nor read."""
        import pyarrow.parquet as pq

        start, before = 0, 0
        while start < len(self.files) and (rows := self.files[start]["rows"]) is not None and before + rows <= skip:
            start, before = start + 1, before + rows
        for tmp in self.folder.rglob("*.tmp"):  # a killed run's partial downloads
            tmp.unlink()
        stop, pending, queue = threading.Event(), deque(), iter(self.files[start:])
        pool = ThreadPoolExecutor(self.parallel, thread_name_prefix="download")
        try:
            for entry in islice(queue, self.parallel):
                pending.append(pool.submit(self._get, entry, stop))
            for entry in self.files[start:]:
                path = pending.popleft().result()
                if (ahead := next(queue, None)) is not None:  # one in, one out: at most `parallel` files ahead
                    pending.append(pool.submit(self._get, ahead, stop))
                entry["rows"] = pq.ParquetFile(path).metadata.num_rows
                if before + entry["rows"] > skip:
                    yield from _parquet_documents(path, max(skip - before, 0))
                before += entry["rows"]
        finally:
            stop.set()  # running downloads give up at their next block; their partial files are removed
            pool.shutdown(wait=True, cancel_futures=True)

    def release(self, doc: int) -> None:
        """Delete the downloaded files whose documents all come before document number `doc`."""
        end = 0
        for entry in self.files:
            if entry["rows"] is None or (end := end + entry["rows"]) > doc:
                return
            (self.folder / entry["path"]).unlink(missing_ok=True)


def _not_utf8(path: Path, e: UnicodeDecodeError) -> str:
    return (f"error: {path} is not UTF-8 text ({e.reason}): convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`")


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        try:
            yield from _jsonl_lines(path, f)
        except UnicodeDecodeError as e:
            raise SystemExit(_not_utf8(path, e)) from None


def _jsonl_lines(path: Path, f) -> Iterator[str]:
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

    def __init__(self, out: Path, prefix: str, settings: dict, shards: list[dict], eot: int, extra: dict):
        self.out, self.prefix, self.settings, self.shards, self.eot = out, prefix, settings, shards, eot
        self.extra = extra  # more manifest entries (the hub files), saved as they are at each shard
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
        manifest = {**self.settings, "complete": complete, "totals": totals, "shards": self.shards, **self.extra}
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


def _fill_shards(writer: _ShardWriter, src: Source, workers: int, hub: HubFiles | None) -> int:
    """Tokenize the source (the hub files if given) from the writer's resume point into shards until it or
    --max-tokens runs out; returns the number of tokens tokenized."""
    if (target := writer.target()) <= 0:
        return 0
    skip_docs, skip_tokens = writer.resume_point()
    docs = hub.documents(skip_docs) if hub else src.documents(skip_docs)
    buf, n, new_tokens = [], 0, 0
    # closing(docs): stop the downloads now, also when an exception keeps this frame alive in a traceback
    with worker_pool(workers) as pool, closing(docs), closing(tokenize_stream(docs, pool)) as chunks, \
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
                if hub:
                    hub.release(writer.resume_point()[0])
                buf, n = [tokens[cut:]], n - cut
                if (target := writer.target()) <= 0:
                    return new_tokens
        if n:  # the source ran out: what is left is the last shard
            writer.write(np.concatenate(buf))
    return new_tokens


def _check_settings(out, shard_size: int, max_tokens: int | None, workers: int | None, txt_docs: str,
                    downloads: int) -> None:
    if shard_size < 1 or (max_tokens is not None and max_tokens < 1) or (workers is not None and workers < 1) \
            or downloads < 1:
        raise SystemExit("error: --shard-size, --max-tokens, --workers and --downloads must be positive")
    if txt_docs not in TXT_DOCS:
        raise SystemExit(f"error: --txt-docs must be one of {TXT_DOCS}")
    if Path(out).exists() and not Path(out).is_dir():
        raise SystemExit(f"error: --out {out} is a file; it names the folder the shards go to (a text file to "
                         f"tokenize is --source {out})")


def _previous_build(out: Path, settings: dict) -> dict | None:
    """The manifest already in out (None: a new folder), if this run may continue it: the same source and shard
    size, and a --max-tokens that keeps every shard built (none is ever deleted)."""
    try:
        old = load_manifest(out)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    if old and old["shards"] and any(old[k] != settings[k] for k in IDENTITY):
        raise SystemExit(f"error: {out} holds shards of --source {old['source']} (--txt-docs {old['txt_docs']}) with "
                         f"--shard-size {old['shard_size']}, not of these settings: pass another --out, or delete "
                         f"{out} to rebuild it")
    held, max_tokens = sum(s["tokens"] for s in old["shards"]) if old else 0, settings["max_tokens"]
    if max_tokens is not None and held > max_tokens and max_tokens != old["max_tokens"]:
        raise SystemExit(f"error: {out} holds {held:,} tokens, more than --max-tokens {max_tokens:,}, and a smaller "
                         f"build would delete finished shards: pass another --out, or delete {out} to rebuild it")
    return old


def build(source: str = DEFAULT_SOURCE, out: str | Path = "data/fineweb_edu", shard_size: int = 100_000_000,
          max_tokens: int | None = None, workers: int | None = None, txt_docs: str = "file", downloads: int = 4,
          hub_endpoint: str | None = None) -> dict:
    """Build, resume or extend the shards of `source` in `out`; returns the finished manifest.

    hub_endpoint: the hub's base URL (default: huggingface.co, or $HF_ENDPOINT).
    """
    _check_settings(out, shard_size, max_tokens, workers, txt_docs, downloads)
    src = resolve_source(source, txt_docs)
    eot = gpt2_tokenizer().eot_token  # before any folder or download: offline without its cache, say so first
    workers = workers or os.cpu_count()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"source": src.spec, "txt_docs": txt_docs, "tokenizer": "gpt2", "dtype": "uint16",
                "shard_size": shard_size, "max_tokens": max_tokens}
    old = _previous_build(out, settings)
    shards = _kept_shards(out, old, settings)
    if old and old["complete"] and old["max_tokens"] == max_tokens and len(shards) == len(old["shards"]):
        print(f"{out} is complete and its {len(shards)} shards match their sha256; nothing to do")
        return old

    hub_files = old.get("hub_files") if old and old["source"] == src.spec else None
    hub = None
    if not src.files and max_tokens is None:  # the whole config: download its parquet files
        name, config = src.spec.split(":")
        hub_files = hub_files or list_hub_files(name, config, hub_endpoint)
        hub = HubFiles(name, hub_files, out / DOWNLOAD_DIR, hub_endpoint, downloads)
    extra = {"hub_files": hub_files} if hub_files else {}  # kept by a --max-tokens run, for a later full one
    writer = _ShardWriter(out, src.prefix, settings, shards, eot, extra)
    if shards:
        print(f"keeping {len(shards)} shards ({writer.tokens:,} tokens) of the previous run")
    if old:
        writer.save(complete=False)  # forget recorded shards beyond the kept ones before overwriting any of them
    t0 = time.perf_counter()
    try:
        new_tokens = _fill_shards(writer, src, workers, hub)
    except DiskFullError as e:  # atomic_write removed the partial shard; the manifest lists the finished ones
        raise SystemExit(f"error: {e}; the {len(writer.shards)} finished shards in {out} are kept and the same "
                         "command resumes after them") from None
    seconds = time.perf_counter() - t0
    if not writer.shards:
        raise SystemExit(f"error: --source {source} holds no documents")
    manifest = writer.save(complete=True)
    keep = {s["file"] for s in writer.shards}
    for stale in [*out.glob(f"{src.prefix}_val_*.npy*"), *out.glob(f"{src.prefix}_train_*.npy*")]:
        if stale.name not in keep:  # a short last shard a raised --max-tokens rebuilt, temp files of a killed run
            stale.unlink()
    shutil.rmtree(out / DOWNLOAD_DIR, ignore_errors=True)

    if new_tokens:
        rate = new_tokens / seconds
        print(f"tokenized {new_tokens:,} tokens in {seconds:.1f} s: {rate:,.0f} tokens/s with {workers} workers")
    _print_totals(manifest)
    print(f"wrote {out / MANIFEST}")
    return manifest


def _print_totals(manifest: dict) -> None:
    for split, total in manifest["totals"].items():
        count = sum(s["split"] == split for s in manifest["shards"])
        print(f"{split}: {count} shards, {total['tokens']:,} tokens, {total['docs']:,} documents")
    if not manifest["totals"]["train"]["tokens"]:
        txt_hint = "; a single .txt file is one document unless split with --txt-docs paragraphs"
        print("warning: no train split, the val shard took every token: lower --shard-size or raise --max-tokens"
              + (txt_hint if manifest["txt_docs"] == "file" else ""))


def main() -> None:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=DEFAULT_SOURCE, help=f"dataset or local path (default {DEFAULT_SOURCE})")
    parser.add_argument("--out", default="data/fineweb_edu", help="output folder (default data/fineweb_edu)")
    parser.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard (default 100_000_000)")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    parser.add_argument("--txt-docs", choices=TXT_DOCS, default="file",
                        help="a .txt file is one document, or one per blank-line-separated paragraph (default file)")
    parser.add_argument("--downloads", type=int, default=4, help="hub parquet files downloaded at once (default 4)")
    args = parser.parse_args()
    try:
        build(args.source, args.out, args.shard_size, args.max_tokens, args.workers, args.txt_docs, args.downloads)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: run the same command again to resume") from None


if __name__ == "__main__":
    main()
