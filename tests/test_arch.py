"""The architecture switches: attention paths against a naive reference, RoPE against complex rotation,
every switch builds, trains a step, generates with the KV cache and compiles."""

import copy
import math

import pytest
import torch
from torch._inductor import cpu_vec_isa

import gpt2.attention as attention_module
from gpt2.attention import EOT, attention, flex_attend
from gpt2.hf_io import export_hf
from gpt2.models import build_model
from model import GPT, MLP, GPTConfig, apply_rope, rope_tables

SMALL = dict(block_size=32, n_layer=2, n_head=4, n_embd=32, vocab_multiple=128)
ALL_ON = dict(norm="rmsnorm", bias=False, pos="rope", mlp="swiglu", n_kv_head=2, qk_norm=True, sinks=True, window=8,
              tie_head=False, zero_init=True, softcap=15.0, doc_mask=True, value_embeds=True, unet=True, x0_mix=True,
              embed_norm=True, qk_norm_scale=1.2, ve_gate="nanochat", x0_mix_init="nanochat")
# original context 1024 puts head size 8's pairs in all three regimes: 0 kept, 1 and 2 blended, 3 interpolated
YARN = dict(pos="rope", rope_scaling="yarn", rope_original_context=1024)
# backout and mudd need more layers: tests/test_speedrun2026.py
SWITCHES = [dict(norm="rmsnorm"), dict(bias=False), dict(pos="rope"), YARN, dict(mlp="relu2"),
            dict(mlp="leaky-relu2"), dict(mlp="swiglu"), dict(mlp="swiglu-oss"), dict(n_kv_head=2), dict(n_kv_head=1),
            dict(qk_norm=True), dict(sinks=True), dict(window=8), dict(tie_head=False), dict(zero_init=True),
            dict(softcap=15.0), dict(doc_mask=True), dict(value_embeds=True), dict(unet=True), dict(x0_mix=True),
            dict(attn_gate=True), dict(bigram_rows=97), dict(smear=True), dict(mtp=2), ALL_ON]


def naive_attention(q, k, v, start, window, sinks, docs=None):
    """One query at a time, in float64, straight from the definition: softmax over the visible keys (with
    document ids docs (B, Tk), only those of the query's document), plus exp(sink) in the denominator; key/value
    head h // (H / Hkv) serves query head h."""
    B, H, Tq, D = q.shape
    group = H // k.size(1)
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    for h in range(H):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        for i in range(Tq):
            pos = start + i
            keys = [j for j in range(k.size(2)) if j <= pos and (window == 0 or pos - j < window)]
            logits = torch.einsum("bd,bjd->bj", q[:, h, i].double(), kh[:, keys]) / math.sqrt(D)
            weights = logits.exp()
            if docs is not None:
                weights = weights * (docs[:, keys] == docs[:, pos : pos + 1])
            denom = weights.sum(-1, keepdim=True) + (sinks[h].double().exp() if sinks is not None else 0.0)
            out[:, h, i] = torch.einsum("bj,bjd->bd", weights / denom, vh[:, keys])
    return out


ATTENTION_CASES = [  # (Hkv, window, sinks)
    (4, 0, False), (4, 5, False), (4, 0, True), (4, 5, True), (2, 5, True), (1, 0, True), (2, 40, False),
    (2, 0, False), (1, 0, False),
]


# document ids of two rows of 24 positions: documents open at 0, 7, 8 (one position long) and 15; at 3 and 20
DOCS = torch.tensor([[0] * 7 + [1] + [2] * 7 + [3] * 9, [0] * 3 + [1] * 17 + [2] * 4])


def _qkv(hkv, T=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, hkv, T, 16, generator=g, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, generator=g, requires_grad=True)
    return q, k, v, sinks


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose: CPU
@pytest.mark.parametrize("with_docs", [False, True], ids=["", "docs"])
@pytest.mark.parametrize("hkv,window,use_sinks", ATTENTION_CASES)
def test_attention_equals_naive_reference(hkv, window, use_sinks, with_docs, monkeypatch):
    q, k, v, sinks = _qkv(hkv)
    sinks = sinks if use_sinks else None
    docs = DOCS if with_docs else None
    expected = naive_attention(q, k, v, 0, window, sinks, docs)
    leaves = [t for t in (q, k, v, sinks) if t is not None]
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    ref_grads = torch.autograd.grad(expected, leaves, grad_out.double())
    # FlexAttention (the CUDA path) refuses backward on CPU tensors; its eager implementation is device-generic,
    # so lift that check to test the sink rescaling and its gradient here
    monkeypatch.setattr("torch.nn.attention.flex_attention._validate_device", lambda *args: None)
    paths = {"model path": attention}
    if window or use_sinks or with_docs:
        paths["flex"] = lambda q, k, v, start, window, sinks, docs: flex_attend(q, k, v, window, sinks, docs)
    for name, fn in paths.items():
        out = fn(q, k, v, 0, window, sinks, docs)
        assert (out.double() - expected).abs().max() < 1e-5, name
        grads = torch.autograd.grad(out, leaves, grad_out)
        for g, ref in zip(grads, ref_grads):
            assert (g.double() - ref).abs().max() < 1e-5, name


@pytest.mark.parametrize("with_docs", [False, True], ids=["", "docs"])
@pytest.mark.parametrize("hkv,window,use_sinks", ATTENTION_CASES)
def test_attention_decode_step_equals_naive_reference(hkv, window, use_sinks, with_docs):
    """A KV-cache step: the query at position 20 against the 21 cached keys."""
    q, k, v, sinks = (t.detach() for t in _qkv(hkv))
    sinks = sinks if use_sinks else None
    docs = DOCS[:, :21] if with_docs else None
    q, k, v = q[:, :, 20:21], k[:, :, :21], v[:, :, :21]
    out = attention(q, k, v, 20, window, sinks, docs)
    assert (out.double() - naive_attention(q, k, v, 20, window, sinks, docs)).abs().max() < 1e-5


def test_rope_is_a_complex_rotation_and_relative():
    cfg = GPTConfig(**{**SMALL, "pos": "rope", "rope_theta": 500.0})
    D = cfg.n_embd // cfg.n_head
    x = torch.randn(1, 1, 10, D, dtype=torch.float64)
    cos, sin = rope_tables(cfg, start=3, T=10, device="cpu")
    ours = apply_rope(x, cos, sin)
    # reference: pair i is the complex number x[i] + 1j * x[i + D/2], multiplied by exp(1j * pos * theta^(-2i/D))
    z = torch.complex(x[..., : D // 2], x[..., D // 2 :])
    pos = torch.arange(3, 13, dtype=torch.float64)[:, None]
    angle = pos * 500.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rotated = z * torch.polar(torch.ones_like(angle), angle)
    assert torch.allclose(ours, torch.cat([rotated.real, rotated.imag], -1), atol=1e-5)
    # what RoPE is for: a query-key dot product depends on the positions only through their difference
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    cos, sin = rope_tables(cfg, start=0, T=20, device="cpu")
    rot = lambda t, p: apply_rope(t.view(1, 1, 1, D), cos[p : p + 1], sin[p : p + 1]).flatten()
    assert torch.allclose(rot(q, 7) @ rot(k, 3), rot(q, 15) @ rot(k, 11))


def test_yarn_frequencies_and_concentration_by_hand():
    """Head size 8, theta 10^4, gpt-oss's factor 32, betas 32 and 1, original context 4096. Pair i (frequency
    10^-i) turns 4096 / (2 pi 10^i) times: 652, 65, 6.5, 0.65. Rotations = beta at i = log10(4096 / (2 pi beta)):
    1.3090 (beta 32) and 2.8142 (beta 1); so pairs 0, 1 keep their frequency, pair 3 is divided by 32 and pair 2
    is blended with ramp (2 - 1.3090) / (2.8142 - 1.3090) = 0.4591."""
    cfg = GPTConfig(**SMALL, pos="rope", rope_scaling="yarn")
    low, high = math.log10(4096 / (2 * math.pi * 32)), math.log10(4096 / (2 * math.pi))
    assert (round(low, 4), round(high, 4)) == (1.3090, 2.8142)
    ramp = (2 - low) / (high - low)
    inv_freq = [1.0, 0.1, 0.01 * (ramp / 32 + 1 - ramp), 0.001 / 32]
    concentration = 0.1 * math.log(32) + 1  # 1.3466
    cos, sin = rope_tables(cfg, start=5, T=3, device="cpu")
    pos = torch.arange(5, 8, dtype=torch.float64)[:, None]
    angles = pos * torch.tensor(inv_freq, dtype=torch.float64)
    assert torch.allclose(cos.double(), angles.cos() * concentration, atol=1e-6)
    assert torch.allclose(sin.double(), angles.sin() * concentration, atol=1e-6)
    with pytest.raises(ValueError, match="needs pos rope"):
        GPTConfig(**SMALL, rope_scaling="yarn")


def test_swiglu_oss_is_gpt_oss_formula():
    """gate = min(g, 7), linear = clamp(l, -7, 7), out = gate * sigmoid(1.702 gate) * (linear + 1), element by
    element in float64, on values inside and outside the clamps; gate half first, linear half second."""
    mlp = MLP(GPTConfig(**SMALL, mlp="swiglu-oss"))
    gate = [-9.0, -7.5, -1.0, 0.0, 0.5, 3.0, 6.9, 7.5, 12.0]
    linear = [9.0, -8.0, 2.0, -3.0, 7.1, -7.1, 0.25, 1.0, -0.5]
    expected = []
    for g, l in zip(gate, linear):
        g, l = min(g, 7.0), max(-7.0, min(l, 7.0))
        expected.append(g / (1 + math.exp(-1.702 * g)) * (l + 1))
    out = mlp.activation(torch.tensor(gate + linear, dtype=torch.float64))
    assert torch.allclose(out, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert mlp.c_fc.weight.shape == (2 * 88, 32)  # swiglu's width: 8/3 n_embd, rounded to 8


@pytest.mark.parametrize("kind,slope", [("relu2", 0.0), ("leaky-relu2", 0.5)])
def test_squared_relus_are_their_formulas(kind, slope):
    """relu2: x^2 for x > 0, else 0; leaky-relu2: x^2 for x > 0, else (0.5 x)^2; element by element, with the
    gradient 2x, else 2 slope^2 x."""
    mlp = MLP(GPTConfig(**SMALL, mlp=kind))
    values = [-3.0, -0.5, -1e-3, 0.0, 1e-3, 0.7, 2.5]
    h = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    mlp.activation(h).sum().backward()
    assert mlp.activation(h).tolist() == [v * v if v > 0 else (slope * v) ** 2 for v in values]
    assert torch.allclose(h.grad, torch.tensor([2 * v if v > 0 else 2 * slope**2 * v for v in values],
                                               dtype=torch.float64), atol=1e-15)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, 50257, (2, 16), generator=g), torch.randint(0, 50257, (2, 16), generator=g)
    x[0, 5] = x[0, 6] = x[1, 11] = EOT  # documents for doc_mask: 0-4, 5, 6-15 and 0-10, 11-15
    return x, y


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_switch_trains_and_both_loss_paths_agree(switch):
    torch.manual_seed(0)
    config = GPTConfig(**SMALL, **switch)
    model = build_model(config, loss_chunk_elements=3 * config.padded_vocab_size)  # 3 rows a chunk: 11 chunks
    x, y = _batch()
    # the full-logits path (F.cross_entropy on model.logits) is the reference for the chunked loss, soft-cap included
    logits, full = model(x, y)
    assert logits.shape == (2, 16, model.config.padded_vocab_size)
    assert abs(full.item() - math.log(50257)) < 1.0  # near uniform at init
    full.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in ref.values())
    model.zero_grad()
    _, chunked = model(x, y, return_logits=False)
    chunked.backward()
    assert abs(chunked.item() - full.item()) < 1e-5
    # both fp32 paths against the full-logits path in float64: they sum in different orders (which depend on the
    # CPU's kernels), so the chunked gradient must be as exact as the fp32 full-logits one, up to a factor 64 and one
    # fp32 ulp of the tensor's largest gradient (measured worst: 18x, on AVX2 and AVX-512 alike); a wrong formula
    # is off by a share of the gradient itself, ~1e6 times more
    exact = copy.deepcopy(model).double()
    exact.zero_grad()
    exact(x, y)[1].backward()
    ulp = torch.finfo(torch.float32).eps
    for (n, p), p64 in zip(model.named_parameters(), exact.parameters()):
        full_error = (ref[n].double() - p64.grad).abs().max()
        assert (p.grad.double() - p64.grad).abs().max() <= 64 * (full_error + ulp * p64.grad.abs().max()), n
    # one AdamW step lowers the loss on this batch
    opt = model.configure_optimizers(0.0, 1e-2, (0.9, 0.95), 1e-8, "cpu")
    opt.step()
    assert model(x, y, return_logits=False)[1].item() < chunked.item()


@pytest.mark.parametrize("switch", [ALL_ON, dict(pos="rope", window=5), dict(sinks=True, n_kv_head=1),
                                    dict(n_kv_head=2), dict(doc_mask=True)])
def test_kv_cache_generation_equals_full_rerun(switch):
    torch.manual_seed(0)
    # zero-init blocks would ignore context
    model = build_model(GPTConfig(**{**SMALL, **switch, "zero_init": False})).eval()
    prompt = torch.randint(0, 50257, (2, 6))
    prompt[0, 3] = EOT  # with doc_mask, row 0 generates in the document opened at position 3
    out = model.generate(prompt, 12, temperature=0)
    seq = prompt
    for _ in range(12):  # no cache: the whole sequence through forward() every step
        seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def _flex_on_cpu(monkeypatch):
    """Run the model's compiled-CUDA attention path, FlexAttention, eagerly on the CPU (see the reference test
    above): every prefill takes it, as inside torch.compile on CUDA."""
    monkeypatch.setattr(attention_module, "flex_runs", lambda device, start: start == 0)
    monkeypatch.setattr("torch.nn.attention.flex_attention._validate_device", lambda *args: None)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("path", ["sdpa-mask", "written-out", "flex", "flex-window-sinks"])
def test_doc_mask_packed_document_gets_its_logits_alone(path, monkeypatch):
    """With RoPE (relative positions) a document packed after others in a row gets the logits it gets alone."""
    switch = dict(window=6, sinks=True) if path in ("written-out", "flex-window-sinks") else {}
    if path.startswith("flex"):
        _flex_on_cpu(monkeypatch)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, pos="rope", doc_mask=True, **switch)).eval()
    g = torch.Generator().manual_seed(0)
    doc = torch.randint(0, EOT, (1, 10), generator=g)
    doc[0, 0] = EOT
    before = torch.randint(0, EOT, (1, 13), generator=g)  # the end of a document, then one of its own at 5
    before[0, 5] = EOT
    with torch.no_grad():
        alone = model(doc)[0][..., : model.config.vocab_size]
        packed = model(torch.cat([before, doc], 1))[0][:, 13:, : model.config.vocab_size]
        model.config.doc_mask = False  # the same weights attending across documents see the others
        unmasked = model(torch.cat([before, doc], 1))[0][:, 13:, : model.config.vocab_size]
    assert (packed - alone).abs().max() < 1e-5
    assert (unmasked - alone).abs().max() > 1e-2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("switch,masks", [(dict(window=8, sinks=True), 2), (dict(window=8), 1),
                                          (dict(doc_mask=True), 1)])
def test_flex_block_mask_built_once_per_forward_and_window(switch, masks, monkeypatch):
    """4 layers, FlexAttention's path: one block mask per distinct window of the layers that use it (a window of 0
    without sinks or doc_mask is SDPA's), not one per layer."""
    _flex_on_cpu(monkeypatch)
    from torch.nn.attention import flex_attention as fa

    built = []
    create = fa.create_block_mask
    monkeypatch.setattr(fa, "create_block_mask", lambda *args, **kwargs: built.append(1) or create(*args, **kwargs))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, "n_layer": 4}, **switch)).eval()
    x, _ = _batch()
    with torch.no_grad():
        flex = model(x)[0]
    assert len(built) == masks
    monkeypatch.undo()  # the model's own rule: the CPU path
    with torch.no_grad():
        assert torch.allclose(model(x)[0], flex, atol=1e-5)  # the CPU path agrees


@pytest.mark.parametrize("switch", [dict(window=8), dict(sinks=True), dict(doc_mask=True, n_kv_head=1)],
                         ids=["window", "sinks", "docs-gqa"])
def test_uncompiled_forward_on_a_flex_device_leaves_flex_attention_alone(switch, monkeypatch):
    """On a FlexAttention device (CPU stands in for CUDA) an eager forward, as HellaSwag and sampling run, takes
    the exact SDPA-mask / written-out path and builds no block mask; only a compiling forward takes FlexAttention."""
    masks = []

    def refuse(*args, **kwargs):
        raise AssertionError("FlexAttention called")

    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **switch)).eval()
    x, _ = _batch()
    with torch.no_grad():
        expected = model(x)[0]
        monkeypatch.setattr(attention_module, "FLEX_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(attention_module, "flex_attend", refuse)
        monkeypatch.setattr(attention_module, "flex_block_mask", lambda *args: masks.append(args))
        assert torch.equal(model(x)[0], expected) and masks == []  # the path of a device without FlexAttention
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # what dynamo reports while tracing
        with pytest.raises(AssertionError, match="FlexAttention called"):
            model(x)
    assert masks  # and the block masks it needs were built first


def test_switch_specifics():
    def mlp_matrix_params(mlp):
        m = GPT(GPTConfig(**{**SMALL, "n_embd": 128}, mlp=mlp)).transformer.h[0].mlp
        return m.c_fc.weight.numel() + m.c_proj.weight.numel()

    assert abs(mlp_matrix_params("swiglu") / mlp_matrix_params("gelu") - 1) < 0.01  # 3 x 128 x 344 vs 2 x 128 x 512
    base = GPT(GPTConfig(**SMALL))
    gqa = GPT(GPTConfig(**SMALL, n_kv_head=1)).transformer.h[0].attn.c_attn
    assert gqa.weight.shape == (32 + 2 * 8, 32)  # 4 query heads, one key and one value head of size 8
    rope = GPT(GPTConfig(**SMALL, pos="rope"))
    assert "transformer.wpe.weight" not in rope.state_dict()
    untied = GPT(GPTConfig(**SMALL, tie_head=False))
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()
    assert untied.num_params() == base.num_params() + base.lm_head.weight.numel()
    # untied: the token table is a lookup, the head a matmul; FLOPs count the head once either way
    assert untied.flops_per_token(16) == base.flops_per_token(16)
    windowed = GPT(GPTConfig(**{**SMALL, "n_layer": 4}, window=8))
    assert [b.attn.window for b in windowed.transformer.h] == [8, 0, 8, 0]
    no_bias = GPT(GPTConfig(**SMALL, bias=False))
    assert not any(n.endswith(".bias") for n, _ in no_bias.named_parameters())
    with pytest.raises(ValueError, match="HF GPT-2 layout"):
        export_hf(rope, "/nonexistent")
    assert GPTConfig(**SMALL, doc_mask=True).is_gpt2  # no weight changes: exported, it is evaluated per document
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(**SMALL, n_kv_head=3)
    with pytest.raises(ValueError, match="mlp"):
        GPTConfig(**SMALL, mlp="gelu2")


def test_zero_init_blocks_start_as_identity():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, zero_init=True))
    x, _ = _batch()
    tr = model.transformer
    embeddings = tr.wte(x) + tr.wpe(torch.arange(16))
    assert torch.equal(model.hidden(x), tr.ln_f(embeddings))


def test_sink_limits_and_wide_window_are_plain_attention():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SMALL)).eval()
    x, _ = _batch()
    expected = plain(x)[0]
    # a window wider than the sequence hides nothing; a sink at -inf takes no probability
    for switch in (dict(window=64), dict(sinks=True)):
        other = GPT(GPTConfig(**SMALL, **switch)).eval()
        state = plain.state_dict()
        if "sinks" in switch:
            state |= {f"transformer.h.{i}.attn.sinks": torch.full((4,), -1e4) for i in range(2)}
        other.load_state_dict(state)
        assert torch.allclose(other(x)[0], expected, atol=1e-5)


COMPILE_CASES = {  # every switch and mode in four compiles (each costs 20-40 s on 2 cores)
    "all-on": ALL_ON,
    "all-on-moe": {**ALL_ON, **YARN, "mlp": "swiglu-oss", "moe_experts": 4, "moe_top_k": 2, "moe_shared": True,
                   "zero_init": False},
    "edm2-relu2": dict(mode="edm2", mlp="relu2", softcap=30.0, window=8),
    "hypersphere": dict(mode="hypersphere", pos="rope", mlp="swiglu", sinks=True, n_kv_head=2),
}


@pytest.mark.parametrize("switch", COMPILE_CASES.values(), ids=COMPILE_CASES.keys())
def test_switches_and_modes_compile(switch):
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SMALL, **switch))
    x, y = _batch()
    _, eager = model(x, y, return_logits=False)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    eager_counts = [b.mlp.step_counts.clone() for b in model.transformer.h] if "moe_experts" in switch else []
    model.zero_grad()
    _, compiled = torch.compile(model)(x, y, return_logits=False)
    compiled.backward()
    assert abs(compiled.item() - eager.item()) < 1e-4
    for p, g in zip(model.parameters(), eager_grads):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-3)
    for block, counts in zip(model.transformer.h, eager_counts):  # the compiled forward counts expert choices too
        assert torch.equal(block.mlp.step_counts, 2 * counts)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_flex_window_path_compiles(backend):
    """FlexAttention with its block mask built inside the compiled function, as it runs on CUDA (CPU inductor
    compiles FlexAttention for inference without log-sum-exp only, so: a window, GQA, no grad, no sinks).
    aot_eager traces the block mask and the attention the way CUDA's compile does, on any CPU; inductor's CPU
    kernel runs only with 512-bit vectors: its 256-bit (AVX2) variant returns wrong values and NaN here (torch
    2.15; no upstream issue found), and the FX graph cache would hand one ISA's kernel to the other."""
    if backend == "inductor" and not str(cpu_vec_isa.pick_vec_isa()).startswith("avx512"):
        pytest.skip("inductor's CPU FlexAttention kernel is right with 512-bit vectors only (see the docstring)")
    q, k, v, _ = (t.detach() for t in _qkv(2, T=40))
    expected = naive_attention(q, k, v, 0, 5, None)
    torch._dynamo.reset()
    with torch.no_grad(), torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(flex_attend, backend=backend)(q, k, v, 5, None)
    assert (compiled.double() - expected).abs().max() < 1e-5
