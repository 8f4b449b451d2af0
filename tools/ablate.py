"""Ablations: train a suite of configs on the same data, seed and token budget, then overlay them.

    python -m tools.ablate modern --data-dir data/shakespeare -- --dtype bfloat16 --max-steps 300
    python -m tools.ablate arch --data-dir data/shakespeare --only baseline,rope,swiglu
    python -m tools.ablate arch --preset gpt2-124m --data-dir data/fineweb_edu --launcher "torchrun --nproc-per-node=8"
    python -m tools.ablate modern --plot-only
    python -m tools.ablate modern --data-dir data/shakespeare --seeds 1337,2     # every config from two inits
    python -m tools.ablate modern --data-dir data/shakespeare --sweep max-lr=1e-3,3e-3,6e-3
    python -m tools.ablate modern --sweep max-lr=1e-3,3e-3,6e-3 --sweep muon,modern:muon-lr=0.01,0.02,0.04
    python -m tools.ablate modern --data-dir shak=data/shakespeare,docs=data/docs     # two corpora, side by side

Each run is its own train_gpt2.py process (fresh memory, nothing leaks from one run into the next) with the flags
    --preset PRESET <config's flags> [--seed S] [--data-dir DIR] --log-dir LOG_DIR/SUITE --run-name RUN
    <flags after --> [--FLAG VALUE of a --sweep]
argparse keeps the last value of a flag, so a config's flags override the common preset, the flags after `--`
override both (they apply to every config alike), and a swept value overrides all of them. The runs land in
LOG_DIR/SUITE/RUN/; the plot and the markdown tables go to LOG_DIR/SUITE/SUITE.png and .md. The table measures
each run against the first config (the baseline): its final val loss minus the baseline's, and time to quality,
the first evaluated step whose val loss is at or below the baseline's final one, and that crossing interpolated
linearly between two evaluations (evaluate often, e.g. --val-every 10, to locate it). With --seeds, every config
runs once per seed and a second table gives each config's mean, its seed spread and its mean steps.

--sweep FLAG=V1,V2,... runs every config once per value (runs CONFIG@FLAG=V); `a,b:FLAG=...` sweeps configs a and b
only, so one command can sweep each config's own lr (above: Muon's for the Muon configs, AdamW's for the rest).
The tables and the plot keep each config's best value, by final val loss (the mean over its seeds), and say so;
the baseline is the first config at its best value, and a last table lists every value's result. A swept run
that fails once training (too high an lr diverges) is marked, never best, and the sweep goes on; any other
failed run stops the suite.

--data-dir NAME=DIR,NAME=DIR runs the suite on each corpus, into LOG_DIR/SUITE/NAME/RUN/ (each with its own plot
and tables, against its own baseline), and LOG_DIR/SUITE/SUITE.md puts the corpora side by side.

Re-running the same command is free for finished runs and continues interrupted ones: a run whose folder holds
the same config.json and a checkpoint at its last step is skipped, any other is launched and train_gpt2.py
resumes it from its latest checkpoint. It refuses to resume a run whose settings changed: delete that run's
folder (or use another --log-dir) after editing a config's flags.
"""

import argparse
import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import plot_logs
from gpt2.config import EDM2, HYPERSPHERE, MANIFOLD, MODEL_FIELDS, MODERN, SPEEDRUN, TRAIN_FIELDS, parse_config
from gpt2.runs import checkpoint_paths

TRAIN = Path(__file__).resolve().parent.parent / "train_gpt2.py"


def flags(values: dict) -> list[str]:
    """{"n_kv_head": 2, "qk_norm": True} -> ["--n-kv-head", "2", "--qk-norm", "1"]"""
    pairs = [("--" + k.replace("_", "-"), str(int(v) if isinstance(v, bool) else v)) for k, v in values.items()]
    return [arg for pair in pairs for arg in pair]

# the modern preset before the `muon` suite, pinned: the muon, speedrun and roadmap suites measured on top of it
MODERN_BEFORE = flags(dict(optimizer="muon", schedule="wsd", pos="rope", tie_head=False, n_kv_head=2, sinks=True))
# the speedrun preset as the recipe and speedrun2026 suites measured it, before untie-at joined it (session 7)
SPEEDRUN_BEFORE = flags(dict(SPEEDRUN, tie_head=False, untie_at=0.0))
# EDM2 and nGPT at their papers' settings, scaled to the tiny model's 300 steps (the presets' before session 8)
EDM2_PAPER = flags(dict(
    mode="edm2", schedule="invsqrt", weight_decay=0.0,  # EDM2 (Karras et al. 2024): inverse-sqrt decay, no decay
    beta2=0.99,  # EDM2's Adam betas (0.9, 0.99)
    max_lr=1.2e-2,  # EDM2-XS's ref_lr, at the tiny model's width 128 (NVlabs/edm2 train_edm2.py @ 4bf8162)
    decay_ref_steps=20, warmup_steps=2,  # EDM2's t_ref 70k and 10 Mimg ramp-up of its ~1M steps, of 300
))
HYPERSPHERE_PAPER = flags(dict(
    mode="hypersphere", warmup_steps=0, weight_decay=0.0,  # nGPT (Loshchilov et al. 2024): no warm-up, no decay
    max_lr=1.5e-3,  # nGPT's reported lr (15e-4, its 0.5B model)
))
MUON_CAUTIOUS_WD = ["--muon-weight-decay", "0.28", "--muon-cautious-wd", "1"]  # nanochat's default weight decay
# modded-nanogpt's Adam lrs (0.008, scalars 5x); nanochat's (embed 0.3, head 0.008, scalars 0.5) are for an
# embedding RMS-normalized after the lookup and gain-free norms, neither of which GPT-2 has
ANCHOR_ADAM_LRS = ["--adam-embed-lr", "0.008", "--adam-head-lr", "0.008", "--adam-scalar-lr", "0.04"]

# nanochat's per-role AdamW settings (nanochat/gpt.py setup_optimizer and scripts/base_train.py @ 92d63d4; README
# "Per-role learning rates"), for its RMS-normed embedding; its x0 lambdas' own (dev/LOG.md, 2026-01-19) with its
# x0 init; its QK-norm scale
NANOCHAT_ROLES = (
    "--eps 1e-10 --adam-width-scale 1 --adam-embed-lr 0.3 --adam-embed-beta1 0.8 --adam-embed-beta2 0.995 "
    "--adam-embed-wd 0.001 --adam-head-lr 0.008 --adam-head-beta1 0.8 --adam-head-beta2 0.96 --adam-head-wd 0.01 "
    "--adam-value-embed-lr 0.15 --adam-value-embed-wd 0.01 --adam-scalar-lr 0.005 --adam-scalar-beta1 0.8 "
    "--adam-scalar-wd 0.05 --adam-gate-lr 0.2 --adam-gate-beta1 0.8 --adam-gate-wd 0").split()
NANOCHAT_X0 = "--x0-mix 1 --x0-mix-init nanochat --adam-x0-lr 0.5 --adam-x0-beta1 0.96 --adam-x0-wd 0".split()
NANOCHAT_QK = "--qk-norm 1 --qk-norm-scale 1.2".split()

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
    # found it, then the chosen set (the tiny-speedrun preset's switches). window-ramp is for FineWeb's long
    # documents: tiny-shakespeare's (~47 tokens) fit in the smallest window, so there it can only cost
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
        "edm2": ["--mode", "edm2", "--edm2-storage", "rows", "--ema-sigma-rel", "0.1"],  # as measured (BENCHMARKS)
        "hypersphere": ["--mode", "hypersphere", "--ema-sigma-rel", "0.1"],
    },
    # gpt-oss's pieces: its SwiGLU alone, then as 8 experts of half the width, 2 active per token (the dense
    # MLP's active parameters; the router picks two, so it gets a gradient), against the dense GPT-2 MLP
    "moe": {
        "baseline": [],
        "swiglu-oss": ["--mlp", "swiglu-oss"],
        "moe": ["--mlp", "swiglu-oss", "--moe-experts", "8", "--moe-top-k", "2"],
    },
    # the anchors' recipe around the speedrun preset as it was (packed rows, head untied from the start): crop
    # against pack, then nanochat's per-role AdamW settings, its QK-norm scale, value-embedding gate and x0 mixing,
    # each on top, then all at once
    "recipe": {
        "baseline": [],
        "speedrun-crop": [*SPEEDRUN_BEFORE, "--align-docs", "crop"],
        "speedrun": SPEEDRUN_BEFORE,
        "nanochat-lrs": [*SPEEDRUN_BEFORE, *NANOCHAT_ROLES, "--embed-norm", "1"],
        "qk-norm": [*SPEEDRUN_BEFORE, *NANOCHAT_QK],
        "ve-gate": [*SPEEDRUN_BEFORE, "--ve-gate", "nanochat"],
        "x0-mix": [*SPEEDRUN_BEFORE, *NANOCHAT_X0],
        "nanochat": [*SPEEDRUN_BEFORE, *NANOCHAT_ROLES, "--embed-norm", "1", *NANOCHAT_QK, "--ve-gate", "nanochat",
                     *NANOCHAT_X0],
    },
    # the 2025-26 records' switches, each alone on top of the speedrun preset as it was (head untied from the start),
    # then all of them (the bigram table at one row per vocabulary entry: the record's 15x is 3x this tiny model's
    # parameters); untie-at, the one that won on both corpora, is the speedrun preset now
    "speedrun2026": {
        "baseline": [],
        "speedrun": SPEEDRUN_BEFORE,
        "bigram": [*SPEEDRUN_BEFORE, "--bigram-rows", "50304"],
        "smear": [*SPEEDRUN_BEFORE, "--smear", "1"],
        "backout": [*SPEEDRUN_BEFORE, "--backout", "1"],
        "attn-gate": [*SPEEDRUN_BEFORE, "--attn-gate", "1"],
        "mtp": [*SPEEDRUN_BEFORE, "--mtp", "2"],
        "untie-at": [*SPEEDRUN_BEFORE, "--tie-head", "1", "--untie-at", "0.667"],
        "seq-len": [*SPEEDRUN_BEFORE, "--seq-len-start", "32"],
        "all": [*SPEEDRUN_BEFORE, "--bigram-rows", "50304", "--smear", "1", "--backout", "1", "--attn-gate", "1",
                "--mtp", "2", "--tie-head", "1", "--untie-at", "0.667", "--seq-len-start", "32"],
    },
    # the 2026 records' wins past speedrun2026's, each on the speedrun preset as it stands, at tiny's 300 steps: MUDD's
    # dense connections (record #81), and the MLP's activation: modded-nanogpt's ReLU², then its LeakyReLU(0.5)²
    "speedrun2026b": {
        "speedrun": flags(SPEEDRUN),
        "mudd": [*flags(SPEEDRUN), "--mudd", "1"],
        # the record's Adam for the dense connections: a quarter of the lr, betas (0.9, 0.99) (train_gpt.py @ f411b3d
        # param_table); in this preset they are the gate role's only parameters
        "mudd-anchor": [*flags(SPEEDRUN), "--mudd", "1", "--adam-gate-lr", "7.5e-4", "--adam-gate-beta2", "0.99"],
        "relu2": [*flags(SPEEDRUN), "--mlp", "relu2"],
        "leaky-relu2": [*flags(SPEEDRUN), "--mlp", "leaky-relu2"],
    },
    # the roadmap's verdicts at tuned lrs: each config swept over the lr that matters for it (--sweep, see the
    # docstring), on both corpora, then a second seed at each config's best
    "tuned": {
        "baseline": [],
        "muon": ["--optimizer", "muon"],
        "manifold": ["--optimizer", "muon", "--muon-manifold", "stiefel"],
        "edm2": ["--mode", "edm2"],
        "edm2-rows": ["--mode", "edm2", "--edm2-storage", "rows"],
        "hypersphere": ["--mode", "hypersphere"],
        "moe": ["--mlp", "swiglu-oss", "--moe-experts", "8", "--moe-top-k", "2"],
    },
    # the roadmap's pieces against the baseline: the modern preset, gpt-oss's experts (the moe suite's, at the dense
    # MLP's active parameters), manifold Muon on the modern preset, and the constrained modes both at their papers'
    # settings (pass no --max-lr, --warmup-steps or --weight-decay after `--`, which would override them) and at the
    # baseline's
    "roadmap": {
        "baseline": [],
        "modern": MODERN_BEFORE,
        "moe": ["--mlp", "swiglu-oss", "--moe-experts", "8", "--moe-top-k", "2"],
        "manifold": [*MODERN_BEFORE, "--muon-manifold", "stiefel"],
        "edm2": EDM2_PAPER,  # EDM2 as its paper stores weights, at EDM2-XS's lr
        "edm2-rows": [*EDM2_PAPER, "--edm2-storage", "rows", "--max-lr", "1e-3"],  # the variant BENCHMARKS measured
        "hypersphere": HYPERSPHERE_PAPER,
        "edm2-baseline": ["--mode", "edm2", "--edm2-storage", "rows"],  # as measured (BENCHMARKS)
        "hypersphere-baseline": ["--mode", "hypersphere"],
    },
    # the presets that came out of `tuned`, each at its own settings (the tiny model's 300 steps, its warm-up and
    # schedule) against the tiny preset's, and against plain Muon and the modern and speedrun presets (Muon's tuned
    # lr is the default): pass no --max-lr, --muon-lr, --max-steps or --warmup-steps after `--`
    "presets": {
        "baseline": [],
        "edm2": flags(EDM2),
        "hypersphere": flags(HYPERSPHERE),
        "manifold": flags(MANIFOLD),
        "muon": ["--optimizer", "muon"],
        "modern": flags(MODERN),
        "speedrun": flags(SPEEDRUN),
    },
}


# flags ablate sets itself, per run or per corpus: a --sweep of them would fight it
OWN_FLAGS = ("run-name", "log-dir", "data-dir")
FLAG_NAMES = {f.name.replace("_", "-") for f in TRAIN_FIELDS + MODEL_FIELDS}


class Run(NamedTuple):
    """One train_gpt2.py run of a suite: its config, its swept setting and its seed."""
    config: str
    setting: str = ""  # "FLAG=VALUE" of a --sweep; "": the config as written
    seed: int | None = None


def setting_label(config: str, setting: str) -> str:
    return config + (f"@{setting}" if setting else "")


def run_names(configs, sweeps: dict[str, tuple[str, list[str]]], seeds: list[int] | None) -> dict[str, Run]:
    """run name -> Run: the config's name, then @FLAG=VALUE for a swept value and -sSEED under --seeds
    (one seed too: a later --seeds that adds a second finds the first's runs under their names)."""
    names = {}
    for config in configs:
        flag, values = sweeps.get(config, ("", [""]))
        for value in values:
            setting = f"{flag}={value}" if flag else ""
            for seed in seeds or [None]:
                name = setting_label(config, setting) + (f"-s{seed}" if seeds else "")
                names[name] = Run(config, setting, seed)
    return names


def train_argv(preset: str, name: str, run: Run, flags: list[str], extra: list[str], data_dir: str | None,
               log_dir: Path) -> list[str]:
    data = ["--data-dir", data_dir] if data_dir else []  # none: the preset's own data
    seeds = ["--seed", str(run.seed)] if run.seed is not None else []  # after the config's flags: each seed
    flag, _, value = run.setting.partition("=")
    swept = ["--" + flag, value] if run.setting else []  # last: it overrides the preset, the config and `--`'s flags
    return ["--preset", preset, *flags, *seeds, *data, "--log-dir", str(log_dir), "--run-name", name, *extra, *swept]


def parse_sweeps(parser, specs: list[str], suite: dict, configs: dict, own: tuple[str, ...]) -> dict:
    """config -> (flag, values) from the --sweep specs [CONFIGS:]FLAG=V1,V2,...: one swept flag per config; a spec
    without CONFIGS covers every config that no other spec names."""
    named, general = {}, None
    for spec in specs:
        targets, _, sweep = spec.rpartition(":")
        flag, _, values = sweep.partition("=")
        values = values.split(",")
        if flag not in FLAG_NAMES or "" in values or len(set(values)) < len(values) or "/" in sweep:
            parser.error(f"--sweep {spec!r}: give [CONFIGS:]FLAG=V1,V2,... with a train_gpt2.py flag (no leading --) "
                         "and distinct values (no /: they name run folders), e.g. max-lr=1e-3,2e-3 or "
                         "muon:muon-lr=0.01,0.02")
        if flag in own:
            parser.error(f"--sweep {spec!r}: ablate sets --{flag} itself; sweep another flag")
        if not targets:
            if general:
                parser.error(f"--sweep: two sweeps for every config ({general[0]}, {flag}): name the configs of one, "
                             "e.g. --sweep muon:muon-lr=0.01,0.02 (a config sweeps one flag)")
            general = (flag, values)
        for config in targets.split(",") if targets else []:
            if config not in suite:
                parser.error(f"--sweep {spec!r}: unknown config {config!r}; choose from {list(suite)}")
            if config in named:
                parser.error(f"--sweep: config {config!r} is in two sweeps; a config sweeps one flag")
            named[config] = (flag, values)
    return {c: named.get(c, general) for c in configs if c in named or general}


def parse_corpora(parser, data_dir: str | None) -> dict[str, str | None]:
    """corpus name -> its data folder: {"": DIR} for a plain --data-dir DIR (the runs right in the suite folder)."""
    if not data_dir or "=" not in data_dir:
        return {"": data_dir}
    pairs = [pair.partition("=") for pair in data_dir.split(",")]
    names = [name for name, _, _ in pairs]
    if any(not name or "/" in name or not d for name, _, d in pairs) or len(set(names)) < len(names):
        parser.error(f"--data-dir {data_dir!r}: give one DIR, or distinct NAME=DIR pairs, e.g. "
                     "shak=data/shakespeare,docs=data/docs")
    return {name: d for name, _, d in pairs}


def checked_config(label: str, argv: list[str]):
    """The run's TrainConfig and preset, as train_gpt2.py will parse them: a bad value fails before any run."""
    try:
        return parse_config(argv)
    except SystemExit:  # parse_config printed its one-line error
        raise SystemExit(f"ablate: run {label!r}: train_gpt2.py refuses its flags (the error above); "
                         "nothing ran") from None


def finished(cfg, preset: str) -> bool:
    """Whether train_gpt2.py would train nothing: the run's folder holds this very config.json (as train_gpt2.py writes
    it) and a checkpoint at its last step. Launching it would load torch and the checkpoint just to say so."""
    run_dir = Path(cfg.log_dir) / cfg.run_name
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    ckpts = checkpoint_paths(str(run_dir))
    last = int(Path(ckpts[-1]).stem.removeprefix("ckpt_")) if ckpts else -1
    config = json.loads(json.dumps({"preset": preset, **dataclasses.asdict(cfg)}))  # tuples as JSON lists
    return saved == config and cfg.resume == "auto" and last >= (cfg.stop_at or cfg.max_steps)


def train_all(suite: str, launcher: list[str], jobs: list[tuple[str, Run, list[str]]]):
    """One train_gpt2.py process per (label, run, argv) job not finished yet, every job's flags checked first. A
    failed run stops the suite, unless it is a sweep's that began training: a value may diverge, which is a result."""
    configs = [checked_config(label, argv) for label, _, argv in jobs]
    for i, ((label, run, argv), (cfg, preset)) in enumerate(zip(jobs, configs), 1):
        head = f"=== [{i}/{len(jobs)}] {suite}/{label}"
        if finished(cfg, preset):
            print(f"{head}: finished, skipped", flush=True)
            continue
        cmd = [*launcher, str(TRAIN), *argv]
        print(f"{head}: {shlex.join(cmd)}", flush=True)
        rc = subprocess.run(cmd).returncode  # not captured: the run's progress streams straight to the terminal
        if rc and not (run.setting and (Path(cfg.log_dir) / cfg.run_name / "metrics.jsonl").is_file()):
            raise SystemExit(f"ablate: run {label!r} of suite {suite!r} failed (exit code {rc}); see its output "
                             "above. Re-running resumes it and skips the finished runs.")
        if rc:
            print(f"{head}: failed (exit code {rc}); the sweep goes on without this value", flush=True)


# ---------------------------------------------------------------------- tables


def crossing(records: list[dict], target: float) -> tuple[dict, float] | None:
    """The first val record at or below target, and the step where the val curve crosses target, linear between
    that evaluation and the one before (None: never reached)."""
    vals = [r for r in records if r.get("loss") is not None]
    hit = plot_logs.crossing([(r["loss"], r["step"]) for r in vals], target)
    return None if hit is None else (vals[hit[0]], hit[1][0])


def _finals(runs, names) -> list[float]:
    return [f for f in (plot_logs.summarize(runs[n])["final_val_loss"] for n in names) if f is not None]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def table_with_delta(runs: dict[str, dict[str, list[dict]]], baseline: list[str] | None = None) -> str:
    """plot_logs' table plus: final val loss minus the baseline's (the mean over the baseline's runs, by default
    the first run), the first val step at or below the baseline's final val loss, that crossing interpolated, and
    that step and its tokens as fractions of the baseline's run ("time to quality"; tokens differ from steps where a
    batch ramp runs)."""
    baseline = baseline or [next(iter(runs))]
    target = _mean(_finals(runs, baseline))
    base = plot_logs.summarize(runs[baseline[0]])
    lines = plot_logs.markdown_table(runs).splitlines()
    lines[0] += " vs baseline | steps to baseline | interpolated | x baseline steps | x baseline tokens |"
    lines[1] += "---:|---:|---:|---:|---:|"
    for i, run in enumerate(runs.values(), start=2):
        final = plot_logs.summarize(run)["final_val_loss"]
        hit = crossing(run.get("val", []), target) if target is not None else None
        lines[i] += " - |" if final is None or target is None else f" {final - target:+.4f} |"
        lines[i] += (" - | - | - | - |" if hit is None else f" {hit[0]['step']} | {hit[1]:.0f} | "
                     f"{hit[0]['step'] / base['step']:.2f} | {hit[0]['tokens'] / base['tokens']:.2f} |")
    return "\n".join(lines) + "\n"


def group_cells(runs, run_list: list[str], target: float | None, base: dict) -> dict[str, str]:
    """A config's seeds as table cells: their number, mean final val loss, spread (max - min), the mean minus target,
    and the mean steps to target: evaluated, interpolated, and as fractions of the baseline's steps and tokens."""
    finals = _finals(runs, run_list)
    if not finals:
        return dict(seeds="0", mean="-", spread="-", vs="-", steps="-", interpolated="-", x_steps="-", x_tokens="-")
    mean = _mean(finals)
    spread = f"{max(finals) - min(finals):.4f}" if len(finals) > 1 else "-"  # one seed: no spread to show
    cells = dict(seeds=str(len(finals)), mean=f"{mean:.4f}", spread=spread,
                 vs="-" if target is None else f"{mean - target:+.4f}")
    hits = [crossing(runs[r].get("val", []), target) if target is not None else None for r in run_list]
    if None in hits:
        reached = sum(h is not None for h in hits)
        steps = "-" if reached == 0 else f"not all seeds ({reached}/{len(hits)})"
        return cells | dict(steps=steps, interpolated="-", x_steps="-", x_tokens="-")
    step, tokens, interpolated = (_mean([h[0]["step"] for h in hits]), _mean([h[0]["tokens"] for h in hits]),
                                  _mean([h[1] for h in hits]))
    return cells | dict(steps=f"{step:.0f}", interpolated=f"{interpolated:.0f}", x_steps=f"{step / base['step']:.2f}",
                        x_tokens=f"{tokens / base['tokens']:.2f}")


def seed_table(runs: dict[str, dict[str, list[dict]]], groups: dict[str, list[str]], baseline: list[str]) -> str:
    """One row per group of runs (label -> run names, a config's seeds): the group_cells, measured against the mean
    final val loss of the baseline's runs."""
    target = _mean(_finals(runs, baseline))
    base = plot_logs.summarize(runs[baseline[0]])
    lines = ["| config | seeds | mean final val loss | seed spread | vs baseline | mean steps to baseline "
             "| interpolated | x baseline steps | x baseline tokens |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, run_list in groups.items():
        c = group_cells(runs, run_list, target, base)
        lines.append(f"| {label} | {c['seeds']} | {c['mean']} | {c['spread']} | {c['vs']} | {c['steps']} | "
                     f"{c['interpolated']} | {c['x_steps']} | {c['x_tokens']} |")
    return "\n".join(lines) + "\n"


def settings(names: dict[str, Run]) -> dict[str, dict[str, list[str]]]:
    """config -> setting -> its run names (one per seed), in the suite's order."""
    out = {}
    for name, run in names.items():
        out.setdefault(run.config, {}).setdefault(run.setting, []).append(name)
    return out


def ended_in_error(runs, run_list: list[str]) -> bool:
    return any(plot_logs.error_step(runs[n]) is not None for n in run_list)


def best_settings(runs: dict[str, dict[str, list[dict]]], names: dict[str, Run]) -> dict[str, str]:
    """config -> its setting with the lowest final val loss, the mean over its seeds. A setting with a run that
    ended in an error (diverged) or has no val loss is never the best, unless all of the config's are such."""
    best = {}
    for config, by_setting in settings(names).items():
        scores = {s: _mean(_finals(runs, r)) for s, r in by_setting.items() if not ended_in_error(runs, r)}
        scores = {s: m for s, m in scores.items() if m is not None}
        best[config] = min(scores, key=scores.get) if scores else next(iter(by_setting))
    return best


def best_notes(runs, names: dict[str, Run], best: dict[str, str]) -> list[str]:
    """One line per swept config: which value won, and by what."""
    notes = []
    for config, by_setting in settings(names).items():
        if best[config]:
            flag, value = best[config].split("=", 1)
            if ended_in_error(runs, by_setting[best[config]]):
                notes.append(f"- {config}: every one of its {len(by_setting)} {flag} values ended in an error")
                continue
            seeds = len(by_setting[best[config]])
            over = f" (mean over {seeds} seeds)" if seeds > 1 else ""
            notes.append(f"- {config}: best of {len(by_setting)} {flag} values by final val loss{over}: {value}")
    return notes


# ---------------------------------------------------------------------- reports


def load_runs(corpus_dir: Path, names: dict[str, Run]) -> dict[str, dict[str, list[dict]]]:
    missing = [n for n in names if not (corpus_dir / n / "metrics.jsonl").is_file()]
    if missing:
        raise SystemExit(f"ablate: no metrics.jsonl in {corpus_dir} for run(s) {missing}: run them first")
    return {name: plot_logs.load_run(corpus_dir / name) for name in names}


def report(suite: str, corpus_dir: Path, runs, names: dict[str, Run], best: dict[str, str]) -> str:
    """The plot (each config at its best setting) and the tables of one corpus, written to corpus_dir/SUITE.png/.md."""
    chosen = {n: r for n, r in names.items() if r.setting == best[r.config]}
    by_setting = settings(names)
    labels = {n: n + (f" (best of {len(by_setting[r.config])} {r.setting.split('=')[0]})" if r.setting else "")
              for n, r in chosen.items()}
    png = plot_logs.plot_runs({labels[n]: runs[n] for n in chosen}, corpus_dir / f"{suite}.png")
    baseline = [n for n, r in chosen.items() if r.config == next(iter(by_setting))]
    notes = best_notes(runs, names, best)
    text = "\n".join(notes) + "\n\n" if notes else ""
    text += table_with_delta({n: runs[n] for n in chosen}, baseline)
    groups = {setting_label(c, best[c]): d[best[c]] for c, d in by_setting.items()}
    if any(len(g) > 1 for g in groups.values()):
        text += "\n" + seed_table(runs, groups, baseline)
    if notes:
        every = {setting_label(c, s) + (" (best)" if s == best[c] and len(d) > 1 else "")
                 + (" (error)" if ended_in_error(runs, r) else ""): r
                 for c, d in by_setting.items() for s, r in d.items()}
        text += "\nEvery setting:\n\n" + seed_table(runs, every, baseline)
    png.with_suffix(".md").write_text(text)
    print(f"wrote {png} and {png.with_suffix('.md')}", file=sys.stderr)
    return text


def side_by_side(results: dict[str, tuple[dict, dict[str, str]]], names: dict[str, Run]) -> str:
    """One row per config, one group of columns per corpus (corpus -> (its runs, its best settings)): the best
    setting, the mean final val loss over the seeds, their spread and the mean steps to that corpus's baseline."""
    by_setting = settings(names)
    swept = any(s for d in by_setting.values() for s in d)
    keys = (["best"] if swept else []) + ["mean final val loss", "seed spread", "steps to baseline", "interpolated"]
    header = "| config | " + " | ".join(f"{corpus}: {k}" for corpus in results for k in keys) + " |"
    lines = [header, "|---|" + "---:|" * (len(keys) * len(results))]
    rows = {config: [] for config in by_setting}
    for runs, best in results.values():
        base_runs = by_setting[next(iter(by_setting))][best[next(iter(by_setting))]]
        target, base = _mean(_finals(runs, base_runs)), plot_logs.summarize(runs[base_runs[0]])
        for config, d in by_setting.items():
            c = group_cells(runs, d[best[config]], target, base)
            value = best[config].partition("=")[2] or "-"
            rows[config] += ([value] if swept else []) + [c["mean"], c["spread"], c["steps"], c["interpolated"]]
    lines += [f"| {config} | " + " | ".join(cells) + " |" for config, cells in rows.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]):
    """The command line: ablate's flags before `--`, every run's train_gpt2.py flags after it."""
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--data-dir", help="token shards for every run (default: the preset's); NAME=DIR,NAME=DIR: "
                        "the suite on each corpus, runs in LOG_DIR/SUITE/NAME/RUN, a table of them side by side")
    parser.add_argument("--log-dir", default="logs/ablate", help="runs go to LOG_DIR/SUITE/RUN")
    parser.add_argument("--preset", default="tiny", help="train_gpt2.py preset every config starts from")
    parser.add_argument("--only", help="comma-separated configs to run and plot (default: all of the suite)")
    parser.add_argument("--launcher", default="", help='e.g. "torchrun --nproc-per-node=8" (default: this python)')
    parser.add_argument("--plot-only", action="store_true", help="no training: plot and tabulate the finished runs")
    parser.add_argument("--seeds", help="comma-separated seeds: every config runs once per seed (runs NAME-sSEED) and "
                        "a second table gives each config's mean and seed spread")
    parser.add_argument("--sweep", action="append", default=[], metavar="[CONFIGS:]FLAG=V1,V2,...",
                        help="every config (or the comma-separated CONFIGS) runs once per value of train_gpt2.py's "
                        "--FLAG (runs CONFIG@FLAG=V), given last: it overrides the preset's, the config's and the `--` "
                        "flags. Repeatable, one flag per config; the tables keep each config's best value by final "
                        "val loss (mean over seeds) and list them all")
    args = parser.parse_args(ours)
    suite = SUITES[args.suite]
    configs = suite
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in suite]
        if unknown:
            parser.error(f"--only: unknown config(s) {unknown} in suite {args.suite!r}; choose from {list(suite)}")
        configs = {n: suite[n] for n in args.only.split(",")}
    args.configs = configs
    args.seed_list = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    args.sweeps = parse_sweeps(parser, args.sweep, suite, configs, OWN_FLAGS + (("seed",) if args.seeds else ()))
    args.corpora = parse_corpora(parser, args.data_dir)
    return args, extra


def main(argv=None) -> str:
    args, extra = parse_args(sys.argv[1:] if argv is None else list(argv))
    names = run_names(args.configs, args.sweeps, args.seed_list)
    suite_dir = Path(args.log_dir) / args.suite
    jobs = [(f"{corpus}/{name}" if corpus else name, run,
             train_argv(args.preset, name, run, args.configs[run.config], extra, data, suite_dir / corpus))
            for corpus, data in args.corpora.items() for name, run in names.items()]
    if not args.plot_only:
        train_all(args.suite, shlex.split(args.launcher) or [sys.executable], jobs)

    results, texts = {}, []
    for corpus in args.corpora:  # "": the one --data-dir DIR, whose runs lie right in the suite's folder
        runs = load_runs(suite_dir / corpus, names)
        results[corpus] = (runs, best_settings(runs, names))
        texts.append(report(args.suite, suite_dir / corpus, runs, names, results[corpus][1]))
    text = texts[0]
    if list(args.corpora) != [""]:
        text = side_by_side(results, names) + "".join(f"\n## {c} ({d})\n\n{t}" for (c, d), t in
                                                       zip(args.corpora.items(), texts))
        (suite_dir / f"{args.suite}.md").write_text(text)
        print(f"wrote {suite_dir / args.suite}.md: the corpora side by side", file=sys.stderr)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
