"""Manifold Muon (manifold.py): trained matrices keep unit singular values, the dual-ascent step is tangent and of unit
spectral norm, the square case matches its closed form, resume is exact, DDP ranks stay identical, bad flags fail."""

import pytest
import torch

from conftest import SMALL, metrics, run, spawn_ranks
from gpt2.config import parse_config
from gpt2.manifold import ManifoldMuon, project, tangent_direction
from gpt2.models import build_model
from gpt2.muon import fused_row_splits
from gpt2.optim import build_optimizers

STEPS = ["--max-steps", "30", "--val-every", "30", "--sample-every", "0", "--checkpoint-every", "0",
         "--optimizer", "muon", "--muon-manifold", "stiefel"]


def float64_violation(w, a) -> float:
    """|W^T A + A^T W| / |A| in float64 on the tall side: the independent reference for the tangent condition."""
    w, a = (w, a) if w.size(0) >= w.size(1) else (w.T, a.T)
    w, a = w.double(), a.double()
    return ((w.T @ a + a.T @ w).norm() / a.norm()).item()


def random_pair(shape, seed=0):
    """A matrix on the manifold and a momentum-like matrix: noise plus a strong rank-2 part, as gradients have."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    low_rank = torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
    return project(torch.randn(shape, generator=g)), torch.randn(shape, generator=g) + low_rank / min(shape) ** 0.5


def muon_blocks(model, split: bool) -> list[torch.Tensor]:
    """Every Muon matrix of model, or with split each of its row blocks (each is on a manifold of its own)."""
    splits = fused_row_splits(model) if split else {}
    blocks = []
    for p in model.hidden_matrices():
        sizes = splits.get(p, (p.shape[0],))
        blocks += list(p.detach().split(list(sizes)))
    return blocks


@pytest.mark.parametrize("flags", [[], ["--muon-split", "1", "--mlp", "swiglu"], ["--muon-manifold-iters", "0"]],
                         ids=["dual-ascent", "split-blocks", "projected"])
def test_trained_matrices_keep_unit_singular_values(shards, tmp_path, flags):
    run(shards, tmp_path, *STEPS, *flags)
    val = metrics(tmp_path, kind="val")
    assert val[-1]["step"] == 30 and val[-1]["loss"] < val[0]["loss"] - 1.0  # it learns
    cfg, _ = parse_config(["--preset", "tiny", *SMALL, *STEPS, *flags])
    trained = build_model(cfg.model)
    trained.load_state_dict(torch.load(tmp_path / "run" / "ckpt_0000030.pt", weights_only=False)["model"])
    torch.manual_seed(cfg.seed)  # the run's init, projected onto the manifold as the optimizer is built
    start = build_model(cfg.model)
    build_optimizers(cfg, start, "cpu")
    split = "--muon-split" in flags
    blocks = muon_blocks(trained, split)
    assert len(blocks) == 2 * (7 if split else 4)  # per layer: q, k, v, attn proj, (gate, up,) mlp proj
    for block, initial in zip(blocks, muon_blocks(start, split), strict=True):
        s = torch.linalg.svdvals(block.double())
        assert (s - 1).abs().max() < 1e-3, s
        assert (block - initial).norm() > 0.01 * block.norm()  # the steps moved it: not the projected init alone


@pytest.mark.parametrize("shape", [(96, 32), (32, 128), (48, 48)])
def test_dual_ascent_step_is_tangent_with_unit_spectral_norm(shape):
    w, g = random_pair(shape)
    violations = {iters: float64_violation(w, tangent_direction(w, g, iters=iters)) for iters in (0, 3, 10)}
    a = tangent_direction(w, g, iters=10)  # ManifoldMuon's and --muon-manifold-iters' default
    assert violations[10] < 2e-3  # measured 7e-5 to 1e-3 on random shapes from 32 to 512
    assert abs(torch.linalg.matrix_norm(a.double(), ord=2).item() - 1) < 1e-3
    if shape[0] != shape[1]:  # the projection alone is ~0.15 off; each round of dual steps cuts that down
        assert violations[0] > 0.05 and violations[3] < 0.5 * violations[0] and violations[10] < 0.2 * violations[3]
    else:  # square: the tangent projection is already exact, and the dual steps keep it
        assert violations[0] < 1e-4 and violations[10] <= violations[0]
    assert (a * g).sum() > 0.5 * torch.linalg.matrix_norm(g, ord="nuc")  # a descent direction, and a steep one


def test_square_identity_step_is_msign_of_the_skew_part():
    # at W = I the tangent space is the skew-symmetric matrices; msign of G's skew part K is skew and orthogonal,
    # so it is the exact solution, and the retraction of I - lr A is (I - lr A) / sqrt(1 + lr^2) (A^T A = I)
    n, lr = 32, 0.1
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(2))
    u, _, vt = torch.linalg.svd((g - g.T).double() / 2)
    expected_a = u @ vt
    assert (tangent_direction(torch.eye(n), g, iters=10).double() - expected_a).abs().max() < 1e-4
    p = torch.nn.Parameter(torch.eye(n))
    opt = ManifoldMuon([p], lr=lr)
    p.grad = g.clone()
    opt.step()
    expected = (torch.eye(n, dtype=torch.float64) - lr * expected_a) / (1 + lr**2) ** 0.5
    assert (p.detach().double() - expected).abs().max() < 1e-5


def test_resume_is_exact_with_manifold_muon(shards, tmp_path):
    common = ["--max-steps", "6", "--val-every", "3", "--sample-every", "0", "--checkpoint-every", "0",
              "--optimizer", "muon", "--muon-manifold", "stiefel", "--muon-split", "1", "--mlp", "swiglu"]
    run(shards, tmp_path, *common, name="straight")
    run(shards, tmp_path, *common, "--stop-at", "3", name="resumed")
    run(shards, tmp_path, *common, name="resumed")
    for kind in ("train", "val"):
        a, b = metrics(tmp_path, "straight", kind), metrics(tmp_path, "resumed", kind)
        assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]  # bit-identical on CPU


def manifold_steps(shapes, steps=3) -> torch.Tensor:
    """A few ManifoldMuon steps on matrices of these shapes with seeded gradients (the same on every rank)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]
    opt = ManifoldMuon(params, lr=0.05, manifold_iters=4)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


SHAPES = [(16, 8), (16, 8), (16, 8), (8, 24), (12, 12)]  # three of a shape: shared out unevenly, zero-padded


def _ranks_compute(rank, world, out):
    result = manifold_steps(SHAPES)
    gathered = [torch.empty_like(result) for _ in range(world)]
    torch.distributed.all_gather(gathered, result)
    if rank == 0:
        torch.save(gathered, out)


def test_ddp_ranks_identical_and_equal_to_one_process(tmp_path):
    spawn_ranks(_ranks_compute, 2, tmp_path / "w.pt")
    rank0, rank1 = torch.load(tmp_path / "w.pt")
    assert torch.equal(rank0, rank1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        assert torch.allclose(rank0, manifold_steps(SHAPES), atol=1e-6)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("args,message", [
    (["--muon-manifold", "stiefel"], "need --optimizer muon"),
    (["--optimizer", "muon", "--muon-manifold-iters", "3"], "needs --muon-manifold stiefel"),
    (["--optimizer", "muon", "--muon-manifold", "stiefel", "--muon-weight-decay", "0.1"], "--muon-weight-decay"),
    (["--optimizer", "muon", "--muon-manifold", "stiefel", "--muon-normuon", "1"], "--muon-normuon"),
    (["--optimizer", "muon", "--muon-manifold", "stiefel", "--mode", "edm2"], "--mode"),
    (["--optimizer", "muon", "--muon-manifold", "stiefel", "--muon-manifold-iters", "-1"], "must be >= 0"),
])
def test_inconsistent_manifold_flags_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--preset", "tiny", *args])
    assert message in capsys.readouterr().err


def test_optimizer_refuses_what_the_manifold_fixes():
    p = torch.nn.Parameter(torch.randn(8, 8))
    for option in (dict(weight_decay=0.1), dict(normuon=True), dict(fixed_norm=True)):
        with pytest.raises(ValueError, match="manifold fixes the norm"):
            ManifoldMuon([p], **option)


@pytest.mark.parametrize("manifold", ["stiefel", "none"])
def test_gates_and_router_stay_with_adamw(manifold):
    """Under manifold Muon the value-embedding gates (zero at init: gate 1) and the MoE routers go to AdamW: not
    projected onto the manifold as the optimizers are built, and a zero-gradient step leaves their singular values
    as they were (AdamW's decoupled decay aside: zeros stay zeros). Plain Muon keeps them, as before."""
    flags = [*STEPS[:-1], manifold, "--value-embeds", "1", "--moe-experts", "4", "--pos", "rope"]
    cfg, _ = parse_config(["--preset", "tiny", *SMALL, *flags])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    kept = {n: p for n, p in model.named_parameters() if ".attn.ve_gate." in n or ".mlp.router.weight" in n}
    assert sum(".ve_gate." in n for n in kept) == 1 and sum(".router." in n for n in kept) == 2  # 2 layers
    before = {n: p.detach().clone() for n, p in kept.items()}
    adamw, muon = build_optimizers(cfg, model, "cpu")
    assert isinstance(muon, ManifoldMuon) == (manifold == "stiefel")
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    if manifold == "none":
        assert all(id(p) in in_muon for p in kept.values())
        return
    group_of = {id(p): g for g in adamw.param_groups for p in g["params"]}
    for n, p in kept.items():
        assert id(p) in group_of and id(p) not in in_muon, n
        assert torch.equal(p, before[n]), n  # not projected
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adamw.step()
    muon.step()
    for n, p in kept.items():
        g = group_of[id(p)]
        s, s0 = torch.linalg.svdvals(p.detach().double()), torch.linalg.svdvals(before[n].double())
        assert torch.allclose(s, s0 * (1 - g["lr"] * g["weight_decay"]), rtol=1e-5, atol=0), n
        if ".ve_gate." in n:
            assert torch.count_nonzero(p) == 0  # the gate 2 sigmoid(0) is still 1
