"""What the speedruns change about the model and its rows as training goes on, as functions of the step (so a
resumed run follows them exactly): rows that grow to --seq-len, YaRN rescaling RoPE as the context grows, and a
tied LM head untied late in training.

- seq_len_at: rows start seq_len_start long and double, in equal stages over the first seq_len_ramp_frac of the
  steps, up to --seq-len; a micro-batch keeps batch_size * seq_len tokens (each full row cut into shorter ones,
  ShardLoader.set_row_len), so tokens per step and gradient accumulation stay as they are. modded-nanogpt cuts its
  documents at 896 tokens for the first third of training, then at 2048 (record 2026-02-10_ShortWindow, train_gpt.py
  @ f411b3d, TRAINING_STAGES' train_max_seq_len). Doubling keeps the lengths few (each is one more graph under
  torch.compile) and divisors of --seq-len.
- model_config_at, yarn_follows: modded-nanogpt rescales RoPE with YaRN each time its long window grows
  (Yarn.apply(old, new): the slow frequencies interpolated by old / new, those turning more than 32 times over the
  old window kept, a ramp between; the attention scale times 0.2 ln(new / old) + 1; record 2025-09-10_Yarn). Here
  the step's RoPE is YaRN's (gpt2.attention.yarn, gpt-oss's form) counted over the first rows (or windows) and
  extended by the step's over them, in one application rather than one per growth; its concentration on q and k
  scales the logits by (0.1 ln f + 1)^2, 1 + 0.2 ln f to first order, modded's constant.
- untie_at: modded-nanogpt ties the embedding to the head for the first 2/3 of training, then gives each its own
  copy of the shared weights and of their Adam state (step, both moments) (record 2025-12-22_MultiTokenPrediction,
  train_gpt.py @ 9060ff4 copy_lm_to_embed; @ f411b3d copy_lm_state_to_embed). Here the table keeps its parameter,
  its state and moves from the head role's AdamW settings to the embed role's; the head becomes a new parameter
  with copies of both, in the head role.
"""

import dataclasses

import torch
import torch.nn as nn

from gpt2.config import TrainConfig
from gpt2.optim import build_adamw, remember_peaks, window_at
from model import GPT, GPTConfig


def seq_len_at(cfg: TrainConfig, step: int) -> int:
    """The rows' length at step: seq_len_start * 2^i in stage i of the ramp's equal stages, --seq-len after it."""
    if not cfg.seq_len_start:
        return cfg.seq_len
    stages = (cfg.seq_len // cfg.seq_len_start).bit_length() - 1  # the doublings from seq_len_start to seq_len
    ramp = max(1, round(cfg.seq_len_ramp_frac * cfg.max_steps))
    return cfg.seq_len_start << min(stages, step * stages // ramp)


def untie_step(cfg: TrainConfig) -> int:
    """The step from which the head is a matrix of its own; 0: never untied."""
    return round(cfg.untie_at * cfg.max_steps)


def untied_at(cfg: TrainConfig, step: int) -> bool:
    return bool(cfg.untie_at) and step >= untie_step(cfg)


def model_config_at(cfg: TrainConfig, step: int) -> GPTConfig:
    """The model's config as it is at step: the run's, with YaRN following the growing context and the head untied
    where those are due. Checkpoints save it, so sample.py and hellaswag.py load the model as it was trained."""
    changes = {"tie_head": False} if untied_at(cfg, step) else {}
    if cfg.yarn_follows == "seq-len":
        changes |= dict(rope_original_context=cfg.seq_len_start, rope_factor=seq_len_at(cfg, step) / cfg.seq_len_start)
    elif cfg.yarn_follows == "window":
        changes |= dict(rope_original_context=cfg.window_start, rope_factor=window_at(cfg, step) / cfg.window_start)
    return dataclasses.replace(cfg.model, **changes) if changes else cfg.model


def is_tied(model: GPT) -> bool:
    return model.lm_head.weight is model.transformer.wte.weight


def untie_head(model: GPT):
    """The LM head becomes a parameter of its own, a copy of the token table it was tied to."""
    model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())


def untie_with_adamw(cfg: TrainConfig, model: GPT, adamw: torch.optim.Optimizer,
                     device_type: str) -> torch.optim.Optimizer:
    """untie_head, and AdamW rebuilt as a resumed run builds it for the untied model (so its checkpoints load
    there): every parameter keeps its state, the new head starts from a copy of the table's."""
    table = model.transformer.wte.weight
    untie_head(model)
    fresh = build_adamw(cfg, model, device_type)
    remember_peaks(fresh)
    for param, state in adamw.state.items():
        fresh.state[param] = state
    if table in adamw.state:
        fresh.state[model.lm_head.weight] = {k: v.clone() if torch.is_tensor(v) else v
                                             for k, v in adamw.state[table].items()}
    return fresh
