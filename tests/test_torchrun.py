"""torchrun and the device set-up: without a usable GPU, --device auto (or cuda) stops before any work with one
message that says why and how to fix it, as does an error every rank hits (while one rank's own failure still
shows); SIGTERM to torchrun (a spot reclaim) checkpoints at a step all ranks agreed on, and resuming gives the loss
curve of a run that never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from gpt2 import runtime

# a very small model on few tokens, as in test_train.py: these tests are about the launcher, not the model
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--seq-len", "32",
        "--total-batch-size", "256", "--val-tokens", "512", "--hellaswag-every", "0", "--warmup-steps", "2",
        "--max-lr", "3e-3", "--vocab-multiple", "128", "--val-every", "0", "--sample-every", "0",
        "--checkpoint-every", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NO_CUDA = "needs CUDA, and torch cannot use it here"


def torchrun_cmd(shards, log_dir, name, *args, device="cpu"):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            str(ROOT / "train_gpt2.py"), "--preset", "tiny", "--data-dir", shards, "--log-dir", str(log_dir),
            "--run-name", name, "--device", device, *TINY, *args]


def run_torchrun(cmd, env=ENV):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if proc.returncode and "address already in use" in proc.stderr.lower():  # a port race with another process
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    return proc


def train_losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def test_auto_device_without_cuda_stops_every_rank_with_one_message(shards, tmp_path):
    env = {**ENV, "CUDA_VISIBLE_DEVICES": ""}  # no GPU for torch, on any machine
    proc = run_torchrun(torchrun_cmd(shards, tmp_path, "run", "--max-steps", "2", device="auto"), env)
    assert proc.returncode != 0
    assert proc.stderr.count(NO_CUDA) == 1, proc.stderr[-3000:]  # local rank 0 only
    message = proc.stderr[proc.stderr.index("--device auto under torchrun " + NO_CUDA):]
    for part in (f"torch {torch.__version__}", "torch.cuda.device_count() = 0", "CUDA_VISIBLE_DEVICES=''",
                 "--device cpu", "uv pip install torch --index-url https://download.pytorch.org/whl/cu",
                 "[tool.uv.sources]"):
        assert part in message, part
    assert not (tmp_path / "run").exists()  # stopped before any work: no run folder, config or checkpoint


def test_a_stopping_error_of_every_rank_is_printed_once(tmp_path):
    missing = tmp_path / "no_data"
    proc = run_torchrun(torchrun_cmd(str(missing), tmp_path, "run", "--max-steps", "2"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count(f"no data folder {missing}") == 1, output[-3000:]  # rank 0's; rank 1 saw the same: quiet
    assert "rank 1:" not in output and 'train_gpt2.py", line' not in output  # a message, no traceback of ours


@pytest.fixture
def agent_store(monkeypatch):
    """torchrun's store and environment, as rank 0 and rank 1 of a 2-rank run see them, in this process."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runtime, "ERROR_WAIT_S", 0.5)
    return store


def test_exit_once_keeps_a_failure_of_one_rank_visible(agent_store, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert runtime.exit_once("disk full on node 2") == "rank 1: disk full on node 2"  # rank 0 runs on: it alone failed
    monkeypatch.setenv("RANK", "0")
    assert runtime.exit_once("no data folder x") == 1
    assert capsys.readouterr().err == "no data folder x\n"  # printed by rank 0 itself, before it exits
    monkeypatch.setenv("RANK", "1")
    assert runtime.exit_once("no data folder x") == 1  # the message rank 0 printed: quiet
    assert runtime.exit_once("bad checkpoint on node 2") == "rank 1: bad checkpoint on node 2"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.delenv("RANK", raising=False)


def test_one_process_auto_falls_back_to_cpu(no_cuda):
    assert runtime.pick_device("auto") == torch.device("cpu")
    assert runtime.setup_distributed("auto") == runtime.Dist(0, 0, 1, torch.device("cpu"))


def test_explicit_cuda_without_cuda_names_build_driver_and_fix(no_cuda, monkeypatch, tmp_path):
    # a driver whose nvidia-smi reports CUDA 12.8, too old for a CUDA 13 build of torch
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '| NVIDIA-SMI 570.86.15    Driver Version: 570.86.15    CUDA Version: 12.8  |'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 12080).")

    monkeypatch.setattr(torch.cuda, "init", init)
    with pytest.raises(SystemExit) as err:
        runtime.pick_device("cuda")
    message = str(err.value.code)
    assert message.startswith("--device cuda " + NO_CUDA)
    for part in ("is built for CUDA 13.0", "driver 570.86.15, CUDA up to 12.8", "driver on your system is too old",
                 "--index-url https://download.pytorch.org/whl/cu128", 'index = "pytorch-cu128"'):
        assert part in message, part
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit, match="is a CPU-only torch build"):
        runtime.pick_device("cuda:0")
    with pytest.raises(SystemExit, match="--device gpu: not a device torch knows"):
        runtime.pick_device("gpu")


def test_sigterm_to_torchrun_checkpoints_and_resume_is_identical(shards, tmp_path):
    log = open(tmp_path / "spot.log", "w")
    proc = subprocess.Popen(torchrun_cmd(shards, tmp_path, "spot", "--max-steps", "200"), cwd=ROOT, env=ENV,
                            stdout=log, stderr=subprocess.STDOUT)
    steps_done = lambda: len(train_losses(tmp_path / "spot")) if (tmp_path / "spot" / "metrics.jsonl").exists() else 0
    deadline = time.time() + 240  # torchrun and two ranks importing torch on a busy machine
    while proc.poll() is None and time.time() < deadline and steps_done() < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to torchrun only, as a spot reclaim does: it forwards SIGTERM to the ranks
    proc.wait(timeout=120)
    log.close()
    output = (tmp_path / "spot.log").read_text()
    # torchrun itself exits 1 (it re-raises the signal as an exception, README); the ranks must finish cleanly
    assert "forcefully exiting" not in output, output[-3000:]  # torchrun's words when it SIGKILLs after its grace
    ckpts = sorted((tmp_path / "spot").glob("ckpt_*.pt"))
    assert len(ckpts) == 1, output[-3000:]
    stopped_at = torch.load(ckpts[0], weights_only=True)["step"]
    assert 3 <= stopped_at < 200
    assert [r["step"] for r in train_losses(tmp_path / "spot")] == list(range(1, stopped_at + 1))

    until = ["--max-steps", "200", "--stop-at", str(stopped_at + 3)]
    for name in ("spot", "straight"):  # resume with the same command, and a run that never stopped
        proc = run_torchrun(torchrun_cmd(shards, tmp_path, name, *until))
        assert proc.returncode == 0, proc.stderr[-3000:]
    spot, straight = train_losses(tmp_path / "spot"), train_losses(tmp_path / "straight")
    assert [r["step"] for r in spot] == list(range(1, stopped_at + 4))
    assert [r["loss"] for r in spot] == [r["loss"] for r in straight]  # bit-identical on CPU
