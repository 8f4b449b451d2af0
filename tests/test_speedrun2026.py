"""The 2025-26 speedrun switches (bigram hash embedding, smear, backout, MUDD's dense connections, attention
output gates, multi-token prediction) against plain-Python and naive references and hand-unrolled forwards;
KV-cache decoding, torch.compile, two DDP ranks and a resume with all of them on; every refusal."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import metrics, run, spawn_ranks
from gpt2.config import TrainConfig, parse_config
from gpt2.models import build_model
from gpt2.optim import build_optimizers, mtp_weights_at, param_roles
from gpt2.runs import load_model
from model import GPT, LOSS_CHUNK_ELEMENTS, GPTConfig, KVCache, rope_tables

SMALL = dict(block_size=16, n_layer=4, n_head=4, n_embd=32, vocab_multiple=128)
ROWS = 97  # a small table: pairs collide, as they do in the records' 754,560 rows
MINE = dict(bigram_rows=ROWS, smear=True, backout=True, mudd=True, attn_gate=True, mtp=2)
ALL_ON = dict(MINE, pos="rope", n_kv_head=2, sinks=True, value_embeds=True, unet=True, x0_mix=True)


def _model(loss_chunk_elements=LOSS_CHUNK_ELEMENTS, **switches):
    """A model with the switches, its zero-init parts (tables, gates, shares) drawn at random so that they act."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SMALL, **switches), loss_chunk_elements)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lambda", "lambdas", "gate.weight")) or "bigram" in name or "dense_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def _tokens(T=16, seed=2):
    return torch.randint(0, 50257, (2, T), generator=torch.Generator().manual_seed(seed))


def python_bigram(model, idx) -> torch.Tensor:
    """The bigram embedding from a dict of every (previous, token) pair, its row and sign row computed in plain
    Python from the records' formula: row ((36313 token) xor (27191 previous)) mod (rows - 1), sign row (previous
    xor token) mod 8192; a row's first token: the last row, sign row 0; n_embd / 4 channels, zero beyond."""
    table, signs = model.transformer.bigram.weight, model.bigram_signs
    ids = idx.tolist()
    pairs = {(p, c) for row in ids for p, c in zip(row, row[1:])}
    lookup = {(p, c): table[((36313 * c) ^ (27191 * p)) % (ROWS - 1)] * signs[(p ^ c) % 8192] for p, c in pairs}
    out = torch.zeros(*idx.shape, model.config.n_embd)
    for b, row in enumerate(ids):
        out[b, 0, :8] = table[ROWS - 1] * signs[0]
        for t in range(1, len(row)):
            out[b, t, :8] = lookup[(row[t - 1], row[t])]
    return out


def test_bigram_embedding_is_a_dict_lookup_of_the_pairs():
    model = _model(bigram_rows=ROWS)
    idx = _tokens()
    idx[1, 5:8] = idx[0, 2:5]  # pairs that recur
    _, bigram = model.pair_inputs(model.embed(idx, 0), idx)
    assert torch.equal(bigram.detach(), python_bigram(model, idx))
    # the sign rows: +-1, fixed by their own seed (not the run's), and a checkpoint carries them
    other = build_model(GPTConfig(**SMALL, bigram_rows=ROWS))
    assert torch.equal(other.bigram_signs, model.bigram_signs) and "bigram_signs" in model.state_dict()
    assert set(model.bigram_signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(model.bigram_signs.mean().item()) < 0.02
    fresh = build_model(GPTConfig(**SMALL, bigram_rows=ROWS))
    assert not fresh.transformer.bigram.weight.any() and torch.allclose(fresh.bigram_lambdas, torch.tensor(0.05))


def test_smear_is_its_formula_position_by_position():
    model = _model(smear=True)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    smeared, bigram = model.pair_inputs(x, _tokens())
    w, lam = model.smear_gate.weight[0].tolist(), model.smear_lambda.item()
    assert bigram is None
    for b in range(2):
        assert torch.equal(smeared[b, 0], x[b, 0])  # no predecessor in the row
        for t in range(1, 16):
            gate = lam / (1 + math.exp(-sum(w[j] * x[b, t, j].item() for j in range(12))))
            assert torch.allclose(smeared[b, t], x[b, t] + gate * x[b, t - 1], atol=1e-6)
    fresh = build_model(GPTConfig(**SMALL, smear=True))
    assert not fresh.smear_gate.weight.any() and fresh.smear_lambda.item() == 0  # the identity at init


def test_bigram_smear_and_backout_equal_the_hand_unrolled_forward():
    """4 layers, rope: x = smear(wte); block i's input gains lambda_i * bigram; the output minus backout_lambda
    times block 2's output (2 * 4 // 3) goes to the final norm and the head of a plain GPT with the same weights."""
    model = _model(bigram_rows=ROWS, smear=True, backout=True, pos="rope").eval()
    plain = GPT(GPTConfig(**SMALL, pos="rope")).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    idx = _tokens()
    lam, w = model.bigram_lambdas, model.smear_gate.weight[0]
    with torch.no_grad():
        rope = rope_tables(model.config, 0, 16, idx.device)
        e = plain.transformer.wte(idx)
        gate = model.smear_lambda * torch.sigmoid(e[:, 1:, :12] @ w)[..., None]
        x = torch.cat([e[:, :1], e[:, 1:] + gate * e[:, :-1]], 1)
        bigram = python_bigram(model, idx)
        out0 = plain.transformer.h[0](x + lam[0] * bigram, rope)
        out1 = plain.transformer.h[1](out0 + lam[1] * bigram, rope)
        out2 = plain.transformer.h[2](out1 + lam[2] * bigram, rope)
        out3 = plain.transformer.h[3](out2 + lam[3] * bigram, rope)
        expected = plain.logits(plain.transformer.ln_f(out3 - model.backout_lambda * out2))
        assert torch.allclose(model(idx)[0], expected, atol=1e-5)
    assert build_model(GPTConfig(**SMALL, backout=True)).backout_lambda.item() == 0.5


def _dense_weights(connection, x):
    """A dense connection's per-token weights (B, T, sources) in float64: 0.1 (W2 gelu(W1 x) + b), gelu by erf."""
    W1, W2, b = (t.detach().double() for t in (connection.fc.weight, connection.proj.weight, connection.proj.bias))
    h = x.double() @ W1.T
    gelu = 0.5 * h * (1 + torch.special.erf(h / math.sqrt(2)))
    return 0.1 * (gelu @ W2.T + b)


def test_mudd_equals_the_hand_unrolled_forward():
    """4 layers: the last block's input is out2 + m0 x0 + m1 out1 + m2 out2 (block min(2 * 4 // 3, 4 - 3) = 1 is
    the source), the final norm's is out3 + n0 x0 + n1 out1 + n2 out2, m and n per token from each site's MLP; with
    the output layers at zero (a fresh model) it is the plain GPT."""
    model = _model(mudd=True, pos="rope").eval()
    plain = GPT(GPTConfig(**SMALL, pos="rope")).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    idx = _tokens()
    with torch.no_grad():
        rope = rope_tables(model.config, 0, 16, idx.device)
        x0 = plain.transformer.wte(idx)
        out0 = plain.transformer.h[0](x0, rope)
        out1 = plain.transformer.h[1](out0, rope)
        out2 = plain.transformer.h[2](out1, rope)
        m = _dense_weights(model.dense_in, out2)
        mixed = (out2.double() + m[..., 0:1] * x0 + m[..., 1:2] * out1 + m[..., 2:3] * out2).float()
        out3 = plain.transformer.h[3](mixed, rope)
        n = _dense_weights(model.dense_out, out3)
        final = (out3.double() + n[..., 0:1] * x0 + n[..., 1:2] * out1 + n[..., 2:3] * out2).float()
        assert m.abs().mean() > 0.05 and n.abs().mean() > 0.05  # the mixes act
        assert torch.allclose(model(idx)[0], plain.logits(plain.transformer.ln_f(final)), atol=1e-5)
        fresh = build_model(GPTConfig(**SMALL, mudd=True, pos="rope")).eval()
        plain.load_state_dict(fresh.state_dict(), strict=False)
        assert not fresh.dense_in.proj.weight.any() and not fresh.dense_out.proj.bias.any()
        assert torch.equal(fresh(idx)[0], plain(idx)[0])


def test_attention_gate_equals_a_naive_per_head_loop():
    model = _model(attn_gate=True, n_kv_head=2, sinks=True)  # beside the sinks
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        heads = attn.heads(x)  # (2, 16, 4 heads x 8)
        W = attn.attn_gate.weight  # (4 heads, 12 channels)
        gated = torch.empty_like(heads)
        for b in range(2):
            for t in range(16):
                for h in range(4):
                    gate = 1 / (1 + math.exp(-sum(W[h, j].item() * x[b, t, j].item() for j in range(12))))
                    gated[b, t, 8 * h : 8 * h + 8] = gate * heads[b, t, 8 * h : 8 * h + 8]
        assert torch.allclose(attn(x), attn.c_proj(gated), atol=1e-6)
        fresh = build_model(GPTConfig(**SMALL, attn_gate=True)).transformer.h[0].attn
        assert torch.allclose(fresh(x), fresh.c_proj(0.5 * fresh.heads(x)), atol=1e-6)  # sigmoid(0) at init


@pytest.mark.parametrize("chunk", [0, 5], ids=["full-logits", "chunked"])
def test_mtp_losses_equal_separate_cross_entropies(chunk):
    """Training: the loss's value is the next-token cross-entropy, its gradient that of CE(t + 1) + w1 CE(t + 2) +
    w2 CE(t + 3), each F.cross_entropy over the positions that have the target; evaluation: next-token only."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(**SMALL, mtp=2), loss_chunk_elements=chunk * 50304)
    assert model.mtp_weights.tolist() == mtp_weights_at(TrainConfig(model=model.config), 0) == [0.5, 0.25]
    model.set_mtp_weights([0.3, 0.2])
    idx, targets = _tokens(), _tokens(seed=3)
    _, loss = model(idx, targets, return_logits=False)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(idx)[0].float()  # no targets: the logits alone
    ce = lambda k: F.cross_entropy(logits[:, : 16 - k].flatten(0, 1), targets[:, k:].flatten())
    assert abs(loss.item() - ce(0).item()) < 1e-5
    (ce(0) + 0.3 * ce(1) + 0.2 * ce(2)).backward()
    for p, g in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)
    model.eval()
    assert abs(model(idx, targets)[1].item() - ce(0).item()) < 1e-5


def test_mtp_schedule_fades_the_later_tokens_out():
    """mtp 2 over 90 steps: [0.5, 0.25 (1 - 3x)] until x = 1/3, then [0.5 (1 - (3x - 1)), 0], then [0, 0]."""
    cfg = TrainConfig(max_steps=90, model=GPTConfig(mtp=2))
    steps = (0, 15, 30, 45, 60, 89, 90)
    assert [mtp_weights_at(cfg, s) for s in steps] == [
        [0.5, 0.25], [0.5, 0.125], [0.5, 0.0], [0.25, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    one = TrainConfig(max_steps=100, model=GPTConfig(mtp=1))
    assert [mtp_weights_at(one, s) for s in (0, 25, 50, 99)] == [[0.5], [0.25], [0.0], [0.0]]


def test_kv_cache_generation_equals_full_rerun_with_every_switch_on():
    """Learned positions (smear's predecessor at a decode step is embed(last token, pos - 1)), then rope; also a
    prompt fed in two chunks."""
    for pos in ("learned", "rope"):
        model = _model(**{**ALL_ON, "pos": pos}).eval()
        prompt = _tokens(5)
        out = model.generate(prompt, 11, temperature=0)
        seq = prompt
        for _ in range(11):  # no cache: the whole sequence through forward() every step
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, seq), pos
        cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
        with torch.no_grad():
            chunks = torch.cat([model.hidden(seq[:, :7], cache), model.hidden(seq[:, 7:], cache)], 1)
            assert torch.allclose(chunks, model.hidden(seq), atol=1e-5), pos


def test_compiled_equals_eager_with_every_switch_on():
    """The full-logits loss (CUDA's): the chunked one would double the compile time, and test_arch compiles it."""
    model = _model(0, **MINE, pos="rope")
    idx, targets = _tokens(), _tokens(seed=3)
    _, eager = model(idx, targets, return_logits=False)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    _, compiled = torch.compile(model, backend="aot_eager")(idx, targets, return_logits=False)
    compiled.backward()
    assert abs(compiled.item() - eager.item()) < 1e-5
    for p, g in zip(model.parameters(), eager_grads):
        assert torch.allclose(p.grad, g, atol=1e-6, rtol=1e-4)


STEPS = 2


def _optimizer(model):
    return model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 1e-8, "cpu")


def _weights(model):
    return torch.cat([t.detach().flatten() for t in model.state_dict().values()])


def _rank_batch(rank, step):
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randint(0, 50257, (2, 16), generator=g), torch.randint(0, 50257, (2, 16), generator=g)


def _ddp_rank(rank, world, out):
    model = _model(**ALL_ON)
    ddp, opt = DDP(model), _optimizer(model)
    for step in range(STEPS):
        ddp(*_rank_batch(rank, step), return_logits=False)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    weights = _weights(model)
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    if rank == 0:
        torch.save(gathered, out)
    del ddp  # the DDP reducer's threads before the process group


def test_two_ddp_ranks_are_bit_identical_to_one_process(tmp_path):
    """One process computes each rank's gradients in turn and averages them as DDP's all-reduce does."""
    spawn_ranks(_ddp_rank, 2, tmp_path / "w.pt")
    rank0, rank1 = torch.load(tmp_path / "w.pt")
    model = _model(**ALL_ON)
    params, opt = list(model.parameters()), _optimizer(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the kernels' summation order depends on it
    try:
        for step in range(STEPS):
            grads = []
            for rank in range(2):
                model(*_rank_batch(rank, step), return_logits=False)[1].backward()
                grads.append([p.grad for p in params])
                model.zero_grad(set_to_none=True)
            for p, g0, g1 in zip(params, *grads):
                p.grad = g0 / 2 + g1 / 2
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(rank0, rank1) and torch.equal(rank0, _weights(model))


SWITCH_FLAGS = ["--n-layer", "4", "--pos", "rope", "--bigram-rows", str(ROWS), "--smear", "1", "--backout", "1",
                "--mudd", "1", "--attn-gate", "1", "--mtp", "2", "--max-steps", "4", "--val-every", "2",
                "--sample-every", "0", "--checkpoint-every", "0"]


def test_resume_is_exact_with_every_switch_on(shards, tmp_path):
    """And the logged train loss is the next-token loss: at step 1 (before any update) the same as without mtp."""
    run(shards, tmp_path, *SWITCH_FLAGS, name="straight")
    run(shards, tmp_path, *SWITCH_FLAGS, "--stop-at", "2", name="resumed")
    run(shards, tmp_path, *SWITCH_FLAGS, name="resumed")
    run(shards, tmp_path, *SWITCH_FLAGS, "--mtp", "0", "--max-steps", "1", name="no-mtp")
    for kind in ("train", "val"):
        a, b = metrics(tmp_path, "straight", kind), metrics(tmp_path, "resumed", kind)
        assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]  # bit-identical on CPU
    assert metrics(tmp_path, "straight")[0]["loss"] == metrics(tmp_path, "no-mtp")[0]["loss"]
    model = load_model(str(sorted((tmp_path / "resumed").glob("ckpt_*.pt"))[-1]))  # sample.py's way in
    assert model.transformer.bigram.weight.any() and model.config.smear and model.dense_out.proj.weight.any()


def test_optimizer_roles_and_flops():
    model = build_model(GPTConfig(**SMALL, **MINE))
    assert model.transformer.bigram.optim_role == "embed"
    gates = [model.smear_gate] + [b.attn.attn_gate for b in model.transformer.h]
    assert all(g.optim_role == "gate" and g.keeps_its_scale for g in gates)
    # manifold Muon leaves the attention gates to AdamW; the table, the lambdas and the smear gate are not Muon's
    cfg, _ = parse_config(["--optimizer", "muon", "--muon-manifold", "stiefel", "--weight-decay", "0"])
    muon_params = {id(p) for group in build_optimizers(cfg, model, "cpu")[1].param_groups for p in group["params"]}
    assert not muon_params & {id(g.weight) for g in gates} and id(model.transformer.bigram.weight) not in muon_params
    dense = [m for c in (model.dense_in, model.dense_out) for m in (c.fc, c.proj)]
    assert {id(p) for m in dense for p in m.parameters()} <= set(param_roles(model)) and all(
        param_roles(model)[id(p)] == "gate" for m in dense for p in m.parameters())
    assert not muon_params & {id(p) for m in dense for p in m.parameters()}
    # the table is a lookup: FLOPs count the gates' and the dense connections' matmuls only
    plain = GPT(GPTConfig(**SMALL))
    extra = sum(m.weight.numel() for m in gates + dense)
    assert model.flops_per_token(16) == plain.flops_per_token(16) + 6 * extra
    assert GPTConfig(mtp=3).is_gpt2 and not any(GPTConfig(**{k: v}).is_gpt2 for k, v in MINE.items() if k != "mtp")


REFUSED = [
    (dict(bigram_rows=1), "bigram_rows must be 0 .off. or >= 2"),
    (dict(bigram_rows=-3), "bigram_rows must be 0 .off. or >= 2"),
    (dict(backout=True, n_layer=3), "backout needs n_layer >= 4"),
    (dict(mudd=True, n_layer=2), "mudd needs n_layer >= 3"),
    (dict(mtp=16), r"mtp must be in \[0, block_size\) = \[0, 16\)"),
    (dict(mtp=-1), r"mtp must be in \[0, block_size\)"),
    *[(dict(mode=mode, **{k: v}), "need mode gpt2") for mode in ("edm2", "hypersphere")
      for k, v in MINE.items() if k != "mtp"],
]


@pytest.mark.parametrize("switch,message", REFUSED)
def test_refusals(switch, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**SMALL, **switch})


def test_refusals_on_the_command_line_and_outside_build_model(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--seq-len", "64", "--mtp", "64"])
    assert "mtp must be in [0, block_size) = [0, 64)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--bigram-rows", "-5"])
    assert "--bigram-rows must be >= 0, got -5" in capsys.readouterr().err
    for switch in (dict(bigram_rows=ROWS), dict(smear=True), dict(backout=True), dict(mudd=True)):
        with pytest.raises(ValueError, match="need the speedrun model"):
            GPT(GPTConfig(**SMALL, **switch))
