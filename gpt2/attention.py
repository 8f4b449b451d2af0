"""The attention machinery behind model.CausalSelfAttention: causal attention with the optional sliding window,
sinks and document mask, dispatched to SDPA (flash attention), FlexAttention (compiled, CUDA) or the scores
written out (CPU, KV-cache steps); the per-forward mask that every layer shares; YaRN's rotary frequencies.

Imports only torch: model.py imports this module, so it takes plain values, never a GPTConfig.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EOT = 50256  # <|endoftext|>: fineweb_edu.py puts one before every document
FLEX_DEVICES = ("cuda",)  # where FlexAttention runs: it has fused kernels and a backward there only


def flex_runs(device: torch.device, start: int) -> bool:
    """FlexAttention runs only inside torch.compile: eager, it writes out the full scores, slower than SDPA's mask."""
    return device.type in FLEX_DEVICES and start == 0 and torch.compiler.is_compiling()


def attention(q, k, v, start: int = 0, window: int = 0, sinks: torch.Tensor | None = None,
              docs: torch.Tensor | None = None, block_mask=None):
    """Causal attention of queries (B, H, Tq, D) at positions start.. to keys/values (B, Hkv, Tk, D) at 0..Tk-1.
    window > 0: a query sees only the last `window` positions (itself included). sinks (H,): a learned logit
    per head added to the softmax denominator (its value vector is zero), so a head can put weight nowhere.
    docs (B, Tk): the document id of every position; a query sees only the keys of its own document.
    block_mask: FlexAttention's mask of this window and docs, built once per forward (GPT.hidden), else here."""
    gqa = q.size(1) != k.size(1)
    if not window and sinks is None and docs is None:  # plain causal attention: flash attention on GPU
        # a prefill (start 0) is the usual causal square; a decode step (one query) sees every cached key
        assert start == 0 or q.size(2) == 1, "KV cache supports a prefill then one token at a time"
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1, enable_gqa=gqa)
    if flex_runs(q.device, start):  # (fp32 norms under autocast may have promoted q, k)
        return flex_attend(q.to(v.dtype), k.to(v.dtype), v, window, sinks, docs, block_mask)
    # CPU/MPS (FlexAttention has no backward there), KV-cache steps and eager CUDA calls (HellaSwag, sampling)
    visible = visible_keys(q.size(2), k.size(2), start, window, docs, q.device)
    if docs is not None and sinks is None:  # a boolean mask in SDPA: several times faster on CPU than written out
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)
    if gqa:  # the scores written out
        k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)).float() * q.size(-1) ** -0.5
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)
    if sinks is not None:
        lse = torch.logaddexp(lse, sinks.float().view(1, -1, 1, 1))
    return torch.exp(scores - lse).to(v.dtype) @ v


def visible_keys(Tq: int, Tk: int, start: int, window: int, docs: torch.Tensor | None, device):
    """Which keys 0..Tk-1 each query at start.. sees: (Tq, Tk), or (B, 1, Tq, Tk) with document ids docs (B, Tk)."""
    qpos = torch.arange(start, start + Tq, device=device)[:, None]
    kpos = torch.arange(Tk, device=device)[None, :]
    visible = (kpos <= qpos) & ((qpos - kpos < window) if window else True)
    if docs is not None:
        visible = visible & (docs[:, None, start : start + Tq, None] == docs[:, None, None, :])
    return visible


def flex_block_mask(window: int, docs: torch.Tensor | None, T: int, device):
    """FlexAttention's block mask for T causal positions, within `window` (0: all) and, with document ids docs
    (B, T), within each query's document. GPT.hidden builds one per forward and window, shared by the layers."""
    from torch.nn.attention import flex_attention as fa

    def visible(b, h, q_idx, kv_idx):
        seen = q_idx >= kv_idx
        if window:
            seen = seen & (q_idx - kv_idx < window)
        if docs is not None:
            seen = seen & (docs[b, q_idx] == docs[b, kv_idx])
        return seen

    return fa.create_block_mask(visible, None if docs is None else docs.size(0), None, T, T, device=device)


def flex_attend(q, k, v, window: int, sinks: torch.Tensor | None, docs: torch.Tensor | None = None,
                block_mask=None):
    """The fused GPU path for masks and sinks: FlexAttention skips the blocks the mask hides, and
    sinks need no kernel of their own: with Z = exp(lse) the kernel's softmax normalizer,
    softmax-with-sink = softmax * Z / (Z + exp(sink)) = softmax * sigmoid(lse - sink)."""
    from torch.nn.attention import flex_attention as fa

    if block_mask is None:
        block_mask = flex_block_mask(window, docs, q.size(2), q.device)
    gqa = q.size(1) != k.size(1)
    if sinks is None:
        return fa.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    y, aux = fa.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa, return_aux=fa.AuxRequest(lse=True))
    return y * torch.sigmoid(aux.lse - sinks.float().view(1, -1, 1)).unsqueeze(-1).to(y.dtype)


@dataclass
class AttentionMask:
    """What every layer's attention shares in one forward, built once by attention_mask in GPT.hidden."""

    docs: torch.Tensor | None  # (B, Tk) document id of every position, cached ones included; None: no doc_mask
    block_masks: dict  # window -> FlexAttention block mask, for a prefill where FlexAttention runs


def attention_mask(idx, cache, windows: set[int], doc_mask: bool, sinks: bool) -> AttentionMask | None:
    """doc_mask's document ids of idx (B, T) (a document starts at the row's start and at each <|endoftext|>,
    which belongs to the document it opens; cache: model.KVCache, which keeps the ids of the cached positions) and,
    where FlexAttention will run, a block mask per distinct window of the layers (sinks: the layers have sinks);
    None when plain causal attention needs neither."""
    start = cache.pos if cache is not None else 0
    docs = None
    if doc_mask:
        docs = (idx == EOT).cumsum(1)
        docs = cache.update_docs(docs) if cache is not None else docs
    block_masks = {}
    if flex_runs(idx.device, start):
        flex = [w for w in windows if w or sinks or docs is not None]  # the layers that leave SDPA
        block_masks = {w: flex_block_mask(w, docs, idx.size(1), idx.device) for w in flex}
    return AttentionMask(docs, block_masks) if docs is not None or block_masks else None


def yarn(inv_freq: torch.Tensor, theta: float, factor: float, beta_fast: float, beta_slow: float,
         original_context: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models"), in gpt-oss's
    form (RotaryEmbedding._compute_concentration_and_inv_freq): NTK-by-parts frequencies and the concentration.
    Pair i turns L / (2 pi theta^(2i/D)) times over the original context L. A pair that turns more than beta_fast
    times saw every angle in training, so it keeps its frequency (extrapolation); one that turns less than
    beta_slow times saw part of the circle only, so its frequency is divided by factor (interpolation: factor * L
    positions map onto the angles of L); a ramp, linear in i, blends the two in between. The concentration
    0.1 ln(factor) + 1 scales q and k (so the logits by its square): longer contexts flatten the softmax, this
    sharpens it back."""
    half = inv_freq.numel()
    # the pair index at which the rotations over L equal beta: L / (2 pi theta^(2i/D)) = beta
    fast, slow = (half * math.log(original_context / (beta * 2 * math.pi)) / math.log(theta)
                  for beta in (beta_fast, beta_slow))
    ramp = ((torch.arange(half, device=inv_freq.device, dtype=torch.float32) - fast) / (slow - fast)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), 0.1 * math.log(factor) + 1
