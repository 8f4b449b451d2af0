"""Mixture of experts instead of the dense MLP (GPTConfig.moe_experts > 0; gpt2.models.build_model picks MoEGPT).

Routing as gpt-oss's MLPBlock: router logits -> the top-k experts -> softmax over those k logits -> the
weighted sum of the k experts' outputs. Each expert is a model.MLP of the chosen --mlp kind (swiglu-oss for
gpt-oss's experts), of width (dense width) / k: k active experts hold the dense MLP's active parameters.

Balancing is DeepSeek-V3's auxiliary-loss-free method (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
Strategy for Mixture-of-Experts"): a per-expert bias is added to the router logits for the top-k choice only
(never to the weights), and after every optimizer step each bias moves by rate * sign(mean load - its load).
Chosen over a Switch-style auxiliary loss because it adds no gradient that competes with the language-model
loss (DeepSeek-V3 reports better models for it), needs no loss plumbing, and leaves the logged loss pure
cross-entropy, comparable with the dense runs.

Dropless: every token goes to its k experts, computed by running every expert on every token in one batched
matmul and combining with a (tokens, experts) gate matrix that is zero outside each token's top k. The shapes
are static (torch.compile sees no data-dependent sizes) and every expert takes part in every graph (DDP needs
no find_unused_parameters), at E/k times the active FLOPs: right for the few experts of a small model, wasteful
at gpt-oss's 4 of 128, where sorted tokens and a grouped GEMM would be the next step. flops_per_token and MFU
count the active experts only, so this waste shows as a lower MFU.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, MLP, Block, GPTConfig


class MoE(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.top_k, self.bias_rate = config.moe_top_k, config.moe_bias_rate
        self.router = nn.Linear(config.n_embd, config.moe_experts, bias=config.bias)
        self.router.keeps_its_scale = True  # its logits' scale is how sharp the routing is: off the Stiefel manifold
        width = max(1, MLP.dense_width(config) // config.moe_top_k)
        self.experts = nn.ModuleList(MLP(config, hidden=width) for _ in range(config.moe_experts))
        # the balancing bias: part of the routing (and of checkpoints), not a parameter
        self.register_buffer("route_bias", torch.zeros(config.moe_experts))
        # expert choices of this optimizer step's training forwards (a plain attribute, not a buffer: DDP would
        # overwrite every rank's with rank 0's), and the last step's per-expert fractions (all ranks)
        self.step_counts: torch.Tensor | None = None
        self.loads: torch.Tensor | None = None

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        gates = self.gates(x)
        experts = list(self.experts)
        h = x @ torch.stack([e.c_fc.weight for e in experts]).mT  # (E, N, hidden) for every expert at once
        if experts[0].c_fc.bias is not None:
            h = h + torch.stack([e.c_fc.bias for e in experts])[:, None]
        y = experts[0].activation(h) @ torch.stack([e.c_proj.weight for e in experts]).mT  # (E, N, C)
        if experts[0].c_proj.bias is not None:
            y = y + torch.stack([e.c_proj.bias for e in experts])[:, None]
        return torch.einsum("enc,ne->nc", y, gates.to(y.dtype)).view(B, T, C)

    def gates(self, x):
        """(N, E): each token's softmax weights over its top-k experts, zero for the others."""
        with torch.autocast(x.device.type, enabled=False):  # the routing decision in fp32
            bias = None if self.router.bias is None else self.router.bias.float()
            logits = F.linear(x.float(), self.router.weight.float(), bias)
        chosen = torch.topk(logits + self.route_bias, self.top_k, dim=-1).indices
        if self.training and torch.is_grad_enabled():  # training forwards only: not val, HellaSwag or sampling
            counts = torch.zeros_like(logits).scatter(1, chosen, 1.0).sum(0).detach()
            self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        weights = torch.softmax(logits.gather(1, chosen), dim=-1)
        return torch.zeros_like(logits).scatter(1, chosen, weights)

    @torch.no_grad()
    def rebalance(self, counts: torch.Tensor):
        """After an optimizer step, from its expert choices on all ranks: overloaded experts' bias down by
        bias_rate, underloaded ones' up."""
        self.route_bias += self.bias_rate * torch.sign(counts.mean() - counts)
        self.loads = counts / counts.sum()
        self.step_counts = None


class MoEBlock(Block):
    MLP = MoE


class MoEGPT(GPT):
    Block = MoEBlock

    def moe_layers(self) -> list[MoE]:
        return [block.mlp for block in self.transformer.h]

    def after_step(self):
        super().after_step()
        layers = self.moe_layers()
        if layers[0].step_counts is None:  # no training forward since the last step
            return
        counts = torch.stack([m.step_counts for m in layers])
        if dist.is_available() and dist.is_initialized():  # every rank: the same loads, so the same biases
            dist.all_reduce(counts)
        for m, c in zip(layers, counts):
            m.rebalance(c)

    def moe_loads(self) -> list[list[float]] | None:
        """Per layer, each expert's fraction of the last optimizer step's expert choices (all ranks, all
        micro-batches; balanced: 1 / moe_experts each), for metrics.jsonl. None before the first step."""
        layers = self.moe_layers()
        if layers[0].loads is None:
            return None
        return [[round(f, 4) for f in m.loads.tolist()] for m in layers]

    def flops_per_token(self, seq_len: int) -> int:
        """GPT's count with the active parameters only: a token's k experts and the router, not the E - k
        idle experts (which the dense evaluation computes anyway, see the module docstring)."""
        c = self.config
        expert = sum(p.numel() for p in self.moe_layers()[0].experts[0].parameters() if p.dim() >= 2)
        return super().flops_per_token(seq_len) - 6 * c.n_layer * (c.moe_experts - c.moe_top_k) * expert
