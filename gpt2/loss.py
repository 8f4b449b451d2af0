"""The chunked LM-head loss: the mean cross-entropy of h @ weight.T computed a chunk of rows at a time, its
gradient taken inside the same pass, so the (rows, vocab) logits of the whole batch never exist at once.
model.GPT.forward uses it for the training loss (return_logits=False).

Imports only torch: model.py imports this module.
"""

import torch


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
