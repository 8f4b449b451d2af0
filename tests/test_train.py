"""train_gpt2.py on CPU: it learns, DDP equals gradient accumulation, resume is exact, the schedule scales every
optimizer, bad input fails clearly."""

import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import hellaswag
import model as model_module
import train_gpt2
from conftest import ROOT, SMALL, metrics, run, torchrun
from gpt2.config import TrainConfig, parse_config

FIXTURE = ROOT / "tests" / "data" / "hellaswag_fixture.jsonl"


def test_tiny_preset_learns_shakespeare(shards, tmp_path):
    # measured (CPU, seed 1337): val loss 10.84 at step 0 and 6.79 after these 40 steps (6.63 after 60, 7.30 after 30)
    result = run(shards, tmp_path, "--max-steps", "40", "--val-every", "40", "--sample-every", "0",
                 "--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--seq-len", "64", "--batch-size", "8",
                 "--total-batch-size", "512", "--val-tokens", "4096")
    val = metrics(tmp_path, kind="val")
    assert [r["step"] for r in val] == [0, 40]
    assert abs(val[0]["loss"] - math.log(50257)) < 0.3
    assert val[-1]["loss"] < 7.2  # 3.6 nats below ln(50257), 0.4 above the measured value
    assert result["val_loss"] == val[-1]["loss"]


def test_ddp_two_ranks_equal_gradient_accumulation(shards, tmp_path):
    steps = ["--max-steps", "4", "--val-every", "2", "--sample-every", "0"]
    torchrun(2, shards, tmp_path, *steps, name="ddp")
    run(shards, tmp_path, *steps, "--device", "cpu", name="accum")  # same total batch: 2 micro-steps, no process group
    ddp, accum = metrics(tmp_path, "ddp"), metrics(tmp_path, "accum")
    assert len(ddp) == len(accum) == 4
    for a, b in zip(ddp, accum):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a, b)
    for a, b in zip(metrics(tmp_path, "ddp", "val"), metrics(tmp_path, "accum", "val")):
        assert abs(a["loss"] - b["loss"]) <= 1e-5


@pytest.mark.parametrize("optimizer", [[], ["--optimizer", "muon", "--schedule", "wsd", "--muon-momentum-warmup", "5"]])
def test_resume_is_bit_identical(shards, tmp_path, optimizer):
    common = ["--max-steps", "8", "--val-every", "4", "--sample-every", "4", "--checkpoint-every", "0", *optimizer]
    run(shards, tmp_path, *common, name="straight")
    run(shards, tmp_path, *common, "--stop-at", "4", name="resumed")
    assert sorted(p.name for p in (tmp_path / "resumed").glob("ckpt_*.pt")) == ["ckpt_0000004.pt"]
    run(shards, tmp_path, *common, "--resume", "auto", name="resumed")
    for kind in ("train", "val", "sample"):
        a, b = metrics(tmp_path, "straight", kind), metrics(tmp_path, "resumed", kind)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        key = "samples" if kind == "sample" else "loss"
        assert [r[key] for r in a] == [r[key] for r in b], kind  # exact equality: bit-identical on CPU


def test_finished_run_asked_to_stop_earlier_does_nothing(shards, tmp_path):
    common = ["--max-steps", "8", "--val-every", "4", "--sample-every", "4", "--checkpoint-every", "0"]
    run(shards, tmp_path, *common)
    assert run(shards, tmp_path, *common, "--stop-at", "4")["step"] == 8
    assert len(metrics(tmp_path)) == 8
    assert [r["step"] for r in metrics(tmp_path, kind="val")] == [0, 4, 8]  # step 8 is not evaluated again


def test_schedule_scales_every_optimizer_and_logs_adamw_lr(shards, tmp_path):
    run(shards, tmp_path, "--optimizer", "muon", "--muon-momentum-warmup", "5", "--max-steps", "10", "--stop-at", "4",
        "--val-every", "0", "--sample-every", "0")
    # by hand: warm-up over 2 steps, then cosine from 1 to min_lr_ratio 0.1 over steps 2..10
    multiplier = {0: 0.5, 1: 1.0, 2: 1.0, 3: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 1 / 8))}
    assert [r["lr"] for r in metrics(tmp_path)] == pytest.approx([3e-3 * multiplier[s] for s in range(4)])
    # the checkpoint after step 3's update holds the lr and momentum that update used
    adamw, muon = torch.load(tmp_path / "run" / "ckpt_0000004.pt", weights_only=True)["optimizers"]
    assert [g["lr"] for g in adamw["param_groups"]] == pytest.approx([3e-3 * multiplier[3]] * 2)
    assert [g["lr"] for g in muon["param_groups"]] == pytest.approx([0.02 * multiplier[3]])  # --muon-lr 0.02
    assert muon["param_groups"][0]["momentum"] == pytest.approx(0.85 + 3 / 5 * (0.95 - 0.85))


def test_sigterm_checkpoints_and_resume_is_identical(shards, tmp_path):
    common = ["--max-steps", "200", "--val-every", "0", "--sample-every", "0", "--checkpoint-every", "0"]
    cmd = [sys.executable, str(ROOT / "train_gpt2.py"), "--preset", "tiny", "--data-dir", shards, "--log-dir",
           str(tmp_path), "--run-name", "spot", *SMALL, *common]
    # this process's thread count, as the resume and the straight run below have it: CPU sums depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    log = tmp_path / "spot" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or log.read_text().count("\n") < 5):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    ckpts = list((tmp_path / "spot").glob("ckpt_*.pt"))
    assert len(ckpts) == 1
    stopped_at = torch.load(ckpts[0], weights_only=True)["step"]
    assert 5 <= stopped_at < 200
    # resume (here: the checkpoint crosses from the stopped process) to a point past the interruption, and compare
    # with a run that never stopped
    run(shards, tmp_path, *common, "--stop-at", str(stopped_at + 5), name="spot")
    run(shards, tmp_path, *common, "--stop-at", str(stopped_at + 5), name="straight")
    spot, straight = metrics(tmp_path, "spot"), metrics(tmp_path, "straight")
    assert [r["step"] for r in spot] == list(range(1, stopped_at + 6))
    assert [r["loss"] for r in spot] == [r["loss"] for r in straight]


def test_compile_runs_a_step_val_and_sample(shards, tmp_path):
    common = ["--max-steps", "1", "--val-every", "1", "--sample-every", "1"]
    run(shards, tmp_path, "--compile", "1", *common, name="compiled")
    run(shards, tmp_path, "--compile", "0", *common, name="eager")
    assert "compile True" in (tmp_path / "compiled" / "log.txt").read_text()
    for kind, count in (("train", 1), ("val", 2)):  # the compiled graphs compute what the eager model does
        compiled, eager = metrics(tmp_path, "compiled", kind), metrics(tmp_path, "eager", kind)
        assert len(compiled) == len(eager) == count
        assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(compiled, eager)), (compiled, eager)
    samples = metrics(tmp_path, "compiled", kind="sample")[-1]["samples"]
    assert len(samples) == 4 and all(s.startswith("Hello, I'm a language model,") for s in samples)


def test_nan_loss_stops_and_keeps_last_checkpoint(shards, tmp_path, monkeypatch):
    run(shards, tmp_path, "--max-steps", "10", "--stop-at", "3", "--val-every", "0", "--sample-every", "0")
    ckpt = tmp_path / "run" / "ckpt_0000003.pt"
    before = ckpt.read_bytes()
    forward = model_module.GPT.forward
    calls = []

    def poisoned(self, idx, targets=None, return_logits=True):
        logits, loss = forward(self, idx, targets, return_logits)
        calls.append(1)
        return logits, loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(model_module.GPT, "forward", poisoned)
    with pytest.raises(SystemExit, match="not finite"):
        run(shards, tmp_path, "--max-steps", "10", "--val-every", "0", "--sample-every", "0")
    assert [p.name for p in (tmp_path / "run").glob("ckpt_*.pt")] == ["ckpt_0000003.pt"]
    assert ckpt.read_bytes() == before
    assert torch.load(ckpt, weights_only=True)["step"] == 3


def test_checkpoint_loads_in_the_standalone_hellaswag(shards, tmp_path, capsys):
    run(shards, tmp_path, "--max-steps", "10", "--stop-at", "3", "--val-every", "0", "--sample-every", "0")
    # README: hellaswag.py --checkpoint
    ckpt_path = tmp_path / "run" / "ckpt_0000003.pt"
    hellaswag.main(["--checkpoint", str(ckpt_path), "--data", str(FIXTURE), "--device", "cpu"])
    # the same scores from the checkpoint's weights, put into a model by hand
    ckpt = torch.load(ckpt_path, weights_only=True)
    model = model_module.GPT(model_module.GPTConfig(**ckpt["model_config"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    expected = hellaswag.evaluate(model.eval(), hellaswag.load_examples(str(FIXTURE)), "cpu")
    assert f"acc {expected['acc']:.4f} acc_norm {expected['acc_norm']:.4f} count 10" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--total-batch-size", "1000"], "not divisible"),
    (["--data-dir", "/nonexistent/shards"], "fineweb_edu.py"),
    (["--hellaswag-every", "5", "--hellaswag-data", "/nonexistent/hellaswag.jsonl"], "--hellaswag-every 0"),
    (["--seq-len", "8192", "--total-batch-size", "32768"], "lower batch_size or seq_len"),
    (["--max-steps", "10", "--stop-at", "20"], "past --max-steps"),
])
def test_bad_flags_fail_before_work(shards, tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        run(shards, tmp_path, *args)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("args,message", [(["--preset", "gpt5"], "invalid choice: 'gpt5'"),
                                          (["--dtype", "fp16"], "invalid choice: 'fp16'")])
def test_unknown_preset_or_value_is_a_usage_error(args, message, capsys):
    with pytest.raises(SystemExit):
        train_gpt2.main(args)
    assert message in capsys.readouterr().err


def test_config_rejects_a_value_outside_its_choices():
    with pytest.raises(ValueError, match="dtype must be one of"):
        TrainConfig(dtype="fp16")  # e.g. a preset's value, or code building a config directly


def test_resume_refuses_changed_settings(shards, tmp_path):
    run(shards, tmp_path, "--max-steps", "2", "--val-every", "0", "--sample-every", "0")
    with pytest.raises(SystemExit, match="--n-embd: checkpoint 32, now 64"):
        run(shards, tmp_path, "--max-steps", "2", "--n-embd", "64")


@pytest.mark.parametrize("args,message", [
    (["--muon-fixed-norm", "1"], "needs --optimizer muon"),
    (["--optimizer", "muon", "--muon-fixed-norm", "1", "--zero-init", "1"], "zero matrix would stay zero"),
    (["--ema-sigma-rel", "0.5"], "--ema-sigma-rel must be in"),
    (["--ema-snapshot-every", "10"], "needs --ema-sigma-rel"),
    (["--window", "-1"], "must be >= 0"),
    (["--n-kv-head", "5"], "n_head 12 is not divisible by n_kv_head 5"),
    (["--mode", "edm2", "--zero-init", "1"], "no direction"),
])
def test_inconsistent_flags_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(args)
    assert message in capsys.readouterr().err
