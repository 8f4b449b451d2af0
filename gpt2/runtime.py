"""What every script shares at run time: the device and its autocast dtype (and, without CUDA, why), peak FLOPs
for MFU, torchrun's process group, rank-0 printing (and a stopping message once per run), stop signals
(StopRequest), the one-line argument errors (OneLineParser), atomic file writes (hashed on the way), and loading a
torch file with a clear error. Imports only torch and the standard library."""

import argparse
import contextlib
import datetime
import errno
import glob
import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------- device and dtype


def pick_device(name: str = "auto") -> torch.device:
    """'auto': cuda > mps > cpu; anything else as torch names it. --device cuda without CUDA (or mps without MPS)
    says why."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = parse_device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(no_cuda_message(f"--device {name}"))
    if device.type == "mps" and not torch.backends.mps.is_available():  # else torch's error at the first tensor moved
        raise SystemExit(f"--device {name} needs Apple's MPS, and torch cannot use it here (macOS 12.3+ on Apple "
                         "silicon or an AMD GPU, and a torch build with MPS): use --device cpu")
    return device


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on CUDA, fp32 (exact, no autocast) elsewhere; or 'float32' / 'bfloat16'."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """The one autocast convention: a context that casts matmuls to dtype, or does nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ---------------------------------------------------------------------- why there is no CUDA


def parse_device(name: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: not a device torch knows; use auto, cpu, cuda, cuda:N or mps") from None


def _nvidia_smi() -> tuple[str, str | None]:
    """What nvidia-smi says about the driver, and the highest CUDA version that driver runs (None if unknown)."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi on PATH", None
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}", None
    text = (out.stdout + out.stderr).strip()
    driver, cuda = re.search(r"Driver Version: *(\S+)", text), re.search(r"CUDA Version: *([\d.]+)", text)
    if out.returncode or not driver:
        return f"nvidia-smi failed: {text.splitlines()[0] if text else f'exit code {out.returncode}'}", None
    return f"nvidia-smi: driver {driver.group(1)}, CUDA up to {cuda.group(1) if cuda else '?'}", cuda and cuda.group(1)


def no_cuda_message(wanted: str) -> str:
    """Why torch cannot use CUDA here, in facts the user can check (torch's build, what the machine shows, what
    torch said on init), and the fixes: the CPU, or a torch build that matches the driver."""
    build = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda}" if torch.version.cuda
             else f"torch {torch.__version__} is a CPU-only torch build")
    gpus = glob.glob("/dev/nvidia[0-9]*")
    smi, driver_cuda = _nvidia_smi()
    facts = [build, f"{len(gpus)} GPU(s) in /dev/nvidia*; {smi}; torch.cuda.device_count() = "
                    f"{torch.cuda.device_count()}"]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        facts.append(f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} limits the GPUs torch may see")
    if torch.version.cuda:
        try:
            torch.cuda.init()
        except Exception as e:  # torch's own words: no driver, a driver too old for this build, ...
            facts.append(f"torch.cuda.init(): {' '.join(str(e).split())}")
    fixes = ["--device cpu: run on the CPU (under torchrun: CPU ranks over gloo)"]
    if not gpus and driver_cuda is None:
        fixes.append("on a GPU machine: install the NVIDIA driver, or start the container with its GPUs "
                     "(docker run --gpus all)")
    cu = f"cu{driver_cuda.replace('.', '')}" if driver_cuda else "cuXXX"
    fixes += [
        f"a torch build the driver runs: uv pip install torch --index-url https://download.pytorch.org/whl/{cu} "
        + (f"(CUDA {driver_cuda} is the driver's; if that index is missing, take the newest lower one)" if driver_cuda
           else "(XXX: the CUDA version nvidia-smi shows, or lower, e.g. cu128)"),
        f"or, to keep it for uv sync, in pyproject.toml: [tool.uv.sources] torch = {{ index = \"pytorch-{cu}\" }} and "
        f"[[tool.uv.index]] name = \"pytorch-{cu}\", url = \"https://download.pytorch.org/whl/{cu}\", explicit = true",
    ]
    return (f"{wanted} needs CUDA, and torch cannot use it here:\n  " + "\n  ".join(facts)
            + "\nFixes:\n  " + "\n  ".join(fixes))


# ---------------------------------------------------------------------- peak FLOPs and MFU

# Dense bf16 tensor-core peaks in FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
# Order matters: more specific names first.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by name, or None when unknown (CPU, MPS, unlisted GPUs)."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def mfu_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak that MFU is measured against: only known for bf16 on a listed GPU."""
    return peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" and dtype == torch.bfloat16 else None


# ---------------------------------------------------------------------- torchrun


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def _stop_node(local_rank: int, message):
    """Stop every rank of this node before any work, saying why once: local rank 0 prints message() and exits;
    the others wait for torchrun to stop them (if they exited first, torchrun would kill rank 0 mid-message)."""
    if local_rank == 0:
        raise SystemExit(message())
    time.sleep(60)
    raise SystemExit(1)


def setup_distributed(device_name: str) -> Dist:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE (multi-node too); plain `python` runs one process. Under torchrun,
    --device auto means one GPU per rank: without them every rank stops before any work (CPU ranks: --device cpu)."""
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, pick_device(device_name))
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if device_name == "auto" or parse_device(device_name).type == "cuda":
        if not torch.cuda.is_available():
            _stop_node(local_rank, lambda: no_cuda_message(f"--device {device_name} under torchrun"))
        if torch.cuda.device_count() < local_world:
            _stop_node(local_rank, lambda: f"torchrun started {local_world} ranks on this node but torch sees "
                       f"{torch.cuda.device_count()} GPU(s): pass --nproc-per-node={torch.cuda.device_count()}")
    device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return Dist(rank, local_rank, world, torch.device("cuda", local_rank))
    # CPU ranks share the machine's cores instead of each spawning one thread per core
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group("gloo")
    return Dist(rank, local_rank, world, device)


def teardown_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


ERROR_WAIT_S = 15.0  # how long a rank other than 0 waits to learn whether rank 0 stopped with the same message


def _agent_store(timeout_s: float):
    """A client of torchrun's own key-value store (its agent keeps it up while ranks come and go)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def exit_once(message: str) -> str | int:
    """The SystemExit code for a run-stopping message, printed once under torchrun rather than once per rank: rank
    0 prints it and posts it to torchrun's store; another rank stays quiet if rank 0 posts the same message within
    ERROR_WAIT_S (every rank hit it), and else returns it named by its rank (it alone failed: it must be seen)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or "MASTER_ADDR" not in os.environ:
        return message
    rank = int(os.environ["RANK"])
    key = f"exit_once/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/rank0"  # a restart starts afresh
    if rank == 0:
        print(message, file=sys.stderr, flush=True)  # first: torchrun kills the others once one rank has exited
        with contextlib.suppress(Exception):  # no store: the others just say theirs too
            _agent_store(ERROR_WAIT_S).set(key, message)
        return 1
    try:
        store = _agent_store(ERROR_WAIT_S)
        store.wait([key])
        if store.get(key).decode() == message:
            return 1
    except Exception:  # rank 0 posted nothing in time (it is still running), or there is no store
        pass
    return f"rank {rank}: {message}"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line: the usage above the message buried it (--help still shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def print0(*args, **kwargs):
    """print on rank 0 only (every rank prints when no process group is up)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------- stop signals


class SecondSignal(BaseException):
    """A second stop signal: the run stops at once, without a checkpoint (a BaseException, so that no
    `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)


class StopRequest:
    """SIGTERM (spot reclaim), SIGHUP (a closed ssh session; torchrun forwards it) or a first Ctrl-C: finish the
    step, checkpoint, exit 0. Another signal more than a second later raises SecondSignal; one within a second is
    the same Ctrl-C forwarded by a wrapper (uv run passes SIGINT on, so Python sees it twice). A signal ignored when
    the process started stays ignored: nohup's SIGHUP, or SIGINT of a job a script put in the background."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    SAME_SIGNAL_S = 1.0
    last_signal = -math.inf  # time.monotonic() of the last signal any StopRequest took (see exit_on_interrupt)

    def __init__(self):
        self.requested, self.first, self.raised = False, 0.0, False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS
                         if signal.getsignal(sig) != signal.SIG_IGN}

    def _handle(self, signum, frame):
        now = StopRequest.last_signal = time.monotonic()
        if not self.requested:
            self.requested, self.first = True, now
            if os.environ.get("RANK", "0") == "0":  # os.write: a print here could re-enter a print of the loop
                again = "; press Ctrl-C again to stop at once, without one" if signum == signal.SIGINT else ""
                os.write(2, f"{signal.Signals(signum).name}: stopping after this step (a checkpoint will be "
                            f"saved){again}\n".encode())
        elif now - self.first > self.SAME_SIGNAL_S and not self.raised:  # once: not again while it is handled
            self.raised = True
            raise SecondSignal(signum)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def exit_on_interrupt():
    """Outside the training loop (set-up, the summary, interpreter shutdown) Ctrl-C exits at once with one line:
    no KeyboardInterrupt traceback, no 'Exception ignored in atexit callback'. A copy of the signal that the loop
    already took (a wrapper forwarding it) is ignored, and so is SIGINT if it was ignored at start."""

    def handle(signum, frame):
        if time.monotonic() - StopRequest.last_signal > StopRequest.SAME_SIGNAL_S:
            if os.environ.get("RANK", "0") == "0":
                os.write(2, b"SIGINT: exiting now\n")
            os._exit(128 + signum)

    if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
        signal.signal(signal.SIGINT, handle)


# ---------------------------------------------------------------------- files


class DiskFullError(OSError):
    """Raised instead of torch's or numpy's opaque errors when a write runs out of space."""


def is_disk_full(e: BaseException) -> bool:
    """e, or an exception it was raised from or while handling: torch.save reports a full disk on closing its zip
    writer as a RuntimeError ('unexpected pos'), with the OSError(ENOSPC) of the failed write as its __context__."""
    pending, seen = [e], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if ((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in str(e)
                or "iostream error" in str(e)):
            return True
        pending += [e.__cause__, e.__context__]
    return False


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Yield a temp file beside `path`; flushed to disk and renamed over `path` on success, removed on any
    failure, so readers see the old file or the new one, never half of one. A full disk is reported as such."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: DDP ranks may write the same download at once
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if is_disk_full(e):
            raise DiskFullError(errno.ENOSPC, f"no space left on the disk of {os.path.dirname(path) or '.'} "
                                f"while writing {os.path.basename(path)}: free some space and run again") from e
        raise


def remove_stale_temps(folder: str | os.PathLike):
    """Delete temp files that an earlier crash left behind in folder (they are never read)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))


class Sha256Writer:
    """A write-only file-like object that hashes what passes through it into `file`: torch.save writes a checkpoint
    sequentially, so its sha256 comes without reading the file back."""

    def __init__(self, file):
        self.file, self.digest = file, hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint", **kwargs):
    """torch.load(weights_only=True) that says which file is not a torch file, instead of torch's advice to try
    weights_only=False (wrong here: every file this repo writes loads with weights_only=True)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except Exception as e:  # truncated zip, random bytes, a text file, a pickle of foreign classes, ...
        lines = str(e).strip().splitlines()
        reason = lines[0][:200] if lines and "weights_only" not in str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable {what} (truncated, corrupted or another kind of file): "
                         f"{reason}") from None
