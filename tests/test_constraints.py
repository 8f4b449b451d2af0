"""Weight-constrained modes (edm2, hypersphere), MuonH and the weight EMA: the norms they promise hold after
training, EDM2 keeps activations at unit scale through depth, each mode learns, DDP ranks stay identical (compiling
the modes: test_arch.py), and the EMA is the average it claims to be, resumes exactly and is reconstructed post hoc."""

import dataclasses
import json
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
import train_gpt2
from conftest import ROOT, spawn_ranks
from gpt2 import config, ema, runs
from gpt2.constrained import (EDM2GPT, EDM2MLP, ConstrainedLinear, HypersphereBlock, HypersphereGPT, MPLinear, mp_sum,
                              unit_rms_gain)
from gpt2.models import build_model
from gpt2.muon import Muon
from model import ARCH_CHOICES, GPT, GPTConfig, rope_tables

SMALL = dict(block_size=32, n_layer=2, n_head=4, n_embd=32, vocab_multiple=128)
LOOP = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--seq-len", "32",
        "--total-batch-size", "256", "--val-tokens", "512", "--hellaswag-every", "0", "--warmup-steps", "2",
        "--vocab-multiple", "128", "--sample-every", "0", "--checkpoint-every", "0", "--max-lr", "1e-2"]


def run_loop(shards, tmp_path, *args, name="run"):
    result = train_gpt2.main([*LOOP, "--data-dir", shards, "--log-dir", str(tmp_path), "--run-name", name, *args])
    ckpt = torch.load(tmp_path / name / f"ckpt_{result['step']:07d}.pt", weights_only=True)
    model = build_model(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return result, model


def norm_errors(model: GPT) -> list[float]:
    """|size - 1| of every vector that the model's mode keeps on a sphere, computed from the definitions (not
    through the model's own projection code): the RMS of each row in edm2 (unit-RMS elements, per output unit /
    token / position), the norm of each row or column otherwise."""
    c = model.config
    rms = c.mode == "edm2" and c.edm2_storage == "elements"

    def size(w, dim):
        return w.double().pow(2).mean(dim).sqrt() if rms else w.double().norm(dim=dim)

    checks = []
    for name, p in model.named_parameters():
        if name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
            checks.append(size(p, 1))  # one row per token / position
    for name, m in model.named_modules():
        if isinstance(m, ConstrainedLinear):
            # hypersphere: the projections back into the residual stream have unit columns (along n_embd)
            columns = c.mode == "hypersphere" and name.endswith("c_proj")
            checks.append(size(m.weight, 0 if columns else 1))
    assert checks
    return [(n - 1).abs().max().item() for n in checks]


@pytest.mark.parametrize("mode", ["edm2", "hypersphere"])
def test_mode_learns_and_keeps_its_norms(shards, tmp_path, mode):
    # edm2's lr is a relative step on unit-RMS elements: 6e-2, the step the loop's 1e-2 takes on unit-norm rows of 32
    lr = ["--max-lr", "6e-2"] if mode == "edm2" else []
    result, model = run_loop(shards, tmp_path, "--mode", mode, "--max-steps", "30", "--val-every", "30",
                             "--weight-decay", "0.1", *lr)
    val = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "val"]
    assert val[0]["loss"] - val[-1]["loss"] > 2.0, val  # learns: measured 11.31 -> 7.04 (edm2), 11.32 -> 8.40
    assert max(norm_errors(model)) < 1e-5
    # weight decay leaves every matrix alone: each is constrained (it has no magnitude to decay)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 1e-8, "cpu")
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    matrices = [n for n, p in model.named_parameters() if p.dim() == 2]
    assert len(matrices) == 2 + 4 * 2 and not decayed  # wte, wpe and four per block: c_attn, c_proj, c_fc, c_proj


def test_muon_with_fixed_norm_keeps_each_matrix_norm(shards, tmp_path):
    torch.manual_seed(1337)  # the loop's seed: the same initial weights as the run's
    same_as_the_run = GPT(GPTConfig(**{**SMALL, "n_head": 2}))
    initial = {n: p.norm().item() for n, p in same_as_the_run.named_parameters()}
    _, model = run_loop(shards, tmp_path, "--optimizer", "muon", "--muon-fixed-norm", "1", "--max-steps", "20",
                        "--val-every", "0")
    hidden = {id(p) for p in model.hidden_matrices()}
    for name, p in model.named_parameters():
        if id(p) in hidden:
            assert abs(p.norm().item() / initial[name] - 1) < 1e-5, name
        elif name.endswith("wte.weight"):  # AdamW's: free to change
            assert abs(p.norm().item() / initial[name] - 1) > 1e-3


def residual_rms(model: GPT, idx) -> list[float]:
    """RMS of the residual stream after the embedding and after every block (forward hooks)."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(out.pow(2).mean().sqrt().item()))
             for b in model.transformer.h]
    with torch.no_grad():
        x0 = model.embed(idx, 0)
        model.hidden(idx)
    for h in hooks:
        h.remove()
    return [x0.pow(2).mean().sqrt().item(), *seen]


@pytest.mark.parametrize("mlp", ["gelu", "swiglu-oss"])
def test_edm2_keeps_unit_rms_through_depth_where_gpt2_grows(mlp):
    idx = torch.randint(0, 50257, (4, 64), generator=torch.Generator().manual_seed(0))
    cfg = dict(block_size=64, n_layer=12, n_head=4, n_embd=128, vocab_multiple=128, mlp=mlp)
    torch.manual_seed(0)
    edm2 = residual_rms(build_model(GPTConfig(**cfg, mode="edm2")), idx)
    torch.manual_seed(0)
    gpt2 = residual_rms(GPT(GPTConfig(**cfg)), idx)
    # measured: edm2 stays within 0.81-1.01 at every depth (EDM2's attention output, a softmax average of unit-RMS
    # values, is below unit RMS, as in its U-Net; each MLP's mp_sum pulls the stream back); GPT-2's grows from
    # 0.0286 to 0.0489 (1.7x)
    assert all(0.75 < r < 1.1 for r in edm2), edm2
    assert gpt2[-1] / gpt2[0] > 1.4, gpt2


def test_magnitude_preserving_layers_keep_unit_rms():
    """EDM2's layers on unit-RMS Gaussian inputs: each equals its formula computed here in float64, and that has unit
    RMS within sampling error (~1% at 4,096 x 64 inputs)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=g, dtype=torch.float64)
    # MPConv: w_ji / (RMS_i(w_j) sqrt(fan_in)), whatever scale the weights are stored at
    layer = MPLinear(64, 256).double()
    with torch.no_grad():
        layer.weight.mul_(7.0)
    w = layer.weight.detach()
    reference = x @ (w / (w.pow(2).mean(1, keepdim=True).sqrt() * math.sqrt(64))).T
    torch.testing.assert_close(layer(x), reference)
    assert reference.pow(2).mean().sqrt().item() == pytest.approx(1, abs=0.02)
    # mp_sum of two independent unit-RMS inputs: ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)
    y = torch.randn(4096, 64, generator=g, dtype=torch.float64)
    for t in (0.3, 0.5):
        reference = ((1 - t) * x + t * y) / math.sqrt((1 - t) ** 2 + t**2)
        torch.testing.assert_close(mp_sum(x, y, t), reference)
        assert reference.pow(2).mean().sqrt().item() == pytest.approx(1, abs=0.02)
    # the MLP: MPConv, the activation times its gain (EDM2's mp_silu: SiLU / 0.596), MPConv
    assert unit_rms_gain(torch.nn.functional.silu) == pytest.approx(1 / 0.596, rel=1e-3)
    for kind in ("gelu", "relu2", "swiglu", "swiglu-oss"):
        mlp = EDM2MLP(GPTConfig(**{**SMALL, "n_embd": 64}, mode="edm2", mlp=kind)).double()
        assert mlp(x).pow(2).mean().sqrt().item() == pytest.approx(1, abs=0.03), kind


@pytest.mark.parametrize("storage", ["elements", "rows"])
def test_edm2_adam_steps_are_relative_and_weights_stay_on_their_spheres(storage):
    """Adam's first step moves every element by lr (m / sqrt(v) = +-1): relative to unit-RMS elements that is lr in
    every layer, EDM2's premise; relative to unit-norm rows it is lr sqrt(fan_in). After every step, the stored weights
    are back on their spheres (unit RMS per output unit / token, or unit-norm rows)."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SMALL, mode="edm2", edm2_storage=storage, mlp="swiglu"))
    lr = 1e-3
    opt = model.configure_optimizers(0.0, lr, (0.9, 0.99), 1e-12, "cpu")
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    linears = {name: m for name, m in model.named_modules() if isinstance(m, ConstrainedLinear)}
    assert {type(m) for m in linears.values()} == {MPLinear if storage == "elements" else ConstrainedLinear}
    for step in range(3):
        before = {name: m.weight.detach().double().clone() for name, m in linears.items()}
        model(x, y, return_logits=False)[1].backward()
        opt.step()
        opt.zero_grad()
        for name, m in linears.items():
            if step == 0:
                rms = lambda w: w.pow(2).mean().sqrt().item()
                expected = lr if storage == "elements" else lr * math.sqrt(m.in_features)
                assert rms(m.weight.detach().double() - before[name]) / rms(before[name]) == pytest.approx(expected,
                                                                                                        rel=1e-4), name
        model.after_step()
        assert max(norm_errors(model)) < 1e-6, step


def test_edm2_normalizes_q_k_v_per_head():
    """EDM2's pixel norm in attention: q, k and v each at unit RMS over a head's channels, at every position and
    head (RoPE rotates after, keeping it; grouped-query k, v too). The rows variant leaves them as they come."""
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0)) * 3.0
    for storage, pos in (("elements", "rope"), ("elements", "learned"), ("rows", "learned")):
        torch.manual_seed(0)
        config = GPTConfig(**SMALL, mode="edm2", edm2_storage=storage, pos=pos, n_kv_head=2)
        attn = build_model(config).transformer.h[0].attn
        q, k, v = attn.qkv(x, rope_tables(config, 0, 16, x.device) if pos == "rope" else None)
        assert q.shape == (2, 4, 16, 8) and k.shape == v.shape == (2, 2, 16, 8)
        head_rms = [t.double().pow(2).mean(-1).sqrt() for t in (q, k, v)]  # (B, heads, T) each
        if storage == "elements":
            assert all((r - 1).abs().max() < 1e-5 for r in head_rms), storage
        else:
            assert (head_rms[2] - 1).abs().max() > 0.1


def test_edm2_checkpoints_from_before_edm2_storage_load_as_rows():
    """A checkpoint written before edm2_storage existed trained unit-norm rows: it loads as that variant, and
    resuming it under the new default stops with the flag to pass."""
    saved = {k: v for k, v in dataclasses.asdict(GPTConfig(**SMALL, mode="edm2")).items() if k != "edm2_storage"}
    model = runs.model_from_config(saved)
    assert model.config.edm2_storage == "rows" and type(model.transformer.h[0].attn.c_attn) is ConstrainedLinear
    assert runs.model_from_config({**saved, "mode": "gpt2"}).config.edm2_storage == "elements"  # no edm2: no matter
    cfg, _ = config.parse_config(["--preset", "tiny-edm2"])
    old = {**dataclasses.asdict(cfg), "model": {k: v for k, v in dataclasses.asdict(cfg.model).items()
                                                if k != "edm2_storage"}}
    with pytest.raises(SystemExit, match="--edm2-storage: checkpoint 'rows', now 'elements'"):
        runs.check_resume_config(cfg, old, "ckpt.pt")
    rows, _ = config.parse_config(["--preset", "tiny-edm2", "--edm2-storage", "rows"])
    runs.check_resume_config(rows, old, "ckpt.pt")  # the flag that says how it was trained


def test_hypersphere_steps_by_abs_alpha():
    """nGPT's eigen learning rates enter as |alpha| (ngpt model.py): a negative alpha steps toward the sublayer's
    output as far as a positive one, by the formula x + |alpha| (y / |y| - x), renormalized, in float64."""
    block = HypersphereBlock(GPTConfig(**SMALL, mode="hypersphere"), 0).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 32, generator=g, dtype=torch.float64), torch.randn(3, 32, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    alpha = -0.3 * torch.rand(32, generator=g, dtype=torch.float64)  # effective step sizes up to 0.3
    with torch.no_grad():
        block.alpha_attn.copy_(alpha / block.alpha_scale)
    expected = x + alpha.abs() * (y / y.norm(dim=-1, keepdim=True) - x)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(block.step(x, y, block.alpha_attn), expected)


# checkpoint layout: the names, in order, that train_gpt2 checkpoints (and their optimizer and EMA states) hold
H0 = "transformer.h.0."
LAYOUT = {
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight",
             *(H0 + n for n in ("ln_1.weight", "ln_1.bias", "attn.sinks", "attn.c_attn.weight", "attn.c_attn.bias",
                                "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                                "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")),
             "transformer.ln_f.weight", "transformer.ln_f.bias"],
    "edm2": ["logit_gain", "transformer.wte.weight", "transformer.wpe.weight",
             *(H0 + n for n in ("attn.sinks", "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                "mlp.c_proj.weight"))],
    "hypersphere": ["logit_scale", "transformer.wte.weight", "transformer.wpe.weight",
                    *(H0 + n for n in ("alpha_attn", "alpha_mlp", "attn.s_qk", "attn.sinks", "attn.c_attn.weight",
                                       "attn.c_proj.weight", "mlp.s_fc", "mlp.c_fc.weight", "mlp.c_proj.weight"))],
}


@pytest.mark.parametrize("mode", ARCH_CHOICES["mode"])
def test_build_model_picks_the_mode_and_keeps_the_checkpoint_layout(mode):
    model = build_model(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, vocab_multiple=128, mode=mode,
                                  sinks=True))
    assert type(model) is {"gpt2": GPT, "edm2": EDM2GPT, "hypersphere": HypersphereGPT}[mode]
    assert [n for n, _ in model.named_parameters()] == LAYOUT[mode]  # as written before constrained.py existed
    assert any(isinstance(m, ConstrainedLinear) for m in model.modules()) == (mode != "gpt2")


def _ddp_rank(rank, world, switch, out):
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SMALL, **switch))
    ddp = DDP(model)
    adamw = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), 1e-8, "cpu", exclude=model.hidden_matrices())
    muon = Muon(model.hidden_matrices(), lr=0.05, fixed_norm=True)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for _ in range(3):
        x, y = torch.randint(0, 50257, (2, 16), generator=g), torch.randint(0, 50257, (2, 16), generator=g)
        ddp(x, y, return_logits=False)[1].backward()
        for opt in (adamw, muon):
            opt.step()
            opt.zero_grad()
        model.after_step()
    # buffers too (the state dict): a mode with buffers that each rank moves must move them alike
    weights = torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    if rank == 0:
        torch.save(gathered, out)
    del ddp  # the DDP reducer's threads must be gone before the process group (else a rare abort at exit)


# the experts' case (ranks equal to one process accumulating, an unrouted expert): test_moe.py
DDP_CASES = {"edm2": dict(mode="edm2"), "hypersphere": dict(mode="hypersphere"),
             "speedrun": dict(value_embeds=True, unet=True, x0_mix=True)}


@pytest.mark.parametrize("switch", DDP_CASES.values(), ids=DDP_CASES.keys())
def test_ddp_ranks_stay_identical(tmp_path, switch):
    spawn_ranks(_ddp_rank, 2, switch, tmp_path / "w.pt")
    rank0, rank1 = torch.load(tmp_path / "w.pt")
    assert torch.equal(rank0, rank1)
    assert not math.isnan(rank0.sum().item())


def test_ema_is_evaluated_logged_and_resumed_exactly(shards, tmp_path):
    common = ["--max-steps", "8", "--val-every", "4", "--ema-sigma-rel", "0.1"]
    run_loop(shards, tmp_path, *common, name="straight")
    run_loop(shards, tmp_path, *common, "--stop-at", "4", name="resumed")
    run_loop(shards, tmp_path, *common, name="resumed")
    read = lambda name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    ema_val = lambda name: [(r["step"], r["loss"]) for r in read(name) if r["kind"] == "val_ema"]
    assert [s for s, _ in ema_val("straight")] == [4, 8]
    assert ema_val("straight") == ema_val("resumed")  # the EMA travels in the checkpoint: bit-identical
    raw = {r["step"]: r["loss"] for r in read("straight") if r["kind"] == "val"}
    assert all(loss != raw[step] for step, loss in ema_val("straight"))  # it is another set of weights
    # the checkpoint's EMA is the token-time power average of the weights after each step (EDM2's profile over
    # tokens), recomputed here from per-step checkpoints of a third run, batch-ramped: steps of 128 and 256 tokens
    ramped = ["--batch-ramp-start", "0.5", "--batch-ramp-frac", "0.5"]
    run_loop(shards, tmp_path, "--max-steps", "8", "--val-every", "0", "--checkpoint-every", "1",
             "--keep-checkpoints", "0", "--ema-sigma-rel", "0.1", "--ema-snapshot-every", "2", *ramped, name="every")
    # 2 micro-batches of 128 a step, from 1 of them (round(2 x (0.5 + 0.5 step / 4))) up to step 4
    step_tokens = [r["batch_tokens"] for r in read("every") if r["kind"] == "train"]
    assert step_tokens == [128, 128, 256, 256, 256, 256, 256, 256]
    states = [torch.load(tmp_path / "every" / f"ckpt_{i:07d}.pt", weights_only=True) for i in range(1, 9)]
    key = "transformer.h.0.mlp.c_fc.weight"

    def power_average(sigma_rel):  # step i, tokens N_{i-1}..N_i, weighs (N_i / N)^(gamma+1) - (N_{i-1} / N)^(gamma+1)
        gamma, total, before, out = ema.sigma_rel_to_gamma(sigma_rel), sum(step_tokens), 0, 0
        for n, s in zip(step_tokens, states):
            weight = ((before + n) / total) ** (gamma + 1) - (before / total) ** (gamma + 1)
            out = out + weight * s["model"][key].double()
            before += n
        return out

    names = [n for n, _ in build_model(GPTConfig(**states[-1]["model_config"])).named_parameters()]
    assert torch.allclose(states[-1]["emas"][0]["ema"][names.index(key)].double(), power_average(0.1), atol=1e-6)
    # post hoc, from the snapshots at steps 2, 4, 6, 8 (widths 0.1 and 0.05): the tracked width exactly (a snapshot
    # itself), another as closely as continuous profiles fit an average of 8 steps (measured: 24% of the EMA's effect,
    # where the tracked 0.1 alone is off by 85%); test_ema.py measures the fit over 2,000 steps
    assert sorted(p.name for p in (tmp_path / "every" / "ema").iterdir()) == [f"ema_{i:07d}.pt" for i in (2, 4, 6, 8)]
    for sigma_rel, tolerance in ((0.1, 1e-5), (0.2, 0.4)):
        out = ema.main([str(tmp_path / "every"), "--sigma-rel", str(sigma_rel)])
        got = torch.load(out, weights_only=True)["model"][key].double()
        expected, raw = power_average(sigma_rel), states[-1]["model"][key].double()
        assert (got - expected).norm() <= tolerance * (expected - raw).norm(), sigma_rel  # relative to the EMA's effect
    hellaswag.main(["--checkpoint", out, "--data", str(ROOT / "tests" / "data" / "hellaswag_fixture.jsonl"), "--device", "cpu"])
    # resuming from an earlier checkpoint abandons the later timeline: its snapshots go with its checkpoints
    earlier = str(tmp_path / "every" / "ckpt_0000004.pt")
    run_loop(shards, tmp_path, "--max-steps", "8", "--val-every", "0", "--checkpoint-every", "1", "--keep-checkpoints",
             "0", "--ema-sigma-rel", "0.1", "--ema-snapshot-every", "2", *ramped, "--resume", earlier, "--stop-at", "5",
             name="every")
    assert sorted(p.name for p in (tmp_path / "every" / "ema").iterdir()) == ["ema_0000002.pt", "ema_0000004.pt"]


@pytest.mark.parametrize("preset,expected", [
    ("tiny-edm2", dict(mode="edm2", edm2_storage="elements", max_lr=4.8e-2)),  # the presets sweep's best
    ("tiny-hypersphere", dict(mode="hypersphere", max_lr=1.2e-2)),
    ("tiny-manifold", dict(optimizer="muon", muon_manifold="stiefel", muon_lr=0.03)),
])
def test_constrained_presets_take_their_tuned_lr_on_the_tiny_schedule(preset, expected):
    cfg, _ = config.parse_config(["--preset", preset])
    values = {**vars(cfg), **vars(cfg.model)}
    assert {k: values[k] for k in expected} == expected
    tiny, _ = config.parse_config(["--preset", "tiny"])
    tiny = {**vars(tiny), **vars(tiny.model)}
    for field in ("max_steps", "warmup_steps", "schedule", "weight_decay", "beta2", "n_embd"):  # the tiny schedule's
        assert values[field] == tiny[field], field
    assert preset in config.PRESET_DATA  # the data hint of a missing data_dir covers it


def test_124m_constrained_presets_scale_their_tiny_lr_as_their_papers():
    def cfg(preset):
        return config.parse_config(["--preset", preset])[0]
    # EDM2's configs (NVlabs/edm2 train_edm2.py): lr x (width ratio) ** -0.5, from 128 wide to GPT-2's 768
    assert cfg("gpt2-124m-edm2").model.mode == "edm2" and cfg("gpt2-124m-edm2").model.n_embd == 768
    assert cfg("gpt2-124m-edm2").max_lr == pytest.approx(cfg("tiny-edm2").max_lr * math.sqrt(128 / 768), rel=1e-3)
    # manifold Muon: weights and steps at fixed spectral norms, so the tiny lr as it is
    assert cfg("gpt2-124m-manifold").muon_lr == cfg("tiny-manifold").muon_lr
    assert cfg("gpt2-124m-manifold").muon_manifold == "stiefel"
    # nGPT sweeps each size: its 0.5B bests 2.5e-3 (10k steps), 1.5e-3 to 2e-3 (50k) (NVIDIA/ngpt hyperparams.png)
    assert cfg("gpt2-124m-hypersphere").model.mode == "hypersphere"
    assert 1.5e-3 <= cfg("gpt2-124m-hypersphere").max_lr <= 2.5e-3
    gpt2 = cfg("gpt2-124m")
    for preset in ("gpt2-124m-edm2", "gpt2-124m-hypersphere", "gpt2-124m-manifold"):  # otherwise GPT-2's run
        c = cfg(preset)
        assert (c.max_steps, c.total_batch_size, c.schedule, c.warmup_steps) == (
            gpt2.max_steps, gpt2.total_batch_size, gpt2.schedule, gpt2.warmup_steps)
