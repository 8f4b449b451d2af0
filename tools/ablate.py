"""Ablations: train a suite of configs on the same data, seed and token budget, then overlay them.

    python -m tools.ablate modern --data-dir data/shakespeare -- --dtype bfloat16 --max-steps 300
    python -m tools.ablate arch --data-dir data/shakespeare --only baseline,rope,swiglu
    python -m tools.ablate arch --preset gpt2-124m --data-dir data/fineweb_edu --launcher "torchrun --nproc-per-node=8"
    python -m tools.ablate modern --plot-only
    python -m tools.ablate modern --data-dir data/shakespeare --seeds 1337,2     # every config from two inits

Each config of SUITES[suite] runs as its own train_gpt2.py process (fresh memory, nothing leaks from one
run into the next) with the flags
    --preset PRESET <config's flags> [--data-dir DIR] --log-dir LOG_DIR/SUITE --run-name CONFIG <flags after -->
argparse keeps the last value of a flag, so a config's flags override the common preset and the flags after
`--` override both: they apply to every config alike. The runs land in LOG_DIR/SUITE/CONFIG/; the plot and
the markdown table go to LOG_DIR/SUITE/SUITE.png and .md. The table measures each run against the first config
(the baseline): its final val loss minus the baseline's, and time to quality, the first evaluated step whose val
loss is at or below the baseline's final one (evaluate often, e.g. --val-every 10, to locate it). With --seeds,
every config runs once per seed and a second table gives each config's mean, its seed spread and its mean steps.

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
from gpt2.config import EDM2, HYPERSPHERE, MODERN, SPEEDRUN

TRAIN = Path(__file__).resolve().parent.parent / "train_gpt2.py"


def flags(values: dict) -> list[str]:
    """{"n_kv_head": 2, "qk_norm": True} -> ["--n-kv-head", "2", "--qk-norm", "1"]"""
    pairs = [("--" + k.replace("_", "-"), str(int(v) if isinstance(v, bool) else v)) for k, v in values.items()]
    return [arg for pair in pairs for arg in pair]

# the modern preset before the `muon` suite, pinned: the muon, speedrun and roadmap suites measured on top of it
MODERN_BEFORE = flags(dict(optimizer="muon", schedule="wsd", pos="rope", tie_head=False, n_kv_head=2, sinks=True))
MUON_CAUTIOUS_WD = ["--muon-weight-decay", "0.28", "--muon-cautious-wd", "1"]  # nanochat's default weight decay
# modded-nanogpt's Adam lrs (0.008, scalars 5x); nanochat's (embed 0.3, head 0.008, scalars 0.5) are for an
# embedding RMS-normalized after the lookup and gain-free norms, neither of which GPT-2 has
ANCHOR_ADAM_LRS = ["--adam-embed-lr", "0.008", "--adam-head-lr", "0.008", "--adam-scalar-lr", "0.04"]

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
    # Muon as the anchors (modded-nanogpt, nanochat) build it, each piece on top of the modern preset as the `modern`
    # suite measured it (Muon with fused q/k/v, as before), then all of them at once
    "muon": {
        "modern": MODERN_BEFORE,
        "split": [*MODERN_BEFORE, "--muon-split", "1"],
        "polar": [*MODERN_BEFORE, "--muon-split", "1", "--muon-ns", "polar"],
        "cautious-wd": [*MODERN_BEFORE, "--muon-split", "1", *MUON_CAUTIOUS_WD],
        "normuon": [*MODERN_BEFORE, "--muon-split", "1", "--muon-normuon", "1"],
        "adam-lrs": [*MODERN_BEFORE, "--muon-split", "1", *ANCHOR_ADAM_LRS],
        "anchors": [*MODERN_BEFORE, "--muon-split", "1", "--muon-ns", "polar", *MUON_CAUTIOUS_WD, "--muon-normuon", "1",
                    *ANCHOR_ADAM_LRS],
    },
    # the 124M speedruns' wins (modded-nanogpt, nanochat), each on top of the modern preset as the `muon` suite
    # found it, then the chosen set (the tiny-speedrun preset's switches). window-ramp is for FineWeb's long documents: tiny-shakespeare's
    # (~47 tokens) fit in the smallest window, so there it can only cost
    "speedrun": {
        "baseline": [],
        "modern": MODERN_BEFORE,
        "docs": [*MODERN_BEFORE, "--doc-mask", "1", "--align-docs", "crop"],
        "docs-packed": [*MODERN_BEFORE, "--doc-mask", "1", "--align-docs", "pack"],
        "value-embeds": [*MODERN_BEFORE, "--value-embeds", "1"],
        "unet": [*MODERN_BEFORE, "--unet", "1"],
        "x0-mix": [*MODERN_BEFORE, "--x0-mix", "1"],
        "batch-ramp": [*MODERN_BEFORE, "--batch-size", "4", "--batch-ramp-start", "0.25"],
        "window-ramp": [*MODERN_BEFORE, "--window", "64", "--window-start", "16"],
        "speedrun": flags(SPEEDRUN),
        "speedrun-x0": [*flags(SPEEDRUN), "--x0-mix", "1"],  # and x0 mixing, which alone did not beat the noise
    },
    # weight constraints against the baseline and Muon; every run also evaluates a power-function EMA of its weights
    "constraints": {
        "baseline": ["--ema-sigma-rel", "0.1"],
        "muon": ["--optimizer", "muon", "--ema-sigma-rel", "0.1"],
        "muonh": ["--optimizer", "muon", "--muon-fixed-norm", "1", "--ema-sigma-rel", "0.1"],
        "edm2": ["--mode", "edm2", "--ema-sigma-rel", "0.1"],
        "hypersphere": ["--mode", "hypersphere", "--ema-sigma-rel", "0.1"],
    },
    # gpt-oss's pieces: its SwiGLU alone, then as 8 experts of half the width, 2 active per token (the dense
    # MLP's active parameters; the router picks two, so it gets a gradient), against the dense GPT-2 MLP
    "moe": {
        "baseline": [],
        "swiglu-oss": ["--mlp", "swiglu-oss"],
        "moe": ["--mlp", "swiglu-oss", "--moe-experts", "8", "--moe-top-k", "2"],
    },
    # the roadmap's pieces against the baseline: the modern preset, gpt-oss's experts (the moe suite's, at the dense
    # MLP's active parameters), manifold Muon on the modern preset, and the constrained modes both at their papers'
    # settings (the tiny-edm2 / tiny-hypersphere presets, tuned for 300 steps: pass no --max-lr, --warmup-steps or
    # --weight-decay after `--`, which would override them) and at the baseline's
    "roadmap": {
        "baseline": [],
        "modern": MODERN_BEFORE,
        "moe": ["--mlp", "swiglu-oss", "--moe-experts", "8", "--moe-top-k", "2"],
        "manifold": [*MODERN_BEFORE, "--muon-manifold", "stiefel"],
        "edm2": flags(EDM2),
        "hypersphere": flags(HYPERSPHERE),
        "edm2-baseline": ["--mode", "edm2"],
        "hypersphere-baseline": ["--mode", "hypersphere"],
    },
}


def train_argv(args, name: str, flags: list[str], extra: list[str], seed: int | None = None) -> list[str]:
    data = ["--data-dir", args.data_dir] if args.data_dir else []  # none: the preset's own data
    suite_dir = str(Path(args.log_dir) / args.suite)
    seeds = ["--seed", str(seed)] if seed is not None else []  # after the config's flags: every config, each seed
    return ["--preset", args.preset, *flags, *seeds, *data, "--log-dir", suite_dir, "--run-name", name, *extra]


def run_names(configs: dict[str, list[str]], seeds: list[int] | None) -> dict[str, tuple[str, int | None]]:
    """run name -> (config, seed): the config's name alone with one seed (or none given), else name-sSEED."""
    if not seeds or len(seeds) == 1:
        return {name: (name, seeds[0] if seeds else None) for name in configs}
    return {f"{name}-s{seed}": (name, seed) for name in configs for seed in seeds}


def reaching(records: list[dict], target: float) -> dict | None:
    """The first val record whose loss is at or below target (None: never reached)."""
    return next((r for r in records if r.get("loss") is not None and r["loss"] <= target), None)


def _finals(runs, names) -> list[float]:
    return [f for f in (plot_logs.summarize(runs[n])["final_val_loss"] for n in names) if f is not None]


def table_with_delta(runs: dict[str, dict[str, list[dict]]], baseline: list[str] | None = None) -> str:
    """plot_logs' table plus: final val loss minus the baseline's (the mean over the baseline's runs, by default
    the first run), the first val step at or below the baseline's final val loss, and that step and its tokens as
    fractions of the baseline's run ("time to quality"; tokens differ from steps where a batch ramp runs)."""
    baseline = baseline or [next(iter(runs))]
    base_finals = _finals(runs, baseline)
    target = sum(base_finals) / len(base_finals) if base_finals else None
    base = plot_logs.summarize(runs[baseline[0]])
    lines = plot_logs.markdown_table(runs).splitlines()
    lines[0] += " vs baseline | steps to baseline | x baseline steps | x baseline tokens |"
    lines[1] += "---:|---:|---:|---:|"
    for i, run in enumerate(runs.values(), start=2):
        final = plot_logs.summarize(run)["final_val_loss"]
        hit = reaching(run.get("val", []), target) if target is not None else None
        lines[i] += " - |" if final is None or target is None else f" {final - target:+.4f} |"
        lines[i] += (" - | - | - |" if hit is None else
                     f" {hit['step']} | {hit['step'] / base['step']:.2f} | {hit['tokens'] / base['tokens']:.2f} |")
    return "\n".join(lines) + "\n"


def seed_table(runs: dict[str, dict[str, list[dict]]], names: dict[str, tuple[str, int | None]]) -> str:
    """One row per config over its seeds: mean final val loss, its spread (max - min), the mean's difference
    to the baseline (the first config), and the mean steps to the baseline's mean final val loss."""
    by_config: dict[str, list[str]] = {}
    for run, (config, _) in names.items():
        by_config.setdefault(config, []).append(run)
    base_runs = next(iter(by_config.values()))
    base_finals = _finals(runs, base_runs)
    target = sum(base_finals) / len(base_finals)
    base = plot_logs.summarize(runs[base_runs[0]])
    lines = ["| config | seeds | mean final val loss | seed spread | vs baseline | mean steps to baseline "
             "| x baseline steps | x baseline tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for config, run_list in by_config.items():
        finals = _finals(runs, run_list)
        mean = sum(finals) / len(finals)
        hits = [reaching(runs[r].get("val", []), target) for r in run_list]
        if None in hits:
            steps = f"not all seeds ({sum(h is not None for h in hits)}/{len(hits)}) | - | -"
        else:
            mean_step, mean_tokens = (sum(h[key] for h in hits) / len(hits) for key in ("step", "tokens"))
            steps = f"{mean_step:.0f} | {mean_step / base['step']:.2f} | {mean_tokens / base['tokens']:.2f}"
        lines.append(f"| {config} | {len(finals)} | {mean:.4f} | {max(finals) - min(finals):.4f} | "
                     f"{mean - target:+.4f} | {steps} |")
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
    parser.add_argument("--seeds", help="comma-separated seeds: every config runs once per seed (runs NAME-sSEED) and "
                        "a second table gives each config's mean and seed spread")
    args = parser.parse_args(ours)

    configs = SUITES[args.suite]
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in configs]
        if unknown:
            parser.error(f"--only: unknown config(s) {unknown} in suite {args.suite!r}; choose from {list(configs)}")
        configs = {n: configs[n] for n in names}
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    names = run_names(configs, seeds)
    suite_dir = Path(args.log_dir) / args.suite
    launcher = shlex.split(args.launcher) or [sys.executable]

    if not args.plot_only:
        for i, (name, (config, seed)) in enumerate(names.items(), 1):
            cmd = [*launcher, str(TRAIN), *train_argv(args, name, configs[config], extra, seed)]
            print(f"=== [{i}/{len(names)}] {args.suite}/{name}: {shlex.join(cmd)}", flush=True)
            # not captured: the run's progress streams straight to the terminal
            rc = subprocess.run(cmd).returncode
            if rc:
                raise SystemExit(f"ablate: config {config!r} of suite {args.suite!r} failed (exit code {rc}); "
                                 f"see its output above. Re-running resumes it and skips the finished configs.")

    missing = [n for n in names if not (suite_dir / n / "metrics.jsonl").is_file()]
    if missing:
        raise SystemExit(f"ablate: no metrics.jsonl in {suite_dir} for run(s) {missing}: run them first")
    runs = {name: plot_logs.load_run(suite_dir / name) for name in names}
    png = plot_logs.plot_runs(runs, suite_dir / f"{args.suite}.png")
    baseline = [n for n, (config, _) in names.items() if config == next(iter(configs))]
    table = table_with_delta(runs, baseline)
    if seeds and len(seeds) > 1:
        table += "\n" + seed_table(runs, names)
    png.with_suffix(".md").write_text(table)
    print(table, end="")
    print(f"wrote {png} and {png.with_suffix('.md')}", file=sys.stderr)
    return table


if __name__ == "__main__":
    main()
