"""A shard's document-aligned train rows (ShardLoader's align_docs): every row of row_len = T+1 tokens starts at an
<|endoftext|>, which doc_mask reads as the start of a document, so no row begins mid-document.

crop (document_rows): each row is the slice of the shard from an <|endoftext|> on; the next row starts at the first
<|endoftext|> at or after its end, so the rest of every row's last document is dropped. On documents much longer
than a row that is most of the shard (at T=128 on ~3,000-token documents, about four tokens in five).

pack (packed_rows): best-fit packing, after nanochat's BOS-aligned best-fit loader (karpathy/nanochat
nanochat/dataloader.py @ 92d63d4, tokenizing_distributed_data_loader_with_state_bos_bestfit: a buffer of 1000
documents, the largest that fits the room left, else a document cropped to fill the row; its dev/LOG.md @ 92d63d4,
2026-01-13, measured at T=2048 that cropping discards 39.4% of the tokens greedily and 34.6% best-fit, 22.9% being
what no row could hold whole). nanochat drops the cropped rest; here it goes back into the pool as a piece of its
own behind an <|endoftext|> of its own, so every token of the shard is a target in exactly one row except
    the <|endoftext|> of a document whose first piece opens a row (a row's first token is no target),
    the shard's first token when the shard starts inside a document (the piece of that document's end takes its
    place as the piece's <|endoftext|>),
    the last, partial row, and (ShardLoader) the rows after the shard's last full window.
The rule: the pieces are the shard's documents in order (each from its <|endoftext|> to the next one) and, when the
shard starts inside a document, the tokens before its first <|endoftext|>. A pool of up to `pool` pieces is topped
up in shard order before each pick. A row takes the longest piece that fits the room left, again and again; when
none fits, it takes the head of the longest piece to fill the room exactly, and the rest returns to the pool (ties:
the piece that comes first in the shard). So while the pool holds a document longer than a row, which has to be cut
somewhere, no shorter one is cut.

A piece is a slice of the shard whose first token is read as <|endoftext|>: a cropped rest's slice starts at the
last token of its head, a target in the head's row. Rows are segment lists, built once per shard (a Python loop
over the pieces: about 0.2 s per 100M tokens at T=1024), so any window of rows is read directly: exact resume and
DDP ranks as for unaligned windows.
"""

from bisect import bisect_right, insort
from typing import NamedTuple

import numpy as np

EOT = 50256  # <|endoftext|>: fineweb_edu.py puts one before every document
POOL = 1000  # pieces the best fit picks from: nanochat's buffer_size


class Rows(NamedTuple):
    """A shard's rows as segments: row i is tokens[start[j] : start[j] + length[j]] for j in bounds[i]..bounds[i+1]-1,
    put end to end, each segment's first token read as <|endoftext|> (a no-op where it is one)."""

    bounds: np.ndarray  # (rows + 1,) int64: row i's segments are bounds[i]:bounds[i + 1]
    start: np.ndarray  # (segments,) int64
    length: np.ndarray  # (segments,) int64
    targets: np.ndarray  # (rows,) int64: how many of the shard's tokens are targets in each row


def document_rows(tokens: np.ndarray, row_len: int) -> np.ndarray:
    """Start offsets of a shard's cropped rows of row_len tokens: the first at the shard's first <|endoftext|>,
    each next one at the first <|endoftext|> at or after the end of the row before."""
    eots = np.flatnonzero(tokens == EOT)
    after = np.searchsorted(eots, eots + row_len).tolist()  # for the row at eots[i], the next row's i
    eots, last, starts, i = eots.tolist(), len(tokens) - row_len, [], 0
    while i < len(eots) and eots[i] <= last:
        starts.append(eots[i])
        i = after[i]
    return np.array(starts, dtype=np.int64)


def cropped_rows(tokens: np.ndarray, row_len: int) -> Rows:
    starts = document_rows(tokens, row_len)
    n = len(starts)
    return Rows(np.arange(n + 1), starts, np.full(n, row_len), np.full(n, row_len - 1))


def best_fit(starts: list[int], lengths: list[int], row_len: int, pool: int) -> tuple[list[int], list[int], list[int]]:
    """The packing rule of the module docstring on pieces (start, length), in shard order: the end (one past the last
    segment) of each full row, and the segments' starts and lengths."""
    # the pool as sorted keys length << 40 | (MASK - start): the largest key up to a length is the longest piece
    # that fits, among equal lengths the first in the shard
    mask, keys, taken = (1 << 40) - 1, [], 0
    ends, seg_start, seg_len, room = [], [], [], row_len
    while True:
        while len(keys) < pool and taken < len(starts):
            insort(keys, lengths[taken] << 40 | mask - starts[taken])
            taken += 1
        if not keys:
            return ends, seg_start, seg_len  # segments past ends[-1]: the last, partial row
        fits = bisect_right(keys, room << 40 | mask) - 1
        key = keys.pop(fits if fits >= 0 else -1)
        length, start = key >> 40, mask - (key & mask)
        if length > room:  # none fits: the head fills the row, the rest (from the head's last token) goes back
            insort(keys, (length - room + 1) << 40 | mask - (start + room - 1))
            length = room
        seg_start.append(start)
        seg_len.append(length)
        room -= length
        if room == 0:
            ends.append(len(seg_start))
            room = row_len


def packed_rows(tokens: np.ndarray, row_len: int, pool: int = POOL) -> Rows:
    eots = np.flatnonzero(tokens == EOT)
    # a shard that starts inside a document: its first token stands in for the <|endoftext|> of that document's end
    starts = eots if len(eots) and eots[0] < 2 else np.r_[0, eots]
    lengths = np.diff(np.r_[starts, len(tokens)])
    ends, seg_start, seg_len = best_fit(starts.tolist(), lengths.tolist(), row_len, pool)
    bounds = np.array([0, *ends], dtype=np.int64)
    start, length = np.array(seg_start[: bounds[-1]], dtype=np.int64), np.array(seg_len[: bounds[-1]], dtype=np.int64)
    # a segment's own first token is a target where it is a document's <|endoftext|>, at that document's first
    # segment (a cropped rest repeats the start of a 1-token head), and not at a row's start
    first_use = np.zeros(len(start), dtype=bool)
    first_use[np.unique(start, return_index=True)[1]] = True
    own = (tokens[start] == EOT) & first_use
    own[bounds[:-1]] = False
    row = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    targets = np.bincount(row, weights=length - 1 + own, minlength=len(bounds) - 1).astype(np.int64)
    return Rows(bounds, start, length, targets)


def gather(tokens: np.ndarray, rows: Rows, first: int, count: int) -> np.ndarray:
    """Rows first .. first+count-1 as a (count, row_len) int64 array."""
    a, b = rows.bounds[first], rows.bounds[first + count]
    start, length = rows.start[a:b], rows.length[a:b]
    at = np.cumsum(length) - length  # each segment's offset in the rows laid end to end
    flat = tokens[np.arange(at[-1] + length[-1]) + np.repeat(start - at, length)].astype(np.int64)
    flat[at] = EOT
    return flat.reshape(count, -1)
