"""Sampling runs the benchmarks and the digits workload (``evaluation.workload``) share:
class-conditional digit generation from seeded noise, and interleaved per-run timing."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from diffopt.measure.timing import interleaved_times
from diffopt.sampling.schedulers import make_scheduler
from diffopt.sampling.sequential import Sampler

CHUNK = 200  # samples per sampling call in the quality runs
DIGIT_SHAPE = (1, 16, 16)


def scheduler(config, steps: int):
    """DDIM for the DDPM models, Euler for the flow models, with ``steps`` steps."""
    return make_scheduler(config, "ddim" if config.get("kind", "ddpm") == "ddpm" else None, steps)


def generate(denoiser, config, steps: int, n: int, seed: int) -> torch.Tensor:
    """``n`` class-conditional digits (labels 0..9 cycling), ``steps`` steps of ``scheduler``."""
    labels = torch.arange(n) % 10
    sampler = Sampler(scheduler(config, steps), progress=False)
    return torch.cat(
        [
            sampler.sample(
                denoiser, (labels[i : i + CHUNK],), shape=(len(labels[i : i + CHUNK]), *DIGIT_SHAPE), seed=seed + i
            )
            for i in range(0, n, CHUNK)
        ]
    )


def time_runs(
    runners: Mapping[str, tuple[Callable, int]], config, batch: int, repeats: int, shape: tuple = DIGIT_SHAPE
) -> dict[str, list[float]]:
    """Wall seconds of one ``scheduler`` run of ``batch`` samples of ``shape`` per runner (``name ->
    (denoiser, steps or a sampler)``), ``measure.timing.interleaved_times``: all runners
    interleaved, ``repeats`` rounds after a discarded warm-up round, device work waited for."""
    timed = {name: timed_run(denoiser, config, steps, batch, shape) for name, (denoiser, steps) in runners.items()}
    return interleaved_times(timed, repeats, progress=True)


def timed_run(denoiser, config, steps, batch: int, shape: tuple = DIGIT_SHAPE) -> Callable[[int], torch.Tensor]:
    """One run of ``batch`` digits (labels cycling 0..9) of ``steps`` steps (or a sampler), given
    the timing round's index (its noise seed)."""
    labels = torch.arange(batch) % 10
    sampler = Sampler(scheduler(config, steps), progress=False) if isinstance(steps, int) else steps
    return lambda round_index: sampler.sample(denoiser, (labels,), shape=(batch, *shape), seed=10_000 + round_index)
