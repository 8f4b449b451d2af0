"""ablate.py on tiny-shakespeare: two tiny configs train, plot and tabulate; re-running resumes; failures name the config."""

import json
import os

import pytest

from gpt2 import config
from tools import ablate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# a very small model on few tokens, after `--`: applies to every config
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--seq-len", "32",
        "--total-batch-size", "256", "--val-tokens", "512", "--hellaswag-every", "0", "--warmup-steps", "2",
        "--vocab-multiple", "128", "--max-steps", "4", "--val-every", "2", "--sample-every", "0",
        "--checkpoint-every", "0"]


@pytest.fixture(scope="module", autouse=True)
def bytecode_cache(tmp_path_factory):
    """Every run is a fresh python that imports torch. Where bytecode caching is off (PYTHONDONTWRITEBYTECODE),
    each would compile torch's sources again (~5 s on 2 cores): keep the bytecode in a temp folder instead."""
    with pytest.MonkeyPatch.context() as mp:
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            mp.delenv("PYTHONDONTWRITEBYTECODE")
            mp.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
        yield


def records(run_dir, kind):
    with open(run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def table_rows(md_path):
    """{run name -> {column header -> cell}} from a markdown table."""
    header, _, *rows = md_path.read_text().splitlines()
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    return {row[0]: dict(zip(cols, row)) for row in cells}


def test_suite_trains_plots_tabulates_and_resumes(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "SUITES", {"t": {"baseline": [], "lr": ["--max-lr", "1e-3"]}})
    argv = ["t", "--data-dir", shards, "--log-dir", str(tmp_path), "--", *TINY]
    ablate.main(argv)
    suite = tmp_path / "t"
    assert (suite / "t.png").read_bytes().startswith(PNG_MAGIC)
    rows = table_rows(suite / "t.md")
    assert list(rows) == ["baseline", "lr"]
    final = {name: records(suite / name, "val")[-1] for name in rows}
    for name, row in rows.items():
        assert final[name]["step"] == 4
        assert row["final val loss"] == f"{final[name]['loss']:.4f}"
        assert row["vs baseline"] == f"{final[name]['loss'] - final['baseline']['loss']:+.4f}"
    assert rows["baseline"]["vs baseline"] == "+0.0000"
    # the configs really differ: the preset's lr for the baseline, the config's own for "lr"
    max_lr = {name: json.loads((suite / name / "config.json").read_text())["max_lr"] for name in rows}
    assert max_lr == {"baseline": 3e-3, "lr": 1e-3}
    assert final["baseline"]["loss"] != final["lr"]["loss"]

    # the same command again: both runs are finished, nothing is trained or logged again
    before = {name: (suite / name / "metrics.jsonl").read_bytes() for name in rows}
    ablate.main(argv)
    assert {name: (suite / name / "metrics.jsonl").read_bytes() for name in rows} == before
    assert len(records(suite / "lr", "train")) == 4

    # a config added later that has not run yet: --plot-only says which one is missing
    monkeypatch.setitem(ablate.SUITES["t"], "new", ["--max-lr", "2e-3"])
    with pytest.raises(SystemExit, match="'new'"):
        ablate.main(["t", "--log-dir", str(tmp_path), "--plot-only"])
    ablate.main(["t", "--log-dir", str(tmp_path), "--plot-only", "--only", "lr,baseline"])
    rows = table_rows(suite / "t.md")
    assert list(rows) == ["lr", "baseline"]  # --only picks and orders; the first shown is the reference
    assert rows["baseline"]["vs baseline"] == f"{final['baseline']['loss'] - final['lr']['loss']:+.4f}"


def test_failing_run_names_its_config(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "SUITES", {"f": {"baseline": [], "broken": ["--total-batch-size", "1000"]}})
    i = TINY.index("--total-batch-size")
    tiny = TINY[:i] + TINY[i + 2:]  # without it, so that the config's own value stands
    with pytest.raises(SystemExit, match="config 'broken' of suite 'f' failed"):
        ablate.main(["f", "--data-dir", shards, "--log-dir", str(tmp_path), "--only", "broken", "--", *tiny])
    assert not (tmp_path / "f" / "baseline").exists()  # --only: the baseline never ran


def test_unknown_suite_or_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        ablate.main(["nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablate.main(["arch", "--only", "baseline,rop"])
    err = capsys.readouterr().err
    assert "'rop'" in err and "'rope'" in err


@pytest.mark.parametrize("suite", sorted(ablate.SUITES))
def test_every_suite_config_is_a_valid_train_config(suite):
    for name, flags in ablate.SUITES[suite].items():
        config.parse_config(["--preset", "tiny", *flags])  # argparse exits on an unknown flag or bad value
    # the "modern" and "speedrun" configs written as flags are exactly the tiny-modern and tiny-speedrun presets
    for switches, name in ((config.MODERN, "tiny-modern"), (config.SPEEDRUN, "tiny-speedrun")):
        as_flags, _ = config.parse_config(["--preset", "tiny", *ablate.flags(switches), "--run-name", "x"])
        preset, _ = config.parse_config(["--preset", name, "--run-name", "x"])
        assert as_flags == preset
    # and the roadmap's faithful edm2 and hypersphere configs are exactly their presets
    for name, values in (("edm2", config.EDM2), ("hypersphere", config.HYPERSPHERE)):
        assert ablate.SUITES["roadmap"][name] == ablate.flags(values)
        as_flags, _ = config.parse_config(["--preset", "tiny", *ablate.flags(values), "--run-name", "x"])
        assert as_flags == config.parse_config([f"--preset=tiny-{name}", "--run-name", "x"])[0]


def val_run(losses: list[float], every: int = 10) -> dict[str, list[dict]]:
    """A run as plot_logs.load_run returns it, with val losses at steps 0, every, 2 * every, ..."""
    return {"val": [{"kind": "val", "step": i * every, "tokens": i * every * 100, "loss": v} for i, v in enumerate(losses)]}


def test_time_to_quality_columns_by_hand(tmp_path):
    runs = {"baseline": val_run([9.0, 7.0, 6.5, 6.0]),  # ends at step 30 with 6.0
            "fast": val_run([9.0, 6.2, 5.9, 5.5]),  # first at or below 6.0 at step 20
            "slow": val_run([9.0, 8.0, 7.0, 6.1]),  # never gets there
            "ramp": val_run([9.0, 7.5, 6.0, 5.8])}  # at step 20, on 1,500 tokens (a batch ramp) of the baseline's 3,000
    for r, tokens in zip(runs["ramp"]["val"], (0, 500, 1500, 3000)):
        r["tokens"] = tokens
    md = tmp_path / "t.md"
    md.write_text(ablate.table_with_delta(runs))
    rows = table_rows(md)
    assert [rows[n]["steps to baseline"] for n in runs] == ["30", "20", "-", "20"]
    assert [rows[n]["x baseline steps"] for n in runs] == ["1.00", "0.67", "-", "0.67"]
    assert [rows[n]["x baseline tokens"] for n in runs] == ["1.00", "0.67", "-", "0.50"]
    assert [rows[n]["vs baseline"] for n in runs] == ["+0.0000", "-0.5000", "+0.1000", "-0.2000"]


def test_seed_table_means_spreads_and_steps_by_hand(tmp_path):
    runs = {"baseline-s1": val_run([9.0, 7.0, 6.2]), "baseline-s2": val_run([9.0, 7.0, 6.0]),  # target 6.1
            "x-s1": val_run([9.0, 6.1, 5.0]), "x-s2": val_run([9.0, 6.5, 5.2])}  # reach it at 10 and 20
    names = {n: (n.split("-s")[0], int(n.split("-s")[1])) for n in runs}
    md = tmp_path / "s.md"
    md.write_text(ablate.seed_table(runs, names))
    rows = table_rows(md)
    assert rows["baseline"]["mean final val loss"] == "6.1000" and rows["baseline"]["seed spread"] == "0.2000"
    assert rows["x"]["mean final val loss"] == "5.1000" and rows["x"]["vs baseline"] == "-1.0000"
    assert rows["x"]["mean steps to baseline"] == "15" and rows["x"]["x baseline steps"] == "0.75"
    assert rows["x"]["x baseline tokens"] == "0.75"  # val_run: 100 tokens a step
    # one baseline seed ends above the mean: not every seed of the baseline reaches it
    assert rows["baseline"]["mean steps to baseline"].startswith("not all seeds (1/2)")


def test_seeds_run_each_config_once_per_seed(shards, tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "SUITES", {"s": {"baseline": [], "lr": ["--max-lr", "1e-3"]}})
    table = ablate.main(["s", "--data-dir", shards, "--log-dir", str(tmp_path), "--only", "baseline",
                         "--seeds", "1,2", "--", *TINY[:TINY.index("--max-steps")], "--max-steps", "2",
                         "--val-every", "2", "--sample-every", "0", "--checkpoint-every", "0"])
    suite = tmp_path / "s"
    seeds = {n: json.loads((suite / n / "config.json").read_text())["seed"] for n in ("baseline-s1", "baseline-s2")}
    assert seeds == {"baseline-s1": 1, "baseline-s2": 2}
    finals = [records(suite / n, "val")[-1]["loss"] for n in seeds]
    assert finals[0] != finals[1]  # two inits really ran
    assert f"| baseline | 2 | {sum(finals) / 2:.4f} | {abs(finals[0] - finals[1]):.4f} |" in table
