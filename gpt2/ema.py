"""Power-function EMA of model weights with post-hoc reconstruction (EDM2: Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", section 3; NVlabs/edm2 training/phema.py @ 4bf8162).

A classic EMA (fixed beta) forgets the start of training at a fixed rate in steps, so its useful width depends on
run length. The power-function EMA instead averages all weights so far with the profile tau^gamma over training
time tau: its width is a fixed fraction of the run, the relative standard deviation sigma_rel of that profile.
Typical values are 0.05 to 0.10.

Time is counted in tokens. A step that trains on n tokens and ends at N tokens in all updates with EDM2's
beta = (1 - n / N)^(gamma + 1). The betas telescope: step i (tokens N_{i-1} to N_i) ends up with weight
(N_i^(gamma+1) - N_{i-1}^(gamma+1)) / N_T^(gamma+1), the integral of the normalized profile (gamma + 1) tau^gamma /
N_T^(gamma+1) over the tokens it trained on. So the EMA is that profile over token time applied to the weights, each
held over its step's tokens. Scaling every N by a constant leaves each beta unchanged: tokens, or tokens / batch
(steps, with a constant batch: EDM2's own EMA) give the same average; under a batch ramp, where early steps have
fewer tokens, only tokens weigh each step by what it trained on.

Post-hoc EMA: store snapshots of two power EMAs (say sigma_rel 0.05 and 0.10) every few thousand steps. Each
snapshot's profile over token time is known exactly, so any other sigma_rel at a snapshot's time is fitted by least
squares (over continuous time, the inner products in closed form) as a combination of the stored profiles,
rescaled to sum to 1 (so a constant weight is reproduced exactly); the same combination of the stored weights is the
EMA one would have got (posthoc_weights, then posthoc_reconstruct). The width can thus be chosen after training.

In train_gpt2.py, `--ema-sigma-rel 0.05` keeps one such EMA of every parameter (updated after each optimizer
step), logs the val loss of the EMA weights beside the raw one at every val step (kind "val_ema", drawn dashed by
plot_logs.py) and keeps the EMA in checkpoints, so resuming is exact. With `--ema-snapshot-every N` it also
tracks a second EMA of half the width and writes both to logs/<run>/ema/ every N steps (20 snapshot times: two
widths fit the profiles of sigma_rel 0.05-0.2 to 0.0-1.6% in L2, one width alone only to 6-14%), and afterwards

    python -m gpt2.ema logs/<run> --sigma-rel 0.07 [--step S]     # -> logs/<run>/ema_0.070_<S>.pt

writes the reconstructed weights (at the last snapshot, or the snapshot of step S) as a checkpoint that
`hellaswag.py --checkpoint` reads.
"""

import contextlib
import glob
import math
import os

import torch

from gpt2.runtime import OneLineParser, atomic_write, load_torch_file

# sigma_rel(gamma) rises from 0 at gamma = -1 to its peak at gamma = (sqrt(5) - 3) / 2 (root of gamma^2 + 3 gamma + 1,
# where d/dgamma log sigma_rel = 0), then falls towards 0; the EMAs worth having live on the falling branch
_GAMMA_PEAK = (math.sqrt(5) - 3) / 2


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative std of the profile proportional to tau^gamma on [0, 1] (gamma > -1)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


_SIGMA_REL_MAX = gamma_to_sigma_rel(_GAMMA_PEAK)  # ~0.300


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Largest gamma with gamma_to_sigma_rel(gamma) == sigma_rel (EDM2's largest real root of the cubic).

    Bisection on the falling branch instead of a polynomial root finder: simple, and exact to float precision."""
    if not 0 < sigma_rel <= _SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {_SIGMA_REL_MAX:.4f}], got {sigma_rel}")
    # sigma_rel(gamma) < 1 / (gamma + 2), so at gamma = 2 / sigma_rel it is already below the target
    lo, hi = _GAMMA_PEAK, 2 / sigma_rel
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):  # interval down to adjacent floats
            return mid
        lo, hi = (mid, hi) if gamma_to_sigma_rel(mid) > sigma_rel else (lo, mid)


class PowerEMA:
    """fp32 power-function EMA of `params` in token time (see the module's docstring)."""

    def __init__(self, params: list[torch.Tensor], sigma_rel: float):
        self.params = list(params)
        self.sigma_rel = float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        self.step = 0  # last optimizer step folded in
        self.tokens = 0  # tokens trained on up to the end of that step: the EMA's time
        # fp32 even for bf16 params: late updates move the average by ~1/t of a difference, below bf16 resolution
        self.ema = [p.detach().to(dtype=torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self, step: int, tokens: int, step_tokens: int):
        """Fold in the current params as the weights after optimizer step `step`, which trained on step_tokens of
        the `tokens` trained on so far. Call after every optimizer step.

        The first call may come at any time (the EMA switched on mid-run, or a gap): the current EMA value then
        stands in for all tokens before this step's, with their total weight, as EDM2's beta gives it."""
        if step <= self.step or not 0 < step_tokens <= tokens - self.tokens:
            raise ValueError(f"steps and tokens must increase: step {step} ({step_tokens} of {tokens} tokens) "
                             f"after step {self.step} ({self.tokens} tokens)")
        beta = (1 - step_tokens / tokens) ** (self.gamma + 1)  # 0 for the first step ever: a plain copy
        self.step, self.tokens = step, tokens
        for e, p in zip(self.ema, self.params):
            e.lerp_(p.detach().float(), 1 - beta)

    def state_dict(self) -> dict:
        # only tensors and Python numbers: readable by torch.load(weights_only=True)
        return {"sigma_rel": self.sigma_rel, "gamma": self.gamma, "step": self.step, "tokens": self.tokens,
                "ema": [e.clone() for e in self.ema]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict):
        if len(sd["ema"]) != len(self.ema) or any(a.shape != b.shape for a, b in zip(sd["ema"], self.ema)):
            raise ValueError("EMA state does not match the parameters")
        self.sigma_rel, self.gamma, self.step = float(sd["sigma_rel"]), float(sd["gamma"]), int(sd["step"])
        # an EMA saved when time was counted in steps has no tokens: its average stands in for everything before
        # the next update, as for a mid-run start (the step-time profile up to here, token time from here on)
        self.tokens = int(sd.get("tokens", 0))
        for e, saved in zip(self.ema, sd["ema"]):
            e.copy_(saved)  # onto this EMA's device, whatever map_location the checkpoint was loaded with

    @contextlib.contextmanager
    def swapped_in(self):
        """The params hold the EMA values (cast to their dtype) inside the block; their exact originals are put back
        after, also on an exception. Costs one copy of the params."""
        params = self.params
        with torch.no_grad():
            backup = [p.detach().clone() for p in params]
            for p, e in zip(params, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)


def profile_inner_product(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """The integral over time of p_a p_b, where p is the normalized power profile (gamma + 1) tau^gamma /
    t^(gamma+1) on [0, t]: (g1 + 1)(g2 + 1) / ((g1 + g2 + 1) t2) (t1 / t2)^g2, with t1 <= t2 (EDM2's eq. 151)."""
    (t1, g1), (t2, g2) = sorted([(t_a, gamma_a), (t_b, gamma_b)])
    return (g1 + 1) * (g2 + 1) / ((g1 + g2 + 1) * t2) * (t1 / t2) ** g2


def posthoc_weights(snapshots: list[tuple[float, float]], target_t: float, target_sigma_rel: float) -> list[float]:
    """Coefficients c, summing to 1, with sum_k c_k profile(snapshot k) ~ profile(target): the least-squares fit
    over continuous time, rescaled to sum 1 (EDM2's Algorithm 3). snapshots: (time, sigma_rel) of each stored EMA,
    time in the unit the EMAs were updated in (tokens). Later times than any snapshot's are not covered."""
    points = [(t, sigma_rel_to_gamma(s)) for t, s in snapshots]
    target = (target_t, sigma_rel_to_gamma(target_sigma_rel))
    gram = torch.tensor([[profile_inner_product(*a, *b) for b in points] for a in points], dtype=torch.float64)
    rhs = torch.tensor([[profile_inner_product(*a, *target)] for a in points], dtype=torch.float64)
    c = torch.linalg.lstsq(gram, rhs).solution.squeeze(1)  # lstsq: duplicate snapshots are no error
    return (c / c.sum()).tolist()


@torch.no_grad()
def posthoc_reconstruct(snapshot_tensors: list[list[torch.Tensor]], coefficients) -> list[torch.Tensor]:
    """sum_k c_k snapshot_k, tensor by tensor. Accumulated in float64: the coefficients have mixed signs and can be
    large, so the sum cancels; the result has the snapshots' dtype."""
    if len(snapshot_tensors) != len(coefficients):
        raise ValueError(f"{len(snapshot_tensors)} snapshots but {len(coefficients)} coefficients")
    out = []
    for tensors in zip(*snapshot_tensors):
        acc = torch.zeros_like(tensors[0], dtype=torch.float64)
        for c, x in zip(coefficients, tensors):
            acc.add_(x.double(), alpha=float(c))
        out.append(acc.to(tensors[0].dtype))
    return out


# ---------------------------------------------------------------------- snapshots on disk and the post-hoc CLI


def snapshot_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "ema", f"ema_{step:07d}.pt")


def snapshot_paths(run_dir: str) -> list[str]:
    """A run's snapshots in step order (the steps are zero-padded, so names sort like steps)."""
    return sorted(glob.glob(os.path.join(run_dir, "ema", "ema_*.pt")))


def save_snapshot(run_dir: str, emas: list[PowerEMA], names: list[str], model_config: dict) -> str:
    """The EMAs at their current step, with the parameter names and model config needed to rebuild a model."""
    os.makedirs(os.path.join(run_dir, "ema"), exist_ok=True)
    path = snapshot_path(run_dir, emas[0].step)
    snapshot = {"step": emas[0].step, "tokens": emas[0].tokens, "sigma_rel": [e.sigma_rel for e in emas],
                "ema": [e.ema for e in emas], "names": names, "model_config": model_config}
    with atomic_write(path) as f:  # a crash leaves no half-written snapshot
        torch.save(snapshot, f)
    return path


def remove_snapshots_after(run_dir: str, step: int):
    """Snapshots past `step` belong to a timeline abandoned by resuming from an earlier checkpoint."""
    for path in snapshot_paths(run_dir):
        if path > snapshot_path(run_dir, step):
            os.remove(path)


def main(argv=None) -> str:
    parser = OneLineParser(description="A power-function EMA of any width from a run's snapshots.")
    parser.add_argument("run_dir", help="a train_gpt2.py run folder with ema/ema_*.pt (--ema-snapshot-every)")
    parser.add_argument("--sigma-rel", type=float, required=True, help="the width to reconstruct, e.g. 0.07")
    parser.add_argument("--step", type=int, help="the snapshot step to reconstruct at (default: the last)")
    parser.add_argument("--out", help="default: RUN_DIR/ema_<sigma_rel>_<step>.pt")
    args = parser.parse_args(argv)
    paths = snapshot_paths(args.run_dir)
    if not paths:
        parser.error(f"no snapshots in {args.run_dir}/ema: train with --ema-sigma-rel S --ema-snapshot-every N")
    # memory-mapped: only the tensors being summed are read, so many snapshots of a large model fit in memory
    try:
        files = [load_torch_file(p, "EMA snapshot", mmap=True) for p in paths]
    except ValueError as e:
        parser.error(f"{e}: delete it, or pass --step of an earlier snapshot")
    step = args.step or files[-1]["step"]
    times = {f["step"]: f.get("tokens") for f in files}  # each snapshot's time: tokens trained on
    if step not in times:
        parser.error(f"--step {step} has no snapshot, so no token count to fit at: pick one of "
                     f"{', '.join(map(str, times))}")
    if None in times.values():
        print("snapshots written before ema.py counted tokens: all timed in steps (exact for a constant batch)")
        times = {s: s for s in times}
    # one (time, sigma_rel, tensors) per stored EMA
    snaps = [(times[f["step"]], s, e) for f in files if f["step"] <= step for s, e in zip(f["sigma_rel"], f["ema"])]
    coefficients = posthoc_weights([(t, s) for t, s, _ in snaps], times[step], args.sigma_rel)
    tensors = posthoc_reconstruct([e for _, _, e in snaps], coefficients)

    from gpt2.runs import model_from_config  # only the CLI needs the model

    config = files[-1]["model_config"]
    model = model_from_config(config)
    with torch.no_grad():
        for name, t in zip(files[-1]["names"], tensors, strict=True):
            model.get_parameter(name).copy_(t)
    out = args.out or os.path.join(args.run_dir, f"ema_{args.sigma_rel:.3f}_{step:07d}.pt")
    state = {"model": model.state_dict(), "model_config": config, "step": step, "ema_sigma_rel": args.sigma_rel}
    torch.save(state, out)
    print(f"sigma_rel {args.sigma_rel} at step {step} from {len(snaps)} snapshots -> {out}")
    return out


if __name__ == "__main__":
    main()
