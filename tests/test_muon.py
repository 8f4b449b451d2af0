"""Muon and the wsd schedule: orthogonalized updates (NS5 and Polar Express), separate q/k/v blocks, weight decay,
NorMuon, DDP-identical weights with one collective per shape, per-role AdamW lrs, exact resume, the schedule."""

import json

import pytest
import torch
import torch.distributed as dist

import train_gpt2
from conftest import spawn_ranks
from gpt2.config import TrainConfig, parse_config
from gpt2.models import build_model
from gpt2.muon import Muon, fused_row_splits, normuon, orthogonalize
from gpt2.optim import build_optimizers, lr_at
from model import GPT, GPTConfig


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (192, 64)])
def test_orthogonalized_update_has_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert s.min() > 0.6 and s.max() < 1.2
    # the directions are kept: the update correlates with U V^T of the exact SVD
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    cos = (orthogonalize(g).float() * (u @ vt)).sum() / (orthogonalize(g).float().norm() * (u @ vt).norm())
    assert cos > 0.95


@pytest.mark.parametrize("shape", [(96, 32), (32, 128)])
def test_polar_express_and_ns5_singular_values_in_their_ranges(shape):
    # the composed scalar polynomials map (0.01, 1] to [0.68, 1.13] (NS5) and [0.86, 1.14] (Polar Express), in
    # float64; bf16 matmuls add up to ~0.08 around that
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ns5 = torch.linalg.svdvals(orthogonalize(g, method="ns5").double())
    polar = torch.linalg.svdvals(orthogonalize(g, method="polar").double())
    assert 0.6 < ns5.min() and ns5.max() < 1.2
    assert 0.8 < polar.min() and polar.max() < 1.2
    assert polar.min() > ns5.min() + 0.1  # what the per-step coefficients buy: no singular value left far below 1
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    polar_update = orthogonalize(g, method="polar").double()
    assert (polar_update * (u @ vt)).sum() / (polar_update.norm() * (u @ vt).norm()) > 0.98


def one_step_update(grad, row_splits=None, lr=1.0, **options):
    """p_before - p_after of one Muon step on a single matrix (zero momentum so far)."""
    p = torch.nn.Parameter(torch.randn(grad.shape, generator=torch.Generator().manual_seed(1)))
    before = p.detach().clone()
    opt = Muon([p], lr=lr, row_splits={p: row_splits} if row_splits else None, **options)
    p.grad = grad.clone()
    opt.step()
    return before - p.detach()


@pytest.mark.parametrize("method", ["ns5", "polar"])
def test_split_qkv_blocks_get_equal_update_rms(method):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(32, 32, generator=g) for _ in range(3))
    grad = torch.cat([q / q.norm(), k / k.norm(), 4 * v / v.norm()])  # gradient norms 1 : 1 : 4
    rms = lambda u: [u[i * 32 : (i + 1) * 32].square().mean().sqrt().item() for i in range(3)]
    split = rms(one_step_update(grad, (32, 32, 32), ns=method))
    assert max(split) / min(split) < 1.05
    # the contrast: one orthogonalization of the fused [q; k; v] gives v's larger gradient a larger update
    fused = rms(one_step_update(grad, ns=method))
    assert fused[2] / fused[0] > 1.3


def test_fused_row_splits_follow_the_config():
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp="swiglu"))
    splits = {name: fused_row_splits(model).get(p) for name, p in model.named_parameters()}
    head = 32 // 4
    assert splits["transformer.h.1.attn.c_attn.weight"] == (4 * head, 2 * head, 2 * head)
    hidden = model.transformer.h[0].mlp.c_proj.weight.shape[1]  # c_proj reads the hidden width
    assert splits["transformer.h.0.mlp.c_fc.weight"] == (hidden, hidden)
    assert sum(s is not None for s in splits.values()) == 4  # two per layer, nothing else
    gelu = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32))
    assert [len(s) for s in fused_row_splits(gelu).values()] == [3]  # gelu's c_fc is not fused


@pytest.mark.parametrize("mlp", ["swiglu", "swiglu-oss"])
def test_fused_row_splits_cover_gated_experts_and_dense_swiglu_oss(mlp):
    """Every gated c_fc is [gate; up]: the dense MLP's of both gated kinds, and each MoE expert's."""
    config = dict(block_size=16, n_layer=2, n_head=4, n_embd=32, mlp=mlp)
    dense = GPT(GPTConfig(**config))
    fc = [p for n, p in dense.named_parameters() if n.endswith(".mlp.c_fc.weight")]
    assert [fused_row_splits(dense).get(p) for p in fc] == [(p.shape[0] // 2,) * 2 for p in fc]
    moe = build_model(GPTConfig(**config, moe_experts=4, moe_top_k=2))
    splits = fused_row_splits(moe)
    experts = {n: p for n, p in moe.named_parameters() if ".mlp.experts." in n and n.endswith(".c_fc.weight")}
    assert len(experts) == 2 * 4
    for name, p in experts.items():
        assert splits.get(p) == (p.shape[0] // 2, p.shape[0] // 2), name
    assert len(splits) == 2 + len(experts)  # and the two c_attn: not the router, c_proj or anything else


def test_weight_decay_and_cautious_decay_match_their_formulas():
    p0 = torch.tensor([[0.5, -1.0, 2.0], [-0.3, 0.8, -1.5]])
    grad = torch.tensor([[1.0, 0.5, -1.0], [-1.0, 1.0, 0.2]])
    lr, wd = 0.1, 0.5

    def step(**options):
        p = torch.nn.Parameter(p0.clone())
        p.grad = grad.clone()
        Muon([p], lr=lr, **options).step()
        return p.detach()

    u = (p0 - step()) / lr  # the orthogonalized update (a 2x3 matrix is wide: no shape scale)
    mask = (u * p0 >= 0).float()
    assert 0 < mask.sum() < 6  # both cases occur
    assert torch.allclose(step(weight_decay=wd), p0 - lr * (u + wd * p0), atol=1e-6)
    assert torch.allclose(step(weight_decay=wd, cautious_wd=True), p0 - lr * (u + wd * mask * p0), atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 2), (2, 4)])
def test_normuon_matches_hand_formula(shape):
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2)]
    tall = shape[0] >= shape[1]
    beta2 = 0.8
    moment = torch.zeros((shape[0], 1) if tall else (1, shape[1]), dtype=torch.float64)
    hand = [[0.0] * (shape[0] if tall else shape[1])]
    for u in updates:
        got = normuon(u, moment, beta2)
        lines = u.tolist() if tall else u.T.tolist()  # rows of a tall update, columns of a wide one
        hand.append([beta2 * m + (1 - beta2) * sum(x * x for x in line) / len(line) for m, line in zip(hand[-1], lines)])
        scaled = [[x / hand[-1][i] ** 0.5 for x in line] for i, line in enumerate(lines)]
        norm = lambda rows: sum(x * x for row in rows for x in row) ** 0.5
        want = torch.tensor([[x * norm(lines) / norm(scaled) for x in line] for line in scaled], dtype=torch.float64)
        assert torch.allclose(got, want if tall else want.T, atol=1e-12)


# ---------------------------------------------------------------------- DDP

SMALL = GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=32)  # a small vocabulary: fast
ALL_ON = dict(ns="polar", weight_decay=0.1, cautious_wd=True, normuon=True, split=True)


def muon_steps(x, y, rank=0, world=1, slices=1, steps=3, options=None):
    """A few Muon steps on data (x, y), then the weights and the loss on all of (x, y). With world > 1 each
    rank takes its slice and the gradients are averaged as DDP does; with slices > 1 one process computes the
    same average of per-slice mean gradients itself."""
    torch.manual_seed(0)
    model = GPT(SMALL)
    options = dict(options or {})
    splits = fused_row_splits(model) if options.pop("split", False) else None
    opt = Muon(model.hidden_matrices(), lr=0.05, row_splits=splits, **options)
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


def collectives_per_step(n_layer: int) -> int:
    """torch.distributed calls during one Muon step (split q/k/v) of a model with n_layer layers."""
    model = GPT(GPTConfig(block_size=32, n_layer=n_layer, n_head=2, n_embd=32))
    opt = Muon(model.hidden_matrices(), row_splits=fused_row_splits(model))
    for p in model.hidden_matrices():
        p.grad = torch.ones_like(p)
    calls = []
    names = ("all_gather_into_tensor", "all_gather", "broadcast", "all_reduce", "reduce_scatter_tensor", "scatter")
    originals = {name: getattr(dist, name) for name in names}
    for name, fn in originals.items():
        setattr(dist, name, lambda *args, _fn=fn, **kwargs: calls.append(1) or _fn(*args, **kwargs))
    try:
        opt.step()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return len(calls)


def _rank(rank, world, x, y, out):
    results = [muon_steps(x, y, rank, world), muon_steps(x, y, rank, world, options=ALL_ON)]
    results.append(torch.tensor([collectives_per_step(2), collectives_per_step(4)], dtype=torch.float32))
    gathered = [[torch.empty_like(r) for _ in range(world)] for r in results]
    for r, g in zip(results, gathered):
        dist.all_gather(g, r)
    if rank == 0:
        torch.save(gathered, out)


def test_muon_ddp_ranks_identical_and_equal_to_one_process(tmp_path):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 512, (4, 32), generator=g), torch.randint(0, 512, (4, 32), generator=g)
    # the shared harness: a barrier before the group is destroyed (destroying it under a rank's pending gloo work
    # aborted that rank now and then: "terminate called without an active exception")
    spawn_ranks(_rank, 2, x, y, tmp_path / "w.pt")
    (default0, default1), (all0, all1), (count0, count1) = torch.load(tmp_path / "w.pt")
    # each stack of same-shape blocks was split between the ranks and all-gathered
    assert torch.equal(default0, default1) and torch.equal(all0, all1)
    # one collective per distinct block shape ((32, 32): q, k, v and attn.c_proj; (128, 32); (32, 128)), however
    # many layers: 16 blocks in 2 layers, 32 in 4
    assert count0.tolist() == count1.tolist() == [3, 3]
    # the same arithmetic in one process (one thread too, as each rank: matmul blocking depends on it): bit-identical
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(default0, muon_steps(x, y, slices=2))
        assert torch.equal(all0, muon_steps(x, y, slices=2, options=ALL_ON))
    finally:
        torch.set_num_threads(threads)
    # one process with one gradient over the whole batch: Newton-Schulz runs in bf16, so gradients that differ
    # in float rounding can round to neighbouring bf16 values and the weights drift apart by a few bf16 ulps
    # per step (measured 0 after one step, 1.7% after three); the loss stays the same
    single = muon_steps(x, y)
    assert abs(default0[-1] - single[-1]) < 1e-4 * single[-1]
    assert (default0[:-1] - single[:-1]).norm() < 0.05 * single[:-1].norm()


# ---------------------------------------------------------------------- train_gpt2.py: AdamW lrs, resume, flags


def test_adamw_groups_get_their_role_lrs():
    cfg, _ = parse_config(["--preset", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--tie-head", "0",
                           "--optimizer", "muon", "--adam-embed-lr", "0.1", "--adam-head-lr", "0.02",
                           "--adam-scalar-lr", "0.3"])
    model = GPT(cfg.model)
    adamw, muon = build_optimizers(cfg, model, "cpu")
    lr_of = {id(p): group["initial_lr"] for group in adamw.param_groups for p in group["params"]}
    decay_of = {id(p): group["weight_decay"] for group in adamw.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert lr_of[id(names["transformer.wte.weight"])] == lr_of[id(names["transformer.wpe.weight"])] == 0.1
    assert lr_of[id(names["lm_head.weight"])] == 0.02
    one_d = [n for n, p in names.items() if p.dim() == 1]
    assert len(one_d) > 5 and all(lr_of[id(names[n])] == 0.3 for n in one_d)
    assert len(lr_of) + sum(len(g["params"]) for g in muon.param_groups) == len(names)  # every parameter once
    # weight decay as before the split: the tables decay, the 1-D parameters do not
    assert decay_of[id(names["lm_head.weight"])] == cfg.weight_decay and decay_of[id(names[one_d[0]])] == 0.0
    # tied: the shared table is the head's
    cfg.model.tie_head = True
    tied = GPT(cfg.model)
    lr_of = {id(p): g["initial_lr"] for g in build_optimizers(cfg, tied, "cpu")[0].param_groups for p in g["params"]}
    assert lr_of[id(tied.transformer.wte.weight)] == 0.02


def test_resume_is_exact_with_every_switch_on(shards, tmp_path):
    flags = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4",
             "--seq-len", "32", "--total-batch-size", "256", "--val-tokens", "512", "--hellaswag-every", "0",
             "--warmup-steps", "2", "--vocab-multiple", "128", "--sample-every", "0", "--data-dir", shards,
             "--log-dir", str(tmp_path), "--max-steps", "6", "--val-every", "3", "--checkpoint-every", "0",
             "--optimizer", "muon", "--mlp", "swiglu", "--tie-head", "0", "--muon-split", "1", "--muon-ns", "polar",
             "--muon-weight-decay", "0.1", "--muon-cautious-wd", "1", "--muon-normuon", "1", "--adam-embed-lr", "0.01",
             "--adam-head-lr", "0.004", "--adam-scalar-lr", "0.02", "--adam-embed-beta1", "0.8", "--adam-head-wd", "0.01",
             "--adam-scalar-beta2", "0.99", "--adam-width-scale", "1"]
    train_gpt2.main([*flags, "--run-name", "straight"])
    train_gpt2.main([*flags, "--run-name", "resumed", "--stop-at", "3"])
    train_gpt2.main([*flags, "--run-name", "resumed"])

    def losses(name):
        records = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        return [(r["kind"], r["step"], r["loss"]) for r in records if r["kind"] in ("train", "val")]

    assert len(losses("straight")) == 6 + 3
    assert sorted(losses("resumed")) == sorted(losses("straight"))  # exact: bit-identical on CPU


@pytest.mark.parametrize("args,message", [
    (["--muon-split", "1"], "--muon-split need --optimizer muon"),
    (["--optimizer", "muon", "--muon-cautious-wd", "1"], "needs a --muon-weight-decay > 0"),
    (["--optimizer", "muon", "--muon-weight-decay", "0.1", "--muon-fixed-norm", "1"], "restores the norm"),
    (["--optimizer", "muon", "--muon-ns", "ns7"], "invalid choice: 'ns7'"),
    (["--adam-head-lr", "-1"], "--adam-head-lr must be >= 0"),
])
def test_inconsistent_muon_flags_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(args)
    assert message in capsys.readouterr().err


def test_wsd_schedule_matches_its_formula():
    cfg = TrainConfig(schedule="wsd", max_lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=100, decay_frac=0.2)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 50) == 1.0 and lr_at(cfg, 80) == 1.0  # stable until the last 20 steps
    assert lr_at(cfg, 90) == pytest.approx(0.55)  # halfway down the linear decay from 1.0 to 0.1
    assert lr_at(cfg, 100) == pytest.approx(0.1)


def test_invsqrt_schedule_matches_edm2_formula():
    # EDM2: lr = peak / sqrt(max(t / t_ref, 1)), times the ramp-up min(1, (t + 1) / warmup)
    cfg = TrainConfig(schedule="invsqrt", max_lr=1.0, warmup_steps=4, decay_ref_steps=10, max_steps=100)
    assert lr_at(cfg, 0) == pytest.approx(0.25) and lr_at(cfg, 3) == 1.0  # the ramp
    assert lr_at(cfg, 10) == 1.0  # flat until the reference step
    assert lr_at(cfg, 40) == pytest.approx(0.5) and lr_at(cfg, 90) == pytest.approx(1 / 3)  # 1 / sqrt(4), 1 / sqrt(9)
    assert lr_at(cfg, 1000) == pytest.approx(0.1)  # past max_steps too: no floor (min_lr_ratio plays no part)
    no_ramp = TrainConfig(schedule="invsqrt", warmup_steps=0, decay_ref_steps=10)
    assert lr_at(no_ramp, 0) == 1.0 and lr_at(no_ramp, 160) == pytest.approx(0.25)
    ramp_past_reference = TrainConfig(schedule="invsqrt", warmup_steps=56, decay_ref_steps=3)
    assert lr_at(ramp_past_reference, 27) == pytest.approx(0.5 / 3)  # both at once (28 / 56, 1 / sqrt(9)), as in EDM2
