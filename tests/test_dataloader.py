"""dataloader.ShardLoader: batches against the raw shards, ranks partition the single-rank batch, exact
save/restore (also with document-aligned rows and the seeded shuffle), and clear errors for missing, unfinished
and damaged shard folders."""

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

import fineweb_edu
import train_gpt2
from conftest import run
from gpt2.dataloader import (
    EOT,
    VOCAB,
    DataError,
    ShardLoader,
    bits_per_byte,
    sha256_file,
    target_bytes,
    token_byte_lengths,
)

ROOT = Path(__file__).resolve().parent.parent
SHARD = 4000


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shakespeare_path) -> Path:
    """Shakespeare's paragraphs in 4000-token shards: val, 6 full train shards and a 40-token last one."""
    out = tmp_path_factory.mktemp("shards")
    val = fineweb_edu.build(str(shakespeare_path), out, SHARD, max_tokens=SHARD, workers=1, txt_docs="paragraphs")
    total = val["totals"]["val"]["tokens"] + 6 * SHARD + 40
    fineweb_edu.build(str(shakespeare_path), out, SHARD, max_tokens=total, workers=1, txt_docs="paragraphs")
    return out


def shards(data_dir: Path, split: str) -> list[np.ndarray]:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return [np.load(data_dir / s["file"]) for s in manifest["shards"] if s["split"] == split]


def windows(arrays: list[np.ndarray], size: int):
    """The spec, written out: consecutive windows of size+1 tokens per shard, the shard's tail skipped, forever."""
    while True:
        for tokens in arrays:
            for pos in range(0, len(tokens) - size, size):
                yield torch.from_numpy(tokens[pos : pos + size + 1].astype(np.int64))


def test_fixture_layout(data_dir):
    assert [len(t) for t in shards(data_dir, "train")] == [SHARD] * 6 + [40]


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_the_single_rank_batch(data_dir, world_size):
    B, T = 2, 16
    single = ShardLoader(data_dir, "train", world_size * B, T)
    ranks = [ShardLoader(data_dir, "train", B, T, rank=r, world_size=world_size) for r in range(world_size)]
    window = world_size * B * T
    per_epoch = sum(len(range(0, len(t) - window, window)) for t in shards(data_dir, "train"))
    for step, expected in enumerate(islice(windows(shards(data_dir, "train"), window), per_epoch + 50)):
        x, y = single.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (world_size * B, T)
        assert torch.equal(x, expected[:-1].view(-1, T)) and torch.equal(y, expected[1:].view(-1, T))
        parts = [r.next_batch() for r in ranks]
        # rank r holds rows r*B .. (r+1)*B-1: together exactly the single-rank batch, nothing twice
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert all(p[0].shape == (B, T) for p in parts)
    assert single.epoch == 1 and all(r.state_dict() == single.state_dict() for r in ranks)


def assert_restores(loader, states, batches, at, count: int):
    """A fresh loader() given states[k] (through JSON: plain ints survive it) serves batches[k : k + count]."""
    for k in at:
        state = json.loads(json.dumps(states[k]))
        assert all(type(v) is int for name, v in states[k].items() if name != "align_docs")
        restored = loader()
        restored.load_state_dict(state)
        for x, y in batches[k : k + count]:
            rx, ry = restored.next_batch()
            assert torch.equal(rx, x) and torch.equal(ry, y)


def test_state_dict_restores_exactly(data_dir):
    def loader():
        return ShardLoader(data_dir, "train", 3, 8, rank=1, world_size=2)

    first, states, batches = loader(), [], []
    for _ in range(520):  # 83 steps per 4000-token shard, 498 per epoch: crosses shard ends and the epoch wrap
        states.append(first.state_dict())
        batches.append(first.next_batch())
    assert first.epoch == 1
    assert_restores(loader, states, batches, (0, 1, 82, 83, 84, 249, 497, 498, 510), count=5)
    with pytest.raises(ValueError, match="does not fit"):
        loader().load_state_dict({"shard": 99, "pos": 0, "epoch": 0})


OPTIONS = {"aligned": dict(align_docs="crop"), "shuffled": dict(shuffle=True, seed=5),
           "aligned-shuffled": dict(align_docs="crop", shuffle=True, seed=5),
           "packed-shuffled": dict(align_docs="pack", shuffle=True, seed=5)}


def write_shards(out: Path, train: list[list[int]]) -> Path:
    """A shard folder by hand: a val shard and the given train shards (uint16 token lists)."""
    out.mkdir()
    entries = []
    for i, tokens in enumerate([[EOT] + list(range(1, 200))] + train):
        name = f"hand_{i:06d}.npy"
        np.save(out / name, np.array(tokens, dtype=np.uint16))
        entries.append({"file": name, "split": "train" if i else "val", "tokens": len(tokens), "docs": 0,
                        "sha256": "", "resume_doc": 0, "resume_offset": 0})
    manifest = {"source": "hand", "txt_docs": "file", "tokenizer": "gpt2", "dtype": "uint16", "shard_size": 0,
                "max_tokens": None, "complete": True, "shards": entries}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_aligned_rows_of_hand_made_shards(tmp_path):
    E = EOT
    first = [7, 8, E, 1, 2, E, 3, E, 4, 5, 6, 9, 9, 9, E, 6, E, 1, 2, 3, E, 5]
    second = [E, 1, 2, 3, 4, 5, E, 6]
    data = write_shards(tmp_path / "hand", [first, second])
    # rows of 5 tokens (seq_len 4), worked out by hand: 7, 8 precede the first document; "E 4 5 6 9 9 9" is cut
    # after 9 and the next row starts at the next E; "E 1 2 3" is cut after 2; "E 5" and "E 6" do not fit a row
    rows = [[E, 1, 2, E, 3], [E, 4, 5, 6, 9], [E, 6, E, 1, 2], [E, 1, 2, 3, 4]]
    loader = ShardLoader(data, "train", 1, 4, align_docs="crop")
    for row in rows + rows[:2]:
        x, y = loader.next_batch()
        assert x.tolist() == [row[:-1]] and y.tolist() == [row[1:]]
    assert loader.epoch == 1
    # batches of 2 rows: the first shard's third row is short of a window, the second shard holds none
    loader = ShardLoader(data, "train", 2, 4, align_docs="crop")
    for _ in range(2):
        x, y = loader.next_batch()
        assert x.tolist() == [r[:-1] for r in rows[:2]] and y.tolist() == [r[1:] for r in rows[:2]]
    assert loader.epoch == 1
    with pytest.raises(ValueError, match="no train shard .* holds batch_size\\*world_size = 4 document-aligned rows"):
        ShardLoader(data, "train", 4, 4, align_docs="crop")


def test_aligned_rows_start_at_documents(data_dir):
    """On real shards: every row is a slice of its shard that starts at an <|endoftext|>, and the next row of the
    shard starts at the first <|endoftext|> at or after the row's end (only a document's rest is skipped)."""
    T, raw = 16, shards(data_dir, "train")
    loader = ShardLoader(data_dir, "train", 3, T, align_docs="crop")
    last = None  # ((shard, epoch), end of the last row)
    while loader.epoch < 1 or loader.pos < 3:  # past shard ends and the epoch wrap
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1]) and (x[:, 0] == EOT).all()
        tokens = raw[loader.shard]
        starts = np.flatnonzero(tokens == EOT)
        end = last[1] if last is not None and last[0] == (loader.shard, loader.epoch) else 0
        for row in torch.cat([x, y[:, -1:]], 1).numpy():
            start = starts[starts >= end][0]
            assert np.array_equal(tokens[start : start + T + 1], row)
            end = start + T + 1
        last = ((loader.shard, loader.epoch), end)


def epoch_windows(loader: ShardLoader, steps: int) -> list[tuple]:
    """Each batch of `steps` as a hashable (x, last targets) pair."""
    batches = (loader.next_batch() for _ in range(steps))
    return [(tuple(x.flatten().tolist()), tuple(y[:, -1].tolist())) for x, y in batches]


@pytest.mark.parametrize("align", ["0", "crop", "pack"])
def test_shuffle_visits_every_window_once_in_a_seeded_order(data_dir, align):
    B, T = 2, 16

    def loader(seed, shuffle=True):
        return ShardLoader(data_dir, "train", B, T, align_docs=align, shuffle=shuffle, seed=seed)

    in_order = loader(0, shuffle=False)
    first = epoch_windows(in_order, 1)
    while in_order.epoch == 0:  # count an epoch's windows
        first += epoch_windows(in_order, 1)
    per_epoch = len(first) - 1
    shuffled = loader(7)
    epoch0, epoch1 = epoch_windows(shuffled, per_epoch), epoch_windows(shuffled, per_epoch)
    assert shuffled.epoch == 1 and shuffled.pos > 0  # exactly two epochs, nothing skipped or repeated
    assert sorted(epoch0) == sorted(epoch1) == sorted(first[:per_epoch])  # every window once per epoch
    assert epoch0 != first[:per_epoch] and epoch1 != epoch0  # in a new order each epoch
    assert epoch_windows(loader(7), per_epoch) == epoch0 and epoch_windows(loader(8), per_epoch) != epoch0


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_ranks_split_the_single_rank_batch_with_options(data_dir, world_size, options):
    B, T = 2, 16
    single = ShardLoader(data_dir, "train", world_size * B, T, **options)
    ranks = [ShardLoader(data_dir, "train", B, T, rank=r, world_size=world_size, **options) for r in range(world_size)]
    while single.epoch < 1 or single.pos < 5:
        x, y = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        # rank r holds rows r*B .. (r+1)*B-1: together exactly the single-rank batch, nothing twice
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert all(p[0].shape == (B, T) for p in parts)
    assert all(r.state_dict() == single.state_dict() for r in ranks)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_state_dict_restores_exactly_with_options(data_dir, options):
    def loader(**changes):
        return ShardLoader(data_dir, "train", 3, 8, rank=1, world_size=2, **{**options, **changes})

    first, states, batches = loader(), [], []
    while first.epoch < 1 or first.pos < 3:  # past shard ends and the epoch wrap
        states.append(first.state_dict())
        batches.append(first.next_batch())
    ends = [k for k in range(1, len(states)) if states[k]["shard"] != states[k - 1]["shard"]]
    assert_restores(loader, states, batches, [0, 1, len(states) // 2, *ends[:2], ends[-1], len(states) - 3], count=3)
    # a state of other options (or of a checkpoint from before them: no keys, both off) is refused
    other = loader(align_docs={"0": "crop", "crop": "pack", "pack": "0"}[options.get("align_docs", "0")])
    with pytest.raises(ValueError, match="other data options"):
        other.load_state_dict(states[1])
    with pytest.raises(ValueError, match="other data options"):
        loader().load_state_dict({"shard": 0, "pos": 1, "epoch": 0})


def test_doc_mask_aligned_shuffled_training_step(data_dir, tmp_path):
    def train(name, doc_mask):
        return train_gpt2.main([
            "--preset", "tiny", "--data-dir", str(data_dir), "--log-dir", str(tmp_path), "--run-name", name,
            "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--seq-len", "32",
            "--total-batch-size", "256", "--val-tokens", "512", "--hellaswag-every", "0", "--warmup-steps", "2",
            "--vocab-multiple", "128", "--sample-every", "0", "--max-steps", "2", "--doc-mask", doc_mask,
            "--align-docs", "pack", "--shuffle", "1"])

    result, unmasked = train("r", "1"), train("unmasked", "0")
    assert math.isfinite(result["train_loss"]) and math.isfinite(result["val_loss"])
    # the same rows: the mask must change what the packed rows' tokens attend to, so the loss
    assert abs(result["train_loss"] - unmasked["train_loss"]) > 1e-4
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["align_docs"] == "pack" and config["shuffle"] and config["model"]["doc_mask"]
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    used = [r["data_used"] for r in records if r["kind"] == "train"]
    assert len(used) == 2 and all(0.9 < u <= 1 for u in used)
    assert "| data used " in (tmp_path / "r" / "log.txt").read_text()


def test_val_reset_repeats_the_same_batches(data_dir):
    val = ShardLoader(data_dir, "val", 4, 32)
    expected = list(islice(windows(shards(data_dir, "val"), 4 * 32), 5))
    for _ in range(2):
        for window in expected:
            x, y = val.next_batch()
            assert torch.equal(x, window[:-1].view(4, 32)) and torch.equal(y, window[1:].view(4, 32))
        val.reset()


def test_batch_larger_than_shard(data_dir):
    with pytest.raises(ValueError, match=r"fewer than one step needs \(batch_size\*seq_len\*world_size \+ 1 = 65537\)"):
        ShardLoader(data_dir, "train", 64, 1024)


def test_missing_folder_says_how_to_build(tmp_path):
    with pytest.raises(DataError, match=r"no data folder .*`python fineweb_edu.py --out .*`.*--source path/to/text.txt"):
        ShardLoader(tmp_path / "nope", "train", 2, 8)
    with pytest.raises(DataError, match=r"no manifest.json in .*python fineweb_edu.py"):
        ShardLoader(tmp_path, "train", 2, 8)


def test_truncated_shard_names_file_and_rebuild_command(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    victim = copy / "input_train_000003.npy"
    with open(victim, "r+b") as f:
        f.truncate(5000)
    with pytest.raises(DataError) as err:
        ShardLoader(copy, "train", 2, 8)
    message = str(err.value)
    assert str(victim) in message and "truncated" in message
    command = re.search(r"`(python fineweb_edu.py --out [^`]*)`", message).group(1)

    # the command it names repairs the folder
    run = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert victim.read_bytes() == (data_dir / victim.name).read_bytes()
    repaired, original = ShardLoader(copy, "train", 2, 8), ShardLoader(data_dir, "train", 2, 8)
    assert torch.equal(repaired.next_batch()[0], original.next_batch()[0])


def test_damaged_header_manifest_and_checksum(data_dir, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shard = copy / "input_train_000002.npy"
    original = shard.read_bytes()

    shard.write_bytes(b"not an npy file" + original[15:])
    named = f"shard {re.escape(str(shard))}"
    with pytest.raises(DataError, match=rf"{named} has no readable .npy header.*python fineweb_edu.py --out"):
        ShardLoader(copy, "train", 2, 8)

    flipped = bytearray(original)
    flipped[-3] ^= 0x10
    shard.write_bytes(bytes(flipped))
    ShardLoader(copy, "train", 2, 8)  # size and header are fine: only the full check can tell
    with pytest.raises(DataError, match=rf"{named} does not match its sha256"):
        ShardLoader(copy, "train", 2, 8, verify=True)
    verify = [sys.executable, "-m", "gpt2.dataloader", "--verify", str(copy)]
    run = subprocess.run(verify, cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode != 0 and str(shard) in run.stderr and "Traceback" not in run.stderr
    shard.write_bytes(original)
    run = subprocess.run(verify, cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr

    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][2]["tokens"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=rf"{named} holds uint16 \(4000,\), the manifest says uint16 \(4001,\)"):
        ShardLoader(copy, "train", 2, 8)
    manifest["complete"] = False
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="unfinished build: finish it with `python fineweb_edu.py --out"):
        ShardLoader(copy, "train", 2, 8)


def test_token_id_past_the_vocabulary_names_shard_and_rebuild(tmp_path):
    good = [EOT] + list(range(1, 300))
    data = write_shards(tmp_path / "hand", [good, good[:100] + [VOCAB + 43] + good[100:]])
    loader = ShardLoader(data, "train", 2, 8)
    for _ in range(18):  # the first shard's 18 windows: its ids are fine, <|endoftext|> (the largest) included
        loader.next_batch()
    with pytest.raises(DataError) as err:
        loader.next_batch()
    message = str(err.value)
    for part in (f"shard {data / 'hand_000002.npy'} holds token id {VOCAB + 43}", f"vocabulary has {VOCAB} ids",
                 f"Delete {data} and rebuild it with `python fineweb_edu.py --out {data}"):
        assert part in message, part
    # `dataloader.py --verify` checks the ids of every shard (with the shards' real sha256s in the manifest)
    manifest = json.loads((data / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry["sha256"] = sha256_file(data / entry["file"])
    (data / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, "-m", "gpt2.dataloader", "--verify", str(data)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and f"holds token id {VOCAB + 43}" in proc.stderr and "Traceback" not in proc.stderr


def test_training_on_a_shard_with_a_bad_id_stops_with_its_message(tmp_path):
    data = write_shards(tmp_path / "hand", [[EOT] + list(range(1, 299)) + [VOCAB]])
    with pytest.raises(SystemExit) as err:  # the message, not the embedding's IndexError at step 1
        run(str(data), tmp_path, "--max-steps", "2")
    message = str(err.value.code)
    assert f"shard {data / 'hand_000001.npy'} holds token id {VOCAB}" in message and "rebuild it with" in message
    assert f"error: {message}" in (tmp_path / "run" / "log.txt").read_text()
    assert not list((tmp_path / "run").glob("ckpt_*.pt"))


def test_source_without_train_split(tmp_path, shakespeare_path):
    fineweb_edu.build(str(shakespeare_path), tmp_path, 100_000, workers=1)  # one document: all of it is val
    with pytest.raises(DataError, match="no train shard.*--txt-docs paragraphs"):
        ShardLoader(tmp_path, "train", 2, 8)



def test_target_bytes_are_the_utf8_of_the_text(tmp_path):
    enc = tiktoken.get_encoding("gpt2")
    pieces = ["naïve café", "日本語の文章です。", "🎉🚀👩‍👩‍👧", "Ωμέγα", "z̴͉̓a̶l̷g̸o", "plain ASCII words", "\n\n", "ж"]
    docs = [" ".join(pieces[(i + j) % len(pieces)] for j in range(i % 7 + 1)) for i in range(120)]
    split = [t for d in docs for t in enc.encode_ordinary(d) if not _is_utf8(enc.decode_single_token_bytes(t))]
    assert split, "the text must make GPT-2 cut characters across tokens"
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    fineweb_edu.build(str(tmp_path / "docs.jsonl"), tmp_path / "out", 600, workers=1)

    val = ShardLoader(tmp_path / "out", "val", 2, 64)
    for _ in range(4):
        _, y = val.next_batch()
        got = target_bytes(y)
        # decode_bytes joins the tokens' bytes, so a character cut between two tokens counts once, whole
        expected = len(enc.decode_bytes([t for t in y.flatten().tolist() if t != enc.eot_token]))
        assert got.dtype == torch.int64 and got.ndim == 0 and got.item() == expected

    # the whole val shard stands for exactly the UTF-8 bytes of the documents in it
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    tokens = torch.from_numpy(np.load(tmp_path / "out" / manifest["shards"][0]["file"]).astype(np.int64))
    n_docs = manifest["shards"][0]["docs"]
    assert target_bytes(tokens).item() == sum(len(d.encode("utf-8")) for d in docs[:n_docs])
    lengths = token_byte_lengths()
    assert lengths.shape == (50257,) and lengths[enc.eot_token] == 0 and lengths[enc.encode_ordinary(" the")[0]] == 4


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_bits_per_byte():
    # a model that spreads its bets evenly over the 256 byte values pays ln(256) nats, 8 bits, per byte
    assert bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
    assert bits_per_byte(torch.tensor(3.0 * math.log(2)), torch.tensor(2)) == pytest.approx(1.5)
