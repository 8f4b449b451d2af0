"""Ablations: train a suite of configs on the same data, seed and token budget, then overlay them.

    python ablate.py modern --data-dir data/shakespeare -- --dtype bfloat16 --max-steps 300
    python ablate.py arch --data-dir data/shakespeare --only baseline,rope,swiglu
    python ablate.py arch --preset gpt2-124m --data-dir data/fineweb_edu --launcher "torchrun --nproc-per-node=8"
    python ablate.py modern --plot-only

Each config of SUITES[suite] runs as its own train_gpt2.py process (fresh memory, nothing leaks from one
run into the next) with the flags
    --preset PRESET <config's flags> [--data-dir DIR] --log-dir LOG_DIR/SUITE --run-name CONFIG <flags after -->
argparse keeps the last value of a flag, so a config's flags override the common preset and the flags after
`--` override both: they apply to every config alike. The runs land in LOG_DIR/SUITE/CONFIG/; the plot and
the markdown table (with each final val loss minus the first config's) go to LOG_DIR/SUITE/SUITE.png and .md.

Re-running the same command is free for finished runs and continues interrupted ones: train_gpt2.py resumes
each run from its latest checkpoint. It refuses to resume a run whose settings changed: delete that run's
folder (or use another --log-dir) after editing a config's flags.
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import plot_logs
from train_gpt2 import MODERN

TRAIN = Path(__file__).resolve().parent / "train_gpt2.py"


def flags(values: dict) -> list[str]:
    """{"n_kv_head": 2, "qk_norm": True} -> ["--n-kv-head", "2", "--qk-norm", "1"]"""
    pairs = [("--" + k.replace("_", "-"), str(int(v) if isinstance(v, bool) else v)) for k, v in values.items()]
    return [arg for pair in pairs for arg in pair]

# suite -> {config name -> train_gpt2.py flags}, in plotting order; the first config is the baseline
SUITES: dict[str, dict[str, list[str]]] = {
    # the headline CPU ablation: the modern optimizer alone, then everything modern at once
    "modern": {
        "baseline": [],
        "muon": ["--optimizer", "muon"],
        "wsd": ["--schedule", "wsd"],
        "modern": flags(MODERN),  # the gpt2-124m-modern / tiny-modern switches on top of the chosen preset
    },
    # each architecture switch alone on top of the GPT-2 baseline
    "arch": {
        "baseline": [],
        "rmsnorm": ["--norm", "rmsnorm"],
        "no-bias": ["--bias", "0"],
        "rope": ["--pos", "rope"],
        "relu2": ["--mlp", "relu2"],
        "swiglu": ["--mlp", "swiglu"],
        "gqa": ["--n-kv-head", "2"],
        "qk-norm": ["--qk-norm", "1"],
        "sinks": ["--sinks", "1"],
        "window": ["--window", "32"],
        "untied": ["--tie-head", "0"],
        "zero-init": ["--zero-init", "1"],
        "softcap": ["--softcap", "30"],
        "baseline-seed2": ["--seed", "2"],  # the baseline again from another init: how big is the noise?
    },
    # weight constraints against the baseline and Muon; every run also evaluates a power-function EMA of its weights
    "constraints": {
        "baseline": ["--ema-sigma-rel", "0.1"],
        "muon": ["--optimizer", "muon", "--ema-sigma-rel", "0.1"],
        "muonh": ["--optimizer", "muon", "--muon-fixed-norm", "1", "--ema-sigma-rel", "0.1"],
        "edm2": ["--mode", "edm2", "--ema-sigma-rel", "0.1"],
        "hypersphere": ["--mode", "hypersphere", "--ema-sigma-rel", "0.1"],
    },
}


def train_argv(args, name: str, flags: list[str], extra: list[str]) -> list[str]:
    data = ["--data-dir", args.data_dir] if args.data_dir else []  # none: the preset's own data
    suite_dir = str(Path(args.log_dir) / args.suite)
    return ["--preset", args.preset, *flags, *data, "--log-dir", suite_dir, "--run-name", name, *extra]


def table_with_delta(runs: dict[str, dict[str, list[dict]]]) -> str:
    """plot_logs' table plus a "vs baseline" column: final val loss minus the first run's."""
    finals = [plot_logs.summarize(run)["final_val_loss"] for run in runs.values()]
    lines = plot_logs.markdown_table(runs).splitlines()
    lines[0] += " vs baseline |"
    lines[1] += "---:|"
    for i, final in enumerate(finals, start=2):
        lines[i] += " - |" if final is None or finals[0] is None else f" {final - finals[0]:+.4f} |"
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    # everything after `--` goes to every train_gpt2.py run untouched
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--data-dir", help="token shards for every run (default: the preset's)")
    parser.add_argument("--log-dir", default="logs/ablate", help="runs go to LOG_DIR/SUITE/CONFIG")
    parser.add_argument("--preset", default="tiny", help="train_gpt2.py preset every config starts from")
    parser.add_argument("--only", help="comma-separated configs to run and plot (default: all of the suite)")
    parser.add_argument("--launcher", default="", help='e.g. "torchrun --nproc-per-node=8" (default: this python)')
    parser.add_argument("--plot-only", action="store_true", help="no training: plot and tabulate the finished runs")
    args = parser.parse_args(ours)

    configs = SUITES[args.suite]
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in configs]
        if unknown:
            parser.error(f"--only: unknown config(s) {unknown} in suite {args.suite!r}; choose from {list(configs)}")
        configs = {n: configs[n] for n in names}
    suite_dir = Path(args.log_dir) / args.suite
    launcher = shlex.split(args.launcher) or [sys.executable]

    if not args.plot_only:
        for i, (name, flags) in enumerate(configs.items(), 1):
            cmd = [*launcher, str(TRAIN), *train_argv(args, name, flags, extra)]
            print(f"=== [{i}/{len(configs)}] {args.suite}/{name}: {shlex.join(cmd)}", flush=True)
            # not captured: the run's progress streams straight to the terminal
            rc = subprocess.run(cmd).returncode
            if rc:
                raise SystemExit(f"ablate: config {name!r} of suite {args.suite!r} failed (exit code {rc}); "
                                 f"see its output above. Re-running resumes it and skips the finished configs.")

    missing = [n for n in configs if not (suite_dir / n / "metrics.jsonl").is_file()]
    if missing:
        raise SystemExit(f"ablate: no metrics.jsonl in {suite_dir} for config(s) {missing}: run them first")
    runs = {name: plot_logs.load_run(suite_dir / name) for name in configs}
    png = plot_logs.plot_runs(runs, suite_dir / f"{args.suite}.png")
    table = table_with_delta(runs)
    png.with_suffix(".md").write_text(table)
    print(table, end="")
    print(f"wrote {png} and {png.with_suffix('.md')}", file=sys.stderr)
    return table


if __name__ == "__main__":
    main()
