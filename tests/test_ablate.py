"""ablate.py on tiny-shakespeare: two tiny configs train, plot and tabulate; re-running resumes; failures name the config."""

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

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


def table_rows(md_path, which: int = 0):
    """{run name -> {column header -> cell}} from the markdown table number `which` of a file."""
    tables, lines = [], []
    for line in md_path.read_text().splitlines() + [""]:
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            tables.append(lines)
            lines = []
    header, _, *rows = tables[which]
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

    # the same command again: both runs are finished, so ablate launches no process at all
    before = {name: (suite / name / "metrics.jsonl").read_bytes() for name in rows}
    launched = fake_launches(monkeypatch)
    ablate.main(argv)
    assert launched == []
    assert {name: (suite / name / "metrics.jsonl").read_bytes() for name in rows} == before
    assert len(records(suite / "lr", "train")) == 4
    # a run whose settings changed, or whose newest checkpoint is short of its last step, goes to train_gpt2.py
    # (which resumes it, or refuses the changed settings)
    monkeypatch.setitem(ablate.SUITES["t"], "lr", ["--max-lr", "2e-3"])
    (suite / "baseline" / "ckpt_0000004.pt").rename(suite / "baseline" / "ckpt_0000002.pt")
    ablate.main(argv)
    assert [cmd[cmd.index("--run-name") + 1] for cmd in launched] == ["baseline", "lr"]
    monkeypatch.setitem(ablate.SUITES["t"], "lr", ["--max-lr", "1e-3"])

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
    with pytest.raises(SystemExit, match="run 'broken' of suite 'f' failed"):
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


def test_presets_suite_runs_the_presets_and_roadmap_the_papers_settings():
    def train_config(*argv):
        return config.parse_config([*argv, "--run-name", "x"])[0]
    for name in ("edm2", "hypersphere", "manifold", "modern", "speedrun"):  # each presets config is its tiny preset
        assert train_config("--preset", "tiny", *ablate.SUITES["presets"][name]) == train_config(f"--preset=tiny-{name}")
    # the roadmap's rows at the papers' values (EDM2: NVlabs/edm2 train_edm2.py edm2-img512-xs; nGPT's paper),
    # EDM2's t_ref and ramp scaled to 300 steps
    edm2 = train_config("--preset", "tiny", *ablate.SUITES["roadmap"]["edm2"])
    assert (edm2.model.mode, edm2.schedule, edm2.beta2, edm2.weight_decay, edm2.max_lr, edm2.decay_ref_steps,
            edm2.warmup_steps) == ("edm2", "invsqrt", 0.99, 0.0, 1.2e-2, 20, 2)
    sphere = train_config("--preset", "tiny", *ablate.SUITES["roadmap"]["hypersphere"])
    assert (sphere.model.mode, sphere.warmup_steps, sphere.weight_decay, sphere.max_lr) == ("hypersphere", 0, 0.0, 1.5e-3)


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
    # linear between the evaluation before and the first at or below 6.0: fast 6.2 -> 5.9 over steps 10-20
    assert [rows[n]["interpolated"] for n in runs] == ["30", f"{10 + 10 * 0.2 / 0.3:.0f}", "-", "20"]
    assert [rows[n]["x baseline steps"] for n in runs] == ["1.00", "0.67", "-", "0.67"]
    assert [rows[n]["x baseline tokens"] for n in runs] == ["1.00", "0.67", "-", "0.50"]
    assert [rows[n]["vs baseline"] for n in runs] == ["+0.0000", "-0.5000", "+0.1000", "-0.2000"]


def test_seed_table_means_spreads_and_steps_by_hand(tmp_path):
    runs = {"baseline-s1": val_run([9.0, 7.0, 6.2]), "baseline-s2": val_run([9.0, 7.0, 6.0]),  # target 6.1
            "x-s1": val_run([9.0, 6.1, 5.0]), "x-s2": val_run([9.0, 6.5, 5.2])}  # reach it at 10 and 20
    groups = {"baseline": ["baseline-s1", "baseline-s2"], "x": ["x-s1", "x-s2"]}
    md = tmp_path / "s.md"
    md.write_text(ablate.seed_table(runs, groups, groups["baseline"]))
    rows = table_rows(md)
    assert rows["baseline"]["mean final val loss"] == "6.1000" and rows["baseline"]["seed spread"] == "0.2000"
    assert rows["x"]["mean final val loss"] == "5.1000" and rows["x"]["vs baseline"] == "-1.0000"
    assert rows["x"]["mean steps to baseline"] == "15" and rows["x"]["x baseline steps"] == "0.75"
    assert rows["x"]["x baseline tokens"] == "0.75"  # val_run: 100 tokens a step
    # x-s1 hits 6.1 at step 10 exactly; x-s2 crosses it 0.4 / 1.3 of the way from step 10 (6.5) to 20 (5.2)
    assert rows["x"]["interpolated"] == f"{(10 + 10 + 10 * 0.4 / 1.3) / 2:.0f}"
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


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value argparse keeps for a flag: its last one (None: not given)."""
    values = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]
    return values[-1] if values else None


def fake_launches(monkeypatch, final_loss=None, rc: int = 0) -> list[list[str]]:
    """ablate's train_gpt2.py processes replaced: each command is recorded and, with final_loss(argv) -> loss, writes
    the val curve 9.0, loss + 0.5, loss at steps 0, 10, 20 into its run folder; loss None: the run dies (exit 1)
    after a val loss of 5.0 at step 10, as a diverged run leaves it. Without final_loss: exits rc, writing nothing."""
    launched = []

    def run(cmd):
        launched.append(cmd)
        if final_loss is None:
            return subprocess.CompletedProcess(cmd, rc)
        loss = final_loss(cmd)
        curve = [9.0, 5.0] if loss is None else [9.0, loss + 0.5, loss]
        rows = [{"kind": "val", "step": 10 * i, "tokens": 1000 * i, "loss": v} for i, v in enumerate(curve)]
        rows += [{"kind": "error", "step": 15, "tokens": 1500, "message": "loss nan"}] if loss is None else []
        run_dir = Path(flag_value(cmd, "--log-dir")) / flag_value(cmd, "--run-name")
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return subprocess.CompletedProcess(cmd, 1 if loss is None else 0)

    monkeypatch.setattr(ablate, "subprocess", SimpleNamespace(run=run))
    return launched


def test_sweep_keeps_each_configs_best_value_by_the_mean_over_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "SUITES", {"s": {"base": [], "muon": ["--optimizer", "muon", "--muon-lr", "0.05"]}})
    finals = {("base", "1e-3", "1"): 6.0, ("base", "1e-3", "2"): 6.4,  # mean 6.2, though it has the best seed
              ("base", "2e-3", "1"): 6.1, ("base", "2e-3", "2"): 6.2,  # mean 6.15: the best
              ("muon", "0.01", "1"): 5.5, ("muon", "0.01", "2"): 5.7,  # mean 5.6: the best
              ("muon", "0.02", "1"): 5.8, ("muon", "0.02", "2"): 5.8}

    def final_loss(cmd):  # by the values the run really gets: argparse keeps each flag's last
        muon = flag_value(cmd, "--optimizer") == "muon"
        lr = flag_value(cmd, "--muon-lr" if muon else "--max-lr")
        return finals["muon" if muon else "base", lr, flag_value(cmd, "--seed")]

    launched = fake_launches(monkeypatch, final_loss)
    text = ablate.main(["s", "--data-dir", "d", "--log-dir", str(tmp_path), "--seeds", "1,2", "--sweep",
                        "max-lr=1e-3,2e-3", "--sweep", "muon:muon-lr=0.01,0.02", "--", "--max-lr", "5e-3"])
    names = [flag_value(cmd, "--run-name") for cmd in launched]
    assert names == [f"{c}@{v}-s{s}" for c, v in (("base", "max-lr=1e-3"), ("base", "max-lr=2e-3"),
                     ("muon", "muon-lr=0.01"), ("muon", "muon-lr=0.02")) for s in (1, 2)]
    assert [cmd[-2:] for cmd in launched[::2]] == [["--max-lr", "1e-3"], ["--max-lr", "2e-3"],
                                                   ["--muon-lr", "0.01"], ["--muon-lr", "0.02"]]
    assert all(flag_value(cmd, "--max-lr") == "5e-3" for cmd in launched[4:])  # Muon's runs keep `--`'s AdamW lr
    md = tmp_path / "s" / "s.md"
    assert md.read_text() == text and (tmp_path / "s" / "s.png").read_bytes().startswith(PNG_MAGIC)
    assert "- base: best of 2 max-lr values by final val loss (mean over 2 seeds): 2e-3" in text
    assert "- muon: best of 2 muon-lr values by final val loss (mean over 2 seeds): 0.01" in text
    runs = table_rows(md, 0)  # each config at its best value; the baseline is base at 2e-3, mean 6.15
    assert list(runs) == ["base@max-lr=2e-3-s1", "base@max-lr=2e-3-s2", "muon@muon-lr=0.01-s1", "muon@muon-lr=0.01-s2"]
    assert runs["muon@muon-lr=0.01-s1"]["vs baseline"] == f"{5.5 - 6.15:+.4f}"
    means = table_rows(md, 1)
    assert [(r["mean final val loss"], r["seed spread"], r["vs baseline"]) for r in means.values()] == [
        ("6.1500", "0.1000", "+0.0000"), ("5.6000", "0.2000", "-0.5500")]
    assert means["muon@muon-lr=0.01"]["mean steps to baseline"] == "15"  # 6.0 <= 6.15 at step 10, 5.7 at step 20
    every = table_rows(md, 2)
    assert list(every) == ["base@max-lr=1e-3", "base@max-lr=2e-3 (best)", "muon@muon-lr=0.01 (best)",
                           "muon@muon-lr=0.02"]
    assert (every["base@max-lr=1e-3"]["mean final val loss"], every["base@max-lr=1e-3"]["vs baseline"]) == ("6.2000",
                                                                                                          "+0.0500")
    assert every["base@max-lr=1e-3"]["mean steps to baseline"] == "not all seeds (1/2)"  # 6.4 never gets to 6.15


def test_a_diverged_sweep_value_is_marked_never_best_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "SUITES", {"d": {"base": [], "x": []}})
    launched = fake_launches(monkeypatch, lambda cmd: {"1e-3": 6.0, "8e-3": None}.get(flag_value(cmd, "--max-lr"), 6.5))
    text = ablate.main(["d", "--log-dir", str(tmp_path), "--sweep", "x:max-lr=8e-3,1e-3"])
    assert [flag_value(cmd, "--run-name") for cmd in launched] == ["base", "x@max-lr=8e-3", "x@max-lr=1e-3"]
    assert "- x: best of 2 max-lr values by final val loss: 1e-3" in text  # not 8e-3's 5.0 before it died
    every = table_rows(tmp_path / "d" / "d.md", 1)
    assert list(every) == ["base", "x@max-lr=8e-3 (error)", "x@max-lr=1e-3 (best)"]
    # a swept run that fails before it trains (no metrics.jsonl: missing data, say) stops the suite like any other
    launched = fake_launches(monkeypatch, rc=1)
    with pytest.raises(SystemExit, match="run 'x@max-lr=2e-3' of suite 'd' failed"):
        ablate.main(["d", "--log-dir", str(tmp_path), "--only", "x", "--sweep", "x:max-lr=2e-3,4e-3"])
    assert len(launched) == 1


def test_two_corpora_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setattr(ablate, "SUITES", {"c": {"base": [], "x": ["--mlp", "swiglu"]}})
    finals = {("A", "base"): (6.0, 6.2), ("A", "1e-3"): (5.5, 5.7), ("A", "2e-3"): (5.9, 5.9),
              ("B", "base"): (4.0, 4.0), ("B", "1e-3"): (3.9, 3.9), ("B", "2e-3"): (3.5, 3.7)}

    def final_loss(cmd):
        key = flag_value(cmd, "--max-lr") if flag_value(cmd, "--mlp") else "base"
        return finals[flag_value(cmd, "--data-dir"), key][int(flag_value(cmd, "--seed")) - 1]

    plots = {}

    def plot_runs(runs, path):  # the sweep test draws a real plot: here, which runs each corpus's plot gets
        plots[Path(path)] = list(runs)
        return Path(path)

    monkeypatch.setattr(ablate.plot_logs, "plot_runs", plot_runs)
    launched = fake_launches(monkeypatch, final_loss)
    text = ablate.main(["c", "--data-dir", "a=A,b=B", "--log-dir", str(tmp_path), "--seeds", "1,2",
                        "--sweep", "x:max-lr=1e-3,2e-3"])
    assert len(launched) == 12
    assert plots == {tmp_path / "c" / n / "c.png": ["base-s1", "base-s2", f"x@max-lr={lr}-s1 (best of 2 max-lr)",
                                                     f"x@max-lr={lr}-s2 (best of 2 max-lr)"]
                     for n, lr in (("a", "1e-3"), ("b", "2e-3"))}
    assert (tmp_path / "c" / "b" / "x@max-lr=2e-3-s1" / "metrics.jsonl").is_file()
    assert (tmp_path / "c" / "c.md").read_text() == text
    rows = table_rows(tmp_path / "c" / "c.md", 0)
    cells = ("best", "mean final val loss", "seed spread", "steps to baseline", "interpolated")
    # a: target 6.1; base's 6.2 seed never reaches it; x at 1e-3 crosses at 10 * 2.9 / 3 (6.0 at step 10) and at
    # 10 + 10 * 0.1 / 0.5 (6.2 -> 5.7). b: target 4.0; x at 2e-3 at step 10 exactly and at 10 + 10 * 0.2 / 0.5
    assert [rows["base"][f"a: {c}"] for c in cells] == ["-", "6.1000", "0.2000", "not all seeds (1/2)", "-"]
    assert [rows["x"][f"a: {c}"] for c in cells] == ["1e-3", "5.6000", "0.2000", "15", f"{(29 / 3 + 12) / 2:.0f}"]
    assert [rows["base"][f"b: {c}"] for c in cells] == ["-", "4.0000", "0.0000", "20", "20"]
    assert [rows["x"][f"b: {c}"] for c in cells] == ["2e-3", "3.6000", "0.2000", "15", "12"]
    assert table_rows(tmp_path / "c" / "b" / "c.md", 0)["x@max-lr=2e-3-s1"]["vs baseline"] == "-0.5000"


@pytest.mark.parametrize("args, message", [
    (["--sweep", "lr=1e-3"], "--sweep 'lr=1e-3': give [CONFIGS:]FLAG=V1,V2"),
    (["--sweep", "max-lr=1e-3,1e-3"], "distinct values"),
    (["--sweep", "rop:max-lr=1e-3"], "unknown config 'rop'"),
    (["--sweep", "max-lr=1e-3", "--sweep", "seed=1,2"], "two sweeps for every config (max-lr, seed)"),
    (["--sweep", "rope:max-lr=1e-3", "--sweep", "rope,gqa:seed=1,2"], "config 'rope' is in two sweeps"),
    (["--sweep", "run-name=a,b"], "ablate sets --run-name itself"),
    (["--seeds", "1,2", "--sweep", "seed=3,4"], "ablate sets --seed itself"),
    (["--data-dir", "a=x,a=y"], "distinct NAME=DIR pairs"),
])
def test_bad_sweep_or_corpora_is_a_usage_error(capsys, args, message):
    with pytest.raises(SystemExit):
        ablate.main(["arch", *args])
    assert message in capsys.readouterr().err


def test_a_bad_swept_value_fails_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ablate, "SUITES", {"v": {"base": []}})
    launched = fake_launches(monkeypatch)
    with pytest.raises(SystemExit, match="run 'base@max-lr=-1'.*nothing ran"):
        ablate.main(["v", "--log-dir", str(tmp_path), "--sweep", "max-lr=1e-3,-1"])
    assert launched == [] and "--max-lr" in capsys.readouterr().err
