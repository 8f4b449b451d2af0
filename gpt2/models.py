"""build_model: the one place that turns a GPTConfig into a model of the right class. GPT-2 itself (model.py),
GPT-2 with mixture-of-experts MLPs (moe.py), or a weight-constrained variant (constrained.py)."""

from gpt2.constrained import EDM2GPT, HypersphereGPT
from gpt2.moe import MoEGPT
from model import GPT, LOSS_CHUNK_ELEMENTS, GPTConfig

MODELS = {"gpt2": GPT, "edm2": EDM2GPT, "hypersphere": HypersphereGPT}


def build_model(config: GPTConfig, loss_chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> GPT:
    """The model that config.mode names: GPT-2 itself or one of the constrained variants; GPT-2 with
    mixture-of-experts MLPs when config.moe_experts > 0."""
    if config.moe_experts:
        return MoEGPT(config, loss_chunk_elements)
    return MODELS[config.mode](config, loss_chunk_elements)
