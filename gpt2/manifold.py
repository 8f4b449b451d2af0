"""Manifold Muon: Muon's steepest descent under the spectral norm, with every matrix kept on the Stiefel manifold
(all singular values 1), as in Jeremy Bernstein's "Modular Manifolds" (Thinking Machines, 2025).

For a tall block W (m >= n, W^T W = I_n; a wide block is handled transposed) and its momentum G, the step is the
direction A of spectral norm 1 in the tangent space {A : W^T A + A^T W = 0} that best aligns with G, and then
W <- msign(W - lr * A), the polar factor of the moved matrix (the retraction). The tangent condition gets a
symmetric multiplier L: the best A for a given L is msign(G + 2 W L), and the dual problem is to minimize the
nuclear norm ||G + 2 W L||_*, whose gradient in L (symmetrized) is the violation H = W^T A + A^T W. The
multiplier starts at -(W^T G + G^T W) / 4, where G + 2 W L is G's orthogonal projection onto the tangent space,
and takes `iters` gradient steps on that dual with a linearly decaying step, as the reference does.

An A of that form that is tangent is the exact solution (its alignment then equals the dual's value), so the
least violating iterate is kept: more iterations never do worse. With iters = 0 this is the cheap projected
variant: the momentum projected onto the tangent space, orthogonalized, retracted. For a square W the
projection is already exact (W^T G's skew part), and for tall blocks the dual steps take the violation from
~0.2 to below 1e-3 of |A| (tests/test_manifold.py).

The dual variable is not kept between steps (the reference's choice): the optimizer's state is the momentum
alone, so a checkpoint resumes exactly as plain Muon's does.
"""

import contextlib

import torch

from gpt2.muon import POLAR_EXPRESS, Muon, map_stacks

# the dual step, for a momentum scaled to singular values of RMS 1 (the reference: 0.01 with 100 iterations on raw
# gradients); measured on random tall and wide shapes from 32 to 512, 10 iterations take the violation below 1e-3
DUAL_LR = 0.3
# Newton-Schulz's cubic after Polar Express: quadratic convergence from Polar Express's [0.86, 1.14] to fp32's
# precision in four steps
CUBIC = ((1.5, -0.5, 0.0),) * 4


@contextlib.contextmanager
def full_fp32():
    """Matmuls in full fp32: TF32 (which the trainer turns on for the model) would leave singular values ~1e-3 off 1."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def msign(x: torch.Tensor) -> torch.Tensor:
    """U V^T of x = U S V^T for a stack of tall matrices (..., m >= n), in fp32: Polar Express, then Newton-Schulz to
    convergence. Singular values below ~1e-3 of x's Frobenius norm are left short of 1 (the directions that
    matter least)."""
    x = x.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30) * 1.02)  # Polar Express wants |x|_2 below 1
    for a, b, c in POLAR_EXPRESS + CUBIC:
        gram = x.mT @ x
        x = a * x + x @ (b * gram + c * gram @ gram if c else b * gram)
    return x


def tall(fn):
    """fn on tall stacks (..., m >= n), applied to wide ones through their transposes (keyword options as they are)."""
    def wrapped(*stacks, **options):
        wide = stacks[0].size(-2) < stacks[0].size(-1)
        out = fn(*(s.mT for s in stacks), **options) if wide else fn(*stacks, **options)
        return out.mT if wide else out
    return wrapped


@tall
def project(w: torch.Tensor) -> torch.Tensor:
    """The nearest matrix on the manifold, U V^T by SVD in float64: exact however badly w is conditioned (a random
    square init has singular values near 0, where an iteration converges slowly); used once, at the start."""
    u, _, vt = torch.linalg.svd(w.double(), full_matrices=False)
    return (u @ vt).to(w.dtype)


def violation(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """|W^T A + A^T W|_F / |A|_F of each matrix of a tall stack: how far A is from the tangent space at W."""
    h = w.mT @ a
    return (h + h.mT).norm(dim=(-2, -1)) / a.norm(dim=(-2, -1)).clamp_min(1e-30)


@tall
def tangent_direction(w: torch.Tensor, g: torch.Tensor, iters: int) -> torch.Tensor:
    """The unit-spectral-norm tangent direction at w that best aligns with g, by dual ascent (see the module doc);
    the least violating of the iterates."""
    # msign ignores g's scale but the dual step does not: singular values of RMS 1, so that DUAL_LR fits every shape
    g = g.float() * g.size(-1) ** 0.5 / g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-30)
    wg = w.mT @ g
    lam = -0.25 * (wg + wg.mT)
    a = msign(g + 2 * w @ lam)
    best, best_violation = a, violation(w, a)
    for k in range(iters):
        h = w.mT @ a
        lam = lam - DUAL_LR * (1 - k / iters) * (h + h.mT)
        a = msign(g + 2 * w @ lam)
        v = violation(w, a)
        better = (v < best_violation)[..., None, None]
        best, best_violation = torch.where(better, a, best), torch.minimum(v, best_violation)
    return best


@tall
def retract(w: torch.Tensor) -> torch.Tensor:
    """Back onto the manifold: the polar factor."""
    return msign(w).to(w.dtype)


class ManifoldMuon(Muon):
    """Muon on the Stiefel manifold: each block (a matrix, or with row_splits each of its row blocks) starts at its
    polar factor, here at construction, so the step-0 model, the EMA and every checkpoint see it on the manifold
    (a resumed run's checkpoint then overwrites it). Each step: W <- msign(W - lr * A) with A from
    tangent_direction, A's spectral norm being 1 for every shape (no Muon shape scale: the weights' scale is fixed).
    Weight decay, NorMuon and fixed_norm are refused: the manifold fixes the norm, and NorMuon would take A off
    the tangent space. The blocks are computed as Muon orthogonalizes: stacked by shape, shared out under DDP."""

    def __init__(self, params, manifold_iters: int = 10, **options):
        if options.get("weight_decay") or options.get("normuon") or options.get("fixed_norm"):
            raise ValueError("manifold Muon takes no weight_decay, normuon or fixed_norm: the manifold fixes the norm")
        if manifold_iters < 0:
            raise ValueError(f"manifold_iters must be >= 0, got {manifold_iters}")
        super().__init__(params, **options)
        self.defaults["manifold_iters"] = manifold_iters
        for group in self.param_groups:
            group.setdefault("manifold_iters", manifold_iters)
        self.project_blocks()

    @torch.no_grad()
    def project_blocks(self):
        """Every block to its polar factor, exactly (SVD), shared out like the steps."""
        blocks = [(p, rows) for group in self.param_groups for p in group["params"] for rows in self.row_blocks(p)]
        for (p, rows), w in zip(blocks, map_stacks(project, [(p[rows],) for p, rows in blocks], torch.float32)):
            p[rows].copy_(w)

    def update_blocks(self, blocks, momenta, group):
        """Every block's manifold step from its Nesterov momentum, written back into its rows."""
        def step(w, g):
            with full_fp32():
                return retract(w.float() - group["lr"] * tangent_direction(w, g, iters=group["manifold_iters"]))
        weights = [(p[rows], momentum) for (p, _, rows), momentum in zip(blocks, momenta)]
        for (p, _, rows), w in zip(blocks, map_stacks(step, weights, torch.float32)):
            p[rows].copy_(w)
