"""Pretrain GPT-2 on pre-tokenized shards (see fineweb_edu.py).

    python train_gpt2.py --preset tiny                      # one device: CUDA, MPS or CPU
    torchrun --nproc-per-node=8 train_gpt2.py               # 8 GPUs, GPT-2 124M on FineWeb-Edu 10B

Every TrainConfig field is a flag (`--max-steps 100`); `--preset` picks the defaults they override.
A run lives in logs/<run-name>/: config.json, metrics.jsonl, log.txt and checkpoints. Re-running the same
command continues from the latest checkpoint (spot instances: SIGTERM saves one and exits cleanly).
"""

import argparse
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import inspect
import io
import json
import math
import os
import random
import re
import signal
import socket
import time
import tokenize
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dataloader import DataError, ShardLoader, read_manifest
from ema import PowerEMA, remove_snapshots_after, save_snapshot
from constrained import build_model
from model import ARCH_CHOICES, GPT, LOSS_CHUNK_ELEMENTS, GPTConfig
from muon import Muon
from runtime import (DiskFullError, Dist, atomic_write, autocast_dtype, file_sha256, load_torch_file, mfu_peak, print0,
                     remove_stale_temps, setup_distributed)


@dataclass
class TrainConfig:
    # data and run
    data_dir: str = "data/fineweb_edu"
    log_dir: str = "logs"
    run_name: str = ""  # default: the preset's name
    resume: str = "auto"  # auto: latest checkpoint of this run if any | never | path/to/ckpt.pt
    # the model: every GPTConfig field (model.py) is a flag too (--n-layer 4, --norm rmsnorm, ...); block_size = seq_len,
    # and the vocabulary is padded 50257 -> 50304 rows for faster matmuls (padded ids are never predicted)
    model: GPTConfig = field(default_factory=lambda: GPTConfig(vocab_multiple=128))
    # batch: total_batch_size tokens per optimizer step = batch_size * seq_len * world_size * accumulation
    batch_size: int = 64
    seq_len: int = 1024
    total_batch_size: int = 524_288
    # optimizer and schedule (GPT-3 small hyper-parameters)
    max_lr: float = 6e-4
    min_lr_ratio: float = 0.1  # the schedule ends at max_lr * min_lr_ratio at max_steps
    schedule: str = "cosine"  # cosine | wsd (warm-up, stable, linear decay over the last decay_frac of the steps)
    decay_frac: float = 0.2
    warmup_steps: int = 715
    max_steps: int = 19_073  # 10B tokens / 524,288 per step: one epoch of FineWeb-Edu sample-10BT
    stop_at: int = 0  # stop (with a checkpoint) after this step, schedule unchanged; 0: at max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' matrices, AdamW for the rest)
    muon_lr: float = 0.02  # Muon's peak lr; the schedule scales it like max_lr
    muon_momentum: float = 0.95
    muon_momentum_warmup: int = 0  # steps over which Muon's momentum rises from 0.85 to muon_momentum
    muon_fixed_norm: bool = False  # MuonH: after each step, scale every Muon matrix back to its initial norm
    ema_sigma_rel: float = 0.0  # > 0: also keep EDM2's power-function EMA of the weights (0.05-0.1) and evaluate it
    ema_snapshot_every: int = 0  # > 0: save the EMA (and one of half its width) to logs/<run>/ema/ this often, for ema.py
    # evaluation, sampling and checkpoints (0 disables; each also runs at the last step)
    val_every: int = 250
    val_tokens: int = 10_485_760  # the same first val tokens every time
    hellaswag_every: int = 250
    hellaswag_data: str = "val"  # split to download, or a local .jsonl
    hellaswag_limit: int = 0  # 0: all 10,042 examples
    sample_every: int = 1000
    sample_prompt: str = "Hello, I'm a language model,"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    # system
    device: str = "auto"  # auto: cuda > mps > cpu
    dtype: str = "auto"  # autocast dtype: auto = bfloat16 on CUDA, float32 elsewhere (bfloat16 is faster on most CPUs too)
    compile: str = "auto"  # torch.compile: auto = on for CUDA; 1 / 0
    chunked_loss: str = "auto"  # auto = on except on CUDA (see BENCHMARKS.md); 1 / 0
    seed: int = 1337


TINY = dict(
    data_dir="data/fineweb_edu_tiny", n_layer=4, n_head=4, n_embd=128, batch_size=16, seq_len=128,
    total_batch_size=2048, max_lr=3e-3, warmup_steps=20, max_steps=300, val_every=50, val_tokens=65_536,
    hellaswag_every=0, sample_every=100, checkpoint_every=100,
)
# The switches that won their single-switch ablation on the tiny CPU setup by more than two seeds of the baseline
# differ (BENCHMARKS.md, "Ablations"), plus Muon and the wsd schedule (ablated in the "modern" suite).
MODERN = dict(optimizer="muon", schedule="wsd", pos="rope", tie_head=False, n_kv_head=2, sinks=True)
PRESETS = {
    "gpt2-124m": {},
    "gpt2-124m-modern": MODERN,
    "tiny": TINY,  # a few minutes on a laptop CPU; build its data with fineweb_edu.py (see README)
    "tiny-modern": {**TINY, **MODERN},
}

CHOICES = {"dtype": ["auto", "float32", "bfloat16"], "compile": ["auto", "0", "1"], "chunked_loss": ["auto", "0", "1"],
           "schedule": ["cosine", "wsd"], "optimizer": ["adamw", "muon"], **ARCH_CHOICES}
PRESET_DATA = {name: "python fineweb_edu.py --max-tokens 5000000 --shard-size 1000000"
               for name in ("tiny", "tiny-modern")}
TRAIN_FIELDS = [f for f in dataclasses.fields(TrainConfig) if f.name != "model"]
MODEL_FIELDS = [f for f in dataclasses.fields(GPTConfig) if f.name not in ("block_size", "vocab_size")]

# Fields that decide which tokens are seen and what the optimizer does (and every model field): a resumed run
# must not change them.
RESUME_MUST_MATCH = (
    "data_dir", "seq_len", "total_batch_size", "max_lr",
    "min_lr_ratio", "schedule", "decay_frac", "warmup_steps", "max_steps", "weight_decay", "beta1", "beta2", "eps",
    "grad_clip", "optimizer", "muon_lr", "muon_momentum", "muon_momentum_warmup", "muon_fixed_norm", "ema_sigma_rel",
    "ema_snapshot_every", "seed",
)


def field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field in cls's source, read with tokenize (a '#' in a string is no comment):
    --help shows it, so the dataclass stays the one place a flag is described."""
    source = inspect.getsource(cls)
    lines, comments = source.splitlines(), {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        field_line = tok.type == tokenize.COMMENT and re.match(r"\s+(\w+)\s*:", lines[tok.start[0] - 1])
        if field_line:
            comments[field_line.group(1)] = tok.string.lstrip("# ")
    return comments


def parse_config(argv=None) -> tuple[TrainConfig, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS))
    first = argparse.ArgumentParser(add_help=False)  # --preset before --help: `--preset tiny --help` shows tiny's
    first.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS))
    preset = first.parse_known_args(argv)[0].preset
    comments = {**field_comments(GPTConfig), **field_comments(TrainConfig)}
    defaults = TrainConfig()
    for f in TRAIN_FIELDS + MODEL_FIELDS:
        default = getattr(defaults, f.name) if f in TRAIN_FIELDS else getattr(defaults.model, f.name)
        default = PRESETS[preset].get(f.name, default)
        is_bool = f.type is bool
        about = comments.get(f.name, "").replace("%", "%%")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=int if is_bool else f.type, default=None,
                            choices=[0, 1] if is_bool else CHOICES.get(f.name),
                            help=f"{about} [{preset}: {int(default) if is_bool else default!r}]".lstrip())
    args = parser.parse_args(argv)
    values = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if k != "preset" and v is not None}}
    bools = {f.name for f in TRAIN_FIELDS + MODEL_FIELDS if f.type is bool}
    values = {k: bool(v) if k in bools else v for k, v in values.items()}
    model_names = {f.name for f in MODEL_FIELDS}
    try:
        model = dataclasses.replace(defaults.model, block_size=values.get("seq_len", defaults.seq_len),
                                    **{k: v for k, v in values.items() if k in model_names})
    except ValueError as e:  # inconsistent model flags, e.g. --n-kv-head not dividing --n-head
        parser.error(str(e))
    cfg = TrainConfig(model=model, **{k: v for k, v in values.items() if k not in model_names})
    cfg.run_name = cfg.run_name or args.preset
    if cfg.muon_fixed_norm and (cfg.optimizer != "muon" or cfg.model.zero_init):
        parser.error("--muon-fixed-norm 1 needs --optimizer muon, and no --zero-init (a zero matrix would stay zero)")
    if not 0 <= cfg.ema_sigma_rel <= 0.3:
        parser.error(f"--ema-sigma-rel must be in (0, 0.3] (0: no EMA), got {cfg.ema_sigma_rel}")
    if cfg.ema_snapshot_every and not cfg.ema_sigma_rel:
        parser.error("--ema-snapshot-every needs --ema-sigma-rel")
    return cfg, args.preset


# ---------------------------------------------------------------------- logging


class RunLog:
    """Rank 0 appends to metrics.jsonl (one JSON object per event) and log.txt; other ranks stay quiet."""

    def __init__(self, run_dir: str, master: bool):
        self.master = master
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a") if master else None
        self.text = open(os.path.join(run_dir, "log.txt"), "a") if master else None

    def print(self, msg: str):
        if self.master:
            print(msg, flush=True)
            self.text.write(msg + "\n")
            self.text.flush()

    def error(self, step: int, tokens: int, elapsed: float, msg: str) -> SystemExit:
        """The message that stops the run, kept in log.txt and metrics.jsonl (kind "error") too."""
        self.event("error", step, tokens, elapsed, message=msg)
        if self.master:
            self.text.write(f"error: {msg}\n")
            self.text.flush()
        return SystemExit(msg)

    def event(self, kind: str, step: int, tokens: int, elapsed: float, **values):
        if self.master:
            record = {"kind": kind, "step": step, "tokens": tokens, "time": round(elapsed, 3), **values}
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to max_lr * min_lr_ratio at max_steps; or, for wsd, constant until
    the last decay_frac of the steps and a linear decay to the same end."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - round(cfg.decay_frac * cfg.max_steps)
        progress = min(1.0, max(0, step - decay_start) / max(1, cfg.max_steps - decay_start))
        return cfg.max_lr + progress * (min_lr - cfg.max_lr)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - min_lr)


def build_optimizers(cfg: TrainConfig, model: GPT, device_type: str) -> list[torch.optim.Optimizer]:
    """AdamW alone, or Muon for the blocks' matrices plus AdamW for the rest. Each group remembers its peak lr
    (initial_lr) so the schedule can scale every optimizer by the same factor."""
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        optimizers = [model.configure_optimizers(cfg.weight_decay, cfg.max_lr, betas, cfg.eps, device_type)]
    else:
        hidden = model.hidden_matrices()
        optimizers = [model.configure_optimizers(cfg.weight_decay, cfg.max_lr, betas, cfg.eps, device_type, exclude=hidden),
                      Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, fixed_norm=cfg.muon_fixed_norm)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


# ---------------------------------------------------------------------- checkpoints


def checkpoint_paths(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "ckpt_*.pt")))


def save_checkpoint(run_dir: str, state: dict, keep: int):
    """Atomic: write a temp file, then rename. A crash mid-write leaves the previous checkpoints intact. Its sha256
    goes beside it (`sha256sum -c` reads it) before the rename, so a checkpoint without one predates checksums."""
    path = os.path.join(run_dir, f"ckpt_{state['step']:07d}.pt")
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
            f.flush()
            digest = file_sha256(f.name)
            with atomic_write(path + ".sha256", "w") as s:
                s.write(f"{digest}  {os.path.basename(path)}\n")
    except DiskFullError as e:
        raise SystemExit(f"{e}\nthe checkpoints already in {run_dir} are intact: run the same command to resume "
                         "from the latest one") from None
    # later-step checkpoints belong to a timeline abandoned by `--resume earlier.pt`: auto-resume must not pick them
    newer = [p for p in checkpoint_paths(run_dir) if p > path]
    older = [p for p in checkpoint_paths(run_dir) if p <= path]
    for old in newer + (older[:-keep] if keep > 0 else []):
        os.remove(old)
        if os.path.exists(old + ".sha256"):
            os.remove(old + ".sha256")
    return path


class BadCheckpoint(Exception):
    pass


_warned_unchecked = False


def load_checkpoint(path: str) -> dict:
    """torch.load, after checking the file against its .sha256; a file with none predates checksums (warned once)."""
    global _warned_unchecked
    if os.path.exists(path + ".sha256"):
        with open(path + ".sha256") as f:
            expected = f.read().split()[:1]
        if [file_sha256(path)] != expected:
            raise BadCheckpoint(f"{path} does not match its sha256 in {path}.sha256 (truncated or corrupted)")
    elif not _warned_unchecked:
        _warned_unchecked = True
        print0(f"warning: {path} has no .sha256 beside it (saved before checksums): loading it unchecked")
    try:
        return load_torch_file(path)
    except ValueError as e:
        raise BadCheckpoint(str(e)) from None


def load_resume_checkpoint(cfg: TrainConfig, run_dir: str) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from and its contents: --resume path, or the newest good one of this run (a bad
    one is named and skipped: keep_checkpoints >= 2 keeps a fallback), or none."""
    if cfg.resume == "never":
        return None, None
    if cfg.resume != "auto":
        if not os.path.isfile(cfg.resume):
            raise SystemExit(f"--resume {cfg.resume}: no such checkpoint file")
        try:
            return cfg.resume, load_checkpoint(cfg.resume)
        except BadCheckpoint as e:
            raise SystemExit(f"--resume {cfg.resume}: {e}\npass another checkpoint, or --resume auto") from None
    paths = checkpoint_paths(run_dir)
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except BadCheckpoint as e:
            print0(f"skipping a bad checkpoint: {e}")
    if paths:
        raise SystemExit(f"no good checkpoint in {run_dir} (all {len(paths)} are bad, see above): resume from "
                         "another with --resume PATH, or start over with --resume never (moves this run aside)")
    return None, None


def holds_run(run_dir: str) -> bool:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    return bool(checkpoint_paths(run_dir)) or (os.path.exists(metrics) and os.path.getsize(metrics) > 0)


def move_run_aside(run_dir: str) -> str:
    """Starting over in a folder that holds a run: its files go to <run>.old-<time>/ (the lock stays), so two
    runs' metrics are never merged and no checkpoint of the old run is deleted."""
    aside = f"{os.path.normpath(run_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(aside)
    for name in os.listdir(run_dir):
        if name != "lock":
            os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    return aside


class RunLock:
    """One trainer per run folder: rank 0 holds an flock on <run>/lock for the run's life. The OS releases it when
    the process dies, so a crash never leaves the folder locked; the file names the holder for the message."""

    held = {}  # path -> file: a lock this process still holds from a train() that raised (tests call main() again)

    def __init__(self, run_dir: str):
        path = os.path.realpath(os.path.join(run_dir, "lock"))
        if path in RunLock.held:
            RunLock.held.pop(path).close()
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise SystemExit(f"{run_dir} is in use by another trainer ({holder}): wait for it to finish, stop it, "
                             "or train this one under another --run-name") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()
        RunLock.held[path] = self.file

    def release(self):
        RunLock.held.pop(os.path.realpath(self.file.name), None)
        self.file.close()


def open_run_dir(cfg: TrainConfig, run_dir: str, master: bool) -> RunLock | None:
    """Rank 0 locks the run folder, removes temp files of crashed saves, and moves an old run aside when this one
    starts over (--resume never, or a run that never saved a checkpoint)."""
    os.makedirs(run_dir, exist_ok=True)
    if not master:
        return None
    lock = RunLock(run_dir)
    remove_stale_temps(run_dir)
    starting_over = cfg.resume == "never" or (cfg.resume == "auto" and not checkpoint_paths(run_dir))
    if starting_over and holds_run(run_dir):
        print0(f"{run_dir} holds an earlier run, which this one does not continue: moved it to {move_run_aside(run_dir)}")
    return lock


def rng_state() -> dict:
    # numpy's key array travels as a tensor so that checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(), "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_identity(data_dir: str) -> str:
    """A hash over the manifest's shard list (file names and sha256s): the same folder rebuilt from another
    source, or with other settings, gets another identity."""
    shards = read_manifest(data_dir)["shards"]
    return hashlib.sha256("\n".join(f"{s['file']} {s['sha256']}" for s in shards).encode()).hexdigest()


def check_resume_data(ckpt: dict, data_id: str, path: str, data_dir: str):
    # checkpoints saved before data identities were recorded cannot be checked
    if ckpt.get("data_identity", data_id) != data_id:
        raise SystemExit(f"cannot resume from {path}: the shards in {data_dir} are not the ones this run trained on "
                         "(the folder was rebuilt from another source or with other settings). Point --data-dir at "
                         "the original shards, or start a new run with --run-name NAME.")


def check_resume_config(cfg: TrainConfig, saved: dict, path: str):
    # a setting missing from an older checkpoint did not exist then: the run had it at its default (off)
    defaults = TrainConfig()
    saved_model = saved.get("model", saved)  # older checkpoints kept n_layer etc. at the top level
    pairs = [(k, saved.get(k, getattr(defaults, k)), getattr(cfg, k)) for k in RESUME_MUST_MATCH]
    pairs += [(f.name, saved_model.get(f.name, getattr(defaults.model, f.name)), getattr(cfg.model, f.name))
              for f in MODEL_FIELDS]
    diff = [f"--{k.replace('_', '-')}: checkpoint {old!r}, now {new!r}" for k, old, new in pairs if old != new]
    if diff:
        raise SystemExit(f"cannot resume from {path}: the run's settings changed\n  " + "\n  ".join(diff)
                         + "\nPass the original values, or start a new run with --run-name NAME, or start over under this name "
                         "with --resume never (moves the old run's files aside to <run>.old-<time>/).")


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def val_loss(model, loader: ShardLoader, batches: int, autocast, d: Dist) -> float:
    model.eval()
    loader.reset()  # the same val tokens every time
    total = torch.zeros((), device=d.device)
    for _ in range(batches):
        x, y = loader.next_batch()
        with autocast:
            total += model(x, y, return_logits=False)[1].float()
    model.train()
    if d.world_size > 1:
        dist.all_reduce(total)
    return total.item() / (batches * d.world_size)


@torch.no_grad()
def samples(raw_model: GPT, prompt: str, seed: int, device, autocast, count=4, tokens=32) -> list[str]:
    """A few continuations of a fixed prompt with a fixed seed (through the uncompiled module: the KV
    cache's changing shapes would make a compiled graph recompile every token)."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    idx = torch.tensor([enc.encode(prompt)] * count, device=device)
    tokens = min(tokens, raw_model.config.block_size - idx.shape[1])
    gen = torch.Generator(device=device).manual_seed(seed)
    raw_model.eval()
    with autocast:
        out = raw_model.generate(idx, tokens, temperature=1.0, top_k=50, generator=gen)
    raw_model.train()
    return [enc.decode(row.tolist()) for row in out]


# ---------------------------------------------------------------------- the loop


class StopRequest:
    """SIGTERM (spot reclaim), SIGHUP (a closed ssh session; torchrun forwards it) or a first Ctrl-C: finish the
    step, checkpoint, exit 0. Another signal more than a second later kills; one within a second is the same
    Ctrl-C forwarded by a wrapper (uv run passes SIGINT on, so Python sees it twice)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    SAME_SIGNAL_S = 1.0

    def __init__(self):
        self.requested, self.first = False, 0.0
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        now = time.monotonic()
        if not self.requested:
            self.requested, self.first = True, now
            if os.environ.get("RANK", "0") == "0":  # os.write: a print here could re-enter a print of the loop
                os.write(2, f"{signal.Signals(signum).name}: stopping after this step (a checkpoint will be saved); "
                            "press Ctrl-C again to kill\n".encode())
        elif now - self.first > self.SAME_SIGNAL_S:
            self.restore()
            signal.raise_signal(signum)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, preset: str) -> dict:
    d = setup_distributed(cfg.device)
    tokens_per_micro = cfg.batch_size * cfg.seq_len * d.world_size
    if cfg.total_batch_size % tokens_per_micro:
        raise SystemExit(f"--total-batch-size {cfg.total_batch_size} is not divisible by batch_size * seq_len * "
                         f"world_size = {cfg.batch_size} * {cfg.seq_len} * {d.world_size}: change one of them")
    grad_accum = cfg.total_batch_size // tokens_per_micro
    if cfg.stop_at > cfg.max_steps:
        raise SystemExit(f"--stop-at {cfg.stop_at} is past --max-steps {cfg.max_steps}, where the schedule ends")
    stop_step = cfg.stop_at or cfg.max_steps
    try:  # fail on missing or broken data before any other work
        train_loader = ShardLoader(cfg.data_dir, "train", cfg.batch_size, cfg.seq_len, d.rank, d.world_size, d.device)
        val_loader = ShardLoader(cfg.data_dir, "val", cfg.batch_size, cfg.seq_len, d.rank, d.world_size, d.device)
    except (DataError, ValueError) as e:
        hint = (f"\nthe {preset} preset's data (as in README.md): `{PRESET_DATA[preset]} --out {cfg.data_dir}`"
                if preset in PRESET_DATA else "")
        raise SystemExit(f"{e}{hint}") from None
    data_id = data_identity(cfg.data_dir)
    if cfg.hellaswag_every:
        import hellaswag

        try:
            hellaswag_examples = hellaswag.load_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit or None)
        except (OSError, RuntimeError, ValueError) as e:
            raise SystemExit(f"HellaSwag data: {e} (or turn the eval off with --hellaswag-every 0)") from None
    # the same first val tokens every time, never more than the val split holds (no wrap-around repeats)
    val_windows = sum((size - 1) // tokens_per_micro for size in val_loader.sizes)
    val_batches = max(1, min(cfg.val_tokens // tokens_per_micro, val_windows))

    run_dir = os.path.join(cfg.log_dir, cfg.run_name)
    lock = open_run_dir(cfg, run_dir, d.master)
    log = RunLog(run_dir, d.master)
    resume_path, ckpt = load_resume_checkpoint(cfg, run_dir)
    if ckpt is not None:
        check_resume_config(cfg, ckpt["config"], resume_path)
        check_resume_data(ckpt, data_id, resume_path, cfg.data_dir)
    if d.master:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"preset": preset, **dataclasses.asdict(cfg)}, f, indent=2)

    device_type = d.device.type
    dtype = autocast_dtype(cfg.dtype, d.device)
    autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)
    use_compile = device_type == "cuda" if cfg.compile == "auto" else cfg.compile == "1"
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)
    chunked = cfg.chunked_loss == "1" or (cfg.chunked_loss == "auto" and device_type != "cuda")
    raw_model = build_model(cfg.model, loss_chunk_elements=LOSS_CHUNK_ELEMENTS if chunked else 0).to(d.device)
    optimizers = build_optimizers(cfg, raw_model, device_type)
    params = list(raw_model.parameters())
    widths = [cfg.ema_sigma_rel] if cfg.ema_sigma_rel else []  # the EMA that is evaluated
    if cfg.ema_snapshot_every:  # post-hoc fits of other widths are ~20x closer from two widths than one (ema.py)
        widths.append(cfg.ema_sigma_rel / 2)
    emas = [PowerEMA(params, width) for width in widths]
    step, elapsed_before = 0, 0.0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        for opt, state in zip(optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(state)
        train_loader.load_state_dict(ckpt["loader"])
        for ema, state in zip(emas, ckpt.get("emas", []), strict=True):
            ema.load_state_dict(state)
        remove_snapshots_after(run_dir, ckpt["step"])
        set_rng_state(ckpt["rng"])
        step, elapsed_before = ckpt["step"], ckpt["elapsed"]
        log.print(f"resumed from {resume_path} at step {step}")
    resumed_at = step if resume_path else -1
    if resumed_at >= stop_step:
        log.print(f"the run in {run_dir} is already at step {step} (--stop-at/--max-steps {stop_step}): nothing to "
                  "train; continue with a later --stop-at, or start another run with --run-name NAME")
    # the evaluations of the resumed step ran before its checkpoint, unless a stop request skipped them
    evaluated_at = step if ckpt is not None and ckpt["evaluated"] else -1
    del ckpt
    # val loss runs compiled too; HellaSwag and sampling call hidden()/generate(), which run eagerly
    model = torch.compile(raw_model) if use_compile else raw_model
    train_model = DDP(model, device_ids=[d.local_rank] if device_type == "cuda" else None) if d.world_size > 1 else model

    flops_per_token = raw_model.flops_per_token(cfg.seq_len)
    peak = mfu_peak(d.device, dtype)
    log.print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
    log.print(f"{raw_model.num_params():,} parameters | {d.world_size} x {d.device} | {dtype} | compile {use_compile} "
              f"| grad accumulation {grad_accum} | {val_batches} val batches")

    stop = StopRequest()
    t_start = time.time()
    elapsed = lambda: elapsed_before + time.time() - t_start
    tokens = lambda: step * cfg.total_batch_size
    result = {}
    stopping = False  # a stop request all ranks have agreed on (through the per-step all-reduce)
    while True:
        stopping = stopping or (d.world_size == 1 and stop.requested)
        last = step >= stop_step
        due = lambda every: every > 0 and (step % every == 0 or last) and step != evaluated_at and not stopping
        if due(cfg.val_every):
            result["val_loss"] = val_loss(model, val_loader, val_batches, autocast, d)
            log.event("val", step, tokens(), elapsed(), loss=result["val_loss"])
            log.print(f"step {step:6d} | val loss {result['val_loss']:.4f}")
            if emas and step > 0:
                with emas[0].swapped_in():
                    result["val_loss_ema"] = val_loss(model, val_loader, val_batches, autocast, d)
                log.event("val_ema", step, tokens(), elapsed(), loss=result["val_loss_ema"], sigma_rel=cfg.ema_sigma_rel)
                log.print(f"step {step:6d} | EMA val loss {result['val_loss_ema']:.4f} (sigma_rel {cfg.ema_sigma_rel})")
        if due(cfg.hellaswag_every):
            hs = hellaswag.evaluate(model, hellaswag_examples, d.device, rank=d.rank, world_size=d.world_size,
                                    autocast_dtype=dtype if dtype != torch.float32 else None)
            result["hellaswag"] = hs["acc_norm"]
            log.event("hellaswag", step, tokens(), elapsed(), acc=hs["acc"], acc_norm=hs["acc_norm"], count=hs["count"])
            log.print(f"step {step:6d} | hellaswag acc_norm {hs['acc_norm']:.4f} ({hs['count']} examples)")
        if due(cfg.sample_every) and d.master:
            texts = samples(raw_model, cfg.sample_prompt, cfg.seed, d.device, autocast)
            log.event("sample", step, tokens(), elapsed(), samples=texts)
            log.print("\n".join(f"sample: {t!r}" for t in texts))
        snapshot_due = cfg.ema_snapshot_every and step % cfg.ema_snapshot_every == 0 and step > max(resumed_at, 0)
        if emas and snapshot_due and d.master:
            names = [name for name, _ in raw_model.named_parameters()]
            log.print(f"saved {save_snapshot(run_dir, emas, names, dataclasses.asdict(cfg.model))}")
        if step > max(resumed_at, 0) and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last or stopping):
            if d.master:
                state = {"model": raw_model.state_dict(), "optimizers": [o.state_dict() for o in optimizers], "step": step,
                         "loader": train_loader.state_dict(), "rng": rng_state(), "elapsed": elapsed(),
                         "evaluated": not stopping, "emas": [e.state_dict() for e in emas],
                         "config": dataclasses.asdict(cfg), "model_config": dataclasses.asdict(cfg.model),
                         "data_identity": data_id}
                log.print(f"saved {save_checkpoint(run_dir, state, cfg.keep_checkpoints)}")
            if d.world_size > 1:
                dist.barrier()
        if last or stopping:
            break

        # ---- one optimizer step: grad_accum micro-steps, gradients all-reduced on the last one only
        t0 = time.time()
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(grad_accum):
            x, y = train_loader.next_batch()
            sync = contextlib.nullcontext() if micro == grad_accum - 1 or d.world_size == 1 else train_model.no_sync()
            with sync:
                with autocast:
                    _, loss = train_model(x, y, return_logits=False)
                (loss / grad_accum).backward()
            loss_sum += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)  # 0: no clip
        # One all-reduce carries the loss and the stop requests: all ranks stop after the same step. The signal
        # handler's flag is only ever read here, never reset, so a signal arriving meanwhile counts next step.
        stats = torch.stack([loss_sum / grad_accum, torch.tensor(float(stop.requested), device=d.device)])
        if d.world_size > 1:
            dist.all_reduce(stats)
        train_loss, stopping = stats[0].item() / d.world_size, bool(stats[1].item())
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm.item())):
            raise log.error(step, tokens(), elapsed(), f"step {step}: loss {train_loss}, grad norm {grad_norm.item()} is not finite; stopping "
                             f"without saving, so the checkpoints in {run_dir} are untouched. Resuming would repeat "
                             f"this exactly: start a new run (--run-name NAME) with a lower --max-lr, or check the data.")
        lr = lr_at(cfg, step)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lr / cfg.max_lr
                if "momentum" in group and cfg.muon_momentum_warmup:  # Muon's
                    frac = min(1.0, step / cfg.muon_momentum_warmup)
                    group["momentum"] = 0.85 + frac * (cfg.muon_momentum - 0.85)
            opt.step()
            opt.zero_grad(set_to_none=True)
        raw_model.after_step()  # edm2 / hypersphere: constrained weights back on their spheres
        for ema in emas:
            ema.update(step + 1)  # step + 1 optimizer steps done
        if device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        step += 1
        tok_per_s = cfg.total_batch_size / dt
        mfu = flops_per_token * tok_per_s / (peak * d.world_size) if peak else None
        mem = torch.cuda.max_memory_allocated(d.device) / 2**30 if device_type == "cuda" else None
        result["train_loss"] = train_loss
        log.event("train", step, tokens(), elapsed(), loss=train_loss, lr=lr, grad_norm=grad_norm.item(),
                  dt_ms=dt * 1000, tok_per_s=tok_per_s, mfu=mfu, mem_gb=mem)
        log.print(f"step {step:6d} | loss {train_loss:.6f} | lr {lr:.2e} | norm {grad_norm.item():.3f} | "
                  f"{dt * 1000:.0f} ms | {tok_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu else "")
                  + (f" | {mem:.1f} GiB" if mem else ""))

    if stopping:
        log.print(f"stopped at step {step} (checkpoint in {run_dir}): run the same command to resume")
    elif step > resumed_at:
        val = f"val loss {result['val_loss']:.4f}, " if "val_loss" in result else ""
        log.print(f"finished: step {step}, {val}{tokens():,} tokens, {elapsed() / 60:.1f} min of training; "
                  f"checkpoint {checkpoint_paths(run_dir)[-1] if checkpoint_paths(run_dir) else 'none'}")
    stop.restore()
    if lock:
        lock.release()
    if d.world_size > 1:
        del train_model  # DDP's reducer before the process group it uses (the other order can abort at exit)
        dist.destroy_process_group()
    return {"step": step, **result}


def main(argv=None) -> dict:
    cfg, preset = parse_config(argv)
    return train(cfg, preset)


if __name__ == "__main__":
    main()
