"""The weight-constrained variants of model.py's GPT, picked by GPTConfig.mode (see README "Modern options"):

- edm2: magnitude-preserving layers (EDM2, Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
  Diffusion Models"; NVlabs/edm2 training/networks_edm2.py @ 4bf8162): weights stored at unit RMS per output unit
  and divided by sqrt(fan_in) in the forward (MPConv), q, k and v normalized per head, unit-RMS activations and
  mp_sum residuals. edm2_storage "rows" keeps this repo's first version: unit-norm rows, and the attention output
  RMS-normalized instead of q, k, v (its checkpoints load as they were trained).
- hypersphere: embeddings, matrices and hidden states on the unit sphere along the embedding dimension, with
  learned per-dimension step sizes and scales (nGPT, Loshchilov et al. 2024, "nGPT: Normalized Transformer").

Each is a set of subclasses of model.py's attention, MLP, Block and GPT that override their seams; module and
parameter names (and their creation order) are part of the checkpoint format. models.build_model is the one
place that reads `mode` (and `moe_experts` and the speedrun switches, which need mode gpt2).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (GPT, LOSS_CHUNK_ELEMENTS, MLP, SWIGLU_OSS_LIMIT, Block, CausalSelfAttention, GPTConfig, apply_rope,
                   swiglu_oss)

# ---------------------------------------------------------------------- shared pieces


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x scaled to unit L2 norm along dim."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-6)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """x scaled to unit RMS along the last dim (EDM2's normalize, its "pixel norm"): norm sqrt(n)."""
    return unit(x) * math.sqrt(x.size(-1))


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """EDM2's magnitude-preserving blend: (1-t) a + t b, rescaled so unit-variance a, b give unit variance."""
    return (a * (1 - t) + b * t) / math.sqrt((1 - t) ** 2 + t**2)


def unit_rms_gain(fn) -> float:
    """1 / RMS of fn(z) for z ~ N(0, 1) (by quadrature): the factor that makes an activation magnitude
    preserving (EDM2's SiLU / 0.596; GELU 0.652, ReLU^2 1.225)."""
    z = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    density = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    return float((fn(z).square() * density).sum().rsqrt())


class ConstrainedLinear(nn.Linear):
    """A bias-free linear layer whose weight is used normalized: unit-norm rows (norm_dim 1, one per output
    unit) or columns (norm_dim 0, for nGPT's projections back into the embedding space). Normalizing in the
    forward pass makes the gradient tangent to the sphere; project() puts the stored weight back on it after
    each optimizer step, so the step size stays relative and no weight decay is needed."""

    def __init__(self, in_features: int, out_features: int, norm_dim: int = 1):
        super().__init__(in_features, out_features, bias=False)
        self.norm_dim = norm_dim

    def forward(self, x):
        return F.linear(x, unit(self.weight, self.norm_dim))

    @torch.no_grad()
    def project(self):
        self.weight.copy_(unit(self.weight, self.norm_dim))


class MPLinear(ConstrainedLinear):
    """EDM2's MPConv as a linear map: each output unit's weights stored at unit RMS (forced weight normalization:
    project() after every step), used normalized and divided by sqrt(fan_in), so unit-RMS inputs of unit-RMS rows
    give unit-RMS outputs. Adam moves each element ~lr whatever the width: the same relative step in every layer,
    which is what lets EDM2's learning rate transfer (unit-norm rows would step sqrt(fan_in) times further)."""

    def forward(self, x):
        return F.linear(x, normalize(self.weight) / math.sqrt(self.in_features))

    @torch.no_grad()
    def project(self):
        self.weight.copy_(normalize(self.weight))


def constrained_linear(module: nn.Module, config: GPTConfig, in_features: int, out_features: int) -> ConstrainedLinear:
    """The `linear` factory of the constrained sublayers: no bias whatever config.bias says (the modes replace it).
    Mode edm2 gets EDM2's MPConv (unit-norm rows with edm2_storage rows), hypersphere nGPT's unit-norm vectors."""
    mpconv = config.mode == "edm2" and config.edm2_storage == "elements"
    return (MPLinear if mpconv else ConstrainedLinear)(in_features, out_features)


class ConstrainedGPT(GPT):
    """What both modes share: embedding rows and matrices of fixed norm, put back on their spheres after every step
    (so weight decay would do nothing useful to them)."""

    table_norm = 1.0  # the stored norm of an embedding row: unit, or sqrt(n_embd) for EDM2's unit-RMS elements

    def tables(self) -> list[nn.Parameter]:
        """Token (and position) embeddings and the head: rows along C, each of norm table_norm."""
        tables = [self.transformer.wte.weight, self.lm_head.weight]
        tables += [self.transformer.wpe.weight] if "wpe" in self.transformer else []
        return list({id(p): p for p in tables}.values())  # a tied head once

    def constrained_weights(self) -> list[nn.Parameter]:
        return self.tables() + [m.weight for m in self.modules() if isinstance(m, ConstrainedLinear)]

    def no_decay_params(self) -> list[nn.Parameter]:
        return super().no_decay_params() + self.constrained_weights()

    @torch.no_grad()
    def project_weights(self):
        """Put every constrained weight back on its sphere."""
        for m in self.modules():
            if isinstance(m, ConstrainedLinear):
                m.project()
        for table in self.tables():
            table.copy_(unit(table) * self.table_norm)

    def after_step(self):
        self.project_weights()

    def unit_embeddings(self, idx, start: int):
        """Unit-norm token rows of idx (B, T) and, with learned positions, unit-norm position rows (else None)."""
        x = unit(self.transformer.wte(idx))
        if self.config.pos != "learned":
            return x, None
        positions = torch.arange(start, start + idx.size(1), dtype=torch.long, device=idx.device)
        return x, unit(self.transformer.wpe(positions))


# ---------------------------------------------------------------------- edm2: magnitude preservation


class EDM2Attention(CausalSelfAttention):
    linear = constrained_linear

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__(config, layer)
        self.rows = config.edm2_storage == "rows"

    def qkv(self, x, rope=None):
        if self.rows:
            return super().qkv(x, rope)
        # EDM2 normalizes q, k and v per head (unit RMS over the head's channels); before RoPE, which keeps norms
        # but carries YaRN's concentration
        q, k, v = (normalize(t) for t in super().qkv(x))
        return (q, k, v) if rope is None else (apply_rope(q, *rope), apply_rope(k, *rope), v)

    def forward(self, x, rope=None, cache=None, mask=None):
        y = self.heads(x, rope, cache, mask)
        # rows: a softmax average of unit-variance values has less than unit variance, put back to unit RMS here
        return self.c_proj(F.rms_norm(y, (x.size(-1),), eps=1e-5) if self.rows else y)


class EDM2MLP(MLP):
    linear = constrained_linear

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        # the activation divided by its RMS on unit Gaussians keeps unit variance (gated: the gate's activation
        # times an independent `up`, so the RMS multiply; swiglu's `up` has unit RMS, swiglu-oss's is clamped and + 1)
        if self.kind == "swiglu-oss":
            self.gain = (unit_rms_gain(lambda z: swiglu_oss(z, torch.zeros_like(z)))
                         * unit_rms_gain(lambda z: z.clamp(-SWIGLU_OSS_LIMIT, SWIGLU_OSS_LIMIT) + 1))
        else:
            self.gain = unit_rms_gain(F.silu if self.kind == "swiglu" else self.activation)

    def forward(self, x):
        return self.c_proj(self.activation(self.c_fc(x)) * self.gain)


class EDM2Block(Block):
    Attention, MLP = EDM2Attention, EDM2MLP

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__(config, layer)
        self.mp_blend = config.mp_blend

    @staticmethod
    def make_norm(config: GPTConfig) -> nn.Module:
        """Unit RMS, nothing learned: a gain here would undo magnitude preservation."""
        return nn.RMSNorm(config.n_embd, eps=1e-5, elementwise_affine=False)

    def forward(self, x, rope=None, cache=None, mask=None):
        x = mp_sum(x, self.attn(self.ln_1(x), rope, cache, mask), self.mp_blend)
        return mp_sum(x, self.mlp(self.ln_2(x)), self.mp_blend)


class EDM2GPT(ConstrainedGPT):
    Block = EDM2Block

    def __init__(self, config: GPTConfig, loss_chunk_elements: int = LOSS_CHUNK_ELEMENTS):
        super().__init__(config, loss_chunk_elements)
        self.table_norm = 1.0 if config.edm2_storage == "rows" else math.sqrt(config.n_embd)  # unit-RMS elements
        # the logits are dot products with unit vectors: a learned gain sets their range
        self.logit_gain = nn.Parameter(torch.ones(()))
        self.project_weights()

    def embed(self, idx, start: int):
        x, p = self.unit_embeddings(idx, start)
        x = x * math.sqrt(self.config.n_embd)  # unit RMS: norm sqrt(C)
        return x if p is None else mp_sum(x, p * math.sqrt(self.config.n_embd), 0.5)

    def head_weight(self) -> torch.Tensor:
        return unit(self.lm_head.weight) * self.logit_gain


# ---------------------------------------------------------------------- hypersphere: nGPT
# nGPT stores its scales (s_qk, s_fc, alpha, s_z: logit_scale) divided by sqrt(C) and multiplies them back, so the
# optimizer moves them sqrt(C) times faster than a plain parameter; all are 1-D: no weight decay, no Muon.
# Every matrix is normalized along the embedding dimension: rows of the maps out of the residual stream, columns
# (norm_dim 0) of the c_proj maps back into it.


class HypersphereAttention(CausalSelfAttention):
    linear = constrained_linear

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__(config, layer)
        self.c_proj.norm_dim = 0
        sinks = self._parameters.pop("sinks", None)  # registered again after s_qk: the checkpoints' parameter order
        # unit q, k per head, rescaled by a learned s_qk per head and dimension (effective init 1)
        self.s_qk = nn.Parameter(torch.full((config.n_embd,), config.n_embd**-0.5))
        self.s_qk_scale = math.sqrt(config.n_embd)
        if sinks is not None:
            self.sinks = sinks

    def qkv(self, x, rope=None):
        q, k, v = super().qkv(x, rope)
        # nGPT scales q and k by s_qk: (s * q) . (s * k) = (s^2 * q) . k, so q alone carries s^2 (which also
        # serves grouped-query attention); and sqrt(d) instead of 1/sqrt(d) for unit vectors: q gets d
        s_qk = (self.s_qk * self.s_qk_scale).view(self.n_head, 1, self.head_dim)
        return unit(q) * s_qk.square() * self.head_dim, unit(k), v


class HypersphereMLP(MLP):
    linear = constrained_linear

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.c_proj.norm_dim = 0
        # unit-sphere dot products are small; a learned scale, times sqrt(C) (which swiglu's `up` half gets
        # too: a constant factor on the block's output, which the residual update normalizes away)
        self.s_fc = nn.Parameter(torch.ones(self.c_fc.out_features))
        self.s_scale = math.sqrt(config.n_embd)

    def forward(self, x):
        return self.c_proj(self.activation(self.c_fc(x) * (self.s_fc * self.s_scale)))


class HypersphereBlock(Block):
    Attention, MLP = HypersphereAttention, HypersphereMLP

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__(config, layer)
        # eigen learning rates: how far each step moves toward the block's output
        self.alpha_attn = nn.Parameter(torch.full((config.n_embd,), config.n_embd**-0.5))
        self.alpha_mlp = nn.Parameter(torch.full((config.n_embd,), config.n_embd**-0.5))
        self.alpha_scale = 0.05 * math.sqrt(config.n_embd)  # effective alpha 0.05 at init

    @staticmethod
    def make_norm(config: GPTConfig) -> nn.Module:
        """None: the residual update itself keeps the hidden states on the unit sphere."""
        return nn.Identity()

    def forward(self, x, rope=None, cache=None, mask=None):
        x = self.step(x, self.attn(self.ln_1(x), rope, cache, mask), self.alpha_attn)
        return self.step(x, self.mlp(self.ln_2(x)), self.alpha_mlp)

    def step(self, x, y, alpha: nn.Parameter):
        """A step along the sphere from x toward the sublayer's (unit) output y. Its size is |alpha|, as nGPT takes
        it (NVIDIA/ngpt model.py @ ed19eb2: for attn_alpha and mlp_alpha, not for sqk, suv or sz): a step never
        turns away from y."""
        return unit(x + alpha.abs() * self.alpha_scale * (unit(y) - x))


class HypersphereGPT(ConstrainedGPT):
    Block = HypersphereBlock

    def __init__(self, config: GPTConfig, loss_chunk_elements: int = LOSS_CHUNK_ELEMENTS):
        super().__init__(config, loss_chunk_elements)
        # s_z, one per token: nGPT starts it at 1, which keeps the initial logits within +-1 (cosines) and spends
        # the first hundreds of steps growing it; sqrt(C) gives unit-variance logits at init, as in the other modes
        self.logit_scale = nn.Parameter(torch.ones(config.padded_vocab_size))
        self.project_weights()

    def embed(self, idx, start: int):
        x, p = self.unit_embeddings(idx, start)
        return x if p is None else unit(x + p)

    def head_weight(self) -> torch.Tensor:
        return unit(self.lm_head.weight) * (self.logit_scale * math.sqrt(self.config.n_embd))[:, None]

