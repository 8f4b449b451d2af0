"""build_model: the one place that turns a GPTConfig into a model of the right class. GPT-2 itself (model.py),
GPT-2 with mixture-of-experts MLPs (moe.py), with the speedruns' residual-stream parts (speedrun.py), both, or a
weight-constrained variant (constrained.py)."""

from gpt2.constrained import EDM2GPT, HypersphereGPT
from gpt2.moe import MoEBlock, MoEGPT
from gpt2.speedrun import SpeedrunBlock, SpeedrunGPT
from model import GPT, LOSS_CHUNK_ELEMENTS, GPTConfig

MODELS = {"gpt2": GPT, "edm2": EDM2GPT, "hypersphere": HypersphereGPT}


class MoESpeedrunBlock(SpeedrunBlock, MoEBlock):
    """The speedrun block's attention (value embeddings) and residual update, with the experts' MLP."""


class MoESpeedrunGPT(SpeedrunGPT, MoEGPT):
    """The speedrun residual stream, with the experts' balancing after each step and their active-FLOP count."""

    Block = MoESpeedrunBlock


def build_model(config: GPTConfig, loss_chunk_elements: int = LOSS_CHUNK_ELEMENTS) -> GPT:
    """The model that config.mode names: GPT-2 itself or one of the constrained variants; with mixture-of-experts
    MLPs when config.moe_experts > 0, with the speedrun parts when config.residual_parts (value_embeds, unet, x0_mix,
    bigram_rows, smear, backout or mudd is on; both need mode gpt2)."""
    if config.moe_experts:
        return (MoESpeedrunGPT if config.residual_parts else MoEGPT)(config, loss_chunk_elements)
    if config.residual_parts:
        return SpeedrunGPT(config, loss_chunk_elements)
    return MODELS[config.mode](config, loss_chunk_elements)
