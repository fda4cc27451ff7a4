"""Sampling runs the benchmarks and ``diffopt bench`` / ``diffopt tune`` share:
class-conditional digit generation from seeded noise, and interleaved per-run timing."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch

from diffopt.runtime.schedulers import make_scheduler
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
    (denoiser, steps or a sampler)``): all runners interleaved, ``repeats`` rounds after a discarded
    warm-up round (CUDA work is waited for before the clock stops)."""
    labels = torch.arange(batch) % 10
    times: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(repeats + 1):
        for name, (denoiser, steps) in runners.items():
            sampler = Sampler(scheduler(config, steps), progress=False) if isinstance(steps, int) else steps
            started = time.perf_counter()
            result = sampler.sample(denoiser, (labels,), shape=(batch, *shape), seed=10_000 + repeat)
            if result.is_cuda:
                torch.cuda.synchronize()
            if repeat:
                times[name].append(time.perf_counter() - started)
        print(f"timing round {repeat}/{repeats} done", flush=True)
    return times
