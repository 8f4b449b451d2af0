"""ema.py: the power-function EMA in token time against averages computed step by step from the profile's integral
(batch-ramped, uneven steps), sigma_rel <-> gamma against the profile's numerical std, exact resume (also of a state
saved in step time), swapping into the live params, and post-hoc reconstruction against a tracked EMA."""

import dataclasses
import io

import pytest
import torch

from gpt2.ema import (PowerEMA, gamma_to_sigma_rel, main, posthoc_reconstruct, posthoc_weights, profile_inner_product,
                      save_snapshot, sigma_rel_to_gamma)
from gpt2.models import build_model
from model import GPTConfig


def token_time_average(thetas: torch.Tensor, step_tokens: list[int], gamma: float) -> torch.Tensor:
    """Reference, in float64: the profile tau^gamma over token time, each step's weights held over the tokens it
    trained on. Step i (tokens N_{i-1}..N_i) weighs the profile's integral there, (N_i^(g+1) - N_{i-1}^(g+1)) /
    N_T^(g+1), summed one step at a time."""
    total = sum(step_tokens)
    out, before = torch.zeros_like(thetas[0], dtype=torch.float64), 0
    for theta, n in zip(thetas, step_tokens):
        weight = ((before + n) / total) ** (gamma + 1) - (before / total) ** (gamma + 1)
        out += weight * theta.double()
        before += n
    return out


def ramp(steps: int, seed: int = 0) -> list[int]:
    """Tokens per step of a batch ramp: from 1 to 8 micro-batches of 64 over the first half, then 8, jittered
    (uneven steps, as a ramp's rounding makes them)."""
    g = torch.Generator().manual_seed(seed)
    return [64 * min(8, 1 + 14 * i // steps) + int(torch.randint(0, 3, (), generator=g)) for i in range(steps)]


def run(ema: PowerEMA, params, trajectories, step_tokens: list[int], steps):
    """Set each param to its trajectory value theta_t and update with step t's tokens, for t in steps."""
    for t in steps:
        with torch.no_grad():
            for p, traj in zip(params, trajectories):
                p.copy_(traj[t - 1])
        ema.update(t, sum(step_tokens[:t]), step_tokens[t - 1])


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.25])
def test_ema_is_the_token_time_power_average_under_a_batch_ramp(sigma_rel):
    g = torch.Generator().manual_seed(0)
    T = 200
    tokens = ramp(T)
    trajectories = [torch.randn(T, 5, 7, generator=g), torch.randn(T, 3, generator=g) + 2.0]
    params = [torch.zeros(5, 7, requires_grad=True), torch.zeros(3, requires_grad=True)]
    ema = PowerEMA(params, sigma_rel)
    run(ema, params, trajectories, tokens, [1])
    for e, traj in zip(ema.ema, trajectories):
        assert torch.equal(e, traj[0])  # beta = 0 at the first step: a copy
    run(ema, params, trajectories, tokens, range(2, T + 1))
    assert (ema.step, ema.tokens) == (T, sum(tokens))
    for e, traj in zip(ema.ema, trajectories):
        assert e.dtype == torch.float32
        # measured: max abs error 6e-8, fp32 rounding only
        torch.testing.assert_close(e.double(), token_time_average(traj, tokens, ema.gamma), rtol=1e-6, atol=1e-6)
    # time in steps (every step alike) is another average under the ramp: the test tells the two apart
    in_steps = token_time_average(trajectories[0], [1] * T, ema.gamma)
    assert (ema.ema[0].double() - in_steps).abs().max() > 1e-3


def test_first_update_mid_run():
    """Switched on at step k, the EMA's initial value stands in for the tokens before step k: if it is their power
    average, the result is the full power average."""
    g = torch.Generator().manual_seed(1)
    T, k = 100, 40
    traj, tokens = torch.randn(T, 6, generator=g), ramp(T, seed=1)
    gamma = sigma_rel_to_gamma(0.1)
    param = token_time_average(traj[: k - 1], tokens[: k - 1], gamma).float()
    ema = PowerEMA([param], 0.1)
    run(ema, [param], [traj], tokens, range(k, T + 1))
    torch.testing.assert_close(ema.ema[0].double(), token_time_average(traj, tokens, gamma), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        ema.update(T, sum(tokens) + 64, 64)  # steps must increase
    with pytest.raises(ValueError):
        ema.update(T + 1, sum(tokens) + 64, 128)  # a step's tokens cannot overlap the last one's


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
    tokens = ramp(20, seed=2)
    straight = PowerEMA(params, 0.07)
    run(straight, params, trajectories, tokens, range(1, 21))

    first = PowerEMA(params, 0.07)
    run(first, params, trajectories, tokens, range(1, 11))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    resumed = PowerEMA(params, 0.07)  # fresh object: starts from the current (step-10) params, then loads
    resumed.load_state_dict(sd)
    run(resumed, params, trajectories, tokens, range(11, 21))
    assert (resumed.step, resumed.tokens) == (straight.step, straight.tokens) == (20, sum(tokens))
    for a, b in zip(resumed.ema, straight.ema):
        assert torch.equal(a, b)


def test_state_saved_in_step_time_resumes_as_the_average_so_far():
    """A checkpoint's EMA from before token time (step and scaled_sum, no tokens): its value stands in for the
    tokens before the next step, which folds in with EDM2's beta = (1 - n / N)^(gamma + 1), computed by hand."""
    old = {"sigma_rel": 0.1, "gamma": sigma_rel_to_gamma(0.1), "step": 10, "scaled_sum": 3.7,
           "ema": [torch.full((3,), 2.0)]}
    param = torch.full((3,), 5.0)
    ema = PowerEMA([param], 0.1)
    ema.load_state_dict(old)
    ema.update(11, 11 * 512, 512)  # 10 steps of 512 before it
    beta = (10 / 11) ** (old["gamma"] + 1)
    expected = torch.full((3,), 2.0 * beta + 5.0 * (1 - beta), dtype=torch.float64)
    torch.testing.assert_close(ema.ema[0].double(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_in(dtype):
    g = torch.Generator().manual_seed(3)
    T = 30
    tokens = ramp(T, seed=3)
    trajectories = [torch.randn(T, 8, 3, generator=g).to(dtype), torch.randn(T, 5, generator=g).to(dtype)]
    params = [torch.zeros(8, 3, dtype=dtype, requires_grad=True), torch.zeros(5, dtype=dtype, requires_grad=True)]
    ema = PowerEMA(params, 0.1)
    run(ema, params, trajectories, tokens, range(1, T + 1))
    with torch.no_grad():  # live weights unlike the EMA, so that a missing restore would show
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))
    before = [p.detach().clone() for p in params]
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    with ema.swapped_in():
        for p, traj in zip(params, trajectories):
            assert p.dtype == dtype
            # the EMA, cast: against the float64 reference within the dtype's rounding
            torch.testing.assert_close(p.detach().double(), token_time_average(traj, tokens, ema.gamma), **tol)
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_in():
        raise RuntimeError("boom")  # an error during evaluation must still restore the weights
    for p, b in zip(params, before):
        assert torch.equal(p, b)


def test_profile_inner_product_against_quadrature():
    """The closed form against the integral of the two profiles, (g + 1) tau^g / t^(g+1) on [0, t], on a fine grid."""
    dtau = 0.01
    tau = (torch.arange(300_000, dtype=torch.float64) + 0.5) * dtau  # midpoints: the profiles end on cell edges
    profile = lambda t, g: torch.where(tau <= t, (g + 1) * (tau / t).pow(g) / t, 0.0)
    for (ta, sa), (tb, sb) in [((1000, 0.05), (3000, 0.10)), ((3000, 0.05), (1000, 0.10)), ((2000, 0.2), (2000, 0.07))]:
        ga, gb = sigma_rel_to_gamma(sa), sigma_rel_to_gamma(sb)
        numeric = (profile(ta, ga) * profile(tb, gb)).sum().item() * dtau
        assert profile_inner_product(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)


def test_posthoc_exact_cases():
    snapshots = [(t, s) for t in (100, 200, 300) for s in (0.05, 0.10)]
    # the target is one of the snapshots: coefficient 1 on it, 0 on the others
    c = posthoc_weights(snapshots, 200, 0.10)
    expected = [0.0] * 6
    expected[3] = 1.0
    assert c == pytest.approx(expected, abs=1e-9)
    # any other target: coefficients of mixed sign that sum to 1
    c = posthoc_weights(snapshots, 300, 0.07)
    assert min(c) < 0 and sum(c) == pytest.approx(1.0, abs=1e-12)
    # the same profiles at 1000 times the time (tokens instead of steps): the same coefficients
    assert posthoc_weights([(1000 * t, s) for t, s in snapshots], 300_000, 0.07) == pytest.approx(c, abs=1e-9)
    # reconstruction is the plain linear combination
    a, b = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])], [torch.tensor([0.5, -1.0]), torch.tensor([4.0])]
    out = posthoc_reconstruct([a, b], [2.0, -1.0])
    assert torch.equal(out[0], torch.tensor([1.5, 5.0])) and torch.equal(out[1], torch.tensor([2.0]))


def test_posthoc_reconstruction_matches_tracked_ema():
    g = torch.Generator().manual_seed(0)
    T, D = 2000, 256
    tokens = ramp(T)
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
            e.update(t, sum(tokens[:t]), tokens[t - 1])
        if t % 200 == 0:
            for s in (0.05, 0.10):
                snapshots.append((emas[s].tokens, s))
                tensors.append(emas[s].state_dict()["ema"])

    c = posthoc_weights(snapshots, sum(tokens), 0.07)
    assert sum(c) == pytest.approx(1.0, abs=1e-12)
    (rebuilt,) = posthoc_reconstruct(tensors, c)
    direct = emas[0.07].ema[0]
    # measured (seeds 0-3): |rebuilt - direct| / |direct| = 6.3e-4 to 7.5e-4; relative to the gap between the two
    # stored EMAs, |rebuilt - direct| / |ema_0.05 - ema_0.10| = 0.84% to 0.93% (picking either stored EMA: ~42%)
    assert ((rebuilt - direct).norm() / direct.norm()).item() < 2e-3
    gap = (emas[0.05].ema[0] - emas[0.10].ema[0]).norm()
    assert ((rebuilt - direct).norm() / gap).item() < 0.03


def test_cli_fits_at_a_snapshot_in_tokens_and_times_older_snapshots_in_steps(tmp_path, capsys):
    """The CLI takes each snapshot's token count as its time; snapshots written before tokens were recorded are
    all timed in steps instead (said once); a --step without a snapshot is refused in one line."""
    config = GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16, vocab_size=64)
    model = build_model(config)
    names, params = zip(*model.named_parameters())
    emas = [PowerEMA(params, 0.1), PowerEMA(params, 0.05)]
    tokens = ramp(6)
    for t in range(1, 7):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape))
        for e in emas:
            e.update(t, sum(tokens[:t]), tokens[t - 1])
        if t % 2 == 0:
            save_snapshot(str(tmp_path), emas, list(names), dataclasses.asdict(config))
    key = names.index("transformer.h.0.mlp.c_fc.weight")

    def reconstructed(times):  # by hand from the snapshot files, at step 6 and sigma_rel 0.07
        files = [torch.load(tmp_path / "ema" / f"ema_{t:07d}.pt", weights_only=True) for t in (2, 4, 6)]
        snaps = [(times[f["step"]], s, e[key]) for f in files for s, e in zip(f["sigma_rel"], f["ema"])]
        c = posthoc_weights([(t, s) for t, s, _ in snaps], times[6], 0.07)
        return sum(ci * e.double() for ci, (_, _, e) in zip(c, snaps))

    out = torch.load(main([str(tmp_path), "--sigma-rel", "0.07"]), weights_only=True)["model"]
    torch.testing.assert_close(out["transformer.h.0.mlp.c_fc.weight"].double(),
                               reconstructed({t: sum(tokens[:t]) for t in (2, 4, 6)}), rtol=1e-5, atol=1e-6)
    for path in (tmp_path / "ema").iterdir():  # as written before snapshots recorded tokens
        torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "tokens"}, path)
    out = torch.load(main([str(tmp_path), "--sigma-rel", "0.07"]), weights_only=True)["model"]
    assert "timed in steps" in capsys.readouterr().out
    torch.testing.assert_close(out["transformer.h.0.mlp.c_fc.weight"].double(), reconstructed({2: 2, 4: 4, 6: 6}),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--sigma-rel", "0.07", "--step", "5"])
    assert "--step 5 has no snapshot" in capsys.readouterr().err
