"""What a user on a fresh clone meets when something is wrong: bad flags, a file as --data-dir, no tokenizer
offline, a full disk, a corrupt checkpoint, a kill -9, a crash, a second Ctrl-C. Each ends in one line that names
the fix, with no traceback (a crash keeps its traceback, and leaves its line in the run's logs), and loses nothing."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL, metrics, run

import fineweb_edu
import hellaswag
import plot_logs
import sample
import train_gpt2
from gpt2 import runs
from gpt2.config import parse_config
from gpt2.dataloader import DataError, ShardLoader
from gpt2.runtime import StopRequest, pick_device


def cli(*args, env=None, script="train_gpt2.py") -> subprocess.CompletedProcess:
    """A script of the repo run as a user runs it, from the repo root."""
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert all(f in proc.stderr for f in fragments), proc.stderr


def train_args(shards, log_dir, *extra) -> list[str]:
    """conftest.run's command line, for running it in another process too."""
    return ["--preset", "tiny", "--data-dir", shards, "--log-dir", str(log_dir), "--run-name", "run", *SMALL, *extra]


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    (["--total-batch-size", "0"], "--total-batch-size must be >= 1, got 0"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1.0"),
    (["--n-layer", "0"], "--n-layer must be >= 1, got 0"),
    (["--n-head", "0"], "--n-head must be >= 1, got 0"),  # GPTConfig would divide by it
    (["--warmup-steps", "-5"], "--warmup-steps must be >= 0, got -5"),
    (["--val-every", "-1"], "--val-every must be >= 0, got -1"),
    (["--max-steps", "-1"], "--max-steps must be >= 1, got -1"),  # not "--stop-at 0 is past --max-steps -1"
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0"),
    (["--max-lr", "nan"], "--max-lr must be > 0, got nan"),
    (["--beta2", "1"], "--beta2 must be in [0, 1), got 1.0"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must be in [0, 1], got 2.0"),
    (["--n-embd", "30", "--n-head", "4"], "n_embd 30 is not divisible by n_head 4"),
    (["--steps", "5"], "unrecognized arguments: --steps 5"),
    (["--align-docs", "2"], "argument --align-docs: invalid choice: '2' (choose from '0', 'crop', 'pack')"),
    (["--edm2-storage", "rows"], "--edm2-storage rows needs --mode edm2"),
])
def test_bad_flag_is_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--preset", "tiny", *args])
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0] and lines[0].endswith(" (see --help)"), lines


def test_bad_flag_from_the_real_script():
    proc = cli("--preset", "tiny", "--batch-size", "0")
    assert_one_line(proc, "train_gpt2.py: error: --batch-size must be >= 1, got 0 (see --help)")
    assert proc.returncode == 2 and not proc.stdout


def test_every_flag_has_a_description(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"])
    options = " ".join(capsys.readouterr().out.split("options:")[1].split())
    assert options.count(" --") > 90
    assert not re.findall(r"--\S+ \S+ \[", options)  # a flag and its metavar right before its [preset: value]


def test_a_file_as_data_dir(tmp_path):
    proc = cli("--preset", "tiny", "--data-dir", "README.md", "--log-dir", str(tmp_path))
    assert_one_line(proc, "--data-dir README.md is a file", "fineweb_edu.py --source README.md")
    assert not list(tmp_path.iterdir())


def test_no_tokenizer_offline_stops_before_the_run_folder(shards, tmp_path):
    empty, blocked = tmp_path / "tiktoken", "http://127.0.0.1:9"  # nothing listens on port 9 (discard)
    empty.mkdir()
    env = {"TIKTOKEN_CACHE_DIR": str(empty), "HTTPS_PROXY": blocked, "HTTP_PROXY": blocked, "https_proxy": blocked,
           "http_proxy": blocked}
    proc = cli(*train_args(shards, tmp_path / "logs"), env=env)
    assert_one_line(proc, "GPT-2 tokenizer is not in", "TIKTOKEN_CACHE_DIR")
    assert not (tmp_path / "logs").exists()


def test_full_disk_on_closing_a_checkpoint_keeps_the_earlier_ones(shards, tmp_path, monkeypatch):
    real_save = runs.torch.save

    def save_like_torch_on_a_full_disk(obj, f):
        if obj["step"] != 4:
            return real_save(obj, f)
        f.write(b"part of a checkpoint")
        try:  # torch: the write fails with ENOSPC, then closing the zip writer raises this RuntimeError
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 64 vs 20")

    monkeypatch.setattr(runs.torch, "save", save_like_torch_on_a_full_disk)
    with pytest.raises(SystemExit) as e:
        run(shards, tmp_path, "--max-steps", "6", "--checkpoint-every", "2", "--val-every", "0", "--sample-every", "0")
    message = str(e.value)
    assert "\n" not in message and "no space left on the disk of" in message and "ckpt_0000004.pt" in message
    assert "the checkpoints already in" in message and "intact (the same command resumes from the latest" in message
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("ckpt")) == ["ckpt_0000002.pt",
                                                                                   "ckpt_0000002.pt.sha256"]
    assert runs.load_checkpoint(str(run_dir / "ckpt_0000002.pt"))["step"] == 2
    assert metrics(tmp_path, kind="error")[-1]["message"] == message


def test_full_disk_before_the_first_step(shards, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_gpt2.json, "dump", full)  # config.json
    with pytest.raises(SystemExit, match=r"^no space left on the disk of .*run \(No space left on device\): free some "
                       r"space and run the same command again$"):
        run(shards, tmp_path, "--max-steps", "2")


def test_corrupt_checkpoint_is_refused_by_the_eval_tools(shards, tmp_path):
    run(shards, tmp_path, "--max-steps", "4", "--checkpoint-every", "2", "--val-every", "0", "--sample-every", "0")
    ckpt = tmp_path / "run" / "ckpt_0000004.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor: torch.load alone would not notice
    ckpt.write_bytes(bytes(data))
    proc = cli("--checkpoint", str(ckpt), "--max-new-tokens", "2", "--device", "cpu", script="sample.py")
    previous = ckpt.parent / "ckpt_0000002.pt"
    assert_one_line(proc, f"{ckpt} does not match its sha256", f"use the previous checkpoint, {previous}")
    with pytest.raises(ValueError, match="does not match its sha256"):  # hellaswag.py's loader too
        runs.load_model(str(ckpt))


def test_kill_9_then_resume_logs_each_step_once(shards, tmp_path):
    args = train_args(shards, tmp_path, "--max-steps", "20", "--checkpoint-every", "5", "--val-every", "5",
                      "--sample-every", "0")
    proc = subprocess.Popen([sys.executable, "train_gpt2.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # until it trained 2 steps past its first checkpoint
        if log.exists() and log.read_text().count('"kind": "train"') >= 7:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = log.read_text().count('"kind": "train"')  # its last line may be cut
    assert 7 <= killed_at < 20 and (tmp_path / "run" / "ckpt_0000005.pt").exists()
    train_gpt2.main(args)  # the same command again
    steps = [r["step"] for r in metrics(tmp_path)]
    assert steps == list(range(1, 21)), f"killed at step {killed_at}: {steps}"
    val_steps = [r["step"] for r in metrics(tmp_path, kind="val")]
    assert val_steps == list(range(0, 21, 5))


def test_crash_leaves_its_line_in_the_run_logs(shards, tmp_path, monkeypatch):
    step = train_gpt2.Trainer.optimizer_step

    def crash_at_3(self):
        if self.step == 3:
            raise RuntimeError("the optimizer fell over\nsecond line")
        return step(self)

    monkeypatch.setattr(train_gpt2.Trainer, "optimizer_step", crash_at_3)
    with pytest.raises(RuntimeError, match="fell over"):  # unexpected: its traceback stays
        run(shards, tmp_path, "--max-steps", "6", "--val-every", "0", "--sample-every", "0")
    (error,) = metrics(tmp_path, kind="error")
    assert error["step"] == 3 and error["tokens"] == 3 * 256 and "time" in error
    assert error["message"] == "RuntimeError: the optimizer fell over second line"
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "error: RuntimeError: the optimizer fell over\nsecond line" in log
    config_line = log.splitlines()[0]  # the settings that differ from the preset, not all of them
    assert config_line.startswith("config: preset tiny, changed: ") and "max_steps=6" in config_line
    assert len(config_line) < 500 and "n_layer=2" in config_line and "norm=" not in config_line


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT as a terminal gives it, whether the suite runs there, under nohup or in a shell's background (which
    ignores it, and the trainer keeps an ignored signal ignored); the suite's own handler back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_second_ctrl_c_stops_at_once_with_one_line(shards, tmp_path, monkeypatch, ctrl_c_interrupts):
    step, handler = train_gpt2.Trainer.optimizer_step, signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(StopRequest, "SAME_SIGNAL_S", 0.0)  # the second press comes 10 ms after the first here

    def two_presses_at_3(self):
        if self.step == 3:
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.01)
            signal.raise_signal(signal.SIGINT)
        return step(self)

    monkeypatch.setattr(train_gpt2.Trainer, "optimizer_step", two_presses_at_3)
    with pytest.raises(SystemExit) as e:
        run(shards, tmp_path, "--max-steps", "6", "--checkpoint-every", "2", "--val-every", "0", "--sample-every", "0")
    last = tmp_path / "run" / "ckpt_0000002.pt"
    assert str(e.value) == (f"second SIGINT: stopping now without a checkpoint; the last checkpoint is {last} (the "
                            "same command resumes from it)")
    assert metrics(tmp_path, kind="error")[0]["message"] == str(e.value)
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back


def test_a_signal_ignored_at_start_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        stop = StopRequest()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        stop.restore()
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_resume_takes_the_same_data_folder_spelled_otherwise(shards, tmp_path, monkeypatch):
    run(shards, tmp_path, "--max-steps", "4", "--stop-at", "2", "--val-every", "0", "--sample-every", "0")
    monkeypatch.chdir(Path(shards).parent)
    # ./shakespeare and shakespeare/ for the absolute path the run started with
    assert run(f"./{Path(shards).name}/", tmp_path, "--max-steps", "4", "--val-every", "0",
               "--sample-every", "0")["step"] == 4


def test_a_checkpoint_whose_optimizer_split_changed_is_refused_in_one_line(shards, tmp_path, monkeypatch):
    """A checkpoint saved when Muon held other matrices (e.g. manifold Muon's gates before they went to AdamW):
    its optimizer state cannot be loaded, and the message says so instead of torch's traceback."""
    args = ["--optimizer", "muon", "--max-steps", "4", "--checkpoint-every", "2", "--val-every", "0",
            "--sample-every", "0"]
    run(shards, tmp_path, *args, "--stop-at", "2")
    build = train_gpt2.build_optimizers

    def one_matrix_less(cfg, model, device_type):  # the first block matrix moves from Muon to AdamW
        first = model.hidden_matrices()[0]
        monkeypatch.setattr(type(model), "hidden_matrices", lambda self: [p for p in self.transformer.h.parameters()
                                                                          if p.dim() == 2 and p is not first])
        return build(cfg, model, device_type)

    monkeypatch.setattr(train_gpt2, "build_optimizers", one_matrix_less)
    with pytest.raises(SystemExit, match=r"ckpt_0000002.pt: its optimizer state does not fit this code's optimizers"):
        run(shards, tmp_path, *args)


def drop_the_val_shard(data: Path, manifest: dict):
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] != "val"]


def unknown_dtype(data: Path, manifest: dict):
    manifest["dtype"] = "uint12"


def a_token_count_as_text(data: Path, manifest: dict):
    manifest["shards"][1]["tokens"] = str(manifest["shards"][1]["tokens"])  # a hand edit


def a_folder_for_a_shard(data: Path, manifest: dict):
    (data / manifest["shards"][1]["file"]).unlink()
    (data / manifest["shards"][1]["file"]).mkdir()


@pytest.mark.parametrize("damage,message", [
    (drop_the_val_shard, r"manifest.json lists no val shard, which every build has: the folder is damaged; delete it "
                         r"and rebuild it with `python fineweb_edu.py --out "),  # not "the source fitted into val"
    (unknown_dtype, r"manifest.json is not a valid manifest \(data type 'uint12' not understood\); delete "),
    (a_token_count_as_text, r"manifest.json is not a valid manifest \(shard entry .* needs a string file and split "
                            r"and an integer tokens\); delete "),
    (a_folder_for_a_shard, r"_train_000001.npy cannot be read \(Is a directory\): make it a readable file, or re-run"),
], ids=["no-val-shard", "unknown-dtype", "token-count-as-text", "folder-for-a-shard"])
def test_a_damaged_data_folder_is_one_clear_error(shards, tmp_path, damage, message):
    data = tmp_path / "data"
    shutil.copytree(shards, data)
    manifest = json.loads((data / "manifest.json").read_text())
    damage(data, manifest)
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message):
        for split in ("train", "val"):
            ShardLoader(data, split, 2, 16)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_device_mps_without_mps_is_one_line():
    with pytest.raises(SystemExit, match=r"^--device mps needs Apple's MPS, and torch cannot use it here .*: use "
                       r"--device cpu$"):
        pick_device("mps")


def test_a_file_in_the_log_dir_path(shards, tmp_path):
    (tmp_path / "notes").write_text("a file, not a folder")
    with pytest.raises(SystemExit, match=r"^cannot create the run folder .*notes/run \(Not a directory\): pass a "
                       r"--log-dir \(and --run-name\) that names a folder you can write, not a file$"):
        run(shards, tmp_path / "notes")


def test_resume_from_a_model_that_is_no_training_checkpoint(shards, tmp_path):
    model = tmp_path / "ema_model.pt"  # what ema.py writes: weights and their config, no optimizer or loader state
    torch.save({"model": {}, "model_config": {}, "step": 4}, model)
    with pytest.raises(SystemExit, match=re.escape(f"--resume {model}: {model} is not a training checkpoint of "
                                                   "train_gpt2.py (it lacks ['optimizers', 'loader', ")):
        run(shards, tmp_path / "logs", "--resume", str(model))


def test_sample_given_a_folder_or_a_bare_tensor(tmp_path):
    run_dir, empty = tmp_path / "run", tmp_path / "empty"
    run_dir.mkdir()
    empty.mkdir()
    for step in (2, 4):
        (run_dir / f"ckpt_{step:07d}.pt").write_bytes(b"")  # only their names are read
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    cases = [(run_dir, f"{run_dir} is a folder: pass one checkpoint file, e.g. its latest, {run_dir}/ckpt_0000004.pt"),
             (empty, f"{empty} is a folder: pass one checkpoint file, it holds none (train_gpt2.py writes"),
             (tmp_path / "tensor.pt", f"{tmp_path}/tensor.pt is not a training checkpoint: expected keys 'model'")]
    for path, message in cases:
        with pytest.raises(SystemExit, match=re.escape(f"error: {message}")):
            sample.main(["--checkpoint", str(path), "--device", "cpu"])


def test_plot_logs_draws_a_run_whose_eval_diverged(tmp_path, capsys):
    records = [{"kind": "val", "step": 0, "tokens": 0, "time": 0.0, "loss": 10.8},
               {"kind": "train", "step": 1, "tokens": 32, "time": 0.1, "loss": 10.7},
               {"kind": "val", "step": 1, "tokens": 32, "time": 0.2, "loss": float("nan")},
               {"kind": "val_ema", "step": 1, "tokens": 32, "time": 0.2, "loss": float("inf")}]
    (tmp_path / "run").mkdir()
    # json writes NaN and Infinity, as the trainer's log does for a diverged val loss
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_logs.main([str(tmp_path / "run"), "--out", str(tmp_path / "runs.png"), "--no-reference"])
    assert (tmp_path / "runs.png").stat().st_size > 0 and "| run | 1 | 32 | nan |" in capsys.readouterr().out


HELLASWAG_EXAMPLE = {"ctx": "A man sits down", "endings": ["a", "b", "c", "d"], "label": 0}


@pytest.mark.parametrize("line,message", [
    (b"", "holds no HellaSwag examples (an empty file?)"),
    (json.dumps({**HELLASWAG_EXAMPLE, "endings": ["a", "b", "c"]}).encode(), ":1: a HellaSwag example needs 4 endings"),
    (json.dumps({**HELLASWAG_EXAMPLE, "ctx": ""}).encode(), ":1: a HellaSwag example needs 4 endings and a non-empty"),
    (json.dumps({"ctx": "a", "endings": ["a", "b", "c", "d"]}).encode(), ":1: no 'label' to score against (the test"),
    (json.dumps(HELLASWAG_EXAMPLE).replace("man", "caf\u00e9").encode("latin-1"), ":1: not UTF-8 text"),
], ids=["empty", "three-endings", "empty-ctx", "no-label", "latin-1"])
def test_a_hellaswag_file_that_cannot_be_scored_is_refused_on_loading(tmp_path, line, message):
    path = tmp_path / "hs.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}{message}" if message[0] == ":" else f"{path} {message}")):
        hellaswag.load_examples(str(path))


def test_a_hellaswag_file_that_cannot_be_scored_stops_before_the_run_folder(shards, tmp_path, capsys):
    (tmp_path / "hs.jsonl").write_text(json.dumps({"ctx": "a", "endings": ["a", "b", "c", "d"]}) + "\n")  # test split
    with pytest.raises(SystemExit, match="^HellaSwag data: .*no 'label' to score against .*--hellaswag-every 0"):
        run(shards, tmp_path / "logs", "--hellaswag-every", "2", "--hellaswag-data", str(tmp_path / "hs.jsonl"))
    assert not (tmp_path / "logs").exists()  # before: the run crashed at its step-0 evaluation
    with pytest.raises(SystemExit):
        hellaswag.main(["--checkpoint", "any.pt", "--limit", "0"])
    assert "--limit must be >= 1, got 0" in capsys.readouterr().err


def test_fineweb_refuses_an_empty_txt_and_a_cut_parquet(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SystemExit, match="empty.txt holds no documents"):  # not a 1-token val shard and no train
        fineweb_edu.build(str(tmp_path / "empty.txt"), tmp_path / "out", 1000, workers=1)
    assert not (tmp_path / "out" / "manifest.json").exists()
    (tmp_path / "cut.parquet").write_bytes(b"PAR1 half a download")
    with pytest.raises(SystemExit, match=r"cut.parquet is not a readable parquet file \(.*\): copy or download it"):
        fineweb_edu.build(str(tmp_path / "cut.parquet"), tmp_path / "out2", 1000, workers=1)
