"""The 124M speedruns' residual-stream wins (modded-nanogpt, nanochat) as subclasses of model.py's GPT, picked by
gpt2.models.build_model when any of GPTConfig.value_embeds, unet, x0_mix, bigram_rows, smear, backout or mudd is on:

- value_embeds: every other layer, the last included, adds a token embedding table of its own to its attention
  values, gated per kv head by 2 sigmoid(linear) of the layer input's first 32 channels (1 at init), or with
  ve_gate nanochat by nanochat's current gate, 3 sigmoid(linear) of the first 12, small positive weights at init.
- unet: block j's output (first half) is added to block L-1-j's input, each skip weighted by a learned scalar
  (1 at init).
- x0_mix: each block's input is a x + b x0 (x0: the embedding), a and b learned per block (1 and 0 at init, or
  with x0_mix_init nanochat its per-layer ramps).

The 2025-26 records (modded-nanogpt's README record table @ f411b3d3, 8xH100 wall time of a whole record, which
often bundles other changes; the folders are its records/track_1_short/). attn_gate and mtp live in model.py.
- bigram_rows: a table of token pairs, row ((36313 token) xor (27191 previous)) mod (rows - 1), the last row for
  a token without predecessor, zero at init, added to every block's input times a learned per-block share (0.05
  at init). Record #62, 1.748 -> 1.655 min (-5.3%; "-5.1s" for the table in 2026-01-19_BigramHashEmbedding/
  README.md @ 93f0e6b9: 5 x 50,304 rows of full width). Its sign trick, record #83, 1.353 -> 1.328 min (-1.85%;
  2026-05-20_BigramsSignTrick/pr299/statistics.md @ 2d218013: -0.96 s of 85.39 s at the same loss): 15 x 50,304
  rows, n_embd / 4 wide, each pair's row times a fixed random +-1 row, row (previous xor token) mod 8192 of 8192,
  so pairs that share a table row pull it in different directions.
- smear: x_t + lambda sigmoid(W x_t[:12]) x_{t-1} on the embedding, W zero and lambda 0 at init. Record #34,
  2.565 -> 2.547 min (-0.7%; "-15 steps", 2025-09-18_Smear/README.md @ 9764e2ae). nanochat's (nanochat/gpt.py @
  92d63d4e) reads 24 channels of the normalized embedding; with backout it came from its autoresearch round 2,
  dev/LEADERBOARD.md run 6: 1.80 -> 1.65 h to GPT-2's CORE.
- backout: x - lambda x_b before the final norm, x_b block b = 2L/3's output (8 of 12), lambda 0.5 at init.
  Record #40, 2.447 -> 2.358 min (-3.6% with hyper-parameter tuning, 2025-10-04_Backout/README.md @ 33e7e54c).
  nanochat: block L // 2, lambda 0.2.
- attn_gate (model.py): each head's output times sigmoid(W x[:12]), x the attention's input, W zero (0.5 at init):
  a head can output nothing, as a sink lets it. Record #28 (PR #117), 2.817 -> 2.812 min (-0.2%; "50 steps
  fewer, with slight increase in time per step", 2025-08-23_SparseAttnGate/README.md @ d7e16ad3).
- mtp (model.py): the same head's logits at t also scored against the tokens 2 and 3 ahead, no new parameters,
  weights [1, 0.5, 0.25 -> 0], then [1, 0.5 -> 0], then [1] over thirds of the steps. Record #53, 2.037 -> 1.988
  min (-2.4% with untying the head at 2/3; about -3.06 s of 122.8 s, 2025-12-22_MultiTokenPrediction/README.md @
  9060ff47). Here each offset's loss is its mean over the positions that have a target (the record sums and
  divides by all positions: (T - k) / T apart), and costs one more LM-head pass (the record's kernel reads all
  offsets from one). nanochat's dev/LOG.md (2026-01-12) found it negative at d12.
- mudd: MUDD's residual channel (multiway dynamic dense connections, arXiv 2502.12170) at two sites, the last
  block's input and the final norm's: x + sum_j m_j(x) s_j over earlier hidden states s_j (the embedding x0, block
  min(2L/3, L-3)'s output and block L-2's: x itself at the first site), per-token weights m(x) = 0.1
  (W2 gelu(W1 x) + b), W1 64 wide, W2 and b zero: a no-op at init. Record #81, 1.406 -> 1.363 min (-3.1%, 65 steps
  fewer, 2026-04-22_MuddFormer/README.md @ 5be9ba09; train_gpt.py @ f411b3d3 init_mudd): the record also mixes the
  same sources into the last block's attention values, which GQA's narrower values cannot take here, and trains the
  MLP with Adam at a quarter of its lr, betas (0.9, 0.99); here AdamW's gate role trains it.
Unlike the records, which hash one long stream, a row's first token has no predecessor here (KV-cache decoding
carries the last token in KVCache.last).

SpeedrunGPT registers its tables and weights through GPT.add_residual_parts, so the module and parameter names,
their order (the checkpoint format) and the random init are those the switches always had.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, Block, CausalSelfAttention, GPTConfig, zero_gate

# GPTConfig.ve_gate -> (the sigmoid's scale, input channels, init range of the weights; None: zeros). 2sig32 is
# nanochat's gate of nanochat/gpt.py @ e85db6b; since 6ed7d1d (still @ 92d63d4) 3 sigmoid of 12, weights U(0, 0.02)
VE_GATES = {"2sig32": (2.0, 32, None), "nanochat": (3.0, 12, (0.0, 0.02))}
# modded-nanogpt's bigram hash: ((36313 * token) xor (27191 * previous)) mod (rows - 1); signs: 8192 random rows,
# row (previous xor token) mod 8192; the table is n_embd / 4 wide, zero at init, its per-layer share 0.05
BIGRAM_MULTIPLIERS = (36313, 27191)
BIGRAM_SIGN_ROWS, BIGRAM_SIGN_SEED, BIGRAM_WIDTH_DIVISOR, BIGRAM_LAMBDA_INIT = 8192, 0, 4, 0.05
SMEAR_GATE_CHANNELS = 12  # modded-nanogpt's smear gate input width (nanochat: 24)
BACKOUT_LAMBDA_INIT = 0.5  # modded-nanogpt's (nanochat: 0.2, at block n_layer // 2)
MUDD_WIDTH, MUDD_SCALE = 64, 0.1  # modded-nanogpt's dense-connection MLP width and output scale (init_mudd)


def bigram_hash(prev, idx, rows: int):
    """The table row of each token pair (prev, idx) (int64: the same as modded-nanogpt's int32 for ids < 59139)."""
    return torch.bitwise_xor(BIGRAM_MULTIPLIERS[0] * idx, BIGRAM_MULTIPLIERS[1] * prev) % (rows - 1)


def backout_layer(n_layer: int) -> int:
    """The block whose output backout subtracts: 2/3 of the way up (modded-nanogpt: block 8 of 12)."""
    return 2 * n_layer // 3


def mudd_source_layer(n_layer: int) -> int:
    """The block whose output both dense connections read: backout's 2L/3 (modded-nanogpt's cache[7] of its 11
    blocks), at most L-3, so that it is not the last block's input."""
    return min(backout_layer(n_layer), n_layer - 3)


def has_value_embed(config: GPTConfig, layer: int) -> bool:
    """value_embeds: every other layer counted back from the last (nanochat's layout)."""
    return config.value_embeds and layer % 2 == (config.n_layer - 1) % 2


class DenseConnection(nn.Module):
    """MUDD's residual channel at one site: x plus the sources, each times a per-token weight that a small MLP of x
    computes; its output layer starts at zero, so the connection starts as the identity."""

    def __init__(self, n_embd: int, n_sources: int):
        super().__init__()
        self.fc = nn.Linear(n_embd, MUDD_WIDTH, bias=False)
        self.fc.init_uniform = (-(n_embd**-0.5), n_embd**-0.5)  # the record's kaiming_uniform_(a=sqrt(5))
        self.proj = nn.Linear(MUDD_WIDTH, n_sources)
        self.proj.starts_at_zero = True
        self.optim_role = "gate"  # AdamW's, under Muon too: the record keeps it off Muon

    def forward(self, x, sources):
        weights = MUDD_SCALE * self.proj(F.gelu(self.fc(x)))  # (B, T, sources)
        return x + sum(weights[..., j : j + 1] * source for j, source in enumerate(sources))


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
        return self.c_proj(self.gate_heads(x, self.heads(x, rope, cache, mask, ve)))

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
        self.add_bigram_smear_backout(config)
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

    def add_bigram_smear_backout(self, config: GPTConfig):
        """The bigram table, the smear gate, the backout share and the dense connections (the 2025-26 records, see
        the module docstring)."""
        if config.bigram_rows:
            self.transformer.bigram = nn.Embedding(config.bigram_rows, config.n_embd // BIGRAM_WIDTH_DIVISOR)
            self.transformer.bigram.starts_at_zero, self.transformer.bigram.optim_role = True, "embed"
            signs = torch.randint(0, 2, (BIGRAM_SIGN_ROWS, self.transformer.bigram.embedding_dim),
                                  generator=torch.Generator().manual_seed(BIGRAM_SIGN_SEED))
            self.register_buffer("bigram_signs", 2.0 * signs - 1)  # fixed, and in the checkpoint: never trained
            self.bigram_lambdas = nn.Parameter(torch.full((config.n_layer,), BIGRAM_LAMBDA_INIT))
        if config.smear:
            self.smear_gate = zero_gate(min(SMEAR_GATE_CHANNELS, config.n_embd), 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.full((1,), BACKOUT_LAMBDA_INIT))
        if config.mudd:  # sources: x0, the outputs of block mudd_source_layer and of block L-2
            self.dense_in, self.dense_out = DenseConnection(config.n_embd, 3), DenseConnection(config.n_embd, 3)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.Embedding) and getattr(module, "starts_at_zero", False):
            nn.init.zeros_(module.weight)  # the bigram table: its rows grow from zero as pairs are seen
        if getattr(module, "init_uniform", None):  # nanochat's gate: small positive weights
            torch.nn.init.uniform_(module.weight, *module.init_uniform)

    def blocks(self, x, idx, rope=None, cache=None, mask=None):
        x, bigram = self.pair_inputs(x, idx, cache)
        x0, skips, L, source = x, [], self.config.n_layer, None
        for i, block in enumerate(self.transformer.h):
            if self.config.mudd and i == L - 1:  # the last block reads the earlier states through its own mix
                before_last = x
                x = self.dense_in(x, (x0, source, x))
            if self.config.unet and i >= L - L // 2:  # the mirror of block L-1-i of the first half
                x = x + self.skip_weights[L - 1 - i] * skips[L - 1 - i]
            if self.config.x0_mix:
                x = self.x_lambdas[i] * x + self.x0_lambdas[i] * x0
            if bigram is not None:
                x = x + self.bigram_lambdas[i] * bigram
            ve = self.transformer.ve[str(i)](idx) if has_value_embed(self.config, i) else None
            x = block(x, rope, cache, mask, ve)
            skips += [x] if self.config.unet else []
            if self.config.backout and i == backout_layer(L):
                early = x
            if self.config.mudd and i == mudd_source_layer(L):
                source = x
        if self.config.backout:  # what the early layers wrote for the later ones, not for the head
            x = x - self.backout_lambda * early
        if self.config.mudd:
            x = self.dense_out(x, (x0, source, before_last))
        return x

    def pair_inputs(self, x, idx, cache=None):
        """The embedding x smeared (smear) and the bigram embedding (bigram_rows; else None) of tokens idx. Both read
        each token's predecessor: the one before it in idx, the cache's last token at a decode step, none for a
        row's first token (modded-nanogpt lets a document's first token read the previous document's last)."""
        if not (self.config.smear or self.config.bigram_rows):
            return x, None
        start = cache.pos if cache is not None else 0
        prev, x_prev = idx[:, :-1], x[:, :-1]
        if start:
            prev, x_prev = torch.cat([cache.last, prev], 1), torch.cat([self.embed(cache.last, start - 1), x_prev], 1)
        if cache is not None:
            cache.last = idx[:, -1:]
        first = idx.size(1) - prev.size(1)  # 1: the first token has no predecessor, 0: it has
        bigram = self.bigram_embedding(idx[:, first:], prev, first) if self.config.bigram_rows else None
        if self.config.smear:
            gate = self.smear_lambda * torch.sigmoid(self.smear_gate(x[:, first:, : self.smear_gate.in_features]))
            x = torch.cat([x[:, :first], x[:, first:] + gate * x_prev], 1)
        return x, bigram

    def bigram_embedding(self, idx, prev, first: int):
        """(B, first + T, n_embd): the table's row for each pair (prev, idx) times that pair's sign row, in the first
        n_embd / 4 channels; the `first` positions without predecessor get the last row and sign row 0."""
        rows = F.pad(bigram_hash(prev, idx, self.config.bigram_rows), (first, 0), value=self.config.bigram_rows - 1)
        sign_rows = F.pad(torch.bitwise_xor(prev, idx) % BIGRAM_SIGN_ROWS, (first, 0), value=0)
        pairs = self.transformer.bigram(rows) * self.bigram_signs[sign_rows]
        return F.pad(pairs, (0, self.config.n_embd - pairs.size(-1)))
