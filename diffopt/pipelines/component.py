"""``OptimizedComponent``: a pipeline's denoiser whose ``forward`` runs diffopt step programs.

Everything but ``forward`` is the original model's: attributes, methods and submodules
resolve to it (``add_embedding``, ``set_attn_processor``, ``load_lora_adapter``,
``save_pretrained``), ``state_dict`` is its state dict. ``forward`` binds the call against
the model's signature and runs the program captured for that call's key
(``call_key``: shapes up to the batch, dtypes, devices, non-tensor arguments, and the
model's fingerprint). A call with a new key captures and optimizes a new program (logged;
the last ``max_programs`` are kept); a changed model (LoRA loaded or rescaled, processors
swapped, weights edited) drops every program. A call that fails changes nothing.
Captures run one at a time, process-wide.

Inside ``pipeline_call()`` (``enable`` wraps the pipeline's ``__call__`` in it) every
program runs in a run scope: streams start fresh at the call, follow ``cache_context``
names, and are released at its end, also when the call is cancelled.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from diffopt.capture import CaptureError, capture, infer_signature
from diffopt.ir.policy import LayerPolicy
from diffopt.ir.signature import CapturedGraph
from diffopt.ir.statistics import CalibrationStatistics
from diffopt.optimize import optimize
from diffopt.passes.base import GraphPass
from diffopt.pipelines.bundles import call_record, check_resolution, check_static
from diffopt.pipelines.call_key import call_key, describe_change, flatten_arguments, model_fingerprint
from diffopt.runtime.denoiser import InputError, OptimizedDenoiser

logger = logging.getLogger("diffopt")
MAX_PROGRAMS = 8
_CAPTURE_LOCK = threading.RLock()  # torch.export patches the model while it traces: one capture at a time


@dataclass
class CapturedProgram:
    """A program captured for one call key (or loaded from a bundle), with what ``forward``
    needs to call it."""

    key: tuple | None  # None: an exported bundle, used for every call its ``call`` record admits
    denoiser: OptimizedDenoiser
    output_type: type
    example: tuple[torch.Tensor, ...]  # its inputs at batch 1 (for the MACs in ``summary``)
    seconds: float  # capture and passes
    call: dict[str, Any]  # what capture baked in besides the inputs (``bundles.call_record``)
    graph: CapturedGraph | None = None  # None for a bundle
    fixed_batch: bool = False  # captured at the call's batch size only (the model reads it as a Python int)


def fixed_batch_key(key: tuple, values: dict[str, Any]) -> tuple:
    """The key of a program captured at one batch size: ``key`` and that size."""
    return (*key, ("fixed batch", values[infer_signature(values).latent].shape[0]))


def _capture_any_batch(model: torch.nn.Module, arguments: dict[str, Any]) -> tuple[CapturedGraph, bool]:
    """(graph, whether its batch size is fixed): captured for any batch size, or, where the
    model makes the batch size a Python number (Chroma builds a list of it), for this call's."""
    try:
        return capture(model, arguments), False
    except CaptureError as error:
        try:
            graph = capture(model, arguments, dynamic_batch=False)
        except CaptureError:
            raise error from None
        logger.info(
            "diffopt: %s captured for this batch size only (%s); another batch size captures again",
            type(model).__name__,
            " ".join(str(error).split())[:200],
        )
        return graph, True


class OptimizedComponent(torch.nn.Module):
    """A pipeline's denoiser, run as diffopt step programs (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        passes: Sequence[GraphPass] = (),
        calibration: CalibrationStatistics | None = None,
        policy: LayerPolicy | None = None,
        *,
        backend: str = "torch",
        max_programs: int = MAX_PROGRAMS,
        bundle: CapturedProgram | None = None,
    ):
        super().__init__()
        if isinstance(max_programs, bool) or not isinstance(max_programs, int) or max_programs < 1:
            raise ValueError(f"max_programs must be an int >= 1, found {max_programs!r}")
        self.original = model
        self.passes, self.calibration, self.policy = tuple(passes), calibration, policy
        self.backend, self.max_programs = backend, max_programs
        self.bundle = bundle  # an exported program that serves every call (``enable(pipe, bundle=...)``)
        self._programs: OrderedDict[tuple, CapturedProgram] = OrderedDict()
        self._fingerprint: tuple | None = None  # of the model the programs were captured from
        self._lock = threading.RLock()
        self._local = threading.local()  # this thread's cache_context name and pipeline call
        self.__signature__ = inspect.signature(model.forward)  # what tools that inspect forward see

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("__") or "original" not in modules:
                raise
            return getattr(modules["original"], name)

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
    def programs(self) -> list[CapturedProgram]:
        """The captured programs, least recently used first."""
        if self.bundle is not None:
            return [self.bundle]
        with self._lock:
            return list(self._programs.values())

    @property
    def denoiser(self) -> OptimizedDenoiser | None:
        """The most recently used program (None before the first call)."""
        programs = self.programs
        return programs[-1].denoiser if programs else None

    def state_dict(self, *args: Any, **kwargs: Any) -> dict:
        return self.original.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.original.load_state_dict(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> OptimizedComponent:
        """A stand-in for a deep copy of the model, with the same settings; programs are captured anew."""
        return OptimizedComponent(
            copy.deepcopy(self.original, memo),
            self.passes,
            self.calibration,
            self.policy,
            backend=self.backend,
            max_programs=self.max_programs,
            bundle=self.bundle,
        )

    @contextlib.contextmanager
    def cache_context(self, name: str, **context: Any):
        """diffusers' ``CacheMixin.cache_context``, which pipelines open around each denoiser call
        (with ``step_index``, ``sigma`` ... that the step program does not need): calls inside use
        the program's state stream ``name``."""
        if not isinstance(name, str) or not name:
            raise InputError(f"a cache context name is a non-empty string, found {name!r}")
        previous = getattr(self._local, "stream", None)
        self._local.stream = name
        try:
            yield
        finally:
            self._local.stream = previous

    @contextlib.contextmanager
    def pipeline_call(self):
        """One pipeline call: the model is fingerprinted once, and every program's streams start
        fresh inside and are released at the end (see the module docstring)."""
        if getattr(self._local, "scopes", None) is not None:  # a pipeline calling another: one run
            yield
            return
        self._local.fingerprint = model_fingerprint(self.original)
        with contextlib.ExitStack() as scopes:
            self._local.scopes, self._local.scoped = scopes, set()
            try:
                yield
            finally:
                self._local.scopes = self._local.scoped = self._local.fingerprint = None

    def _apply(self, fn, *args, **kwargs):
        with self._lock:
            self._programs.clear()  # moved or cast: capture again, on the new device / dtype, at the next call
        return super()._apply(fn, *args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.__signature__.bind(*args, **kwargs)
        bound.apply_defaults()  # every argument is part of the call key, defaults too
        arguments = dict(bound.arguments)
        return_dict = arguments.pop("return_dict", True)
        for name, parameter in self.__signature__.parameters.items():
            if parameter.kind == parameter.VAR_KEYWORD:  # **kwargs of forward: its entries are keyword arguments
                arguments.update(arguments.pop(name, {}))
        values = flatten_arguments(arguments)
        program = self._program_for(arguments, values)
        denoiser = program.denoiser
        scopes = getattr(self._local, "scopes", None)
        if scopes is not None and id(denoiser) not in self._local.scoped:
            scopes.enter_context(denoiser.run_scope())
            self._local.scoped.add(id(denoiser))
        stream = getattr(self._local, "stream", None)
        with denoiser.stream(stream) if stream is not None else contextlib.nullcontext():
            out = denoiser(*(values[name] for name in denoiser.program.signature.input_names))
        return program.output_type(sample=out) if return_dict else (out,)

    def _program_for(self, arguments: dict[str, Any], values: dict[str, Any]) -> CapturedProgram:
        if self.bundle is not None:
            signature = self.bundle.denoiser.program.signature
            check_static(self.bundle.call, values, signature, f"the bundle serving {type(self.original).__name__}")
            check_resolution(self.bundle.denoiser.program, values, str(self.bundle.denoiser.backend.directory))
            return self.bundle
        fingerprint = getattr(self._local, "fingerprint", None) or model_fingerprint(self.original)
        key = call_key(values)
        with self._lock:
            if fingerprint != self._fingerprint:
                if self._programs:
                    logger.info(
                        "diffopt: %s changed (modules, adapters or weights): dropping %d captured program(s)",
                        type(self.original).__name__,
                        len(self._programs),
                    )
                    self._programs.clear()
                self._fingerprint = fingerprint
            if key not in self._programs:
                key = fixed_batch_key(key, values) if fixed_batch_key(key, values) in self._programs else key
            program = self._programs.get(key)
            if program is not None:
                self._programs.move_to_end(key)
                return program
            latest = next(reversed(self._programs)) if self._programs else None
            program = self._capture(arguments, values, key, describe_change(latest, key))
            if program.fixed_batch:
                program.key = key = fixed_batch_key(key, values)
            self._programs[key] = program
            if len(self._programs) > self.max_programs:
                dropped = self._programs.popitem(last=False)[1]
                logger.info("diffopt: dropping the least recently used program (%s)", describe_change(key, dropped.key))
            return program

    def _capture(self, arguments: dict[str, Any], values: dict[str, Any], key: tuple, why: str) -> CapturedProgram:
        model_name = type(self.original).__name__
        logger.info("diffopt: capturing %s for a new call signature (%s)", model_name, why)
        start = time.perf_counter()
        stages = ["export", f"passes ({len(self.passes)})"]
        with _CAPTURE_LOCK, tqdm(total=len(stages), desc=f"diffopt: {model_name}", leave=False, disable=None) as bar:
            bar.set_postfix_str(stages[0])
            with torch.no_grad():
                output_type = type(self.original(**arguments, return_dict=True))
            graph, fixed_batch = _capture_any_batch(self.original, arguments)
            bar.update()
            bar.set_postfix_str(stages[1])
            denoiser = optimize(
                graph, self.passes, calibration=self.calibration, policy=self.policy, backend=self.backend
            )
            bar.update()
        seconds = time.perf_counter() - start
        records = ", ".join(f"{r.name}{'' if r.modified else ' (no change)'}" for r in denoiser.pass_records)
        logger.info(
            "diffopt: %s captured and optimized in %.1f s: variants %s%s",
            model_name,
            seconds,
            sorted(map(str, denoiser.program.variants)),
            f"; passes: {records}" if records else "",
        )
        batch = values[graph.signature.latent].shape[0]
        example = tuple(
            v[:1] if v.dim() > 0 and v.shape[0] == batch and not fixed_batch else v
            for v in (values[name] for name in graph.signature.input_names)
        )
        call = call_record(values, graph.signature, output_type)
        return CapturedProgram(key, denoiser, output_type, example, seconds, call, graph, fixed_batch)
