"""tools/reference_loss.py: GPT-2's val loss on a shard folder's val tokens (a tiny HF-layout GPT-2, offline), checked
against transformers on the same tokens read straight from the shard; its cache, and plot_logs reading it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import plot_logs
from gpt2 import hf_io
from gpt2.dataloader import read_manifest
from tools import reference_loss

SETTINGS = {"seq_len": 32, "batch_size": 4, "val_tokens": 1000}  # 1000 // (4 * 32) = 7 batches: 896 tokens


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> str:
    """A random GPT-2 in the HF layout, as transformers' save_pretrained writes it (importing transformers: ~6 s)."""
    import transformers  # a dev dependency
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_hf")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(out)
    return str(out)


def _cli(model, data_dir, log_dir, **settings) -> dict:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in (SETTINGS | settings).items()]
    return reference_loss.main(["--model", model, "--data-dir", data_dir, "--log-dir", str(log_dir), "--device",
                                "cpu", *flags])


def _transformers_loss(model_dir, data_dir, tokens) -> float:
    """Mean cross-entropy of transformers' GPT-2 over the first `tokens` targets of the val shard, in rows of
    seq_len: nothing of this repo but the shard's file name."""
    from transformers import GPT2LMHeadModel  # imported by tiny_hf already

    val = next(s for s in read_manifest(data_dir)["shards"] if s["split"] == "val")
    ids = torch.from_numpy(np.load(Path(data_dir) / val["file"])[: tokens + 1].astype(np.int64))
    x, y = ids[:-1].view(-1, SETTINGS["seq_len"]), ids[1:].view(-1, SETTINGS["seq_len"])
    with torch.no_grad():
        logits = GPT2LMHeadModel.from_pretrained(model_dir).eval()(x).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item()


def test_reference_equals_transformers_and_is_cached(shards, tiny_hf, tmp_path, monkeypatch, capsys):
    ref = _cli(tiny_hf, shards, tmp_path / "logs")
    assert ref["tokens"] == 896 and ref["val_tokens"] == 1000 and ref["seq_len"] == 32
    assert abs(ref["loss"] - _transformers_loss(tiny_hf, shards, 896)) < 1e-4
    (cached,) = (tmp_path / "logs" / "reference").glob("*.json")
    assert json.loads(cached.read_text()) == ref
    assert ref["val_identity"] == reference_loss.val_identity(read_manifest(shards))

    def no_model(*args, **kwargs):
        raise AssertionError("the cached reference should have been read, not the model loaded")

    monkeypatch.setattr(hf_io, "from_pretrained", no_model)
    assert _cli(tiny_hf, shards, tmp_path / "logs") == ref
    assert "val loss" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="cached"):  # other settings: not in the cache, so the model loads
        _cli(tiny_hf, shards, tmp_path / "logs", val_tokens=512)


def test_plot_logs_draws_it_for_the_same_data_only(shards, tiny_hf, tmp_path, capsys):
    logs = tmp_path / "logs"
    ref = _cli(tiny_hf, shards, logs)
    other = tmp_path / "other"  # other data: the same folder with its val shard rebuilt from another source
    other.mkdir()
    manifest = read_manifest(shards)
    for shard in manifest["shards"]:
        shard["sha256"] = shard["sha256"][::-1] if shard["split"] == "val" else shard["sha256"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    for name, data_dir in (("same", shards), ("other", str(other))):
        (logs / name).mkdir()
        val = {"kind": "val", "step": 10, "tokens": 1280, "time": 1.0, "loss": ref["loss"] + 0.5}
        (logs / name / "metrics.jsonl").write_text(json.dumps(val) + "\n")
        (logs / name / "config.json").write_text(json.dumps({"data_dir": data_dir, **SETTINGS}))
    files = {n: (logs / n / "metrics.jsonl").resolve() for n in ("same", "other")}
    val_refs, notes = plot_logs.val_references(files)
    assert val_refs == {"same": ref}
    assert notes == [f"GPT-2 val loss: not computed for {other} (seq_len 32, val_tokens 1000); `python -m "
                     f"tools.reference_loss --model gpt2 --data-dir {other} --seq-len 32 --val-tokens 1000 "
                     f"--batch-size 4 --log-dir {logs.resolve()}` computes it"]
    capsys.readouterr()  # the tool's own line
    plot_logs.main([str(logs), "--out", str(tmp_path / "runs.png")])
    captured = capsys.readouterr()
    table = _table(captured.out)
    assert table["same"]["Δ GPT-2 val loss"] == "+0.5000" and table["other"]["Δ GPT-2 val loss"] == "-"
    assert captured.err.count("GPT-2 val loss: not computed") == 1


def _table(md: str) -> dict:
    """Run name -> {column header: cell} of a markdown table."""
    header, _, *rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.strip().splitlines()]
    return {row[0]: dict(zip(header, row)) for row in rows}
