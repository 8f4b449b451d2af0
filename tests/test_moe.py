"""Mixture of experts (moe.py): the batched layer against a per-token loop, one expert is the dense MLP, the
balancing bias does what DeepSeek-V3's rule says, FLOPs count the active experts, the KV cache and exact resume
hold (DDP: test_constraints.py; torch.compile: test_arch.py)."""

import json

import pytest
import torch

import train_gpt2
from gpt2.models import build_model
from gpt2.moe import MoE, MoEGPT
from model import GPT, GPTConfig

SMALL = dict(block_size=32, n_layer=2, n_head=4, n_embd=32, vocab_multiple=128)
LOOP = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--seq-len", "32",
        "--total-batch-size", "256", "--val-tokens", "512", "--hellaswag-every", "0", "--warmup-steps", "2",
        "--vocab-multiple", "128", "--sample-every", "0"]


def moe_layer(seed=0, **switch) -> MoE:
    """A MoE layer with every weight, bias and routing bias random (none of them at its zero init)."""
    torch.manual_seed(seed)
    layer = MoE(GPTConfig(**{**SMALL, "moe_experts": 4, "moe_top_k": 2, **switch}))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
        layer.route_bias.normal_(0, 0.5)
    return layer


def naive_moe(layer: MoE, x):
    """One token at a time, from the definition: top-k of router logits + routing bias, softmax over the chosen
    k logits (without the bias), the chosen experts run as the dense MLP module and summed with those weights."""
    out, chosen_all = [], []
    for token in x.reshape(-1, x.size(-1)):
        logits = layer.router(token)
        score = (logits + layer.route_bias).tolist()
        chosen = sorted(range(len(score)), key=lambda e: -score[e])[: layer.top_k]
        weights = torch.softmax(logits[chosen], dim=0)
        out.append(sum(w * layer.experts[e](token) for w, e in zip(weights, chosen)))
        chosen_all.append(chosen)
    return torch.stack(out).view_as(x), chosen_all


@pytest.mark.parametrize("switch", [dict(), dict(mlp="swiglu-oss", bias=False), dict(moe_top_k=3)],
                         ids=["gelu", "swiglu-oss-no-bias", "top3"])
def test_moe_layer_equals_per_token_loop(switch):
    layer = moe_layer(**switch)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    expected, chosen = naive_moe(layer, x)
    # the routing bias must steer the choice: without it some tokens would pick other experts
    unbiased = torch.topk(layer.router(x.reshape(-1, 32)), layer.top_k).indices.sort(-1).values.tolist()
    assert [sorted(c) for c in chosen] != unbiased
    leaves = [x, *layer.parameters()]
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    ref_grads = torch.autograd.grad(expected, leaves, grad_out, allow_unused=True)  # an expert nobody chose: None
    ref_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, ref_grads)]
    out = layer(x)
    assert (out - expected).abs().max() < 1e-5
    # autograd.grad refuses a leaf outside the graph: every expert takes part (DDP needs no find_unused_parameters)
    for g, ref in zip(torch.autograd.grad(out, leaves, grad_out), ref_grads):
        assert (g - ref).abs().max() < 1e-5


def test_top_1_is_refused_but_for_a_single_expert():
    with pytest.raises(ValueError, match="moe_top_k 1 leaves the router without gradient"):
        GPTConfig(**SMALL, moe_experts=4, moe_top_k=1)
    GPTConfig(**SMALL, moe_experts=1, moe_top_k=1)  # the dense MLP: no routing to learn (next test)


def test_one_expert_is_the_dense_mlp():
    torch.manual_seed(0)
    dense = GPT(GPTConfig(**SMALL, mlp="swiglu"))
    moe = build_model(GPTConfig(**SMALL, mlp="swiglu", moe_experts=1, moe_top_k=1))
    assert isinstance(moe, MoEGPT)
    state = {k.replace(".mlp.", ".mlp.experts.0."): v for k, v in dense.state_dict().items()}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all(".mlp.router." in k or k.endswith("route_bias") for k in missing)
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    (dense_logits, dense_loss), (moe_logits, moe_loss) = dense(x, x), moe(x, x)
    assert (moe_logits - dense_logits)[..., :50257].abs().max() < 1e-5  # the padded ids are -inf in both
    dense_loss.backward()
    moe_loss.backward()
    wte = lambda m: m.transformer.wte.weight.grad
    assert (wte(moe) - wte(dense)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="build_model"):  # GPT's blocks are dense: no silent dense model
        GPT(GPTConfig(**SMALL, moe_experts=4))


def test_balancing_bias_moves_toward_balance_on_skewed_routing():
    layer = moe_layer(moe_top_k=2, moe_bias_rate=0.05)
    with torch.no_grad():  # every token has expert 0 among its top 2
        layer.router.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
        layer.route_bias.zero_()
    x = torch.randn(64, 1, 32, generator=torch.Generator().manual_seed(3))
    layer(x)
    counts = torch.bincount(torch.tensor(naive_moe(layer, x)[1]).flatten(), minlength=4).float()
    assert torch.equal(layer.step_counts, counts) and counts[0] == 64
    layer.rebalance(layer.step_counts)
    # DeepSeek-V3's rule by hand: mean load 32 (64 tokens, 2 choices each); expert 0 is over it (bias - rate), the
    # others under (bias + rate)
    assert layer.route_bias.tolist() == pytest.approx([-0.05, 0.05, 0.05, 0.05])
    assert torch.equal(layer.loads, counts / 128) and layer.step_counts is None
    for _ in range(40):
        layer(x)
        layer.rebalance(layer.step_counts)
    # measured: half the choices (every token) on expert 0 at first, 0.21-0.29 on each expert from step 20 on
    assert 0.2 < layer.loads.min() <= layer.loads.max() < 0.3
    with torch.no_grad():  # evaluation forwards (val, HellaSwag under no_grad) do not count
        layer(x)
    layer.eval()
    layer(x)
    assert layer.step_counts is None


def test_model_rebalances_after_each_step_and_reports_loads():
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SMALL, moe_experts=4, moe_top_k=2, moe_bias_rate=0.01))
    assert model.moe_loads() is None
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # two micro-batches of one optimizer step: both count
        model(x, x, return_logits=False)[1].backward()
    layers = model.moe_layers()
    counts = [m.step_counts.clone() for m in layers]
    assert all(c.sum().item() == 2 * 32 * 2 for c in counts)  # 2 micro-batches x 32 tokens x top 2
    model.after_step()
    for m, c in zip(layers, counts):
        assert m.route_bias.tolist() == pytest.approx((0.01 * torch.sign(c.mean() - c)).tolist())
    assert model.moe_loads() == [[round(v, 4) for v in (c / c.sum()).tolist()] for c in counts]


def test_flops_count_the_active_experts_and_the_router():
    model = build_model(GPTConfig(**SMALL, moe_experts=4, moe_top_k=2))
    C, V, L = 32, 50304, 2
    expert = C * 2 * C + 2 * C * C  # width 4C / k = 64: c_fc and c_proj
    per_layer = C * 3 * C + C * C + 4 * C + 2 * expert  # attention, the router, the k = 2 active experts
    assert model.flops_per_token(16) == 6 * (V * C + L * per_layer) + 12 * L * C * 16


def test_kv_cache_generation_equals_full_rerun_with_moe():
    torch.manual_seed(0)
    config = GPTConfig(**SMALL, moe_experts=4, moe_top_k=2, mlp="swiglu-oss", pos="rope", rope_scaling="yarn",
                       rope_original_context=16)
    model = build_model(config).eval()
    with torch.no_grad():
        for m in model.moe_layers():
            m.route_bias.normal_(0, 0.5)
    prompt = torch.randint(0, 50257, (2, 6))
    out = model.generate(prompt, 12, temperature=0)
    seq = prompt
    for _ in range(12):  # no cache: the whole sequence through forward() every step
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_resume_is_bit_identical_with_moe(shards, tmp_path):
    common = [*LOOP, "--data-dir", shards, "--log-dir", str(tmp_path), "--max-steps", "4", "--val-every", "0",
              "--checkpoint-every", "0", "--moe-experts", "4", "--moe-top-k", "2", "--moe-bias-rate", "0.01"]
    train_gpt2.main([*common, "--run-name", "straight"])
    train_gpt2.main([*common, "--run-name", "resumed", "--stop-at", "2"])
    train_gpt2.main([*common, "--run-name", "resumed"])
    losses = lambda name: [r["loss"] for r in map(json.loads, open(tmp_path / name / "metrics.jsonl"))
                           if r["kind"] == "train"]
    assert len(losses("straight")) == 4
    assert losses("straight") == losses("resumed")  # the routing biases travel in the checkpoint
    for r in map(json.loads, open(tmp_path / "straight" / "metrics.jsonl")):
        if r["kind"] == "train":  # 2 layers of 4 experts, each layer's top-2 choices: fractions summing to 1
            assert len(r["moe_loads"]) == 2 and all(len(f) == 4 and abs(sum(f) - 1) < 1e-3 for f in r["moe_loads"])
    ckpt = torch.load(tmp_path / "resumed" / "ckpt_0000004.pt", weights_only=True)
    assert ckpt["model"]["transformer.h.0.mlp.route_bias"].abs().sum() > 0
