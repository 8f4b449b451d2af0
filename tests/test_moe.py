"""Mixture of experts (moe.py): the grouped evaluation against a per-token float64 loop and the dense reference (values
and gradients, an unrouted expert included), the row layout by hand, bf16 autocast, one expert is the dense MLP, the
balancing bias does what DeepSeek-V3's rule says, FLOPs count the active experts, DDP equals gradient accumulation
bit for bit, torch.compile traces once for any routing (and where it cannot trace the grouped matmul, runs it
eagerly with the same results), the KV cache and exact resume hold (torch.compile against eager: test_arch.py)."""

import copy
import json

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from torch.nn.parallel import DistributedDataParallel as DDP

import train_gpt2
from conftest import spawn_ranks
from gpt2.models import build_model
from gpt2 import moe
from gpt2.moe import GROUPED_MM_TRACES, ROW_ALIGN, MoE, MoEGPT
from gpt2.muon import Muon
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
        shared = 0 if layer.shared is None else layer.shared(token)  # every token's, unweighted
        out.append(shared + sum(w * layer.experts[e](token) for w, e in zip(weights, chosen)))
        chosen_all.append(chosen)
    return torch.stack(out).view_as(x), chosen_all


def grads(out, leaves, grad_out):
    """d(out . grad_out) for each leaf; zeros for a leaf out of the graph (the loop's unchosen experts)."""
    found = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, found)]


# top3: hidden width 128 / 3 = 42, 168 bytes in fp32, and shared: 88 / 3 = 29; expert_matmul pads them to 16 bytes
@pytest.mark.parametrize("switch", [dict(), dict(mlp="swiglu-oss", bias=False), dict(moe_top_k=3),
                                    dict(mlp="swiglu", moe_shared=True)],
                         ids=["gelu", "swiglu-oss-no-bias", "top3", "swiglu-shared"])
def test_moe_layer_equals_per_token_loop_and_dense_reference(switch):
    layer = moe_layer(**switch)
    with torch.no_grad():  # an expert no token chooses: its block holds padding rows only
        layer.route_bias[1] = -100.0
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    layer64, x64 = copy.deepcopy(layer).double(), x.detach().double().requires_grad_()
    expected, chosen = naive_moe(layer64, x64)
    assert 1 not in sum(chosen, []) and len(set(sum(chosen, []))) == 3
    # the routing bias must steer the choice: without it some tokens would pick other experts
    unbiased = torch.topk(layer.router(x.reshape(-1, 32)), layer.top_k).indices.sort(-1).values.tolist()
    assert [sorted(c) for c in chosen] != unbiased
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_grads = grads(expected, [x64, *layer64.parameters()], grad_out)
    leaves, unrouted = [x, *layer.parameters()], {id(p) for p in layer.experts[1].parameters()}
    for out in (layer(x), layer.dense_reference(x)):
        assert out.dtype == torch.float32 and (out - expected).abs().max() < 1e-5
        # no allow_unused: every expert's weights are in the graph (DDP needs no find_unused_parameters)
        for p, g, ref in zip(leaves, torch.autograd.grad(out, leaves, grad_out.float()), ref_grads):
            assert (g - ref).abs().max() < 1e-5
            assert id(p) not in unrouted or not g.any()  # exactly zero: padding rows add nothing


def test_rows_sorted_by_expert_by_hand():
    layer = moe_layer()  # 4 experts, top 2
    # 3 tokens' choices; expert 3 gets none; expert 2 is token 0's first and token 2's second choice
    chosen = torch.tensor([[2, 0], [2, 1], [0, 2]])
    src, row, offs, expert_of_row = layer.sort_by_expert(chosen)
    A = ROW_ALIGN
    # blocks of A rows (each holds at most 3 pairs, expert 3 none), the last one up to 3 x 2 + 4 A rows
    assert offs.dtype == torch.int32 and offs.tolist() == [A, 2 * A, 3 * A, 6 + 4 * A]
    # expert 0: (token 0, choice 1), (token 2, choice 0); expert 1: (1, 1); expert 2: (0, 0), (1, 0), (2, 1)
    assert row.tolist() == [2 * A, 0, 2 * A + 1, A, 1, 2 * A + 2]
    expected_src = torch.full((6 + 4 * A,), 3)  # 3: the zero row, for every padding row
    expected_src[[0, 1, A, 2 * A, 2 * A + 1, 2 * A + 2]] = torch.tensor([0, 2, 1, 0, 1, 2])
    assert torch.equal(src, expected_src)
    assert expert_of_row.tolist() == [0] * A + [1] * A + [2] * A + [3] * (6 + A)


def test_bf16_autocast_runs_the_experts_in_bf16():
    layer = moe_layer(mlp="swiglu-oss")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    expected, _ = naive_moe(copy.deepcopy(layer).double(), x.double())
    with torch.autocast("cpu", torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16  # as the dense MLP under autocast: the experts' matmuls in bf16
    # bf16's 8 mantissa bits: ~4e-3 relative per rounding; measured 6.2e-3 here (the dense reference's too, under
    # autocast), on outputs up to 0.85
    assert 0 < (out.double() - expected).abs().max() < 2e-2


def test_top_1_is_refused_but_for_a_single_expert():
    with pytest.raises(ValueError, match="moe_top_k 1 leaves the router without gradient"):
        GPTConfig(**SMALL, moe_experts=4, moe_top_k=1)
    GPTConfig(**SMALL, moe_experts=1, moe_top_k=1)  # the dense MLP: no routing to learn (next test)
    with pytest.raises(ValueError, match="moe_shared needs moe_experts > 0"):
        GPTConfig(**SMALL, moe_shared=True)


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
    shared = build_model(GPTConfig(**SMALL, moe_experts=4, moe_top_k=2, moe_shared=True))
    expert = C * 42 + 42 * C  # width 4C / (k + 1) = 42
    per_layer = C * 3 * C + C * C + 4 * C + 3 * expert  # the 2 routed experts and the shared one
    assert shared.flops_per_token(16) == 6 * (V * C + L * per_layer) + 12 * L * C * 16


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


DDP_CONFIG = dict(SMALL, vocab_size=512, moe_experts=8, moe_top_k=2, moe_bias_rate=0.01)


def _train_three_steps(model, step_model, micro_batches, scale):
    """Muon (the blocks' matrices, experts' included; under DDP each rank orthogonalizes its share) and AdamW
    steps, each over its micro-batches: the backward of step_model's loss times scale for each, then the steps
    and the rebalancing. Returns the gradient of an expert no token chooses, after the first step's micro-batches."""
    adamw = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 1e-8, "cpu", exclude=model.hidden_matrices())
    muon = Muon(model.hidden_matrices(), lr=0.05)
    unrouted = None
    for step in micro_batches:
        for x, y in step:
            (step_model(x, y, return_logits=False)[1] * scale).backward()
        unrouted = model.transformer.h[0].mlp.experts[7].c_fc.weight.grad.clone() if unrouted is None else unrouted
        for optimizer in (adamw, muon):
            optimizer.step()
            optimizer.zero_grad()
        model.after_step()
    return unrouted


def _moe_model():
    torch.manual_seed(0)
    model = build_model(GPTConfig(**DDP_CONFIG))
    with torch.no_grad():
        for layer in model.moe_layers():  # expert 7 is never chosen: DDP must still get its (zero) gradients
            layer.route_bias[7] = -100.0
    return model


def _micro_batches(world):
    g = torch.Generator().manual_seed(5)
    return [[(torch.randint(0, 512, (2, 16), generator=g), torch.randint(0, 512, (2, 16), generator=g))
             for _ in range(world)] for _ in range(3)]


def _state(model):
    return torch.cat([t.detach().float().flatten() for t in model.state_dict().values()])  # routing biases too


def _ddp_rank(rank, world, out):
    model = _moe_model()
    ddp = DDP(model)  # no find_unused_parameters
    _train_three_steps(model, ddp, [[step[rank]] for step in _micro_batches(world)], 1.0)
    gathered = [torch.empty_like(_state(model)) for _ in range(world)]
    dist.all_gather(gathered, _state(model))
    if rank == 0:
        torch.save(gathered, out)
    del ddp  # the DDP reducer's threads must be gone before the process group (else a rare abort at exit)


def test_ddp_equals_gradient_accumulation_bit_for_bit(tmp_path):
    spawn_ranks(_ddp_rank, 2, tmp_path / "w.pt")
    rank0, rank1 = torch.load(tmp_path / "w.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: CPU sums depend on the thread count
    try:  # one process: both ranks' micro-batches accumulated, each loss halved (DDP averages the ranks' gradients)
        model = _moe_model()
        unrouted = _train_three_steps(model, model, _micro_batches(2), 0.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(rank0, rank1) and torch.equal(rank0, _state(model))
    assert not unrouted.any()  # a gradient, all zeros
    assert not torch.equal(rank0, _state(_moe_model()))  # the steps moved the weights


def test_compiled_moe_traces_once_for_any_routing():
    # one layer (tracing time), the full-logits loss (the chunked one breaks the graph itself, experts or not)
    model = build_model(GPTConfig(**{**DDP_CONFIG, "n_layer": 1}), loss_chunk_elements=0)
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounter()  # eager, counting the frames it is given to compile
    compiled = torch.compile(model, backend=backend)
    g = torch.Generator().manual_seed(3)
    frames, choices = [], []
    bf16 = torch.float32 not in GROUPED_MM_TRACES  # torch 2.11 traces the grouped matmul in bf16 only
    for step in range(4):
        if step == 2:  # an expert no token chooses: an empty block must not change the graph
            model.moe_layers()[0].route_bias[5] = -100.0
        for _ in range(2):  # micro-batches: step_counts None, then a tensor
            x = torch.randint(0, 512, (2, 16), generator=g)
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                compiled(x, x, return_logits=False)[1].backward()
        choices.append(model.moe_layers()[0].step_counts.tolist())
        model.after_step()
        frames.append(backend.frame_count)
    torch._dynamo.reset()
    assert len({tuple(c) for c in choices}) == 4 and choices[2][5] == choices[3][5] == 0  # four routings
    # traced in the first step only: for its first micro-batch (step_counts None) and its second (a tensor)
    assert frames == [2, 2, 2, 2]
    assert not counters["graph_break"]


def test_compiled_moe_runs_the_grouped_matmul_eagerly_where_it_cannot_trace(monkeypatch):
    # as on torch 2.11, whose compiler traces torch._grouped_mm in bf16 only: float32 breaks the graph instead
    monkeypatch.setattr(moe, "GROUPED_MM_TRACES", (torch.bfloat16,))
    torch.manual_seed(0)
    model = build_model(GPTConfig(**{**DDP_CONFIG, "n_layer": 1}), loss_chunk_elements=0)
    x = torch.randint(0, 512, (2, 16))
    eager = model(x, x, return_logits=False)[1]
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")(x, x, return_logits=False)[1]
    compiled.backward()
    torch._dynamo.reset()
    assert counters["graph_break"]  # the grouped matmuls ran outside the graph
    assert abs(compiled.item() - eager.item()) < 1e-5
    for p, g in zip(model.parameters(), eager_grads):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)
