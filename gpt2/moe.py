"""Mixture of experts instead of the dense MLP (GPTConfig.moe_experts > 0; gpt2.models.build_model picks MoEGPT).

Routing as gpt-oss's MLPBlock: router logits -> the top-k experts -> softmax over those k logits -> the
weighted sum of the k experts' outputs. Each expert is a model.MLP of the chosen --mlp kind (swiglu-oss for
gpt-oss's experts), of width (dense width) / k: k active experts hold the dense MLP's active parameters.
With moe_shared, one more expert of that kind takes every token and its output is added unweighted (DeepSeek-V3's
shared expert, as karpathy/nanochat's MoE has it: nanochat/moe.py @ 0e4b3fa, PR #543); all experts are then
(dense width) / (k + 1) wide.

Balancing is DeepSeek-V3's auxiliary-loss-free method (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
Strategy for Mixture-of-Experts"): a per-expert bias is added to the router logits for the top-k choice only
(never to the weights), and after every optimizer step each bias moves by rate * sign(mean load - its load).
Chosen over a Switch-style auxiliary loss because it adds no gradient that competes with the language-model
loss (DeepSeek-V3 reports better models for it), needs no loss plumbing, and leaves the logged loss pure
cross-entropy, comparable with the dense runs.

Dropless, and each expert computes only its own tokens: the (token, choice) pairs are sorted by expert into one row
block per expert and each expert's matrices multiply their block, all experts in one torch._grouped_mm (CUTLASS's
grouped GEMM for bf16 on sm90+; a loop of matmuls inside torch elsewhere). The shapes are static (N tokens x k
choices, plus a fixed padding: see sort_by_expert), so torch.compile traces one graph for any routing (in a dtype
whose grouped matmul it can trace: see GROUPED_MM_TRACES), and every expert's weights enter every graph through one
torch.stack, so an expert no token chose still gets a (zero) gradient and DDP needs no find_unused_parameters.
dense_reference is the earlier evaluation, every expert on every token (E / k times the FLOPs), kept as the
reference that the tests and tools/bench.py compare with.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, MLP, Block, GPTConfig

# each expert's row block is a multiple of this many rows and never empty: grouped-GEMM kernels have hung or
# returned garbage weight gradients on empty groups (pytorch/pytorch#152668, #172439), padded groups never are
ROW_ALIGN = 16


def grouped_mm_traces(dtype: torch.dtype) -> bool:
    """Whether torch.compile can trace torch._grouped_mm in dtype: torch 2.11's shape function takes bf16 only."""
    a = torch.empty(ROW_ALIGN, ROW_ALIGN, dtype=dtype, device="meta")
    try:
        torch._grouped_mm(a, a[None].mT, offs=torch.full((1,), ROW_ALIGN, dtype=torch.int32, device="meta"))
    except RuntimeError:
        return False
    return True


GROUPED_MM_TRACES = tuple(dt for dt in (torch.float32, torch.float16, torch.bfloat16) if grouped_mm_traces(dt))


@torch._disable_dynamo  # torch.compiler.disable that imports dynamo when first called, not with this module
def grouped_mm_outside_graph(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm run eagerly from compiled code, for the dtypes it cannot trace: a graph break, not an error."""
    return torch._grouped_mm(a, b, offs=offs)


def expert_matmul(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Row block g of a (R, K) times w[g].T, w (E, O, K) stacked nn.Linear weights, offs (E,) int32 the blocks'
    ends: one torch._grouped_mm. Its kernels need every stride a multiple of 16 bytes, so K and O are padded
    with zeros where they are not (zero inputs add nothing; the extra outputs are cut off)."""
    align = 16 // a.element_size()
    k_pad, o_pad = -a.size(1) % align, -w.size(1) % align
    if k_pad or o_pad:
        a, w = F.pad(a, (0, k_pad)), F.pad(w, (0, k_pad, 0, o_pad))
    grouped_mm = torch._grouped_mm if a.dtype in GROUPED_MM_TRACES else grouped_mm_outside_graph
    return grouped_mm(a, w.mT, offs=offs)[:, : w.size(1) - o_pad]


class MoE(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.top_k, self.bias_rate = config.moe_top_k, config.moe_bias_rate
        self.router = nn.Linear(config.n_embd, config.moe_experts, bias=config.bias)
        self.router.keeps_its_scale = True  # its logits' scale is how sharp the routing is: off the Stiefel manifold
        width = max(1, MLP.dense_width(config) // (config.moe_top_k + config.moe_shared))
        self.experts = nn.ModuleList(MLP(config, hidden=width) for _ in range(config.moe_experts))
        self.shared = MLP(config, hidden=width) if config.moe_shared else None
        # the balancing bias: part of the routing (and of checkpoints), not a parameter
        self.register_buffer("route_bias", torch.zeros(config.moe_experts))
        # expert choices of this optimizer step's training forwards (a plain attribute, not a buffer: DDP would
        # overwrite every rank's with rank 0's), and the last step's per-expert fractions (all ranks)
        self.step_counts: torch.Tensor | None = None
        self.loads: torch.Tensor | None = None

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        weights, chosen = self.route(x)
        src, row, offs, expert_of_row = self.sort_by_expert(chosen)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        xs = F.pad(x.to(dtype), (0, 0, 0, 1))[src]  # the padding rows read the appended zero row
        h = expert_matmul(xs, self.stacked("c_fc", "weight", dtype), offs)
        if self.experts[0].c_fc.bias is not None:
            h = h + self.stacked("c_fc", "bias", dtype)[expert_of_row]
        y = expert_matmul(self.experts[0].activation(h), self.stacked("c_proj", "weight", dtype), offs)
        if self.experts[0].c_proj.bias is not None:
            y = y + self.stacked("c_proj", "bias", dtype)[expert_of_row]
        y = y[row].view(B * T, self.top_k, C)  # each token's k outputs, in its choices' order
        return self.add_shared(x, (y * weights.to(y.dtype)[..., None]).sum(1).view(B, T, C))

    def add_shared(self, x, routed):
        """routed (B, T, C) plus the shared expert's output on the tokens x (B T, C), if there is one."""
        return routed if self.shared is None else routed + self.shared(x).view_as(routed)

    def stacked(self, layer: str, name: str, dtype) -> torch.Tensor:
        """(E, ...): every expert's c_fc or c_proj weight or bias, in dtype. All of them enter the graph, so each
        gets a gradient (zero for an expert no token chose)."""
        return torch.stack([getattr(getattr(e, layer), name) for e in self.experts]).to(dtype)

    def route(self, x):
        """Each token's softmax weights over its top-k experts and those experts' indices, both (N, k)."""
        with torch.autocast(x.device.type, enabled=False):  # the routing decision in fp32
            bias = None if self.router.bias is None else self.router.bias.float()
            logits = F.linear(x.float(), self.router.weight.float(), bias)
        chosen = torch.topk(logits + self.route_bias, self.top_k, dim=-1).indices
        if self.training and torch.is_grad_enabled():  # training forwards only: not val, HellaSwag or sampling
            counts = torch.zeros_like(logits).scatter(1, chosen, 1.0).sum(0).detach()
            self.step_counts = counts if self.step_counts is None else self.step_counts + counts
        return torch.softmax(logits.gather(1, chosen), dim=-1), chosen

    def sort_by_expert(self, chosen: torch.Tensor):
        """The rows the experts compute, one block per expert: its (token, choice) pairs in token order, then
        padding rows up to a multiple of ROW_ALIGN (at least ROW_ALIGN), the last block up to the end: N k + E
        ROW_ALIGN rows, whatever the routing (static shapes). Returns src (R,): the token each row reads (N: none,
        a padding row); row (N k,): the row of each token's each choice; offs (E,) int32: the blocks' ends;
        expert_of_row (R,): the expert of each row."""
        N, E = chosen.size(0), len(self.experts)
        expert = chosen.flatten()
        order = torch.argsort(expert, stable=True)
        counts = torch.zeros(E, dtype=torch.long, device=expert.device).scatter_add_(0, expert, torch.ones_like(expert))
        sizes = (counts.clamp(min=1) + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN
        R = expert.numel() + E * ROW_ALIGN  # a block holds at most ROW_ALIGN rows more than its pairs
        ends = sizes.cumsum(0)
        # the j-th pair in sorted order is pair j - (pairs of lower experts) of its expert's block
        shift = ends - sizes - (counts.cumsum(0) - counts)
        ends[-1] = R  # the last block takes the spare rows: no row outside a block (those the kernels leave unwritten)
        ranks = torch.arange(expert.numel(), device=expert.device)
        sorted_rows = ranks + shift[expert[order]]
        row = torch.empty_like(expert).scatter_(0, order, sorted_rows)
        src = torch.full((R,), N, dtype=torch.long, device=expert.device).scatter_(0, row, ranks // self.top_k)
        rows = torch.arange(R, device=expert.device)
        expert_of_row = torch.searchsorted(ends, rows, right=True)
        return src, row, ends.to(torch.int32), expert_of_row

    def dense_reference(self, x):
        """The earlier evaluation, for the tests and tools/bench.py: every expert on every token in one batched
        matmul, combined with an (N, E) gate matrix that is zero outside each token's top k."""
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        weights, chosen = self.route(x)
        gates = torch.zeros(B * T, len(self.experts), device=x.device).scatter(1, chosen, weights)
        experts = list(self.experts)
        h = x @ torch.stack([e.c_fc.weight for e in experts]).mT  # (E, N, hidden) for every expert at once
        if experts[0].c_fc.bias is not None:
            h = h + torch.stack([e.c_fc.bias for e in experts])[:, None]
        y = experts[0].activation(h) @ torch.stack([e.c_proj.weight for e in experts]).mT  # (E, N, C)
        if experts[0].c_proj.bias is not None:
            y = y + torch.stack([e.c_proj.bias for e in experts])[:, None]
        return self.add_shared(x, torch.einsum("enc,ne->nc", y, gates.to(y.dtype)).view(B, T, C))

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
        """GPT's count with the active parameters only: a token's k experts (and the shared one) and the router,
        not the E - k idle experts (dense_reference computes them too, to throw their outputs away)."""
        c = self.config
        expert = sum(p.numel() for p in self.moe_layers()[0].experts[0].parameters() if p.dim() >= 2)
        return super().flops_per_token(seq_len) - 6 * c.n_layer * (c.moe_experts - c.moe_top_k) * expert
