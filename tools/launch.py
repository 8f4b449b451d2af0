"""One command on a new box (a spot instance's replacement included): install (uv sync), build the data if it is
missing, bring the run's checkpoints back from their backup, then train on every GPU (or the CPU), restarting a
trainer that fails (it resumes from its latest checkpoint) at most --max-restarts times.

    python3 -m tools.launch -- --preset tiny                      # the flags after -- go to train_gpt2.py
    python3 -m tools.launch --seed-from backup-host:runs/gpt2-124m -- \\
        --checkpoint-sync "rsync -a {dir}/ backup-host:runs/{run}/"   # back from the backup, and off to it again
    python3 tools/launch.py --dry-run -- --preset tiny            # the same script; --dry-run: the plan only

Standard library only: it runs before `uv sync`. The commands run in the repository root, so relative paths in
the training flags are relative to it. Its own lines start with "launch:" on stderr.
"""

import argparse
import glob
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# gpt2/config.py's defaults, repeated here because importing it needs torch (tests/test_spot.py checks they agree)
DEFAULT_PRESET, DEFAULT_LOG_DIR = "gpt2-124m", "logs"
DATA_DIRS = {"tiny": "data/fineweb_edu_tiny", "": "data/fineweb_edu"}  # by preset-name prefix
DATA_FLAGS = {"tiny": ["--max-tokens", "5000000", "--shard-size", "1000000"], "": []}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's flags, and train_gpt2.py's (everything after the first --)."""
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python3 -m tools.launch", usage="%(prog)s [options] -- [train_gpt2.py flags]",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-sync", action="store_true", help="skip `uv sync` (the environment is ready)")
    p.add_argument("--no-data", action="store_true", help="skip building the data even if it is missing")
    p.add_argument("--data-cmd", help="shell command that builds the data (default: fineweb_edu.py for the preset)")
    p.add_argument("--seed-from", metavar="SRC", help="when the run folder has no good checkpoint, copy the run's "
                   "backup into it first: a local folder, or an rsync source such as backup-host:runs/RUN")
    p.add_argument("--seed-cmd", metavar="CMD", help="the same with a shell command of your own, {dir} (the run "
                   "folder) and {run} (its name) filled in, e.g. \"aws s3 sync s3://bucket/runs/{run} {dir}\"")
    p.add_argument("--max-restarts", type=int, default=3, help="restarts of a failed trainer before giving up")
    p.add_argument("--restart-delay", type=float, default=10.0, help="seconds before a restart")
    p.add_argument("--gpus", type=int, help="GPUs to train on (default: all that `nvidia-smi -L` lists; 0: the CPU)")
    p.add_argument("--python", default="uv run python", help="how to run Python scripts (default: %(default)s)")
    p.add_argument("--torchrun", default="uv run torchrun", help="how to run torchrun (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its commands, run nothing")
    args = p.parse_args(argv[:split])
    if args.seed_from and args.seed_cmd:
        p.error("--seed-from and --seed-cmd are two ways to do the same: pass one")
    if args.max_restarts < 0 or (args.gpus or 0) < 0:
        p.error("--max-restarts and --gpus must be >= 0")
    return args, argv[split + 1:]


def run_paths(train_args: list[str]) -> tuple[str, str, str, str]:
    """The preset, the data folder (as train_gpt2.py gets it), the run folder (absolute) and the run name."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--preset", default=DEFAULT_PRESET)
    p.add_argument("--data-dir")
    p.add_argument("--log-dir", default=DEFAULT_LOG_DIR)
    p.add_argument("--run-name", default="")
    known = p.parse_known_args(train_args)[0]
    kind = "tiny" if known.preset.startswith("tiny") else ""
    run_name = known.run_name or known.preset
    return known.preset, known.data_dir or DATA_DIRS[kind], os.path.join(ROOT, known.log_dir, run_name), run_name


def gpu_count() -> int:
    """The GPUs `nvidia-smi -L` lists ("GPU 0: NVIDIA H100 ..."); 0 without nvidia-smi or a driver."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def data_ready(data_dir: str) -> bool:
    """A finished build: fineweb_edu.py marks its manifest complete after the last shard."""
    try:
        with open(os.path.join(ROOT, data_dir, "manifest.json")) as f:
            return json.load(f).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def matches_sha256(path: str) -> bool:
    """Whether a checkpoint matches the .sha256 beside it, as the trainer checks it; one without predates them."""
    if not os.path.exists(path + ".sha256"):
        return True
    with open(path + ".sha256") as f:
        expected = f.read().split()[:1]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return [digest.hexdigest()] == expected


def good_checkpoint(run_dir: str) -> tuple[str | None, list[str]]:
    """The newest checkpoint of run_dir that the trainer will resume from, and the newer ones it will skip (bad)."""
    bad = []
    for path in sorted(glob.glob(os.path.join(run_dir, "ckpt_*.pt")), reverse=True):
        if matches_sha256(path):
            return path, bad
        bad.append(os.path.basename(path))
    return None, bad


def describe(returncode: int) -> str:
    """An exit status in words: uv and shells report a death by signal N as 128 + N."""
    names = {s.value: s.name for s in signal.Signals}  # not the real-time signals, which have no name
    if returncode < 0:
        return f"killed by {names.get(-returncode, f'signal {-returncode}')}"
    if returncode - 128 in names:
        return f"exit code {returncode} (killed by {names[returncode - 128]})"
    return f"exit code {returncode}"


class Launcher:
    """The steps of one launch, each a child process in the repository root. A SIGTERM, SIGINT or SIGHUP to the
    launcher goes on to the running child (the trainer checkpoints and exits) and ends the launch: no restart."""

    def __init__(self, args: argparse.Namespace, train_args: list[str]):
        self.args, self.train_args = args, train_args
        self.preset, self.data_dir, self.run_dir, self.run_name = run_paths(train_args)
        self.child, self.stop_signal = None, None

    def log(self, msg: str):
        print(f"launch: {msg}", file=sys.stderr, flush=True)

    def on_signal(self, signum, frame):
        self.stop_signal = signal.Signals(signum).name
        if self.child and self.child.poll() is None:
            self.child.send_signal(signum)  # a trainer that gets the terminal's copy too takes both as one

    def run(self, cmd: list[str] | str, what: str) -> int:
        """Run a command (a str: through the shell) and return its exit code; the dry run only prints it."""
        shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
        self.log(f"{what}: {'would run' if self.args.dry_run else 'running'} {shown}")
        if self.args.dry_run:
            return 0
        self.child = subprocess.Popen(cmd, shell=isinstance(cmd, str), cwd=ROOT)
        returncode = self.child.wait()
        self.child = None
        return returncode

    def step(self, cmd: list[str] | str, what: str):
        """A set-up step: its failure (or a stop request) ends the launch."""
        returncode = self.run(cmd, what)
        if self.stop_signal:
            raise SystemExit(f"launch: stopped by {self.stop_signal} during {what}")
        if returncode:
            raise SystemExit(f"launch: {what} failed ({describe(returncode)}): fix it and run the same command again")

    def install(self, gpus: int):
        if self.args.no_sync:
            return
        if shutil.which("uv") is None and not self.args.dry_run:
            raise SystemExit("launch: no uv on PATH: install it (`curl -LsSf https://astral.sh/uv/install.sh | sh` "
                             "or `python3 -m pip install uv`), or pass --no-sync with a ready environment")
        self.step(["uv", "sync", "--locked", *(["--extra", "gpu"] if gpus else [])], "install")

    def build_data(self):
        if data_ready(self.data_dir):
            self.log(f"data: {self.data_dir} is built (its manifest is complete)")
        elif self.args.no_data:
            self.log(f"data: {self.data_dir} is not built, and --no-data skips building it")
        elif self.args.data_cmd:
            self.step(self.args.data_cmd, "data")
        else:
            kind = "tiny" if self.preset.startswith("tiny") else ""
            self.step([*shlex.split(self.args.python), "fineweb_edu.py", *DATA_FLAGS[kind], "--out", self.data_dir],
                      "data")

    def seed(self):
        """The run's backup into its folder when that holds no good checkpoint, then the checksums checked as the
        trainer will check them (it skips a bad checkpoint for the one before)."""
        if not (self.args.seed_from or self.args.seed_cmd):
            return
        have, _ = good_checkpoint(self.run_dir)
        if have:
            self.log(f"seed: {self.run_dir} has a good checkpoint ({os.path.basename(have)}): not seeding")
            return
        source = os.path.join(ROOT, self.args.seed_from or "")  # relative to the root, like the training paths
        if self.args.seed_cmd:
            cmd = self.args.seed_cmd.replace("{dir}", shlex.quote(self.run_dir))
            self.step(cmd.replace("{run}", shlex.quote(self.run_name)), "seed")
        elif os.path.isdir(source):
            self.log(f"seed: copying {source} into {self.run_dir}")
            if not self.args.dry_run:  # not the lock (the OS's, per box) nor temp files of a save cut short
                shutil.copytree(source, self.run_dir, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("lock", "*.tmp"))
        else:
            if not self.args.dry_run:  # rsync makes the run folder, not its parents
                os.makedirs(os.path.dirname(self.run_dir), exist_ok=True)
            self.step(["rsync", "-a", "--exclude", "lock", "--exclude", "*.tmp", self.args.seed_from.rstrip("/") + "/",
                       self.run_dir + "/"], "seed")
        if not self.args.dry_run:
            self.check_seeded(self.args.seed_from or self.args.seed_cmd)

    def check_seeded(self, source: str):
        path, bad = good_checkpoint(self.run_dir)
        for name in bad:
            self.log(f"seed: {name} does not match its .sha256 (cut short or corrupted): the trainer will skip it")
        if path:
            self.log(f"seed: the run resumes from {os.path.basename(path)} (its sha256 checked)")
        elif bad:
            raise SystemExit(f"launch: no checkpoint from {source} matches its .sha256: check the backup; to start "
                             "over instead, leave out --seed-from/--seed-cmd and pass --resume never to the trainer")
        else:
            self.log(f"seed: {source} holds no checkpoint: the run starts at step 0")

    def train(self, gpus: int) -> int:
        """train_gpt2.py under torchrun (one rank per GPU) or python (the CPU), restarted while it fails."""
        script = ["train_gpt2.py", *self.train_args]
        if gpus:
            self.log(f"{gpus} GPU(s): torchrun, one rank per GPU")
            cmd = [*shlex.split(self.args.torchrun), "--standalone", f"--nproc-per-node={gpus}", *script]
        else:
            self.log("no GPU (`nvidia-smi -L` lists none, or --gpus 0): one process on the CPU, python, not torchrun")
            cmd = [*shlex.split(self.args.python), *script]
        if self.args.dry_run:
            return self.run(cmd, "train")
        most, returncode = self.args.max_restarts, 0
        for attempt in range(most + 1):
            if attempt:
                self.log(f"train: failed ({describe(returncode)}): restart {attempt} of {most} in "
                         f"{self.args.restart_delay:g} s (it resumes from the newest good checkpoint)")
                time.sleep(self.args.restart_delay)
            if not self.stop_signal:  # else a stop request came during the delay
                returncode = self.run(cmd, f"train (restart {attempt} of {most})" if attempt else "train")
            if self.stop_signal:
                self.log(f"train: stopped by {self.stop_signal} ({describe(returncode)}), not restarting: the same "
                         "command resumes from the latest checkpoint")
                return returncode
            if returncode == 0:
                self.log("train: done (exit code 0)")
                return 0
        self.log(f"train: failed {most + 1} times (--max-restarts {most}), the last time with {describe(returncode)}: "
                 f"giving up; see {os.path.join(self.run_dir, 'log.txt')}")
        return 1


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    launcher = Launcher(args, train_args)
    if not args.dry_run:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, launcher.on_signal)
    gpus = gpu_count() if args.gpus is None else args.gpus
    launcher.install(gpus)
    launcher.build_data()
    launcher.seed()
    return launcher.train(gpus)


if __name__ == "__main__":
    sys.exit(main())
