"""The run's log: RunLog writes metrics.jsonl and log.txt (rank 0 only); Pace, human_count and human_duration
make the progress line (its ETA, token count and times)."""

import contextlib
import json
import os

from gpt2.runtime import atomic_write


class RunLog:
    """Rank 0 appends to metrics.jsonl (one JSON object per event) and log.txt; other ranks stay quiet. Opened for
    a resume from step resumed_at, metrics.jsonl first loses the records past that step: the steps after the
    checkpoint run again, so a run killed after it would otherwise log them twice."""

    def __init__(self, run_dir: str, master: bool, resumed_at: int | None = None):
        self.master = master
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if master and resumed_at is not None:
            keep_records_through(metrics, resumed_at)
        self.metrics = open(metrics, "a") if master else None
        self.text = open(os.path.join(run_dir, "log.txt"), "a") if master else None

    def print(self, msg: str):
        if self.master:
            print(msg, flush=True)
            self.text.write(msg + "\n")
            self.text.flush()

    def error(self, step: int, tokens: int, elapsed: float, msg: str) -> SystemExit:
        """The message that stops the run, kept in log.txt and in one line in metrics.jsonl (kind "error") too, as
        far as the disk lets them be written (a full disk may be why the run stops)."""
        line = " ".join(part.strip() for part in msg.splitlines() if part.strip())
        with contextlib.suppress(OSError):
            self.event("error", step, tokens, elapsed, message=line)
            if self.master:
                self.text.write(f"error: {msg}\n")
                self.text.flush()
        return SystemExit(msg)

    def event(self, kind: str, step: int, tokens: int, elapsed: float, **values):
        if self.master:
            record = {"kind": kind, "step": step, "tokens": tokens, "time": round(elapsed, 3), **values}
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()


def keep_records_through(path: str, step: int):
    """Rewrite the metrics file at path (atomically) without the records past step, and without a line that a
    kill cut short."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(line)["step"] <= step:
                kept.append(line.rstrip("\n") + "\n")
    if kept != lines:
        with atomic_write(path, "w") as f:
            f.writelines(kept)


# ---------------------------------------------------------------------- the progress line


def human_count(n: int) -> str:
    """1234 -> '1.2K', 1_234_567 -> '1.2M'."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def human_duration(seconds: float) -> str:
    """75 -> '1m15s', 3720 -> '1h02m'."""
    s = round(seconds)
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Pace:
    """The step time the ETA assumes: an exponential average of the optimizer steps' own durations, so eval,
    sampling and checkpoint pauses do not count. A session's first step (compilation, warm-up) is replaced by
    the second rather than averaged in."""

    def __init__(self, decay: float = 0.9):
        self.decay, self.seconds, self.steps = decay, 0.0, 0

    def update(self, seconds: float):
        self.steps += 1
        self.seconds = seconds if self.steps <= 2 else self.decay * self.seconds + (1 - self.decay) * seconds

    def line(self, step: int, stop_step: int, tokens: int, elapsed: float, fields: str) -> str:
        """'step 120/300 (40%) | <fields> | 245.8K tokens | elapsed 2m10s | ETA 3m15s'"""
        eta = (stop_step - step) * self.seconds
        return (f"step {step:6d}/{stop_step} ({step / stop_step:.0%}) | {fields} | {human_count(tokens)} tokens | "
                f"elapsed {human_duration(elapsed)} | ETA {human_duration(eta)}")

