"""sample.py: a training checkpoint or an HF directory in, the text model.generate (or HF's generate) makes out."""

import glob

import pytest
import tiktoken
import torch
import transformers  # a dev dependency; always installed by `uv sync`

import sample
import train_gpt2
from gpt2.runs import load_model

ENC = tiktoken.get_encoding("gpt2")
PROMPT = "The king said"


@pytest.fixture(scope="module")
def checkpoint_path(shards, tmp_path_factory) -> str:
    log_dir = tmp_path_factory.mktemp("logs")
    train_gpt2.main(["--preset", "tiny", "--data-dir", shards, "--log-dir", str(log_dir), "--run-name", "r",
                     "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--seq-len", "32",
                     "--total-batch-size", "256", "--val-tokens", "512", "--hellaswag-every", "0",
                     "--warmup-steps", "2", "--vocab-multiple", "128", "--sample-every", "0", "--max-steps", "2"])
    (path,) = glob.glob(str(log_dir / "r" / "ckpt_*.pt"))
    return path


def run_sample(capsys, *args) -> str:
    sample.main([*args, "--prompt", PROMPT, "--device", "cpu"])
    return capsys.readouterr().out


def separated(texts: list[str]) -> str:
    return ("\n" + "-" * 40 + "\n").join(texts) + "\n"


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 5)])
def test_checkpoint_samples_are_model_generate(checkpoint_path, capsys, temperature, top_k):
    out = run_sample(capsys, "--checkpoint", checkpoint_path, "--max-new-tokens", "12", "--num-samples", "2",
                     "--seed", "7", "--temperature", str(temperature), "--top-k", str(top_k))
    model = load_model(checkpoint_path).eval()
    gen = torch.Generator().manual_seed(7)
    idx = torch.tensor([ENC.encode(PROMPT)])
    rows = [model.generate(idx, 12, temperature, top_k or None, generator=gen)[0].tolist() for _ in range(2)]
    assert out == separated([ENC.decode(row) for row in rows])
    assert temperature == 0 or rows[0] != rows[1]  # sampled: the two samples differ


def test_hf_directory_greedy_matches_transformers(tmp_path, capsys):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=64, n_layer=2, n_head=2, n_embd=32)).eval()
    hf.save_pretrained(tmp_path)
    out = run_sample(capsys, "--model", str(tmp_path), "--max-new-tokens", "10", "--temperature", "0")
    idx = torch.tensor([ENC.encode(PROMPT)])
    ref = hf.generate(idx, max_new_tokens=10, do_sample=False, pad_token_id=ENC.eot_token)[0].tolist()
    assert out == ENC.decode(ref) + "\n"


def test_stream_never_prints_half_characters():
    text = "naïve café: 日本語 🎉🦀 ok"
    ids = ENC.encode(text)
    pieces = list(sample.stream_text(ids, ENC))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert len(pieces) < len(ids)  # some tokens held only part of a character and printed nothing yet
    # bytes that never complete a character: U+FFFD, exactly as tiktoken's decode has them
    broken = ENC.encode("🎉")[:1] + ENC.encode(" x") + ENC.encode("🦀")[:1]
    assert "".join(sample.stream_text(broken, ENC)) == ENC.decode(broken)


def test_bad_input_says_what_is_wrong(tmp_path, checkpoint_path):
    with pytest.raises(SystemExit, match="no/such.pt: no such checkpoint file"):
        sample.main(["--checkpoint", "no/such.pt", "--device", "cpu"])
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="notes.txt is not a readable checkpoint"):
        sample.main(["--checkpoint", str(tmp_path / "notes.txt"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="block size 32; ask for at most 29"):
        sample.main(["--checkpoint", checkpoint_path, "--prompt", PROMPT, "--max-new-tokens", "40", "--device", "cpu"])
