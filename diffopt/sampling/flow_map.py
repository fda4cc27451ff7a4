"""``FlowMapSampler``: few-step sampling with a flow map (METHODS.md section 5).

A flow map ``f(x_t, t, s) = x_t + (s - t) F(x_t, t, s)`` jumps from noise level t to s.
On a time grid ``1 = t_0 > t_1 > ... > t_N = 0`` the sampler takes N jumps:

    x <- x + (t_{i+1} - t_i) F(x, t_i, t_{i+1})

The denoiser computes F. It is an ``OptimizedDenoiser`` (a step program captured from
``models.flow_map.FlowMapTransformer``, so it has per-step variants and exports like any
other) or a plain callable; both are called ``F(x, timestep, target_timestep,
*conditions)`` with times on the model's timestep scale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from diffopt.runtime.denoiser import OptimizedDenoiser
from diffopt.sampling.interface import SamplingLoop
from diffopt.sampling.sequential import SamplingStats, runner_for, start_run
from diffopt.util.validation import require_int, require_number


def uniform_times(num_steps: int) -> torch.Tensor:
    """``1 = t_0 > ... > t_N = 0`` evenly spaced."""
    require_int("uniform_times", "num_steps", num_steps, minimum=1)
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


class FlowMapSampler(SamplingLoop):
    """N flow-map jumps on ``times`` (default: ``num_steps`` even jumps from 1 to 0)."""

    def __init__(
        self,
        num_steps: int | None = None,
        *,
        times: Sequence[float] | torch.Tensor | None = None,
        timestep_scale: float = 1000.0,
        progress: bool = True,
    ):
        if (num_steps is None) == (times is None):
            raise ValueError("FlowMapSampler: pass exactly one of num_steps= or times=")
        require_number("FlowMapSampler", "timestep_scale", timestep_scale, minimum=0.0)
        grid = uniform_times(num_steps) if times is None else torch.as_tensor(times, dtype=torch.float64).flatten()
        if len(grid) < 2 or not bool((grid[1:] < grid[:-1]).all()) or grid[0] > 1 or grid[-1] < 0:
            raise ValueError(f"FlowMapSampler: times must decrease within [1, 0], found {grid.tolist()}")
        self.times = grid
        self.timestep_scale = timestep_scale
        self.progress = progress
        self.last_stats = SamplingStats()

    @property
    def num_steps(self) -> int:
        return len(self.times) - 1

    def _sample(
        self,
        denoiser: OptimizedDenoiser | Callable,
        conditions: tuple[torch.Tensor, ...],
        shape: Sequence[int] | None,
        noise: torch.Tensor | None,
        seed: int,
    ) -> torch.Tensor:
        """All jumps from ``noise`` (or seeded noise of ``shape``); return the sample at time ``times[-1]``."""
        x, _, conditions = start_run("FlowMapSampler.sample", denoiser, conditions, shape, noise, seed)
        runner = runner_for(denoiser)
        runner.start(x.shape[0], x.device)
        stats = SamplingStats(num_steps=self.num_steps)
        started = time.perf_counter()
        for k in tqdm(range(self.num_steps), desc="flow-map sampling", disable=not self.progress, leave=False):
            now, target = (torch.full((x.shape[0],), float(self.times[i]) * self.timestep_scale) for i in (k, k + 1))
            out, variant = runner(k, x, now.to(x.device), (target.to(x.device), *conditions))
            x = x + float(self.times[k + 1] - self.times[k]) * out
            stats.model_calls += 1
            stats.variants.append(variant)
        stats.wall_time_s = time.perf_counter() - started
        self.last_stats = stats
        return x
