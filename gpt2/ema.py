"""Power-function EMA of model weights with post-hoc reconstruction (EDM2: Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", section 3).

A classic EMA (fixed beta) forgets the start of training at a fixed rate in steps, so its useful width depends on
run length. The power-function EMA instead averages all weights so far with weights proportional to i^gamma
(i = optimizer step): its width is a fixed fraction of the run, the relative standard deviation sigma_rel of that
profile. Typical values are 0.05 to 0.10.

Post-hoc EMA: store snapshots of two power EMAs (say sigma_rel 0.05 and 0.10) every few thousand steps. Each
snapshot's weight profile over steps is known exactly, so any other sigma_rel at any snapshot step can be fitted
by least squares as a linear combination of the stored profiles; the same combination of the stored weights is the
EMA one would have got (posthoc_weights, then posthoc_reconstruct). The width can thus be chosen after training.

In train_gpt2.py, `--ema-sigma-rel 0.05` keeps one such EMA of every parameter (updated after each optimizer
step), logs the val loss of the EMA weights beside the raw one at every val step (kind "val_ema", drawn dashed by
plot_logs.py) and keeps the EMA in checkpoints, so resuming is exact. With `--ema-snapshot-every N` it also
tracks a second EMA of half the width and writes both to logs/<run>/ema/ every N steps (measured over 2,000
steps with 20 snapshot steps: two widths fit the profiles of sigma_rel 0.05-0.2 to 0.0-1.5%, one width alone
only to 6-14%), and afterwards

    python -m gpt2.ema logs/<run> --sigma-rel 0.07 [--step S]     # -> logs/<run>/ema_0.070_<S>.pt

writes the reconstructed weights as a checkpoint that `hellaswag.py --checkpoint` reads.

One deliberate difference from EDM2's code: it uses beta_t = (1 - 1/t)^(gamma+1), the continuous profile tau^gamma
integrated over each step, so step i gets weight (i^(gamma+1) - (i-1)^(gamma+1)) rather than i^gamma; the two
differ by O(gamma / t) and agree for long runs. Here beta_t = S_{t-1} / S_t with S_t = sum_{i<=t} i^gamma, so the
EMA is exactly the i^gamma-weighted average and exactly the profile that posthoc_weights assumes.
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


def _scaled_weight_sum(t: int, gamma: float) -> float:
    """sum_{i=1..t} (i / t)^gamma = S_t / t^gamma: dividing by the largest term keeps it finite for any t and gamma."""
    if t == 0:
        return 0.0
    i = torch.arange(1, t + 1, dtype=torch.float64)
    return (i / t).pow(gamma).sum().item()


class PowerEMA:
    """fp32 power-function EMA of `params`: after update(t) it is sum_{i<=t} i^gamma theta_i / sum_{i<=t} i^gamma."""

    def __init__(self, params: list[torch.Tensor], sigma_rel: float):
        self.params = list(params)
        self.sigma_rel = float(sigma_rel)
        self.gamma = sigma_rel_to_gamma(self.sigma_rel)
        self.step = 0  # last step folded in
        self.scaled_sum = 0.0  # S_step / step^gamma, see update
        # fp32 even for bf16 params: late updates move the average by ~1/t of a difference, below bf16 resolution
        self.ema = [p.detach().to(dtype=torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def update(self, step: int):
        """Fold in the current params as theta_step. Call after every optimizer step with step = steps done so far.

        The first call may come at any step (EMA switched on mid-run, or a gap): the current EMA value then stands in
        for all steps before it, carrying their total weight S_{step-1}."""
        if step <= self.step:
            raise ValueError(f"step must increase: got {step} after {self.step}")
        if step != self.step + 1:
            self.scaled_sum = _scaled_weight_sum(step - 1, self.gamma)
        # beta = S_{t-1} / S_t. Tracking r_t = S_t / t^gamma instead of S_t (which overflows, e.g. 1e4^100) gives
        # r_t = r_{t-1} ((t-1)/t)^gamma + 1 and beta = 1 - 1/r_t; at t = 1, r = 1 and beta = 0 (a plain copy)
        self.scaled_sum = self.scaled_sum * ((step - 1) / step) ** self.gamma + 1.0
        self.step = step
        weight = 1.0 / self.scaled_sum  # 1 - beta
        for e, p in zip(self.ema, self.params):
            e.lerp_(p.detach().float(), weight)

    def state_dict(self) -> dict:
        # only tensors and Python numbers: readable by torch.load(weights_only=True). scaled_sum is kept rather than
        # recomputed so that a resumed run continues bit-identically
        return {"sigma_rel": self.sigma_rel, "gamma": self.gamma, "step": self.step, "scaled_sum": self.scaled_sum,
                "ema": [e.clone() for e in self.ema]}

    @torch.no_grad()
    def load_state_dict(self, sd: dict):
        if len(sd["ema"]) != len(self.ema) or any(a.shape != b.shape for a, b in zip(sd["ema"], self.ema)):
            raise ValueError("EMA state does not match the parameters")
        self.sigma_rel, self.gamma = float(sd["sigma_rel"]), float(sd["gamma"])
        self.step, self.scaled_sum = int(sd["step"]), float(sd["scaled_sum"])
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


def _profile(t: int, gamma: float, length: int) -> torch.Tensor:
    """Weight of each step 1..length in a power EMA at step t: i^gamma / S_t up to t, 0 after (float64)."""
    i = torch.arange(1, length + 1, dtype=torch.float64)
    w = torch.where(i <= t, (i / t).pow(gamma), 0.0)  # scaled by t^gamma against overflow; normalizing undoes it
    return w / w.sum()


def posthoc_weights(snapshots: list[tuple[int, float]], target_t: int, target_sigma_rel: float) -> list[float]:
    """Least-squares c with sum_k c_k profile(snapshot k) ~ profile(target), over steps 1..max t.

    snapshots: (t, sigma_rel) of each stored EMA. The fit is best when target_t is one of the snapshot steps: later
    steps are not covered by any snapshot, earlier ones need snapshots that end before them."""
    length = max([target_t] + [t for t, _ in snapshots])
    a = torch.stack([_profile(t, sigma_rel_to_gamma(s), length) for t, s in snapshots], dim=1)  # (steps, K)
    b = _profile(target_t, sigma_rel_to_gamma(target_sigma_rel), length)
    return torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1).tolist()


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
    snapshot = {"step": emas[0].step, "sigma_rel": [e.sigma_rel for e in emas], "ema": [e.ema for e in emas],
                "names": names, "model_config": model_config}
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
    parser.add_argument("--step", type=int, help="the step to reconstruct at (default: the last snapshot's)")
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
    # one (step, sigma_rel, tensors) per stored EMA
    snaps = [(f["step"], s, e) for f in files if f["step"] <= step for s, e in zip(f["sigma_rel"], f["ema"])]
    if not snaps:
        parser.error(f"no snapshot at or before step {step}")
    coefficients = posthoc_weights([(t, s) for t, s, _ in snaps], step, args.sigma_rel)
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
