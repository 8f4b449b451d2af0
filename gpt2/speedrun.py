"""The 124M speedruns' residual-stream wins (modded-nanogpt, nanochat) as subclasses of model.py's GPT, picked by
gpt2.models.build_model when any of GPTConfig.value_embeds, unet or x0_mix is on:

- value_embeds: every other layer, the last included, adds a token embedding table of its own to its attention
  values, gated per kv head by 2 sigmoid(linear) of the layer input's first 32 channels (1 at init), or with
  ve_gate nanochat by nanochat's current gate, 3 sigmoid(linear) of the first 12, small positive weights at init.
- unet: block j's output (first half) is added to block L-1-j's input, each skip weighted by a learned scalar
  (1 at init).
- x0_mix: each block's input is a x + b x0 (x0: the embedding), a and b learned per block (1 and 0 at init, or
  with x0_mix_init nanochat its per-layer ramps).

SpeedrunGPT registers its tables and weights through GPT.add_residual_parts, so the module and parameter names,
their order (the checkpoint format) and the random init are those the switches always had.
"""

import torch
import torch.nn as nn

from model import GPT, Block, CausalSelfAttention, GPTConfig

# GPTConfig.ve_gate -> (the sigmoid's scale, input channels, init range of the weights; None: zeros). 2sig32 is
# nanochat's gate of nanochat/gpt.py @ e85db6b; since 6ed7d1d (still @ 92d63d4) 3 sigmoid of 12, weights U(0, 0.02)
VE_GATES = {"2sig32": (2.0, 32, None), "nanochat": (3.0, 12, (0.0, 0.02))}


def has_value_embed(config: GPTConfig, layer: int) -> bool:
    """value_embeds: every other layer counted back from the last (nanochat's layout)."""
    return config.value_embeds and layer % 2 == (config.n_layer - 1) % 2


class SpeedrunAttention(CausalSelfAttention):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__(config, layer)
        self.ve_gate = None
        self.ve_gate_scale, channels, init_range = VE_GATES[config.ve_gate]
        if has_value_embed(config, layer):  # reads the first channels of the input, as nanochat's gate does
            self.ve_gate = nn.Linear(min(channels, config.n_embd), self.n_kv_head, bias=False)
            self.ve_gate.starts_at_zero = init_range is None  # gate 2 sigmoid(0) = 1: the values plus the embedding
            self.ve_gate.init_uniform = init_range  # nanochat's: a gate near 3 sigmoid(0) = 1.5 at init
            self.ve_gate.keeps_its_scale = True  # off the Stiefel manifold: unit singular values would move it off 1
            self.ve_gate.optim_role = "gate"  # AdamW's gate settings, where AdamW has it (gpt2/optim.py)

    def forward(self, x, rope=None, cache=None, mask=None, ve=None):
        return self.c_proj(self.heads(x, rope, cache, mask, ve))

    def heads(self, x, rope=None, cache=None, mask=None, ve=None):
        """ve (B, T, kv width): this layer's value embedding of the tokens, added to the values through the gate."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, rope)
        if ve is not None:
            gate = self.ve_gate_scale * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (B, T, Hkv)
            v = v + gate.transpose(1, 2).unsqueeze(-1) * ve.view(B, T, -1, self.head_dim).transpose(1, 2)
        return self.attend(q, k, v, cache, mask)


class SpeedrunBlock(Block):
    Attention = SpeedrunAttention

    def forward(self, x, rope=None, cache=None, mask=None, ve=None):
        x = x + self.attn(self.ln_1(x), rope, cache, mask, ve)
        x = x + self.mlp(self.ln_2(x))
        return x


class SpeedrunGPT(GPT):
    Block = SpeedrunBlock

    def add_residual_parts(self, config: GPTConfig):
        if config.value_embeds:  # one table per layer that has a gate, of the values' width
            width = config.kv_heads * (config.n_embd // config.n_head)
            self.transformer.ve = nn.ModuleDict({str(i): nn.Embedding(config.padded_vocab_size, width)
                                                 for i in range(config.n_layer) if has_value_embed(config, i)})
        if config.unet:
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        if config.x0_mix:
            depth = torch.arange(config.n_layer) / max(config.n_layer - 1, 1)  # 0 at the first layer, 1 at the last
            nanochat = config.x0_mix_init == "nanochat"  # more residual and more x0 early (gpt.py @ 92d63d4)
            self.x_lambdas = nn.Parameter(1.15 - 0.10 * depth if nanochat else torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(0.20 - 0.15 * depth if nanochat else torch.zeros(config.n_layer))

    def _init_weights(self, module):
        super()._init_weights(module)
        if getattr(module, "init_uniform", None):  # nanochat's gate: small positive weights
            torch.nn.init.uniform_(module.weight, *module.init_uniform)

    def blocks(self, x, idx, rope=None, cache=None, mask=None):
        x0, skips, L = x, [], self.config.n_layer
        for i, block in enumerate(self.transformer.h):
            if self.config.unet and i >= L - L // 2:  # the mirror of block L-1-i of the first half
                x = x + self.skip_weights[L - 1 - i] * skips[L - 1 - i]
            if self.config.x0_mix:
                x = self.x_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.transformer.ve[str(i)](idx) if has_value_embed(self.config, i) else None
            x = block(x, rope, cache, mask, ve)
            skips += [x] if self.config.unet else []
        return x
