"""The CUDA tier, `pytest -m cuda` (skipped without a GPU): every GPU code path against an independent reference.
Attention kernels against the float64 CPU reference of test_arch.py, bf16 autocast against float64, the loss
paths (full, chunked, and Liger's fused one where installed; eager and compiled) against plain fp32 cross-entropy,
pinned loader copies against CPU batches, and the compiled loop with its evaluations, in one process and under
torchrun."""

import copy
import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from test_arch import naive_attention

import gpt2.loss
import train_gpt2
from gpt2.attention import attention, flex_attend
from gpt2.config import parse_config
from gpt2.dataloader import ShardLoader
from model import GPT, GPTConfig

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

FIXTURE = ROOT / "tests" / "data" / "hellaswag_fixture.jsonl"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """|a - ref| / |ref| over the whole tensor, in float64 on the CPU."""
    ref = ref.detach().double().cpu()
    return ((a.detach().double().cpu() - ref).norm() / ref.norm()).item()


@pytest.fixture
def exact_fp32():
    """fp32 matmuls in full precision (the training loop turns TF32 on for the whole process)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


# ---------------------------------------------------------------------- attention

# (key/value heads for 2 query heads, window, sinks): SDPA plain and GQA, FlexAttention with a window, sinks, both
ATTENTION_CASES = {"sdpa": (2, 0, False), "sdpa-gqa": (1, 0, False), "flex-window": (2, 64, False),
                   "flex-sinks": (2, 0, True), "flex-window-sinks-gqa": (1, 64, True)}
T = 384  # three 128-position blocks: with window 64 the last query block skips the first key block entirely


@functools.cache
def attention_case(hkv: int, window: int, use_sinks: bool):
    """Inputs that bf16 holds exactly (one float64 reference serves the fp32 and the bf16 runs), the reference
    output and its gradients, computed once per case on the CPU."""
    g = torch.Generator().manual_seed(0)
    exact = lambda *shape: torch.randn(*shape, generator=g).bfloat16().double()
    q, k, v, grad_out = exact(1, 2, T, 64), exact(1, hkv, T, 64), exact(1, hkv, T, 64), exact(1, 2, T, 64)
    # sinks near the log of a window's softmax mass, so they take a real share of it; fp32 like the parameter
    sinks = (4 + torch.randn(2, generator=g)).double() if use_sinks else None
    leaves = [t.requires_grad_() for t in (q, k, v, sinks) if t is not None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference is thousands of tiny ops: threads only slow them down
    try:
        out = naive_attention(q, k, v, 0, window, sinks)
        grads = torch.autograd.grad(out, leaves, grad_out)
    finally:
        torch.set_num_threads(threads)
    return [t.detach() for t in leaves], grad_out, out.detach(), grads


def cuda_inputs(leaves, dtype):
    """q, k, v in dtype and the sinks in fp32 (a parameter stays fp32 under autocast), as leaves on the GPU."""
    return [t.to("cuda", dtype if i < 3 else torch.float32).requires_grad_() for i, t in enumerate(leaves)]


# eager attention() takes SDPA or the written-out scores (HellaSwag, sampling); compiled, FlexAttention for the
# flex cases; flex_attend called eagerly checks FlexAttention's own numbers in fp32 and bf16 without a compile
ATTENTION_MODES = [(name, mode) for name, case in ATTENTION_CASES.items()
                   for mode in ("eager-fp32", "eager-bf16", "compiled-bf16")
                   + (("flex-eager-fp32", "flex-eager-bf16") if name.startswith("flex") else ())]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # flex-eager: on purpose
@pytest.mark.parametrize("name,mode", ATTENTION_MODES, ids=[f"{n}-{m}" for n, m in ATTENTION_MODES])
def test_attention_paths_equal_float64_reference(name, mode, exact_fp32):
    hkv, window, use_sinks = case = ATTENTION_CASES[name]
    leaves, grad_out, ref_out, ref_grads = attention_case(*case)
    dtype = torch.float32 if mode.endswith("fp32") else torch.bfloat16
    inputs = cuda_inputs(leaves, dtype)
    fn = attention
    if mode.startswith("compiled"):
        torch._dynamo.reset()  # a fresh graph per case, not a recompile of the last one
        fn = torch.compile(attention)
    elif mode.startswith("flex"):
        fn = lambda q, k, v, start, window, sinks: flex_attend(q, k, v, window, sinks)
    out = fn(*inputs[:3], 0, window, inputs[3] if use_sinks else None)
    grads = torch.autograd.grad(out, inputs, grad_out.to("cuda", out.dtype))
    assert out.dtype == dtype
    # fp32: summation order only; bf16: inputs are exact, so this is the kernels' own rounding (~2^-8 relative)
    tol_out, tol_grad = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 4e-2)
    assert rel_err(out, ref_out) < tol_out
    for name, grad, ref in zip(["q", "k", "v", "sinks"], grads, ref_grads):
        assert rel_err(grad, ref) < tol_grad, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [(2, 0, False), (1, 64, True)], ids=["sdpa", "window-sinks-gqa"])
def test_attention_decode_step_equals_float64_reference(case, dtype, exact_fp32):
    """A KV-cache step as sampling runs it on the GPU: the last query against every cached key."""
    hkv, window, use_sinks = case
    leaves = attention_case(*case)[0]
    q, k, v = leaves[:3]
    expected = naive_attention(q[:, :, -1:], k, v, T - 1, window, leaves[3] if use_sinks else None)
    q, k, v, *sinks = (t.detach() for t in cuda_inputs(leaves, dtype))
    out = attention(q[:, :, -1:], k, v, T - 1, window, sinks[0] if use_sinks else None)
    assert rel_err(out, expected) < (1e-4 if dtype == torch.float32 else 2e-2)


# ---------------------------------------------------------------------- bf16 numerics and the two loss paths


@pytest.mark.filterwarnings("error:flex_attention called without torch.compile")  # eager: never FlexAttention
@pytest.mark.parametrize("preset", ["gpt2-124m", "gpt2-124m-modern"])
def test_bf16_autocast_logits_of_124m_match_float64(preset):
    cfg = parse_config(["--preset", preset])[0].model
    torch.manual_seed(0)
    model = GPT(cfg).cuda().eval()
    reference = copy.deepcopy(model).cpu().double()  # the same weights, on the CPU's attention path
    x = torch.randint(0, cfg.vocab_size, (2, 256))
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x.cuda())[0][..., : cfg.vocab_size]
        expected = reference(x)[0][..., : cfg.vocab_size]
    assert torch.isfinite(logits).all()
    assert rel_err(logits, expected) < 0.03  # measured with CPU bf16 autocast, same rounding points: 0.008


def loss_and_grads(model, loss_fn):
    """The loss loss_fn() computes for model, and every parameter's gradient of it."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])  # compiled: both rows of gpu_check
def test_full_and_chunked_loss_in_bf16_match_fp32_cross_entropy(compiled, exact_fp32, monkeypatch):
    monkeypatch.setenv(gpt2.loss.FUSED_ENV, "0")  # the full-logits loss itself, also where Liger is installed
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=256, vocab_multiple=128)).cuda()
    x, y = (torch.randint(0, 50257, (4, 256), device="cuda") for _ in range(2))

    def reference():  # fp32, no autocast: the logits of the real vocabulary and F.cross_entropy
        logits = model.hidden(x) @ model.lm_head.weight[: model.config.vocab_size].t()
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def bf16_loss(chunk_elements):
        model.loss_chunk_elements = chunk_elements
        torch._dynamo.reset()  # a fresh graph per loss path
        step_model = torch.compile(model) if compiled else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return step_model(x, y, return_logits=False)[1]

    ref_loss, ref_grads = loss_and_grads(model, reference)
    for name, chunk_elements in [("full", 0), ("chunked", 2**20)]:  # chunked: 20 rows a chunk, 52 chunks
        loss, grads = loss_and_grads(model, lambda: bf16_loss(chunk_elements))
        assert abs(loss - ref_loss) < 5e-3, name  # measured with CPU bf16 autocast: 1e-4
        for n, ref in ref_grads.items():
            assert torch.isfinite(grads[n]).all() and rel_err(grads[n], ref) < 3e-2, (name, n)  # measured: 0.007


@pytest.mark.parametrize("softcap", [0.0, 30.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])  # compiled: as the loop runs it
def test_fused_liger_loss_in_bf16_matches_fp32_cross_entropy(compiled, softcap, exact_fp32, monkeypatch):
    """Liger's fused LM head + cross-entropy, which the full-logits training loss becomes on CUDA where
    `uv sync --extra gpu` installed it: on the real vocabulary's rows (padded 50257 -> 50304), soft-capped or not."""
    pytest.importorskip("liger_kernel.transformers.functional")  # the skip reason shows why it does not import
    monkeypatch.setenv(gpt2.loss.FUSED_ENV, "1")
    liger, calls = gpt2.loss.liger_loss_fn(), []
    monkeypatch.setattr(gpt2.loss, "liger_loss_fn", lambda: lambda *a, **k: calls.append(1) or liger(*a, **k))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=256, block_size=256, vocab_multiple=128, softcap=softcap),
                loss_chunk_elements=0).cuda()
    x, y = (torch.randint(0, 50257, (4, 256), device="cuda") for _ in range(2))

    def reference():  # fp32, no autocast: the real vocabulary's logits, capped, and F.cross_entropy
        logits = model.hidden(x) @ model.lm_head.weight[: model.config.vocab_size].t()
        logits = softcap * torch.tanh(logits / softcap) if softcap else logits
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def fused():
        torch._dynamo.reset()  # fused_wanted is decided when the graph is traced
        step_model = torch.compile(model) if compiled else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return step_model(x, y, return_logits=False)[1]

    ref_loss, ref_grads = loss_and_grads(model, reference)
    loss, grads = loss_and_grads(model, fused)
    assert calls, "the fused loss was not taken"
    assert abs(loss - ref_loss) < 5e-3  # the same bound as the full and chunked losses' above
    for n, ref in ref_grads.items():
        assert torch.isfinite(grads[n]).all() and rel_err(grads[n], ref) < 3e-2, n


# ---------------------------------------------------------------------- the loader


def test_cuda_batches_match_cpu(shards):
    gpu, cpu = ShardLoader(shards, "train", 4, 64, device="cuda"), ShardLoader(shards, "train", 4, 64)
    for _ in range(20):
        (gx, gy), (cx, cy) = gpu.next_batch(), cpu.next_batch()
        assert gx.device.type == "cuda" and torch.equal(gx.cpu(), cx) and torch.equal(gy.cpu(), cy)


def test_cuda_batches_stay_right_while_copies_wait_behind_gpu_work(shards):
    """The non-blocking copies out of pinned buffers that the loader frees at once: fifty of them queued behind
    a busy GPU before any is read must still each hold their own batch."""
    gpu, cpu = ShardLoader(shards, "train", 4, 64, device="cuda"), ShardLoader(shards, "train", 4, 64)
    torch.cuda._sleep(200_000_000)  # keeps the stream busy for ~0.1 s, so the copies wait in its queue
    batches = [gpu.next_batch() for _ in range(50)]
    for gx, gy in batches:
        cx, cy = cpu.next_batch()
        assert torch.equal(gx.cpu(), cx) and torch.equal(gy.cpu(), cy)


# ---------------------------------------------------------------------- the training loop

LOOP = ["--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--batch-size", "8", "--seq-len", "64",
        "--total-batch-size", "1024", "--max-lr", "3e-3", "--warmup-steps", "2", "--val-tokens", "2048",
        "--checkpoint-every", "0"]


def events(run_dir, kind):
    with open(run_dir / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_compiled_loop_learns_and_runs_its_evals(shards, tmp_path):
    train_gpt2.main([*LOOP, "--device", "cuda", "--compile", "1", "--data-dir", shards, "--log-dir", str(tmp_path),
                     "--run-name", "cuda", "--max-steps", "10", "--val-every", "5", "--hellaswag-every", "5",
                     "--hellaswag-data", str(FIXTURE), "--sample-every", "5"])
    run = tmp_path / "cuda"
    train, val = events(run, "train"), events(run, "val")
    losses = [r["loss"] for r in train]
    assert len(losses) == 10 and all(math.isfinite(loss) for loss in losses)
    # measured with these flags on the CPU in fp32: train 10.84 -> 9.50, val 10.84 -> 9.41
    assert losses[-1] < losses[0] - 0.5
    assert [r["step"] for r in val] == [0, 5, 10] and val[-1]["loss"] < val[0]["loss"] - 0.5
    assert all(r["mem_gb"] > 0 for r in train)
    hellaswag = events(run, "hellaswag")
    assert [r["step"] for r in hellaswag] == [0, 5, 10]
    assert all(r["count"] == 10 and 0 <= r["acc_norm"] <= 1 for r in hellaswag)
    samples = events(run, "sample")
    assert [r["step"] for r in samples] == [0, 5, 10]
    assert all(len(r["samples"]) == 4 and all(s.startswith("Hello, I'm a language model,") for s in r["samples"])
               for r in samples)


def test_torchrun_with_device_auto_trains_on_gpus(shards, tmp_path):
    """The multi-GPU command as README gives it: --device auto under torchrun, NCCL (one rank per GPU, two at most)."""
    nproc = min(2, torch.cuda.device_count())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / "train_gpt2.py"), *LOOP, "--device", "auto", "--compile", "0", "--data-dir", shards,
           "--log-dir", str(tmp_path), "--run-name", "nccl", "--max-steps", "3", "--val-every", "3",
           "--hellaswag-every", "0", "--sample-every", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [r["loss"] for r in events(tmp_path / "nccl", "train")]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert [p.name for p in (tmp_path / "nccl").glob("ckpt_*.pt")] == ["ckpt_0000003.pt"]
