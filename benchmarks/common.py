"""Helpers the benchmark scripts share: class-conditional digit generation, interleaved
per-run timing, and the bf16-autocast baseline. Scripts import it as ``common`` (Python
puts the script's folder on the path)."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Mapping

import torch

from diffopt import Sampler, make_scheduler

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


def run_metadata(script: str, args) -> dict:
    """What a results file records about its run: the command that reproduces it (every
    option spelled out), threads, torch version and processor."""
    options = " ".join(
        f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if v is not None and v is not False
    )
    return {
        "command": f"python benchmarks/{script} {options}".strip(),
        **vars(args),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }


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


class Bf16Autocast:
    """The plain model under CPU bf16 autocast."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, t, *conditions):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x, t, *conditions, return_dict=False)[0].float()
