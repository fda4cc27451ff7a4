"""Serving a diffusers pipeline: whole pipeline calls, their denoiser steps batched together.

``PipelineEngine(pipe)`` takes an enabled pipeline (``diffopt.enable(pipe, passes)``). Each
request is one call of the pipeline, run by a worker thread on its own shallow copy of the
pipeline (its own scheduler and call attributes; the models are shared): the prompt is
encoded when the request starts, the pipeline's own loop runs its steps, and the latent is
decoded when its last step is done. Inside, every denoiser forward goes through one
``ForwardBatcher``: the forwards of all requests that are stepping run together, each
request at its own step with its own conditions, guidance, step count, generator, scheduler
and cache state. So a request's images equal ``pipe(**call, generator=seed)`` alone, within
float tolerance, whatever else shared its forwards. Requests of another resolution or prompt
length run another program (``OptimizedComponent`` keys programs by shapes): they form
their own forward in each tick, never padded into another's.

Bounds: ``max_active`` requests run at once, ``max_waiting`` more wait; ``submit`` beyond
that raises ``Overloaded``. With ``slo_s`` a request starts only when it and the running ones
are expected to finish within the SLO, and one that cannot is refused with ``Overloaded``
(``serving.slo_admission``): under overload the server's time goes to requests that can still
make it, instead of every request finishing late. A request the pipeline refuses (its ``check_inputs`` raises
``ValueError``) fails with ``RequestError``; a cancelled future that has not started never
runs.
"""

from __future__ import annotations

import copy
import inspect
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from diffopt.serving.engine import Overloaded, RequestError
from diffopt.serving.forward_batcher import ForwardBatcher
from diffopt.serving.slo_admission import SloAdmission

DENOISER_NAMES = ("transformer", "unet")


@dataclass(frozen=True)
class PipelineResult:
    """A finished request: its images (``output_type`` of the call: numpy arrays, HWC in
    [0, 1] for ``"np"``) and the rows of each forward it shared."""

    images: Any
    batch_rows: tuple[int, ...]


class PipelineEngine:
    """Serves one enabled pipeline to concurrent requests (see the module docstring)."""

    def __init__(
        self,
        pipe: Any,
        *,
        max_batch: int = 32,
        max_active: int = 16,
        max_waiting: int = 64,
        linger_s: float = 0.01,
        call_defaults: Mapping[str, Any] | None = None,
        slo_s: float | None = None,
    ):
        denoiser = next((getattr(pipe, n) for n in DENOISER_NAMES if hasattr(getattr(pipe, n, None), "programs")), None)
        if denoiser is None:
            raise ValueError(
                f"PipelineEngine: {type(pipe).__name__} is not enabled: call diffopt.enable(pipe, passes) first "
                f"(its denoiser's steps are what requests share)"
            )
        for name, value in (("max_active", max_active), ("max_waiting", max_waiting)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"PipelineEngine: {name} must be an int >= 1, found {value!r}")
        self.parameters = call_parameters(pipe)
        self.call_defaults = dict(call_defaults or {})
        unknown = sorted(set(self.call_defaults) - self.parameters)
        if unknown:
            raise ValueError(f"PipelineEngine: call_defaults {unknown} are not arguments of {type(pipe).__name__}")
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.max_active, self.max_waiting = pipe, max_active, max_waiting
        self._tokenizers = {  # fast tokenizers change their padding settings per call: one call at a time each
            name: _OneCallAtATime(component)
            for name, component in getattr(pipe, "components", {}).items()
            if name.startswith("tokenizer") and component is not None
        }
        self.batcher = ForwardBatcher(max_batch, linger_s)
        self.admission = SloAdmission(slo_s) if slo_s is not None else None
        self.default_steps = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
        self._workers = ThreadPoolExecutor(max_workers=max_active, thread_name_prefix="diffopt-request")
        self._lock = threading.Lock()
        self._held = 0  # requests running or waiting for a worker

    @property
    def load(self) -> int:
        """Requests running or waiting."""
        with self._lock:
            return self._held

    def submit(self, call: Mapping[str, Any], seed: int) -> Future:
        """Run ``pipe(**call_defaults, **call, generator=Generator().manual_seed(seed))``; the
        ``Future`` resolves to a ``PipelineResult``. ``RequestError`` names an argument the
        pipeline does not take; ``Overloaded`` when the engine holds all it may."""
        unknown = sorted(set(call) - self.parameters)
        if unknown:
            raise RequestError(f"{unknown[0]}: not an argument of {type(self.pipe).__name__}", param=unknown[0])
        if "generator" in call or "latents" in call:
            raise RequestError("generator: a request gives a seed; the engine makes its generator", param="seed")
        with self._lock:
            if self._held >= self.max_active + self.max_waiting:
                raise Overloaded(
                    f"{self._held} requests running or waiting (max_active={self.max_active}, max_waiting="
                    f"{self.max_waiting}): try again later"
                )
            self._held += 1
        future = self._workers.submit(self._run, {**self.call_defaults, **call}, seed, time.monotonic())
        future.add_done_callback(self._release)
        return future

    def _release(self, _: Future) -> None:
        with self._lock:
            self._held -= 1

    def close(self) -> None:
        """Stop taking requests; the running ones finish, the waiting ones are cancelled."""
        self._workers.shutdown(wait=False, cancel_futures=True)
        self.batcher.close()

    def _run(self, call: dict[str, Any], seed: int, arrived: float) -> PipelineResult:
        steps = call.get("num_inference_steps", getattr(self.default_steps, "default", None))
        steps = steps if isinstance(steps, int) and not isinstance(steps, bool) else None
        if self.admission is None or steps is None:
            return self._call(call, seed, steps)
        with self.admission.slot(arrived, steps) as admitted:
            return self._call(call, seed, steps, admitted)

    def _call(self, call: dict[str, Any], seed: int, steps: int | None, admitted=None) -> PipelineResult:
        pipe = copy.copy(self.pipe)  # this call's own attributes (guidance, step count) and scheduler
        object.__setattr__(pipe, "scheduler", copy.deepcopy(self.pipe.scheduler))
        for name, tokenizer in self._tokenizers.items():
            object.__setattr__(pipe, name, tokenizer)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with self.batcher.run(expected_forwards=steps) as run:
            if admitted is not None:
                admitted.run = run
            try:
                output = pipe(**call, generator=generator)
            except (ValueError, TypeError) as error:  # the pipeline's own check of its arguments
                raise RequestError(f"the pipeline refused the call: {error}") from None
        images = output.images if hasattr(output, "images") else output[0]
        return PipelineResult(images, tuple(run.batch_rows))


def call_parameters(pipe: Any) -> set[str]:
    """The arguments ``pipe(...)`` takes."""
    return set(inspect.signature(type(pipe).__call__).parameters) - {"self"}


class _OneCallAtATime:
    """A tokenizer shared by request threads: its calls take turns (a fast tokenizer sets its
    padding and truncation on one shared Rust object per call, so concurrent calls mix them
    up); everything else is the tokenizer's."""

    def __init__(self, tokenizer: Any):
        self._tokenizer, self._lock = tokenizer, threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)
