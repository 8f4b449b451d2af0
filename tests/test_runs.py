"""Run folders: starting over moves the old run aside, one trainer per folder, checked checkpoints with a fallback,
a full disk and signals end in a message and a clean exit."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fineweb_edu
import hellaswag
import train_gpt2
from conftest import ROOT
from gpt2 import ema, runs
from gpt2.config import parse_config

TINY = ["--preset", "tiny", "--run-name", "r", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4",
        "--seq-len", "32", "--total-batch-size", "256", "--val-tokens", "512", "--hellaswag-every", "0",
        "--warmup-steps", "2", "--vocab-multiple", "128", "--sample-every", "0", "--checkpoint-every", "2"]


def args(shards, log_dir, *extra):
    return [*TINY, "--data-dir", shards, "--log-dir", str(log_dir), "--max-steps", "8", *extra]


def train_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.jsonl") as f:
        return [r["step"] for r in map(json.loads, f) if r["kind"] == "train"]


def ckpt_steps(run_dir: Path) -> list[int]:
    return [int(p.stem.split("_")[1]) for p in sorted(run_dir.glob("ckpt_*.pt"))]


def default_signals():
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def start_trainer(shards, log_dir, *extra) -> subprocess.Popen:
    """A trainer in its own process, returned once it has taken a step (so it holds the lock and its handlers)."""
    cmd = [sys.executable, str(ROOT / "train_gpt2.py"), *args(shards, log_dir, *extra)]
    # a suite run under nohup, or in a shell's background, would pass on its ignored SIGHUP or SIGINT, which the
    # trainer keeps ignored (by design): the trainer gets the defaults a terminal gives
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=default_signals)
    metrics = Path(log_dir) / "r" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and '"train"' in metrics.read_text()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the trainer did not start a step: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    return proc


def test_resume_never_moves_the_old_run_aside(shards, tmp_path):
    train_gpt2.main(args(shards, tmp_path, "--stop-at", "4"))
    run = tmp_path / "r"
    old_steps, old_ckpts = train_steps(run), ckpt_steps(run)
    assert (old_steps, old_ckpts) == ([1, 2, 3, 4], [2, 4])
    train_gpt2.main(args(shards, tmp_path, "--stop-at", "2", "--resume", "never"))
    assert train_steps(run) == [1, 2]  # only the new run's records: never two runs in one metrics.jsonl
    assert ckpt_steps(run) == [2]
    (aside,) = tmp_path.glob("r.old-*")
    assert (train_steps(aside), ckpt_steps(aside)) == (old_steps, old_ckpts)  # nothing of the old run deleted


def test_changed_settings_message_recommends_resume_never(shards, tmp_path):
    train_gpt2.main(args(shards, tmp_path, "--stop-at", "2"))
    with pytest.raises(SystemExit, match=r"--max-lr(.|\n)*--resume never \(moves the old run's files aside"):
        train_gpt2.main(args(shards, tmp_path, "--max-lr", "1e-3"))


def test_second_trainer_on_a_run_folder_is_refused(shards, tmp_path):
    first = start_trainer(shards, tmp_path, "--max-steps", "100000", "--checkpoint-every", "0")
    try:
        with pytest.raises(SystemExit, match=f"in use by another trainer \\(pid {first.pid} on "):
            train_gpt2.main(args(shards, tmp_path, "--max-steps", "100000", "--checkpoint-every", "0"))
    finally:
        first.kill()
        first.communicate()
    assert ckpt_steps(tmp_path / "r") == []  # the second trainer did not train either


def corrupt(path: Path, how: str):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # 4 KB of random bytes in the middle, the size unchanged
        mid = len(data) // 2
        noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        path.write_bytes(data[:mid] + noise + data[mid + 4096 :])


@pytest.mark.parametrize("how", ["truncated", "random bytes"])
def test_bad_latest_checkpoint_falls_back_to_the_previous_one(shards, tmp_path, capsys, how):
    train_gpt2.main(args(shards, tmp_path))
    run = tmp_path / "r"
    assert ckpt_steps(run) == [6, 8]
    corrupt(run / "ckpt_0000008.pt", how)
    assert train_gpt2.main(args(shards, tmp_path))["step"] == 8  # steps 7 and 8 again, from ckpt 6
    out = capsys.readouterr().out
    assert f"skipping a bad checkpoint: {run / 'ckpt_0000008.pt'}" in out
    assert f"resumed from {run / 'ckpt_0000006.pt'} at step 6" in out
    assert runs.load_checkpoint(str(run / "ckpt_0000008.pt"))["step"] == 8  # rewritten, checked again


def test_explicit_resume_of_a_bad_checkpoint_names_it(shards, tmp_path):
    train_gpt2.main(args(shards, tmp_path, "--stop-at", "2"))
    bad = tmp_path / "r" / "ckpt_0000002.pt"
    corrupt(bad, "truncated")
    with pytest.raises(SystemExit, match=f"--resume {bad}: {bad} does not match its sha256"):
        train_gpt2.main(args(shards, tmp_path, "--resume", str(bad)))
    bad.with_suffix(".pt.sha256").unlink()  # unchecked: torch's own failure, reported as a message
    with pytest.raises(SystemExit, match=f"{bad} is not a readable checkpoint"):
        train_gpt2.main(args(shards, tmp_path, "--resume", str(bad)))


def test_checkpoint_without_checksum_still_loads_with_a_warning(shards, tmp_path, capsys, monkeypatch):
    train_gpt2.main(args(shards, tmp_path, "--stop-at", "4"))
    run = tmp_path / "r"
    for sha in run.glob("*.sha256"):
        sha.unlink()
    monkeypatch.setattr(runs, "_warned_unchecked", False)
    capsys.readouterr()
    assert train_gpt2.main(args(shards, tmp_path))["step"] == 8
    out = capsys.readouterr().out
    assert out.count("has no .sha256 beside it") == 1
    assert f"resumed from {run / 'ckpt_0000004.pt'} at step 4" in out


def test_checksum_is_the_files_sha256(shards, tmp_path, monkeypatch):
    import hashlib

    def read_back(path):
        raise AssertionError(f"{path} read back to hash it")

    monkeypatch.setattr(runs, "sha256_file", read_back)  # hashed while written: the file is read once, on load
    train_gpt2.main(args(shards, tmp_path, "--stop-at", "2"))
    ckpt = tmp_path / "r" / "ckpt_0000002.pt"
    digest, name = (tmp_path / "r" / "ckpt_0000002.pt.sha256").read_text().split()
    assert (digest, name) == (hashlib.sha256(ckpt.read_bytes()).hexdigest(), ckpt.name)  # as `sha256sum -c` reads it


def test_loaders_name_a_file_that_is_no_checkpoint(tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=f"{junk} is not a readable checkpoint") as e:
        runs.load_model(str(junk))
    assert "weights_only" not in str(e.value)
    snapshots = tmp_path / "run" / "ema"
    snapshots.mkdir(parents=True)
    (snapshots / ema.snapshot_path(str(tmp_path / "run"), 4).split("/")[-1]).write_text("junk")
    with pytest.raises(SystemExit):
        ema.main([str(tmp_path / "run"), "--sigma-rel", "0.05"])


def test_disk_full_while_saving_exits_with_a_message(shards, tmp_path, monkeypatch):
    run = tmp_path / "r"
    run.mkdir()
    (run / "ckpt_0000006.pt.4242.tmp").write_bytes(b"left by a crash")
    real_save, saves = torch.save, []

    def save_then_fill_the_disk(obj, f):
        saves.append(obj["step"])
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(runs.torch, "save", save_then_fill_the_disk)
    with pytest.raises(SystemExit, match="no space left on the disk of .* while writing ckpt_0000004.pt(.|\n)*intact"):
        train_gpt2.main(args(shards, tmp_path))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt")) == ["ckpt_0000002.pt",
                                                                                    "ckpt_0000002.pt.sha256"]
    assert runs.load_checkpoint(str(run / "ckpt_0000002.pt"))["step"] == 2


def test_fineweb_disk_full_keeps_the_finished_shards(tmp_path, shakespeare_path, monkeypatch):
    real_save, calls = np.save, []

    def save_then_fill_the_disk(f, arr):
        calls.append(len(arr))
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, arr)

    monkeypatch.setattr(fineweb_edu.np, "save", save_then_fill_the_disk)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="no space left(.|\n)*the 2 finished shards .* are kept"):
        fineweb_edu.build(str(shakespeare_path), out, 50_000, workers=1, txt_docs="paragraphs")
    assert sorted(p.name for p in out.glob("*.npy*")) == ["input_train_000001.npy", "input_val_000000.npy"]
    monkeypatch.setattr(fineweb_edu.np, "save", real_save)
    fineweb_edu.build(str(shakespeare_path), out, 50_000, workers=1, txt_docs="paragraphs")  # resumes after them


def test_non_utf8_source_is_named(tmp_path):
    for name in ("latin1.txt", "latin1.jsonl"):
        src = tmp_path / name
        text = "caf\u00e9 au lait\n\nsecond paragraph\n"
        src.write_bytes((json.dumps({"text": text}, ensure_ascii=False) + "\n" if name.endswith("l") else text)
                        .encode("latin-1"))
        with pytest.raises(SystemExit, match=f"{src} is not UTF-8 text"):
            fineweb_edu.build(str(src), tmp_path / f"out_{name}", 1000, workers=1)


@pytest.mark.parametrize("signals", [[signal.SIGINT, signal.SIGINT], [signal.SIGHUP]], ids=["sigint-twice", "sighup"])
def test_signal_stops_after_the_step_with_a_checkpoint(shards, tmp_path, signals):
    proc = start_trainer(shards, tmp_path, "--max-steps", "100000", "--checkpoint-every", "0")
    for sig in signals:  # uv run forwards the terminal's Ctrl-C: one press arrives twice, 50 ms apart
        proc.send_signal(sig)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopping after this step (a checkpoint will be saved)" in stderr
    assert ("press Ctrl-C again" in stderr) == (signals[0] == signal.SIGINT)  # the hint fits Ctrl-C only
    (step,) = ckpt_steps(tmp_path / "r")
    assert f"stopped at step {step} (checkpoint in " in stdout and "run the same command to resume" in stdout


@pytest.mark.parametrize("bad", ['{"ctx": "a man", "endings": ["x", "y"', '{"context": "a", "endings": []}', "\x00\x01"],
                         ids=["partial", "wrong-key", "garbage"])
def test_bad_hellaswag_jsonl_names_file_and_line(tmp_path, hellaswag_val_path, bad):
    good = hellaswag_val_path.read_text().splitlines()[:2]
    path = tmp_path / "hs.jsonl"
    path.write_text("\n".join([*good, bad]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:3: "):
        hellaswag.load_examples(str(path))
    assert len(hellaswag.load_examples(str(path), limit=2)) == 2


def test_rebuilt_data_folder_is_refused_on_resume(shards, tmp_path, shakespeare_path):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    train_gpt2.main(args(str(data), tmp_path, "--stop-at", "2"))
    shutil.rmtree(data)  # the same path, rebuilt with other shards
    fineweb_edu.build(str(shakespeare_path), data, 20_000, workers=1, txt_docs="paragraphs")
    with pytest.raises(SystemExit, match=f"the shards in {data} are not the ones this run trained on"):
        train_gpt2.main(args(str(data), tmp_path))


def test_missing_data_hint_names_the_folder_given(tmp_path):
    missing = tmp_path / "my_data"
    with pytest.raises(SystemExit, match=f"fineweb_edu.py .*--out {missing}`"):
        train_gpt2.main(args(str(missing), tmp_path))


def test_finished_run_and_summary_lines(shards, tmp_path, capsys):
    train_gpt2.main(args(shards, tmp_path, "--val-every", "4"))
    run = tmp_path / "r"
    val = [r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if r["kind"] == "val"][-1]
    out = capsys.readouterr().out
    assert f"finished: step 8, val loss {val:.4f}, 2,048 tokens, " in out  # 8 steps * 256 tokens
    assert f"checkpoint {run / 'ckpt_0000008.pt'}" in out
    train_gpt2.main(args(shards, tmp_path, "--val-every", "4"))
    assert f"the run in {run} is already at step 8" in capsys.readouterr().out


def test_nan_stop_is_kept_in_the_run_logs(shards, tmp_path, monkeypatch):
    import model as model_module

    forward, calls = model_module.GPT.forward, []

    def poisoned(self, idx, targets=None, return_logits=True):
        logits, loss = forward(self, idx, targets, return_logits)
        calls.append(1)
        return logits, loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(model_module.GPT, "forward", poisoned)
    with pytest.raises(SystemExit, match="not finite") as e:
        train_gpt2.main(args(shards, tmp_path, "--val-every", "0"))
    run = tmp_path / "r"
    errors = [r for r in map(json.loads, open(run / "metrics.jsonl")) if r["kind"] == "error"]
    assert [r["message"] for r in errors] == [str(e.value)]
    assert f"error: {e.value}" in (run / "log.txt").read_text()


def test_help_shows_the_field_comment_and_the_presets_value(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # argparse wraps at hyphens too
    with pytest.raises(SystemExit) as e:
        parse_config(["--preset", "tiny", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long flags onto two lines
    assert "--stop-at STOP_AT stop (with a checkpoint) after this step, schedule unchanged; 0: at max_steps [tiny: 0]" in text
    assert "--max-steps MAX_STEPS 10B tokens / 524,288 per step: one epoch of FineWeb-Edu sample-10BT [tiny: 300]" in text
    # a model field: its description (config.MODEL_HELP) and the preset's value; the default is 12
    assert "--n-layer N_LAYER transformer blocks [tiny: 4] --n-head" in text
