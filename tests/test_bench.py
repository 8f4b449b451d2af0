"""bench.py keeps working: it runs a training step and the loader on the CPU and reports consistent figures."""

import re

from tools import bench


def test_bench_cpu_reports_step_and_loader_figures(capsys):
    bench.main(["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "32", "--steps", "2",
                "--warmup", "1", "--loss", "both"])
    out = capsys.readouterr().out
    rows = re.findall(r"compile 0 \| loss (\w+)\s*:\s+([\d.]+) ms/step \|\s+([\d,]+) tok/s", out)
    assert [r[0] for r in rows] == ["chunked", "full"]
    for _, ms, tok_per_s in rows:  # tokens/s is B*T over the median step time
        ms, tok_per_s = float(ms), float(tok_per_s.replace(",", ""))
        # up to the printed rounding: ms to 0.05 (which moves 64000/ms by 64000 * 0.05 / ms^2), tok/s to 0.5
        assert abs(tok_per_s - 64_000 / ms) <= 64_000 * 0.05 / ms**2 + 0.5
    assert "MFU" not in out  # no known peak for a CPU: no made-up MFU
    assert re.search(r"loader: [\d,]+ batches/s", out)
