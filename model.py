"""GPT-2, exactly, plus switches for later architecture ideas: the config, the model, KV-cached sampling and
FLOP counts. No training code lives here; the attention kernels (SDPA, FlexAttention or the scores written out)
are in gpt2/attention.py, the chunked training loss in gpt2/loss.py.

The defaults are GPT-2 to the bit. Every other option is a GPTConfig field, off by default, so each can be
turned on alone and compared against the baseline (see README "Modern options"); gpt2/speedrun.py's docstring
cites the speedrun records behind attn_gate and mtp, which live here. Module and parameter names
follow the OpenAI/HF checkpoint layout, so loading and exporting weights is a rename-free copy (gpt2/hf_io.py).
The constrained modes (gpt2/constrained.py), the experts (gpt2/moe.py) and the speedrun parts (gpt2/speedrun.py)
subclass these classes and override their seams: the `linear` and `make_norm` factories, CausalSelfAttention's
qkv / heads / attend, the sublayers' and Block's forward (the residual update), GPT.Block, add_residual_parts,
blocks (the residual stream through the layers), embed, head_weight, no_decay_params, after_step; the one place
that picks the class for a config is gpt2.models.build_model.
"""

import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.attention import AttentionMask, attention, attention_mask, yarn
from gpt2.loss import chunked_loss, fused_loss, fused_wanted

ARCH_CHOICES = {"norm": ("layernorm", "rmsnorm"), "pos": ("learned", "rope"), "rope_scaling": ("none", "yarn"),
                "mlp": ("gelu", "relu2", "leaky-relu2", "swiglu", "swiglu-oss"),
                "mode": ("gpt2", "edm2", "hypersphere"),
                "ve_gate": ("2sig32", "nanochat"), "x0_mix_init": ("identity", "nanochat"),
                "edm2_storage": ("elements", "rows")}
LOSS_CHUNK_ELEMENTS = 2**24  # logits per chunk of the training loss (64 MB in fp32), see GPT.forward
ATTN_GATE_CHANNELS = 12  # modded-nanogpt's attention-gate input width
LEAKY_SLOPE = 0.5  # leaky-relu2's negative slope (modded-nanogpt record 2026-03-31_LeakyReLUSquared)


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence with pos learned (its table's size); rope runs past it (see hidden)
    vocab_size: int = 50257  # real GPT-2 tokens; only these can ever be predicted
    vocab_multiple: int = 1  # pad the embedding table to a multiple of this (128 -> 50304) for faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # architecture switches; the defaults are GPT-2
    n_kv_head: int = 0  # grouped-query attention: key/value heads, each shared by n_head // n_kv_head; 0 = n_head
    norm: str = "layernorm"  # layernorm | rmsnorm
    bias: bool = True  # biases in the linear layers and LayerNorms
    pos: str = "learned"  # learned (absolute position table) | rope (rotary, on queries and keys)
    rope_theta: float = 10000.0
    # YaRN, to run past the trained context (gpt-oss's defaults): none | yarn (NTK-by-parts, see gpt2.attention.yarn)
    rope_scaling: str = "none"
    rope_factor: float = 32.0  # context extension: the slowest rotations are slowed down this much
    rope_beta_fast: float = 32.0  # rotations in the original context above which a frequency is kept (extrapolated)
    rope_beta_slow: float = 1.0  # ... below which it is divided by rope_factor (interpolated); a ramp between
    rope_original_context: int = 4096  # the context the rotations are counted over (the one trained at)
    # gelu | relu2 (relu squared) | leaky-relu2 (leaky relu, slope 0.5, squared) | swiglu (width 8/3 n_embd: as many
    # weights) | swiglu-oss (gpt-oss)
    mlp: str = "gelu"
    # mixture of experts (gpt2/moe.py; built by gpt2.models.build_model): moe_experts MLPs of width (dense width)
    # / top_k, each token goes to its top_k; 0 = the dense MLP. top_k >= 2: with 1 the router gets no gradient
    # (softmax of one weight), so it is refused, except for a single expert (the dense MLP, where no routing is
    # left to learn)
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_bias_rate: float = 0.001  # aux-loss-free balancing: routing-bias step per optimizer step (DeepSeek-V3's gamma)
    # one more expert, which every token goes to, its output added unweighted (DeepSeek-V3's shared expert, nanochat's
    # MoE); every expert is then (dense width) / (top_k + 1) wide, for the dense MLP's active parameters
    moe_shared: bool = False
    qk_norm: bool = False  # RMS-normalize queries and keys per head before the dot product
    # qk_norm: the normalized queries and keys are each multiplied by this (nanochat 1.2: scores x 1.44, sharper;
    # nanochat/gpt.py @ 92d63d4); 1 = unit-RMS queries and keys
    qk_norm_scale: float = 1.0
    sinks: bool = False  # a learned per-head logit in every softmax denominator: a head may attend to nothing (gpt-oss)
    attn_gate: bool = False  # each head's output times a sigmoid gate on the input's first 12 channels (0.5 at init)
    window: int = 0  # > 0: even layers attend to the last `window` positions only, odd layers to all (gpt-oss: 128)
    tie_head: bool = True  # the LM head is the token embedding (GPT-2) or its own matrix
    zero_init: bool = False  # output projections start at zero, so every block starts as the identity
    softcap: float = 0.0  # > 0: logits = softcap * tanh(logits / softcap)
    doc_mask: bool = False  # a position attends only within its document (each <|endoftext|> opens one)
    embed_norm: bool = False  # RMS-normalize the embedding (token + position) after the lookup (nanochat's norm(wte))
    # the 124M speedruns' wins (gpt2/speedrun.py, built by gpt2.models.build_model): every other layer, the last
    # included, adds a token embedding table of its own to its attention values, gated per kv head (1 at init)
    value_embeds: bool = False
    unet: bool = False  # block j's output (first half) is added to block L-1-j's input, weight learned (1 at init)
    x0_mix: bool = False  # each block's input is a x + b x0 (x0: the embedding); a, b learned per block (1, 0 at init)
    # value_embeds' gate: 2sig32 = 2 sigmoid(linear of the first 32 channels), zero weights (1 at init) | nanochat =
    # 3 sigmoid(linear of the first 12), weights U(0, 0.02) (nanochat/gpt.py @ 92d63d4)
    ve_gate: str = "2sig32"
    # x0_mix's init: identity = a 1, b 0 | nanochat = a from 1.15 (first layer) to 1.05 (last), b from 0.20 to 0.05,
    # linearly (its resid_lambdas and x0_lambdas, nanochat/gpt.py @ 92d63d4)
    x0_mix_init: str = "identity"
    # > 0: a zero-init table of this many rows, looked up by a hash of (previous token, token) and signed by a fixed
    # random sign row, added to the first n_embd / 4 channels of every block's input (modded-nanogpt: 754,560)
    bigram_rows: int = 0
    smear: bool = False  # each position adds a gated share (0 at init) of the previous position's embedding
    backout: bool = False  # before the final norm, subtract a learned share (0.5 at init) of block 2L/3's output
    # MUDD's residual channel: the last block's input and the final norm's each add per-token weighted earlier hidden
    # states (the embedding, the outputs of blocks min(2L/3, L-3) and L-2), weights from a small MLP, 0 at init
    mudd: bool = False
    # multi-token prediction: training also scores the same head's logits at t against the tokens 2..mtp+1 ahead,
    # with weights 0.5^k that fade to 0 over the first mtp / (mtp + 1) of the steps (train_gpt2 sets them per step)
    mtp: int = 0
    # a weight-constrained variant instead of GPT-2 (built by gpt2.models.build_model; they replace `norm` and
    # `bias`: no learned norms, no biases, see README): gpt2 | edm2 | hypersphere
    mode: str = "gpt2"
    mp_blend: float = 0.3  # edm2: residual x <- mp_sum(x, block(x), mp_blend)
    # edm2: elements (EDM2's MPConv): weights at unit RMS per output unit, / sqrt(fan_in) in the forward, q, k, v
    # normalized per head; rows (this repo's first edm2): unit-norm rows, the attention output RMS-normalized instead
    edm2_storage: str = "elements"

    def __post_init__(self):
        for name, choices in ARCH_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, got {self.n_embd // self.n_head}")
        if min(self.n_kv_head, self.window, self.softcap, self.moe_experts) < 0:
            raise ValueError("n_kv_head, window, softcap and moe_experts must be >= 0 (0: off)")
        if self.mode != "gpt2" and self.zero_init:
            raise ValueError(f"zero_init cannot be combined with mode {self.mode}: a zero matrix has no direction")
        for name, default, needs in (("qk_norm_scale", 1.0, "qk_norm"), ("ve_gate", "2sig32", "value_embeds"),
                                     ("x0_mix_init", "identity", "x0_mix")):
            if getattr(self, name) != default and not getattr(self, needs):
                raise ValueError(f"{name} {getattr(self, name)!r} acts on {needs} only: turn it on (--"
                                 f"{needs.replace('_', '-')} 1) or leave {name} at {default!r}")
        if self.mode != "gpt2" and (self.residual_parts or self.embed_norm or self.attn_gate):
            raise ValueError(f"value_embeds, unet, x0_mix, embed_norm, bigram_rows, smear, backout, mudd and attn_gate "
                             f"need mode gpt2: {self.mode} sets the unit magnitudes itself (of its embedding too), and "
                             "the learned mixes and gates would undo them")
        if self.bigram_rows < 0 or self.bigram_rows == 1:
            raise ValueError(f"bigram_rows must be 0 (off) or >= 2 (one row is kept for a token without predecessor), "
                             f"got {self.bigram_rows}")
        if self.backout and self.n_layer < 4:
            raise ValueError(f"backout needs n_layer >= 4, got {self.n_layer}: the output it subtracts, block "
                             f"2*n_layer//3's, must come before the last block's")
        if self.mudd and self.n_layer < 3:
            raise ValueError(f"mudd needs n_layer >= 3, got {self.n_layer}: it reads a block's output from before the "
                             f"last two blocks")
        if not 0 <= self.mtp < self.block_size:
            raise ValueError(f"mtp must be in [0, block_size) = [0, {self.block_size}): a row of block_size tokens "
                             f"has targets at most block_size - 1 ahead, got {self.mtp}")
        if self.rope_scaling == "yarn" and not (self.pos == "rope" and self.rope_factor >= 1
                                                and self.rope_beta_fast > self.rope_beta_slow > 0
                                                and self.rope_original_context > 0):
            raise ValueError("rope_scaling yarn needs pos rope, rope_factor >= 1, rope_beta_fast > rope_beta_slow > 0 "
                             "and rope_original_context > 0")
        if self.moe_experts and not (0 < self.moe_top_k <= self.moe_experts and self.mode == "gpt2"):
            raise ValueError(f"moe_experts {self.moe_experts} needs 0 < moe_top_k <= moe_experts (got "
                             f"{self.moe_top_k}) and mode gpt2 (the constrained modes have no experts)")
        if self.moe_shared and not self.moe_experts:
            raise ValueError("moe_shared needs moe_experts > 0: the shared expert sits beside the routed ones")
        if self.moe_experts > 1 and self.moe_top_k == 1:
            raise ValueError("moe_top_k 1 leaves the router without gradient (softmax over one expert); use 2 or more")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def residual_parts(self) -> bool:
        """True when a switch that gpt2/speedrun.py's SpeedrunGPT builds is on (gpt2.models.build_model picks it)."""
        return any((self.value_embeds, self.unet, self.x0_mix, self.bigram_rows, self.smear, self.backout, self.mudd))

    @property
    def is_gpt2(self) -> bool:
        """True when every architecture switch is at its GPT-2 default (what HF's GPT-2 layout can hold)."""
        # sizes may differ, and so may the settings of switches that are off (rope's, yarn's, the experts', edm2's,
        # mp_blend); doc_mask too: it changes no weight, and on a single document (how HF evaluates) the model is
        # GPT-2 exactly; tie_head: HF's GPT-2 holds an untied head as well (tie_word_embeddings false); and mtp
        # changes the training loss only
        free = ("block_size", "vocab_size", "vocab_multiple", "n_layer", "n_head", "n_embd", "n_kv_head", "rope_theta",
                "rope_factor", "rope_beta_fast", "rope_beta_slow", "rope_original_context", "moe_top_k",
                "moe_bias_rate", "mp_blend", "edm2_storage", "doc_mask", "tie_head", "mtp")
        same = all(getattr(self, f.name) == f.default for f in fields(self) if f.name not in free)
        return same and self.kv_heads == self.n_head


def rope_tables(config: GPTConfig, start: int, T: int, device):
    """cos, sin (T, head_dim / 2) of the rotation angles pos * theta^(-2i / head_dim) for positions start..
    (with YaRN: its frequencies, and both tables times its attention concentration, see yarn)."""
    head_dim = config.n_embd // config.n_head
    inv_freq = config.rope_theta ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if config.rope_scaling == "yarn":
        c = config
        inv_freq, concentration = yarn(inv_freq, c.rope_theta, c.rope_factor, c.rope_beta_fast, c.rope_beta_slow,
                                       c.rope_original_context)
    angles = torch.outer(torch.arange(start, start + T, device=device, dtype=torch.float32), inv_freq)
    if config.rope_scaling == "yarn":
        return angles.cos() * concentration, angles.sin() * concentration
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + D/2]) of x (B, H, T, D) by its position's angle (the GPT-NeoX layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def zero_gate(in_features: int, out_features: int) -> nn.Linear:
    """A gate's linear map (no bias): zero at init, so the gate starts at its sigmoid(0) value; AdamW's "gate" role
    trains it, and manifold Muon leaves it off the Stiefel manifold (unit singular values would move it off 0)."""
    gate = nn.Linear(in_features, out_features, bias=False)
    gate.starts_at_zero, gate.keeps_its_scale, gate.optim_role = True, True, "gate"
    return gate


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head = layer, config.n_head, config.kv_heads  # n_kv_head < n_head: GQA
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = self.linear(config, config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim)
        self.c_proj = self.linear(config, config.n_embd, config.n_embd)
        self.c_proj.residual_out = True  # scaled (or zeroed) at init, see GPT._init_weights
        self.qk_norm, self.qk_norm_scale = config.qk_norm, config.qk_norm_scale
        self.window = config.window if layer % 2 == 0 else 0
        self.sinks = nn.Parameter(torch.zeros(self.n_head)) if config.sinks else None
        self.attn_gate = zero_gate(min(ATTN_GATE_CHANNELS, config.n_embd), self.n_head) if config.attn_gate else None

    def linear(self, config: GPTConfig, in_features: int, out_features: int) -> nn.Linear:
        """The factory of this layer's linear maps (a seam: the constrained models normalize their weights)."""
        return nn.Linear(in_features, out_features, bias=config.bias)

    def forward(self, x, rope=None, cache: "KVCache | None" = None, mask: AttentionMask | None = None):
        return self.c_proj(self.gate_heads(x, self.heads(x, rope, cache, mask)))

    def gate_heads(self, x, y):
        """attn_gate: each head's output in y (B, T, C) times sigmoid of a linear map of the layer input x's first
        channels, one gate per head and position (a head can switch itself off, as a sink lets it). Else y."""
        if self.attn_gate is None:
            return y
        B, T, _ = y.shape
        gate = torch.sigmoid(self.attn_gate(x[..., : self.attn_gate.in_features]))  # (B, T, n_head)
        return (y.view(B, T, self.n_head, self.head_dim) * gate.unsqueeze(-1)).view(B, T, -1)

    def heads(self, x, rope=None, cache: "KVCache | None" = None, mask: AttentionMask | None = None):
        """Every head's output, side by side (B, T, C): the input of the output projection."""
        return self.attend(*self.qkv(x, rope), cache, mask)

    def qkv(self, x, rope=None):
        """Queries (B, n_head, T, D) and keys and values (B, n_kv_head, T, D) of x (B, T, C)."""
        B, T, _ = x.shape
        sizes = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(sizes, dim=2))
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if self.qk_norm_scale != 1.0:  # nanochat's sharper attention (GPTConfig allows it with qk_norm only)
            q, k = q * self.qk_norm_scale, k * self.qk_norm_scale
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def attend(self, q, k, v, cache: "KVCache | None" = None, mask: AttentionMask | None = None):
        """Causal attention of q to k, v and the cached ones, with the layer's window and sinks: (B, T, C)."""
        B, _, T, _ = q.shape
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)
        docs, block_mask = (mask.docs, mask.block_masks.get(self.window)) if mask is not None else (None, None)
        y = attention(q, k, v, start, self.window, self.sinks, docs, block_mask)
        return y.transpose(1, 2).contiguous().view(B, T, -1)


SWIGLU_OSS_LIMIT, SWIGLU_OSS_ALPHA = 7.0, 1.702  # gpt-oss's swiglu_limit and its sigmoid slope
GATED = ("swiglu", "swiglu-oss")  # the MLP kinds whose c_fc holds a gate half and a linear half


def swiglu_oss(gate, linear):
    """gpt-oss's SwiGLU (its swiglu()): the gate clamped above at 7, the linear half to +-7, a sigmoid of slope
    1.702 (GELU's sigmoid approximation), and 1 added to the linear half."""
    gate = gate.clamp(max=SWIGLU_OSS_LIMIT)
    linear = linear.clamp(-SWIGLU_OSS_LIMIT, SWIGLU_OSS_LIMIT)
    return gate * torch.sigmoid(SWIGLU_OSS_ALPHA * gate) * (linear + 1)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, hidden: int = 0):
        """hidden: the hidden width; 0: GPT-2's 4 n_embd (8/3 n_embd for the gated kinds). A MoE expert (gpt2/moe.py)
        passes its own; the dense MLP of a config with experts is refused (GPT's blocks are dense: build_model)."""
        super().__init__()
        if config.moe_experts and not hidden:
            raise ValueError("moe_experts > 0: build the model with gpt2.models.build_model (gpt2.moe.MoEGPT)")
        self.kind = config.mlp
        hidden = hidden or self.dense_width(config)
        self.c_fc = self.linear(config, config.n_embd, (2 if self.kind in GATED else 1) * hidden)
        self.c_proj = self.linear(config, hidden, config.n_embd)
        self.c_proj.residual_out = True

    @staticmethod
    def dense_width(config: GPTConfig) -> int:
        if config.mlp in GATED:  # three matrices instead of two: 8/3 the width keeps the count
            return round(8 * config.n_embd / 3 / 8) * 8
        return 4 * config.n_embd

    def linear(self, config: GPTConfig, in_features: int, out_features: int) -> nn.Linear:
        """As CausalSelfAttention.linear."""
        return nn.Linear(in_features, out_features, bias=config.bias)

    def activation(self, h):
        if self.kind == "gelu":
            return F.gelu(h, approximate="tanh")
        if self.kind == "relu2":
            return F.relu(h).square()
        if self.kind == "leaky-relu2":  # negative inputs keep (0.5 x)^2 and a gradient, where relu2 zeroes both
            return F.leaky_relu(h, LEAKY_SLOPE).square()
        # gate and linear halves side by side (gpt-oss interleaves them: a row permutation, for loading its weights)
        gate, up = h.chunk(2, dim=-1)
        return swiglu_oss(gate, up) if self.kind == "swiglu-oss" else F.silu(gate) * up

    def forward(self, x):
        return self.c_proj(self.activation(self.c_fc(x)))


class Block(nn.Module):
    Attention, MLP = CausalSelfAttention, MLP

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = self.make_norm(config)
        self.attn = self.Attention(config, layer)
        self.ln_2 = self.make_norm(config)
        self.mlp = self.MLP(config)

    @staticmethod
    def make_norm(config: GPTConfig) -> nn.Module:
        """The norm before each sublayer, and the final one (GPT.transformer.ln_f)."""
        if config.norm == "rmsnorm":
            return nn.RMSNorm(config.n_embd, eps=1e-5)
        return nn.LayerNorm(config.n_embd, bias=config.bias)

    def forward(self, x, rope=None, cache: "KVCache | None" = None, mask: AttentionMask | None = None):
        x = x + self.attn(self.ln_1(x), rope, cache, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    Block = Block  # the constrained, MoE and speedrun models put their own here

    def __init__(self, config: GPTConfig, loss_chunk_elements: int = LOSS_CHUNK_ELEMENTS):
        super().__init__()
        self.config = config
        self.loss_chunk_elements = loss_chunk_elements  # 0: the training loss over the full logits at once
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd)))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.h = nn.ModuleList([self.Block(config, i) for i in range(config.n_layer)])
        self.transformer.ln_f = self.Block.make_norm(config)
        self.add_residual_parts(config)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_head:
            self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        if config.mtp:  # the later tokens' loss weights, set per step by the loop (a buffer: compiled graphs read it)
            self.register_buffer("mtp_weights", torch.tensor([0.5**k for k in range(1, config.mtp + 1)]), False)
        self.apply(self._init_weights)

    def add_residual_parts(self, config: GPTConfig):
        """A subclass registers the modules its `blocks` adds to the residual stream here, before the head and the
        init: the parameter order (the checkpoints') and the random init then follow the module tree."""
        if config.residual_parts:
            raise ValueError("value_embeds, unet, x0_mix, bigram_rows, smear, backout and mudd need the speedrun model "
                             "(gpt2.speedrun.SpeedrunGPT): build it with gpt2.models.build_model")

    def _init_weights(self, module):
        # GPT-2: N(0, 0.02) everywhere; projections that write into the residual stream are scaled by
        # 1/sqrt(2 * n_layer) so that the stream's variance does not grow with depth (two per block).
        if isinstance(module, nn.Linear):
            std = 0.0 if getattr(module, "starts_at_zero", False) else 0.02
            if getattr(module, "residual_out", False):
                std = 0.0 if self.config.zero_init else std / math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameter count, tied weights once."""
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx, cache: "KVCache | None" = None):
        """Final-norm hidden states (B, T, n_embd) for token ids idx (B, T)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        # the learned table has block_size rows; rope computes any position's rotation (YaRN extends the context)
        if self.config.pos == "learned" and start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size} (the "
                             f"learned position table's size; pos rope has no such limit)")
        x, rope = self.embed(idx, start), None
        if self.config.pos == "rope":
            rope = rope_tables(self.config, start, T, idx.device)
        windows = {block.attn.window for block in self.transformer.h}
        mask = attention_mask(idx, cache, windows, self.config.doc_mask, self.config.sinks)
        x = self.blocks(x, idx, rope, cache, mask)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def blocks(self, x, idx, rope=None, cache: "KVCache | None" = None, mask: AttentionMask | None = None):
        """The residual stream x of tokens idx through the layers (a seam: the speedrun model mixes more in)."""
        for block in self.transformer.h:
            x = block(x, rope, cache, mask)
        return x

    def set_window(self, window: int):
        """The window of the windowed (even) layers from now on: train_gpt2's window schedule."""
        for block in self.transformer.h:
            if block.attn.layer % 2 == 0:
                block.attn.window = window

    def set_mtp_weights(self, weights: list[float]):
        """The weights of the later tokens' losses from now on: train_gpt2's schedule (gpt2.optim.mtp_weights_at)."""
        self.mtp_weights.copy_(torch.tensor(weights))

    def embed(self, idx, start: int):
        """The residual stream's start for tokens idx (B, T) at positions start..: token plus position embeddings
        (with embed_norm, RMS-normalized: unit RMS whatever the tables' scale)."""
        x = self.transformer.wte(idx)
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(torch.arange(start, start + idx.size(1), dtype=torch.long, device=idx.device))
        return F.rms_norm(x, (x.size(-1),)) if self.config.embed_norm else x

    def head_weight(self) -> torch.Tensor:
        """The (vocab, C) matrix the logits are computed with (one tensor, shared by both loss paths)."""
        return self.lm_head.weight

    def logits(self, h):
        """LM-head logits; padded vocabulary ids get -inf so they carry exactly zero probability."""
        logits = F.linear(h, self.head_weight())
        if self.config.softcap:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if self.config.padded_vocab_size > self.config.vocab_size:
            logits[..., self.config.vocab_size :] = float("-inf")
        return logits

    def forward(self, idx, targets=None, return_logits: bool = True):
        """Returns (logits, loss). With return_logits=False (training) only the mean loss is computed and,
        if loss_chunk_elements > 0, chunk by chunk, so the full (B*T, vocab) logits and their gradient are
        never held in memory (the fastest way on CPU; on CUDA a compiled full-logits loss is faster, and Liger's
        fused loss replaces it where installed: gpt2/loss.py's fused_wanted). With mtp, in training, the later
        tokens' losses (mtp_loss) join the gradient but not the value: the loss is the next-token loss still."""
        h = self.hidden(idx)
        logits, loss = self.head_loss(h, targets, return_logits)
        if self.config.mtp and self.training and targets is not None:
            extra = self.mtp_loss(h, targets)
            loss = loss + (extra - extra.detach())  # adds 0 to the value (what is logged), extra to the gradient
        return logits, loss

    def head_loss(self, h, targets=None, return_logits: bool = True):
        """(logits, loss) of the final hidden states h (B, T, C) and targets (B, T), by the path forward describes."""
        if not return_logits and not self.loss_chunk_elements and targets is not None and fused_wanted(h.device.type):
            c = self.config
            return None, fused_loss(h.flatten(0, 1), self.head_weight(), targets.flatten(), c.vocab_size, c.softcap)
        if not return_logits and self.loss_chunk_elements > 0:
            assert targets is not None, "return_logits=False needs targets"
            c = self.config
            chunk_rows = max(1, self.loss_chunk_elements // c.padded_vocab_size)
            return None, chunked_loss(h.flatten(0, 1), self.head_weight(), targets.flatten(), c.vocab_size,
                                      c.softcap, chunk_rows)
        logits = self.logits(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return (logits if return_logits else None), loss

    def mtp_loss(self, h, targets):
        """Multi-token prediction (modded-nanogpt): the same head's loss of position t against the token k + 1 ahead,
        targets[t + k], each a mean over the positions that have one, times mtp_weights[k - 1], summed over k."""
        T = targets.size(1)
        losses = [self.head_loss(h[:, : T - k], targets[:, k:], return_logits=False)[1]
                  for k in range(1, min(self.config.mtp, T - 1) + 1)]
        return sum((w * loss for w, loss in zip(self.mtp_weights, losses)), torch.zeros((), device=h.device))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, generator=None):
        """Extend idx (B, T) by max_new_tokens tokens. temperature 0 is greedy."""
        return torch.cat([idx, *self.generate_tokens(idx, max_new_tokens, temperature, top_k, generator)], dim=1)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                        generator=None):
        """Yield the (B, 1) ids of each new token as soon as it is sampled (sample.py streams them). The prompt
        is run once (prefill) and each new token costs a single position thanks to the KV cache."""
        B, T = idx.shape
        cache = KVCache(self.config, B, T + max_new_tokens, idx.device, self.lm_head.weight.dtype)
        if torch.is_autocast_enabled(idx.device.type):
            cache.k, cache.v = (t.to(torch.get_autocast_dtype(idx.device.type)) for t in (cache.k, cache.v))
        step_input = idx
        for _ in range(max_new_tokens):
            logits = self.logits(self.hidden(step_input, cache)[:, -1, :]).float()
            step_input = sample_next(logits, temperature, top_k, generator)
            yield step_input

    # ------------------------------------------------------------------ optimization and FLOPs

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside the blocks (what Muon optimizes); not the embeddings/head, biases or norms."""
        return [p for p in self.transformer.h.parameters() if p.dim() == 2]

    def no_decay_params(self) -> list[nn.Parameter]:
        """Parameters weight decay leaves alone: biases, norm gains and other vectors."""
        return [p for p in self.parameters() if p.dim() < 2]

    def after_step(self):
        """The training loop calls this after every optimizer step; GPT-2 has nothing to do there."""

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas, eps: float, device_type: str,
                             exclude=()):
        """AdamW with weight decay on the matrices (incl. the embedding) outside no_decay_params(); fused kernel
        where available. Parameters in `exclude` are left out (another optimizer owns them)."""
        skip, no_decay = {id(p) for p in exclude}, {id(p) for p in self.no_decay_params()}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in skip]
        decays = [id(p) not in no_decay for p in params]
        groups = [{"params": [p for p, d in zip(params, decays) if d], "weight_decay": weight_decay},
                  {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, **({"fused": True} if fused else {}))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, the usual 6N + 12*L*C*T: 2 (multiply-add) x 3 (forward, and backward
        for inputs and weights) per matmul weight, plus attention scores and values (counted un-masked, as MFU
        conventions do, sliding windows too). N counts matmul weights only: the position and value-embedding
        tables (and an untied token table), biases and norms do no matmul."""
        c = self.config
        lookups = [m.weight.numel() for m in self.modules()  # a tied token table is the head: a matmul
                   if isinstance(m, nn.Embedding) and m.weight is not self.lm_head.weight]
        n_matmul = sum(p.numel() for p in self.parameters() if p.dim() >= 2) - sum(lookups)
        return 6 * n_matmul + 12 * c.n_layer * c.n_embd * seq_len


class KVCache:
    """Keys and values of every layer for positions [0, pos), preallocated up to `max_len` (and, with doc_mask,
    the positions' document ids, which a decode step continues)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.n_embd // config.n_head)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.docs = torch.zeros(batch_size, max_len, device=device, dtype=torch.long) if config.doc_mask else None
        self.pos = 0  # number of positions already stored (advanced by GPT.hidden after all layers ran)
        self.last = None  # the last token fed (B, 1): the speedrun's smear and bigram read it at the next step

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v (B, H, t, D) and return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_docs(self, docs: torch.Tensor) -> torch.Tensor:
        """Store the document ids (B, t) of this step's tokens, counted from 0, after the cached ones; return all."""
        end = self.pos + docs.size(1)
        self.docs[:, self.pos : end] = docs + (self.docs[:, self.pos - 1 : self.pos] if self.pos else 0)
        return self.docs[:, :end]


def sample_next(logits, temperature: float, top_k: int | None, generator=None):
    """Next token ids (B, 1) from last-position logits (B, V): greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
