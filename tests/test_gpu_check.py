"""gpu_check.py: its dry run goes through every section on the CPU and prints the one table; a failing section
is reported in its row and in the exit code, and the other sections still run; --only picks sections; the fused-loss
row. gpu_quality.py: its dry run trains the three presets tiny on shards of the docs corpus and prints both tables,
and --presets' list instead (checked); the plan's budget, the data check, the command lines, and the time-to-baseline
figures against hand computations."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SHARED

from gpt2.config import PRESETS, TrainConfig
from tools import gpu_check, gpu_quality


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_dry_run_prints_every_row(tmp_path, capsys):
    code = gpu_check.main(["--dry-run", "--device", "cpu", "--log-dir", str(tmp_path)])  # here: one torch import less
    out, err = capsys.readouterr()
    assert code == 0, err[-3000:]
    assert out.startswith(f"## gpu_check: cpu (dry run), torch {torch.__version__}")
    rows = table_rows(out)
    assert [(check, setting.split(",")[0]) for check, setting, _, _ in rows] == [
        ("cuda tests", "`pytest -m cuda -q tests/test_cuda.py`"),
        ("train step", "gpt2-124m (tiny) B=2 T=32"), ("train step", "gpt2-124m (tiny) B=4 T=32"),
        ("train step", "gpt2-124m-modern (tiny) B=2 T=32"), ("train step", "gpt2-124m-modern (tiny) B=4 T=32"),
        ("train step", "gpt2-124m-speedrun (tiny) B=2 T=32"), ("train step", "gpt2-124m-speedrun (tiny) B=4 T=32"),
        ("train step", "gpt2-124m (tiny) B=2 T=32"), ("fused loss", "gpt2-124m (tiny) B=4 T=32"),
        ("moe step", "gpt2-124m (tiny) B=2 T=32"),
        *[("switch step", "gpt2-124m-speedrun (tiny) B=2 T=32")] * 6,
        ("checkpoint save", "gpt2-124m (tiny) model + AdamW state")]
    # the loop's loss on this device (chunked on the CPU), then the other one for gpt2-124m at the small batch
    assert [setting.split(", ")[-1] for _, setting, _, _ in rows[1:8]] == ["chunked loss"] * 6 + ["full loss"]
    assert rows[0][2].endswith("skipped") and "failed" not in rows[0][2]  # the GPU tests, collected and skipped
    assert all("ms/step" in result and "tok/s" in result for _, _, result, _ in rows[1:8])
    assert rows[8][2].startswith("skipped: needs CUDA and liger-kernel")  # the fused loss runs on CUDA only
    assert re.fullmatch(r"grouped [\d.]+ vs dense [\d.]+ ms/step \([\d,]+ vs [\d,]+ tok/s, [+-][\d.]+% grouped\)",
                        rows[9][2]), rows[9][2]
    assert rows[9][1].endswith("8 swiglu-oss experts top-2, float32, chunked loss, grouped vs dense")
    assert [setting.split(", + ")[1] for _, setting, _, _ in rows[10:16]] == [
        "bigram (--bigram-rows 754560)", "smear (--smear 1)", "backout (--backout 1)", "mudd (--mudd 1)",
        "attn-gate (--attn-gate 1)", "mtp 2 (--mtp 2)"]
    assert all(re.fullmatch(r"[\d.]+ vs [\d.]+ ms/step without it \([\d,]+ vs [\d,]+ tok/s, [+-][\d.]+% time\)", r[2])
               for r in rows[10:16]), rows[10:16]
    assert "MB in" in rows[16][2]
    assert all(float(seconds) >= 0 for *_, seconds in rows)
    assert list(tmp_path.iterdir()) == []  # the timed checkpoints are gone
    assert "[gpu_check] checkpoint save" in err  # progress, with each section's time, on stderr


def test_failed_section_is_reported_and_the_rest_still_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_tests", lambda dry_run, timeout: ("1 failed: tests/test_cuda.py::x", False))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 6.00 GiB\nmore detail")

    monkeypatch.setattr(gpu_check, "bench_steps", out_of_memory)
    assert gpu_check.main(["--dry-run", "--device", "cpu", "--log-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows[0][2] == "1 failed: tests/test_cuda.py::x"
    oom = "failed: RuntimeError: CUDA out of memory. Tried to allocate 6.00 GiB"
    assert all(r[2] == oom for r in rows[1:8]) and rows[9][2] == oom  # the train steps and the experts' row
    assert all(r[2] == oom for r in rows[10:16])  # the switches' rows
    assert "MB in" in rows[16][2] and "a check FAILED" in out


def test_only_runs_the_named_sections(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--device", "cpu", "--log-dir", str(tmp_path),
                           "--only", "fused-loss,checkpoint-save"]) == 0
    assert [row[0] for row in table_rows(capsys.readouterr().out)] == ["fused loss", "checkpoint save"]
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry-run", "--device", "cpu", "--only", "fused"])


def test_fused_loss_row_compares_liger_with_the_full_logits_loss(monkeypatch):
    """Where Liger is taken, the row measures it and then the full-logits loss, as the loop would run them."""
    measured = []

    def measure(cfg, device, steps, warmup, loss_mode, fused=False):
        measured.append((loss_mode, cfg.batch_size, fused))
        ms = 80.0 if fused else 100.0
        return {"step_ms": ms, "tok_per_s": 65536 / ms * 1000, "mem_gb": 20.0 if fused else 28.5}

    monkeypatch.setattr(gpu_check, "fused_wanted", lambda device_type: True)
    monkeypatch.setattr(gpu_check, "measure_step", measure)
    args = argparse.Namespace(dry_run=True, only="fused-loss", test_timeout=1, log_dir="unused")
    [(check, setting, run)] = gpu_check.sections(args, torch.device("cpu"))
    result, ok = run()
    assert ok and measured == [("full", 4, True), ("full", 4, False)]  # the row's own batch size
    assert result == ("fused 80.0 vs full 100.0 ms/step (819,200 vs 655,360 tok/s, +25.0% with Liger), "
                      "peak 20.00 vs 28.50 GiB")


def test_moe_row_compares_the_grouped_experts_with_the_dense_ones(monkeypatch):
    """The experts' row measures gpt2-124m with 8 swiglu-oss experts (top 2) as the model runs them, then densely."""
    measured = []

    def measure(cfg, device, steps, warmup, loss_mode, fused=False, moe_dense=False):
        m = cfg.model
        measured.append((m.moe_experts, m.moe_top_k, m.mlp, cfg.batch_size, loss_mode, fused, moe_dense))
        ms = 150.0 if moe_dense else 100.0
        return {"step_ms": ms, "tok_per_s": 32768 / ms * 1000, "mem_gb": 30.0 if moe_dense else 12.0}

    monkeypatch.setattr(gpu_check, "measure_step", measure)
    args = argparse.Namespace(dry_run=True, only="moe-step", test_timeout=1, log_dir="unused")
    [(check, setting, run)] = gpu_check.sections(args, torch.device("cpu"))
    result, ok = run()
    assert ok and measured == [(8, 2, "swiglu-oss", 2, "chunked", False, d) for d in (False, True)]
    # 32768 tokens / 0.1 s and / 0.15 s; 150 / 100 - 1 = +50%
    assert result == ("grouped 100.0 vs dense 150.0 ms/step (327,680 vs 218,453 tok/s, +50.0% grouped), "
                      "peak 12.00 vs 30.00 GiB")


def test_switch_rows_time_each_switch_against_the_preset_measured_once(monkeypatch):
    """Each switch row measures gpt2-124m-speedrun with that switch alone; the preset without it is measured once,
    for the first row, and every row compares with that measurement."""
    measured = []

    def measure(cfg, device, steps, warmup, loss_mode, fused=False, moe_dense=False):
        m = cfg.model
        on = [name for name, value in (("bigram", m.bigram_rows), ("smear", m.smear), ("backout", m.backout),
                                       ("mudd", m.mudd), ("attn-gate", m.attn_gate), ("mtp", m.mtp)) if value]
        measured.append((cfg.batch_size, m.n_layer, tuple(on)))
        ms = 100.0 + 10 * len(measured)
        return {"step_ms": ms, "tok_per_s": 32768 / ms * 1000, "mem_gb": 10.0 + len(measured)}

    monkeypatch.setattr(gpu_check, "measure_step", measure)
    args = argparse.Namespace(dry_run=True, only="switch-step", test_timeout=1, log_dir="unused")
    results = [run() for _, _, run in gpu_check.sections(args, torch.device("cpu"))]
    assert measured == [(2, 4, ()), (2, 4, ("bigram",)), (2, 4, ("smear",)), (2, 4, ("backout",)),
                        (2, 4, ("mudd",)), (2, 4, ("attn-gate",)), (2, 4, ("mtp",))]
    # the preset took 110 ms, the bigram row 120 ms: 120 / 110 - 1 = +9.1%; 32768 tokens / 0.12 s = 273,067 tok/s
    assert results[0] == ("120.0 vs 110.0 ms/step without it (273,067 vs 297,891 tok/s, +9.1% time), "
                          "peak 12.00 vs 11.00 GiB", True)
    assert results[4][0].startswith("160.0 vs 110.0 ms/step without it")  # the mtp row, against the same preset step


def test_measured_steps_take_the_fused_loss_only_when_asked(monkeypatch):
    seen = []
    monkeypatch.setattr(gpu_check, "bench_steps", lambda *a, **k: seen.append(os.environ[gpu_check.FUSED_ENV]))
    monkeypatch.setenv(gpu_check.FUSED_ENV, "1")
    cfg = gpu_check.bench_config("gpt2-124m", 2, dry_run=True)
    gpu_check.measure_step(cfg, torch.device("cpu"), 1, 0, "full")
    gpu_check.measure_step(cfg, torch.device("cpu"), 1, 0, "full", fused=True)
    assert seen == ["0", "1"] and os.environ[gpu_check.FUSED_ENV] == "1"  # put back as it was


# ---------------------------------------------------------------------- gpu_quality.py


@pytest.fixture(scope="module")
def doc_shards(tmp_path_factory) -> str:
    """40k tokens of the docs corpus in shards of 32 dry-run batches (4 x 32 tokens, +1): 14.7k val tokens, 6 full
    train shards; built by the real CLI, as the docstring's recipe does with larger numbers."""
    if not (SHARED / "docs").is_dir():
        pytest.fail(f"missing test data {SHARED / 'docs'}: these tests need the ../shared folder beside the repo")
    out = tmp_path_factory.mktemp("docs") / "docs"
    subprocess.run([sys.executable, str(ROOT / "fineweb_edu.py"), "--source", str(SHARED / "docs"), "--out", str(out),
                    "--max-tokens", "40000", "--shard-size", "4097", "--workers", "1"], check=True, capture_output=True)
    return str(out)


def test_quality_dry_run_trains_the_presets_and_prints_both_tables(doc_shards, tmp_path, capsys):
    out, logs = tmp_path / "out", tmp_path / "logs"
    code = gpu_quality.main(["--dry-run", "--device", "cpu", "--data-dir", doc_shards, "--out", str(out),
                             "--log-dir", str(logs)])  # the three runs are train_gpt2.py processes all the same
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    assert stdout.startswith(f"## gpu_quality: cpu (dry run: tiny runs), torch {torch.__version__}")
    assert "- estimate: 339 s (5.6 min) on one H100" in stdout  # the full plan's budget, also in a dry run
    tables = [block for block in stdout.split("\n\n") if block.startswith("| ")]
    summary, curves = ([[c.strip() for c in line.strip("|").split("|")] for line in t.splitlines()] for t in tables)
    assert summary[0] == [c.format(baseline="gpt2-124m") for c in gpu_quality.SUMMARY]
    assert [row[0] for row in summary[2:]] == gpu_quality.PRESETS
    for preset, tok_s, mfu, mem, first, final, tokens, seconds, wall in summary[2:]:
        assert float(tok_s.replace(",", "")) > 0 and (mfu, mem) == ("–", "–")  # MFU and memory: CUDA only
        assert first.endswith(" s") and 0 < float(final) < 11 and wall.endswith(" s")
        assert tokens == "not reached" or float(tokens.replace(",", "")) <= 6 * 128
    assert summary[2][6] != "not reached"  # the baseline reaches its own final loss
    assert curves[0] == ["step", "tokens", *gpu_quality.PRESETS]
    assert [(row[0], row[1]) for row in curves[2:]] == [("0", "0"), ("2", "256"), ("4", "512"), ("6", "768")]
    assert (out / "quality.md").read_text() == stdout
    assert (out / "quality.png").read_bytes().startswith(b"\x89PNG")
    configs = [json.loads((out / "runs" / p / "config.json").read_text()) for p in gpu_quality.PRESETS]
    assert [c["align_docs"] for c in configs] == ["0", "0", "0"]  # the speedrun's too: the same rows
    assert {(c["total_batch_size"], c["max_steps"], c["warmup_steps"], c["val_every"]) for c in configs} == {
        (128, 6, 2, 2)}
    assert list(logs.iterdir()) == [] and not list(out.rglob("*.pt"))  # the runs' checkpoints are gone


def test_quality_dry_run_trains_the_listed_presets_against_the_first(doc_shards, tmp_path, capsys):
    out = tmp_path / "out"
    code = gpu_quality.main(["--dry-run", "--device", "cpu", "--data-dir", doc_shards, "--out", str(out),
                             "--log-dir", str(tmp_path / "logs"), "--presets", "gpt2-124m,gpt2-124m-edm2"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr[-3000:]
    assert "plan: 2 presets x 200 steps" in stdout
    # 13,107,200 / 350k = 37 s; 9 x 1,048,576 / (3 x 350k) = 9 s; + 70 = 116.4 s; with gpt2-124m's 106.1 s: 222.6 s
    assert ("- gpt2-124m-edm2: 37 s of training at an assumed 350,000 tok/s + 9 s of evaluations + 60 s compile "
            "+ 10 s start-up = 116 s") in stdout
    assert "- estimate: 223 s (3.7 min) on one H100" in stdout
    assert "then gpt2-124m cosine, gpt2-124m-edm2 cosine, val every 2 steps" in stdout  # no --align-docs 0 here
    summary, curves = ([[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()]
                       for block in stdout.split("\n\n") if block.startswith("| "))
    assert summary[0][6:8] == ["tokens to gpt2-124m's final val", "training seconds to it"]
    assert [row[0] for row in summary[2:]] == ["gpt2-124m", "gpt2-124m-edm2"]
    assert summary[2][6] != "not reached" and 0 < float(summary[3][5]) < 11  # both trained and were evaluated
    assert curves[0] == ["step", "tokens", "gpt2-124m", "gpt2-124m-edm2"] and len(curves) == 2 + 4
    edm2 = json.loads((out / "runs" / "gpt2-124m-edm2" / "config.json").read_text())
    assert (edm2["preset"], edm2["model"]["mode"]) == ("gpt2-124m-edm2", "edm2")
    assert edm2["max_lr"] == PRESETS["gpt2-124m-edm2"]["max_lr"] != TrainConfig().max_lr  # its preset's own lr ran
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["gpt2-124m", "gpt2-124m-edm2"]


@pytest.mark.parametrize("presets, message", [
    ("gpt2-124m,tiny-edm2", "'tiny-edm2' is not a 124M preset"), ("gpt2-124m,gpt2-350m", "'gpt2-350m' is not a"),
    ("gpt2-124m-edm2,gpt2-124m,gpt2-124m-edm2", "lists gpt2-124m-edm2 twice"), ("", "names no preset"),
    (" , ", "names no preset")])
def test_quality_refuses_a_bad_preset_list_naming_the_124m_presets(presets, message, tmp_path):
    with pytest.raises(SystemExit) as stop:  # before any data check or run
        gpu_quality.main(["--dry-run", "--device", "cpu", "--data-dir", str(tmp_path / "none"), "--presets", presets])
    message_text, listed = str(stop.value).split("the 124M presets of gpt2/config.py: ")
    assert message in message_text and "tiny" not in listed  # the list: 124M presets only (more may come)
    assert {"gpt2-124m", "gpt2-124m-modern", "gpt2-124m-speedrun", "gpt2-124m-edm2",
            "gpt2-124m-hypersphere"} <= set(listed.split(", "))


def test_reach_interpolates_between_evaluations():
    # (step, tokens, training seconds, val loss)
    curve = [(0, 0, 0.0, 10.0), (25, 1000, 10.0, 6.0), (50, 2000, 20.0, 4.5), (75, 3000, 30.0, 5.2),
             (100, 4000, 40.0, 4.0)]
    assert gpu_quality.reach(curve, 5.0) == pytest.approx((1000 + 1000 * 2 / 3, 10 + 10 * 2 / 3))  # 6 -> 4.5
    assert gpu_quality.reach(curve, 4.5) == (2000, 20.0)
    assert gpu_quality.reach(curve, 4.25) == pytest.approx((3000 + 1000 * 0.95 / 1.2, 30 + 10 * 0.95 / 1.2))
    assert gpu_quality.reach(curve, 10.5) == (0.0, 0.0)  # the first evaluation already there
    assert gpu_quality.reach(curve, 3.9) is None


def record(kind, step, **values) -> str:
    return json.dumps({"kind": kind, "step": step, "tokens": step * 1000, "time": float(step), **values})


def test_read_run_and_the_summary_against_hand_computations(tmp_path):
    """Training seconds count the steps' own times, step 1 (the compile) at the median of the others."""
    runs = {}
    for preset, losses in [("gpt2-124m", [10.0, 7.0, 5.0]), ("gpt2-124m-modern", [10.0, 6.0, 4.0]),
                           ("gpt2-124m-speedrun", [10.0, 8.0, 6.0])]:
        path = tmp_path / preset / "metrics.jsonl"
        path.parent.mkdir()
        lines = [record("train", s, loss=1.0, dt_ms=dt, tok_per_s=1000 / dt * 1000, mfu=0.4, mem_gb=8.0 + s)
                 for s, dt in [(1, 30_000), (2, 100), (3, 120), (4, 110)]]
        lines += [record("val", s, loss=loss) for s, loss in zip((0, 2, 4), losses)]
        path.write_text("\n".join(lines) + "\n")
        runs[preset] = {**gpu_quality.read_run(path), "wall_s": 12.0, "error": None}
    base = runs["gpt2-124m"]
    assert [point[:2] for point in base["curve"]] == [(0, 0), (2, 2000), (4, 4000)]
    assert [point[2:] for point in base["curve"]] == [(0.0, 10.0), pytest.approx((0.21, 7.0)),
                                                      pytest.approx((0.44, 5.0))]
    assert (base["first_step_s"], base["tok_s"], base["mfu"], base["mem_gb"]) == (30.0, 1000 / 110 * 1000, 0.4, 12.0)
    runs["gpt2-124m-speedrun"]["error"] = "exit code 1: boom"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in gpu_quality.summary_table(runs)[2:]]
    # modern: 6.0 at 2,000 tokens (0.21 s), 4.0 at 4,000 (0.44 s): 5.0 halfway, 3,000 tokens and 0.325 s
    assert rows == [
        ["gpt2-124m", "9,091", "40.0%", "12.0 GiB", "30.0 s", "5.0000", "4,000", "0.4 s", "12 s"],
        ["gpt2-124m-modern", "9,091", "40.0%", "12.0 GiB", "30.0 s", "4.0000", "3,000", "0.3 s", "12 s"],
        ["gpt2-124m-speedrun", "9,091", "40.0%", "12.0 GiB", "30.0 s", "6.0000", "not reached", "not reached",
         "12 s (exit code 1: boom)"]]


def test_budget_of_the_full_plan_by_hand():
    lines = gpu_quality.budget(gpu_quality.FULL, gpu_quality.PRESETS)
    assert lines[0].startswith("plan: 3 presets x 200 steps x 65,536 tokens (B=64, T=1024) = 13.1M tokens each")
    # 13,107,200 tokens / 450k = 29 s; 9 evaluations x 1,048,576 / (3 x 450k) = 7 s; + 60 + 10 = 106 s
    assert lines[1] == ("- gpt2-124m: 29 s of training at an assumed 450,000 tok/s + 7 s of evaluations + 60 s "
                        "compile + 10 s start-up = 106 s")
    assert lines[-1] == "- estimate: 339 s (5.6 min) on one H100"  # 106.1 + 2 x 116.4


def test_check_data_refuses_missing_or_too_small_shards_with_the_recipe(doc_shards, tmp_path):
    assert gpu_quality.check_data(doc_shards, gpu_quality.DRY) == 512  # 4 val batches of 128 tokens
    with pytest.raises(SystemExit, match="--source ../shared/data/docs --out data/docs15m --max-tokens 15000000"):
        gpu_quality.check_data(str(tmp_path / "nothing"), gpu_quality.DRY)
    with pytest.raises(SystemExit, match="holds 0 train and 0 val batches of 65,536 tokens; the plan needs 200"):
        gpu_quality.check_data(doc_shards, gpu_quality.Plan(200, 16, 4096, 25, 65_536, 20))


def test_train_commands_differ_only_in_the_preset_and_the_speedrun_alignment():
    plan = gpu_quality.FULL
    cmds = {p: gpu_quality.train_command(p, plan, "data/docs", "logs/x", "cuda") for p in gpu_quality.PRESETS}
    flags = " ".join(cmds["gpt2-124m"][2:])
    assert ("--preset gpt2-124m --data-dir data/docs --log-dir logs/x --run-name gpt2-124m --device cuda "
            "--batch-size 64 --seq-len 1024 --total-batch-size 65536 --max-steps 200 --warmup-steps 20 "
            "--val-every 25 --val-tokens 1048576 --checkpoint-every 0 --hellaswag-every 0 --sample-every 0") == flags
    assert cmds["gpt2-124m-modern"][2:] == [a.replace("gpt2-124m", "gpt2-124m-modern") for a in cmds["gpt2-124m"][2:]]
    assert cmds["gpt2-124m-speedrun"][-2:] == ["--align-docs", "0"]
