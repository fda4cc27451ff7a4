"""``Sampler``: drives a denoiser through one sampling run.

Works with an ``OptimizedDenoiser`` (functional step program: fresh state per run,
variant per step from the schedule, state fed back each step) or a plain model
``model(x, t, *conditions)``. Optional classifier-free guidance runs the conditional
and unconditional halves as one batch: ``out = u + scale * (c - u)``. A seed makes a
run reproducible: the initial noise and every stochastic step draw from one generator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from diffopt.ir.signature import first_tensor_output
from diffopt.runtime.denoiser import OptimizedDenoiser, check_bounds, fed_inputs
from diffopt.sampling.interface import SamplingLoop
from diffopt.sampling.schedulers import Scheduler
from diffopt.util.validation import require_int, require_number


@dataclass
class SamplingStats:
    num_steps: int = 0
    model_calls: int = 0
    wall_time_s: float = 0.0
    variants: list[str] = field(default_factory=list)


def guidance_inputs(
    x: torch.Tensor,
    t: torch.Tensor,
    conditions: Sequence[torch.Tensor],
    scale: float,
    null_conditions: Sequence[torch.Tensor] | None,
):
    """Classifier-free guidance as one batch: (x, t, conditions), doubled with the null
    conditions as the second half when ``scale != 1``."""
    if scale == 1.0:
        return x, t, tuple(conditions)
    if len(null_conditions) != len(conditions):
        raise ValueError(f"expected {len(conditions)} null conditions, found {len(null_conditions)}")
    nulls = [n.to(c.device, c.dtype).expand_as(c) for n, c in zip(null_conditions, conditions)]
    return torch.cat([x, x]), torch.cat([t, t]), tuple(torch.cat([c, n]) for c, n in zip(conditions, nulls))


def check_null_conditions(
    owner: str, null_conditions: Sequence[torch.Tensor], conditions: Sequence[torch.Tensor]
) -> None:
    """Each null condition is a tensor that broadcasts to its condition's shape and converts to
    its dtype exactly (a null class of 10.5 for int64 labels is an error, not class 10)."""
    if len(null_conditions) != len(conditions):
        raise ValueError(f"{owner}: expected {len(conditions)} null conditions, found {len(null_conditions)}")
    for index, (null, condition) in enumerate(zip(null_conditions, conditions)):
        where = f"{owner}: null_conditions[{index}]"
        if not isinstance(null, torch.Tensor):
            raise ValueError(f"{where} must be a tensor, found {type(null).__name__} {null!r:.40}")
        try:
            torch.broadcast_shapes(null.shape, condition.shape)
        except RuntimeError:
            raise ValueError(
                f"{where} has shape {tuple(null.shape)}, which does not broadcast to the condition's "
                f"{tuple(condition.shape)}"
            ) from None
        converted = null.to(condition.dtype)
        if null.is_complex() or not torch.equal(converted.to(null.dtype), null):
            raise ValueError(
                f"{where} = {null.flatten()[:4].tolist()} does not convert exactly to the condition's "
                f"{str(condition.dtype).removeprefix('torch.')}: pass it in that dtype"
            )


def combine_guidance(out: torch.Tensor, scale: float) -> torch.Tensor:
    """``u + scale (c - u)`` from a batch laid out by ``guidance_inputs``."""
    if scale == 1.0:
        return out
    conditional, unconditional = out.chunk(2)
    return unconditional + scale * (conditional - unconditional)


def initial_noise(
    owner: str, shape: Sequence[int] | None, noise: torch.Tensor | None, seed: int
) -> tuple[torch.Tensor, torch.Generator]:
    """(starting noise, the seeded CPU generator later noise comes from): ``noise`` (copied)
    or drawn from ``seed`` in ``shape`` on the CPU, so it is the same on every device."""
    if (shape is None) == (noise is None):
        raise ValueError(f"{owner}: pass exactly one of shape= (noise is drawn from the seed) or noise=")
    require_int(owner, "seed", seed, minimum=0)
    if seed >= 2**64:
        raise ValueError(f"{owner}.seed must be below 2**64 (a torch generator's seed), found {seed}")
    if shape is not None and (
        not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise ValueError(f"{owner}: shape must be positive ints (batch first), found {shape!r}")
    if noise is not None and (not isinstance(noise, torch.Tensor) or noise.dim() == 0 or noise.shape[0] < 1):
        raise ValueError(f"{owner}: noise must be a batched tensor, found {noise!r:.60}")
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tuple(shape), generator=generator) if noise is None else noise.clone()), generator


def start_run(
    owner: str,
    denoiser: OptimizedDenoiser | Callable,
    conditions: Sequence[torch.Tensor],
    shape: Sequence[int] | None,
    noise: torch.Tensor | None,
    seed: int,
) -> tuple[torch.Tensor, torch.Generator, tuple[torch.Tensor, ...]]:
    """(starting noise, generator, conditions) of a sampling run, on the denoiser's device
    (``initial_noise``); every condition must be a tensor with one entry per sample."""
    x, generator = initial_noise(owner, shape, noise, seed)
    device = getattr(denoiser, "device", None)  # an OptimizedDenoiser (or any denoiser saying where it runs)
    x = x.to(device or x.device)
    conditions = tuple(c.to(x.device) if isinstance(c, torch.Tensor) else c for c in conditions)
    for c in conditions:
        if not isinstance(c, torch.Tensor) or c.dim() == 0:
            raise ValueError(f"{owner}: each condition must be a batched tensor, found {c!r:.60}")
        if c.shape[0] != x.shape[0]:
            raise ValueError(f"each condition needs one entry per sample: batch {x.shape[0]}, found {c.shape[0]}")
    return x, generator, conditions


class _PlainModelRunner:
    def __init__(self, model: Callable):
        self.model = model

    def start(self, batch_size: int, device: torch.device) -> None:
        pass

    def __call__(self, step_index, x, t, conditions) -> tuple[torch.Tensor, str]:
        with torch.no_grad():
            return first_tensor_output(self.model(x, t, *conditions)), "model"


class _StepProgramRunner:
    """Feeds an ``OptimizedDenoiser`` (``fed_inputs``: a bf16 program gets bf16 latents) and
    returns its output in the sampler's dtype."""

    def __init__(self, denoiser: OptimizedDenoiser):
        self.denoiser = denoiser
        self.state: tuple[torch.Tensor, ...] = ()

    def start(self, batch_size: int, device: torch.device) -> None:
        self.state = self.denoiser.init_state(batch_size, device)

    def __call__(self, step_index, x, t, conditions) -> tuple[torch.Tensor, str]:
        inputs = fed_inputs(self.denoiser.inputs, (x, t, *conditions))
        out, self.state = self.denoiser.step(step_index, *inputs, state=self.state)
        return out.to(x.dtype), self.denoiser.last_variant


def runner_for(denoiser: OptimizedDenoiser | Callable) -> _StepProgramRunner | _PlainModelRunner:
    """What a sampling loop calls each step: ``runner(k, x, t, conditions) -> (out, variant)``
    after ``runner.start(batch_size, device)``."""
    return _StepProgramRunner(denoiser) if isinstance(denoiser, OptimizedDenoiser) else _PlainModelRunner(denoiser)


class Sampler(SamplingLoop):
    """One sampling loop over any scheduler and any denoiser (optimized or plain)."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        guidance_scale: float = 1.0,
        null_conditions: Sequence[torch.Tensor] | None = None,
        progress: bool = True,
    ):
        require_number("Sampler", "guidance_scale", guidance_scale)
        for name in ("num_steps", "timesteps", "step", "scale_model_input"):
            if not hasattr(scheduler, name):
                raise TypeError(f"Sampler: scheduler must be a diffopt scheduler (make_scheduler), found {scheduler!r}")
        if guidance_scale != 1.0 and null_conditions is None:
            raise ValueError(
                "classifier-free guidance (guidance_scale != 1) needs null_conditions: the "
                "'no condition' value of each condition, e.g. (torch.tensor(10),) for a null class"
            )
        self.scheduler = scheduler
        self.guidance_scale = guidance_scale
        self.null_conditions = tuple(null_conditions) if null_conditions is not None else None
        self.progress = progress
        self.last_stats = SamplingStats()

    def _sample(
        self,
        denoiser: OptimizedDenoiser | Callable,
        conditions: tuple[torch.Tensor, ...],
        shape: Sequence[int] | None,
        noise: torch.Tensor | None,
        seed: int,
    ) -> torch.Tensor:
        """Run all steps from ``noise`` (or seeded noise of ``shape``); return the final sample."""
        if isinstance(denoiser, OptimizedDenoiser):  # host values, once per run: the step loop never reads them
            nulls = self.null_conditions if self.guidance_scale != 1.0 else (None,) * len(conditions)
            for spec, condition, null in zip(denoiser.inputs[2:], conditions, nulls):
                for value in (condition, null) if spec.bounds is not None else ():
                    if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                        check_bounds(value, spec)
        x, generator, conditions = start_run("Sampler.sample", denoiser, conditions, shape, noise, seed)
        if self.guidance_scale != 1.0:
            check_null_conditions("Sampler", self.null_conditions, conditions)
        runner = runner_for(denoiser)
        model_batch = x.shape[0] * (1 if self.guidance_scale == 1.0 else 2)
        runner.start(model_batch, x.device)
        stats = SamplingStats(num_steps=self.scheduler.num_steps)
        started = time.perf_counter()
        steps = tqdm(range(self.scheduler.num_steps), desc="sampling", disable=not self.progress, leave=False)
        for k in steps:
            t = torch.full(
                (x.shape[0],), self.scheduler.timesteps[k].item(), dtype=self.scheduler.timesteps.dtype, device=x.device
            )
            model_x, model_t, model_conditions = guidance_inputs(
                self.scheduler.scale_model_input(x, k), t, conditions, self.guidance_scale, self.null_conditions
            )
            out, variant = runner(k, model_x, model_t, model_conditions)
            x = self.scheduler.step(combine_guidance(out, self.guidance_scale), k, x, generator)
            stats.model_calls += 1
            stats.variants.append(variant)
        stats.wall_time_s = time.perf_counter() - started
        self.last_stats = stats
        return x
