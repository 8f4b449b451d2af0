"""The LM-head losses that never hold the whole batch's logits, for model.GPT.forward's training loss
(return_logits=False): the chunked loss, the mean cross-entropy of h @ weight.T computed a chunk of rows at a time,
its gradient taken inside the same pass; and on CUDA, where `uv sync --extra gpu` installed Liger-Kernel, its fused
linear + cross-entropy (fused_wanted, fused_loss) in place of the full-logits loss. GPT2_FUSED_LOSS=0 turns that off.

Imports only torch: model.py imports this module, and Liger is imported on CUDA only, on first use.
"""

import functools
import os

import torch

FUSED_ENV = "GPT2_FUSED_LOSS"  # "0": never take Liger's fused loss (the full-logits loss instead)


def on_cuda_machines(decorator):
    """decorator where CUDA is available, else none: the fused loss only runs on CUDA, and torch.compiler's
    decorators import torch._dynamo, which would cost every process on a CPU machine seconds."""
    return decorator if torch.cuda.is_available() else lambda fn: fn


@functools.cache
def liger_loss_fn():
    """Liger-Kernel's liger_fused_linear_cross_entropy, or None where the package does not import."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


# compiled: decided once, when the graph is traced, and never traced into (an import that fails breaks the graph)
@on_cuda_machines(torch.compiler.assume_constant_result)
def fused_wanted(device_type: str) -> bool:
    """Whether the full-logits training loss is replaced by fused_loss: on CUDA, where Liger-Kernel imports and
    GPT2_FUSED_LOSS is not 0. Anywhere else nothing is imported, so the CPU path never changes."""
    return device_type == "cuda" and os.environ.get(FUSED_ENV, "1") != "0" and liger_loss_fn() is not None


@on_cuda_machines(torch.compiler.disable)  # Liger's host-side loop over chunks (it reads .item()) runs eagerly
def fused_loss(h, weight, targets, vocab: int, softcap: float):
    """Mean cross-entropy of h @ weight.T through Liger-Kernel's fused linear + cross-entropy, which computes the
    gradients a chunk of rows at a time in its forward pass, so the (rows, vocab) logits never exist at once.
    Only the first `vocab` rows of weight go in: the padded ids can never be predicted (the -inf of the other
    paths), and their rows get a zero gradient. softcap > 0 caps the logits inside Liger's kernel."""
    weight = weight[:vocab]
    if torch.is_autocast_enabled(h.device.type):  # cast once here, not in each chunk's matmuls
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    # accum_dtype: the weight's gradient summed over the chunks in fp32 (Liger >= 0.6.2)
    return liger_loss_fn()(h, weight, targets, softcap=softcap or None, accum_dtype=torch.float32)


def chunked_loss(h, weight, targets, vocab: int, softcap: float, chunk_rows: int):
    """The mean loss of chunked_cross_entropy; differentiable (ChunkedLMHeadLoss) when grad is enabled."""
    if torch.is_grad_enabled():
        return ChunkedLMHeadLoss.apply(h, weight, targets, vocab, softcap, chunk_rows)
    return chunked_cross_entropy(h, weight, targets, vocab, softcap, chunk_rows, with_grad=False)[0]


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
