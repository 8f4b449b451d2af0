"""GPT-2, exactly, plus switches for later architecture ideas: the model, its HF-layout weight
import/export, KV-cached sampling and FLOP counts.

Imports only torch and the standard library. No training code lives here.
The defaults are GPT-2 to the bit. Every other option is a GPTConfig field, off by default, so each can be
turned on alone and compared against the baseline (see README "Modern options").
Module and parameter names follow the OpenAI/HF checkpoint layout, so loading and exporting weights is
a rename-free copy (plus a transpose: HF stores its linear layers as `Conv1D` with weights (in, out)).
"""

import inspect
import json
import math
import os
import struct
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCH_CHOICES = {"norm": ("layernorm", "rmsnorm"), "pos": ("learned", "rope"), "mlp": ("gelu", "relu2", "swiglu"),
                "mode": ("gpt2", "edm2", "hypersphere")}


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (learned position embeddings)
    vocab_size: int = 50257  # real GPT-2 tokens; only these can ever be predicted
    vocab_multiple: int = 1  # pad the embedding table to a multiple of this (128 -> 50304) for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # architecture switches; the defaults are GPT-2
    n_kv_head: int = 0  # grouped-query attention: key/value heads, each shared by n_head // n_kv_head; 0 = n_head
    norm: str = "layernorm"  # layernorm | rmsnorm
    bias: bool = True  # biases in the linear layers and LayerNorms
    pos: str = "learned"  # learned (absolute position table) | rope (rotary, on queries and keys)
    rope_theta: float = 10000.0
    mlp: str = "gelu"  # gelu | relu2 (relu squared) | swiglu (hidden width 8/3 n_embd: the same parameter count)
    qk_norm: bool = False  # RMS-normalize queries and keys per head before the dot product
    sinks: bool = False  # a learned per-head logit in every softmax denominator: a head may attend to nothing (gpt-oss)
    window: int = 0  # > 0: even layers attend to the last `window` positions only, odd layers to all (gpt-oss: 128)
    tie_head: bool = True  # the LM head is the token embedding (GPT-2) or its own matrix
    zero_init: bool = False  # output projections start at zero, so every block starts as the identity
    softcap: float = 0.0  # > 0: logits = softcap * tanh(logits / softcap)
    # weight-constrained modes (they replace `norm` and `bias`: no learned norms, no biases, see README):
    # edm2: magnitude-preserving layers with unit-norm weight rows (EDM2); hypersphere: every vector on the unit
    # sphere along the embedding dimension (nGPT)
    mode: str = "gpt2"
    mp_blend: float = 0.3  # edm2: residual x <- mp_sum(x, block(x), mp_blend)

    def __post_init__(self):
        for name, choices in ARCH_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, got {self.n_embd // self.n_head}")
        if min(self.n_kv_head, self.window, self.softcap) < 0:
            raise ValueError("n_kv_head, window and softcap must be >= 0 (0: off)")
        if self.mode != "gpt2" and self.zero_init:
            raise ValueError(f"zero_init cannot be combined with mode {self.mode}: a zero matrix has no direction")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def is_gpt2(self) -> bool:
        """True when every architecture switch is at its GPT-2 default (what HF's GPT-2 layout can hold)."""
        # sizes may differ, and so may rope_theta and mp_blend: they do nothing without rope and edm2
        free = ("block_size", "vocab_size", "vocab_multiple", "n_layer", "n_head", "n_embd", "n_kv_head", "rope_theta",
                "mp_blend")
        same = all(getattr(self, f.name) == f.default for f in fields(self) if f.name not in free)
        return same and self.kv_heads == self.n_head


# the OpenAI releases, as HF names them
PRETRAINED = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class KVCache:
    """Keys and values of every layer for positions [0, pos), preallocated up to `max_len`."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.n_embd // config.n_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.pos = 0  # number of positions already stored (advanced by GPT.hidden after all layers ran)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v (B, H, t, D) and return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ---------------------------------------------------------------------- attention


def attention(q, k, v, start: int = 0, window: int = 0, sinks: torch.Tensor | None = None):
    """Causal attention of queries (B, H, Tq, D) at positions start.. to keys/values (B, Hkv, Tk, D) at 0..Tk-1.
    window > 0: a query sees only the last `window` positions (itself included). sinks (H,): a learned logit
    per head added to the softmax denominator (its value vector is zero), so a head can put weight nowhere."""
    gqa = q.size(1) != k.size(1)
    if not window and sinks is None:  # plain causal attention: flash attention on GPU
        # a prefill (start 0) is the usual causal square; a decode step (one query) sees every cached key
        assert start == 0 or q.size(2) == 1, "KV cache supports a prefill then one token at a time"
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1, enable_gqa=gqa)
    if q.is_cuda and start == 0:  # (fp32 norms under autocast may have promoted q, k: FlexAttention wants one dtype)
        return flex_attend(q.to(v.dtype), k.to(v.dtype), v, window, sinks)
    # CPU/MPS (FlexAttention has no backward there) and KV-cache steps: the scores written out
    if gqa:
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)).float() * q.size(-1) ** -0.5
    qpos = torch.arange(start, start + q.size(2), device=q.device)[:, None]
    kpos = torch.arange(k.size(2), device=q.device)[None, :]
    visible = (kpos <= qpos) & ((qpos - kpos < window) if window else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.float().view(1, -1, 1, 1))
    return torch.exp(scores - lse).to(v.dtype) @ v


def flex_attend(q, k, v, window: int, sinks: torch.Tensor | None):
    """The fused GPU path for windows and sinks: FlexAttention skips the blocks the window masks out, and
    sinks need no kernel of their own: with Z = exp(lse) the kernel's softmax normalizer,
    softmax-with-sink = softmax * Z / (Z + exp(sink)) = softmax * sigmoid(lse - sink)."""
    from torch.nn.attention import flex_attention as fa

    def visible(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        return causal & (q_idx - kv_idx < window) if window else causal

    T, gqa = q.size(2), q.size(1) != k.size(1)
    block_mask = fa.create_block_mask(visible, None, None, T, T, device=q.device)
    if sinks is None:
        return fa.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    y, aux = fa.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa, return_aux=fa.AuxRequest(lse=True))
    return y * torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1)).unsqueeze(-1).to(y.dtype)


def rope_tables(config: GPTConfig, start: int, T: int, device):
    """cos, sin (T, head_dim / 2) of the rotation angles pos * theta^(-2i / head_dim) for positions start.."""
    head_dim = config.n_embd // config.n_head
    inv_freq = config.rope_theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(start, start + T, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + D/2]) of x (B, H, T, D) by its position's angle (the GPT-NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.mode == "hypersphere":  # hidden states are kept on the unit sphere by the residual update itself
        return nn.Identity()
    if config.mode == "edm2":  # unit RMS, nothing learned: a gain here would undo magnitude preservation
        return nn.RMSNorm(config.n_embd, eps=1e-5, elementwise_affine=False)
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


# ---------------------------------------------------------------------- weight-constrained modes


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x scaled to unit L2 norm along dim."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-6)


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


def linear(config: GPTConfig, in_features: int, out_features: int, into_embedding: bool = False) -> nn.Linear:
    if config.mode == "gpt2":
        return nn.Linear(in_features, out_features, bias=config.bias)
    # nGPT normalizes every matrix along the embedding dimension: the input side, or the output side
    return ConstrainedLinear(in_features, out_features, 0 if into_embedding and config.mode == "hypersphere" else 1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, config.n_head, config.kv_heads
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = linear(config, config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim)
        self.c_proj = linear(config, config.n_embd, config.n_embd, into_embedding=True)
        self.c_proj.residual_out = True  # scaled (or zeroed) at init, see GPT._init_weights
        self.mode, self.qk_norm = config.mode, config.qk_norm
        if self.mode == "hypersphere":  # nGPT: unit q, k per head, rescaled by a learned s_qk per head and dimension
            # effective init 1; 1-D, so neither weight decay nor Muon touch it
            self.s_qk = nn.Parameter(torch.full((config.n_embd,), config.n_embd**-0.5))
            self.s_qk_scale = math.sqrt(config.n_embd)
        self.window = config.window if layer % 2 == 0 else 0
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if config.sinks else None

    def forward(self, x, rope=None, cache: KVCache | None = None):
        B, T, C = x.shape
        sizes = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(sizes, dim=2))
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.mode == "hypersphere":
            # nGPT scales q and k by s_qk: (s * q) . (s * k) = (s^2 * q) . k, so q alone carries s^2 (which also
            # serves grouped-query attention); and sqrt(d) instead of 1/sqrt(d) for unit vectors: q gets d
            s_qk = (self.s_qk * self.s_qk_scale).view(self.n_head, 1, self.head_dim)
            q, k = unit(q) * s_qk.square() * self.head_dim, unit(k)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)
        y = attention(q, k, v, start, self.window, self.sinks).transpose(1, 2).contiguous().view(B, T, C)
        if self.mode == "edm2":  # a softmax average of unit-variance values has less than unit variance
            y = F.rms_norm(y, (C,), eps=1e-5)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind, self.mode = config.mlp, config.mode
        hidden = 4 * config.n_embd
        if self.kind == "swiglu":  # three matrices instead of two: 8/3 the width keeps the parameter count
            hidden = round(8 * config.n_embd / 3 / 8) * 8
        self.c_fc = linear(config, config.n_embd, (2 if self.kind == "swiglu" else 1) * hidden)
        self.c_proj = linear(config, hidden, config.n_embd, into_embedding=True)
        self.c_proj.residual_out = True
        if self.mode == "edm2":  # the activation divided by its RMS on unit Gaussians keeps unit variance
            # (swiglu: silu(gate) times an independent unit-variance `up` has the RMS of silu alone)
            self.gain = unit_rms_gain(F.silu if self.kind == "swiglu" else self.activation)
        # nGPT: unit-sphere dot products are small; a learned scale, times sqrt(C) (which swiglu's `up` half gets
        # too: a constant factor on the block's output, which the residual update normalizes away)
        if self.mode == "hypersphere":
            self.s_fc = nn.Parameter(torch.ones(self.c_fc.out_features))
            self.s_scale = math.sqrt(config.n_embd)

    def activation(self, h):
        if self.kind == "gelu":
            return F.gelu(h, approximate="tanh")
        if self.kind == "relu2":
            return F.relu(h).square()
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x):
        h = self.c_fc(x)
        if self.mode == "hypersphere":
            h = h * (self.s_fc * self.s_scale)
        h = self.activation(h)
        if self.mode == "edm2":
            h = h * self.gain
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.mode, self.mp_blend = config.mode, config.mp_blend
        if self.mode == "hypersphere":  # nGPT's eigen learning rates: how far each step moves toward the block's output
            self.alpha_attn = nn.Parameter(torch.full((config.n_embd,), config.n_embd**-0.5))
            self.alpha_mlp = nn.Parameter(torch.full((config.n_embd,), config.n_embd**-0.5))
            self.alpha_scale = 0.05 * math.sqrt(config.n_embd)  # effective alpha 0.05 at init

    def forward(self, x, rope=None, cache=None):
        x = self.residual(x, self.attn(self.ln_1(x), rope, cache), "alpha_attn")
        return self.residual(x, self.mlp(self.ln_2(x)), "alpha_mlp")

    def residual(self, x, y, alpha: str):
        if self.mode == "edm2":
            return mp_sum(x, y, self.mp_blend)
        if self.mode == "hypersphere":  # a step along the sphere from x toward the block's (unit) output
            return unit(x + getattr(self, alpha) * self.alpha_scale * (unit(y) - x))
        return x + y


class GPT(nn.Module):
    loss_chunk_elements = 2**24  # logits per chunk of the training loss (64 MB in fp32); 0: no chunking

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd)))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.h = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.transformer.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_head:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        # the constrained modes' logits are dot products with unit vectors: a learned scale sets their range
        if config.mode == "edm2":
            self.logit_gain = nn.Parameter(torch.ones(()))
        # nGPT stores its scales (s_z here, s_qk and alpha in the blocks) divided by sqrt(C) and multiplies them back,
        # so the optimizer moves them sqrt(C) times faster than a plain parameter. s_z, one per token: nGPT starts
        # it at 1, which keeps the initial logits within +-1 (cosines) and spends the first hundreds of steps
        # growing it; sqrt(C) gives unit-variance logits at init, as in the other modes.
        if config.mode == "hypersphere":
            self.logit_scale = nn.Parameter(torch.ones(config.padded_vocab_size))
        self.apply(self._init_weights)
        self.project_weights()

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) everywhere; projections that write into the residual stream are scaled by
        # 1/sqrt(2 * n_layer) so that the stream's variance does not grow with depth (two per block).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_out", False):
                std = 0.0 if self.config.zero_init else std / math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def constrained_weights(self) -> list[nn.Parameter]:
        """The matrices that edm2/hypersphere keep normalized (no weight decay for them); none in gpt2 mode."""
        if self.config.mode == "gpt2":
            return []
        return self._tables() + [m.weight for m in self.modules() if isinstance(m, ConstrainedLinear)]

    def _tables(self) -> list[nn.Parameter]:
        """Token (and position) embeddings and the head: in the constrained modes, unit rows along C."""
        tables = [self.transformer.wte.weight, self.lm_head.weight]
        tables += [self.transformer.wpe.weight] if "wpe" in self.transformer else []
        return list({id(p): p for p in tables}.values())  # a tied head once

    @torch.no_grad()
    def project_weights(self):
        """Put every constrained weight back on its sphere; the training loop calls this after each step."""
        if self.config.mode == "gpt2":
            return
        for m in self.modules():
            if isinstance(m, ConstrainedLinear):
                m.project()
        for table in self._tables():
            table.copy_(unit(table))

    def num_params(self) -> int:
        """Parameter count, tied weights once."""
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx, cache: KVCache | None = None):
        """Final-norm hidden states (B, T, n_embd) for token ids idx (B, T)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        x, rope = self.embed(idx, start), None
        if self.config.pos == "rope":
            rope = rope_tables(self.config, start, T, idx.device)
        for block in self.transformer.h:
            x = block(x, rope, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def embed(self, idx, start: int):
        mode, C = self.config.mode, self.config.n_embd
        x = self.transformer.wte(idx)
        if mode != "gpt2":  # unit rows; edm2 wants unit RMS (norm sqrt(C)), hypersphere unit norm
            x = unit(x) * (math.sqrt(C) if mode == "edm2" else 1.0)
        if self.config.pos != "learned":
            return x
        p = self.transformer.wpe(torch.arange(start, start + idx.size(1), dtype=torch.long, device=idx.device))
        if mode == "edm2":
            return mp_sum(x, unit(p) * math.sqrt(C), 0.5)
        if mode == "hypersphere":
            return unit(x + unit(p))
        return x + p

    def head_weight(self) -> torch.Tensor:
        """The (vocab, C) matrix the logits are computed with: the head, or in the constrained modes its
        normalized rows times the learned logit scale (one tensor, shared by both loss paths)."""
        w = self.lm_head.weight
        if self.config.mode == "edm2":
            return unit(w) * self.logit_gain
        if self.config.mode == "hypersphere":
            return unit(w) * (self.logit_scale * math.sqrt(self.config.n_embd))[:, None]
        return w

    def logits(self, h):
        """LM-head logits; padded vocabulary ids get -inf so they carry exactly zero probability."""
        logits = F.linear(h, self.head_weight())
        if self.config.softcap:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if self.config.padded_vocab_size > self.config.vocab_size:
            logits[..., self.config.vocab_size :] = float("-inf")
        return logits

    def forward(self, idx, targets=None, return_logits: bool = True):
        """Returns (logits, loss). With return_logits=False (training) only the mean loss is computed and,
        if loss_chunk_elements > 0, chunk by chunk, so the full (B*T, vocab) logits and their gradient are
        never held in memory (the fastest way on CPU; on CUDA a compiled full-logits loss is faster)."""
        h = self.hidden(idx)
        if not return_logits and self.loss_chunk_elements > 0:
            assert targets is not None, "return_logits=False needs targets"
            c = self.config
            args = (h.flatten(0, 1), self.head_weight(), targets.flatten(), c.vocab_size, c.softcap)
            chunk_rows = max(1, self.loss_chunk_elements // c.padded_vocab_size)
            if torch.is_grad_enabled():
                return None, ChunkedLMHeadLoss.apply(*args, chunk_rows)
            return None, chunked_cross_entropy(*args, chunk_rows, with_grad=False)[0]
        logits = self.logits(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return (logits if return_logits else None), loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, generator=None):
        """Extend idx (B, T) by max_new_tokens tokens. temperature 0 is greedy. The prompt is run once
        (prefill) and each new token costs a single position thanks to the KV cache."""
        B, T = idx.shape
        cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.lm_head.weight.dtype)
        if torch.is_autocast_enabled(idx.device.type):
            cache.k, cache.v = (t.to(torch.get_autocast_dtype(idx.device.type)) for t in (cache.k, cache.v))
        out, step_input = idx, idx
        for _ in range(max_new_tokens):
            logits = self.logits(self.hidden(step_input, cache)[:, -1, :]).float()
            step_input = sample_next(logits, temperature, top_k, generator)
            out = torch.cat((out, step_input), dim=1)
        return out

    # ------------------------------------------------------------------ optimization and FLOPs

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside the blocks (what Muon optimizes); not the embeddings/head, biases or norms."""
        return [p for p in self.transformer.h.parameters() if p.dim() == 2]

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas, eps: float, device_type: str,
                             exclude=()):
        """AdamW with weight decay on unconstrained matrices (incl. the embedding) only; fused kernel where available.
        Parameters in `exclude` are left out (another optimizer owns them)."""
        skip = {id(p) for p in exclude}
        constrained = {id(p) for p in self.constrained_weights()}  # normalized anyway: decay would do nothing useful
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in skip]
        decays = [p.dim() >= 2 and id(p) not in constrained for p in params]
        groups = [{"params": [p for p, d in zip(params, decays) if d], "weight_decay": weight_decay},
                  {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, the usual 6N + 12*L*C*T: 2 (multiply-add) x 3 (forward, and backward
        for inputs and weights) per matmul weight, plus attention scores and values (counted un-masked).
        N counts matmul weights only: the position table (and an untied token table), biases and norms do no
        matmul. Sliding windows skip some attention work that this count (like MFU conventions) still includes."""
        c = self.config
        lookups = [m.weight.numel() for name, m in self.transformer.items()
                   if name == "wpe" or (name == "wte" and not c.tie_head)]
        n_matmul = sum(p.numel() for p in self.parameters() if p.dim() >= 2) - sum(lookups)
        return 6 * n_matmul + 12 * c.n_layer * c.n_embd * seq_len

    # ------------------------------------------------------------------ HF-layout weights

    @classmethod
    def from_pretrained(cls, name_or_dir: str, vocab_multiple: int = 1) -> "GPT":
        """OpenAI GPT-2 weights in the HF layout: a directory written by transformers' save_pretrained
        (or by export_hf), or a hub name such as 'gpt2' (needs transformers and internet)."""
        if os.path.isdir(name_or_dir):
            with open(os.path.join(name_or_dir, "config.json")) as f:
                hf = json.load(f)
            sd = _read_hf_state_dict(name_or_dir)
        else:
            if name_or_dir not in PRETRAINED:
                raise ValueError(f"{name_or_dir!r} is neither a directory nor one of {sorted(PRETRAINED)}")
            from transformers import GPT2LMHeadModel  # optional dependency, only for hub downloads

            hf_model = GPT2LMHeadModel.from_pretrained(name_or_dir)
            hf, sd = hf_model.config.to_dict(), hf_model.state_dict()
        config = GPTConfig(
            block_size=hf["n_positions"], vocab_size=hf["vocab_size"], vocab_multiple=vocab_multiple,
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
        )
        model = cls(config)
        model.load_hf_state_dict(sd)
        return model

    def load_hf_state_dict(self, sd: dict):
        ours = self.state_dict()
        for key, value in sd.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers of old HF versions; the head is tied to wte
            if key not in ours:
                raise KeyError(f"unexpected key in GPT-2 checkpoint: {key}")
            value = value.t() if key.endswith(_CONV1D) else value
            target = ours[key]
            if key == "transformer.wte.weight":  # padded rows stay zero: they are never predicted
                target = target[: value.shape[0]]
                ours[key][value.shape[0] :].zero_()
            if target.shape != value.shape:
                raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(value)

    def export_hf(self, out_dir: str):
        """Write config.json + model.safetensors that transformers.GPT2LMHeadModel.from_pretrained reads."""
        c = self.config
        if not c.is_gpt2:
            raise ValueError("only the plain GPT-2 architecture has an HF GPT-2 layout; this model has switches on")
        sd = {}
        for key, value in self.state_dict().items():
            if key == "lm_head.weight":
                continue
            value = value.detach().float().cpu()
            if key == "transformer.wte.weight":
                value = value[: c.vocab_size]
            sd[key] = (value.t() if key.endswith(_CONV1D) else value).contiguous()
        hf_config = {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
            "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_inner": None,
            "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256,
        }
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        _write_safetensors(sd, os.path.join(out_dir, "model.safetensors"))


def sample_next(logits, temperature: float, top_k: int | None, generator=None):
    """Next token ids (B, 1) from last-position logits (B, V): greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def chunked_cross_entropy(h, weight, targets, vocab: int, softcap: float, chunk_rows: int, with_grad: bool):
    """Mean cross-entropy of logits h @ weight.T (soft-capped if softcap > 0; only the first `vocab` columns
    can be predicted), computed chunk_rows rows at a time. With with_grad, also returns d(loss)/dh and
    d(loss)/dweight, computed right there from the chunk's softmax, so no (N, vocab) tensor ever exists."""
    n = h.shape[0]
    loss = torch.zeros((), device=h.device, dtype=torch.float32)
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
    # cast once for all chunks (autocast would cast the whole weight again for every matmul)
    autocast = torch.is_autocast_enabled(h.device.type)
    dtype = torch.get_autocast_dtype(h.device.type) if autocast else h.dtype
    h_, w_ = h.to(dtype), weight.to(dtype)
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, n, chunk_rows):
            hc, tc = h_[s : s + chunk_rows], targets[s : s + chunk_rows]
            logits = hc @ w_.t()
            if softcap:
                tanh = torch.tanh(logits.float() / softcap)
                logits = softcap * tanh
            logits[:, vocab:] = float("-inf")
            probs = torch.softmax(logits, dim=1)  # computed in fp32, stored in the logits' dtype
            nll = -probs.gather(1, tc[:, None]).squeeze(1).float().log()
            underflow = torch.isinf(nll)  # a target ~88+ nats below the top logit: p underflowed, recompute exactly
            if underflow.any():
                rows = logits[underflow].float()
                nll[underflow] = rows.logsumexp(1) - rows.gather(1, tc[underflow][:, None]).squeeze(1)
            loss += nll.sum()
            if with_grad:  # d(mean CE)/d(logits) = (softmax - onehot) / n, times tanh' = 1 - tanh^2 if capped
                probs[torch.arange(len(tc), device=tc.device), tc] -= 1.0
                if softcap:
                    probs = (probs * (1 - tanh.square())).to(dtype)
                grad_h[s : s + chunk_rows] = (probs @ w_) / n
                grad_w += (probs.t() @ hc) / n
    return loss / n, grad_h, grad_w


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Autograd wrapper of chunked_cross_entropy: the gradients come out of the forward pass and the
    backward only scales them. A small GPT's step is dominated by the vocab-sized logits; this keeps one
    chunk of them alive at a time and never stores them for autograd."""

    @staticmethod
    def forward(ctx, h, weight, targets, vocab, softcap, chunk_rows):
        loss, grad_h, grad_w = chunked_cross_entropy(h, weight, targets, vocab, softcap, chunk_rows, with_grad=True)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None, None


# ---------------------------------------------------------------------- HF layout helpers

# HF's GPT-2 stores these linear layers as Conv1D, weight (in, out): transposed relative to nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _read_hf_state_dict(path: str) -> dict:
    st = os.path.join(path, "model.safetensors")
    if os.path.exists(st):
        return _read_safetensors(st)
    return torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)


def _read_safetensors(path: str) -> dict:
    """Minimal reader of the safetensors format (8-byte header size, JSON header, raw little-endian data),
    so loading HF weights needs no package beyond torch."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        data = bytearray(f.read())
    sd = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES[info["dtype"]]
        buf = data[start:end]
        sd[key] = torch.frombuffer(buf, dtype=dtype).reshape(info["shape"]).clone() if buf else torch.empty(info["shape"], dtype=dtype)
    return sd


def _write_safetensors(sd: dict, path: str):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for key, t in sd.items():
        blob = t.numpy().tobytes()
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # align the data section
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)
