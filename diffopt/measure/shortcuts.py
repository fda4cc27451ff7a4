"""Choosing a (steps, depth) configuration of a length-shortcut program for a budget.

``calibrate_shortcuts`` samples a small calibration batch with every configuration of a
grid (solver steps x a depth, or a per-step depth plan) from the same seeded noise and
scores each by PSNR against the program's deepest variant at ``reference_steps`` steps;
it counts each configuration's MACs per sample and times one run. ``ShortcutTable.pick``
then answers "the best calibrated quality within this MAC / latency budget".
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from diffopt.ir.program import StepProgram
from diffopt.measure.fidelity import psnr
from diffopt.measure.macs import macs_per_run
from diffopt.passes.length_shortcut import depth_schedule, depth_variant
from diffopt.runtime.denoiser import OptimizedDenoiser
from diffopt.sampling.schedulers import make_scheduler
from diffopt.sampling.sequential import Sampler
from diffopt.util.files import read_json, write_text
from diffopt.util.validation import require_int


@dataclass(frozen=True)
class ShortcutConfig:
    """One configuration and what it measured: ``depths`` holds one depth (every step) or one per step."""

    steps: int
    depths: tuple[int, ...]
    macs: int  # per sample, whole run
    seconds: float  # median wall time of one run of the calibration batch
    quality: float  # PSNR (dB) against the reference samples

    @property
    def schedule(self):
        """The depth schedule to run it with: ``denoiser.with_schedule(config.schedule)``."""
        return depth_schedule(spread(self.depths, self.steps))


@dataclass(frozen=True)
class ShortcutTable:
    configs: tuple[ShortcutConfig, ...]
    reference_steps: int

    def pick(self, *, max_macs: int | None = None, max_seconds: float | None = None) -> ShortcutConfig:
        """The configuration with the best quality within the budget (ties: the cheapest)."""
        if max_macs is None and max_seconds is None:
            raise ValueError("pick() needs a budget: max_macs= and/or max_seconds=")
        fitting = [
            c
            for c in self.configs
            if (max_macs is None or c.macs <= max_macs) and (max_seconds is None or c.seconds <= max_seconds)
        ]
        fitting = [c for c in fitting if math.isfinite(c.quality)]  # NaN (a run that diverged) ranks above nothing
        if not fitting:
            cheapest = min(self.configs, key=lambda c: c.macs)
            raise ValueError(
                f"no configuration fits max_macs={max_macs} max_seconds={max_seconds}; the cheapest is "
                f"{cheapest.steps} steps at depths {list(cheapest.depths)}: {cheapest.macs} MACs, "
                f"{cheapest.seconds:.3g} s"
            )
        return max(fitting, key=lambda c: (c.quality, -c.macs))

    def pareto(self) -> list[ShortcutConfig]:
        """The configurations no other beats in both MACs and quality, cheapest first."""
        front, best = [], -float("inf")
        for config in sorted(self.configs, key=lambda c: (c.macs, -c.quality)):
            if config.quality > best:
                front.append(config)
                best = config.quality
        return front

    def save(self, path: str | Path) -> None:
        data = {"reference_steps": self.reference_steps, "configs": [asdict(c) for c in self.configs]}
        write_text(path, json.dumps(data, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ShortcutTable:
        data = read_json(path, "a shortcut table")
        try:
            configs = tuple(ShortcutConfig(**{**c, "depths": tuple(c["depths"])}) for c in data["configs"])
            return cls(configs, int(data["reference_steps"]))
        except (KeyError, TypeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not a shortcut table ({error})") from error


def calibrate_shortcuts(
    denoiser: OptimizedDenoiser,
    scheduler_config: Mapping[str, Any],
    conditions: Sequence[torch.Tensor],
    shape: Sequence[int],
    *,
    steps: Sequence[int] = (2, 4, 8, 16),
    depth_plans: Sequence[int | Sequence[int]] | None = None,
    reference_steps: int = 50,
    seed: int = 0,
    repeats: int = 3,
) -> ShortcutTable:
    """Measure every (step count, depth plan) of ``denoiser`` (a length-shortcut program,
    ``passes.length_shortcut``) on one seeded calibration batch of ``shape``.

    ``depth_plans``: depths (every step at that depth) or per-step plans given as a list
    of depths spread evenly over the steps (``[2, 6]``: the first half at depth 2, the
    rest at 6); default: every depth the program has."""
    require_int("calibrate_shortcuts", "reference_steps", reference_steps, minimum=1)
    if not isinstance(denoiser.program, StepProgram) or not all(
        name.startswith("depth") for name in denoiser.program.variants
    ):
        raise ValueError("calibrate_shortcuts needs the OptimizedDenoiser that optimize() made with LengthShortcutPass")
    available = sorted(int(name.removeprefix("depth")) for name in denoiser.program.variants)
    plans = [[d] if isinstance(d, int) else list(d) for d in (depth_plans or available)]

    def run(num_steps: int, depths: list[int]) -> tuple[torch.Tensor, float]:
        sampler = Sampler(make_scheduler(scheduler_config, num_steps=num_steps), progress=False)
        program = denoiser.with_schedule(depth_schedule(spread(depths, num_steps)))
        started = time.perf_counter()
        out = sampler.sample(program, conditions, shape=shape, seed=seed)
        return out, time.perf_counter() - started

    reference, _ = run(reference_steps, [max(available)])
    inputs = [torch.zeros(*shape)[:1], torch.zeros(1), *(c[:1] for c in conditions)]
    configs = []
    for num_steps, plan in tqdm([(s, p) for s in steps for p in plans], desc="calibrating shortcuts"):
        samples, _ = run(num_steps, plan)
        seconds = statistics.median(run(num_steps, plan)[1] for _ in range(repeats))
        per_step = spread(plan, num_steps)
        program = denoiser.with_schedule(depth_schedule(per_step)).program
        macs = macs_per_run(program, inputs, variants_run=[depth_variant(d) for d in per_step])
        configs.append(ShortcutConfig(num_steps, tuple(plan), macs, seconds, psnr(samples, reference)))
    return ShortcutTable(tuple(configs), reference_steps)


def spread(plan: Sequence[int], num_steps: int) -> list[int]:
    """A depth per step: ``plan``'s entries over ``num_steps`` in equal consecutive runs."""
    return [plan[k * len(plan) // num_steps] for k in range(num_steps)]
