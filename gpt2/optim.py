"""The optimizers and what changes with the step: the lr schedule (and Muon's momentum warm-up), and the
speedruns' batch and window ramps. All are functions of the step alone, so a resumed run follows them exactly."""

import math

import torch

from gpt2.config import TrainConfig
from gpt2.manifold import ManifoldMuon
from gpt2.muon import Muon, fused_row_splits, set_adamw_lrs
from model import GPT


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
    """AdamW alone, or Muon for the blocks' matrices (model.hidden_matrices; under manifold Muon, not the gates and
    MoE routers: AdamW keeps those) plus AdamW for the rest. Each group remembers its peak lr (initial_lr) so the
    schedule can scale every optimizer by the same factor."""
    hidden = model.hidden_matrices() if cfg.optimizer == "muon" else []
    if cfg.muon_manifold == "stiefel":  # unit singular values would set a zero gate to a random one, fix a router's
        keep = {id(p) for m in model.modules() if getattr(m, "keeps_its_scale", False) for p in m.parameters()}
        hidden = [p for p in hidden if id(p) not in keep]
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


def mtp_weights_at(cfg: TrainConfig, step: int) -> list[float]:
    """Multi-token prediction's weights at step of the losses of the tokens 2..mtp+1 ahead: 0.5^k for the token k + 1
    ahead, the steps cut into mtp + 1 equal phases, and in phase p the weight of the token mtp + 1 - p ahead falls
    linearly to 0, those beyond it being 0 already (modded-nanogpt's schedule, for mtp 2: [0.5, 0.25 -> 0], then
    [0.5 -> 0, 0], then [0, 0] over thirds of the steps)."""
    n = cfg.model.mtp
    progress = min(1.0, step / cfg.max_steps) * (n + 1)
    phase, within = int(progress), progress - int(progress)
    fading = n - phase  # the offset whose weight falls in this phase
    return [0.5**k if k < fading else 0.5**k * (1 - within) if k == fading else 0.0 for k in range(1, n + 1)]
