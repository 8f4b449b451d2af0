"""model.py against independent references: HF transformers' GPT-2, naive formulas, a second code path."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers  # a dev dependency; always installed by `uv sync`
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT
from gpt2.hf_io import export_hf, from_pretrained
from gpt2.loss import chunked_cross_entropy
from gpt2.runtime import peak_flops
from model import GPT, GPTConfig, sample_next

SMALL = dict(block_size=64, n_layer=2, n_head=4, n_embd=64)


def hf_random_model(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_positions=64, n_layer=2, n_head=4, n_embd=64, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to 0/1: perturb them so they are tested too
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(batch, length, seed=1):
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_same_as_hf(ours, hf, x):
    with torch.no_grad():
        ref = hf(input_ids=x, labels=x)
        logits, loss = ours(x)
        assert loss is None
        real = ref.logits.shape[-1]  # padded ids (-inf) are not HF's
        assert (logits[..., :real] - ref.logits).abs().max() <= 1e-5
        # with targets: HF shifts labels inside; ours takes them explicitly
        logits_t, loss_t = ours(x[:, :-1], x[:, 1:])
        assert (logits_t[..., :real] - ref.logits[:, :-1]).abs().max() <= 1e-5
        assert abs(loss_t.item() - ref.loss.item()) <= 1e-5
        _, loss_chunked = ours(x[:, :-1], x[:, 1:], return_logits=False)
        assert abs(loss_chunked.item() - ref.loss.item()) <= 1e-5


def test_hf_to_ours_logits_and_loss_match(tmp_path):
    hf = hf_random_model()
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(str(tmp_path)).eval()
    assert_same_as_hf(ours, hf, tokens(3, 50))


def test_hub_name_from_the_repo_root_goes_to_the_hub(monkeypatch):
    """`--model gpt2` run in the repo root, beside the gpt2/ package folder: the hub's weights, not that folder."""
    monkeypatch.chdir(ROOT)
    hf = hf_random_model()
    asked = []
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", lambda name: asked.append(name) or hf)
    ours = from_pretrained("gpt2").eval()
    assert asked == ["openai-community/gpt2"]
    assert_same_as_hf(ours, hf, tokens(2, 20))


@pytest.mark.parametrize("vocab_multiple", [1, 128])
def test_ours_to_hf_export_loads_in_transformers(tmp_path, vocab_multiple):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**SMALL, vocab_multiple=vocab_multiple)).eval()
    export_hf(ours, str(tmp_path))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert_same_as_hf(ours, hf, tokens(2, 64))
    # and back again: lossless for every real weight (padded embedding rows are not exported)
    again = from_pretrained(str(tmp_path), vocab_multiple=vocab_multiple)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a[:50257], b[:50257]), k


def test_chunked_loss_gradients_equal_plain_cross_entropy():
    torch.manual_seed(0)
    config = GPTConfig(**SMALL, vocab_multiple=128)
    model = GPT(config, loss_chunk_elements=7 * config.padded_vocab_size)  # several chunks, a ragged last one
    x, y = tokens(3, 40, seed=2), tokens(3, 40, seed=3)
    logits, loss = model(x)
    F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    _, loss = model(x, y, return_logits=False)
    (2.0 * loss).backward()  # a non-unit upstream gradient must scale the saved gradients
    for p, g in zip(model.parameters(), plain):
        torch.testing.assert_close(p.grad, 2.0 * g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_is_exact_for_very_improbable_targets(dtype):
    # logits hundreds of nats apart: softmax probabilities of the targets underflow to 0
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(12, 16, generator=g), 40 * torch.randn(64, 16, generator=g)
    t = torch.randint(0, 60, (12,), generator=g)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss, grad_h, _ = chunked_cross_entropy(h, w, t, 60, softcap=0.0, chunk_rows=5, with_grad=True)
        logits = (h @ w.t())[:, :60].float()
    ref = F.cross_entropy(logits, t)
    assert ref > 100 and torch.isfinite(grad_h).all()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)


def test_124m_parameter_count_and_init_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    assert model.num_params() == 124_439_808
    with torch.no_grad():
        _, loss = model(tokens(4, 128), tokens(4, 128, seed=5), return_logits=False)
    # Exact GPT-2 init: tied N(0, 0.02) embeddings read a unit-RMS final LayerNorm output, so logits are
    # ~N(0, s^2) with s^2 = 768 * 0.02^2 and the expected loss is ln(V) + s^2 / 2 (10.978), not ln(V) itself.
    s2 = 768 * 0.02**2
    assert abs(loss.item() - (math.log(50257) + s2 / 2)) < 0.03
    assert abs(loss.item() - math.log(50257)) < 0.2


def test_padded_vocab_has_zero_mass_and_same_loss():
    torch.manual_seed(0)
    padded = GPT(GPTConfig(**SMALL, vocab_multiple=128)).eval()
    assert padded.config.padded_vocab_size == 50304
    plain = GPT(GPTConfig(**SMALL)).eval()
    sd = padded.state_dict()
    sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:50257]
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    plain.load_state_dict(sd)
    with torch.no_grad():
        padded.transformer.wte.weight[50257:] = 5.0  # even large padded rows must not leak probability
    x, y = tokens(2, 64), tokens(2, 64, seed=7)
    with torch.no_grad():
        logits, loss = padded(x, y)
        _, loss_plain = plain(x, y)
        _, loss_chunked = padded(x, y, return_logits=False)
    assert logits.softmax(-1)[..., 50257:].sum().item() == 0.0
    assert abs(loss.item() - loss_plain.item()) < 1e-6
    assert abs(loss_chunked.item() - loss_plain.item()) < 1e-5


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, 3), (2.0, 2)])
def test_sample_next_draws_from_the_tempered_top_k_softmax(temperature, top_k):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    # by hand: exp(logit / T) over the k largest logits only, normalized
    weights = [math.exp(v / temperature) for v in logits[0].tolist()]
    kept = sorted(range(6), key=lambda i: -logits[0, i].item())[: top_k or 6]
    expected = torch.tensor([weights[i] if i in kept else 0.0 for i in range(6)])
    expected /= expected.sum()
    draws = sample_next(logits.expand(200_000, 6), temperature, top_k, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws.flatten(), minlength=6) / draws.numel()
    assert frequencies[expected == 0].sum() == 0  # nothing outside the top k
    assert torch.allclose(frequencies, expected, atol=0.005)  # 200k draws: a standard error under 0.0012
    assert torch.equal(sample_next(logits, 0.0, top_k), torch.tensor([[5]]))  # temperature 0: the argmax


def naive_generate(model, idx, n, temperature, top_k, generator):
    """Reference: re-run the whole sequence for every new token, no cache."""
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k, generator)), dim=1)
    return idx


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, 50), (0.8, None)])
def test_kv_cache_generation_equals_full_rerun(temperature, top_k):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, vocab_multiple=128)).eval()
    prompt = tokens(2, 7)
    with torch.no_grad():
        ref = naive_generate(model, prompt, 30, temperature, top_k, torch.Generator().manual_seed(42))
    out = model.generate(prompt, 30, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(42))
    assert out.shape == (2, 37)
    assert torch.equal(out, ref)
    assert (out < 50257).all()


def test_generation_past_block_size_is_a_clear_error():
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="block_size"):
        model.generate(tokens(1, 60), 10)


def test_flops_per_token_matches_torch_flop_counter():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, vocab_multiple=128))
    x = tokens(2, 64)
    # the math backend: its matmuls are counted by every torch (2.11's counter skips the CPU flash kernel)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(x)
    # the convention behind 6N + 12LCT: a backward pass costs twice the forward (torch's own count of the
    # backward varies across versions with how it counts flash attention's re-computation)
    assert 3 * counter.get_total_flops() == model.flops_per_token(64) * x.numel()


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None
