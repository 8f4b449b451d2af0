"""A shard's document-aligned train rows (ShardLoader's align_docs): every row of row_len = T+1 tokens starts at an
<|endoftext|>, which doc_mask reads as the start of a document, so no row begins mid-document.

crop (document_rows): each row is the slice of the shard from an <|endoftext|> on; the next row starts at the first
<|endoftext|> at or after its end, so the rest of every row's last document is dropped. On documents much longer
than a row that is most of the shard: of ~3,000-token documents it trains on about a fifth at T=1024, 4% at T=128.

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
the piece that comes first in the shard). So while the pool holds a piece longer than a row, which has to be cut
somewhere, no shorter one is cut.

A piece is a slice of the shard whose first token is read as <|endoftext|>: a cropped rest's slice starts at the
last token of its head, a target in the head's row. Rows are segment lists, built once per shard when it opens, so
any window of rows is read directly: exact resume and DDP ranks as for unaligned windows. The best fit is a Python
loop over the pieces, run once per shard (its cost: BENCHMARKS.md, "Packing").
"""

from bisect import bisect_right, insort
from typing import NamedTuple

import numpy as np

EOT = 50256  # <|endoftext|>: fineweb_edu.py puts one before every document
POOL = 1000  # pieces the best fit picks from: nanochat's buffer_size
# best_fit's int64 piece codes, length << 32 | (MASK - start): for shards of fewer than 2^31 tokens
MASK, STEP = (1 << 32) - 1, (1 << 32) + 1


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


def best_fit(pieces: list[int], row_len: int, pool: int) -> list[int]:
    """The packing rule of the module docstring, on pieces coded as length << 32 | (MASK - start) in shard order:
    the rows' segments, coded alike, row after row (those past the last multiple of row_len: the partial row)."""
    # in a sorted pool, the largest key up to room << 32 | MASK is the longest piece that fits, among equal lengths
    # the first in the shard; a cropped piece's rest (length - room + 1 tokens from start + room - 1) is
    # key - (room - 1) * STEP
    keys, incoming, segments, room = sorted(pieces[:pool]), iter(pieces[pool:]), [], row_len
    while keys:
        fits = bisect_right(keys, room << 32 | MASK) - 1
        if fits >= 0:
            key = keys.pop(fits)
            if (new := next(incoming, None)) is not None:
                insort(keys, new)
            length = key >> 32
        else:  # none fits: the longest fills the row, its rest goes back (the pool keeps its size)
            key = keys.pop()
            insort(keys, key - (room - 1) * STEP)
            key -= ((key >> 32) - room) << 32
            length = room
        segments.append(key)
        room = room - length or row_len
    return segments


def packed_rows(tokens: np.ndarray, row_len: int, pool: int = POOL) -> Rows:
    if len(tokens) >= 1 << 31:
        raise ValueError(f"align_docs pack takes shards of fewer than 2^31 tokens, not {len(tokens)}: rebuild them "
                         "with a smaller --shard-size")
    eots = np.flatnonzero(tokens == EOT)
    # a shard that starts inside a document: its first token stands in for the <|endoftext|> of that document's end
    starts = eots if len(eots) and eots[0] < 2 else np.r_[0, eots]
    lengths = np.diff(np.r_[starts, len(tokens)])
    segments = np.array(best_fit((lengths << 32 | (MASK - starts)).tolist(), row_len, pool), dtype=np.int64)
    length, start = segments >> 32, MASK - (segments & MASK)
    end = np.cumsum(length)  # in the rows laid end to end
    full = end <= end[-1] // row_len * row_len  # the partial row's segments go
    length, start, end = length[full], start[full], end[full]
    opens = np.flatnonzero((end - length) % row_len == 0)  # each row's first segment
    # a segment's first token is a target of the shard's where it is its document's own <|endoftext|> (the rest of
    # a 1-token head starts there too: the first of the two), but not at a row's start
    own, eot = np.zeros(len(start), dtype=bool), np.flatnonzero(tokens[start] == EOT)
    own[eot[np.unique(start[eot], return_index=True)[1]]] = True
    own[opens] = False
    targets = np.add.reduceat(length - 1 + own, opens) if len(opens) else np.zeros(0, dtype=np.int64)
    return Rows(np.r_[opens, len(start)], start, length, targets)


def gather(tokens: np.ndarray, rows: Rows, first: int, count: int) -> np.ndarray:
    """Rows first .. first+count-1 as a (count, row_len) int64 array."""
    a, b = rows.bounds[first], rows.bounds[first + count]
    start, length = rows.start[a:b], rows.length[a:b]
    at = np.cumsum(length) - length  # each segment's offset in the rows laid end to end
    flat = tokens[np.arange(at[-1] + length[-1]) + np.repeat(start - at, length)].astype(np.int64)
    flat[at] = EOT
    return flat.reshape(count, -1)
