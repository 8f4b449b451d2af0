"""plot_logs.py on synthetic metrics files: a run cut off mid-line and a resumed run."""

import json
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import plot_logs

ROOT = Path(__file__).resolve().parent.parent
TOKENS_PER_STEP = 65536
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _segment(rng, steps, t0):
    """Records of steps in order, like train_gpt2.py writes them; eval every 10 steps."""
    recs = []
    for step in steps:
        tokens, time = (step + 1) * TOKENS_PER_STEP, t0 + 1.5 * step
        if step % 10 == 0:
            recs.append({"kind": "val", "step": step, "tokens": tokens, "time": time, "loss": rng.uniform(3, 8)})
            recs.append(
                {
                    "kind": "hellaswag",
                    "step": step,
                    "tokens": tokens,
                    "time": time,
                    "acc": rng.uniform(0.2, 0.3),
                    "acc_norm": rng.uniform(0.2, 0.35),
                    "count": 10042,
                }
            )
        recs.append(
            {
                "kind": "train",
                "step": step,
                "tokens": tokens,
                "time": time,
                "loss": rng.uniform(3, 11),
                "lr": 6e-4,
                "grad_norm": rng.uniform(0.2, 2),
                "dt_ms": 400.0,
                "tok_per_s": rng.uniform(1e5, 2e6),
                "mfu": None,
                "mem_gb": 30.5,
            }
        )
    return recs


def _expected(recs):
    """What the table must say, from the records of the final trajectory only."""

    def of(kind):
        return [r for r in recs if r["kind"] == kind]

    val = [r["loss"] for r in of("val")]
    return {
        "step": max(r["step"] for r in recs),
        "tokens": max(r["tokens"] for r in recs),
        "final_val_loss": val[-1],
        "final_val_bpb": None,
        "best_val_loss": min(val),
        "best_acc_norm": max(r["acc_norm"] for r in of("hellaswag")),
        "median_tok_per_s": statistics.median(r["tok_per_s"] for r in of("train")),
        "time": max(r["time"] for r in recs),
    }


def _write(path, lines):
    path.parent.mkdir(parents=True)
    path.write_bytes(b"".join(lines))


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("logs")

    # run_a: still being written; the last line stops inside a multi-byte character
    a = _segment(rng, range(50), t0=0.0)
    a.insert(3, {"kind": "mystery", "step": 1, "extra": [1, 2]})  # unknown kind: ignored
    a[5]["unknown_field"] = "ignored"
    partial = json.dumps({"kind": "val", "step": 50, "loss": 0.1, "note": "café"}, ensure_ascii=False).encode()
    partial = partial[: partial.index("é".encode()) + 1]
    _write(root / "run_a" / "metrics.jsonl", [json.dumps(r).encode() + b"\n" for r in a] + [partial])

    # run_b: ran to step 54, then resumed from the step-20 checkpoint and ran to step 59
    first = _segment(rng, range(55), t0=0.0)
    for r in first:  # abandoned values that would win best-of stats if not replaced
        r.update({"loss": 1.0, "acc_norm": 0.9, "tok_per_s": 1e9} if r["step"] >= 20 else {})
    resumed = _segment(rng, range(20, 60), t0=100.0)
    _write(root / "run_b" / "metrics.jsonl", [json.dumps(r).encode() + b"\n" for r in first + resumed])
    b = [r for r in first if r["step"] < 20] + resumed
    return root, {"run_a": _expected([r for r in a if r["kind"] != "mystery"]), "run_b": _expected(b)}


def _parse_table(md):
    header, _, *rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.strip().splitlines()]
    return {row[0]: dict(zip(header, row)) for row in rows}


def _from_count(text):
    scale = {"B": 1e9, "M": 1e6}.get(text[-1], 1)
    return float(text.rstrip("BM").replace(",", "")) * scale


def _check_table(md, expected):
    table = _parse_table(md)
    assert set(table) == set(expected)
    for name, want in expected.items():
        row = table[name]
        assert int(row["step"]) == want["step"]
        assert abs(_from_count(row["tokens"]) - want["tokens"]) <= 0.05e6
        assert row["final val loss"] == f"{want['final_val_loss']:.4f}"
        assert row["best val loss"] == f"{want['best_val_loss']:.4f}"
        assert row["best HellaSwag acc_norm"] == f"{want['best_acc_norm']:.4f}"
        assert abs(_from_count(row["median tok/s"]) - want["median_tok_per_s"]) <= 0.5


def _check_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 20_000


def test_summarize_uses_latest_records(logs):
    root, expected = logs
    for name, want in expected.items():
        assert plot_logs.summarize(plot_logs.load_run(root / name)) == pytest.approx(want)


def test_main(logs, tmp_path, capsys):
    root, expected = logs
    out = tmp_path / "plots" / "runs.png"
    plot_logs.main([str(root / "run_a"), str(root / "run_b" / "metrics.jsonl"), "--out", str(out)])
    _check_png(out)
    md = out.with_suffix(".md").read_text()
    assert capsys.readouterr().out == md
    _check_table(md, expected)


def test_cli_parent_folder(logs, tmp_path):
    root, expected = logs
    out = tmp_path / "cli.png"
    cmd = [sys.executable, "plot_logs.py", str(root), "--out", str(out), "--x", "time", "--labels", "A,B"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    _check_png(out)
    _check_table(proc.stdout, {"A": expected["run_a"], "B": expected["run_b"]})


def test_ema_is_debiased():
    assert plot_logs.ema([5.0, 5.0, 5.0], 0.9) == pytest.approx([5.0, 5.0, 5.0])
    assert plot_logs.ema([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_missing_kinds_still_plot(tmp_path):
    run = {"train": [{"kind": "train", "step": s, "tokens": s, "time": s, "loss": 5.0} for s in range(3)]}
    out = plot_logs.plot_runs({"only_train": run, "empty": {}}, tmp_path / "x.png", x="step")
    _check_png(out)
    assert "| empty | - | - |" in plot_logs.markdown_table({"empty": {}})


def test_val_bpb_column(logs):
    root, _ = logs
    runs = {name: plot_logs.load_run(root / name) for name in ("run_a", "run_b")}
    assert "bpb" not in plot_logs.markdown_table(runs)  # no run logs it: the table is as before
    for i, rec in enumerate(runs["run_b"]["val"]):
        rec["bpb"] = 1.0 + i / 100
    table = _parse_table(plot_logs.markdown_table(runs))
    last = runs["run_b"]["val"][-1]
    assert table["run_b"]["final val bpb"] == f"{last['bpb']:.4f}" and table["run_a"]["final val bpb"] == "-"
    assert table["run_b"]["final val loss"] == f"{last['loss']:.4f}"


def test_watch_redraws_when_metrics_grow(tmp_path, monkeypatch, capsys):
    """--watch until Ctrl-C: time.sleep stands in for the waits, and changes the logs as an rsync would between
    polls. A quiet poll draws nothing; a grown file (even by half a line) or a new run draws again."""
    rng, logs = random.Random(1), tmp_path / "logs"
    live = logs / "live" / "metrics.jsonl"
    _write(live, [json.dumps(r).encode() + b"\n" for r in _segment(rng, range(30), t0=0.0)])
    val = {"kind": "val", "step": 30, "tokens": 31 * TOKENS_PER_STEP, "time": 45.0, "loss": 2.5, "bpb": 1.125}
    line = json.dumps(val).encode() + b"\n"
    out = tmp_path / "plots" / "live.png"

    def append(data):
        with open(live, "ab") as f:
            f.write(data)

    def between_polls():
        yield  # 1: nothing new
        yield append(line[:20])  # 2: half a line, as a copy in progress leaves it
        yield append(line[20:])  # 3: the rest of it
        yield  # 4: nothing new
        yield _write(logs / "second" / "metrics.jsonl", [json.dumps(r).encode() + b"\n" for r in _segment(rng, [0], 0)])

    steps, pngs = between_polls(), []

    def fake_sleep(seconds):
        assert seconds == 7.5
        pngs.append(out.read_bytes())
        if next(steps, "done") == "done":
            raise KeyboardInterrupt  # the user's Ctrl-C

    monkeypatch.setattr(plot_logs.time, "sleep", fake_sleep)
    plot_logs.main([str(logs), "--out", str(out), "--watch", "7.5"])
    printed = [_parse_table(t) for t in re.split(r"(?m)^(?=\| run \|)", capsys.readouterr().out) if t]
    assert [list(t) for t in printed] == [["live"], ["live"], ["live"], ["live", "second"]]  # polls 2, 3 and 5 drew
    assert [t["live"]["step"] for t in printed] == ["29", "29", "30", "30"]
    assert "final val bpb" not in printed[1]["live"] and printed[2]["live"]["final val bpb"] == "1.1250"
    assert _parse_table(out.with_suffix(".md").read_text()) == printed[-1]
    assert pngs[3] != pngs[2] and out.read_bytes() != pngs[4]  # the new step, the new run
    _check_png(out)
