"""Plot and tabulate training runs from their logs/<run>/metrics.jsonl files.

    python plot_logs.py logs/run_a logs/run_b [--out runs.png] [--x tokens|step|time] [--smooth 0.9] [--labels a,b]
    python plot_logs.py logs/ --watch 60    # re-draw whenever a run's metrics grew (e.g. an rsync loop), until Ctrl-C

Each argument is a metrics.jsonl file, a run folder holding one, or a parent folder (every run
below it). Writes the PNG, writes a markdown summary table beside it (same name, .md) and prints
the table.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Figure (not pyplot) renders headless through Agg and keeps no global figure state,
# so other scripts can call plot_runs() whatever backend they use.
import matplotlib
from matplotlib.figure import Figure

# Reference scores at the 124M size.
GPT2_VAL_LOSS = 3.2924  # FineWeb-Edu val loss measured for OpenAI's released GPT-2 124M weights
GPT2_HELLASWAG = 0.2955  # acc_norm of OpenAI's GPT-2 124M
GPT3_HELLASWAG = 0.337  # acc_norm of GPT-3 124M (GPT-3 paper)

X_CHOICES = ("tokens", "step", "time")


def find_metrics(path) -> list[Path]:
    """The metrics.jsonl files a command-line argument stands for."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / "metrics.jsonl").is_file():
        return [path / "metrics.jsonl"]
    return sorted(path.rglob("metrics.jsonl"))


def load_run(path) -> dict[str, list[dict]]:
    """Records by kind, each list sorted by step, one record per (kind, step).

    The file may be mid-write (last line cut short) and may have been appended to by a resumed
    run that redoes some steps: unreadable lines are skipped and the later record of a
    (kind, step) replaces the earlier one.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    latest = {}
    # bytes, not text: a line cut inside a multi-byte character must not fail the whole read
    for line in path.read_bytes().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # partial JSON or broken UTF-8 (UnicodeDecodeError is a ValueError)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("kind"), str) and isinstance(rec.get("step"), int):
            latest[rec["kind"], rec["step"]] = rec
    run = {}
    for (kind, _), rec in sorted(latest.items()):
        run.setdefault(kind, []).append(rec)
    return run


def _values(records, key) -> list:
    return [r[key] for r in records if r.get(key) is not None]


def summarize(run: dict[str, list[dict]]) -> dict:
    """Headline numbers of one run; None where the run has no such records."""
    every = [r for records in run.values() for r in records]
    val_loss = _values(run.get("val", []), "loss")  # sorted by step, so the last is the final one
    val_bpb = _values(run.get("val", []), "bpb")
    tok_per_s = _values(run.get("train", []), "tok_per_s")
    return {
        "step": max((r["step"] for r in every), default=None),
        "tokens": max(_values(every, "tokens"), default=None),
        "final_val_loss": val_loss[-1] if val_loss else None,
        "final_val_bpb": val_bpb[-1] if val_bpb else None,
        "best_val_loss": min(val_loss, default=None),
        "best_acc_norm": max(_values(run.get("hellaswag", []), "acc_norm"), default=None),
        # median: robust to the slow compile/warm-up steps and to eval pauses
        "median_tok_per_s": statistics.median(tok_per_s) if tok_per_s else None,
        "time": max(_values(every, "time"), default=None),
    }


def fmt_tokens(n) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n:,.0f}"


def fmt_duration(seconds) -> str:
    s = round(seconds)
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def markdown_table(runs: dict[str, dict[str, list[dict]]]) -> str:
    """One row per run (name -> records by kind, as load_run returns); a val bits-per-byte column if any
    run logs one."""
    loss = "{:.4f}".format
    summaries = {name: summarize(run) for name, run in runs.items()}
    has_bpb = any(s["final_val_bpb"] is not None for s in summaries.values())
    columns = [  # (header, summary key, formatter)
        ("step", "step", str),
        ("tokens", "tokens", fmt_tokens),
        ("final val loss", "final_val_loss", loss),
        ("best val loss", "best_val_loss", loss),
        ("best HellaSwag acc_norm", "best_acc_norm", loss),
        ("median tok/s", "median_tok_per_s", "{:,.0f}".format),
        ("wall time", "time", fmt_duration),
    ]
    if has_bpb:
        columns.insert(3, ("final val bpb", "final_val_bpb", loss))
    lines = [
        "| run | " + " | ".join(header for header, _, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, summary in summaries.items():
        cells = [name.replace("|", "\\|")]
        cells += ["-" if summary[key] is None else fmt(summary[key]) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ema(values, beta: float) -> list[float]:
    """Exponential moving average, bias-corrected as in Adam: dividing by 1 - beta^t undoes the
    pull toward the zero initial value, so the first points sit on the data."""
    if not 0 <= beta < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {beta}")
    out, avg = [], 0.0
    for t, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**t))
    return out


def _x_scale(runs, x) -> tuple[float, str]:
    """Divisor and axis label that keep the x ticks short for the longest run."""
    longest = max((summarize(run)[x] or 0 for run in runs.values()), default=0)
    units = {
        "tokens": [(1e9, "tokens (B)"), (1e6, "tokens (M)"), (1, "tokens")],
        "time": [(3600, "wall time (h)"), (60, "wall time (min)"), (1, "wall time (s)")],
        "step": [(1, "step")],
    }[x]
    return next(((d, label) for d, label in units if longest >= 2 * d), units[-1])


def plot_runs(runs: dict[str, dict[str, list[dict]]], out_path, x: str = "tokens", smooth: float = 0.9) -> Path:
    """Train loss, val loss and HellaSwag acc_norm against x, runs overlaid; saves a PNG."""
    if x not in X_CHOICES:
        raise ValueError(f"x must be one of {X_CHOICES}, got {x!r}")
    divisor, xlabel = _x_scale(runs, x)
    fig = Figure(figsize=(17, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    train_title = f"train loss (EMA {smooth}; raw faint)" if smooth else "train loss"
    panels = [
        ("train", "loss", train_title),
        ("val", "loss", "val loss"),
        ("hellaswag", "acc_norm", "HellaSwag acc_norm"),
    ]
    ref = {"color": "black", "linestyle": "--", "linewidth": 1}
    axes[2].axhline(GPT2_HELLASWAG, label=f"OpenAI GPT-2 124M ({GPT2_HELLASWAG})", **ref)
    axes[2].axhline(GPT3_HELLASWAG, label=f"GPT-3 124M ({GPT3_HELLASWAG})", **(ref | {"linestyle": ":"}))
    # one color per run, the same in every panel; beyond 10 runs the default cycle would repeat colors
    palette = [f"C{i}" for i in range(10)] if len(runs) <= 10 else [matplotlib.colormaps["tab20"](i) for i in range(20)]

    for ax, (kind, key, title) in zip(axes, panels):
        has_data, shown = False, []  # shown: plotted y values that decide the y range
        for i, (name, run) in enumerate(runs.items()):
            records = [r for r in run.get(kind, []) if r.get(key) is not None and r.get(x) is not None]
            if not records:
                continue
            has_data = True
            color = palette[i % len(palette)]
            xs = [r[x] / divisor for r in records]
            ys = [r[key] for r in records]
            if kind == "train" and smooth:
                ax.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)  # raw, faint
                ys = ema(ys, smooth)
            shown += ys[len(ys) // 10 :] if kind == "train" else [y for r, y in zip(records, ys) if r["step"] > 0]
            # evals are sparse: markers show where each one was taken
            ax.plot(xs, ys, color=color, label=name, marker=None if kind == "train" else "o", markersize=3)
            weight_ema = [r for r in run.get("val_ema", []) if r.get(x) is not None] if kind == "val" else []
            if weight_ema:  # the val loss of the run's weight EMA (train_gpt2.py --ema-sigma-rel): same color, dashed
                ax.plot([r[x] / divisor for r in weight_ema], [r["loss"] for r in weight_ema], color=color,
                        linestyle="--", marker="o", markersize=2, label=f"{name} EMA")
                shown += [r["loss"] for r in weight_ema]
        if kind != "hellaswag" and shown:
            # losses: zoom on where the runs differ, past the first tenth of training (train) or the
            # step-0 eval (val) that would squash every curve into a flat line at the bottom
            lo, hi = min(shown), max(shown)
            pad = 0.05 * (hi - lo) or 0.1
            ax.set_ylim(lo - pad, hi + pad)
            if kind == "val" and lo - pad < GPT2_VAL_LOSS + 1:  # the GPT-2 reference, once the runs come near it
                ax.axhline(GPT2_VAL_LOSS, label=f"OpenAI GPT-2 124M ({GPT2_VAL_LOSS})", **ref)
                ax.set_ylim(min(lo, GPT2_VAL_LOSS) - pad, hi + pad)
        if not has_data:
            ax.text(0.5, 0.5, f"no {kind} records", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    _save(Path(out_path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return Path(out_path)


def _save(path: Path, save) -> None:
    """save(a temp path), then rename it over path: a viewer that reloads the file (--watch) never sees half.
    (Not runtime.atomic_write, which would make this laptop tool import torch.)"""
    tmp = path.with_name(f".{path.name}.tmp")
    save(tmp)
    os.replace(tmp, path)


def _find_runs(parser, args) -> dict[str, Path]:
    """Run name -> metrics.jsonl for the command line's paths."""
    # dict.fromkeys: a run named twice (e.g. logs/ and logs/run_a) is plotted once
    files = list(dict.fromkeys(f.resolve() for path in args.paths for f in find_metrics(path)))
    if not files:
        parser.error(f"no metrics.jsonl found in {' '.join(args.paths)}")
    if args.labels:
        names = args.labels.split(",")
        if len(names) != len(files) or len(set(names)) != len(names):
            parser.error(f"--labels needs {len(files)} distinct names, one per run: {[str(f) for f in files]}")
    else:
        names = [f.parent.name for f in files]
        if len(set(names)) != len(names):  # same run name under different parents
            names = [str(f.parent) for f in files]
    return dict(zip(names, files))


def _draw(files: dict[str, Path], args) -> None:
    runs = {name: load_run(f) for name, f in files.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, out, x=args.x, smooth=args.smooth)
    table = markdown_table(runs)
    _save(out.with_suffix(".md"), lambda tmp: tmp.write_text(table))
    print(table, end="", flush=True)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)


def _stamps(files: dict[str, Path]) -> dict[Path, tuple[int, int] | None]:
    """Size and mtime of each file: a change in either means new records (None: gone for now)."""
    stamps = {}
    for f in files.values():
        try:
            st = f.stat()
            stamps[f] = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamps[f] = None
    return stamps


def watch(parser, args, stamps) -> None:
    """Re-find the runs every --watch seconds and re-draw when a metrics file (or the set of runs) changed
    from `stamps`."""
    print(f"watching every {args.watch:g} s; Ctrl-C stops", file=sys.stderr)
    try:
        while True:
            time.sleep(args.watch)
            files = _find_runs(parser, args)  # new run folders count too: an rsync may bring them any time
            if (now := _stamps(files)) != stamps:
                stamps = now
                _draw(files, args)
    except KeyboardInterrupt:
        print("stopped watching", file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="metrics.jsonl files, run folders, or parents of run folders")
    parser.add_argument("--out", default="runs.png", help="PNG path; the table goes beside it as .md")
    parser.add_argument("--x", choices=X_CHOICES, default="tokens", help="x axis")
    parser.add_argument("--smooth", type=float, default=0.9, help="EMA factor for train loss in [0, 1); 0 = raw")
    parser.add_argument("--labels", help="comma-separated run names, one per run found (default: run folder names)")
    parser.add_argument("--watch", type=float, metavar="SECONDS",
                        help="keep running: check the metrics files every SECONDS and re-draw when they changed")
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error("--smooth must be in [0, 1)")
    if args.watch is not None and args.watch <= 0:
        parser.error("--watch must be a positive number of seconds")
    files = _find_runs(parser, args)
    stamps = _stamps(files)  # before reading: a line appended while drawing makes the first check re-draw
    _draw(files, args)
    if args.watch:
        watch(parser, args, stamps)


if __name__ == "__main__":
    main()
