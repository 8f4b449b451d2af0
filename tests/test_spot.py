"""Spot instances: --checkpoint-sync copies each checkpoint off the box in the background (one sync at a time,
failures logged, the losses unchanged), a folder seeded from that copy resumes bit-identically, and tools/launch.py
installs, seeds and trains in one command, restarting a killed trainer and giving up after --max-restarts."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL, metrics, run

from gpt2.config import PRESET_DATA, PRESETS, TrainConfig, parse_config
from gpt2.sync import CheckpointSync
from tools import launch

COMMON = ["--max-steps", "8", "--checkpoint-every", "2", "--val-every", "0", "--sample-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> dict[int, float]:
    """Train losses by step of the uninterrupted run, without a sync."""
    log_dir = tmp_path_factory.mktemp("straight")
    run(shards, log_dir, *COMMON)
    return losses(log_dir)


def losses(log_dir, name="run") -> dict[int, float]:
    """Train loss by step; a step trained again after a resume counts once, its last record (as plot_logs reads)."""
    return {r["step"]: r["loss"] for r in metrics(log_dir, name)}


def markers(path: Path) -> list[tuple[str, str]]:
    """The sync commands' "start <ckpt>" and "end <ckpt> ..." lines, as (start or end, the rest)."""
    return [tuple(line.split(" ", 1)) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------- CheckpointSync alone


def test_sync_runs_one_at_a_time_and_coalesces_to_the_newest(tmp_path):
    run_dir, log = tmp_path / "my run", []  # a space: placeholders are filled shell-quoted
    run_dir.mkdir()
    marks = tmp_path / "marks"
    sync = CheckpointSync(f"echo start {{ckpt}} >> {marks}; sleep 0.3; echo end {{ckpt}} {{run}} >> {marks}",
                          str(run_dir), "r", log.append)
    for step in (2, 4, 6):  # 4 and 6 land while 2 syncs: 6 replaces 4, and syncs after 2
        sync.after_checkpoint(str(run_dir / f"ckpt_{step:07d}.pt"))
    sync.close()
    names = [f"{run_dir}/ckpt_0000002.pt", f"{run_dir}/ckpt_0000006.pt"]
    assert [m[0] for m in markers(marks)] == ["start", "end", "start", "end"]  # never two at once
    assert [m[1] for m in markers(marks)] == [names[0], names[0] + " r", names[1], names[1] + " r"]
    assert log[0] == "waiting for the checkpoint sync to finish (at most 600 s)"
    assert [line.split(" after ")[0] for line in log[1:]] == [
        "checkpoint sync of ckpt_0000002.pt: exit code 0", "checkpoint sync of ckpt_0000006.pt: exit code 0"]
    headers = [line for line in (run_dir / "sync.log").read_text().splitlines() if line.startswith("== ")]
    assert len(headers) == 4 and headers[1] == headers[3] == "== exit code 0"


def test_sync_failure_is_one_log_line_and_the_wait_is_bounded(tmp_path, monkeypatch):
    log = []
    sync = CheckpointSync("echo no route to backup-host; false", str(tmp_path), "r", log.append)
    sync.after_checkpoint(str(tmp_path / "ckpt_0000002.pt"))
    sync.close()
    assert log[1].startswith("checkpoint sync of ckpt_0000002.pt failed: exit code 1 after ")
    assert f"(its output: {tmp_path / 'sync.log'}); training goes on" in log[1]
    assert "no route to backup-host\n== exit code 1\n" in (tmp_path / "sync.log").read_text()
    monkeypatch.setattr(CheckpointSync, "WAIT_S", 0.2)
    sync = CheckpointSync("sleep 5", str(tmp_path), "r", log.append)
    sync.after_checkpoint(str(tmp_path / "ckpt_0000004.pt"))
    t0 = time.monotonic()
    sync.close()
    assert time.monotonic() - t0 < 2
    assert log[-1].startswith("the checkpoint sync is still running after 0.2 s: not waiting longer")


def test_sync_command_placeholders_are_checked(capsys):
    cfg, _ = parse_config(["--checkpoint-sync", "rsync -a {dir}/ host:${HOME}/runs/{run}/ # {ckpt}"])
    assert cfg.checkpoint_sync.startswith("rsync")
    assert TrainConfig().checkpoint_sync == ""  # off by default: nothing runs, nothing changes
    typo = ("unknown placeholder {ckpt_path}; the placeholders are {dir} (the run folder), {run} (the run name), "
            "{ckpt} (the checkpoint file)")
    for bad, why in [("cp {ckpt_path} /backup", typo), ("  ", "the command is blank")]:
        with pytest.raises(SystemExit):
            parse_config(["--checkpoint-sync", bad])
        assert why in capsys.readouterr().err


# ---------------------------------------------------------------------- the sync in a training run


def test_failing_sync_is_logged_and_training_is_unchanged(shards, tmp_path, straight):
    run(shards, tmp_path, *COMMON, "--checkpoint-sync", "false")
    assert losses(tmp_path) == straight
    log = (tmp_path / "run" / "log.txt").read_text()
    assert log.count("failed: exit code 1 after ") == log.count("checkpoint sync of ")  # one line per sync
    assert "checkpoint sync of ckpt_0000008.pt failed: exit code 1" in log  # the last one: waited for at the end


def test_slow_sync_never_runs_twice_at_once(shards, tmp_path, straight):
    marks = tmp_path / "marks"
    slow = f"echo start {{ckpt}} >> {marks}; sleep 0.5; echo end {{ckpt}} >> {marks}"
    run(shards, tmp_path, *COMMON, "--checkpoint-every", "1", "--checkpoint-sync", slow)
    kinds, names = [m[0] for m in markers(marks)], [Path(m[1]).name for m in markers(marks)]
    assert kinds == ["start", "end"] * (len(kinds) // 2)
    assert names[:2] == ["ckpt_0000001.pt"] * 2 and names[-2:] == ["ckpt_0000008.pt"] * 2  # the last one got off
    assert losses(tmp_path) == straight


def sha256_ok(path: Path) -> bool:
    digest, name = Path(f"{path}.sha256").read_text().split()
    return name == path.name and digest == hashlib.sha256(path.read_bytes()).hexdigest()


def seed(backup: Path, log_dir: Path, capsys) -> str:
    """tools/launch.py's seeding step alone (--seed-from a local folder); its log lines."""
    args, train_args = launch.parse_args(["--seed-from", str(backup), "--", "--log-dir", str(log_dir),
                                          "--run-name", "run"])
    capsys.readouterr()
    launch.Launcher(args, train_args).seed()
    return capsys.readouterr().err


def test_folder_seeded_from_the_synced_copy_resumes_bit_identically(shards, tmp_path, straight, capsys):
    backup = tmp_path / "backup"
    backup.mkdir()
    # the box "dies" after step 6: its checkpoint was synced before the process ended
    run(shards, tmp_path / "box1", *COMMON, "--stop-at", "6", "--checkpoint-sync", f"cp -r {{dir}}/. {backup}/")
    synced = sorted(backup.glob("ckpt_*.pt"))
    assert [p.name for p in synced] == [f"ckpt_{s:07d}.pt" for s in (2, 4, 6)]
    assert all(sha256_ok(p) for p in synced)

    err = seed(backup, tmp_path / "box2", capsys)
    assert "seed: the run resumes from ckpt_0000006.pt (its sha256 checked)" in err
    assert not (tmp_path / "box2" / "run" / "lock").exists()
    run(shards, tmp_path / "box2", *COMMON)
    assert losses(tmp_path / "box2") == straight and len(metrics(tmp_path / "box2")) == 8  # 1-6 synced, 7-8 new

    (backup / "ckpt_0000006.pt").write_bytes(synced[-1].read_bytes()[:1000])  # cut short on the way
    err = seed(backup, tmp_path / "box3", capsys)
    assert "seed: ckpt_0000006.pt does not match its .sha256 (cut short or corrupted)" in err
    assert "seed: the run resumes from ckpt_0000004.pt" in err
    run(shards, tmp_path / "box3", *COMMON)  # the trainer skips it too, and trains 5-8 again
    assert losses(tmp_path / "box3") == straight


# ---------------------------------------------------------------------- the launcher


def fake_nvidia_smi(tmp_path, monkeypatch, gpus: int):
    """An nvidia-smi first on PATH: `-L` lists `gpus` GPUs, or fails as it does without a driver."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    listing = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})'\n" for i in range(gpus))
    script = listing or "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver'\nexit 9\n"
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n" + script)
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("gpus", [2, 0])
def test_launcher_plan_follows_the_gpus(tmp_path, monkeypatch, capsys, gpus):
    fake_nvidia_smi(tmp_path, monkeypatch, gpus)
    assert launch.main(["--dry-run", "--seed-from", "backup-host:runs/r", "--", "--preset", "tiny", "--data-dir",
                        str(tmp_path / "data"), "--log-dir", str(tmp_path), "--run-name", "r"]) == 0
    plan = [line.removeprefix("launch: ") for line in capsys.readouterr().err.splitlines()]
    flags = f"--preset tiny --data-dir {tmp_path / 'data'} --log-dir {tmp_path} --run-name r"
    build = PRESET_DATA["tiny"].removeprefix("python ")  # the tiny preset's data, as README builds it
    assert plan[0] == "install: would run uv sync --locked" + (" --extra gpu" if gpus else "")
    assert plan[1] == f"data: would run uv run python {build} --out {tmp_path}/data"
    assert plan[2] == f"seed: would run rsync -a --exclude lock --exclude '*.tmp' backup-host:runs/r/ {tmp_path}/r/"
    if gpus:
        assert plan[4] == f"train: would run uv run torchrun --standalone --nproc-per-node=2 train_gpt2.py {flags}"
    else:
        assert plan[3] == ("no GPU (`nvidia-smi -L` lists none, or --gpus 0): one process on the CPU, python, not "
                           "torchrun")
        assert plan[4] == f"train: would run uv run python train_gpt2.py {flags}"


def test_launcher_defaults_are_the_trainers():
    assert launch.DEFAULT_LOG_DIR == TrainConfig().log_dir and launch.DATA_DIRS[""] == TrainConfig().data_dir
    assert parse_config([])[1] == launch.DEFAULT_PRESET
    for preset, values in PRESETS.items():
        kind = "tiny" if preset.startswith("tiny") else ""
        assert values.get("data_dir", TrainConfig().data_dir) == launch.DATA_DIRS[kind]
        assert PRESET_DATA.get(preset, "python fineweb_edu.py") == " ".join(["python fineweb_edu.py",
                                                                             *launch.DATA_FLAGS[kind]])


def launcher(shards, log_dir, *args, train=()) -> list[str]:
    """python -m tools.launch without uv: this interpreter trains, on the CPU, restarts without delay."""
    return [sys.executable, "-m", "tools.launch", "--no-sync", "--gpus", "0", "--python", sys.executable,
            "--restart-delay", "0", *args, "--", "--preset", "tiny", "--data-dir", shards, "--log-dir", str(log_dir),
            "--run-name", "run", *SMALL, *train]


def run_launcher(cmd: list[str]) -> subprocess.CompletedProcess:
    # the trainers it launches use this process's thread count, as the in-process `straight` run did: CPU sums
    # (so the losses' last bits) depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def test_launcher_restarts_a_killed_trainer_which_resumes_identically(shards, tmp_path, straight):
    mark = tmp_path / "killed-once"
    kill_once = f"test -e {mark} || {{ touch {mark}; kill -9 $PPID; }}"  # the sync's parent is the trainer
    proc = run_launcher(launcher(shards, tmp_path, train=[*COMMON, "--checkpoint-sync", kill_once]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert f"data: {shards} is built (its manifest is complete)" in log
    assert f"launch: train: running {sys.executable} train_gpt2.py --preset tiny" in log  # python, not torchrun
    assert "launch: train: failed (killed by SIGKILL): restart 1 of 3 in 0 s" in log
    assert "launch: train (restart 1 of 3): running " in log and "launch: train: done (exit code 0)" in log
    assert "resumed from " in (tmp_path / "run" / "log.txt").read_text()
    assert losses(tmp_path) == straight


def test_sigterm_to_the_launcher_stops_the_trainer_with_a_checkpoint_and_no_restart(shards, tmp_path):
    cmd = launcher(shards, tmp_path, train=["--max-steps", "100000", "--checkpoint-every", "0", "--val-every", "0",
                                            "--sample-every", "0", "--device", "cpu"])
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not ((tmp_path / "run" / "metrics.jsonl").exists() and metrics(tmp_path)):  # a step: the handlers are in
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to the launcher only: it passes it on to the trainer
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, err[-3000:]
    assert "launch: train: stopped by SIGTERM (exit code 0), not restarting" in err and "restart 1" not in err
    (ckpt,) = (tmp_path / "run").glob("ckpt_*.pt")
    assert ckpt.name == f"ckpt_{metrics(tmp_path)[-1]['step']:07d}.pt"


def test_launcher_gives_up_after_max_restarts(shards, tmp_path):
    proc = run_launcher(launcher(shards, tmp_path, "--max-restarts", "1", train=["--no-such-flag"]))
    assert proc.returncode == 1
    assert proc.stderr.count("unrecognized arguments: --no-such-flag") == 2
    assert "launch: train: failed (exit code 2): restart 1 of 1 in 0 s" in proc.stderr
    assert f"launch: train: failed 2 times (--max-restarts 1), the last time with exit code 2: giving up; see " \
           f"{tmp_path / 'run' / 'log.txt'}" in proc.stderr


def test_launcher_runs_as_a_script_without_the_repo_on_its_path(tmp_path):
    proc = subprocess.run([sys.executable, "-I", str(ROOT / "tools" / "launch.py"), "--dry-run", "--gpus", "0", "--",
                           "--run-name", "r"], cwd=tmp_path, capture_output=True, text=True)  # -I: stdlib only
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[-1] == "launch: train: would run uv run python train_gpt2.py --run-name r"
