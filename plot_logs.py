"""Plot and tabulate training runs from their logs/<run>/metrics.jsonl files.

    python plot_logs.py logs/run_a logs/run_b [--out runs.png] [--x tokens|step|time] [--smooth 0.9] [--labels a,b]
    python plot_logs.py logs/ --watch 60    # re-draw whenever a run's metrics grew (e.g. an rsync loop), until Ctrl-C

Each argument is a metrics.jsonl file, a run folder holding one, or a parent folder (every run
below it). Writes the PNG, writes a markdown summary table beside it (same name, .md) and prints
the table.

References (--no-reference leaves them out): the HellaSwag panel draws OpenAI GPT-2 124M's and GPT-3 Small's
scores, and the val panel GPT-2's val loss on a run's own val tokens where `python -m tools.reference_loss`
computed it (logs/reference/, matched to the run's config.json); the table gains the gaps to them. A run that
ended in an error record (it died, and no train record followed: it was not resumed since) is marked in the
legend and the table, and the error's message printed.
"""

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

# Figure (not pyplot) renders headless through Agg and keeps no global figure state,
# so other scripts can call plot_runs() whatever backend they use.
import matplotlib
from matplotlib.figure import Figure

from tools.reference_loss import SUBDIR, find_reference

# HellaSwag val acc_norm at the 124M size (GPT-2's val loss depends on the data: tools/reference_loss.py computes it)
GPT2_HELLASWAG = 0.2955  # OpenAI GPT-2 124M, this scorer: karpathy/build-nanogpt hellaswag.py docstring @8018ed2
GPT3_HELLASWAG = 0.337  # GPT-3 Small 125M, zero-shot: Brown et al. 2020 (arXiv:2005.14165) Table H.1, 33.7

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
    (kind, step) replaces the earlier one. Of the "error" records (the run died) only the last one
    written counts, and only while no train record follows it: one that does means the run was
    resumed and went on.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    latest, error, error_line, train_line = {}, None, -1, -1
    # bytes, not text: a line cut inside a multi-byte character must not fail the whole read
    for i, line in enumerate(path.read_bytes().splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:  # partial JSON or broken UTF-8 (UnicodeDecodeError is a ValueError)
            continue
        if not (isinstance(rec, dict) and isinstance(rec.get("kind"), str) and isinstance(rec.get("step"), int)):
            continue
        if rec["kind"] == "error":
            error, error_line = rec, i
        else:
            latest[rec["kind"], rec["step"]] = rec
            train_line = i if rec["kind"] == "train" else train_line
    run = {}
    for (kind, _), rec in sorted(latest.items()):
        run.setdefault(kind, []).append(rec)
    if error is not None and train_line < error_line:
        run["error"] = [error]
    return run


def error_step(run: dict[str, list[dict]]) -> int | None:
    """The step of the error the run ended in (load_run keeps only an unresolved one); None if it did not."""
    return run["error"][0]["step"] if run.get("error") else None


def run_label(name: str, run: dict[str, list[dict]]) -> str:
    step = error_step(run)
    return name if step is None else f"{name} (error at step {step})"


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


def crossing(points: list[tuple], target: float) -> tuple[int, tuple[float, ...]] | None:
    """Where a curve of points (loss, x, ...) first gets to target or below: that point's index and its x's,
    linear between it and the point before (the first point's own if it is there already; None: never)."""
    for i, (loss, *xs) in enumerate(points):
        if loss <= target:
            if i == 0:
                return 0, tuple(float(x) for x in xs)
            loss0, *xs0 = points[i - 1]
            f = (loss0 - target) / (loss0 - loss)
            return i, tuple(a + f * (b - a) for a, b in zip(xs0, xs))
    return None


def fmt_tokens(n) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n:,.0f}"


def fmt_duration(seconds) -> str:
    # gpt2.runlog.human_duration's rule, not imported: runlog imports torch, and plotting on a laptop needs none
    s = round(seconds)
    h, m, s = s // 3600, s % 3600 // 60, s % 60
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _gaps(summary: dict, reference: bool, val_ref: dict | None) -> dict:
    """A run's gaps to the references (None where one does not apply): final val loss minus GPT-2's on the same
    val tokens, best HellaSwag acc_norm minus GPT-2's and GPT-3's."""
    acc, final = summary["best_acc_norm"], summary["final_val_loss"]
    hellaswag = reference and acc is not None
    return {
        "gpt2_val_gap": final - val_ref["loss"] if val_ref and final is not None else None,
        "gpt2_hellaswag_gap": acc - GPT2_HELLASWAG if hellaswag else None,
        "gpt3_hellaswag_gap": acc - GPT3_HELLASWAG if hellaswag else None,
    }


def markdown_table(runs: dict[str, dict[str, list[dict]]], reference: bool = True,
                   val_refs: dict[str, dict] | None = None) -> str:
    """One row per run (name -> records by kind, as load_run returns). The columns marked optional appear when a
    run fills them: val bits per byte, the gaps to the references (with `reference`; val_refs: run name -> its
    GPT-2 val reference, as tools.reference_loss.find_reference returns it) and the step of an error the run
    ended in."""
    loss, gap = "{:.4f}".format, "{:+.4f}".format
    rows = {}
    for name, run in runs.items():
        summary = summarize(run)
        rows[name] = summary | _gaps(summary, reference, (val_refs or {}).get(name)) | {"error": error_step(run)}
    columns = [  # (header, row key, formatter, optional)
        ("step", "step", str, False),
        ("tokens", "tokens", fmt_tokens, False),
        ("final val loss", "final_val_loss", loss, False),
        ("final val bpb", "final_val_bpb", loss, True),
        ("best val loss", "best_val_loss", loss, False),
        ("Δ GPT-2 val loss", "gpt2_val_gap", gap, True),
        ("best HellaSwag acc_norm", "best_acc_norm", loss, False),
        ("Δ GPT-2 HellaSwag", "gpt2_hellaswag_gap", gap, True),
        ("Δ GPT-3 HellaSwag", "gpt3_hellaswag_gap", gap, True),
        ("median tok/s", "median_tok_per_s", "{:,.0f}".format, False),
        ("wall time", "time", fmt_duration, False),
        ("error at step", "error", str, True),
    ]
    columns = [c for c in columns if not c[3] or any(row[c[1]] is not None for row in rows.values())]
    lines = [
        "| run | " + " | ".join(header for header, *_ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in rows.items():
        cells = [name.replace("|", "\\|")]
        cells += ["-" if row[key] is None else fmt(row[key]) for _, key, fmt, _ in columns]
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


def _draw_panel(ax, runs, kind: str, key: str, x: str, divisor: float, smooth: float, palette) -> tuple[bool, list]:
    """One panel's curves, a run's color the same in every panel. Returns whether any run had records, and the
    plotted y values that decide the y range."""
    has_data, shown = False, []
    for i, (name, run) in enumerate(runs.items()):
        records = [r for r in run.get(kind, []) if r.get(key) is not None and r.get(x) is not None]
        if not records:
            continue
        has_data, color, label = True, palette[i % len(palette)], run_label(name, run)
        xs = [r[x] / divisor for r in records]
        ys = [r[key] for r in records]
        if kind == "train" and smooth:
            ax.plot(xs, ys, color=color, alpha=0.2, linewidth=0.8)  # raw, faint
            ys = ema(ys, smooth)
        shown += ys[len(ys) // 10 :] if kind == "train" else [y for r, y in zip(records, ys) if r["step"] > 0]
        # evals are sparse: markers show where each one was taken
        ax.plot(xs, ys, color=color, label=label, marker=None if kind == "train" else "o", markersize=3)
        weight_ema = [r for r in run.get("val_ema", []) if r.get(x) is not None] if kind == "val" else []
        if weight_ema:  # the val loss of the run's weight EMA (train_gpt2.py --ema-sigma-rel): same color, dashed
            ax.plot([r[x] / divisor for r in weight_ema], [r["loss"] for r in weight_ema], color=color,
                    linestyle="--", marker="o", markersize=2, label=f"{label} EMA")
            shown += [r["loss"] for r in weight_ema]
    return has_data, shown


def _zoom(ax, kind: str, shown: list, val_refs: list[dict]) -> None:
    """Losses: zoom on where the runs differ, past the first tenth of training (train) or the step-0 eval (val)
    that would squash every curve into a flat line at the bottom; the val panel draws the GPT-2 references that
    lie less than 1 nat below the runs (one far below would squash them as well), and takes them into its range."""
    shown = [y for y in shown if math.isfinite(y)]  # a diverged eval logs NaN or Infinity: no axis limit there
    if not shown:
        return
    lo, hi = min(shown), max(shown)
    pad = 0.05 * (hi - lo) or 0.1
    near = [r for r in val_refs if lo - pad < r["loss"] + 1] if kind == "val" else []
    for ref, style in zip(near, ["--", "-.", ":"] * len(near)):
        label = f"GPT-2 ({Path(ref['model']).name}) on {Path(ref['data_dir']).name} val ({ref['loss']:.4f})"
        ax.axhline(ref["loss"], color="black", linestyle=style, linewidth=1, label=label)
    levels = [lo, hi] + [r["loss"] for r in near]
    ax.set_ylim(min(levels) - pad, max(levels) + pad)


def figure(runs: dict[str, dict[str, list[dict]]], x: str = "tokens", smooth: float = 0.9, reference: bool = True,
           val_refs: dict[str, dict] | None = None) -> Figure:
    """Train loss, val loss and HellaSwag acc_norm against x, runs overlaid; with `reference`, the GPT-2 and GPT-3
    HellaSwag lines and each GPT-2 val reference in val_refs (run name -> reference, see markdown_table)."""
    if x not in X_CHOICES:
        raise ValueError(f"x must be one of {X_CHOICES}, got {x!r}")
    divisor, xlabel = _x_scale(runs, x)
    fig = Figure(figsize=(17, 4.8), layout="constrained")
    train_title = f"train loss (EMA {smooth}; raw faint)" if smooth else "train loss"
    panels = [
        ("train", "loss", train_title),
        ("val", "loss", "val loss"),
        ("hellaswag", "acc_norm", "HellaSwag acc_norm"),
    ]
    # one color per run, the same in every panel; beyond 10 runs the default cycle would repeat colors
    palette = [f"C{i}" for i in range(10)] if len(runs) <= 10 else [matplotlib.colormaps["tab20"](i) for i in range(20)]
    # runs on the same data share one reference: one line each
    refs = list({(r["model"], r["val_identity"], r["loss"]): r for r in (val_refs or {}).values()}.values())
    for ax, (kind, key, title) in zip(fig.subplots(1, 3), panels):
        has_data, shown = _draw_panel(ax, runs, kind, key, x, divisor, smooth, palette)
        if kind != "hellaswag" and shown:
            _zoom(ax, kind, shown, refs if reference else [])
        if kind == "hellaswag" and reference:
            ref = {"color": "black", "linewidth": 1}
            ax.axhline(GPT2_HELLASWAG, linestyle="--", label=f"OpenAI GPT-2 124M ({GPT2_HELLASWAG})", **ref)
            ax.axhline(GPT3_HELLASWAG, linestyle=":", label=f"GPT-3 Small 125M, 0-shot ({GPT3_HELLASWAG})", **ref)
        if not has_data:
            ax.text(0.5, 0.5, f"no {kind} records", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


def legend_labels(fig: Figure) -> list[str]:
    """Every legend entry of the figure, panel by panel."""
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def plot_runs(runs: dict[str, dict[str, list[dict]]], out_path, x: str = "tokens", smooth: float = 0.9,
              reference: bool = True, val_refs: dict[str, dict] | None = None) -> Path:
    """figure() saved as a PNG."""
    fig = figure(runs, x, smooth, reference, val_refs)
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


def _read_config(run_dir: Path) -> dict | None:
    """The run's config.json, if it has the fields a val reference is matched on."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    fields = ("data_dir", "seq_len", "val_tokens", "batch_size")
    return config if isinstance(config, dict) and all(k in config for k in fields) else None


def val_references(files: dict[str, Path]) -> tuple[dict[str, dict], list[str]]:
    """Run name -> the cached GPT-2 val reference for the run's config.json (tools.reference_loss writes them to
    a reference/ folder above the runs, e.g. logs/reference/), and one note per data folder with none, or matched
    by the folder's name only. Runs without a config.json get neither."""
    refs, notes = {}, []
    for name, metrics in files.items():
        run_dir = metrics.parent
        if (config := _read_config(run_dir)) is None:
            continue
        ref, by_name = find_reference(config, [folder / SUBDIR for folder in run_dir.parents])
        data = config["data_dir"]
        if ref is not None:
            refs[name] = ref
            if by_name:
                notes.append(f"GPT-2 val loss for {data}: matched by the folder's name ({data} is not here to check "
                             "its val shards)")
            continue
        log_dir = os.path.relpath(run_dir.parent)  # short where the runs lie below the working directory
        log_dir = str(run_dir.parent) if log_dir.startswith(os.pardir) else log_dir
        cmd = ["python", "-m", "tools.reference_loss", "--model", "gpt2", "--data-dir", data, "--seq-len",
               str(config["seq_len"]), "--val-tokens", str(config["val_tokens"]), "--batch-size",
               str(config["batch_size"]), "--log-dir", log_dir]
        notes.append(f"GPT-2 val loss: not computed for {data} (seq_len {config['seq_len']}, val_tokens "
                     f"{config['val_tokens']}); `{shlex.join(cmd)}` computes it")
    return refs, list(dict.fromkeys(notes))  # one note per data folder and settings, not per run


def _draw(files: dict[str, Path], args, noted: set[str]) -> None:
    """Plot, tabulate and print; then the notes not yet in `noted` (--watch prints each once)."""
    runs = {name: load_run(f) for name, f in files.items()}
    val_refs, notes = val_references(files) if args.reference else ({}, [])
    notes += [f"{name}: error at step {r['error'][0]['step']}: {r['error'][0].get('message', '')}"
              for name, r in runs.items() if r.get("error")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, out, x=args.x, smooth=args.smooth, reference=args.reference, val_refs=val_refs)
    table = markdown_table(runs, args.reference, val_refs)
    _save(out.with_suffix(".md"), lambda tmp: tmp.write_text(table, encoding="utf-8"))
    print(table, end="", flush=True)
    for note in notes:
        if note not in noted:
            noted.add(note)
            print(note, file=sys.stderr)
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


def watch(parser, args, stamps, noted: set[str]) -> None:
    """Re-find the runs every --watch seconds and re-draw when a metrics file (or the set of runs) changed
    from `stamps`."""
    print(f"watching every {args.watch:g} s; Ctrl-C stops", file=sys.stderr)
    try:
        while True:
            time.sleep(args.watch)
            files = _find_runs(parser, args)  # new run folders count too: an rsync may bring them any time
            if (now := _stamps(files)) != stamps:
                stamps = now
                _draw(files, args, noted)
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
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="no GPT-2 / GPT-3 reference lines in the plot, no gap columns in the table")
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        parser.error("--smooth must be in [0, 1)")
    if args.watch is not None and args.watch <= 0:
        parser.error("--watch must be a positive number of seconds")
    files = _find_runs(parser, args)
    stamps = _stamps(files)  # before reading: a line appended while drawing makes the first check re-draw
    noted = set()  # the notes printed so far
    _draw(files, args, noted)
    if args.watch:
        watch(parser, args, stamps, noted)


if __name__ == "__main__":
    main()
