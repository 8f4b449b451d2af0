"""Checkpoints off the box (--checkpoint-sync): after each checkpoint and its .sha256 are written, the user's shell
command runs in the background, one at a time. A checkpoint that lands while a sync runs is synced by one more run
after it (at most one waits: the newest), so a slow link coalesces syncs instead of stacking them. Training never
waits for a sync, except at its end (or a stop request), when the last checkpoint must get off the box before the
process exits: close() waits for it, at most WAIT_S. Standard library only."""

import os
import re
import shlex
import signal
import subprocess
import threading
import time

PLACEHOLDERS = {"dir": "the run folder", "run": "the run name", "ckpt": "the checkpoint file"}
# {name}, but not the shell's ${name}
PLACEHOLDER = re.compile(r"(?<!\$)\{(\w+)\}")


def command_problem(command: str) -> str | None:
    """Why a --checkpoint-sync command cannot be right, or None: blank, or a {name} that is no placeholder (a typo
    such as {ckpt_path} would reach the shell as text)."""
    if command and not command.strip():
        return "the command is blank"
    unknown = sorted(set(PLACEHOLDER.findall(command)) - set(PLACEHOLDERS))
    if unknown:
        known = ", ".join(f"{{{k}}} ({v})" for k, v in PLACEHOLDERS.items())
        return f"unknown placeholder {', '.join(f'{{{u}}}' for u in unknown)}; the placeholders are {known}"
    return None


def exit_status(returncode: int) -> str:
    if returncode < 0:  # a real-time signal has no name in signal.Signals
        return f"killed by {next((s.name for s in signal.Signals if s == -returncode), f'signal {-returncode}')}"
    return f"exit code {returncode}"


class CheckpointSync:
    """Runs `command` after each checkpoint, in a thread: {dir}, {run} and {ckpt} filled in shell-quoted, its
    output appended to <run>/sync.log, its exit status one line of the run log (`log`). An empty command does
    nothing."""

    WAIT_S = 600  # close() waits this long at most: a slow link must not keep a finished run's box alive for ever

    def __init__(self, command: str, run_dir: str, run_name: str, log):
        self.command, self.run_dir, self.run_name, self.log = command, os.path.abspath(run_dir), run_name, log
        self.sync_log = os.path.join(self.run_dir, "sync.log")
        self.lock = threading.Lock()  # guards busy and pending between the loop and the sync thread
        self.busy, self.pending = False, None
        self.idle = threading.Event()
        self.idle.set()

    def after_checkpoint(self, path: str):
        """Sync now, or after the running sync if one runs (replacing a checkpoint already waiting)."""
        if not self.command:
            return
        with self.lock:
            if self.busy:
                self.pending = path
                return
            self.busy = True
            self.idle.clear()
        threading.Thread(target=self._work, args=(path,), name="checkpoint-sync", daemon=True).start()

    def close(self):
        """Wait for the running sync and the one pending, so the last checkpoint gets off the box (at most WAIT_S)."""
        if self.idle.is_set():
            return
        self.log(f"waiting for the checkpoint sync to finish (at most {self.WAIT_S} s)")
        if not self.idle.wait(self.WAIT_S):
            self.log(f"the checkpoint sync is still running after {self.WAIT_S} s: not waiting longer; the latest "
                     f"checkpoint may not have reached the backup (see {self.sync_log})")

    def fill(self, path: str) -> str:
        values = {"dir": self.run_dir, "run": self.run_name, "ckpt": os.path.abspath(path)}
        return PLACEHOLDER.sub(lambda m: shlex.quote(values[m.group(1)]), self.command)

    def _work(self, path: str | None):
        while path is not None:
            self._sync(path)
            with self.lock:
                path, self.pending = self.pending, None
                if path is None:
                    self.busy = False
                    self.idle.set()

    def _sync(self, path: str):
        command, name, t0 = self.fill(path), os.path.basename(path), time.monotonic()
        try:
            with open(self.sync_log, "a") as out:
                out.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {command}\n")
                out.flush()
                # its own session: a Ctrl-C meant for the trainer does not cut the copy of its checkpoint short
                returncode = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True).returncode
                status = exit_status(returncode)
                out.write(f"== {status}\n")
        except OSError as e:  # no sync.log (a full disk) or no shell: a failed sync, and the thread goes on
            returncode, status = None, f"could not run: {e}"
        seconds = time.monotonic() - t0
        if returncode == 0:
            self.log(f"checkpoint sync of {name}: exit code 0 after {seconds:.1f} s")
        else:
            self.log(f"checkpoint sync of {name} failed: {status} after {seconds:.1f} s (its output: {self.sync_log}); "
                     "training goes on, the next checkpoint's sync tries again")
