"""The 124M speedruns' residual-stream wins (modded-nanogpt, nanochat) as subclasses of model.py's GPT, picked by
gpt2.models.build_model when any of GPTConfig.value_embeds, unet or x0_mix is on:

- value_embeds: every other layer, the last included, adds a token embedding table of its own to its attention
  values, gated per kv head by 2 sigmoid(linear) of the layer input's first channels (1 at init: nanochat).
- unet: block j's output (first half) is added to block L-1-j's input, each skip weighted by a learned scalar
  (1 at init).
- x0_mix: each block's input is a x + b x0 (x0: the embedding), a and b learned per block (1 and 0 at init).

SpeedrunGPT registers its tables and weights through GPT.add_residual_parts, so the module and parameter names,
their order (the checkpoint format) and the random init are those the switches always had.
"""

import torch
import torch.nn as nn

from model import GPT, Block, CausalSelfAttention, GPTConfig

VE_GATE_CHANNELS = 32  # nanochat's value-embedding gate input width


def has_value_embed(config: GPTConfig, layer: int) -> bool:
    """value_embeds: every other layer counted back from the last (nanochat's layout)."""
    return config.value_embeds and layer % 2 == (config.n_layer - 1) % 2


class SpeedrunAttention(CausalSelfAttention):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__(config, layer)
        self.ve_gate = None
        if has_value_embed(config, layer):  # reads the first channels of the input, as nanochat's gate does
            self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, config.n_embd), self.n_kv_head, bias=False)
            self.ve_gate.starts_at_zero = True  # gate 2 sigmoid(0) = 1: the values plus the embedding at init
            self.ve_gate.keeps_its_scale = True  # off the Stiefel manifold: unit singular values would move it off 1

    def forward(self, x, rope=None, cache=None, mask=None, ve=None):
        return self.c_proj(self.heads(x, rope, cache, mask, ve))

    def heads(self, x, rope=None, cache=None, mask=None, ve=None):
        """ve (B, T, kv width): this layer's value embedding of the tokens, added to the values through the gate."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, rope)
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (B, T, n_kv_head)
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
            self.x_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))

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
