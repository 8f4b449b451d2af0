"""The speedrun switches (value embeddings, U-net skips, x0 mixing) against hand-unrolled forwards and the plain
model, and the batch and window schedules against their formulas, in the loop and across a resume."""

import pytest
import torch

import train_gpt2
from conftest import metrics, run
from gpt2.config import TrainConfig
from gpt2.models import build_model
from gpt2.optim import micro_steps, window_at
from model import GPT, GPTConfig, rope_tables

SMALL = dict(block_size=32, n_layer=4, n_head=4, n_embd=32, vocab_multiple=128, pos="rope", n_kv_head=2)


def _models(**switches):
    """A model with the switches and a plain one holding the same shared weights."""
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SMALL)).eval()
    model = build_model(GPTConfig(**SMALL, **switches)).eval()
    assert not model.load_state_dict(plain.state_dict(), strict=False).unexpected_keys
    return plain, model


def test_value_embeds_with_zero_tables_and_identity_mixes_are_the_plain_model():
    plain, model = _models(value_embeds=True, x0_mix=True)
    with torch.no_grad():
        for table in model.transformer.ve.values():
            table.weight.zero_()
    x = torch.randint(0, 50257, (2, 20))
    assert torch.allclose(model(x)[0], plain(x)[0], atol=1e-6)


def test_value_embedding_of_one_repeated_token_is_a_value_bias():
    """Gate weights zero: gate 1, so on a sequence of one token t the layer's values gain table[t], which the plain
    model gets from adding table[t] to the value rows of c_attn's bias."""
    plain, model = _models(value_embeds=True)
    t = 1234
    with torch.no_grad():
        for layer, table in model.transformer.ve.items():
            table.weight.normal_()
            attn = plain.transformer.h[int(layer)].attn
            kv = table.weight.size(1)
            attn.c_attn.bias[-kv:] += table.weight[t]  # c_attn's rows are [q; k; v]
    x = torch.full((2, 12), t)
    assert [int(k) for k in model.transformer.ve] == [1, 3]  # every other layer, the last included
    assert torch.allclose(model(x)[0], plain(x)[0], atol=1e-5)


def test_unet_and_x0_mix_equal_the_hand_unrolled_forward():
    """4 layers: block 3's input gets block 0's output, block 2's block 1's; every input is a * x + b * x0."""
    plain, model = _models(unet=True, x0_mix=True)
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([0.7, -0.4]))
        model.x_lambdas.copy_(torch.tensor([1.1, 0.9, 0.8, 1.3]))
        model.x0_lambdas.copy_(torch.tensor([0.0, 0.2, -0.3, 0.5]))
    idx = torch.randint(0, 50257, (2, 20))
    a, b, w = model.x_lambdas, model.x0_lambdas, model.skip_weights
    with torch.no_grad():
        rope = rope_tables(model.config, 0, 20, idx.device)
        blocks = [lambda x, i=i: plain.transformer.h[i](x, rope) for i in range(4)]
        x0 = plain.transformer.wte(idx)
        out0 = blocks[0](a[0] * x0 + b[0] * x0)
        out1 = blocks[1](a[1] * out0 + b[1] * x0)
        out2 = blocks[2](a[2] * (out1 + w[1] * out1) + b[2] * x0)
        out3 = blocks[3](a[3] * (out2 + w[0] * out0) + b[3] * x0)
        expected = plain.logits(plain.transformer.ln_f(out3))
        assert torch.allclose(model(idx)[0], expected, atol=1e-5)


def test_speedrun_switches_refuse_the_constrained_modes():
    with pytest.raises(ValueError, match="need mode gpt2"):
        GPTConfig(mode="edm2", unet=True)


def test_flops_leave_out_the_value_embedding_lookups():
    _, model = _models(value_embeds=True)
    plain = GPT(GPTConfig(**SMALL))
    gates = sum(m.attn.ve_gate.weight.numel() for m in model.transformer.h if m.attn.ve_gate is not None)
    assert model.flops_per_token(32) == plain.flops_per_token(32) + 6 * gates


def test_schedules_follow_their_formulas():
    cfg = TrainConfig(max_steps=100, batch_ramp_start=0.25, batch_ramp_frac=0.4, window_start=16,
                      window_ramp_frac=0.5, model=GPTConfig(window=128))
    # batch: 0.25 + (1 - 0.25) * step / 40 of 8 micro-batches, rounded, from 2 to 8
    assert [micro_steps(cfg, s, 8) for s in (0, 10, 20, 39, 40, 99)] == [2, 4, 5, 8, 8, 8]  # 3.5 and 7.85 rounded
    # window: 16 + 112 * step / 50, rounded down to a multiple of 16
    assert [window_at(cfg, s) for s in (0, 7, 8, 25, 49, 50, 99)] == [16, 16, 32, 64, 112, 128, 128]
    off = TrainConfig(model=GPTConfig(window=64))
    assert micro_steps(off, 0, 8) == 8 and window_at(off, 0) == 64


RAMPS = ["--batch-size", "2", "--batch-ramp-start", "0.25", "--batch-ramp-frac", "0.5", "--window", "16",
         "--window-start", "4", "--value-embeds", "1", "--unet", "1", "--x0-mix", "1", "--pos", "rope",
         "--max-steps", "8", "--val-every", "4", "--checkpoint-every", "0", "--sample-every", "0"]


def test_schedules_in_the_loop_and_an_exact_resume(shards, tmp_path):
    """total 256 tokens = 4 micro-batches of 2 x 32; the ramp over 4 steps: round(4 (0.25 + 0.75 step / 4)) =
    1, 2, 2 (2.5 rounds to even), 3, then 4; the lr times sqrt(its share)."""
    run(shards, tmp_path, *RAMPS, name="straight")
    run(shards, tmp_path, *RAMPS, "--stop-at", "3", name="resumed")
    run(shards, tmp_path, *RAMPS, name="resumed")
    straight, resumed = metrics(tmp_path, "straight"), metrics(tmp_path, "resumed")
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    val = lambda name: {r["step"]: r["loss"] for r in metrics(tmp_path, name, "val")}
    assert val("straight").items() <= val("resumed").items()  # the stop at 3 evaluated there too
    assert [r["batch_tokens"] for r in straight] == [64, 128, 128, 192, 256, 256, 256, 256]
    assert [r["tokens"] for r in straight] == [64, 192, 320, 512, 768, 1024, 1280, 1536]
    assert [r["window"] for r in straight] == [4, 4, 4, 8, 8, 8, 12, 12]  # 4 + 12 step / 8, multiples of 4
    # warm-up 2: multipliers 0.5, 1 (then the cosine), times sqrt(1/4) and sqrt(2/4)
    assert straight[0]["lr"] == pytest.approx(3e-3 * 0.5 * 0.5)
    assert straight[1]["lr"] == pytest.approx(3e-3 * 1.0 * 0.5**0.5)


def test_ramps_refuse_settings_they_cannot_follow(shards, tmp_path):
    with pytest.raises(SystemExit, match="more than one micro-batch"):
        run(shards, tmp_path, "--batch-ramp-start", "0.5", "--batch-size", "8")
    with pytest.raises(SystemExit, match="needs --window above it"):
        train_gpt2.main(["--preset", "tiny", "--data-dir", shards, "--log-dir", str(tmp_path), "--window-start", "8"])
