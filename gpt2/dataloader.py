"""Token shards -> (x, y) training batches, plus the one place that reads and checks a shard folder.

A shard folder (built by fineweb_edu.py) holds uint16 `.npy` token shards and `manifest.json`, which
lists every shard (file, split, tokens, docs, sha256). `ShardLoader` memory-maps the shards of one
split and serves batches for one rank of a data-parallel run, optionally in rows aligned to document
starts and in a seeded shuffled order; its state (shard, pos, epoch) restores exactly. Check a folder by
hand with `python -m gpt2.dataloader DIR [--verify]`. `target_bytes` and `bits_per_byte` turn a summed val loss
into bits per UTF-8 byte of text, a figure that does not depend on the tokenizer.

torch is imported inside the functions that use it: plot_logs.py reads manifests (through
tools/reference_loss.py) and stays torch-free, so plotting on a laptop never pays torch's import time.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gpt2.packing import EOT, Rows, cropped_rows, gather, packed_rows  # noqa: F401 (EOT: for importers)

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"
SPLITS = ("val", "train")
MANIFEST_KEYS = ("source", "txt_docs", "tokenizer", "dtype", "shard_size", "max_tokens", "complete", "shards")
SHARD_KEYS = ("file", "split", "tokens", "docs", "sha256", "resume_doc", "resume_offset")
ALIGN_MODES = ("0", "crop", "pack")  # ShardLoader's align_docs: off, or how rows are aligned (gpt2/packing.py)
VOCAB = 50257  # GPT-2's token ids are 0..VOCAB-1; the model's embedding has no row for a larger one
OFFLINE_HINT = "offline or small: add `--source path/to/text.txt --txt-docs paragraphs --shard-size 100000`"


class DataError(Exception):
    """A shard folder that is missing, unfinished, corrupt or does not match its manifest."""


def build_command(data_dir: str | Path, manifest: dict | None = None) -> str:
    """The fineweb_edu.py command line that (re)builds `data_dir`, with the manifest's settings if known."""
    args = ["python", "fineweb_edu.py", "--out", str(data_dir)]
    if manifest is not None:
        args += ["--source", manifest["source"], "--shard-size", str(manifest["shard_size"])]
        if manifest["txt_docs"] != "file":
            args += ["--txt-docs", manifest["txt_docs"]]
        if manifest["max_tokens"] is not None:
            args += ["--max-tokens", str(manifest["max_tokens"])]
    return shlex.join(args)


def shards_identity(shards: list[dict]) -> str:
    """A hash over manifest shard entries' file names and sha256s: other tokens or settings, another identity."""
    return hashlib.sha256("\n".join(f"{s['file']} {s['sha256']}" for s in shards).encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def _start_over(data_dir: str | Path) -> str:
    return f"delete {data_dir} and rebuild it with `{build_command(data_dir)}`"


def load_manifest(data_dir: str | Path) -> dict | None:
    """The folder's manifest, finished or not; None if there is none yet."""
    path = Path(data_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        missing = [k for k in MANIFEST_KEYS if k not in manifest]
        missing += sorted({k for s in manifest["shards"] for k in SHARD_KEYS if k not in s})
        if "dtype" in manifest:
            np.dtype(manifest["dtype"])  # a TypeError for a dtype numpy does not know
        for s in [] if missing else manifest["shards"]:  # a hand edit: each later use would fail in its own way
            if not (isinstance(s["file"], str) and isinstance(s["split"], str) and type(s["tokens"]) is int):
                raise TypeError(f"shard entry {s} needs a string file and split and an integer tokens")
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path} is not a valid manifest ({e}); {_start_over(data_dir)}")
    if missing:
        raise DataError(f"{path} lacks {missing}; {_start_over(data_dir)}")
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    """The manifest of a finished build, or a DataError that says how to build one."""
    if Path(data_dir).is_file():  # e.g. the text itself: it is fineweb_edu.py's --source, not the shards
        raise DataError(f"--data-dir {data_dir} is a file; it takes a folder of token shards. Build one from this "
                        f"text with `python fineweb_edu.py --source {data_dir} --txt-docs paragraphs --shard-size "
                        f"100000 --out data/{Path(data_dir).stem}` and pass --data-dir data/{Path(data_dir).stem}")
    if not Path(data_dir).is_dir():
        raise DataError(f"no data folder {data_dir}: build it with `{build_command(data_dir)}` "
                        f"(FineWeb-Edu from the Hugging Face hub); {OFFLINE_HINT}")
    manifest = load_manifest(data_dir)
    if manifest is None:
        raise DataError(f"no {MANIFEST} in {data_dir}: build it with `{build_command(data_dir)}`; {OFFLINE_HINT}")
    if not manifest["complete"]:
        raise DataError(f"{data_dir} holds an unfinished build: finish it with "
                        f"`{build_command(data_dir, manifest)}` (it resumes)")
    return manifest


def check_shard(data_dir: str | Path, entry: dict, manifest: dict, verify: bool = False) -> Path:
    """Path of a manifest shard after checking its .npy header and size (and its sha256 if `verify`)."""
    path = Path(data_dir) / entry["file"]
    fix = f"re-run `{build_command(data_dir, manifest)}`: it keeps the good shards and rebuilds from this one"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version != (1, 0):  # the version np.save writes for a 1-D uint16 array
                raise ValueError(f"format version {version}, expected (1, 0)")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            data_start = f.tell()
            size = f.seek(0, 2)
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing; {fix}") from None
    except OSError as e:  # a folder in its place, no read permission, an I/O error
        raise DataError(f"shard {path} cannot be read ({e.strerror}): make it a readable file, or {fix}") from None
    except ValueError as e:
        raise DataError(f"shard {path} has no readable .npy header ({e}); {fix}") from None
    if dtype != np.dtype(manifest["dtype"]) or fortran or shape != (entry["tokens"],):
        raise DataError(f"shard {path} holds {dtype} {shape}, the manifest says {manifest['dtype']} "
                        f"({entry['tokens']},); {fix}")
    expected = data_start + entry["tokens"] * dtype.itemsize
    if size != expected:
        raise DataError(f"shard {path} is {size} bytes, not {expected} (truncated or overwritten); {fix}")
    if verify and sha256_file(path) != entry["sha256"]:
        raise DataError(f"shard {path} does not match its sha256 in the manifest (corrupt); {fix}")
    return path


def check_token_ids(path: str | Path, tokens: np.ndarray, data_dir: str | Path, manifest: dict) -> None:
    """A DataError if a shard holds an id past GPT-2's vocabulary (one vectorized pass over the shard)."""
    top = int(tokens.max()) if len(tokens) else 0
    if top >= VOCAB:
        raise DataError(f"shard {path} holds token id {top}, but the GPT-2 vocabulary has {VOCAB} ids "
                        f"(0..{VOCAB - 1}): it was not written by fineweb_edu.py's GPT-2 tokenizer, or it is corrupt. "
                        f"Delete {data_dir} and rebuild it with `{build_command(data_dir, manifest)}`")


def gpt2_tokenizer():
    """tiktoken's GPT-2 encoding. tiktoken downloads it once into its cache; offline without that cache this
    stops with one line that says how to provide it, instead of a chain of network tracebacks."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 (requests' ConnectionError, a timeout, a bad proxy...: all say the same)
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or "its cache folder"
        raise SystemExit(f"error: the GPT-2 tokenizer is not in {cache} and could not be downloaded "
                         f"({type(e).__name__}): connect once to the internet, or set TIKTOKEN_CACHE_DIR to a folder "
                         "holding tiktoken's gpt2 files (README, its opening section)") from None


@functools.cache
def token_byte_lengths() -> np.ndarray:
    """The UTF-8 byte length of every GPT-2 token id (index = id), as int64; <|endoftext|> counts 0 bytes,
    since it marks where a document ends rather than standing for text in it."""
    enc = gpt2_tokenizer()
    lengths = np.array([len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)], dtype=np.int64)
    lengths[enc.eot_token] = 0
    return lengths


@functools.cache
def _byte_lengths_on(device: torch.device) -> torch.Tensor:
    import torch

    return torch.from_numpy(token_byte_lengths()).to(device)


def target_bytes(targets: torch.Tensor) -> torch.Tensor:
    """The UTF-8 bytes of text a batch of target ids stands for, summed: a 0-d int64 tensor on their device, so
    that summing it over the val batches needs no host sync (a token that splits a character counts its share)."""
    return _byte_lengths_on(targets.device)[targets].sum()


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """A val loss summed over tokens (nats, natural log) per byte of the text they encode, in bits."""
    return float(total_nats) / (math.log(2) * float(total_bytes))


class ShardLoader:
    """Batches of one split for rank `rank` of `world_size`, read from memory-mapped shards.

    Each step the ranks together read one window of B*T*W + 1 tokens at `pos`; rank r takes B*T + 1 of
    them at pos + r*B*T, so W ranks see exactly the rows of a single-rank batch of W*B. A window that
    would run past the shard's end moves to the next shard; after the last one the split starts over
    (epoch += 1). The tail of each shard shorter than a window is skipped.

    align_docs "crop" or "pack": every row is T+1 tokens that start at an <|endoftext|>, laid out once per shard
    by gpt2/packing.py. crop: slices of the shard, each from an <|endoftext|> on, the rest of every row's last
    document dropped; pack: the documents best-fit packed, a cut document's rest in a later row behind an
    <|endoftext|> of its own, so that (almost) every token is a target once. A window is then W*B consecutive rows
    of the shard's, rank r taking B of them from the r*B-th; the rows after a shard's last whole window are dropped.

    shuffle: every epoch visits the shards in a random order and each shard's windows in a random order, both
    drawn from (seed, epoch) (and the shard): each window once per epoch, the same order for every rank.

    set_row_len: rows of a divisor of seq_len, for the sequence-length schedule (gpt2/curriculum.py): every row of
    seq_len is cut into rows of that length, so a batch holds the same tokens and targets and the state, the ranks'
    split and data_used stay those of full rows; with align_docs each piece opens with its first token read as
    <|endoftext|>, as packing reads a document's rest that it moved to another row (a target of the piece before).

    data_used: the share of the tokens read so far that were targets, where a served window counts its targets
    (of all ranks) and reads an equal share of its shard: exact for every shard served whole.

    State: epoch, shard (with shuffle, the position in that epoch's shard order) and pos (the token offset of
    the next window; with align_docs or shuffle, how many of the shard's windows were served), and data_used's
    two counts. Shard headers and sizes are checked against the manifest on construction; verify=True also checks
    each shard's sha256, which reads every shard of the split once. A shard's token ids are checked against the
    vocabulary the first time it is opened.
    """

    def __init__(self, data_dir: str | Path, split: str, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", verify: bool = False,
                 align_docs: str = "0", shuffle: bool = False, seed: int = 0):
        import torch

        if split not in SPLITS or align_docs not in ALIGN_MODES:
            raise ValueError(f"need split in {SPLITS} and align_docs in {ALIGN_MODES}, got {split!r}, {align_docs!r}")
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size:
            raise ValueError("need batch_size, seq_len >= 1 and 0 <= rank < world_size, "
                             f"got {batch_size=} {seq_len=} {rank=} {world_size=}")
        manifest = read_manifest(data_dir)
        entries = [s for s in manifest["shards"] if s["split"] == split]
        if not entries and (split == "val" or not manifest["shards"]):  # fineweb_edu.py writes the val shard first
            raise DataError(f"{data_dir}/{MANIFEST} lists no {split} shard, which every build has: the folder is "
                            f"damaged; delete it and rebuild it with `{build_command(data_dir, manifest)}`")
        if not entries:
            raise DataError(f"{data_dir} has no {split} shard: the whole source fitted into the val shard. Rebuild "
                            f"it with a smaller --shard-size, and split a single .txt file with --txt-docs paragraphs "
                            f"(was: `{build_command(data_dir, manifest)}`)")
        self.paths = [check_shard(data_dir, s, manifest, verify) for s in entries]
        self.data_dir, self.manifest, self._ids_checked = data_dir, manifest, set()
        self.sizes = [s["tokens"] for s in entries]
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.row_len = seq_len  # the rows served: T, or a divisor of it (set_row_len)
        self.window = batch_size * seq_len * world_size  # tokens all ranks consume per step (+1 for the targets)
        if max(self.sizes) < self.window + 1:
            raise ValueError(f"the {split} shards of {data_dir} hold at most {max(self.sizes)} tokens, fewer than one "
                             f"step needs (batch_size*seq_len*world_size + 1 = {self.window + 1}); lower batch_size or "
                             "seq_len, or rebuild with a larger --shard-size")
        self.device = torch.device(device)
        self.align_docs, self.aligned, self.shuffle, self.seed = align_docs, align_docs != "0", shuffle, seed
        self._tokens: np.ndarray | None = None  # memory map of shard self._open
        self._open = -1
        self._rows: Rows | None = None  # the rows of shard self._open (align_docs)
        self._order_key, self._order = None, None  # the window order of one (epoch, shard) (shuffle)
        # any() stops at the first shard that holds a window: usually one scan of one shard
        if self.aligned and not any(self._windows(i) for i in range(len(self.paths))):
            raise ValueError(f"no {split} shard of {data_dir} holds batch_size*world_size = {batch_size * world_size} "
                             f"document-aligned rows of seq_len+1 = {seq_len + 1} tokens; lower them, or turn "
                             "align_docs off")
        self.reset()

    def reset(self) -> None:
        self.shard, self.pos, self.epoch = 0, 0, 0
        self.targets, self.read = 0, 0  # data_used's counts

    @property
    def data_used(self) -> float:
        return self.targets / max(self.read, 1)

    def state_dict(self) -> dict:
        state = {"shard": self.shard, "pos": self.pos, "epoch": self.epoch, "targets": self.targets, "read": self.read}
        state |= {"align_docs": self.align_docs} if self.aligned else {}
        return state | ({"seed": self.seed} if self.shuffle else {})

    def load_state_dict(self, state: dict) -> None:
        shard, pos, epoch = (int(state[k]) for k in ("shard", "pos", "epoch"))
        if not (0 <= shard < len(self.paths) and pos >= 0 and epoch >= 0):
            raise ValueError(f"loader state {state} does not fit this split's {len(self.paths)} shards")
        # states from before align_docs and shuffle have neither key: both were off; before pack, align_docs 1 cropped
        align = "crop" if state.get("align_docs") == 1 else state.get("align_docs", "0")
        if (align, state.get("seed")) != (self.align_docs, self.seed if self.shuffle else None):
            raise ValueError(f"loader state {state} was saved with other data options than align_docs="
                             f"{self.align_docs}, shuffle={int(self.shuffle)}, seed={self.seed}: resume with "
                             "the options it was saved with")
        self.shard, self.pos, self.epoch = shard, pos, epoch
        # states from before data_used have no counts: it counts from the resumed step on
        self.targets, self.read = int(state.get("targets", 0)), int(state.get("read", 0))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        if self.aligned or self.shuffle:
            buf = torch.from_numpy(self._next_window())
        else:
            while self.pos + self.window + 1 > self.sizes[self.shard]:
                self._next_shard()
            start = self.pos + self.rank * self.B * self.T
            buf = torch.from_numpy(self._open_shard(self.shard)[start : start + self.B * self.T + 1].astype(np.int64))
            self._count(self.shard, self.pos // self.window, self.window)
            self.pos += self.window
        if self.device.type == "cuda":
            # page-locked host memory lets the copy overlap with the GPU work that is still queued
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        else:
            buf = buf.to(self.device)
        if buf.dim() == 2:  # (B, T+1) rows of their own
            return self._cut(buf[:, :-1].contiguous(), buf[:, 1:].contiguous())
        return self._cut(buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T))

    def set_row_len(self, row_len: int) -> None:
        """Serve rows of row_len tokens from the next batch on (see the class docstring)."""
        if row_len < 1 or self.T % row_len:
            raise ValueError(f"rows of {row_len} tokens do not divide seq_len {self.T}")
        self.row_len = row_len

    def _cut(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) inputs and targets as (B * T / row_len, row_len), each row's pieces in order."""
        if self.row_len == self.T:
            return x, y
        x, y = x.reshape(-1, self.row_len), y.reshape(-1, self.row_len)
        if self.aligned:  # a copy: a single row's x and y are views of the same tokens
            x = x.clone()
            x[:, 0] = EOT
        return x, y

    def _count(self, index: int, served: int, targets: int) -> None:
        """data_used's counts after serving the served-th window of shard `index` (from 0), which has `targets`."""
        windows, size = self._windows(index), self.sizes[index]
        self.targets += targets
        self.read += size * (served + 1) // windows - size * served // windows  # the shard's size once all are served

    def _open_shard(self, index: int) -> np.ndarray:
        if self._open != index:
            self._tokens, self._open = np.load(self.paths[index], mmap_mode="r"), index
            if index not in self._ids_checked:  # else the embedding's IndexError at the first step that reads it
                check_token_ids(self.paths[index], self._tokens, self.data_dir, self.manifest)
                self._ids_checked.add(index)
            layout = {"crop": cropped_rows, "pack": packed_rows}.get(self.align_docs)
            self._rows = layout(self._tokens, self.T + 1) if layout else None
        return self._tokens

    def _next_shard(self):
        """On to the next shard of this epoch's order, or to the first of the next epoch."""
        self.shard, self.pos = self.shard + 1, 0
        if self.shard == len(self.paths):
            self.shard, self.epoch = 0, self.epoch + 1

    def _windows(self, index: int) -> int:
        """How many windows shard `index` holds."""
        if self.aligned:
            self._open_shard(index)
            return len(self._rows.targets) // (self.B * self.world_size)
        return (self.sizes[index] - 1) // self.window

    def _shard_index(self) -> int:
        """The shard at position self.shard of this epoch's order."""
        if not self.shuffle:
            return self.shard
        return int(np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths))[self.shard])

    def _next_window(self) -> np.ndarray:
        """This rank's part of the next window with align_docs or shuffle, as int64: (B, T+1) aligned rows, or
        B*T+1 consecutive tokens."""
        while self.pos >= self._windows(self._shard_index()):
            self._next_shard()
        index = self._shard_index()
        tokens, window, served = self._open_shard(index), self.pos, self.pos
        if self.shuffle:
            if self._order_key != (self.epoch, index):
                rng = np.random.default_rng([self.seed, self.epoch, index])
                self._order_key, self._order = (self.epoch, index), rng.permutation(self._windows(index))
            window = int(self._order[self.pos])
        self.pos += 1
        if not self.aligned:
            self._count(index, served, self.window)
            start = window * self.window + self.rank * self.B * self.T
            return tokens[start : start + self.B * self.T + 1].astype(np.int64)
        first = window * self.B * self.world_size
        self._count(index, served, int(self._rows.targets[first : first + self.B * self.world_size].sum()))
        return gather(tokens, self._rows, first + self.rank * self.B, self.B)


def main() -> None:
    parser = argparse.ArgumentParser(description="Check a shard folder built by fineweb_edu.py.")
    parser.add_argument("data_dir")
    parser.add_argument("--verify", action="store_true",
                        help="also compare every shard's sha256 with the manifest and check its token ids")
    args = parser.parse_args()
    try:
        manifest = read_manifest(args.data_dir)
        for entry in manifest["shards"]:
            path = check_shard(args.data_dir, entry, manifest, verify=args.verify)
            if args.verify:  # it reads every shard anyway
                check_token_ids(path, np.load(path, mmap_mode="r"), args.data_dir, manifest)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    for split in SPLITS:
        shards = [s for s in manifest["shards"] if s["split"] == split]
        tokens, docs = sum(s["tokens"] for s in shards), sum(s["docs"] for s in shards)
        print(f"{split}: {len(shards)} shards, {tokens:,} tokens, {docs:,} documents")
    checked = "sha256 and token ids verified" if args.verify else "headers and sizes; add --verify for sha256"
    print(f"OK: {args.data_dir} ({checked})")


if __name__ == "__main__":
    main()
