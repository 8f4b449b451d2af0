"""ema.py: the power-function EMA against directly computed weighted averages, sigma_rel <-> gamma against the profile's
numerical std, exact resume, swapping into the live params, and post-hoc reconstruction against a tracked EMA."""

import io

import pytest
import torch

from gpt2.ema import PowerEMA, gamma_to_sigma_rel, posthoc_reconstruct, posthoc_weights, sigma_rel_to_gamma


def weighted_average(thetas: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reference: sum_i i^gamma theta_i / sum_i i^gamma over the first axis (steps 1..T), in float64."""
    i = torch.arange(1, len(thetas) + 1, dtype=torch.float64)
    w = (i / len(thetas)).pow(gamma)  # the common factor T^gamma cancels in the normalization
    w = w / w.sum()
    return torch.einsum("t,t...->...", w, thetas.double())


def run(ema: PowerEMA, params, trajectories, steps):
    """Set each param to its trajectory value theta_t and update, for t in steps."""
    for t in steps:
        with torch.no_grad():
            for p, traj in zip(params, trajectories):
                p.copy_(traj[t - 1])
        ema.update(t)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.25])
def test_ema_is_power_weighted_average(sigma_rel):
    g = torch.Generator().manual_seed(0)
    T = 200
    trajectories = [torch.randn(T, 5, 7, generator=g), torch.randn(T, 3, generator=g) + 2.0]
    params = [torch.zeros(5, 7, requires_grad=True), torch.zeros(3, requires_grad=True)]
    ema = PowerEMA(params, sigma_rel)
    run(ema, params, trajectories, [1])
    for e, traj in zip(ema.ema, trajectories):
        assert torch.equal(e, traj[0])  # beta_1 = 0: the first update is a copy
    run(ema, params, trajectories, range(2, T + 1))
    for e, traj in zip(ema.ema, trajectories):
        assert e.dtype == torch.float32
        # measured: max abs error 4e-8 (sigma_rel 0.05), i.e. fp32 rounding only
        torch.testing.assert_close(e.double(), weighted_average(traj, ema.gamma), rtol=1e-6, atol=1e-6)


def test_first_update_mid_run():
    """Switched on at step k, the EMA's initial value stands in for steps 1..k-1: if it is their power average, the
    result is the full power average."""
    g = torch.Generator().manual_seed(1)
    T, k = 100, 40
    traj = torch.randn(T, 6, generator=g)
    param = weighted_average(traj[: k - 1], sigma_rel_to_gamma(0.1)).float()
    ema = PowerEMA([param], 0.1)
    run(ema, [param], [traj], range(k, T + 1))
    torch.testing.assert_close(ema.ema[0].double(), weighted_average(traj, ema.gamma), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        ema.update(T)  # steps must increase


def test_sigma_rel_gamma():
    for sigma_rel in [0.01, 0.05, 0.07, 0.10, 0.2, 0.29]:
        gamma = sigma_rel_to_gamma(sigma_rel)
        assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-12)
        # largest root: on the falling branch, where a larger gamma means a narrower profile
        assert gamma_to_sigma_rel(gamma + 1e-3) < sigma_rel
        # sigma_rel is the std of the profile over step / T; numerically, on a fine discrete grid
        T = 100_000
        x = torch.arange(1, T + 1, dtype=torch.float64) / T
        w = x.pow(gamma)
        w = w / w.sum()
        mean = (w * x).sum()
        std = (w * (x - mean) ** 2).sum().sqrt().item()
        assert std == pytest.approx(sigma_rel, rel=1e-3)
    # EDM2's pairings (its power EMAs sigma_rel 0.05 and 0.10), also consistent with the numerical std above
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for bad in [0.0, -0.1, 0.31]:  # sigma_rel peaks at ~0.3003 (gamma ~ -0.38)
        with pytest.raises(ValueError):
            sigma_rel_to_gamma(bad)


def test_exact_resume():
    g = torch.Generator().manual_seed(2)
    trajectories = [torch.randn(20, 4, 4, generator=g), torch.randn(20, 9, generator=g).bfloat16()]
    params = [torch.zeros(4, 4), torch.zeros(9, dtype=torch.bfloat16)]
    straight = PowerEMA(params, 0.07)
    run(straight, params, trajectories, range(1, 21))

    first = PowerEMA(params, 0.07)
    run(first, params, trajectories, range(1, 11))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    resumed = PowerEMA(params, 0.07)  # fresh object: starts from the current (step-10) params, then loads
    resumed.load_state_dict(sd)
    run(resumed, params, trajectories, range(11, 21))
    assert resumed.step == straight.step == 20
    for a, b in zip(resumed.ema, straight.ema):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_in(dtype):
    g = torch.Generator().manual_seed(3)
    T = 30
    trajectories = [torch.randn(T, 8, 3, generator=g).to(dtype), torch.randn(T, 5, generator=g).to(dtype)]
    params = [torch.zeros(8, 3, dtype=dtype, requires_grad=True), torch.zeros(5, dtype=dtype, requires_grad=True)]
    ema = PowerEMA(params, 0.1)
    run(ema, params, trajectories, range(1, T + 1))
    with torch.no_grad():  # live weights unlike the EMA, so that a missing restore would show
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))
    before = [p.detach().clone() for p in params]
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    with ema.swapped_in():
        for p, traj in zip(params, trajectories):
            assert p.dtype == dtype
            # the EMA, cast: against the float64 reference within the dtype's rounding
            torch.testing.assert_close(p.detach().double(), weighted_average(traj, ema.gamma), **tol)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in():
        raise RuntimeError("boom")  # an error during evaluation must still restore the weights
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_posthoc_exact_cases():
    snapshots = [(t, s) for t in (100, 200, 300) for s in (0.05, 0.10)]
    # the target is one of the snapshots: coefficient 1 on it, 0 on the others
    c = posthoc_weights(snapshots, 200, 0.10)
    expected = [0.0] * 6
    expected[3] = 1.0
    assert c == pytest.approx(expected, abs=1e-9)
    # reconstruction is the plain linear combination
    a, b = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [torch.tensor([0.5, -1.0]), torch.tensor([4.0])]
    out = posthoc_reconstruct([a, b], [2.0, -1.0])
    assert torch.equal(out[0], torch.tensor([1.5, 5.0])) and torch.equal(out[1], torch.tensor([2.0]))


def test_posthoc_reconstruction_matches_tracked_ema():
    g = torch.Generator().manual_seed(0)
    T, D = 2000, 256
    # a noisy drifting trajectory: random walk plus a linear trend, plus per-step noise
    walk = (0.02 * torch.randn(T, D, generator=g, dtype=torch.float64)).cumsum(0)
    trend = torch.linspace(0, 1, T, dtype=torch.float64)[:, None] * torch.randn(D, generator=g, dtype=torch.float64)
    traj = (walk + trend + 0.1 * torch.randn(T, D, generator=g, dtype=torch.float64)).float()

    param = torch.zeros(D)
    emas = {s: PowerEMA([param], s) for s in (0.05, 0.10, 0.07)}
    snapshots, tensors = [], []
    for t in range(1, T + 1):
        param.copy_(traj[t - 1])
        for e in emas.values():
            e.update(t)
        if t % 200 == 0:
            for s in (0.05, 0.10):
                snapshots.append((t, s))
                tensors.append(emas[s].state_dict()["ema"])

    c = posthoc_weights(snapshots, T, 0.07)
    (rebuilt,) = posthoc_reconstruct(tensors, c)
    direct = emas[0.07].ema[0]
    # measured (seeds 0-3): |rebuilt - direct| / |direct| = 5.2e-4 to 5.4e-4; relative to the gap between the two
    # stored EMAs, |rebuilt - direct| / |ema_0.05 - ema_0.10| = 0.55% to 0.59% (picking either stored EMA: ~50%)
    assert ((rebuilt - direct).norm() / direct.norm()).item() < 2e-3
    gap = (emas[0.05].ema[0] - emas[0.10].ema[0]).norm()
    assert ((rebuilt - direct).norm() / gap).item() < 0.03
