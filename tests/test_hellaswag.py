"""HellaSwag scoring checked against independent computations: one ending per forward with no padding,
and transformers' GPT2LMHeadModel holding the same weights."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import tiktoken
import torch

import hellaswag
from conftest import spawn_ranks
from gpt2 import runs
from gpt2.hf_io import export_hf
from model import GPT, GPTConfig

FIXTURE = Path(__file__).parent / "data" / "hellaswag_fixture.jsonl"
# vocab_multiple 64 pads the vocabulary to 50304: the padded ids must not take any probability
TINY = GPTConfig(block_size=256, vocab_multiple=64, n_layer=2, n_head=2, n_embd=32)


def make_model(config: GPTConfig = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # These forwards are small: a second thread gains little, and while another process holds a core,
    # OpenMP threads waiting for each other made them 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def fixture_examples():
    return hellaswag.load_examples(str(FIXTURE))


@pytest.fixture(scope="module")
def val_examples(hellaswag_val_path):
    return hellaswag.load_examples(str(hellaswag_val_path), limit=50)


def generated_examples(n: int, seed: int = 0) -> list[dict]:
    """Random words, a few of them in long contexts, so that rows spread over several padded lengths."""
    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(1, 6))) for _ in range(rng.randint(lo, hi)))

    return [{"ctx": words(1, 40) if rng.random() < 0.15 else words(1, 10), "endings": [words(1, 6) for _ in range(4)],
             "label": rng.randrange(4)} for _ in range(n)]


def token_rows(example: dict) -> list[tuple[list[int], list[int]]]:
    """(context, ending) token lists, tokenized here with tiktoken directly."""
    enc = tiktoken.get_encoding("gpt2")
    return [(enc.encode(example["ctx"]), enc.encode(" " + e)) for e in example["endings"]]


def reference_scores(logits_fn, examples: list[dict], block_size: int | None = None):
    """Sum and mean ending loss, one unpadded ending per forward; logits_fn maps ids (1, T) to logits (1, T, V).
    With block_size, the sequence keeps its last block_size + 1 tokens (the left-truncation rule)."""
    sums, means = torch.zeros(len(examples), 4), torch.zeros(len(examples), 4)
    for i, ex in enumerate(examples):
        for j, (ctx, end) in enumerate(token_rows(ex)):
            tokens = torch.tensor(ctx + end)
            if block_size is not None:
                tokens = tokens[-(block_size + 1) :]
            with torch.no_grad():
                logits = logits_fn(tokens[None, :-1])[0]
            # the last len(end) positions of the input predict the ending tokens
            logp = torch.log_softmax(logits[-len(end) :].double(), dim=-1)
            nll = -logp.gather(1, tokens[-len(end) :, None]).squeeze(1)
            sums[i, j], means[i, j] = nll.sum(), nll.mean()
    return sums, means


def ours(model):
    return lambda idx: model(idx)[0]


# ---------------------------------------------------------------------- scoring


@pytest.mark.parametrize("which", ["fixture", "val", "generated"])
def test_batched_equals_one_ending_at_a_time(model, fixture_examples, val_examples, which):
    examples = {"fixture": fixture_examples, "val": val_examples[:12], "generated": generated_examples(200)}[which]
    ref_sums, ref_means = reference_scores(ours(model), examples)
    # A small token budget: several batches and padded lengths, with rows of zeros filling the last batches.
    # 1 token: one example (4 rows) per forward, on the first 10 examples.
    for n, tokens_per_batch in ((len(examples), 1024), (10, 1)):
        sums, means = hellaswag.score_endings(model, examples[:n], "cpu", tokens_per_batch=tokens_per_batch)
        torch.testing.assert_close(sums, ref_sums[:n], atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(means, ref_means[:n], atol=1e-5, rtol=0)
        assert torch.equal(sums.argmin(1), ref_sums[:n].argmin(1))
        assert torch.equal(means.argmin(1), ref_means[:n].argmin(1))


def test_one_example_per_forward_equals_one_ending_at_a_time(model, fixture_examples, val_examples):
    # hellaswag's plain scorer (bench_hellaswag.py's baseline), left truncation included
    small = make_model(dataclasses.replace(TINY, block_size=32))
    for m, examples, block_size in ((model, fixture_examples + val_examples[:12], None), (small, fixture_examples, 32)):
        ref_sums, ref_means = reference_scores(ours(m), examples, block_size=block_size)
        sums, means = hellaswag.score_one_by_one(m, examples, "cpu")
        torch.testing.assert_close(sums, ref_sums, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(means, ref_means, atol=1e-5, rtol=0)


def test_scores_match_transformers(model, fixture_examples, val_examples, tmp_path):
    import transformers
    export_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    examples = fixture_examples + val_examples[:10]
    ref_sums, ref_means = reference_scores(lambda idx: hf(idx).logits, examples)
    sums, means = hellaswag.score_endings(model, examples, "cpu")
    torch.testing.assert_close(sums, ref_sums, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(means, ref_means, atol=1e-4, rtol=0)
    # and the accuracies follow from the scores by argmin
    labels = torch.tensor([ex["label"] for ex in examples])
    result = hellaswag.evaluate(model, examples, "cpu")
    assert result["count"] == len(examples)
    assert result["acc"] == pytest.approx((ref_sums.argmin(1) == labels).float().mean().item())
    assert result["acc_norm"] == pytest.approx((ref_means.argmin(1) == labels).float().mean().item())


def test_long_rows_lose_context_from_the_left(fixture_examples):
    small = make_model(dataclasses.replace(TINY, block_size=32))
    assert max(len(c) + len(e) for ex in fixture_examples for c, e in token_rows(ex)) > 33  # truncation happens
    sums, means = hellaswag.score_endings(small, fixture_examples, "cpu")
    ref_sums, ref_means = reference_scores(ours(small), fixture_examples, block_size=32)
    torch.testing.assert_close(sums, ref_sums, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(means, ref_means, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not fit block_size"):
        hellaswag.score_endings(small, [{"ctx": "A man", "endings": ["word " * 40] * 4, "label": 0}], "cpu")


def test_bfloat16_autocast_is_close_to_float32(model, val_examples):
    sums, means = hellaswag.score_endings(model, val_examples[:10], "cpu")
    sums16, means16 = hellaswag.score_endings(model, val_examples[:10], "cpu", dtype=torch.bfloat16)
    assert sums16.dtype == torch.float32
    torch.testing.assert_close(means16, means, atol=0.05, rtol=0)
    assert not torch.equal(means16, means)  # bf16 did run


def test_compiled_model_scores_the_same_without_compiling(model, val_examples):
    from torch._dynamo.testing import CompileCounter

    examples = val_examples[24:34]  # rows padded to 64 and to 128 tokens
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)  # dynamo only: counts graphs without a C++ compiler
    expected = hellaswag.score_endings(model, examples, "cpu", tokens_per_batch=1024)
    first = hellaswag.score_endings(compiled, examples, "cpu", tokens_per_batch=1024)
    second = hellaswag.score_endings(compiled, examples, "cpu", tokens_per_batch=1024)
    # the training loop hands over its compiled model: scoring goes through hidden()/logits(), never
    # through a compiled graph, so no compile or recompile per length, batch or call
    assert counter.frame_count == 0
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)


# ---------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, data: str, out_dir: str):
    result = hellaswag.evaluate(make_model(), hellaswag.load_examples(data), "cpu", rank=rank, world_size=world_size)
    Path(out_dir, f"{rank}.json").write_text(json.dumps(result))


def test_two_gloo_ranks_count_like_one(model, fixture_examples, val_examples, tmp_path):
    examples = fixture_examples + val_examples[:15]  # 25: ranks get 13 and 12
    data = tmp_path / "examples.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    single = hellaswag.evaluate(model, examples, "cpu")
    spawn_ranks(_ddp_worker, 2, str(data), str(tmp_path))
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]  # identical on every rank, examples/s included
    assert results[0]["count"] == single["count"] == 25
    assert results[0]["acc"] == single["acc"] and results[0]["acc_norm"] == single["acc_norm"]


# ---------------------------------------------------------------------- data and CLI


def test_local_file_is_read_as_is(hellaswag_val_path):
    # this copy's bytes differ from the original download: nothing may reject it by checksum
    examples = hellaswag.load_examples(str(hellaswag_val_path), limit=50)
    with open(hellaswag_val_path) as f:
        expected = [json.loads(next(f)) for _ in range(50)]
    assert examples == expected
    assert len(hellaswag.load_examples(str(FIXTURE))) == 10
    with pytest.raises(FileNotFoundError, match="neither a HellaSwag split"):
        hellaswag.load_examples("no/such/file.jsonl")


def test_download_into_cache_offline(tmp_path, monkeypatch):
    source = tmp_path / "server"
    source.mkdir()
    (source / "hellaswag_val.jsonl").write_bytes(FIXTURE.read_bytes())
    monkeypatch.setattr(hellaswag, "URL", source.as_uri() + "/hellaswag_{split}.jsonl")
    monkeypatch.setenv("HELLASWAG_CACHE_DIR", str(tmp_path / "cache"))

    examples = hellaswag.load_examples("val", limit=3)
    assert examples == hellaswag.load_examples(str(FIXTURE), limit=3)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["hellaswag_val.jsonl"]  # no temporary left
    (source / "hellaswag_val.jsonl").unlink()
    assert len(hellaswag.load_examples("val")) == 10  # now read from the cache

    # a split that cannot be fetched says what to do, and leaves nothing behind
    with pytest.raises(RuntimeError, match="--data path/to/hellaswag_train.jsonl"):
        hellaswag.load_examples("train", cache_dir=tmp_path / "other")
    assert list((tmp_path / "other").iterdir()) == []


def test_cli_with_compiled_checkpoint(model, fixture_examples, tmp_path, capsys):
    # a checkpoint of a torch.compile'd model: every key under '_orig_mod.'
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "model_config": dataclasses.asdict(TINY), "step": 7}, tmp_path / "ckpt.pt")
    hellaswag.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(FIXTURE), "--device", "cpu"])
    expected = hellaswag.evaluate(model, fixture_examples, "cpu")
    out = capsys.readouterr().out
    assert f"acc {expected['acc']:.4f} acc_norm {expected['acc_norm']:.4f} count 10" in out

    torch.save({"model": state}, tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        runs.load_model(str(tmp_path / "bare.pt"))
