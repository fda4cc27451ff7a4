"""Step-level continuous batching: requests at different sampling steps share one forward.

A step program's cross-step state is explicit (``RunState``), so the engine can hold many
sampling runs at once and, at every tick, run each group of requests whose next step uses
the same variant as one batched forward (``OptimizedDenoiser.step_many``: latents,
per-sample timesteps, conditions and state concatenated along the batch axis, outputs and
new state split back).
New requests join at the next tick and finished ones leave at once, as LLM servers batch
tokens. Diffusion servers batch whole requests instead (a request that arrives one step
after a batch started waits for the whole batch).

Each request carries its own noise (its seed), conditions, step count, scheduler (a fresh
``make_scheduler`` of the program's config: multistep history stays per request), guidance
and state, so its result equals the same request sampled alone by ``Sampler`` (within float
tolerance; exactly the same arithmetic per sample), whatever else shared its forwards.

Bounds: at most ``max_batch`` rows per forward (a guided request counts twice), at most
``max_active`` requests in flight and ``max_waiting`` queued; ``submit`` beyond that raises
``Overloaded`` (HTTP 503 in ``serving.deployment``), never an unbounded queue. Programs whose
result for one sample depends on the others in its batch are refused, by name: an adaptive
schedule (its probe decides for the whole batch) and per-batch dynamic quantization (one
scale for the whole batch, ``TemporalDifferencePass("dynamic")``).

A request's tensors are copied and checked at submit (shapes, dtypes, finite values, index
ranges, its null conditions too), so a bad request fails alone and a caller that later
edits its tensors changes nothing. A request whose future is cancelled (``abort``, or a
client that went away) leaves at the next tick. A failed forward fails only the requests
in it; ``serve_forever`` never dies of a request.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from diffopt.ir.graph_tools import batch_coupled_nodes
from diffopt.ir.layers import layer_key
from diffopt.ir.specs import BATCH
from diffopt.runtime.denoiser import OptimizedDenoiser, check_bounds, fed_inputs, state_batch_axes, widens
from diffopt.sampling.schedulers import make_scheduler
from diffopt.sampling.sequential import check_null_conditions, combine_guidance, guidance_inputs, initial_noise

MAX_STEPS = 1000  # a request for more steps is refused (it would hold its slot for minutes)
RECENT_FORWARDS = 1000
BATCH_COUPLED_SCHEMES = ("dynamic",)  # quantization schemes whose scale is computed over the whole batch
logger = logging.getLogger("diffopt")


class Overloaded(RuntimeError):
    """The engine holds as many requests as its bounds allow; try again later."""


class RequestError(ValueError):
    """A request does not fit the program; the message names the field, ``param`` too where
    the API reports it apart (OpenAI's error shape)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(eq=False)  # a run is itself: compared by identity, never by its tensors
class _Run:
    """One request in flight: its latent, scheduler, state and position in its schedule."""

    id: int
    x: torch.Tensor
    conditions: tuple[torch.Tensor, ...]
    scheduler: Any
    generator: torch.Generator
    guidance_scale: float
    null_conditions: tuple[torch.Tensor, ...] | None
    state: tuple[torch.Tensor, ...]
    future: Future
    step: int = 0
    variants: list[str] = field(default_factory=list)
    batch_rows: list[int] = field(default_factory=list)  # the rows of each forward it shared

    @property
    def rows(self) -> int:
        """Samples it puts into a forward (guidance doubles them)."""
        return self.x.shape[0] * (1 if self.guidance_scale == 1.0 else 2)

    @property
    def done(self) -> bool:
        return self.step >= self.scheduler.num_steps


@dataclass(frozen=True)
class Result:
    """A finished request: its sample, the variant each of its steps ran, and the rows of the
    forward each step was part of."""

    sample: torch.Tensor
    variants: tuple[str, ...]
    batch_rows: tuple[int, ...]


class StepEngine:
    """Holds the active requests of one replica and advances them with batched steps."""

    def __init__(
        self,
        denoiser: OptimizedDenoiser,
        scheduler_config: Mapping[str, Any],
        *,
        max_batch: int = 32,
        max_active: int | None = None,
        max_waiting: int = 64,
    ):
        _refuse_batch_coupled(denoiser)
        for name, value in (("max_batch", max_batch), ("max_waiting", max_waiting), ("max_active", max_active)):
            if value is None and name == "max_active":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StepEngine: {name} must be an int >= 1, found {value!r}")
        self.denoiser = denoiser
        self.scheduler_config = dict(scheduler_config)
        make_scheduler(self.scheduler_config, num_steps=2)  # refuse a config that cannot run, now
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.max_active = max_batch if max_active is None else max_active
        try:
            state_batch_axes(denoiser.program)  # requests share forwards: refuse state that cannot be split, now
        except ValueError as error:
            raise ValueError(f"StepEngine: {error}") from None
        self._waiting: collections.deque[_Run] = collections.deque()
        self._active: list[_Run] = []
        self._ids = itertools.count()
        self.aborted = 0  # requests whose future was cancelled before they finished
        self._lock = threading.Condition()
        # (variant, rows) of the recent batched forwards, for measurements
        self.forwards: collections.deque[tuple[str, int]] = collections.deque(maxlen=RECENT_FORWARDS)

    # requests

    def submit(
        self,
        conditions: Sequence[torch.Tensor],
        *,
        steps: int,
        seed: int = 0,
        guidance_scale: float = 1.0,
        null_conditions: Sequence[torch.Tensor] | None = None,
        samples: int = 1,
    ) -> Future:
        """Queue a request of ``samples`` samples; its ``Future`` resolves to a ``Result``.
        Raises ``RequestError`` for a request that cannot run and ``Overloaded`` when full."""
        run = self._checked_run(conditions, steps, seed, guidance_scale, null_conditions, samples)
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise Overloaded(
                    f"{len(self._active)} requests in flight and {len(self._waiting)} waiting (max_waiting="
                    f"{self.max_waiting}): try again later"
                )
            self._waiting.append(run)
            self._lock.notify_all()
        return run.future

    def _checked_run(self, conditions, steps, seed, guidance_scale, null_conditions, samples) -> _Run:
        conditions, nulls = checked_request(
            self.denoiser, self.max_batch, conditions, steps, samples, guidance_scale, null_conditions
        )
        try:
            scheduler = make_scheduler(self.scheduler_config, num_steps=steps)
            x, generator = initial_noise("StepEngine", (samples, *self._latent_shape()), None, seed)
        except ValueError as error:
            raise RequestError(str(error)) from None
        device = self.denoiser.device
        rows = samples * (1 if guidance_scale == 1.0 else 2)
        return _Run(  # copies of the caller's tensors: a later edit of theirs changes nothing here
            next(self._ids),
            x.to(device),
            tuple(c.to(device, copy=True) for c in conditions),
            scheduler,
            generator,
            float(guidance_scale),
            None if nulls is None else tuple(n.to(device, copy=True) for n in nulls),
            self.denoiser.program.state.allocate(rows, device),
            Future(),
        )

    def abort(self, future: Future) -> bool:
        """Stop the request of ``future`` (from ``submit``): it leaves at the next tick, the other
        requests go on unchanged. False when it had already finished."""
        return future.cancel()

    def _latent_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.denoiser.inputs[0].shape[1:])

    # the loop

    @property
    def load(self) -> tuple[int, int]:
        """(requests in flight, requests waiting)."""
        with self._lock:
            return len(self._active), len(self._waiting)

    def tick(self) -> int:
        """Admit waiting requests, then run one batched step per variant group (the requests
        that waited longest first, up to ``max_batch`` rows each); returns the requests advanced."""
        with self._lock:
            held = len(self._waiting) + len(self._active)
            self._waiting = collections.deque(run for run in self._waiting if not run.future.cancelled())
            self._active = [run for run in self._active if not run.future.cancelled()]
            self.aborted += held - len(self._waiting) - len(self._active)
            while self._waiting and len(self._active) < self.max_active:
                self._active.append(self._waiting.popleft())
            active = list(self._active)
        groups: dict[str, list[_Run]] = {}
        for run in active:
            groups.setdefault(self.denoiser.program.schedule.variant_at(run.step), []).append(run)
        advanced = 0
        for variant, members in groups.items():
            batch, rows = [], 0
            for run in members:
                if rows + run.rows > self.max_batch:
                    break
                batch.append(run)
                rows += run.rows
            try:
                self._step(variant, batch)
            except Exception as error:  # a failed forward fails its requests, never the engine
                for run in batch:
                    _settle(run.future, error=error)
                self._retire(batch)
                continue
            advanced += len(batch)
            self._retire([run for run in batch if run.done])
        return advanced

    def run_until_idle(self) -> None:
        """Tick until nothing is active or waiting."""
        while any(self.load):
            self.tick()

    def serve_forever(self, stop: threading.Event) -> None:
        """Tick while there is work, sleep while there is none, until ``stop`` is set."""
        while not stop.is_set():
            with self._lock:
                if not self._active and not self._waiting:
                    self._lock.wait(timeout=0.05)
                    continue
            try:
                self.tick()
            except Exception:  # a bug in a tick must not stop every later request: log it, go on
                logger.exception("diffopt serving: a tick failed; the engine goes on")

    def _retire(self, runs: list[_Run]) -> None:
        with self._lock:
            self._active = [run for run in self._active if run not in runs]
        for run in runs:
            _settle(run.future, result=Result(run.x, tuple(run.variants), tuple(run.batch_rows)))

    def _step(self, variant: str, runs: list[_Run]) -> None:
        """One forward of ``variant`` for ``runs`` (each at its own step), then each run's
        scheduler step on its share of the output."""
        fed = []
        for run in runs:
            k = run.step
            t = torch.full((run.x.shape[0],), run.scheduler.timesteps[k].item(), dtype=run.scheduler.timesteps.dtype)
            x, t, conditions = guidance_inputs(
                run.scheduler.scale_model_input(run.x, k),
                t.to(run.x.device),
                run.conditions,
                run.guidance_scale,
                run.null_conditions,
            )
            fed.append((fed_inputs(self.denoiser.inputs, (x, t, *conditions)), run.state))
        results = self.denoiser.step_many(variant, fed)
        rows = sum(inputs[0].shape[0] for inputs, _ in fed)
        self.forwards.append((str(variant), rows))
        for run, (out, state) in zip(runs, results):
            run.state = state
            guided = combine_guidance(out.to(run.x.dtype), run.guidance_scale)
            run.x = run.scheduler.step(guided, run.step, run.x, run.generator)
            run.variants.append(str(variant))
            run.batch_rows.append(rows)
            run.step += 1


def _settle(future: Future, *, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` unless it is already done or was cancelled (its caller went away)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def _refuse_batch_coupled(denoiser: OptimizedDenoiser) -> None:
    """Refuse, by name, a program whose result for one sample depends on the others in its batch."""
    if denoiser.program.schedule.probes:
        raise ValueError(
            "StepEngine: this program's schedule is adaptive (its probe decides for the whole batch), so a "
            "request's result would depend on the others: serve a program with a fixed schedule"
        )
    coupled = batch_coupled_layers(denoiser)
    if coupled:
        raise ValueError(
            f"StepEngine: variants {coupled[:4]} quantize with one scale per batch (dynamic quantization), so a "
            f"request's result would depend on the others in its forward: serve a program without "
            f"TemporalDifferencePass('dynamic'), or static quantization"
        )


def batch_coupled_layers(denoiser: OptimizedDenoiser) -> list[str]:
    """``"variant (layer)"`` of every layer whose result for one sample depends on the other
    samples of its forward (a dynamic quantization scale over the whole batch)."""
    program = denoiser.program
    variants = getattr(program, "variants", None)
    if isinstance(variants, Mapping):
        return sorted(
            {
                f"{variant} ({layer_key(node)})"
                for variant, module in variants.items()
                for node in batch_coupled_nodes(module.graph)
            }
        )
    quantization = (denoiser.bundle.manifest.quantization if denoiser.bundle is not None else None) or {}
    return sorted(  # a bundle: its manifest records what its graphs quantize
        {
            f"{variant} ({step['layer']})"
            for variant, steps in quantization.items()
            for step in steps
            if str(step.get("scheme", "")).startswith(BATCH_COUPLED_SCHEMES)
        }
    )


def checked_request(
    denoiser: OptimizedDenoiser,
    max_batch: int,
    conditions: Sequence[torch.Tensor],
    steps: int,
    samples: int,
    guidance_scale: float,
    null_conditions: Sequence[torch.Tensor] | None,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """(conditions, null conditions) of a request that can run on ``denoiser``; a
    ``RequestError`` names the field that cannot."""
    _, _, *specs = denoiser.inputs
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise RequestError(f"steps: an int in [1, {MAX_STEPS}], found {steps!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= max_batch:
        raise RequestError(f"samples: an int in [1, {max_batch}] (max_batch), found {samples!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise RequestError(f"guidance_scale: a finite number, found {guidance_scale!r}")
    if samples * (1 if guidance_scale == 1.0 else 2) > max_batch:
        raise RequestError(f"samples: {samples} guided samples need {2 * samples} rows, more than max_batch")
    if len(conditions) != len(specs):
        raise RequestError(f"conditions: expected {[s.name for s in specs]}, found {len(conditions)} tensors")
    checked = tuple(_checked_condition(spec, value, samples) for spec, value in zip(specs, conditions))
    if guidance_scale == 1.0:
        return checked, None
    if null_conditions is None:
        raise RequestError("guidance_scale: this server has no null conditions to guide with")
    try:
        check_null_conditions("null_conditions", null_conditions, checked)
    except ValueError as error:
        raise RequestError(str(error)) from None
    nulls = tuple(
        _checked_values(spec, value.to(condition.dtype), f"null_conditions.{spec.name}")
        for spec, value, condition in zip(specs, null_conditions, checked)
    )
    return checked, nulls


def _checked_condition(spec, value: Any, samples: int) -> torch.Tensor:
    """``value`` as ``spec`` takes it for ``samples`` samples; a ``RequestError`` names it."""
    if not isinstance(value, torch.Tensor):
        raise RequestError(f"{spec.name}: expected a tensor, found {type(value).__name__}")
    expected = tuple(samples if d == BATCH else d for d in spec.shape)
    if tuple(value.shape) != expected:
        raise RequestError(f"{spec.name}: expected shape {list(expected)}, found {list(value.shape)}")
    if value.dtype != spec.torch_dtype and not widens(value.dtype, spec.torch_dtype):
        raise RequestError(f"{spec.name}: expected {spec.dtype}, found {str(value.dtype).removeprefix('torch.')}")
    return _checked_values(spec, value, spec.name)


def _checked_values(spec, value: torch.Tensor, field: str) -> torch.Tensor:
    """``value`` if its values suit ``spec`` (finite floats, indices in range); else a
    ``RequestError`` naming ``field``."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise RequestError(f"{field}: values must be finite (found NaN or inf)")
    if spec.bounds is not None:
        try:
            check_bounds(value, dataclasses.replace(spec, name=field))
        except ValueError as error:
            raise RequestError(str(error)) from None
    return value
