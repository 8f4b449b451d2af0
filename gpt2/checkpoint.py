"""A GPT from a saved file: a train_gpt2.py checkpoint, or a model ema.py reconstructed (both hold 'model', a
state dict, and 'model_config', the GPTConfig fields). The one place that turns such a file back into a model,
for hellaswag.py, sample.py and ema.py."""

import os

from gpt2.models import build_model
from gpt2.runtime import load_torch_file
from model import GPT, GPTConfig


def model_from_config(model_config: dict) -> GPT:
    """A freshly initialized model of the class and shape a saved 'model_config' names (any preset, switch or mode)."""
    return build_model(GPTConfig(**model_config))


def load_model(path: str) -> GPT:
    """The model saved in a checkpoint file, on the CPU. A missing file raises FileNotFoundError, another kind
    of file ValueError; both name the path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file (train_gpt2.py writes logs/<run>/ckpt_<step>.pt)")
    ckpt = load_torch_file(path)  # names a file that is not a checkpoint
    try:
        state, config = ckpt["model"], ckpt["model_config"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a training checkpoint: expected keys 'model' and 'model_config'") from e
    model = model_from_config(config)
    # a torch.compile'd model's state_dict has every key under '_orig_mod.'
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
    return model
