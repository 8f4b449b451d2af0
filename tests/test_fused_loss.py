"""Liger-Kernel's fused LM-head loss (gpt2/loss.py) on the CPU: where the package is absent nothing imports it (and
building and running a model imports no torch._dynamo, as torch.compiler's decorators would); a package of its name
on sys.path is what CUDA would take, but on the CPU it is never imported or called; and what the model hands it (the
real vocabulary's rows, the softcap, inputs cast once under autocast) gives the full-logits loss and gradients. Its
numbers against plain cross-entropy on a GPU: tests/test_cuda.py."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ROOT

import model
from gpt2.loss import FUSED_ENV, fused_wanted, liger_loss_fn
from model import GPT, GPTConfig

REFERENCE_STUB = """
import torch
import torch.nn.functional as F

calls = []


def liger_fused_linear_cross_entropy(input, weight, target, softcap=None, accum_dtype=None):
    calls.append({"input": input.dtype, "weight": tuple(weight.shape), "softcap": softcap, "accum": accum_dtype})
    logits = input.float() @ weight.float().t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, target)
"""


@pytest.fixture
def liger_stub(tmp_path, monkeypatch):
    """write(source): a package named like Liger's, liger_kernel.transformers.functional with that source, first
    on sys.path; afterwards gone from sys.path, sys.modules and liger_loss_fn's cache."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(FUSED_ENV, raising=False)

    def write(source: str):
        package = tmp_path / "liger_kernel" / "transformers"
        package.mkdir(parents=True)
        (tmp_path / "liger_kernel" / "__init__.py").write_text("")
        (package / "__init__.py").write_text("")
        (package / "functional.py").write_text(source)

    liger_loss_fn.cache_clear()
    yield write
    liger_loss_fn.cache_clear()
    for name in [m for m in sys.modules if m.split(".")[0] == "liger_kernel"]:
        del sys.modules[name]


def tiny_model(softcap: float = 0.0) -> GPT:
    torch.manual_seed(0)  # vocab padded 50257 -> 50304: 47 rows that must never be predicted
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_multiple=128, softcap=softcap),
               loss_chunk_elements=0)


def loss_and_grads(net: GPT, x, y, dtype=None):
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = net(x, y, return_logits=False)[1]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in net.named_parameters()}


def test_nothing_imports_liger_or_dynamo_when_building_and_training_on_the_cpu(shards, tmp_path):
    """A fresh interpreter (the test session imports both): every kind of model built and trained a step with the
    full-logits and the chunked loss, then the loop's run with the full-logits loss, which Liger replaces on CUDA."""
    script = textwrap.dedent(f"""
        import sys
        import torch
        import train_gpt2
        from conftest import SMALL
        from gpt2.config import parse_config
        from gpt2.models import build_model
        for preset in ("tiny", "tiny-modern", "tiny-speedrun", "tiny-edm2"):
            cfg = parse_config(["--preset", preset, "--n-layer", "2", "--seq-len", "16"])[0]
            for chunk in (0, 2**16):
                net = build_model(cfg.model, loss_chunk_elements=chunk)
                x = torch.randint(0, 50257, (2, 16))
                net(x, x, return_logits=False)[1].backward()
        print("dynamo:", "torch._dynamo" in sys.modules)  # the loop's optimizers import it at their first step
        train_gpt2.main(["--preset", "tiny", "--data-dir", {shards!r}, "--log-dir", {str(tmp_path)!r}, *SMALL,
                         "--device", "cpu", "--chunked-loss", "0", "--max-steps", "2", "--sample-every", "0"])
        print("liger:", sorted(m for m in sys.modules if m.startswith("liger_kernel")))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}  # conftest's SMALL, as the test runs use
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = [line for line in proc.stdout.splitlines() if line.startswith(("dynamo:", "liger:"))]
    assert checks == [f"dynamo: {torch.cuda.is_available()}", "liger: []"]  # with CUDA, gpt2.loss imports it


def test_a_liger_package_is_found_but_never_imported_or_called_on_the_cpu(liger_stub, monkeypatch):
    liger_stub("def liger_fused_linear_cross_entropy(*args, **kwargs):\n    raise AssertionError('called')\n")
    x = torch.randint(0, 50257, (2, 16))
    for chunk in (0, 2**16):  # the full-logits loss (which Liger replaces on CUDA) and the chunked one
        net = tiny_model()
        net.loss_chunk_elements = chunk
        net(x, x, return_logits=False)[1].backward()
    assert not fused_wanted("cpu") and not fused_wanted(x.device.type)
    assert "liger_kernel" not in sys.modules
    assert fused_wanted("cuda")  # the same package on a CUDA device: taken (its function imported, not called)
    monkeypatch.setenv(FUSED_ENV, "0")
    assert not fused_wanted("cuda")


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("softcap", [0.0, 15.0], ids=["plain", "softcap"])
def test_fused_loss_gives_the_full_logits_loss_and_gradients(liger_stub, monkeypatch, softcap, dtype):
    """The stub computes plain cross-entropy over the rows it is given: if the model handed it the padded rows,
    or no softcap, the loss would differ."""
    liger_stub(REFERENCE_STUB)
    net = tiny_model(softcap)
    x, y = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    monkeypatch.setattr(model, "fused_wanted", lambda device_type: False)
    ref_loss, ref_grads = loss_and_grads(net, x, y, dtype)
    monkeypatch.setattr(model, "fused_wanted", lambda device_type: True)
    loss, grads = loss_and_grads(net, x, y, dtype)
    from liger_kernel.transformers.functional import calls

    assert calls == [{"input": dtype or torch.float32, "weight": (50257, 32), "softcap": softcap or None,
                      "accum": torch.float32}]
    tolerance = 1e-5 if dtype is None else 2e-2  # bf16: the full path rounds its logits too, the stub does not
    assert loss == pytest.approx(ref_loss, abs=tolerance)
    for name, ref in ref_grads.items():
        assert torch.allclose(grads[name], ref, atol=tolerance * ref.abs().max().item(), rtol=0), name
    assert grads["transformer.wte.weight"][50257:].abs().max() == 0  # the padded rows (tied head): no gradient

