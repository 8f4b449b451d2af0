"""plot_logs.py on synthetic metrics files: a run cut off mid-line and a resumed run; the GPT-2 / GPT-3 references
(a val reference cached as tools/reference_loss.py writes it), runs that ended in an error."""

import json
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import plot_logs
from tools import reference_loss

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
    # by hand, beta 0.5: (0.5 * 1) / 0.5 = 1, then (0.5 * 0.5 + 0.5 * 3) / (1 - 0.25) = 7/3
    assert plot_logs.ema([1.0, 3.0], 0.5) == pytest.approx([1.0, 7 / 3])


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


# ---------------------------------------------------------------------- references and errors


def _manifest(val_sha="aa" * 32):
    """A finished manifest as fineweb_edu.py writes it: plot_logs matches references on its val shards alone."""
    shard = {"tokens": 100, "docs": 1, "resume_doc": 0, "resume_offset": 0}
    return {"source": "x.txt", "txt_docs": "paragraphs", "tokenizer": "gpt2", "dtype": "uint16", "shard_size": 100,
            "max_tokens": None, "complete": True,
            "shards": [{"file": "val_000000.npy", "split": "val", "sha256": val_sha, **shard},
                       {"file": "train_000001.npy", "split": "train", "sha256": "bb" * 32, **shard}]}


def _reference_run(root, name, data_dir, val_tokens=65536, recs=None):
    """A run folder with metrics (by default run_a of the logs fixture's kind) and a config.json on data_dir."""
    recs = recs if recs is not None else _segment(random.Random(name), range(30), t0=0.0)
    _write(root / name / "metrics.jsonl", [json.dumps(r).encode() + b"\n" for r in recs])
    config = {"data_dir": str(data_dir), "seq_len": 128, "val_tokens": val_tokens, "batch_size": 16, "model": {}}
    (root / name / "config.json").write_text(json.dumps(config))
    return recs


@pytest.fixture
def with_reference(tmp_path):
    """logs/ holding a GPT-2 val reference cached for data/ (a manifest only: matching reads no shard), and a run
    on data/ at its settings."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps(_manifest()))
    ref = {"kind": reference_loss.KIND, "model": "gpt2", "data_dir": str(data), "seq_len": 128, "val_tokens": 65536,
           "val_identity": reference_loss.val_identity(_manifest()), "loss": 3.3333, "bpb": 1.1, "tokens": 65536}
    (tmp_path / "logs" / "reference").mkdir(parents=True)
    (tmp_path / "logs" / "reference" / "gpt2_0123.json").write_text(json.dumps(ref))
    recs = _segment(random.Random(3), range(30), t0=0.0)
    for r in recs:  # val losses within a nat of GPT-2's, where the val panel draws its line
        r.update({"loss": 4.0 - r["step"] / 100} if r["kind"] == "val" else {})
    return tmp_path, ref, _reference_run(tmp_path / "logs", "run", data, recs=recs)


REFERENCE_LABELS = {"OpenAI GPT-2 124M (0.2955)", "GPT-3 Small 125M, 0-shot (0.337)"}


def test_reference_lines_and_gaps(with_reference, tmp_path, capsys):
    root, ref, recs = with_reference
    files = {"run": (root / "logs" / "run" / "metrics.jsonl").resolve()}
    val_refs, notes = plot_logs.val_references(files)
    assert val_refs == {"run": ref} and notes == []
    runs = {"run": plot_logs.load_run(files["run"])}
    labels = plot_logs.legend_labels(plot_logs.figure(runs, val_refs=val_refs))
    assert REFERENCE_LABELS | {"GPT-2 (gpt2) on data val (3.3333)"} <= set(labels)
    assert set(plot_logs.legend_labels(plot_logs.figure(runs, reference=False, val_refs=val_refs))) == {"run"}

    out = tmp_path / "out" / "runs.png"
    plot_logs.main([str(root / "logs"), "--out", str(out)])
    row = _parse_table(capsys.readouterr().out)["run"]
    want = _expected(recs)
    assert row["Δ GPT-2 val loss"] == f"{want['final_val_loss'] - 3.3333:+.4f}"
    assert row["Δ GPT-2 HellaSwag"] == f"{want['best_acc_norm'] - 0.2955:+.4f}"
    assert row["Δ GPT-3 HellaSwag"] == f"{want['best_acc_norm'] - 0.337:+.4f}"
    plot_logs.main([str(root / "logs"), "--out", str(out), "--no-reference"])
    assert not [h for h in _parse_table(capsys.readouterr().out)["run"] if h.startswith("Δ")]
    assert "Δ" not in out.with_suffix(".md").read_text(encoding="utf-8")


def test_val_reference_needs_same_val_shards_and_settings(with_reference, capsys):
    root, ref, _ = with_reference
    logs = root / "logs"
    other = root / "other"  # the same folder name rebuilt from another source: other val shards
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps(_manifest(val_sha="cc" * 32)))
    _reference_run(logs, "other_data", other)
    _reference_run(logs, "other_val_tokens", root / "data", val_tokens=32768)
    _reference_run(logs, "data_not_here", ref["data_dir"] + "_laptop")
    plot_logs.main([str(logs), "--out", str(root / "runs.png")])
    captured = capsys.readouterr()
    table = _parse_table(captured.out)
    assert table["run"]["Δ GPT-2 val loss"] != "-"
    assert [table[n]["Δ GPT-2 val loss"] for n in ("other_data", "other_val_tokens", "data_not_here")] == ["-"] * 3
    notes = [line for line in captured.err.splitlines() if line.startswith("GPT-2 val loss")]
    assert len(notes) == 3
    assert notes[1] == (f"GPT-2 val loss: not computed for {other} (seq_len 128, val_tokens 65536); `python -m "
                        f"tools.reference_loss --model gpt2 --data-dir {other} --seq-len 128 --val-tokens 65536 "
                        f"--batch-size 16 --log-dir {logs.resolve()}` computes it")


def test_val_reference_by_folder_name_where_the_data_is_not_here(with_reference, capsys):
    """Logs copied to a laptop: no shards to identify, so the reference computed for the same data_dir counts."""
    root, ref, _ = with_reference
    (root / "data" / "manifest.json").unlink()
    plot_logs.main([str(root / "logs"), "--out", str(root / "runs.png")])
    captured = capsys.readouterr()
    assert _parse_table(captured.out)["run"]["Δ GPT-2 val loss"] != "-"
    assert f"GPT-2 val loss for {ref['data_dir']}: matched by the folder's name" in captured.err


def _error(step, message="CUDA error: out of memory"):
    return {"kind": "error", "step": step, "tokens": step * TOKENS_PER_STEP, "time": 9.0, "message": message}


def test_error_marks_the_run_until_a_train_record_follows(tmp_path, capsys):
    rng, path = random.Random(2), tmp_path / "logs" / "crashed" / "metrics.jsonl"
    _write(path, [json.dumps(r).encode() + b"\n" for r in _segment(rng, range(30), 0.0) + [_error(30)]])
    _write(tmp_path / "logs" / "fine" / "metrics.jsonl", [json.dumps(r).encode() + b"\n"
                                                          for r in _segment(rng, range(30), 0.0)])
    out = tmp_path / "runs.png"

    def draw():
        plot_logs.main([str(tmp_path / "logs"), "--out", str(out)])
        captured = capsys.readouterr()
        runs = {n: plot_logs.load_run(tmp_path / "logs" / n) for n in ("crashed", "fine")}
        return _parse_table(captured.out), captured.err, set(plot_logs.legend_labels(plot_logs.figure(runs)))

    table, err, labels = draw()
    assert table["crashed"]["error at step"] == "30" and table["fine"]["error at step"] == "-"
    assert err.count("CUDA error: out of memory") == 1 and "crashed: error at step 30: CUDA error" in err
    assert {"crashed (error at step 30)", "fine"} <= labels and "crashed" not in labels

    def append(*recs):
        with open(path, "ab") as f:
            f.write(b"".join(json.dumps(r).encode() + b"\n" for r in recs))

    append(*_segment(rng, range(20, 25), 50.0), _error(24, "stopping: disk full"))  # resumed, died again
    table, err, labels = draw()
    assert table["crashed"]["error at step"] == "24" and "crashed: error at step 24: stopping: disk full" in err
    append(*_segment(rng, range(20, 22), 80.0))  # resumed again and went on: no mark
    table, err, labels = draw()
    assert "error at step" not in table["crashed"] and "error at step" not in err and "crashed" in labels


def test_crossing_interpolates_between_the_evaluations_around_the_target():
    curve = [(6.0, 0, 0.0), (5.0, 100, 10.0), (4.0, 200, 30.0)]  # (loss, tokens, seconds)
    # 4.5 is half way from 5.0 (100 tokens, 10 s) to 4.0 (200 tokens, 30 s)
    assert plot_logs.crossing(curve, 4.5) == (2, (150.0, 20.0))
    assert plot_logs.crossing(curve, 5.0) == (1, (100.0, 10.0))
    assert plot_logs.crossing(curve, 7.0) == (0, (0.0, 0.0))  # the first evaluation is already there
    assert plot_logs.crossing(curve, 3.9) is None
