"""Muon: momentum, then an approximately orthogonalized update, for the 2-D hidden matrices of the model.

The update of a weight matrix is its Nesterov momentum with every singular value pushed towards 1 by a few
odd-polynomial steps, in bf16: `ns5`, Keller Jordan's quintic Newton-Schulz (the same coefficients every step,
which trade exactness for speed: singular values land in roughly [0.7, 1.2]), or `polar`, Polar Express (one
minimax-optimal quintic per step, closer to 1 with the same five steps). Each update is scaled by
sqrt(max(1, rows / cols)): a tall block then has the update RMS of a square one with as many columns.

Switches, all off by default:
- row_splits: a fused matrix (attention's [q; k; v], SwiGLU's [gate; up]) is orthogonalized block by block,
  so each block gets the update size of a matrix of its own (fused_row_splits finds them in a GPT).
- weight_decay: decoupled, scaled by the same lr as the update; cautious_wd: only where update and weight
  have the same sign (the decay then never fights the update).
- normuon: NorMuon's per-row (or per-column) second-moment normalization of the orthogonalized update.
- fixed_norm (MuonH, "hyperball"): after each update every matrix is scaled back to the Frobenius norm it had
  before its first step, so the weights move on a sphere and the update size stays relative to the weight.
- manifold.ManifoldMuon (manifold Muon) replaces update_blocks: every matrix stays on the Stiefel manifold.

Under DDP the gradients are already averaged, so every rank keeps all momentum buffers (cheap, and rank 0's
checkpoint is complete). The blocks are stacked by shape; each rank orthogonalizes its share of every stack
and one all_gather per shape (in bf16, the iteration's own precision: nothing is rounded) shares the results,
so the collectives per step are the number of distinct shapes, not of matrices (map_stacks; manifold Muon's
steps are shared the same way, in fp32).
"""

import torch
import torch.distributed as dist

from model import GATED

NS5 = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932, computed for 5 steps with safety factor
# 2e-2 and cushion 2; the values modded-nanogpt and nanochat use)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# method -> (coefficients per step, Frobenius-norm inflation before the first step). Polar Express's first
# polynomial assumes a spectral norm safely below 1; modded-nanogpt divides by 1.02 times the norm.
NS_METHODS = {"ns5": ((NS5,) * 5, 1.0), "polar": (POLAR_EXPRESS, 1.02)}


def orthogonalize(g: torch.Tensor, steps: int = 5, method: str = "ns5") -> torch.Tensor:
    """Odd-polynomial iteration towards U V^T of g = U S V^T, for one matrix or a stack (..., rows, cols); in bf16,
    like the matmuls it replaces."""
    coefficients, inflation = NS_METHODS[method]
    if method == "ns5":
        coefficients = (NS5,) * steps
    elif steps > len(coefficients):
        raise ValueError(f"{method} has coefficients for {len(coefficients)} steps, not {steps}")
    x = g.bfloat16()
    wide = x.size(-2) <= x.size(-1)
    x = x if wide else x.mT  # iterate on the smaller Gram matrix
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * inflation + 1e-7)  # spectral <= Frobenius norm: inside the basin
    for a, b, c in coefficients[:steps]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.mT).to(g.dtype)


def map_stacks(fn, matrices: list[tuple[torch.Tensor, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    """fn of every stack of same-shape inputs: matrices[i] holds matrix i's inputs (each of its shape), fn takes
    one stack per input and returns the stack of results, in dtype. Under DDP each rank takes its share of every
    stack and one all_gather per shape gives every rank all results."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    by_shape: dict[tuple, list[int]] = {}
    for i, inputs in enumerate(matrices):  # first-seen order: the same on every rank
        by_shape.setdefault(tuple(inputs[0].shape), []).append(i)
    results = [None] * len(matrices)
    for shape, indices in by_shape.items():
        stacks = [torch.stack([matrices[i][k] for i in indices]).to(dtype) for k in range(len(matrices[indices[0]]))]
        if distributed:
            share = -(-len(indices) // world)  # zero padding fills the last ranks' shares
            stacks = [torch.cat([s, s.new_zeros(share * world - len(indices), *shape)]) for s in stacks]
            out = stacks[0].new_empty(stacks[0].shape)
            dist.all_gather_into_tensor(out, fn(*(s[rank * share : (rank + 1) * share] for s in stacks)).to(dtype))
            stack = out
        else:
            stack = fn(*stacks).to(dtype)
        for k, i in enumerate(indices):
            results[i] = stack[k]
    return results


def orthogonalize_all(matrices: list[torch.Tensor], steps: int, method: str) -> list[torch.Tensor]:
    """orthogonalize() of every matrix, in bf16 (the iteration's own precision: gathering loses nothing)."""
    return map_stacks(lambda stack: orthogonalize(stack, steps, method), [(m,) for m in matrices], torch.bfloat16)


def normuon(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (arXiv 2510.05491) as modded-nanogpt has it: an EMA of the update's mean square along its shorter
    side (one value per row of a tall or square block, per column of a wide one) divides the update, which is
    then scaled back to its own Frobenius norm: the update's shape changes, its size does not."""
    dim = -1 if update.size(-2) >= update.size(-1) else -2
    second_moment.lerp_(update.square().mean(dim, keepdim=True), 1 - beta2)
    scaled = update * second_moment.clamp_min(1e-10).rsqrt()
    return scaled * (update.norm() / scaled.norm().clamp_min(1e-10))


def fused_row_splits(model) -> dict[torch.nn.Parameter, tuple[int, ...]]:
    """The fused matrices of a GPT (model.py) and their row blocks: attention's c_attn = [q; k; v] (rows n_head,
    n_kv_head, n_kv_head times the head size) and, with a gated MLP (swiglu, swiglu-oss), c_fc = [gate; up], the
    dense MLP's and every MoE expert's (gpt2/moe.py: transformer.h.<i>.mlp.experts.<j>.c_fc)."""
    c = model.config
    head_size = c.n_embd // c.n_head
    kv_rows = (c.n_kv_head or c.n_head) * head_size
    splits = {}
    for name, p in model.named_parameters():
        if not name.startswith("transformer.h."):
            continue
        if name.endswith(".attn.c_attn.weight"):
            splits[p] = (c.n_head * head_size, kv_rows, kv_rows)
        elif name.endswith(".c_fc.weight") and ".mlp." in name and c.mlp in GATED:
            splits[p] = (p.shape[0] // 2,) * 2
    return splits


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0, ns_steps: int = 5,
                 fixed_norm: bool = False, ns: str = "ns5", cautious_wd: bool = False, normuon: bool = False,
                 beta2: float = 0.95, row_splits: dict | None = None):
        if ns not in NS_METHODS:
            raise ValueError(f"ns must be one of {sorted(NS_METHODS)}, got {ns!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps, fixed_norm=fixed_norm,
                        ns=ns, cautious_wd=cautious_wd, normuon=normuon, beta2=beta2)
        super().__init__(params, defaults)
        if any(p.dim() != 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon takes 2-D weight matrices only; give embeddings, biases and norms to AdamW")
        self.row_splits = {}  # param -> row-block sizes; structure, not state: rebuilt from the model on resume
        for p, sizes in (row_splits or {}).items():
            if sum(sizes) != p.shape[0]:
                raise ValueError(f"row blocks {sizes} do not add up to the rows of a {tuple(p.shape)} matrix")
            self.row_splits[p] = tuple(sizes)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before a switch existed had it off (the default)
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def row_blocks(self, p) -> list[slice]:
        sizes = self.row_splits.get(p, (p.shape[0],))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [slice(start, start + size) for start, size in zip(starts, sizes)]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            blocks = [(p, j, rows) for p in params for j, rows in enumerate(self.row_blocks(p))]
            nesterov = {p: self.momentum_step(p, group) for p in params}
            self.update_blocks(blocks, [nesterov[p][rows] for p, _, rows in blocks], group)
            if group["fixed_norm"]:
                for p in params:
                    p.mul_(self.state[p]["norm"] / p.norm())

    def update_blocks(self, blocks: list[tuple], momenta: list[torch.Tensor], group):
        """Every block's step from its Nesterov momentum (the seam manifold.ManifoldMuon replaces): orthogonalized,
        then applied."""
        updates = orthogonalize_all(momenta, group["ns_steps"], group["ns"])
        for (p, j, rows), update in zip(blocks, updates):
            self.apply_update(p, j, rows, update, group)

    def momentum_step(self, p, group) -> torch.Tensor:
        state = self.state[p]
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        if group["fixed_norm"] and "norm" not in state:
            state["norm"] = p.norm()
        buf.mul_(group["momentum"]).add_(p.grad)
        return p.grad.add(buf, alpha=group["momentum"])

    def apply_update(self, p, j: int, rows: slice, update: torch.Tensor, group):
        """Block j of p (its rows `rows`, a view): NorMuon, weight decay, then the orthogonalized step."""
        weight, update = p[rows], update.to(p.dtype)
        if group["normuon"]:
            state = self.state[p]
            if "second_moment" not in state:  # per block: one value per row (tall or square) or per column (wide)
                blocks = [p[r] for r in self.row_blocks(p)]
                state["second_moment"] = [torch.zeros(b.size(0), 1, device=p.device) if b.size(0) >= b.size(1)
                                          else torch.zeros(1, b.size(1), device=p.device) for b in blocks]
            update = normuon(update.float(), state["second_moment"][j], group["beta2"]).to(p.dtype)
        lr = group["lr"] * max(1.0, weight.size(0) / weight.size(1)) ** 0.5
        if group["weight_decay"]:
            # nanochat's rule: the decay uses the update's lr (shape scale included), so it follows the schedule;
            # modded-nanogpt multiplies by the lr once more (weight_decay * lr^2)
            decay = weight * (update * weight >= 0) if group["cautious_wd"] else weight
            weight.sub_(decay, alpha=lr * group["weight_decay"])
        weight.add_(update, alpha=-lr)
