"""Call streams: pipelines that call the denoiser twice per step (true CFG: cond, then
uncond) get one state per call, so each stream is its own optimized run."""

import pytest
import torch
from models import diffusers_dit, inputs_for

from diffopt import capture, optimize
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
from diffopt.passes.temporal_difference import TemporalDifferencePass
from diffopt.runtime.denoiser import InputError

FIXED_SCHEDULES = {
    "icc": [IncrementCalibratedCachePass(rank=4, period=2)],
    "block cache": [BlockCachePass(period=3)],
    "forecast": [ForecastCachePass(order=2, period=3, warmup=2)],
    "ditto exact": [TemporalDifferencePass("exact")],
}
COND, UNCOND = torch.tensor([1, 4, 7]), torch.tensor([10, 10, 10])  # 10: the null class


@pytest.fixture(scope="module")
def graph():
    return capture(diffusers_dit(seed=5, num_layers=3), inputs_for("diffusers_dit", 2, seed=0))


def _trajectory(steps=7):
    g = torch.Generator().manual_seed(2)
    x, direction = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    return [(x + 0.03 * k * direction, torch.full((3,), 950 - 40 * k)) for k in range(steps)]


def _two_calls(denoiser, trajectory, explicit=False):
    cond, uncond = [], []
    for x, t in trajectory:
        cond.append(denoiser(x, t, COND))
        if explicit:
            with denoiser.stream("uncond"):
                uncond.append(denoiser(x, t, UNCOND))
        else:
            uncond.append(denoiser(x, t, UNCOND))
    return cond, uncond


def _close(a, b, tolerance=1e-5):
    return all(float((x - y).norm() / y.norm()) < tolerance for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", FIXED_SCHEDULES)
def test_two_calls_per_step_equal_the_batched_cfg_run(graph, name):
    denoiser = optimize(graph, FIXED_SCHEDULES[name])
    trajectory = _trajectory()
    cond, uncond = _two_calls(denoiser, trajectory)
    denoiser.reset()
    batched = [denoiser(torch.cat([x, x]), t.repeat(2), torch.cat([COND, UNCOND])) for x, t in trajectory]
    assert _close(cond, [b[:3] for b in batched]) and _close(uncond, [b[3:] for b in batched])


def test_each_stream_of_an_adaptive_program_equals_its_own_run(graph):
    """The probe decides per call, so a stream must not see the other's decisions or caches."""
    trajectory = _trajectory(8)
    denoiser = optimize(graph, [FirstBlockCachePass(0.1)])
    cond, uncond = _two_calls(denoiser, trajectory)
    alone = optimize(graph, [FirstBlockCachePass(0.1)])
    variants = []
    for (x, t), out in zip(trajectory, cond):
        assert _close([alone(x, t, COND)], [out])
        variants.append(alone.last_variant)
    assert "cached" in variants and "full" in variants[1:]  # the run really cached and refreshed
    alone.reset()
    assert _close(uncond, [alone(x, t, UNCOND) for x, t in trajectory])


def test_explicit_streams_and_new_runs(graph):
    trajectory = _trajectory()
    explicit = optimize(graph, FIXED_SCHEDULES["block cache"])
    cond, uncond = _two_calls(explicit, trajectory, explicit=True)
    automatic_cond, automatic_uncond = _two_calls(optimize(graph, FIXED_SCHEDULES["block cache"]), trajectory)
    assert _close(cond, automatic_cond) and _close(uncond, automatic_uncond)
    again_cond, again_uncond = _two_calls(explicit, trajectory, explicit=True)  # the timestep went up: new runs
    assert _close(again_cond, cond) and _close(again_uncond, uncond)
    with pytest.raises(InputError, match="stream name"):
        with explicit.stream(""):
            pass
