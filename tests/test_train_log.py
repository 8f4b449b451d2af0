"""What a run's log says: progress and an ETA on every step line, and val bits per byte checked by hand."""

import glob
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F

import train_gpt2
from gpt2.dataloader import read_manifest
from gpt2.runs import load_model

B, T, VAL_TOKENS = 4, 32, 512


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("logs")
    train_gpt2.main(["--preset", "tiny", "--data-dir", shards, "--log-dir", str(log_dir), "--run-name", "r",
                     "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", str(B), "--seq-len", str(T),
                     "--total-batch-size", "256", "--val-tokens", str(VAL_TOKENS), "--hellaswag-every", "0",
                     "--warmup-steps", "2", "--vocab-multiple", "128", "--sample-every", "0", "--max-steps", "2",
                     "--ema-sigma-rel", "0.1"])
    return log_dir / "r"


def records(run_dir: Path, kind: str) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_step_lines_show_progress_tokens_elapsed_and_eta(run_dir):
    text = (run_dir / "log.txt").read_text()
    duration = r"\d+[hms][\dms]*"
    for step, percent, tokens in [(1, 50, "256"), (2, 100, "512")]:
        line = rf"step +{step}/2 \({percent}%\) \| loss .* \| {tokens} tokens \| elapsed {duration} \| ETA {duration}\n"
        assert re.search(line, text), text
    assert re.search(r"step +2/2 \(100%\) .* ETA 0s\n", text)  # nothing left to do


def test_val_bits_per_byte_equals_a_hand_computation(run_dir, shards):
    # the val targets the run scored: rows of T tokens from the start of the val shard, each shifted by one
    (entry,) = [s for s in read_manifest(shards)["shards"] if s["split"] == "val"]
    tokens = torch.from_numpy(np.load(Path(shards) / entry["file"]).astype(np.int64))
    x, y = tokens[:VAL_TOKENS].view(-1, T), tokens[1 : VAL_TOKENS + 1].view(-1, T)
    (ckpt,) = glob.glob(str(run_dir / "ckpt_*.pt"))
    model = load_model(ckpt).double().eval()  # the weights the step-2 val loss was computed with
    with torch.no_grad():
        logits = model(x)[0]
    nats = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    enc = tiktoken.get_encoding("gpt2")
    text_bytes = len(enc.decode_bytes([t for t in y.flatten().tolist() if t != enc.eot_token]))
    val = records(run_dir, "val")[-1]
    assert val["step"] == 2
    assert val["loss"] == pytest.approx(nats / y.numel(), rel=1e-5)
    assert val["bpb"] == pytest.approx(nats / (math.log(2) * text_bytes), rel=1e-5)
    # the EMA's val loss is scored on the same bytes
    ema = records(run_dir, "val_ema")[-1]
    assert ema["bpb"] / ema["loss"] == pytest.approx(val["bpb"] / val["loss"], rel=1e-6)
    assert re.search(rf"step +2 \| val loss {val['loss']:.4f} \| bpb {val['bpb']:.4f}\n", (run_dir / "log.txt").read_text())
