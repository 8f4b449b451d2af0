"""Weight-constrained modes (edm2, hypersphere), MuonH and the weight EMA: the norms they promise hold after
training, EDM2 keeps activations at unit scale through depth, each mode learns, DDP ranks stay identical (compiling
the modes: test_arch.py), and the EMA is the average it claims to be, resumes exactly and is reconstructed post hoc."""

import json
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import hellaswag
import train_gpt2
from conftest import ROOT, spawn_ranks
from gpt2 import config, ema
from gpt2.constrained import EDM2GPT, ConstrainedLinear, HypersphereGPT
from gpt2.models import build_model
from gpt2.muon import Muon
from model import ARCH_CHOICES, GPT, GPTConfig

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
    """|norm - 1| of every vector that the model's mode promises to keep on the unit sphere, computed from the
    definitions (not through the model's own projection code)."""
    c = model.config
    checks = []
    for name, p in model.named_parameters():
        if name.endswith(("wte.weight", "wpe.weight", "lm_head.weight")):
            checks.append(p.norm(dim=1))  # one unit row per token / position
    for name, m in model.named_modules():
        if isinstance(m, ConstrainedLinear):
            # hypersphere: the projections back into the residual stream have unit columns (along n_embd)
            columns = c.mode == "hypersphere" and name.endswith("c_proj")
            checks.append(m.weight.norm(dim=0 if columns else 1))
    assert checks
    return [(n - 1).abs().max().item() for n in checks]


@pytest.mark.parametrize("mode", ["edm2", "hypersphere"])
def test_mode_learns_and_keeps_its_norms(shards, tmp_path, mode):
    result, model = run_loop(shards, tmp_path, "--mode", mode, "--max-steps", "30", "--val-every", "30",
                             "--weight-decay", "0.1")
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
    # measured (2026-11-24): edm2 stays within 0.96-1.03 at every depth; GPT-2's grows from 0.0286 to 0.0489 (1.7x)
    assert all(0.9 < r < 1.1 for r in edm2), edm2
    assert gpt2[-1] / gpt2[0] > 1.4, gpt2


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
    # the checkpoint's EMA is the i^gamma-weighted average of the weights after each step (EDM2's profile),
    # recomputed here from per-step checkpoints of a third run
    run_loop(shards, tmp_path, "--max-steps", "8", "--val-every", "0", "--checkpoint-every", "1",
             "--keep-checkpoints", "0", "--ema-sigma-rel", "0.1", "--ema-snapshot-every", "2", name="every")
    states = [torch.load(tmp_path / "every" / f"ckpt_{i:07d}.pt", weights_only=True) for i in range(1, 9)]
    key = "transformer.h.0.mlp.c_fc.weight"

    def power_average(sigma_rel):  # EDM2's profile: the weights after step i count i^gamma
        gamma = ema.sigma_rel_to_gamma(sigma_rel)
        weighted = sum(i**gamma * s["model"][key].double() for i, s in enumerate(states, 1))
        return weighted / sum(i**gamma for i in range(1, 9))

    names = [n for n, _ in build_model(GPTConfig(**states[-1]["model_config"])).named_parameters()]
    assert torch.allclose(states[-1]["emas"][0]["ema"][names.index(key)].double(), power_average(0.1), atol=1e-6)
    # post hoc, from the snapshots at steps 2, 4, 6, 8 (widths 0.1 and 0.05): a tracked width exactly, another approximately
    assert sorted(p.name for p in (tmp_path / "every" / "ema").iterdir()) == [f"ema_{i:07d}.pt" for i in (2, 4, 6, 8)]
    # 8 stored profiles (steps 2, 4, 6, 8 x two widths) span every profile over 8 steps, so any width is exact up
    # to fp32 rounding here (measured 7e-6 relative); test_ema.py measures the fit over long runs
    for sigma_rel in (0.1, 0.2):
        out = ema.main([str(tmp_path / "every"), "--sigma-rel", str(sigma_rel)])
        got = torch.load(out, weights_only=True)["model"][key].double()
        expected, raw = power_average(sigma_rel), states[-1]["model"][key].double()
        assert (got - expected).norm() <= 1e-4 * (expected - raw).norm(), sigma_rel  # relative to the EMA's effect
    hellaswag.main(["--checkpoint", out, "--data", str(ROOT / "tests" / "data" / "hellaswag_fixture.jsonl"), "--device", "cpu"])
    # resuming from an earlier checkpoint abandons the later timeline: its snapshots go with its checkpoints
    earlier = str(tmp_path / "every" / "ckpt_0000004.pt")
    run_loop(shards, tmp_path, "--max-steps", "8", "--val-every", "0", "--checkpoint-every", "1", "--keep-checkpoints",
             "0", "--ema-sigma-rel", "0.1", "--ema-snapshot-every", "2", "--resume", earlier, "--stop-at", "5", name="every")
    assert sorted(p.name for p in (tmp_path / "every" / "ema").iterdir()) == ["ema_0000002.pt", "ema_0000004.pt"]


@pytest.mark.parametrize("preset,expected", [
    ("tiny-edm2", dict(mode="edm2", schedule="invsqrt", beta2=0.99, weight_decay=0.0, max_lr=1e-3, decay_ref_steps=20)),
    ("tiny-hypersphere", dict(mode="hypersphere", warmup_steps=0, weight_decay=0.0, max_lr=1.5e-3)),
])
def test_faithful_presets_set_their_papers_values(preset, expected):
    cfg, _ = config.parse_config(["--preset", preset])
    values = {**vars(cfg), **vars(cfg.model)}
    assert {k: values[k] for k in expected} == expected
    assert values["n_embd"] == 128 and values["max_steps"] == 300  # on the tiny model and budget
    assert preset in config.PRESET_DATA  # the data hint of a missing data_dir covers it
