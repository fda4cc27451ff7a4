"""Drop-in use inside diffusers pipelines: ``pipe = diffopt.enable(pipe, passes=[...])``.

``enable`` swaps the pipeline's denoiser (``transformer`` or ``unet``) for an
``OptimizedComponent``: an ``nn.Module`` with the model's ``config``, ``dtype``,
``device``, keyword signature and return type. At its first call it captures the model
with the arguments the pipeline really passes (shapes, dict arguments, flags) and
optimizes it; later calls run the step program. The program keeps its cache state per
call stream, so pipelines that call the denoiser twice per step (true CFG) work; the
streams follow diffusers' ``cache_context(name)`` where the pipeline opens one.
Moving the pipeline (``pipe.to(...)``) moves the model and recaptures at the next call.
``disable(pipe)`` puts the original model back.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffopt.capture import capture
from diffopt.ir.policy import LayerPolicy
from diffopt.ir.statistics import CalibrationStatistics
from diffopt.optimize import optimize
from diffopt.passes.base import GraphPass
from diffopt.runtime.denoiser import InputError, OptimizedDenoiser

DENOISER_NAMES = ("transformer", "unet")


class OptimizedComponent(torch.nn.Module):
    """A pipeline's denoiser, run as a diffopt step program (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        passes: Sequence[GraphPass],
        calibration: CalibrationStatistics | None,
        policy: LayerPolicy | None,
    ):
        super().__init__()
        self.original = model
        self.passes, self.calibration, self.policy = tuple(passes), calibration, policy
        self._denoiser: OptimizedDenoiser | None = None
        self._static: dict[str, Any] = {}
        self._output_type: type | None = None
        self._local = threading.local()  # this thread's cache_context name
        self.__signature__ = inspect.signature(model.forward)  # what tools that inspect forward see

    @property
    def config(self):
        return self.original.config

    @property
    def dtype(self) -> torch.dtype:
        return self.original.dtype

    @property
    def device(self) -> torch.device:
        return self.original.device

    @property
    def denoiser(self) -> OptimizedDenoiser | None:
        """The optimized program (None until the first call)."""
        return self._denoiser

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """diffusers' ``CacheMixin.cache_context``, which pipelines with true CFG call around
        each branch: calls inside use the program's state stream ``name``."""
        if not isinstance(name, str) or not name:
            raise InputError(f"a cache context name is a non-empty string, found {name!r}")
        previous = getattr(self._local, "stream", None)
        self._local.stream = name
        try:
            yield
        finally:
            self._local.stream = previous

    def _apply(self, fn, *args, **kwargs):
        self._denoiser = None  # moved or cast: capture again, on the new device / dtype, at the next call
        return super()._apply(fn, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.__signature__.bind(*args, **kwargs)
        bound.apply_defaults()  # every argument is compared with the captured call, defaults too
        arguments = dict(bound.arguments)
        return_dict = arguments.pop("return_dict", True)
        varargs = [n for n, p in self.__signature__.parameters.items() if p.kind == p.VAR_KEYWORD]
        for name in varargs:  # **kwargs of forward: its entries are keyword arguments
            arguments.update(arguments.pop(name, {}))
        if self._denoiser is None:
            self._capture(arguments)
        self._check_static(arguments)
        values = _flatten(arguments)
        stream = getattr(self._local, "stream", None)
        with self._denoiser.stream(stream) if stream is not None else contextlib.nullcontext():
            out = self._denoiser(*(values[name] for name in self._denoiser.program.signature.input_names))
        return self._output_type(sample=out) if return_dict else (out,)

    def _capture(self, arguments: dict[str, Any]) -> None:
        with torch.no_grad():
            self._output_type = type(self.original(**arguments, return_dict=True))
        graph = capture(self.original, arguments)
        self._denoiser = optimize(graph, self.passes, calibration=self.calibration, policy=self.policy)
        inputs = set(graph.signature.input_names)
        self._static = {k: v for k, v in _flatten(arguments).items() if k not in inputs}

    def _check_static(self, arguments: dict[str, Any]) -> None:
        """Non-tensor arguments are baked into the program: another value is an error naming it."""
        values = _flatten(arguments)
        for name, captured in self._static.items():
            if name not in values or not _same(values[name], captured):
                raise ValueError(
                    f"{type(self.original).__name__} was captured with {name}={captured!r:.60} and is now called "
                    f"with {values.get(name, '<missing>')!r:.60}: non-tensor arguments are part of the program. "
                    f"Call diffopt.disable(pipe) and enable it again for the new setting."
                )


def _flatten(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments as capture names them: a dict holding tensors becomes ``name.key`` entries."""
    flat: dict[str, Any] = {}
    for name, value in arguments.items():
        if isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values()):
            flat.update({f"{name}.{key}": item for key, item in value.items()})
        else:
            flat[name] = value
    return flat


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _denoiser_name(pipe: Any) -> str:
    for name in DENOISER_NAMES:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise ValueError(
        f"{type(pipe).__name__} has no denoiser: expected a module at pipe.{' or pipe.'.join(DENOISER_NAMES)}"
    )


def enable(
    pipe: Any,
    passes: Sequence[GraphPass] = (),
    *,
    calibration: CalibrationStatistics | None = None,
    policy: LayerPolicy | None = None,
) -> Any:
    """Run ``pipe``'s denoiser as a diffopt program with ``passes``; returns ``pipe``."""
    name = _denoiser_name(pipe)
    model = getattr(pipe, name)
    if isinstance(model, OptimizedComponent):
        raise ValueError(
            f"diffopt is already enabled on {type(pipe).__name__}.{name}: call diffopt.disable(pipe) first"
        )
    setattr(pipe, name, OptimizedComponent(model, passes, calibration, policy))
    return pipe


def disable(pipe: Any) -> Any:
    """Put back the original denoiser ``enable`` replaced; returns ``pipe``."""
    name = _denoiser_name(pipe)
    component = getattr(pipe, name)
    if not isinstance(component, OptimizedComponent):
        raise ValueError(f"diffopt is not enabled on {type(pipe).__name__}.{name}")
    setattr(pipe, name, component.original)
    return pipe
