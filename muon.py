"""Muon: momentum, then an approximately orthogonalized update, for the 2-D hidden matrices of the model.

The update of a weight matrix is its Nesterov momentum with every singular value pushed towards 1, by five
steps of a quintic Newton-Schulz iteration (coefficients 3.4445, -4.7750, 2.0315, which trade exactness
for speed: singular values land in roughly [0.7, 1.2]). Under DDP the gradients are already averaged, so
every rank keeps all momentum buffers (cheap, and rank 0's checkpoint is complete) but orthogonalizes
only its share of the matrices; the owners then broadcast the updates.

fixed_norm (MuonH, "hyperball"): after each update every matrix is scaled back to the Frobenius norm it had
before its first step, so the weights move on a sphere and the update size stays relative to the weight.
"""

import torch
import torch.distributed as dist

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton-Schulz iteration towards U V^T of g = U S V^T (in bf16, like the matmuls it replaces)."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5,
                 fixed_norm: bool = False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps, fixed_norm=fixed_norm)
        super().__init__(params, defaults)
        if any(p.dim() != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon takes 2-D weight matrices only; give embeddings, biases and norms to AdamW")

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for i, p in enumerate(params):
                state = self.state[p]
                buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                if group["fixed_norm"] and "norm" not in state:
                    state["norm"] = p.norm()
                buf.mul_(group["momentum"]).add_(p.grad)
                nesterov = p.grad.add(buf, alpha=group["momentum"])
                # each matrix is orthogonalized by one rank only; the others get the result below
                updates.append(orthogonalize(nesterov, group["ns_steps"]) if i % world == rank else torch.empty_like(p))
            for i, (p, update) in enumerate(zip(params, updates)):
                if distributed:
                    dist.broadcast(update, src=i % world)
                rows, cols = p.shape
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)
                if group["fixed_norm"]:
                    p.mul_(self.state[p]["norm"] / p.norm())
