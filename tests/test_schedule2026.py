"""The speedruns' growing rows and late untied head (gpt2/curriculum.py): the schedules against hand-written tables,
the loader's cut rows against naive slicing, the untie against a float64 Adam step, and in the loop: identical to a
tied run before the untie, exact resume across it and across a length change, 2 ranks equal to 1 process, and the
checkpoints loading as trained. Refusals are one line."""

import json

import numpy as np
import pytest
import torch
import transformers

import sample
from conftest import metrics, run, spawn_run
from gpt2.config import TrainConfig, parse_config
from gpt2.curriculum import model_config_at, seq_len_at, untie_with_adamw, untied_at
from gpt2.dataloader import EOT, ShardLoader
from gpt2.hf_io import export_hf, from_pretrained
from gpt2.optim import build_optimizers
from gpt2.runs import load_model
from model import GPT, GPTConfig


def test_lengths_yarn_and_untie_follow_hand_written_tables():
    cfg = TrainConfig(seq_len=64, seq_len_start=8, seq_len_ramp_frac=0.5, max_steps=12, untie_at=0.25,
                      yarn_follows="seq-len", model=GPTConfig(pos="rope", rope_scaling="yarn"))
    # 3 doublings in equal stages over round(0.5 * 12) = 6 steps: step * 3 // 6 doublings
    assert [seq_len_at(cfg, s) for s in range(12)] == [8, 8, 16, 16, 32, 32, 64, 64, 64, 64, 64, 64]
    assert [untied_at(cfg, s) for s in range(5)] == [False, False, False, True, True]  # from round(0.25 * 12)
    at = [model_config_at(cfg, s) for s in (0, 2, 3, 7)]
    assert [(c.rope_original_context, c.rope_factor, c.tie_head) for c in at] == [
        (8, 1.0, True), (8, 2.0, True), (8, 2.0, False), (8, 8.0, False)]
    one = TrainConfig(seq_len=64, seq_len_start=32, seq_len_ramp_frac=1.0, max_steps=10)
    assert [seq_len_at(one, s) for s in (0, 9, 10)] == [32, 32, 64]  # one stage: the whole ramp at 32
    window = TrainConfig(window_start=4, window_ramp_frac=0.5, max_steps=8, yarn_follows="window",
                         model=GPTConfig(window=16, pos="rope", rope_scaling="yarn"))
    # the window: 4 + 12 step / 4, down to a multiple of 4 -> 4, 7 -> 4, 10 -> 8, 13 -> 12, 16
    assert [model_config_at(window, s).rope_factor for s in range(5)] == [1.0, 1.0, 2.0, 3.0, 4.0]
    off = TrainConfig()
    assert seq_len_at(off, 0) == off.seq_len and model_config_at(off, 10**6) is off.model


def cut_by_hand(x: torch.Tensor, y: torch.Tensor, length: int, aligned: bool):
    """Full rows (x, and y's last token) sliced into pieces of length + 1 tokens that overlap by one, in order."""
    xs, ys = [], []
    for row_x, row_y in zip(x, y):
        tokens = torch.cat([row_x, row_y[-1:]]).tolist()
        for start in range(0, len(row_x), length):
            piece = tokens[start : start + length + 1]
            xs.append([EOT if aligned else piece[0], *piece[1:-1]])
            ys.append(piece[1:])
    return torch.tensor(xs), torch.tensor(ys)


@pytest.mark.parametrize("options", [{}, dict(align_docs="pack"), dict(align_docs="crop", shuffle=True, seed=3)],
                         ids=["plain", "pack", "crop-shuffled"])
def test_loader_rows_at_each_length_are_the_full_rows_sliced(shards, options):
    B, T = 2, 32
    full = ShardLoader(shards, "train", B, T, **options)
    cut = ShardLoader(shards, "train", B, T, **options)
    ranks = [ShardLoader(shards, "train", B // 2, T, rank=r, world_size=2, **options) for r in range(2)]
    for length in (32, 16, 8, 8, 32, 4, 16):
        for loader in (cut, *ranks):
            loader.set_row_len(length)
        x, y = full.next_batch()
        cx, cy = cut.next_batch()
        ex, ey = cut_by_hand(x, y, length, aligned="align_docs" in options)
        assert torch.equal(cx, ex) and torch.equal(cy, ey) and cx.shape == (B * T // length, length)
        parts = [r.next_batch() for r in ranks]  # 2 ranks hold the single process's rows, in order
        assert torch.equal(torch.cat([p[0] for p in parts]), cx) and torch.equal(torch.cat([p[1] for p in parts]), cy)
    assert cut.state_dict() == full.state_dict()  # the same tokens were read: the state of full rows
    with pytest.raises(ValueError, match="do not divide seq_len 32"):
        cut.set_row_len(12)


def adam_step64(p: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
    """One AdamW step by hand, in float64: decoupled decay, bias-corrected moments."""
    (b1, b2), lr, wd, eps = group["betas"], group["lr"], group["weight_decay"], group["eps"]
    p, g = p.double(), grad.double()
    t = int(state["step"]) + 1
    m = b1 * state["exp_avg"].double() + (1 - b1) * g
    v = b2 * state["exp_avg_sq"].double() + (1 - b2) * g * g
    return p * (1 - lr * wd) - lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps)


def group_of(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def test_untie_copies_table_and_adam_state_then_each_steps_in_its_role():
    cfg = TrainConfig(untie_at=0.5, adam_embed_lr=0.02, adam_embed_beta1=0.5, adam_head_lr=0.005,
                      adam_head_beta2=0.9, adam_head_wd=0.3,
                      model=GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, vocab_multiple=128))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    adamw = build_optimizers(cfg, model, "cpu")[0]
    table = model.transformer.wte.weight
    assert group_of(adamw, table)["lr"] == 0.005  # tied: the table is the head's
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    model(x, y)[1].backward()
    adamw.step()
    adamw.zero_grad(set_to_none=True)
    tied_state = {k: v.clone() for k, v in adamw.state[table].items()}

    adamw = untie_with_adamw(cfg, model, adamw, "cpu")
    head = model.lm_head.weight
    assert head is not table and torch.equal(head, table) and head.data_ptr() != table.data_ptr()
    for key, value in tied_state.items():  # both start from the tied state, in storage of their own
        assert torch.equal(adamw.state[head][key], value) and torch.equal(adamw.state[table][key], value)
    assert adamw.state[head]["exp_avg"].data_ptr() != adamw.state[table]["exp_avg"].data_ptr()
    head_group, table_group = group_of(adamw, head), group_of(adamw, table)
    assert (head_group["lr"], head_group["betas"], head_group["weight_decay"]) == (0.005, (0.9, 0.9), 0.3)
    assert (table_group["lr"], table_group["betas"], table_group["weight_decay"]) == (0.02, (0.5, 0.95), 0.1)

    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    model(x, y)[1].backward()
    unseen = torch.ones(table.size(0), dtype=torch.bool)
    unseen[x.flatten()] = False
    assert not table.grad[unseen].any() and head.grad[unseen].abs().sum() > 0  # a lookup's rows vs the logits'
    before = {name: p.detach().clone() for name, p in (("table", table), ("head", head))}
    expected = {name: adam_step64(p, p.grad, adamw.state[p], group_of(adamw, p))
                for name, p in (("table", table), ("head", head))}
    adamw.step()
    for name, p in (("table", table), ("head", head)):
        update, want = p.detach().double() - before[name].double(), expected[name] - before[name].double()
        assert torch.allclose(update, want, rtol=1e-4, atol=2e-8), name  # a few float32 ulps of the weights
    assert not torch.equal(table, head)


CURRICULUM = ["--max-steps", "4", "--untie-at", "0.5", "--seq-len-start", "16", "--seq-len-ramp-frac", "0.5",
              "--pos", "rope", "--rope-scaling", "yarn", "--yarn-follows", "seq-len", "--align-docs", "pack",
              "--doc-mask", "1", "--val-every", "4", "--sample-every", "0", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory):
    """An uninterrupted 4-step run: rows of 16 at steps 0 and 1, of 32 from step 2 on, untied from step 2."""
    log_dir = tmp_path_factory.mktemp("straight")
    run(shards, log_dir, *CURRICULUM, name="straight")
    return log_dir / "straight"


def test_in_the_loop_tied_until_the_step_and_exact_resume_across_it(shards, tmp_path, straight):
    losses = lambda path: [r["loss"] for r in metrics(path.parent, path.name)]
    assert [r["seq_len"] for r in metrics(straight.parent, "straight")] == [16, 16, 32, 32]
    assert [r["tokens"] for r in metrics(straight.parent, "straight")] == [256, 512, 768, 1024]
    run(shards, tmp_path, *CURRICULUM, "--untie-at", "0", name="never")
    # step 2 runs untied on the tied values (its loss is the tied one); its update is the first to differ
    never = losses(tmp_path / "never")
    assert never[:3] == losses(straight)[:3] and never[3] != losses(straight)[3]
    for stop in ("1", "3", "4"):  # before the untie and the longer rows, after both, the end
        run(shards, tmp_path, *CURRICULUM, "--stop-at", stop, name="resumed")
    assert losses(tmp_path / "resumed") == losses(straight)
    ours, theirs = (torch.load(p / "ckpt_0000004.pt", weights_only=False) for p in (tmp_path / "resumed", straight))
    assert all(torch.equal(ours["model"][k], v) for k, v in theirs["model"].items())
    assert json.dumps(ours["model_config"]) == json.dumps(theirs["model_config"])


def test_checkpoint_after_the_untie_loads_as_trained(shards, straight, capsys):
    path = str(straight / "ckpt_0000004.pt")
    config = torch.load(path, weights_only=False)["model_config"]
    assert (config["tie_head"], config["rope_original_context"], config["rope_factor"]) == (False, 16, 2.0)
    model = load_model(path).eval()
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    val = ShardLoader(shards, "val", 4, 32)  # the run's val batches: 512 tokens of 4 x 32
    with torch.no_grad():
        nats = sum(model(*val.next_batch(), return_logits=False)[1].item() for _ in range(4)) / 4
    assert nats == pytest.approx(metrics(straight.parent, "straight", "val")[-1]["loss"], abs=1e-6)
    sample.main(["--checkpoint", path, "--max-new-tokens", "4", "--prompt", "The king"])
    assert capsys.readouterr().out.startswith("The king")


def test_untied_gpt2_exports_to_hf_and_back(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_multiple=128, tie_head=False)).eval()
    export_hf(ours, str(tmp_path))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, ours(x)[0][..., :50257], atol=1e-5)
    again = from_pretrained(str(tmp_path), vocab_multiple=128)
    assert not again.config.tie_head and torch.equal(again.lm_head.weight[:50257], ours.lm_head.weight[:50257])


def test_two_ranks_equal_one_process(shards, tmp_path, straight):
    spawn_run(2, shards, tmp_path, *CURRICULUM, name="ddp")  # one micro-batch per rank instead of two
    ddp, one = metrics(tmp_path, "ddp"), metrics(straight.parent, "straight")
    assert np.allclose([r["loss"] for r in ddp], [r["loss"] for r in one], rtol=0, atol=1e-5)
    assert metrics(tmp_path, "ddp", "val")[-1]["loss"] == pytest.approx(
        metrics(straight.parent, "straight", "val")[-1]["loss"], abs=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--untie-at", "0.5", "--tie-head", "0"], "--untie-at needs a tied head"),
    (["--untie-at", "0.5", "--ema-sigma-rel", "0.1"], "and no --ema-sigma-rel (the EMA does not follow"),
    (["--untie-at", "0.001"], "--untie-at 0.001 unties at step 0 of --max-steps 300"),
    (["--untie-at", "1"], "--untie-at must be in [0, 1), got 1.0"),
    (["--seq-len-start", "48"], "--seq-len-start 48 needs --seq-len 128 to be it times 2, 4, 8"),
    (["--seq-len-start", "128"], "--seq-len-start 128 needs --seq-len 128"),
    (["--seq-len", "96", "--seq-len-start", "32"], "--seq-len-start 32 needs --seq-len 96 to be it times 2, 4"),
    (["--seq-len-start", "32", "--seq-len-ramp-frac", "0"], "--seq-len-ramp-frac must be in (0, 1], got 0.0"),
    (["--yarn-follows", "seq-len", "--seq-len-start", "64"], "--yarn-follows seq-len needs --seq-len-start"),
    (["--yarn-follows", "window", "--pos", "rope", "--rope-scaling", "yarn"], "needs --window-start (what it follows)"),
    (["--yarn-follows", "seq-len", "--seq-len-start", "64", "--pos", "rope", "--rope-scaling", "yarn", "--rope-factor",
      "4"], "leave --rope-factor and --rope-original-context out"),
])
def test_refusals_are_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--preset", "tiny", *args])
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0], lines
