"""What every script shares at run time: the device and its autocast dtype, peak FLOPs for MFU, torchrun's
process group, rank-0 printing and atomic file writes. Imports only torch and the standard library."""

import errno
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------- device and dtype


def pick_device(name: str = "auto") -> torch.device:
    """'auto': cuda > mps > cpu; anything else as torch names it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': bf16 on CUDA, fp32 (exact, no autocast) elsewhere; or 'float32' / 'bfloat16'."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """The one autocast convention: a context that casts matmuls to dtype, or does nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


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


def setup_distributed(device_name: str) -> Dist:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE (multi-node too); plain `python` runs one process."""
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return Dist(0, 0, 1, device)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return Dist(rank, local_rank, world, torch.device("cuda", local_rank))
    # CPU ranks share the machine's cores instead of each spawning one thread per core
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group("gloo")
    return Dist(rank, local_rank, world, device)


def teardown_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only (every rank prints when no process group is up)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# ---------------------------------------------------------------------- files


class DiskFullError(OSError):
    """Raised instead of torch's or numpy's opaque errors when a write runs out of space."""


def _is_disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e) or "iostream error" in str(e)


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
        if _is_disk_full(e):
            raise DiskFullError(errno.ENOSPC, f"no space left on the disk of {os.path.dirname(path) or '.'} "
                                f"while writing {os.path.basename(path)}: free some space and run again") from e
        raise


def remove_stale_temps(folder: str | os.PathLike):
    """Delete temp files that an earlier crash left behind in folder (they are never read)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.endswith(".tmp"):
                os.remove(os.path.join(folder, name))
