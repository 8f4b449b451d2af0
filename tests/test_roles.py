"""Per-role AdamW settings against hand-written tables of parameter names, GPT-2's and the presets' groups against
torch's AdamW built by hand, and nanochat's inits and forward switches (embed_norm, qk_norm_scale, its value-embedding
gate and x0 ramps) against float64 hand computations."""

import dataclasses
import math
import re
import shlex

import pytest
import torch

from conftest import ROOT
from gpt2.config import ADAM_ROLES, parse_config
from gpt2.models import build_model
from gpt2.optim import ROLES, build_optimizers, param_roles
from model import GPTConfig

TINY = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--vocab-multiple", "1"]
SPEEDRUN_PARTS = ["--value-embeds", "1", "--unet", "1", "--x0-mix", "1", "--sinks", "1", "--tie-head", "0"]


def _setup(*flags, n_embd=32):
    """parse_config's TrainConfig of flags on a 64-token vocabulary, its model (seed 0), the optimizers and a map
    from each parameter's name to its group in them."""
    cfg, _ = parse_config([*TINY, "--n-embd", str(n_embd), *flags])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=64))
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizers = build_optimizers(cfg, model, "cpu")
    groups = {id(p): g for opt in optimizers for g in opt.param_groups for p in g["params"]}
    return model, optimizers, {name: groups[id(p)] for name, p in model.named_parameters()}


# the tiny speedrun model's parameters by role, written out (2 layers: layer 1 has the value embedding)
LAYER = ["ln_1.weight", "ln_1.bias", "attn.c_attn.bias", "attn.c_proj.bias", "attn.sinks", "ln_2.weight",
         "ln_2.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"]
HAND_ROLES = {
    "embed": ["transformer.wte.weight", "transformer.wpe.weight"],
    "head": ["lm_head.weight"],
    "value_embed": ["transformer.ve.1.weight"],
    "scalar": [f"transformer.h.{i}.{n}" for i in (0, 1) for n in LAYER]
    + ["transformer.ln_f.weight", "transformer.ln_f.bias", "skip_weights", "x_lambdas"],
    "x0": ["x0_lambdas"],
    "gate": ["transformer.h.1.attn.ve_gate.weight"],
    None: [f"transformer.h.{i}.{n}.weight" for i in (0, 1) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                        "mlp.c_proj")],
}
# every role at values of its own: (lr, betas, weight decay); None: the matrices at the global ones
HAND_SETTINGS = {
    "embed": (0.3, (0.8, 0.995), 0.001), "head": (0.008, (0.8, 0.96), 0.01), "value_embed": (0.15, (0.75, 0.99), 0.02),
    "scalar": (0.005, (0.85, 0.97), 0.05), "x0": (0.5, (0.96, 0.9), 0.0), "gate": (0.2, (0.7, 0.92), 0.0),
    None: (3e-3, (0.9, 0.95), 0.1),
}


def _role_flags(role, lr, betas, wd):
    flag = "--adam-" + role.replace("_", "-")
    values = {"lr": lr, "beta1": betas[0], "beta2": betas[1], "wd": wd}
    return [arg for key, value in values.items() for arg in (f"{flag}-{key}", str(value))]


def test_every_role_setting_lands_in_the_group_of_its_parameters():
    flags = [f for role, s in HAND_SETTINGS.items() if role for f in _role_flags(role, *s)]
    model, (adamw,), group_of = _setup(*SPEEDRUN_PARTS, *flags)
    assert sorted(n for names in HAND_ROLES.values() for n in names) == sorted(group_of)  # the table is complete
    for role, names in HAND_ROLES.items():
        lr, betas, wd = HAND_SETTINGS[role]
        for name in names:
            g = group_of[name]
            assert (g["lr"], g["initial_lr"], g["betas"], g["weight_decay"]) == (lr, lr, betas, wd), name
            assert g["eps"] == 1e-8, name
    # one group per role (matrices and the 2-D roles from the decayed group, scalar and x0 from the other), each
    # parameter in exactly one
    assert len(adamw.param_groups) == 7
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(group_of)


def test_unset_settings_come_from_the_parent_role_or_the_global_ones():
    flags = ["--adam-embed-lr", "0.3", "--adam-embed-beta2", "0.995", "--adam-embed-wd", "0", "--adam-value-embed-lr",
             "0.15", "--adam-scalar-beta1", "0.8", "--adam-gate-wd", "0"]
    _, (adamw,), group_of = _setup(*SPEEDRUN_PARTS, *flags)
    setting = lambda name: (group_of[name]["lr"], group_of[name]["betas"], group_of[name]["weight_decay"])
    assert setting("transformer.wte.weight") == (0.3, (0.9, 0.995), 0.0)
    assert setting("transformer.ve.1.weight") == (0.15, (0.9, 0.995), 0.0)  # betas and decay: embed's
    assert setting("lm_head.weight") == (3e-3, (0.9, 0.95), 0.1)  # nothing set: the global ones
    assert setting("x_lambdas") == (3e-3, (0.8, 0.95), 0.0)  # 1-D: no decay, as in GPT-2
    assert group_of["x0_lambdas"] is group_of["x_lambdas"]  # no x0 setting: in the scalar group, as before x0 existed
    assert setting("transformer.h.1.attn.ve_gate.weight") == (3e-3, (0.9, 0.95), 0.0)
    assert group_of["transformer.h.1.attn.ve_gate.weight"] is not group_of["transformer.h.0.attn.c_attn.weight"]


def test_width_scale_is_nanochats_for_embed_head_and_value_embed():
    """nanochat: lr x (n_embd / 768) ** -0.5 for the tables and the head; at 32 wide that is sqrt(24)."""
    flags = ["--adam-width-scale", "1", "--adam-embed-lr", "0.3", "--adam-head-lr", "0.008", "--adam-scalar-lr", "0.5"]
    _, _, group_of = _setup(*SPEEDRUN_PARTS, *flags)
    lr = {name: g["lr"] for name, g in group_of.items()}
    assert lr["transformer.wte.weight"] == pytest.approx(0.3 * math.sqrt(24), rel=1e-12)
    assert lr["transformer.ve.1.weight"] == pytest.approx(0.3 * math.sqrt(24), rel=1e-12)  # embed's lr, scaled
    assert lr["lm_head.weight"] == pytest.approx(0.008 * math.sqrt(24), rel=1e-12)
    assert lr["x0_lambdas"] == lr["skip_weights"] == 0.5 and lr["transformer.h.0.mlp.c_fc.weight"] == 3e-3
    _, _, wide = _setup("--adam-width-scale", "1", n_embd=192)  # nothing set: max_lr, doubled at 768 / 4
    assert wide["transformer.wte.weight"]["lr"] == pytest.approx(3e-3 * 2, rel=1e-12)


def test_readmes_nanochat_line_gives_nanochats_groups():
    """README's nanochat flags on the tiny speedrun model, against nanochat's setup_optimizer (gpt.py @ 92d63d4)
    with base_train's lrs (embedding 0.3, unembedding 0.008, scalar 0.5), written out; width 32: x sqrt(24)."""
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"### Per-role learning rates.*?```bash\n(.*?)\n```", readme, re.S).group(1)
    _, (adamw, _), group_of = _setup("--preset", "tiny-speedrun", "--x0-mix", "1", *shlex.split(line))
    scale = math.sqrt(24)
    nanochat = {"transformer.wte.weight": (0.3 * scale, (0.8, 0.995), 0.001),
                "lm_head.weight": (0.008 * scale, (0.8, 0.96), 0.01),
                "transformer.ve.1.weight": (0.3 * scale * 0.5, (0.8, 0.995), 0.01),
                "x_lambdas": (0.5 * 0.01, (0.8, 0.95), 0.05),  # its resid_lambdas
                "x0_lambdas": (0.5, (0.96, 0.95), 0.0)}
    for name, (lr, betas, wd) in nanochat.items():
        g = group_of[name]
        assert (g["lr"], g["betas"], g["weight_decay"], g["eps"]) == (pytest.approx(lr, rel=1e-12), betas, wd, 1e-10)


def _torch_adamw(groups, lr, betas=(0.9, 0.95)):
    """torch's AdamW over hand-made groups: what the repo built before the roles (a second code path)."""
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return opt.param_groups


def _same_groups(built, expected):
    assert len(built) == len(expected)
    for g, e in zip(built, expected):
        assert [id(p) for p in g["params"]] == [id(p) for p in e["params"]]
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in e.items() if k != "params"}


@pytest.mark.parametrize("preset", ["gpt2-124m", "tiny-modern", "tiny-speedrun"])
def test_default_and_presets_build_the_groups_they_built_before_roles(preset):
    """GPT-2: one AdamW, matrices and tables decayed, 1-D parameters not; modern and speedrun: the same over what
    Muon leaves (the tables and the head), Muon the blocks' matrices (the value-embedding gate included)."""
    model, optimizers, _ = _setup("--preset", preset)
    params = dict(model.named_parameters())
    muon = [p for n, p in params.items() if n.startswith("transformer.h.") and p.dim() == 2] if preset != "gpt2-124m" \
        else []
    decayed = [p for p in params.values() if p.dim() == 2 and all(p is not q for q in muon)]
    one_d = [p for p in params.values() if p.dim() == 1]
    lr = 3e-3 if preset.startswith("tiny") else 6e-4
    _same_groups(optimizers[0].param_groups, _torch_adamw([{"params": decayed, "weight_decay": 0.1},
                                                           {"params": one_d, "weight_decay": 0.0}], lr))
    assert [p for g in optimizers[1:] for group in g.param_groups for p in group["params"]] == muon


def test_old_role_lrs_build_the_groups_they_built_before():
    """--adam-embed-lr, --adam-head-lr and --adam-scalar-lr from before (on the speedrun preset as it was, head
    untied): the value-embedding tables with the token table, the x0 lambdas with the scalars, the gate with Muon;
    groups in the order none, embed, head, scalar."""
    model, (adamw, _), _ = _setup("--preset", "tiny-speedrun", "--tie-head", "0", "--untie-at", "0", "--x0-mix", "1",
                                  "--adam-embed-lr", "0.1", "--adam-head-lr", "0.02", "--adam-scalar-lr", "0.3")
    p = dict(model.named_parameters())
    scalars = [q for q in model.parameters() if q.dim() == 1]
    expected = _torch_adamw([{"params": [p["transformer.wte.weight"], p["transformer.ve.1.weight"]], "lr": 0.1,
                              "weight_decay": 0.1},
                             {"params": [p["lm_head.weight"]], "lr": 0.02, "weight_decay": 0.1},
                             {"params": scalars, "lr": 0.3, "weight_decay": 0.0}], 3e-3)
    _same_groups(adamw.param_groups, expected)


def test_optim_role_tags_win_over_the_name_rules():
    model, _, _ = _setup()
    model.transformer.h[0].mlp.optim_role = "gate"
    model.transformer.h[0].mlp.c_proj.optim_role = "scalar"  # the innermost tag wins
    roles = {n: param_roles(model).get(id(p)) for n, p in model.named_parameters(remove_duplicate=False)}
    assert roles["transformer.h.0.mlp.c_fc.weight"] == roles["transformer.h.0.mlp.c_fc.bias"] == "gate"
    assert roles["transformer.h.0.mlp.c_proj.weight"] == "scalar"
    assert roles["transformer.wte.weight"] == roles["lm_head.weight"] == "head"  # tied: the head's
    assert roles["transformer.h.1.mlp.c_fc.weight"] is None  # a matrix
    assert set(ROLES) == set(ADAM_ROLES)  # every role with flags has a place in optim's table
    model.transformer.h[1].optim_role = "embedding"
    with pytest.raises(ValueError, match="'embedding' is not one of"):
        param_roles(model)


# ---------------------------------------------------------------------- nanochat's switches


SMALL = dict(block_size=16, vocab_size=64, n_layer=4, n_head=2, n_embd=32)


def _rms_norm64(x):
    return x / (x.square().mean(-1, keepdim=True) + torch.finfo(torch.float32).eps).sqrt()


def test_embed_norm_is_the_rms_normed_token_plus_position_embedding():
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SMALL, embed_norm=True))
    idx = torch.randint(0, 64, (2, 10))
    wte, wpe = model.transformer.wte.weight.double(), model.transformer.wpe.weight.double()
    expected = _rms_norm64(wte[idx] + wpe[3:13])
    assert torch.allclose(model.embed(idx, 3).double(), expected, rtol=1e-6, atol=1e-6)


def test_qk_norm_scale_multiplies_the_scores_by_its_square():
    """One layer's attention against the written-out formula in float64: softmax((s q)(s k)^T / sqrt(D)) v."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SMALL, qk_norm=True, qk_norm_scale=1.2))
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 9, 32)
    W, b = attn.c_attn.weight.double(), attn.c_attn.bias.double()
    q, k, v = (t.view(2, 9, 2, 16).transpose(1, 2) for t in (x.double() @ W.T + b).split(32, dim=-1))
    scores = (1.2 * _rms_norm64(q)) @ (1.2 * _rms_norm64(k)).transpose(-1, -2) / math.sqrt(16)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32)
    expected = y @ attn.c_proj.weight.double().T + attn.c_proj.bias.double()
    assert torch.allclose(attn(x).double(), expected, atol=1e-5)


def test_nanochat_gate_and_x0_ramps_at_init_and_in_the_forward():
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SMALL, value_embeds=True, ve_gate="nanochat", x0_mix=True,
                                  x0_mix_init="nanochat"))
    # nanochat: resid 1.15 - 0.10 i / (L - 1), x0 0.20 - 0.15 i / (L - 1), L = 4
    assert torch.allclose(model.x_lambdas.double(), torch.tensor([1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05],
                                                                 dtype=torch.float64), atol=1e-7)
    assert torch.allclose(model.x0_lambdas.double(), torch.tensor([0.20, 0.15, 0.10, 0.05], dtype=torch.float64),
                          atol=1e-7)
    attn = model.transformer.h[1].attn
    w = attn.ve_gate.weight
    assert w.shape == (2, 12) and 0 <= w.min() and w.max() <= 0.02 and w.std() > 0.002  # U(0, 0.02)
    # the gate: 3 sigmoid of the first 12 input channels, per kv head, times the value embedding, added to v
    x, ve = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    _, _, v = attn.qkv(x)
    gate = 3 * torch.sigmoid(x[..., :12].double() @ w.double().T)  # (B, T, heads)
    v_gated = v.double() + gate.transpose(1, 2)[..., None] * ve.double().view(2, 5, 2, 16).transpose(1, 2)
    captured = {}
    attn.attend = lambda q, k, v, cache, mask: captured.setdefault("v", v)
    attn.heads(x, ve=ve)
    assert torch.allclose(captured["v"].double(), v_gated, atol=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--adam-embed-wd", "-0.5"], "--adam-embed-wd must be >= 0, or -1 (unset)"),
    (["--adam-gate-beta2", "1"], "--adam-gate-beta2 must be in [0, 1)"),
    (["--adam-x0-lr", "-1"], "--adam-x0-lr must be >= 0"),
    (["--ve-gate", "nanochat"], "acts on value_embeds only"),
    (["--qk-norm-scale", "1.2"], "turn it on (--qk-norm 1)"),
    (["--x0-mix-init", "nanochat", "--value-embeds", "1"], "acts on x0_mix only"),
    (["--preset", "tiny-edm2", "--embed-norm", "1"],
     "embed_norm, bigram_rows, smear, backout, mudd and attn_gate need mode gpt2"),
])
def test_bad_role_and_nanochat_flags_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(args)
    assert message in capsys.readouterr().err
