"""--align-docs pack (gpt2/packing.py): the rows against a plain-Python best fit, every token a target once per epoch
but a bounded remainder, document masks that stop at the pieces' bounds, exact resume and DDP ranks, and the old
0/1 switch read as crop."""

from collections import Counter

import numpy as np
import pytest
import torch

from gpt2.attention import attention_mask
from gpt2.config import TrainConfig, parse_config
from gpt2.dataloader import EOT, ShardLoader
from gpt2.packing import gather, packed_rows
from gpt2.runs import check_resume_config
from model import GPT, GPTConfig
from test_dataloader import assert_restores, write_shards

T = 15  # rows of 16 tokens


def synthetic_shard(seed: int, docs: int, prefix: int) -> list[int]:
    """Documents of random lengths (within a row, past it, one empty) after `prefix` tokens of a document begun in
    the shard before; every token but the <|endoftext|>s is its own position + 1, so a target names its position."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(docs) < 0.7, rng.integers(1, T + 2, docs), rng.integers(T + 2, 4 * T, docs))
    lengths[docs // 2] = 1  # <|endoftext|> right after <|endoftext|>: an empty document
    tokens = np.arange(1, prefix + lengths.sum() + 1)
    tokens[prefix + np.cumsum(lengths) - lengths] = EOT
    return tokens.tolist()


def naive_pack(tokens: list[int], row_len: int, pool_size: int) -> tuple[list[list[tuple]], list[tuple]]:
    """The rule of gpt2/packing.py written out on explicit pieces, lists of (token, shard position, piece number)
    with position None for an <|endoftext|> a cut rest gets: the full rows and the last, partial one."""
    starts = [i for i, t in enumerate(tokens) if t == EOT]
    pieces = [[(tokens[i], i) for i in range(a, b)] for a, b in zip(starts, starts[1:] + [len(tokens)])]
    if starts[0] >= 2:  # a shard starting inside a document: that document's end, behind an <|endoftext|>
        pieces.insert(0, [(EOT, None)] + [(tokens[i], i) for i in range(1, starts[0])])
    pieces = [[(t, p, n) for t, p in piece] for n, piece in enumerate(pieces)]
    numbered = len(pieces)

    def rank(piece):  # the longest, then the first in the shard
        return len(piece), -next(p for _, p, _ in piece if p is not None)

    pool, rows, row = [], [], []
    while pieces or pool:
        while len(pool) < pool_size and pieces:
            pool.append(pieces.pop(0))
        room = row_len - len(row)
        fitting = [p for p in pool if len(p) <= room]
        piece = max(fitting or pool, key=rank)
        pool.remove(piece)
        row += piece[:room]
        if len(piece) > room:
            pool.append([(EOT, None, numbered)] + [(t, p, numbered) for t, p, _ in piece[room:]])
            numbered += 1
        if len(row) == row_len:
            rows.append(row)
            row = []
    return rows, row


def own_targets(row: list[tuple]) -> list[int]:
    return [p for _, p, _ in row[1:] if p is not None]


@pytest.mark.parametrize("pool", [3, 1000])
def test_packed_rows_match_a_naive_best_fit(pool):
    tokens = synthetic_shard(0, 120, prefix=5)
    rows, _ = naive_pack(tokens, T + 1, pool)
    packed = packed_rows(np.array(tokens, dtype=np.uint16), T + 1, pool)
    assert len(packed.targets) == len(rows) > 100
    served = gather(np.array(tokens, dtype=np.uint16), packed, 0, len(rows))
    assert served.tolist() == [[t for t, _, _ in r] for r in rows]
    assert packed.targets.tolist() == [len(own_targets(r)) for r in rows]
    # the pool matters: a pool of 3 packs other rows than one that holds the whole shard
    assert (pool == 3) == (rows != naive_pack(tokens, T + 1, 1000)[0])


def test_naive_best_fit_targets_every_token_once_but_row_starts_and_the_last_row():
    tokens = synthetic_shard(1, 150, prefix=7)
    rows, partial = naive_pack(tokens, T + 1, 1000)
    counts = Counter(p for r in rows for p in own_targets(r))
    assert max(counts.values()) == 1
    row_starts = {r[0][1] for r in rows} - {None}  # a document's own <|endoftext|> opening a row is no target
    left = {p for _, p, _ in partial} - {None}
    assert set(range(len(tokens))) - set(counts) == row_starts | left | {0}  # 0: stands in for the prefix's EOT
    assert all(tokens[p] == EOT for p in row_starts) and len(partial) < T + 1


def test_packed_epoch_targets_every_token_once_and_counts_data_used(tmp_path):
    shards = [synthetic_shard(2, 100, prefix=0), synthetic_shard(3, 90, prefix=9)]
    B, W = 2, 2
    loader = ShardLoader(write_shards(tmp_path / "d", shards), "train", B * W, T, align_docs="pack")
    seen = [Counter(), Counter()]
    while True:
        counted = (loader.targets, loader.read)  # at the end of the epoch
        x, y = loader.next_batch()
        if loader.epoch == 1:
            break
        assert (x[:, 0] == EOT).all() and torch.equal(x[:, 1:], y[:, :-1])
        seen[loader.shard].update(t - 1 for t in y.flatten().tolist() if t != EOT)
    targets = 0
    for tokens, counts in zip(shards, seen):
        assert max(counts.values()) == 1  # no token twice
        missed = [p for p, t in enumerate(tokens) if t != EOT and p not in counts]
        # the remainder: the last partial row, the rows past the last full window, and a prefix's first token
        assert len(missed) < B * W * (T + 1) + 1
        rows, _ = naive_pack(tokens, T + 1, 1000)
        targets += sum(len(own_targets(r)) for r in rows[: len(rows) // (B * W) * B * W])
    assert counted == (targets, sum(map(len, shards)))
    assert counted[0] / counted[1] > 0.8


def test_doc_mask_sees_no_key_of_another_piece():
    tokens = synthetic_shard(4, 60, prefix=3)
    rows, _ = naive_pack(tokens, T + 1, 1000)
    x = torch.tensor([[t for t, _, _ in r[:-1]] for r in rows[:12]])
    pieces = torch.tensor([[n for _, _, n in r[:-1]] for r in rows[:12]])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    naive = (pieces[:, :, None] == pieces[:, None, :]) & causal
    docs = attention_mask(x, None, set(), doc_mask=True, sinks=False).docs
    assert torch.equal((docs[:, :, None] == docs[:, None, :]) & causal, naive)
    # and in the model: each piece's logits are those of the piece alone (RoPE: relative positions only)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, vocab_size=EOT + 1, n_layer=2, n_head=2, n_embd=32, pos="rope", doc_mask=True))
    logits, _ = model(x)
    for i in range(len(x)):
        for n in pieces[i].unique():
            at = (pieces[i] == n).nonzero().flatten()
            alone, _ = model(x[i, at][None])
            assert (alone[0] - logits[i, at]).abs().max() < 1e-5


def test_packed_resume_and_ranks_are_exact(tmp_path):
    """2 ranks serve the rows of 1 process, and a state restores mid-shard, at shard ends and past the epoch wrap."""
    data = write_shards(tmp_path / "d", [synthetic_shard(seed, 80, prefix=seed) for seed in (5, 6, 7)])

    def loader(rank=0, world_size=1, batch=2, align="pack"):
        return ShardLoader(data, "train", batch, T, rank, world_size, align_docs=align)

    single, ranks = loader(batch=4), [loader(r, 2) for r in range(2)]
    states, batches = [], []
    while single.epoch < 1 or single.pos < 2:
        states.append(ranks[1].state_dict())
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        batches.append(parts[1])
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(r.state_dict() == single.state_dict() for r in ranks)
    ends = [k for k in range(1, len(states)) if states[k]["shard"] != states[k - 1]["shard"]]
    assert len(ends) == 3  # two shard ends and the wrap
    assert_restores(lambda: loader(1, 2), states, batches, [0, 1, len(states) // 2, *ends, len(states) - 2], count=2)
    with pytest.raises(ValueError, match="other data options"):
        loader(1, 2, align="crop").load_state_dict(states[1])
    # a state saved when align_docs was a switch (1) is crop's
    crop = loader(align="crop")
    crop.load_state_dict({"shard": 1, "pos": 1, "epoch": 0, "align_docs": 1})
    assert crop.state_dict() == {"shard": 1, "pos": 1, "epoch": 0, "targets": 0, "read": 0, "align_docs": "crop"}


def test_old_align_docs_values_read_as_crop():
    assert [parse_config(["--align-docs", v])[0].align_docs for v in ("0", "1", "crop", "pack")] == [
        "0", "crop", "crop", "pack"]
    assert parse_config(["--preset", "tiny-speedrun"])[0].align_docs == "pack"
    assert TrainConfig(align_docs=True).align_docs == "crop" and TrainConfig(align_docs=False).align_docs == "0"
    crop, pack = TrainConfig(align_docs="crop"), TrainConfig(align_docs="pack")
    check_resume_config(crop, {"align_docs": True}, "old.pt")  # a checkpoint of before: the switch on
    check_resume_config(TrainConfig(), {}, "older.pt")  # ... or of before the switch: off
    with pytest.raises(SystemExit, match="--align-docs: checkpoint 'crop', now 'pack'"):
        check_resume_config(pack, {"align_docs": True}, "old.pt")
