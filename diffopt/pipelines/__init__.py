"""Drop-in use inside diffusers pipelines: ``pipe = diffopt.enable(pipe, passes=[...])``.

``enable`` puts an ``OptimizedComponent`` (``pipelines.component``) where the pipeline's
denoiser (``transformer`` or ``unet``) was, without touching the pipeline's config, and
gives the pipeline object a subclass of its own class (same name) whose ``__call__`` marks
each pipeline call as one run of every stream, and whose ``save_pretrained`` saves the
original model. Pass settings are checked against the model's modules right away
(``pipelines.checks``). ``disable(pipe)`` puts the original model and class back;
``summary(pipe)`` reports what the caches did (``pipelines.report``); ``tune(pipe, calls,
min_psnr=...)`` finds the cheapest pass list over a quality floor (``pipelines.tuning``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from diffopt.ir.policy import LayerPolicy
from diffopt.ir.statistics import CalibrationStatistics
from diffopt.passes.base import GraphPass, pass_list
from diffopt.pipelines.bundles import check_weights, export_component, load_for_pipeline, output_type_of
from diffopt.pipelines.checks import check_family, check_passes_fit
from diffopt.pipelines.component import MAX_PROGRAMS, CapturedProgram, OptimizedComponent
from diffopt.pipelines.report import Summary, summarize
from diffopt.pipelines.tuning import tune
from diffopt.runtime.backends import program_backend
from diffopt.runtime.bundle import Manifest

DENOISER_NAMES = ("transformer", "unet")

__all__ = ["CapturedProgram", "OptimizedComponent", "Summary", "disable", "enable", "export", "summary", "tune"]


def _denoiser_name(pipe: Any) -> str:
    for name in DENOISER_NAMES:
        if isinstance(getattr(pipe, name, None), torch.nn.Module):
            return name
    raise ValueError(
        f"{type(pipe).__name__} has no denoiser: expected a module at pipe.{' or pipe.'.join(DENOISER_NAMES)}"
    )


def _components(pipe: Any) -> list[OptimizedComponent]:
    return [c for c in (getattr(pipe, name, None) for name in DENOISER_NAMES) if isinstance(c, OptimizedComponent)]


@contextlib.contextmanager
def _originals_in_place(pipe: Any) -> Iterator[None]:
    """The original models in the pipeline's attributes for a while (its config never changed)."""
    swapped = [(n, c) for n in DENOISER_NAMES if isinstance(c := getattr(pipe, n, None), OptimizedComponent)]
    for name, component in swapped:
        object.__setattr__(pipe, name, component.original)
    try:
        yield
    finally:
        for name, component in swapped:
            object.__setattr__(pipe, name, component)


_ENABLED_CLASSES: dict[type, type] = {}


def _enabled_class(cls: type) -> type:
    """``cls`` with a ``__call__`` that runs in each component's ``pipeline_call`` and a
    ``save_pretrained`` that saves the original models; same name and module as ``cls``."""
    if cls in _ENABLED_CLASSES.values():
        return cls
    if cls not in _ENABLED_CLASSES:

        @functools.wraps(cls.__call__)
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with contextlib.ExitStack() as calls:
                for component in _components(self):
                    calls.enter_context(component.pipeline_call())
                return cls.__call__(self, *args, **kwargs)

        def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
            with _originals_in_place(self):
                return cls.save_pretrained(self, *args, **kwargs)

        namespace = {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        if hasattr(cls, "save_pretrained"):
            namespace["save_pretrained"] = functools.wraps(cls.save_pretrained)(save_pretrained)
        _ENABLED_CLASSES[cls] = type(cls.__name__, (cls,), namespace)
    return _ENABLED_CLASSES[cls]


def _plain_class(cls: type) -> type:
    return next((plain for plain, enabled in _ENABLED_CLASSES.items() if enabled is cls), cls)


def enable(
    pipe: Any,
    passes: Sequence[GraphPass] = (),
    *,
    bundle: str | os.PathLike | None = None,
    calibration: CalibrationStatistics | None = None,
    policy: LayerPolicy | None = None,
    backend: str = "torch",
    max_programs: int = MAX_PROGRAMS,
    threads: int | None = None,
    allow_other_weights: bool = False,
) -> Any:
    """Run ``pipe``'s denoiser as diffopt programs with ``passes`` on ``backend`` (``"torch"``
    or ``"compiled"``); returns ``pipe``. Pass settings that cannot fit the model are refused
    here, naming the pass; programs are captured at the calls that need them.

    ``bundle=DIR`` runs a bundle written by ``export`` on onnxruntime (``threads`` for its
    sessions) instead of capturing: the denoiser runs no model code, and a call whose
    non-tensor arguments differ from the exported call's is refused by name. A bundle exported
    from other weights or config than the pipeline's denoiser is refused unless
    ``allow_other_weights=True``.

    A pipeline built from an enabled one's components (``from_pipe``, ``Img2ImgPipeline(
    **pipe.components)``) already holds the ``OptimizedComponent``: ``enable(new_pipe)``
    without settings gives it run boundaries too, sharing the component's programs."""
    name = _denoiser_name(pipe)
    model = getattr(pipe, name)
    if isinstance(model, OptimizedComponent):
        settings = (pass_list(passes), bundle, calibration, policy, backend, max_programs)
        if type(pipe) in _ENABLED_CLASSES.values() or settings != ((), None, None, None, "torch", MAX_PROGRAMS):
            raise ValueError(
                f"diffopt is already enabled on {type(pipe).__name__}.{name}: call diffopt.disable(pipe) first"
            )
        pipe.__class__ = _enabled_class(type(pipe))  # a pipeline made from an enabled one's components: share it
        return pipe
    program_backend(backend, "enable()")
    passes = pass_list(passes)
    check_family(model)
    check_passes_fit(model, passes)
    served = None
    if bundle is not None:
        if passes or calibration is not None or policy is not None:
            raise ValueError("enable(bundle=...): the bundle's passes were applied at export; pass no passes")
        denoiser, record = load_for_pipeline(bundle, threads=threads)
        check_weights(record, model, Path(bundle), allow_other_weights)
        served = CapturedProgram(None, denoiser, output_type_of(record, Path(bundle)), (), 0.0, record)
    component = OptimizedComponent(
        model, passes, calibration, policy, backend=backend, max_programs=max_programs, bundle=served
    )
    object.__setattr__(pipe, name, component)  # not the pipeline's __setattr__: its config keeps the model's class
    pipe.__class__ = _enabled_class(type(pipe))
    return pipe


def disable(pipe: Any) -> Any:
    """Put back the original denoiser and pipeline class ``enable`` replaced; returns ``pipe``."""
    name = _denoiser_name(pipe)
    component = getattr(pipe, name)
    if not isinstance(component, OptimizedComponent):
        raise ValueError(f"diffopt is not enabled on {type(pipe).__name__}.{name}")
    object.__setattr__(pipe, name, component.original)
    if not _components(pipe):
        pipe.__class__ = _plain_class(type(pipe))
    return pipe


def export(
    pipe: Any, directory: str | os.PathLike, passes: Sequence[GraphPass] | None = None, **options: Any
) -> Manifest:
    """Export the denoiser program an enabled pipeline captured at its most recent call (the
    arguments it really passes) as an ONNX bundle in ``directory``: with the passes it was
    enabled with, or ``passes``. ``options`` go to ``export.onnx.to_onnx`` (``profile``, ``precision``,
    ``scheduler_config``). Run it with ``enable(pipe, bundle=directory)``."""
    components = _components(pipe)
    if not components:
        raise ValueError(f"diffopt is not enabled on {type(pipe).__name__}: enable it and run it once, then export")
    return export_component(components[0], directory, passes, **options)


def summary(pipe_or_component: Any) -> Summary:
    """What the caches did in the recent runs of an enabled pipeline (or an ``OptimizedComponent``):
    per program, run and stream, the variant of each step, their counts and the work saved."""
    if isinstance(pipe_or_component, OptimizedComponent):
        return summarize(pipe_or_component)
    components = _components(pipe_or_component)
    if not components:
        raise ValueError(f"diffopt is not enabled on {type(pipe_or_component).__name__}: nothing to summarize")
    return summarize(components[0])
