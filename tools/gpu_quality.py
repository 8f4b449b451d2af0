"""The training-quality check of one GPU machine: gpt2-124m (the baseline), gpt2-124m-modern and gpt2-124m-speedrun
(or the 124M presets that --presets lists, the first one the baseline), each trained from scratch by a real
`train_gpt2.py` process (what users run: compiled, bf16) on the same tokens with one short schedule, its val loss
evaluated every 25 steps on the same val tokens. Per preset it reports the speed (median tok/s, MFU, peak memory,
the first step's time: the compile), the val curve, and the tokens and training seconds it needs to reach the
baseline's final val loss (interpolated linearly between evaluations), as markdown on stdout and in OUT/quality.md,
the curves in OUT/quality.png, each run's metrics.jsonl and log.txt in OUT/runs/.

    python3 -m tools.gpu_quality --data-dir data/docs15m --out OUT           # one H100: ~6 min, progress on stderr
    python3 -m tools.gpu_quality --dry-run --device cpu --data-dir DIR    # the plan, then tiny runs on the CPU
    python3 -m tools.gpu_quality --presets gpt2-124m,gpt2-124m-edm2,gpt2-124m-hypersphere --out OUT  # ~5.6 min

The data, built here once (data/ is ignored by .gitignore's /data): the whole 14.8M-token docs corpus of ../shared
(29 MB as uint16), in shards of 1,048,577 tokens = 16 batches of 64 x 1024 (+1 target), so that no train token is
skipped at a shard's end; and tiktoken's cache, which the loop needs for its bits per byte:

    python fineweb_edu.py --source ../shared/data/docs --out data/docs15m --max-tokens 15000000 --shard-size 1048577
    cp -r ../shared/data/tiktoken data/tiktoken

Carry `data/docs15m` and `data/tiktoken` (31 MB, under the 64 MiB) to the GPU machine and run there with
TIKTOKEN_CACHE_DIR=data/tiktoken.
That is 1.05M val tokens (16 batches, all evaluated) and 13.7M train tokens: 209 steps of 65,536, so the 200 steps
below never repeat a train token (check_data refuses shards too small for the plan, and says how to build them).

The plan, the same for every preset: 200 steps of 65,536 tokens (B=64, T=1024, no gradient accumulation), 13.1M
tokens each; a 20-step warm-up (10%), then each preset's own schedule shape on the 200 steps: cosine down to 10% of
the peak for gpt2-124m, edm2, hypersphere and manifold, wsd (flat, then linear down to 10% over the last 20%) for
modern and speedrun; the presets' peak learning rates. The speedrun runs with --align-docs 0, so that all train on
the same rows: its preset's pack lays this corpus's ~3,100-token documents out in other rows (and crop would keep
only the first 1025 tokens of each, 38 batches of the 209, 2.5M of the 13.7M tokens, and repeat them 5 times).

Sizing, for one H100 (BENCHMARKS.md): gpt2-124m trains at ~450k tok/s (the loop at B=16: 445-454k; the bench at
B=64: 481k), so 13.1M tokens take ~29 s; modern and speedrun are assumed slower, 350k tok/s (~37 s; gpu_check's
train-step rows measure them); plus ~60 s each for the compile (assumed; the loop's first step took 29 s for
gpt2-124m), 9 evaluations of 1M tokens at ~3x the training speed (~7 s) and ~10 s of start-up: ~106 + 2 x 115 s,
about 5.6 minutes in all (budget() prints it, also in the dry run). A run is stopped after --run-timeout s.
Any other 124M preset (edm2, hypersphere, manifold) is assumed at 350k tok/s too, unmeasured: manifold Muon's
fp32 polar iterations (10 dual steps per matrix) may well make it slower than that.
"""

import argparse
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt2.config import PRESETS as PRESET_VALUES
from gpt2.config import TrainConfig
from gpt2.dataloader import SPLITS, DataError, gpt2_tokenizer, read_manifest
from gpt2.runtime import pick_device
from plot_logs import crossing, load_run, plot_runs

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ["gpt2-124m", "gpt2-124m-modern", "gpt2-124m-speedrun"]  # --presets' default, in the order they run
CHOICES = [p for p in PRESET_VALUES if p.startswith("gpt2-124m")]
ASSUMED_TOK_S, OTHER_TOK_S = {"gpt2-124m": 450_000}, 350_000  # one H100 (see the docstring)
ASSUMED_COMPILE_S, ASSUMED_START_S, EVAL_SPEEDUP = 60, 10, 3  # an evaluation is a forward pass only: ~3x faster
RECIPE = ("build the shards with `python fineweb_edu.py --source ../shared/data/docs --out data/docs15m --max-tokens "
          "15000000 --shard-size 1048577` (the docstring of tools/gpu_quality.py has the whole recipe)")
SUMMARY = ["preset", "tok/s (median)", "MFU", "peak memory", "first step (compile)", "final val loss",
           "tokens to {baseline}'s final val", "training seconds to it", "run wall time"]


@dataclass
class Plan:
    steps: int
    batch_size: int
    seq_len: int
    val_every: int
    val_tokens: int
    warmup: int
    model: list[str] = field(default_factory=list)  # model flags (the dry run's tiny model)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


FULL = Plan(steps=200, batch_size=64, seq_len=1024, val_every=25, val_tokens=16 * 65_536, warmup=20)
DRY = Plan(steps=6, batch_size=4, seq_len=32, val_every=2, val_tokens=512, warmup=2,
           model=["--n-layer", "2", "--n-head", "2", "--n-embd", "32"])


def parse_presets(text: str) -> list[str]:
    """--presets' comma-separated names, checked: 124M presets only, at least one, none twice."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    choices = f"the 124M presets of gpt2/config.py: {', '.join(CHOICES)}"
    if not names:
        raise SystemExit(f"--presets {text!r} names no preset; list one or more of {choices}")
    for name in names:
        if name not in CHOICES:
            raise SystemExit(f"--presets: {name!r} is not a 124M preset; pick from {choices}")
        if names.count(name) > 1:  # each run's folder and table row is its preset's name
            raise SystemExit(f"--presets lists {name} twice; list each preset once, from {choices}")
    return names


def budget(plan: Plan, presets: list[str]) -> list[str]:
    """The plan's tokens and, at the assumed speeds, its seconds per preset and in all, one line each."""
    tokens, evals = plan.steps * plan.tokens_per_step, plan.steps // plan.val_every + 1
    lines = [f"plan: {len(presets)} presets x {plan.steps} steps x {plan.tokens_per_step:,} tokens "
             f"(B={plan.batch_size}, T={plan.seq_len}) = {tokens / 1e6:.1f}M tokens each; val every "
             f"{plan.val_every} steps ({evals} evaluations) on {plan.val_tokens:,} tokens"]
    total = 0.0
    for preset in presets:
        tok_s = ASSUMED_TOK_S.get(preset, OTHER_TOK_S)
        train_s, eval_s = tokens / tok_s, evals * plan.val_tokens / (EVAL_SPEEDUP * tok_s)
        seconds = train_s + eval_s + ASSUMED_COMPILE_S + ASSUMED_START_S
        total += seconds
        lines.append(f"- {preset}: {train_s:.0f} s of training at an assumed {tok_s:,} tok/s + {eval_s:.0f} s of "
                     f"evaluations + {ASSUMED_COMPILE_S} s compile + {ASSUMED_START_S} s start-up = {seconds:.0f} s")
    lines.append(f"- estimate: {total:.0f} s ({total / 60:.1f} min) on one H100")
    return lines


def check_data(data_dir: str, plan: Plan) -> int:
    """The val tokens an evaluation reads, after checking that data_dir holds finished shards with a train token
    for every step of the plan (none repeated) and a val batch; SystemExit with the recipe if not."""
    try:
        manifest = read_manifest(data_dir)
    except DataError as e:
        raise SystemExit(f"{e}\n{RECIPE}") from None
    windows = {split: sum((s["tokens"] - 1) // plan.tokens_per_step for s in manifest["shards"]
                          if s["split"] == split) for split in SPLITS}
    if windows["train"] < plan.steps or not windows["val"]:
        raise SystemExit(f"{data_dir} holds {windows['train']} train and {windows['val']} val batches of "
                         f"{plan.tokens_per_step:,} tokens; the plan needs {plan.steps} and 1: {RECIPE}")
    return min(plan.val_tokens // plan.tokens_per_step, windows["val"]) * plan.tokens_per_step


def realigns(preset: str) -> bool:
    """Whether the preset's run takes --align-docs 0: the same rows as the others (see the docstring)."""
    return PRESET_VALUES[preset].get("align_docs", "0") != "0"


def train_command(preset: str, plan: Plan, data_dir: str, log_dir: str, device: str) -> list[str]:
    """The train_gpt2.py command line of one preset's run."""
    flags = {"--batch-size": plan.batch_size, "--seq-len": plan.seq_len, "--total-batch-size": plan.tokens_per_step,
             "--max-steps": plan.steps, "--warmup-steps": plan.warmup, "--val-every": plan.val_every,
             "--val-tokens": plan.val_tokens, "--checkpoint-every": 0, "--hellaswag-every": 0, "--sample-every": 0}
    if realigns(preset):
        flags["--align-docs"] = 0
    return [sys.executable, str(ROOT / "train_gpt2.py"), "--preset", preset, "--data-dir", data_dir,
            "--log-dir", log_dir, "--run-name", preset, "--device", device,
            *[str(x) for item in flags.items() for x in item], *plan.model]


def run_preset(cmd: list[str], run_dir: Path, keep: Path, timeout: float) -> tuple[float, str | None]:
    """One run: its wall seconds and None, or what stopped it. Its output goes to keep/output.txt, its metrics,
    log and config beside it (not its checkpoint)."""
    t0, error = time.perf_counter(), None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)  # paths: from this cwd
        output = proc.stdout + proc.stderr
        if proc.returncode:
            error = f"exit code {proc.returncode}: {(output.strip().splitlines() or [''])[-1]}"
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        error = f"timed out after {timeout:.0f} s"
    keep.mkdir(parents=True, exist_ok=True)
    (keep / "output.txt").write_text(output)
    for name in ("metrics.jsonl", "log.txt", "config.json"):
        if (run_dir / name).exists():
            shutil.copy(run_dir / name, keep / name)
    return time.perf_counter() - t0, error


def read_run(metrics: Path) -> dict:
    """A run's speed, from its train records after the first (whose time includes the compile), and its val curve
    [(step, tokens, training seconds, loss)]. Training seconds: the optimizer steps' own times summed (no
    evaluations), the first step counted at the median step time."""
    run = load_run(metrics) if metrics.exists() else {}
    train, val = run.get("train", []), run.get("val", [])
    steady = [r for r in train if r["step"] > 1] or train
    median_s = statistics.median(r["dt_ms"] for r in steady) / 1000 if steady else 0.0
    seconds, total = {0: 0.0}, 0.0
    for r in train:
        total += median_s if r["step"] == 1 else r["dt_ms"] / 1000
        seconds[r["step"]] = total
    mfu, mem = [r["mfu"] for r in steady if r.get("mfu")], [r["mem_gb"] for r in train if r.get("mem_gb")]
    return {"run": run, "first_step_s": train[0]["dt_ms"] / 1000 if train else None,
            "tok_s": statistics.median(r["tok_per_s"] for r in steady) if steady else None,
            "mfu": statistics.median(mfu) if mfu else None, "mem_gb": max(mem, default=None),
            "curve": [(r["step"], r["tokens"], seconds.get(r["step"]), r["loss"]) for r in val if r["step"] in seconds]}


def reach(curve: list[tuple], target: float) -> tuple[float, float] | None:
    """(tokens, seconds) at which a val curve [(step, tokens, seconds, loss)] first gets to target or below,
    interpolated linearly between that evaluation and the one before; None if it never does."""
    hit = crossing([(loss, tokens, seconds) for _, tokens, seconds, loss in curve], target)
    return None if hit is None else hit[1]


def fmt(value, spec: str, unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}"


def fmt_tokens(n: float) -> str:
    """13,107,200 -> '13.11M' (a step of 65,536 is 0.07M), 768 -> '768'."""
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,.0f}"


def summary_table(results: dict[str, dict]) -> list[str]:
    """One row per preset: speed, final val loss, and the tokens and seconds to the baseline's final val loss; the
    baseline is the first preset of results (they are in --presets' order)."""
    baseline = next(iter(results))
    base = results[baseline]["curve"]
    target = base[-1][3] if base else None
    header = [column.format(baseline=baseline) for column in SUMMARY]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for preset, r in results.items():
        reached = reach(r["curve"], target) if target is not None else None
        tokens, seconds = ("no baseline",) * 2 if target is None else ("not reached",) * 2
        if reached:
            tokens, seconds = fmt_tokens(reached[0]), f"{reached[1]:.1f} s"
        final = r["curve"][-1][3] if r["curve"] else None
        wall = f"{r['wall_s']:.0f} s" + (f" ({r['error']})" if r["error"] else "")
        cells = [preset, fmt(r["tok_s"], ",.0f"), fmt(r["mfu"], ".1%"), fmt(r["mem_gb"], ".1f", " GiB"),
                 fmt(r["first_step_s"], ".1f", " s"), fmt(final, ".4f"), tokens, seconds, wall]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def curve_table(results: dict[str, dict]) -> list[str]:
    """The val curves side by side: one row per evaluated step."""
    steps = sorted({(step, tokens) for r in results.values() for step, tokens, _, _ in r["curve"]})
    losses = {p: {step: loss for step, _, _, loss in r["curve"]} for p, r in results.items()}
    rows = ["| step | tokens | " + " | ".join(results) + " |", "|" + "---|" * (2 + len(results))]
    for step, tokens in steps:
        rows.append(f"| {step} | {fmt_tokens(tokens)} | "
                    + " | ".join(fmt(losses[p].get(step), ".4f") for p in results) + " |")
    return rows


def run_all(args, presets: list[str], plan: Plan, out: Path) -> dict[str, dict]:
    """Every preset's run, one after the other in the order listed, in a temporary folder under --log-dir (the loop's
    final checkpoint is not kept): preset -> read_run's figures, wall_s and error."""
    results = {}
    os.makedirs(args.log_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.log_dir) as tmp:
        for preset in presets:
            cmd = train_command(preset, plan, args.data_dir, tmp, args.device)
            wall, error = run_preset(cmd, Path(tmp) / preset, out / "runs" / preset, args.run_timeout)
            results[preset] = {**read_run(out / "runs" / preset / "metrics.jsonl"), "wall_s": wall, "error": error}
            shutil.rmtree(Path(tmp) / preset, ignore_errors=True)
            final = results[preset]["curve"][-1][3] if results[preset]["curve"] else None
            print(f"[gpu_quality] {preset}: {wall:.0f} s, final val loss {fmt(final, '.4f')}"
                  + (f", {error}" if error else ""), file=sys.stderr, flush=True)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data/docs15m", help="the shards (see above for how to build them)")
    parser.add_argument("--out", default="logs/gpu_quality", help="quality.md, quality.png and runs/ go here")
    parser.add_argument("--log-dir", default="logs", help="the runs train in a temporary folder in here")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, then run it tiny (6 steps)")
    parser.add_argument("--run-timeout", type=float, default=300, help="seconds one preset's run may take")
    parser.add_argument("--presets", default=",".join(PRESETS), help="the 124M presets to train, comma-separated, "
                        f"in this order, the first one the baseline (default: %(default)s): {', '.join(CHOICES)}")
    args = parser.parse_args(argv)
    presets = parse_presets(args.presets)
    device = pick_device(args.device)
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit(f"gpu_quality.py measures a CUDA GPU, and --device {args.device} is {device}: on a "
                         "machine without one, check the script with --dry-run --device cpu")
    plan = DRY if args.dry_run else FULL
    plan_lines = budget(FULL, presets)
    print("\n".join(plan_lines), file=sys.stderr, flush=True)
    val_tokens = check_data(args.data_dir, plan)
    gpt2_tokenizer()  # before any run: the loop needs it (TIKTOKEN_CACHE_DIR), and stops without it
    out = Path(args.out)
    results = run_all(args, presets, plan, out)

    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} (dry run: tiny runs)"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    schedules = ", ".join(f"{p} {PRESET_VALUES[p].get('schedule', TrainConfig.schedule)}" for p in presets)
    realigned = [p for p in presets if realigns(p)]
    aligned = f" ({', '.join(realigned)} with --align-docs 0)" if realigned else ""
    ran = (f"ran: {plan.steps} steps x {plan.tokens_per_step:,} tokens, warm-up {plan.warmup} steps, then {schedules}"
           f"{aligned}, val every {plan.val_every} steps on {val_tokens:,} tokens of {args.data_dir}")
    markdown = [f"## gpu_quality: {label}, torch {torch.__version__}, {date}", "", *plan_lines, ran, "",
                *summary_table(results), "", *curve_table(results)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.md").write_text("\n".join(markdown) + "\n")
    runs = {preset: r["run"] for preset, r in results.items() if r["run"]}
    if runs:
        plot_runs(runs, out / "quality.png", x="tokens", smooth=0.0, reference=False)
    print("\n".join(markdown))
    return 0 if all(r["error"] is None for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
