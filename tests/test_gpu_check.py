"""gpu_check.py: its dry run goes through every section on the CPU and prints the one table; a failing section
is reported in its row and in the exit code, and the other sections still run."""

import subprocess
import sys

import torch

from conftest import ROOT
from tools import gpu_check


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # without the header


def test_dry_run_prints_every_row(tmp_path):
    cmd = [sys.executable, "-m", "tools.gpu_check", "--dry-run", "--device", "cpu", "--log-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"## gpu_check: cpu (dry run), torch {torch.__version__}")
    rows = table_rows(proc.stdout)
    assert [(check, setting.split(",")[0]) for check, setting, _, _ in rows] == [
        ("cuda tests", "`pytest -m cuda -q`"),
        ("train step", "gpt2-124m (tiny) B=2 T=32"), ("train step", "gpt2-124m (tiny) B=4 T=32"),
        ("train step", "gpt2-124m-modern (tiny) B=2 T=32"), ("train step", "gpt2-124m-modern (tiny) B=4 T=32"),
        ("train step", "gpt2-124m-speedrun (tiny) B=2 T=32"), ("train step", "gpt2-124m-speedrun (tiny) B=4 T=32"),
        ("train step", "gpt2-124m (tiny) B=2 T=32"), ("checkpoint save", "gpt2-124m (tiny) model + AdamW state")]
    # the loop's loss on this device (chunked on the CPU), then the other one for gpt2-124m at the small batch
    assert [setting.split(", ")[-1] for _, setting, _, _ in rows[1:8]] == ["chunked loss"] * 6 + ["full loss"]
    assert rows[0][2].endswith("skipped") and "failed" not in rows[0][2]  # the GPU tests, collected and skipped
    assert all("ms/step" in result and "tok/s" in result for _, _, result, _ in rows[1:8])
    assert "MB in" in rows[8][2]
    assert all(float(seconds) >= 0 for *_, seconds in rows)
    assert list(tmp_path.iterdir()) == []  # the timed checkpoints are gone
    assert "[gpu_check] checkpoint save" in proc.stderr  # progress, with each section's time, on stderr


def test_failed_section_is_reported_and_the_rest_still_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_tests", lambda dry_run, timeout: ("1 failed: tests/test_cuda.py::x", False))

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 6.00 GiB\nmore detail")

    monkeypatch.setattr(gpu_check, "bench_steps", out_of_memory)
    assert gpu_check.main(["--dry-run", "--device", "cpu", "--log-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert rows[0][2] == "1 failed: tests/test_cuda.py::x"
    assert all(r[2] == "failed: RuntimeError: CUDA out of memory. Tried to allocate 6.00 GiB" for r in rows[1:8])
    assert "MB in" in rows[8][2] and "a check FAILED" in out
