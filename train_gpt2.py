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
import itertools
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

import hellaswag
from gpt2.dataloader import DataError, ShardLoader, bits_per_byte, read_manifest, target_bytes
from gpt2.ema import PowerEMA, remove_snapshots_after, save_snapshot
from gpt2.manifold import ManifoldMuon
from gpt2.models import build_model
from gpt2.muon import Muon, fused_row_splits, set_adamw_lrs
from gpt2.runtime import (
    DiskFullError,
    Dist,
    Sha256Writer,
    atomic_write,
    autocast,
    autocast_dtype,
    exit_once,
    file_sha256,
    load_torch_file,
    mfu_peak,
    print0,
    remove_stale_temps,
    setup_distributed,
)
from model import ARCH_CHOICES, GPT, LOSS_CHUNK_ELEMENTS, GPTConfig


def choice(*values: str):
    """A field that takes one of values, the first being its default: argparse and TrainConfig both check it."""
    return field(default=values[0], metadata={"choices": values})


@dataclass
class TrainConfig:
    # data and run
    data_dir: str = "data/fineweb_edu"
    log_dir: str = "logs"
    run_name: str = ""  # default: the preset's name
    resume: str = "auto"  # auto: latest checkpoint of this run if any | never | path/to/ckpt.pt
    align_docs: bool = False  # every train row starts at a document's <|endoftext|> (dataloader.ShardLoader)
    shuffle: bool = False  # train shards and windows in a seeded random order per epoch
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
    schedule: str = choice("cosine", "wsd", "invsqrt")  # wsd: warm-up, stable, decay; invsqrt: EDM2's (see lr_at)
    decay_frac: float = 0.2  # wsd: the last fraction of the steps, over which the lr decays linearly
    decay_ref_steps: int = 100  # invsqrt: the lr is 1 / sqrt(max(step / decay_ref_steps, 1)) of its peak
    warmup_steps: int = 715
    max_steps: int = 19_073  # 10B tokens / 524,288 per step: one epoch of FineWeb-Edu sample-10BT
    stop_at: int = 0  # stop (with a checkpoint) after this step, schedule unchanged; 0: at max_steps
    # the speedruns' growing batch and window (0: off), functions of the step, so a resumed run follows them exactly
    batch_ramp_start: float = 0.0  # > 0: a step's tokens rise from this share of total_batch_size; lrs x sqrt(share)
    batch_ramp_frac: float = 0.25  # ... to all of it, linearly over this fraction of max_steps (whole micro-batches)
    window_start: int = 0  # > 0: the windowed layers' window rises from this to --window, in multiples of this
    window_ramp_frac: float = 1.0  # ... linearly over this fraction of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    optimizer: str = choice("adamw", "muon")  # muon: Muon for the blocks' matrices, AdamW for the rest
    muon_lr: float = 0.02  # Muon's peak lr; the schedule scales it like max_lr
    muon_momentum: float = 0.95
    muon_momentum_warmup: int = 0  # steps over which Muon's momentum rises from 0.85 to muon_momentum
    muon_fixed_norm: bool = False  # MuonH: after each step, scale every Muon matrix back to its initial norm
    muon_split: bool = False  # orthogonalize attention's q, k, v (and SwiGLU's gate, up) as matrices of their own
    muon_ns: str = choice("ns5", "polar")  # ns5: Newton-Schulz quintic; polar: Polar Express (per-step coefficients)
    muon_weight_decay: float = 0.0  # decoupled, times Muon's (scheduled, shape-scaled) lr; 0: none
    muon_cautious_wd: bool = False  # decay only the entries where the update and the weight have the same sign
    muon_normuon: bool = False  # NorMuon: per-row second-moment normalization of the orthogonalized update
    muon_beta2: float = 0.95  # NorMuon's second-moment EMA (nanochat 0.95, modded-nanogpt 0.9)
    muon_manifold: str = choice("none", "stiefel")  # stiefel: manifold Muon, every Muon matrix (block) semi-orthogonal
    muon_manifold_iters: int = 10  # stiefel's dual-ascent steps; 0: cheap: tangent-projected momentum, msign, retract
    # peak lrs of the AdamW groups (0: max_lr); the schedule scales them like max_lr. The anchors, with the
    # embedding RMS-normalized after the lookup (unlike GPT-2's): nanochat embed 0.3, head 0.008, scalars 0.5
    # (embed and head times (n_embd / 768) ** -0.5); modded-nanogpt Adam 0.008, scalars 5x that
    adam_embed_lr: float = 0.0  # token (untied) and position tables
    adam_head_lr: float = 0.0  # the LM head; tied to the token table, the shared table
    adam_scalar_lr: float = 0.0  # the 1-D parameters: biases, norm gains, sinks
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
    dtype: str = choice("auto", "float32", "bfloat16")  # autocast: auto = bfloat16 on CUDA, else float32
    compile: str = choice("auto", "0", "1")  # torch.compile: auto = on for CUDA
    chunked_loss: str = choice("auto", "0", "1")  # auto = on except on CUDA (see BENCHMARKS.md)
    seed: int = 1337

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if "choices" in f.metadata and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(f"{f.name} must be one of {f.metadata['choices']}, got {getattr(self, f.name)!r}")


TINY = dict(
    data_dir="data/fineweb_edu_tiny", n_layer=4, n_head=4, n_embd=128, batch_size=16, seq_len=128,
    total_batch_size=2048, max_lr=3e-3, warmup_steps=20, max_steps=300, val_every=50, val_tokens=65_536,
    hellaswag_every=0, sample_every=100, checkpoint_every=100,
)
# The switches that won their single-switch ablation on the tiny CPU setup by more than two seeds of the baseline
# differ (BENCHMARKS.md, "Ablations"), plus Muon and the wsd schedule (the "modern" suite) and Muon's q, k, v
# orthogonalized apart (the one option of the "muon" suite that won beyond its seed spread).
MODERN = dict(optimizer="muon", schedule="wsd", pos="rope", tie_head=False, n_kv_head=2, sinks=True, muon_split=True)
# The speedruns' switches that won the "speedrun" suite on top of the modern preset (BENCHMARKS.md, "speedrun").
SPEEDRUN = dict(MODERN, doc_mask=True, align_docs=True, value_embeds=True, unet=True)
# The constrained modes at their papers' settings, scaled to TINY's 300 steps.
EDM2 = dict(
    mode="edm2", schedule="invsqrt", weight_decay=0.0,  # EDM2 (Karras et al. 2024): inverse-sqrt decay, no decay
    beta2=0.99,  # EDM2's Adam betas (0.9, 0.99)
    max_lr=1e-3,  # EDM2's 1e-2 on unit-RMS weight entries, on our unit-norm rows of 128: 1e-2 / sqrt(128)
    decay_ref_steps=20, warmup_steps=2,  # EDM2's t_ref 70k and 10 Mimg ramp-up of its ~1M steps, of 300
)
HYPERSPHERE = dict(
    mode="hypersphere", warmup_steps=0, weight_decay=0.0,  # nGPT (Loshchilov et al. 2024): no warm-up, no decay
    max_lr=1.5e-3,  # nGPT's reported lr (15e-4, its 0.5B model)
)
PRESETS = {
    "gpt2-124m": {},
    "gpt2-124m-modern": MODERN,
    "gpt2-124m-speedrun": SPEEDRUN,
    "tiny": TINY,  # a few minutes on a laptop CPU; build its data with fineweb_edu.py (see README)
    "tiny-modern": {**TINY, **MODERN},
    "tiny-speedrun": {**TINY, **SPEEDRUN},
    "tiny-edm2": {**TINY, **EDM2},
    "tiny-hypersphere": {**TINY, **HYPERSPHERE},
}

PRESET_DATA = {name: "python fineweb_edu.py --max-tokens 5000000 --shard-size 1000000"
               for name in PRESETS if name.startswith("tiny")}
TRAIN_FIELDS = [f for f in dataclasses.fields(TrainConfig) if f.name != "model"]
MODEL_FIELDS = [f for f in dataclasses.fields(GPTConfig) if f.name not in ("block_size", "vocab_size")]

# Fields that decide which tokens are seen and what the optimizer does (and every model field): a resumed run
# must not change them.
RESUME_MUST_MATCH = (
    "data_dir", "align_docs", "shuffle", "seq_len", "total_batch_size", "batch_ramp_start", "batch_ramp_frac",
    "window_start", "window_ramp_frac", "max_lr",
    "min_lr_ratio", "schedule", "decay_frac", "warmup_steps", "max_steps", "weight_decay", "beta1", "beta2", "eps",
    "grad_clip", "optimizer", "muon_lr", "muon_momentum", "muon_momentum_warmup", "muon_fixed_norm", "muon_split",
    "muon_ns", "muon_weight_decay", "muon_cautious_wd", "muon_normuon", "muon_beta2", "muon_manifold",
    "muon_manifold_iters", "adam_embed_lr", "adam_head_lr", "adam_scalar_lr", "ema_sigma_rel", "ema_snapshot_every",
    "decay_ref_steps", "seed",
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


def field_choices(f: dataclasses.Field) -> tuple | None:
    """The allowed values of a string field: TrainConfig's fields carry theirs, model.py's are in ARCH_CHOICES."""
    return f.metadata.get("choices", ARCH_CHOICES.get(f.name))


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
                            choices=[0, 1] if is_bool else field_choices(f),
                            help=f"{about} [{preset}: {int(default) if is_bool else default!r}]".lstrip())
    args = parser.parse_args(argv)
    values = {**PRESETS[args.preset], **{k: v for k, v in vars(args).items() if k != "preset" and v is not None}}
    bools = {f.name for f in TRAIN_FIELDS + MODEL_FIELDS if f.type is bool}
    values = {k: bool(v) if k in bools else v for k, v in values.items()}
    model_names = {f.name for f in MODEL_FIELDS}
    try:  # inconsistent flags, e.g. --n-kv-head not dividing --n-head, or a preset's value out of its choices
        model = dataclasses.replace(defaults.model, block_size=values.get("seq_len", defaults.seq_len),
                                    **{k: v for k, v in values.items() if k in model_names})
        cfg = TrainConfig(model=model, **{k: v for k, v in values.items() if k not in model_names})
    except ValueError as e:
        parser.error(str(e))
    cfg.run_name = cfg.run_name or args.preset
    if cfg.muon_fixed_norm and (cfg.optimizer != "muon" or cfg.model.zero_init):
        parser.error("--muon-fixed-norm 1 needs --optimizer muon, and no --zero-init (a zero matrix would stay zero)")
    muon_switches = ("muon_split", "muon_ns", "muon_weight_decay", "muon_cautious_wd", "muon_normuon", "muon_beta2",
                     "muon_manifold", "muon_manifold_iters")
    changed = [k for k in muon_switches if getattr(cfg, k) != getattr(defaults, k)]
    if changed and cfg.optimizer != "muon":
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in changed)} need --optimizer muon")
    if cfg.muon_weight_decay < 0 or (cfg.muon_weight_decay and cfg.muon_fixed_norm):
        parser.error("--muon-weight-decay must be >= 0, and 0 with --muon-fixed-norm 1 (which restores the norm)")
    if cfg.muon_cautious_wd and not cfg.muon_weight_decay:
        parser.error("--muon-cautious-wd 1 needs a --muon-weight-decay > 0 to be cautious about")
    if not 0 <= cfg.muon_beta2 < 1 or min(cfg.adam_embed_lr, cfg.adam_head_lr, cfg.adam_scalar_lr) < 0:
        parser.error("--muon-beta2 must be in [0, 1), and --adam-embed-lr, --adam-head-lr, --adam-scalar-lr >= 0")
    check_manifold(parser, cfg, defaults)
    if cfg.decay_ref_steps < 1:
        parser.error(f"--decay-ref-steps must be >= 1, got {cfg.decay_ref_steps}")
    if not 0 <= cfg.ema_sigma_rel <= 0.3:
        parser.error(f"--ema-sigma-rel must be in (0, 0.3] (0: no EMA), got {cfg.ema_sigma_rel}")
    if cfg.ema_snapshot_every and not cfg.ema_sigma_rel:
        parser.error("--ema-snapshot-every needs --ema-sigma-rel")
    return cfg, args.preset


def check_manifold(parser: argparse.ArgumentParser, cfg: TrainConfig, defaults: TrainConfig):
    """--muon-manifold stiefel fixes every Muon matrix's singular values at 1: switches that set norms or reshape
    the update have no meaning on it."""
    if cfg.muon_manifold_iters < 0:
        parser.error(f"--muon-manifold-iters must be >= 0, got {cfg.muon_manifold_iters}")
    if cfg.muon_manifold == "none":
        if cfg.muon_manifold_iters != defaults.muon_manifold_iters:
            parser.error("--muon-manifold-iters needs --muon-manifold stiefel")
        return
    clashes = {"--muon-weight-decay": cfg.muon_weight_decay, "--muon-fixed-norm": cfg.muon_fixed_norm,
               "--muon-normuon": cfg.muon_normuon, "--muon-ns": cfg.muon_ns != defaults.muon_ns,
               "--zero-init": cfg.model.zero_init, "--mode": cfg.model.mode != "gpt2"}
    if any(clashes.values()):
        parser.error(f"--muon-manifold stiefel keeps every Muon matrix semi-orthogonal, which "
                     f"{', '.join(k for k, v in clashes.items() if v)} would fight or make meaningless (the manifold "
                     "sets the norms and has its own fp32 iteration, a zero matrix has no polar factor, edm2 and "
                     "hypersphere renormalize rows)")


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


# ---------------------------------------------------------------------- optimizers and schedule


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
        """'step 120/300 (40%) | <fields> | 1.2M tokens | elapsed 2m10s | ETA 3m15s'"""
        eta = (stop_step - step) * self.seconds
        return (f"step {step:6d}/{stop_step} ({step / stop_step:.0%}) | {fields} | {human_count(tokens)} tokens | "
                f"elapsed {human_duration(elapsed)} | ETA {human_duration(eta)}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The schedule's shape: the multiplier of every peak lr (max_lr, muon_lr) at step. Linear warm-up, then cosine
    decay to min_lr_ratio at max_steps; or, for wsd, 1 until the last decay_frac of the steps and a linear decay
    to the same end; or, for invsqrt, EDM2's 1 / sqrt(max(step / decay_ref_steps, 1)) (Karras et al. 2024) times
    the warm-up's ramp, as EDM2 has it (min_lr_ratio plays no part)."""
    if cfg.schedule == "invsqrt":
        ramp = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        return ramp / math.sqrt(max(step / cfg.decay_ref_steps, 1.0))
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - round(cfg.decay_frac * cfg.max_steps)
        progress = min(1.0, max(0, step - decay_start) / max(1, cfg.max_steps - decay_start))
        return 1.0 + progress * (cfg.min_lr_ratio - 1.0)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - cfg.min_lr_ratio)


def ramp_progress(cfg: TrainConfig, step: int, frac: float) -> float:
    """How far a ramp over the first frac of max_steps is at step: 0 at step 0, 1 from round(frac * max_steps) on."""
    return min(1.0, step / max(1, round(frac * cfg.max_steps)))


def micro_steps(cfg: TrainConfig, step: int, grad_accum: int) -> int:
    """The micro-batches of a step: grad_accum, or with the batch ramp batch_ramp_start of them (at least one) at
    step 0, rising linearly to grad_accum at batch_ramp_frac * max_steps."""
    if not cfg.batch_ramp_start:
        return grad_accum
    fraction = cfg.batch_ramp_start + ramp_progress(cfg, step, cfg.batch_ramp_frac) * (1.0 - cfg.batch_ramp_start)
    return max(1, min(grad_accum, round(fraction * grad_accum)))


def window_at(cfg: TrainConfig, step: int) -> int:
    """The windowed layers' window at step: --window, or with window_start a linear rise from window_start to
    --window at window_ramp_frac * max_steps, rounded down to a multiple of window_start (few distinct windows:
    each is a recompile under torch.compile)."""
    if not cfg.window_start:
        return cfg.model.window
    window = cfg.window_start + ramp_progress(cfg, step, cfg.window_ramp_frac) * (cfg.model.window - cfg.window_start)
    return int(window // cfg.window_start * cfg.window_start)


def build_optimizers(cfg: TrainConfig, model: GPT, device_type: str) -> list[torch.optim.Optimizer]:
    """AdamW alone, or Muon for the blocks' matrices plus AdamW for the rest. Each group remembers its peak lr
    (initial_lr) so the schedule can scale every optimizer by the same factor."""
    hidden = model.hidden_matrices() if cfg.optimizer == "muon" else []
    adamw = model.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps, device_type,
                                       exclude=hidden)
    if cfg.adam_embed_lr or cfg.adam_head_lr or cfg.adam_scalar_lr:
        set_adamw_lrs(adamw, model, cfg.adam_embed_lr, cfg.adam_head_lr, cfg.adam_scalar_lr)
    optimizers = [adamw]
    if cfg.optimizer == "muon":
        options = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, fixed_norm=cfg.muon_fixed_norm, ns=cfg.muon_ns,
                       weight_decay=cfg.muon_weight_decay, cautious_wd=cfg.muon_cautious_wd, normuon=cfg.muon_normuon,
                       beta2=cfg.muon_beta2, row_splits=fused_row_splits(model) if cfg.muon_split else None)
        # the Stiefel optimizer projects the matrices onto their manifold as it is built
        optimizers.append(ManifoldMuon(hidden, manifold_iters=cfg.muon_manifold_iters, **options)
                          if cfg.muon_manifold == "stiefel" else Muon(hidden, **options))
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def set_schedule(cfg: TrainConfig, optimizers: list[torch.optim.Optimizer], step: int,
                 batch_fraction: float = 1.0) -> float:
    """Every group's lr for this step: its peak (initial_lr) times the schedule, times sqrt(batch_fraction), the
    step's share of total_batch_size (the square-root rule of adaptive optimizers, Malladi et al. 2022); and
    Muon's momentum warm-up. Returns the lr multiplier."""
    multiplier = lr_at(cfg, step) * math.sqrt(batch_fraction)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if isinstance(opt, Muon) and cfg.muon_momentum_warmup:
                frac = min(1.0, step / cfg.muon_momentum_warmup)
                group["momentum"] = 0.85 + frac * (cfg.muon_momentum - 0.85)
    return multiplier


# ---------------------------------------------------------------------- checkpoints


def checkpoint_paths(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "ckpt_*.pt")))


def save_checkpoint(run_dir: str, state: dict, keep: int):
    """Atomic: write a temp file, then rename. A crash mid-write leaves the previous checkpoints intact. Its sha256,
    hashed while writing, goes beside it (`sha256sum -c` reads it) before the rename, so a checkpoint without one
    predates checksums. Rank 0 calls it; the others wait at a barrier (Trainer.save_if_due)."""
    path = os.path.join(run_dir, f"ckpt_{state['step']:07d}.pt")
    try:
        with atomic_write(path) as f:
            writer = Sha256Writer(f)
            torch.save(state, writer)  # the same bytes as into f, hashed on the way
            with atomic_write(path + ".sha256", "w") as s:
                s.write(f"{writer.hexdigest()}  {os.path.basename(path)}\n")
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
        aside = move_run_aside(run_dir)
        print0(f"{run_dir} holds an earlier run, which this one does not continue: moved it to {aside}")
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
                         + "\nPass the original values, or start a new run with --run-name NAME, or start over under "
                         "this name with --resume never (moves the old run's files aside to <run>.old-<time>/).")


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def val_loss(model, loader: ShardLoader, batches: int, dtype: torch.dtype, d: Dist) -> tuple[float, float]:
    """Mean val loss per token (nats) and bits per UTF-8 byte of the text the same targets encode, over all ranks."""
    model.eval()
    loader.reset()  # the same val tokens every time
    nats = torch.zeros((), device=d.device)
    n_bytes = torch.zeros((), device=d.device, dtype=torch.int64)  # int64: exact, where fp32 stops at 2^24
    for _ in range(batches):
        x, y = loader.next_batch()
        with autocast(d.device, dtype):
            nats += model(x, y, return_logits=False)[1].float() * y.numel()
        n_bytes += target_bytes(y)
    model.train()
    if d.world_size > 1:
        dist.all_reduce(nats)
        dist.all_reduce(n_bytes)
    tokens = batches * d.world_size * loader.B * loader.T
    return nats.item() / tokens, bits_per_byte(nats.item(), n_bytes.item())


@torch.no_grad()
def samples(raw_model: GPT, prompt: str, seed: int, device: torch.device, dtype: torch.dtype, count=4,
            tokens=32) -> list[str]:
    """A few continuations of a fixed prompt with a fixed seed (through the uncompiled module: the KV
    cache's changing shapes would make a compiled graph recompile every token)."""
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    idx = torch.tensor([enc.encode(prompt)] * count, device=device)
    tokens = min(tokens, raw_model.config.block_size - idx.shape[1])
    gen = torch.Generator(device=device).manual_seed(seed)
    raw_model.eval()
    with autocast(device, dtype):
        out = raw_model.generate(idx, tokens, temperature=1.0, top_k=50, generator=gen)
    raw_model.train()
    return [enc.decode(row.tolist()) for row in out]


# ---------------------------------------------------------------------- what is due when (the resume rules)


@dataclass
class Cadence:
    """What is due at a step: evaluations, EMA snapshots, checkpoints, the end. The resume rules live here only.

    They guarantee that a resumed run performs exactly the evaluations, samples, snapshots and saves that the
    uninterrupted run would have, and that no step's evaluation runs twice:
    - a step's checkpoint is saved after its evaluations and says so ("evaluated"); a stop request skips the
      evaluations and saves at once, unevaluated. Resumed from it, the step is evaluated exactly when it was not.
    - the snapshot and checkpoint of the resumed step were saved by the process that stopped there: never again.
    - step 0 (the initial weights) is evaluated but never saved.
    """

    cfg: TrainConfig
    stop_step: int  # this process stops after this step: --stop-at, or --max-steps
    resumed_at: int = -1  # the step of the checkpoint this process started from; -1: none
    evaluated_at: int = -1  # a step whose evaluations already ran before its checkpoint; -1: none

    @classmethod
    def resuming(cls, cfg: TrainConfig, stop_step: int, ckpt: dict | None) -> "Cadence":
        if ckpt is None:
            return cls(cfg, stop_step)
        return cls(cfg, stop_step, resumed_at=ckpt["step"], evaluated_at=ckpt["step"] if ckpt["evaluated"] else -1)

    def last(self, step: int) -> bool:
        return step >= self.stop_step

    def evaluation_due(self, every: int, step: int, stopping: bool) -> bool:
        """val, HellaSwag and samples: every `every` steps (0: never) and at the last step."""
        return every > 0 and (step % every == 0 or self.last(step)) and step != self.evaluated_at and not stopping

    def snapshot_due(self, step: int) -> bool:
        every = self.cfg.ema_snapshot_every
        return bool(every) and step % every == 0 and self._unsaved(step)

    def checkpoint_due(self, step: int, stopping: bool) -> bool:
        every = self.cfg.checkpoint_every
        return self._unsaved(step) and ((bool(every) and step % every == 0) or self.last(step) or stopping)

    def _unsaved(self, step: int) -> bool:
        return step > max(self.resumed_at, 0)


# ---------------------------------------------------------------------- set-up


def accumulation_and_stop(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """Micro-steps per optimizer step, and the step this process stops after."""
    tokens_per_micro = cfg.batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size % tokens_per_micro:
        raise SystemExit(f"--total-batch-size {cfg.total_batch_size} is not divisible by batch_size * seq_len * "
                         f"world_size = {cfg.batch_size} * {cfg.seq_len} * {world_size}: change one of them")
    if cfg.stop_at > cfg.max_steps:
        raise SystemExit(f"--stop-at {cfg.stop_at} is past --max-steps {cfg.max_steps}, where the schedule ends")
    accum = cfg.total_batch_size // tokens_per_micro
    if cfg.batch_ramp_start and not (0 < cfg.batch_ramp_start < 1 and accum > 1):
        raise SystemExit(f"--batch-ramp-start {cfg.batch_ramp_start} needs to be in (0, 1) and more than one "
                         f"micro-batch per step (now {accum}): lower --batch-size")
    if cfg.window_start and not 0 < cfg.window_start < cfg.model.window:
        raise SystemExit(f"--window-start {cfg.window_start} needs --window above it (now {cfg.model.window})")
    return accum, cfg.stop_at or cfg.max_steps


def open_data(cfg: TrainConfig, d: Dist, preset: str) -> tuple[ShardLoader, ShardLoader, int]:
    """The train and val loaders, and how many val batches an evaluation reads. Fails on missing or broken
    data before any other work."""
    try:
        train_loader = ShardLoader(cfg.data_dir, "train", cfg.batch_size, cfg.seq_len, d.rank, d.world_size, d.device,
                                   align_docs=cfg.align_docs, shuffle=cfg.shuffle, seed=cfg.seed)
        val_loader = ShardLoader(cfg.data_dir, "val", cfg.batch_size, cfg.seq_len, d.rank, d.world_size, d.device)
    except (DataError, ValueError) as e:
        hint = (f"\nthe {preset} preset's data (as in README.md): `{PRESET_DATA[preset]} --out {cfg.data_dir}`"
                if preset in PRESET_DATA else "")
        raise SystemExit(f"{e}{hint}") from None
    # the same first val tokens every time, never more than the val split holds (no wrap-around repeats)
    tokens_per_micro = cfg.batch_size * cfg.seq_len * d.world_size
    val_windows = sum((size - 1) // tokens_per_micro for size in val_loader.sizes)
    val_batches = max(1, min(cfg.val_tokens // tokens_per_micro, val_windows))
    return train_loader, val_loader, val_batches


def load_hellaswag(cfg: TrainConfig) -> list[dict]:
    if not cfg.hellaswag_every:
        return []
    try:
        return hellaswag.load_examples(cfg.hellaswag_data, limit=cfg.hellaswag_limit or None)
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"HellaSwag data: {e} (or turn the eval off with --hellaswag-every 0)") from None


def open_run(cfg: TrainConfig, preset: str, d: Dist, data_id: str):
    """The run's folder, lock (rank 0) and log, and the checkpoint to resume from (its settings and data checked
    against cfg), if any."""
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
    return run_dir, lock, log, resume_path, ckpt


def build_emas(cfg: TrainConfig, model: GPT) -> list[PowerEMA]:
    """The EMA that is evaluated, and with snapshots a second of half its width: post-hoc fits of other widths
    are ~20x closer from two widths than from one (ema.py)."""
    widths = [cfg.ema_sigma_rel] if cfg.ema_sigma_rel else []
    if cfg.ema_snapshot_every:
        widths.append(cfg.ema_sigma_rel / 2)
    params = list(model.parameters())
    return [PowerEMA(params, width) for width in widths]


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


@dataclass
class StepStats:
    loss: float  # mean over the step's micro-batches and ranks
    grad_norm: float  # before clipping
    lr_multiplier: float
    seconds: float
    stop: bool  # a stop request, agreed on by all ranks
    tokens: int  # trained on in this step, all ranks


class Trainer:
    """One process of a run: its data, model, optimizers, EMAs and log, and the step it is at (0, or the resumed
    checkpoint's). train() below drives it one phase at a time."""

    def __init__(self, cfg: TrainConfig, preset: str):
        self.cfg = cfg
        d = self.d = setup_distributed(cfg.device)
        self.grad_accum, stop_step = accumulation_and_stop(cfg, d.world_size)
        micro_tokens = cfg.total_batch_size // self.grad_accum  # the batch ramp varies a step's micro-batches
        self.tokens_before = list(itertools.accumulate(
            (micro_tokens * micro_steps(cfg, s, self.grad_accum) for s in range(cfg.max_steps)), initial=0))
        self.train_loader, self.val_loader, self.val_batches = open_data(cfg, d, preset)
        self.hellaswag_examples = load_hellaswag(cfg)
        self.data_id = data_identity(cfg.data_dir)
        self.run_dir, self.lock, self.log, resume_path, ckpt = open_run(cfg, preset, d, self.data_id)
        device_type = d.device.type
        self.dtype = autocast_dtype(cfg.dtype, d.device)
        use_compile = device_type == "cuda" if cfg.compile == "auto" else cfg.compile == "1"
        if device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(cfg.seed)
        chunked = cfg.chunked_loss == "1" or (cfg.chunked_loss == "auto" and device_type != "cuda")
        raw_model = build_model(cfg.model, loss_chunk_elements=LOSS_CHUNK_ELEMENTS if chunked else 0).to(d.device)
        self.raw_model = raw_model
        self.optimizers = build_optimizers(cfg, raw_model, device_type)
        self.emas = build_emas(cfg, raw_model)
        self.step, self.elapsed_before = 0, 0.0
        if ckpt is not None:
            self.restore(ckpt, resume_path, stop_step)
        self.cadence = Cadence.resuming(cfg, stop_step, ckpt)
        # val loss runs compiled too; HellaSwag and sampling call hidden()/generate(), which run eagerly
        self.model = torch.compile(raw_model) if use_compile else raw_model
        ddp_ids = [d.local_rank] if device_type == "cuda" else None
        self.train_model = DDP(self.model, device_ids=ddp_ids) if d.world_size > 1 else self.model

        self.flops_per_token, self.peak = raw_model.flops_per_token(cfg.seq_len), mfu_peak(d.device, self.dtype)
        self.log.print(f"config: {json.dumps(dataclasses.asdict(cfg))}")
        self.log.print(f"{raw_model.num_params():,} parameters | {d.world_size} x {d.device} | {self.dtype} | "
                       f"compile {use_compile} | grad accumulation {self.grad_accum} | {self.val_batches} val batches")
        self.result = {}  # the latest val loss (and EMA val loss), HellaSwag acc_norm and train loss
        self.stop = StopRequest()
        self.pace = Pace()  # the step time the log's ETA assumes
        self.t_start = time.time()

    def restore(self, ckpt: dict, path: str, stop_step: int):
        """Weights, optimizer states, EMAs, the loader's position, the RNGs and the clock of a checkpoint."""
        self.raw_model.load_state_dict(ckpt["model"])
        for opt, state in zip(self.optimizers, ckpt["optimizers"], strict=True):
            opt.load_state_dict(state)
        self.train_loader.load_state_dict(ckpt["loader"])
        for ema, state in zip(self.emas, ckpt.get("emas", []), strict=True):
            ema.load_state_dict(state)
        remove_snapshots_after(self.run_dir, ckpt["step"])
        set_rng_state(ckpt["rng"])
        self.step, self.elapsed_before = ckpt["step"], ckpt["elapsed"]
        self.log.print(f"resumed from {path} at step {self.step}")
        if self.step >= stop_step:
            self.log.print(f"the run in {self.run_dir} is already at step {self.step} (--stop-at/--max-steps "
                           f"{stop_step}): nothing to train; continue with a later --stop-at, or start another run "
                           "with --run-name NAME")

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t_start

    def tokens(self) -> int:
        """Tokens trained on before the current step, over all ranks."""
        return self.tokens_before[self.step]

    def event(self, kind: str, **values):
        self.log.event(kind, self.step, self.tokens(), self.elapsed(), **values)

    def follow_schedules(self):
        """The window schedule's window for this step, before its evaluations and its training (so a resumed run
        evaluates with the window the uninterrupted run had)."""
        if self.cfg.window_start:
            self.raw_model.set_window(window_at(self.cfg, self.step))

    def evaluate_if_due(self, stopping: bool):
        """val loss (and the EMA's), HellaSwag and samples, each on its own cadence."""
        cfg, d, step, due, result = self.cfg, self.d, self.step, self.cadence, self.result
        if due.evaluation_due(cfg.val_every, step, stopping):
            result["val_loss"], bpb = val_loss(self.model, self.val_loader, self.val_batches, self.dtype, d)
            self.event("val", loss=result["val_loss"], bpb=bpb)
            self.log.print(f"step {step:6d} | val loss {result['val_loss']:.4f} | bpb {bpb:.4f}")
            if self.emas and step > 0:
                with self.emas[0].swapped_in():
                    result["val_loss_ema"], bpb = val_loss(self.model, self.val_loader, self.val_batches, self.dtype, d)
                self.event("val_ema", loss=result["val_loss_ema"], bpb=bpb, sigma_rel=cfg.ema_sigma_rel)
                self.log.print(f"step {step:6d} | EMA val loss {result['val_loss_ema']:.4f} | bpb {bpb:.4f} "
                               f"(sigma_rel {cfg.ema_sigma_rel})")
        if due.evaluation_due(cfg.hellaswag_every, step, stopping):
            hs = hellaswag.evaluate(self.model, self.hellaswag_examples, d.device, rank=d.rank, world_size=d.world_size,
                                    dtype=self.dtype, progress=True)
            result["hellaswag"] = hs["acc_norm"]
            self.event("hellaswag", acc=hs["acc"], acc_norm=hs["acc_norm"], count=hs["count"])
            self.log.print(f"step {step:6d} | hellaswag acc_norm {hs['acc_norm']:.4f} ({hs['count']} examples)")
        if due.evaluation_due(cfg.sample_every, step, stopping) and d.master:
            texts = samples(self.raw_model, cfg.sample_prompt, cfg.seed, d.device, self.dtype)
            self.event("sample", samples=texts)
            self.log.print("\n".join(f"sample: {t!r}" for t in texts))

    def save_if_due(self, stopping: bool):
        """The EMA snapshot and the checkpoint of this step, each when due."""
        cfg, d = self.cfg, self.d
        if self.emas and self.cadence.snapshot_due(self.step) and d.master:
            names = [name for name, _ in self.raw_model.named_parameters()]
            self.log.print(f"saved {save_snapshot(self.run_dir, self.emas, names, dataclasses.asdict(cfg.model))}")
        if self.cadence.checkpoint_due(self.step, stopping):
            if d.master:
                state = {"model": self.raw_model.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                         "step": self.step, "loader": self.train_loader.state_dict(), "rng": rng_state(),
                         "elapsed": self.elapsed(), "evaluated": not stopping,  # see Cadence
                         "emas": [e.state_dict() for e in self.emas], "config": dataclasses.asdict(cfg),
                         "model_config": dataclasses.asdict(cfg.model), "data_identity": self.data_id}
                self.log.print(f"saved {save_checkpoint(self.run_dir, state, cfg.keep_checkpoints)}")
            if d.world_size > 1:
                dist.barrier()

    def optimizer_step(self) -> StepStats:
        """The step's micro-steps (grad_accum, fewer early in a batch ramp) with the gradients all-reduced on the
        last one only, then every optimizer's step."""
        cfg, d, accum = self.cfg, self.d, micro_steps(self.cfg, self.step, self.grad_accum)
        t0 = time.time()
        loss_sum = torch.zeros((), device=d.device)
        for micro in range(accum):
            x, y = self.train_loader.next_batch()
            sync = contextlib.nullcontext() if micro == accum - 1 or d.world_size == 1 else self.train_model.no_sync()
            with sync:
                with autocast(d.device, self.dtype):
                    _, loss = self.train_model(x, y, return_logits=False)
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip or math.inf)  # 0: no clip
        # One all-reduce carries the loss and the stop requests: all ranks stop after the same step. The signal
        # handler's flag is only ever read here, never reset, so a signal arriving meanwhile counts next step.
        stats = torch.stack([loss_sum / accum, torch.tensor(float(self.stop.requested), device=d.device)])
        if d.world_size > 1:
            dist.all_reduce(stats)
        train_loss, stop = stats[0].item() / d.world_size, bool(stats[1].item())
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm.item())):
            raise self.log.error(self.step, self.tokens(), self.elapsed(),
                                 f"step {self.step}: loss {train_loss}, grad norm {grad_norm.item()} is not finite; "
                                 f"stopping without saving, so the checkpoints in {self.run_dir} are untouched. "
                                 f"Resuming would repeat this exactly: start a new run (--run-name NAME) with a lower "
                                 f"--max-lr, or check the data.")
        multiplier = set_schedule(cfg, self.optimizers, self.step, accum / self.grad_accum)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.raw_model.after_step()  # edm2 / hypersphere: constrained weights back on their spheres
        for ema in self.emas:
            ema.update(self.step + 1)  # step + 1 optimizer steps done
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        return StepStats(train_loss, grad_norm.item(), multiplier, time.time() - t0, stop,
                         accum * cfg.total_batch_size // self.grad_accum)

    def log_step(self, s: StepStats):
        cfg, d = self.cfg, self.d
        lr = cfg.max_lr * s.lr_multiplier  # AdamW's lr, as logged since the first runs
        tok_per_s = s.tokens / s.seconds
        mfu = self.flops_per_token * tok_per_s / (self.peak * d.world_size) if self.peak else None
        mem = torch.cuda.max_memory_allocated(d.device) / 2**30 if d.device.type == "cuda" else None
        self.result["train_loss"] = s.loss
        schedules = {"batch_tokens": s.tokens} if cfg.batch_ramp_start else {}
        schedules |= {"window": window_at(cfg, self.step - 1)} if cfg.window_start else {}
        loads = self.raw_model.moe_loads() if hasattr(self.raw_model, "moe_loads") else None
        schedules |= {"moe_loads": loads} if loads is not None else {}  # per layer, each expert's token fraction
        self.event("train", loss=s.loss, lr=lr, grad_norm=s.grad_norm, dt_ms=s.seconds * 1000, tok_per_s=tok_per_s,
                   mfu=mfu, mem_gb=mem, **schedules)
        self.pace.update(s.seconds)
        fields = (f"loss {s.loss:.6f} | lr {lr:.2e} | norm {s.grad_norm:.3f} | {s.seconds * 1000:.0f} ms | "
                  f"{tok_per_s:,.0f} tok/s" + (f" | MFU {mfu:.1%}" if mfu else "") + (f" | {mem:.1f} GiB" if mem else ""))
        self.log.print(self.pace.line(self.step, self.cadence.stop_step, self.tokens(), self.elapsed(), fields))

    def summary(self, stopping: bool, resumed_at: int) -> str | None:
        """The run's last line: where a stopped run resumes, or what a finished one reached."""
        if stopping:
            return f"stopped at step {self.step} (checkpoint in {self.run_dir}): run the same command to resume"
        if self.step == resumed_at:
            return None
        val = f"val loss {self.result['val_loss']:.4f}, " if "val_loss" in self.result else ""
        ckpts = checkpoint_paths(self.run_dir)
        return (f"finished: step {self.step}, {val}{self.tokens():,} tokens, "
                f"{self.elapsed() / 60:.1f} min of training; checkpoint {ckpts[-1] if ckpts else 'none'}")

    def teardown(self):
        if self.lock:
            self.lock.release()
        if self.d.world_size > 1:
            del self.train_model  # DDP's reducer before the process group it uses (the other order can abort at exit)
            dist.destroy_process_group()


def train(cfg: TrainConfig, preset: str) -> dict:
    trainer = Trainer(cfg, preset)
    resumed_at = trainer.step
    stopping = False  # a stop request all ranks have agreed on (through the per-step all-reduce)
    try:
        while True:
            stopping = stopping or (trainer.d.world_size == 1 and trainer.stop.requested)
            trainer.follow_schedules()
            trainer.evaluate_if_due(stopping)
            trainer.save_if_due(stopping)
            if trainer.cadence.last(trainer.step) or stopping:
                break
            stats = trainer.optimizer_step()
            trainer.step += 1
            trainer.log_step(stats)
            stopping = stats.stop
    except DataError as e:  # damage that only shows when a shard is first read, e.g. token ids past the vocabulary
        raise trainer.log.error(trainer.step, trainer.tokens(), trainer.elapsed(), f"{e}\nstopping without saving: "
                                f"the checkpoints in {trainer.run_dir} are untouched") from None
    finally:
        trainer.stop.restore()  # also after an error: the caller's handlers come back
    if summary := trainer.summary(stopping, resumed_at):
        trainer.log.print(summary)
    trainer.teardown()
    return {"step": trainer.step, **trainer.result}


def main(argv=None) -> dict:
    cfg, preset = parse_config(argv)
    return train(cfg, preset)


def cli():
    """main() as a script: a message that stops the run is printed once, not once per torchrun rank."""
    try:
        main()
    except SystemExit as e:
        if isinstance(e.code, str):
            raise SystemExit(exit_once(e.code)) from None
        raise


if __name__ == "__main__":
    cli()
