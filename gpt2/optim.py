"""The optimizers and what changes with the step: the lr schedule (and Muon's momentum warm-up), the
speedruns' batch and window ramps, and multi-token prediction's loss weights. All are functions of the step
alone, so a resumed run follows them exactly.

AdamW's parameters play roles (param_roles), and each role may have its own peak lr, betas and weight decay
(TrainConfig's adam_<role>_lr, _beta1, _beta2, _wd): the anchors train embeddings, head and scalars at 10-1000x a
matrix's lr (README "Per-role learning rates")."""

import math

import torch

from gpt2.config import TrainConfig
from gpt2.manifold import ManifoldMuon
from gpt2.muon import Muon, fused_row_splits
from model import GPT

ROLES = ("embed", "head", "scalar", "value_embed", "x0", "gate")  # AdamW's roles, in the order of their groups
# The later roles take their parent's settings where they have none of their own, and its group when they have none
# at all (gate: the matrices'), so that runs from before them resume with the same groups.
PARENTS = {"value_embed": "embed", "x0": "scalar", "gate": None}
# a setting's value when unset (TrainConfig's adam_<role>_<setting>)
UNSET = {"lr": 0.0, "beta1": 0.0, "beta2": 0.0, "wd": -1.0}
WIDTH_SCALED = ("embed", "head", "value_embed")  # nanochat's lr x (n_embd / 768) ** -0.5 (nanochat/gpt.py @ 92d63d4)


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


def param_roles(model: GPT) -> dict[int, str]:
    """Each parameter's role, by id: the `optim_role` of the innermost module that has one, else by name: the LM
    head (a tied table is the head's), the token and position tables (embed), the value-embedding tables
    (value_embed), the x0 lambdas (x0), any other 1-D parameter (scalar: biases, norm gains, sinks, lambdas).
    Matrices have none."""
    roles = {}
    for module in model.modules():  # parents before children: the innermost tag wins
        if (role := getattr(module, "optim_role", None)) is not None:
            if role not in ROLES:
                raise ValueError(f"{type(module).__name__}.optim_role {role!r} is not one of {ROLES}")
            roles.update({id(p): role for p in module.parameters()})
    tagged = set(roles)
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied table shows under both names
        if id(p) in tagged:
            continue
        if name == "lm_head.weight":
            roles[id(p)] = "head"
        elif name in ("transformer.wte.weight", "transformer.wpe.weight"):
            roles.setdefault(id(p), "embed")
        elif name.startswith("transformer.ve."):
            roles[id(p)] = "value_embed"
        elif name == "x0_lambdas":
            roles[id(p)] = "x0"
        elif p.dim() < 2:
            roles[id(p)] = "scalar"
    return roles


def own_settings(cfg: TrainConfig, role: str | None) -> dict[str, float]:
    """The settings cfg gives role itself, not its parent ({'lr': ..., 'wd': ...}), the unset left out."""
    values = {key: getattr(cfg, f"adam_{role}_{key}") for key in UNSET} if role else {}
    return {key: value for key, value in values.items() if value != UNSET[key]}


def role_group(cfg: TrainConfig, role: str, group: dict) -> dict:
    """group (a configure_optimizers group) with role's lr, betas and weight decay: its own, else its parent's,
    else the group's."""
    settings = {**own_settings(cfg, PARENTS.get(role)), **own_settings(cfg, role)}
    lr = settings.get("lr", group["lr"])
    if cfg.adam_width_scale and role in WIDTH_SCALED:
        lr *= (cfg.model.n_embd / 768) ** -0.5
    betas = (settings.get("beta1", group["betas"][0]), settings.get("beta2", group["betas"][1]))
    return {**group, "lr": lr, "betas": betas, "weight_decay": settings.get("wd", group["weight_decay"])}


def split_by_role(adamw: torch.optim.Optimizer, model: GPT, cfg: TrainConfig):
    """Split AdamW's groups (decayed, not decayed) by parameter role, each role's part with its settings."""
    joined = {role: parent for role, parent in PARENTS.items() if not own_settings(cfg, role)}
    roles = {key: joined.get(role, role) for key, role in param_roles(model).items()}
    groups = []
    for group in adamw.param_groups:
        for role in (None, *ROLES):
            params = [p for p in group["params"] if roles.get(id(p)) == role]
            if params:
                groups.append({**(role_group(cfg, role, group) if role else group), "params": params})
    adamw.param_groups = groups  # before the first step: no state refers to the old groups yet


def muon_matrices(cfg: TrainConfig, model: GPT) -> list[torch.nn.Parameter]:
    """What Muon holds: the blocks' matrices (model.hidden_matrices; under manifold Muon, not the gates and MoE
    routers: AdamW keeps those); none under --optimizer adamw."""
    hidden = model.hidden_matrices() if cfg.optimizer == "muon" else []
    if cfg.muon_manifold == "stiefel":  # unit singular values would set a zero gate to a random one, fix a router's
        keep = {id(p) for m in model.modules() if getattr(m, "keeps_its_scale", False) for p in m.parameters()}
        hidden = [p for p in hidden if id(p) not in keep]
    return hidden


def build_adamw(cfg: TrainConfig, model: GPT, device_type: str) -> torch.optim.Optimizer:
    """AdamW for every parameter Muon does not hold, its groups split by role when a role has settings."""
    adamw = model.configure_optimizers(cfg.weight_decay, cfg.max_lr, (cfg.beta1, cfg.beta2), cfg.eps, device_type,
                                       exclude=muon_matrices(cfg, model))
    if cfg.adam_width_scale or any(own_settings(cfg, role) for role in ROLES):
        split_by_role(adamw, model, cfg)
    return adamw


def build_optimizers(cfg: TrainConfig, model: GPT, device_type: str) -> list[torch.optim.Optimizer]:
    """AdamW alone, or Muon for the blocks' matrices plus AdamW for the rest (build_adamw). Each group remembers its
    peak lr (initial_lr) so the schedule can scale every optimizer by the same factor."""
    optimizers = [build_adamw(cfg, model, device_type)]
    if cfg.optimizer == "muon":
        hidden = muon_matrices(cfg, model)
        options = dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, fixed_norm=cfg.muon_fixed_norm, ns=cfg.muon_ns,
                       weight_decay=cfg.muon_weight_decay, cautious_wd=cfg.muon_cautious_wd, normuon=cfg.muon_normuon,
                       beta2=cfg.muon_beta2, row_splits=fused_row_splits(model) if cfg.muon_split else None)
        # the Stiefel optimizer projects the matrices onto their manifold as it is built
        optimizers.append(ManifoldMuon(hidden, manifold_iters=cfg.muon_manifold_iters, **options)
                          if cfg.muon_manifold == "stiefel" else Muon(hidden, **options))
    for opt in optimizers:
        remember_peaks(opt)
    return optimizers


def remember_peaks(opt: torch.optim.Optimizer):
    """Each group's peak lr (initial_lr), the one set_schedule scales."""
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]


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
