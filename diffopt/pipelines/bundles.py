"""Exported bundles inside pipelines: ``diffopt.export(pipe, dir)`` and ``enable(pipe, bundle=dir)``.

``export`` writes the program an enabled pipeline captured at its most recent call (the
arguments the pipeline really passes), optionally with other passes, as an ONNX bundle
(``export.onnx.to_onnx``). The manifest's ``call`` section records what capture baked in
besides the graph inputs: the non-tensor arguments (by ``repr``) and the model's output
class. ``bundle_program`` loads such a bundle on onnxruntime as the program of an
``OptimizedComponent``: the pipeline's denoiser then runs no model code, and a call whose
non-tensor arguments differ from the recorded ones is refused by name (tensor inputs are
checked by the bundle's input specs).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffopt.export.onnx import to_onnx
from diffopt.ir.signature import Signature
from diffopt.optimize import optimize
from diffopt.passes.base import GraphPass
from diffopt.runtime.bundle import Manifest
from diffopt.runtime.denoiser import InputError
from diffopt.runtime.onnxruntime_backend import load_bundle


def static_arguments(values: Mapping[str, Any], signature: Signature) -> dict[str, str]:
    """The call's values that are not graph inputs (flags, options, ``None``s), as ``repr``s."""
    inputs = set(signature.input_names)
    return {name: repr(value) for name, value in sorted(values.items()) if name not in inputs}


def call_record(values: Mapping[str, Any], signature: Signature, output_type: type) -> dict[str, Any]:
    """The manifest's ``call`` section for a program captured at a call with ``values``."""
    return {
        "static": static_arguments(values, signature),
        "output_type": f"{output_type.__module__}:{output_type.__qualname__}",
    }


def export_component(component, directory: str | Path, passes: Sequence[GraphPass] | None, **options) -> Manifest:
    """Export ``component``'s most recently used program (``diffopt.export``)."""
    programs = component.programs
    if not programs:
        raise ValueError(
            f"{type(component.original).__name__} has not been called yet: run the pipeline once with the "
            f"arguments to export (the bundle is captured from a real call), then export"
        )
    program = programs[-1]
    denoiser = program.denoiser
    if passes is not None:
        denoiser = optimize(program.graph, passes, calibration=component.calibration, policy=component.policy)
    if program.graph is None:
        raise ValueError("this pipeline runs an exported bundle: export from a pipeline enabled with passes instead")
    return to_onnx(denoiser, directory, call=program.call, **options)


def output_type_of(record: Mapping[str, Any], directory: Path) -> type:
    module, _, name = record["output_type"].partition(":")
    try:
        value = importlib.import_module(module)
        for part in name.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"bundle {directory}: its output type {record['output_type']!r} cannot be imported") from error
    return value


def check_static(record: Mapping[str, Any], values: Mapping[str, Any], signature: Signature, where: str) -> None:
    """Refuse a call whose non-tensor arguments differ from the ones the bundle was exported with."""
    found = static_arguments(values, signature)
    expected = record["static"]
    for name in sorted(expected.keys() | found.keys()):
        if expected.get(name) != found.get(name):
            raise InputError(
                f"{where} was exported for {name}={expected.get(name, '<absent>')} and is now called with "
                f"{name}={found.get(name, '<absent>')}: non-tensor arguments are part of an exported program; "
                f"export the bundle from a call with this setting"
            )


def load_for_pipeline(directory: str | Path, **options):
    """(denoiser on onnxruntime, the manifest's call record) of a bundle exported by ``diffopt.export``."""
    denoiser = load_bundle(directory, **options)
    record = denoiser.backend.manifest.call
    if record is None:
        raise ValueError(
            f"bundle {directory} was not exported from a pipeline (its manifest has no 'call' section): export it "
            f"with diffopt.export(pipe, directory) after a call of the enabled pipeline"
        )
    return denoiser, record
