"""Shared test set-up: the repo root on sys.path, offline data from ../shared, a tiktoken cache; tiny training
runs (in this process or under torchrun) and their metrics; process groups of spawned ranks."""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# ../shared beside the repo (here and in CI), or ./shared inside it (the device machine gets the checkout only)
SHARED = next((p for p in (ROOT.parent / "shared" / "data", ROOT / "shared" / "data") if p.is_dir()),
              ROOT.parent / "shared" / "data")
sys.path.insert(0, str(ROOT))

# tiktoken cannot download here; point it at the ready cache unless the user chose one
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")

# Without a bytecode cache (PYTHONDONTWRITEBYTECODE) each process the tests start compiles torch's sources again
# (~1.5 s of CPU, ~6 s more for torch.compile): this session and its processes keep theirs in a temp folder instead
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
    os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix = tempfile.mkdtemp(prefix="gpt2-tests-pycache-")
    sys.dont_write_bytecode = False
    atexit.register(shutil.rmtree, sys.pycache_prefix, ignore_errors=True)


def _shared_file(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.fail(f"missing test data {path}: these tests need the ../shared folder beside the repo")
    return path


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    return _shared_file("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def hellaswag_val_path() -> Path:
    return _shared_file("hellaswag/hellaswag_val.jsonl")


@pytest.fixture(scope="session")
def shards(tmp_path_factory, shakespeare_path) -> str:
    """Tiny-shakespeare as uint16 shards, built by the real CLI: a 16k-token val shard and train shards."""
    out = tmp_path_factory.mktemp("shards") / "shakespeare"
    subprocess.run([sys.executable, str(ROOT / "fineweb_edu.py"), "--source", str(shakespeare_path), "--out", str(out),
                    "--shard-size", "16384", "--workers", "2", "--txt-docs", "paragraphs"], check=True, capture_output=True)
    return str(out)


# ---------------------------------------------------------------------- tiny training runs

# a very small model on few tokens: for tests of the loop, not of the model
SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--seq-len", "32",
         "--total-batch-size", "256", "--val-tokens", "512", "--hellaswag-every", "0", "--warmup-steps", "2",
         "--max-lr", "3e-3", "--vocab-multiple", "128"]


def run(shards, log_dir, *args, name="run") -> dict:
    """train_gpt2.main in this process: the tiny preset with SMALL on shards, then args, into log_dir/name."""
    import train_gpt2

    return train_gpt2.main(["--preset", "tiny", "--data-dir", shards, "--log-dir", str(log_dir), "--run-name", name,
                            *SMALL, *args])


def metrics(log_dir, name="run", kind="train") -> list[dict]:
    """The records of one kind in log_dir/name/metrics.jsonl, in order."""
    with open(Path(log_dir) / name / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def torchrun(nproc, shards, log_dir, *args, name="run"):
    """The same run as run(), as nproc torchrun processes (one thread each)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "train_gpt2.py"), "--preset", "tiny", "--data-dir", shards, "--log-dir", str(log_dir),
           "--run-name", name, "--device", "cpu", *SMALL, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode and "address already in use" in proc.stderr.lower():  # a port race with another process
        shutil.rmtree(Path(log_dir) / name, ignore_errors=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _trainer_rank(rank: int, world_size: int, port: int, argv: list[str]):
    """train_gpt2.main as rank `rank` of a run, in the environment torchrun would set (setup_distributed reads it)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import train_gpt2

    train_gpt2.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as _gloo_rank: past the interpreter's teardown, where a gloo thread can abort the process


def spawn_run(world_size, shards, log_dir, *args, name="run"):
    """The same run as run(), as world_size CPU ranks spawned from this process (no torchrun agent to start)."""
    import torch.multiprocessing as mp

    argv = ["--preset", "tiny", "--data-dir", shards, "--log-dir", str(log_dir), "--run-name", name, "--device", "cpu",
            *SMALL, *args]
    for attempt in range(2):
        try:
            mp.spawn(_trainer_rank, args=(world_size, free_port(), argv), nprocs=world_size)
            return
        except mp.ProcessRaisedException as e:  # a port race with another process: once more, from scratch
            if attempt or "address already in use" not in str(e).lower():
                raise
            shutil.rmtree(Path(log_dir) / name, ignore_errors=True)


# ---------------------------------------------------------------------- process groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, world_size: int, port: int, fn, args: tuple):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)  # its DDP wrappers are gone when it returns: before the group (else a rare abort)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # the rank's results are saved: skip the interpreter's teardown, where a gloo or DDP thread still joinable now
    # and then aborts the process ("terminate called without an active exception"), failing a test that passed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, world_size: int, *args):
    """fn(rank, world_size, *args) in world_size processes joined in a gloo group on a free port (tried on a
    second port if another process took the first meanwhile). fn must be a module-level function. Where the OS
    has it, the ranks fork from a server that imported torch once (forkserver), not each a fresh interpreter."""
    import multiprocessing

    import torch.multiprocessing as mp

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    # read when the server starts, at the first call; torch._dynamo: optimizers and DDP import it at their first use
    multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo"])
    for attempt in range(2):
        try:
            mp.start_processes(_gloo_rank, args=(world_size, free_port(), fn, args), nprocs=world_size,
                               start_method=method)
            return
        except mp.ProcessRaisedException as e:
            if attempt or "address already in use" not in str(e).lower():
                raise
