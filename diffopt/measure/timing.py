"""The one timing loop: callables measured in turns, after warm-up, waiting for the device.

``interleaved_times({name: run})`` calls every ``run(round)`` in turns (A B A B ...), so
that machine noise (another process, frequency changes) hits them alike; the first
``warmup`` rounds are discarded (allocation, onnxruntime's and torch's first-call work); the
clock stops only after queued CUDA work has finished (``wait_for_device``), so a GPU run is
timed, not just launched. ``run`` gets the round index (e.g. to draw other noise each round)
and may run ``number`` times per round, the time being their mean. Bench, tune (zoo and
pipelines), the demo, Defo's cost model and the benchmarks measure wall time with it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from tqdm import tqdm


def wait_for_device() -> None:
    """Wait for the queued CUDA work of this process (nothing to wait for on the CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_times(
    runs: Mapping[str, Callable[[int], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    number: int = 1,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each ``run`` (see the module docstring): ``repeats`` values per name."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"interleaved_times(): repeats must be an int >= 1, found {repeats!r}")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in tqdm(range(warmup + repeats), desc="timing", unit="round", disable=not progress):
        for name, run in runs.items():
            started = time.perf_counter()
            for _ in range(number):
                run(round_index)
            wait_for_device()
            if round_index >= warmup:
                times[name].append((time.perf_counter() - started) / number)
    return times


def median_times(runs: Mapping[str, Callable[[int], Any]], repeats: int, **options: Any) -> dict[str, float]:
    """The median of ``interleaved_times`` per name."""
    return {name: statistics.median(values) for name, values in interleaved_times(runs, repeats, **options).items()}
