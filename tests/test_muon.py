"""Muon and the wsd schedule: orthogonalized updates, DDP-identical weights, the schedule's formula."""

import pytest
import torch
import torch.distributed as dist

from conftest import spawn_ranks
from model import GPT, GPTConfig
from muon import Muon, orthogonalize
from train_gpt2 import TrainConfig, lr_at


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (192, 64)])
def test_orthogonalized_update_has_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert s.min() > 0.6 and s.max() < 1.2
    # the directions are kept: the update correlates with U V^T of the exact SVD
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    cos = (orthogonalize(g).float() * (u @ vt)).sum() / (orthogonalize(g).float().norm() * (u @ vt).norm())
    assert cos > 0.95


def test_wsd_schedule_matches_its_formula():
    # lr_at is the multiplier of the peak lr: the same shape whatever max_lr is
    cfg = TrainConfig(schedule="wsd", max_lr=6e-4, min_lr_ratio=0.1, warmup_steps=10, max_steps=100, decay_frac=0.2)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 50) == 1.0 and lr_at(cfg, 80) == 1.0  # stable until the last 20 steps
    assert lr_at(cfg, 90) == pytest.approx(0.55)  # halfway down the linear decay from 1.0 to 0.1
    assert lr_at(cfg, 100) == pytest.approx(0.1)


SMALL = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32)


def muon_steps(x, y, rank=0, world=1, slices=1, steps=3):
    """A few Muon steps on data (x, y), then the weights and the loss on all of (x, y). With world > 1 each
    rank takes its slice and the gradients are averaged as DDP does; with slices > 1 one process computes the
    same average of per-slice mean gradients itself."""
    torch.manual_seed(0)
    model = GPT(SMALL)
    opt = Muon(model.hidden_matrices(), lr=0.05)
    mine = range(rank, rank + 1) if world > 1 else range(slices)
    rows = x.shape[0] // max(world, slices)
    for _ in range(steps):
        grads = None
        for i in mine:
            model(x[i * rows : (i + 1) * rows], y[i * rows : (i + 1) * rows])[1].backward()
            new = [p.grad for p in model.hidden_matrices()]
            grads = new if grads is None else [a + b for a, b in zip(grads, new)]
            model.zero_grad()
        for p, grad in zip(model.hidden_matrices(), grads):
            if world > 1:  # what DDP does to the gradients
                dist.all_reduce(grad)
            p.grad = grad / max(world, slices)
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        final_loss = model(x, y)[1]
    return torch.cat([p.detach().flatten() for p in model.hidden_matrices()] + [final_loss.view(1)])


def _rank(rank, world, x, y, out):
    weights = muon_steps(x, y, rank, world)
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    if rank == 0:
        torch.save(gathered, out)


def test_muon_ddp_ranks_identical_and_equal_to_one_process(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 50257, (4, 32), generator=g), torch.randint(0, 50257, (4, 32), generator=g)
    spawn_ranks(_rank, 2, x, y, tmp_path / "w.pt")
    rank0, rank1 = torch.load(tmp_path / "w.pt")
    assert torch.equal(rank0, rank1)  # each matrix was orthogonalized by one rank and broadcast
    # the same arithmetic in one process (one thread too, as each rank: matmul blocking depends on it): bit-identical
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(rank0, muon_steps(x, y, slices=2))
    finally:
        torch.set_num_threads(threads)
    # one process with one gradient over the whole batch: Newton-Schulz runs in bf16, so gradients that differ
    # in float rounding can round to neighbouring bf16 values and the weights drift apart by a few bf16 ulps
    # per step (measured 0.3% after one step, 3% after three); the loss stays the same
    single = muon_steps(x, y)
    assert abs(rank0[-1] - single[-1]) < 1e-4 * single[-1]
    assert (rank0[:-1] - single[:-1]).norm() < 0.05 * single[:-1].norm()
