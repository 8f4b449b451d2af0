"""GPT-2 weights in the Hugging Face layout: a GPT from a directory that transformers' save_pretrained wrote
(or from the hub), and a GPT exported as config.json + model.safetensors that transformers reads.

model.py's module and parameter names are HF's, so both directions are a copy plus one transpose: HF stores
its linear layers as `Conv1D`, with weights (in, out).
"""

import json
import os

import torch
from safetensors.torch import load_file, save

from gpt2.runtime import atomic_write
from model import GPT, GPTConfig

# the OpenAI releases, as HF names them
PRETRAINED = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
# HF's GPT-2 stores these linear layers as Conv1D, weight (in, out): transposed relative to nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_hf(name_or_dir: str) -> tuple[dict, dict]:
    """(HF config, state dict) of a save_pretrained directory, or of a hub name (needs transformers, internet)."""
    # a folder of HF weights holds config.json (this repo's own gpt2/ package folder is no such folder)
    if os.path.isfile(os.path.join(name_or_dir, "config.json")):
        with open(os.path.join(name_or_dir, "config.json")) as f:
            hf = json.load(f)
        st = os.path.join(name_or_dir, "model.safetensors")
        if os.path.exists(st):
            return hf, load_file(st)
        return hf, torch.load(os.path.join(name_or_dir, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    if name_or_dir not in PRETRAINED:
        raise ValueError(f"{name_or_dir!r} is neither a folder with config.json nor one of {sorted(PRETRAINED)}")
    from transformers import GPT2LMHeadModel  # optional dependency, only for hub downloads

    # the full hub id: a bare "gpt2" would name this repo's gpt2/ package folder to transformers
    hf_model = GPT2LMHeadModel.from_pretrained(f"openai-community/{name_or_dir}")
    return hf_model.config.to_dict(), hf_model.state_dict()


def from_pretrained(name_or_dir: str, vocab_multiple: int = 1) -> GPT:
    """OpenAI GPT-2 weights in the HF layout as a GPT: a directory written by transformers' save_pretrained (or
    by export_hf), or a hub name such as 'gpt2' (needs transformers and internet)."""
    hf, sd = read_hf(name_or_dir)
    config = GPTConfig(
        block_size=hf["n_positions"], vocab_size=hf["vocab_size"], vocab_multiple=vocab_multiple,
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], tie_head=hf.get("tie_word_embeddings", True),
    )
    model = GPT(config)
    load_hf_state_dict(model, sd)
    return model


def load_hf_state_dict(model: GPT, sd: dict):
    """Copy an HF GPT-2 state dict into model, in place."""
    ours = model.state_dict()
    for key, value in sd.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")) or (key == "lm_head.weight" and model.config.tie_head):
            continue  # causal-mask buffers of old HF versions; a tied head is wte
        if key not in ours:
            raise KeyError(f"unexpected key in GPT-2 checkpoint: {key}")
        value = value.t() if key.endswith(_CONV1D) else value
        target = ours[key]
        if key in ("transformer.wte.weight", "lm_head.weight"):  # padded rows stay zero: they are never predicted
            target = target[: value.shape[0]]
            ours[key][value.shape[0] :].zero_()
        if target.shape != value.shape:
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)}, model {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)


def export_hf(model: GPT, out_dir: str):
    """Write config.json + model.safetensors (fp32) that transformers.GPT2LMHeadModel.from_pretrained reads."""
    c = model.config
    if not c.is_gpt2:
        raise ValueError("only the plain GPT-2 architecture has an HF GPT-2 layout; this model has switches on")
    sd = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_head:
            continue
        value = value.detach().float().cpu()
        if key in ("transformer.wte.weight", "lm_head.weight"):
            value = value[: c.vocab_size]
        sd[key] = (value.t() if key.endswith(_CONV1D) else value).contiguous()
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "n_positions": c.block_size, "n_ctx": c.block_size, "vocab_size": c.vocab_size,
        "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_inner": None,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "tie_word_embeddings": c.tie_head, "bos_token_id": 50256, "eos_token_id": 50256,
    }
    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with atomic_write(os.path.join(out_dir, "model.safetensors")) as f:
        f.write(save(sd, metadata={"format": "pt"}))
