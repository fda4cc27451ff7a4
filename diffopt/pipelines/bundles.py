"""Exported bundles inside pipelines: ``diffopt.export(pipe, dir)`` and ``enable(pipe, bundle=dir)``.

``export`` writes the program an enabled pipeline captured at its most recent call (the
arguments the pipeline really passes), optionally with other passes, as an ONNX bundle
(``export.onnx.to_onnx``). The manifest's ``call`` section records what capture baked in
besides the graph inputs: the non-tensor arguments (by ``repr``), the model's output class
and a fingerprint of the model's weights and config. ``load_for_pipeline`` loads such a
bundle on onnxruntime as the program of an ``OptimizedComponent``: the pipeline's denoiser
then runs no model code. Refused by name: a bundle exported from other weights than the
pipeline's (unless ``allow_other_weights``), a recorded output type that is not a dataclass
(``BaseOutput``), a call whose non-tensor arguments differ from the recorded ones, and a
call at another resolution (tensor inputs are checked by the bundle's input specs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from diffopt.export.onnx import to_onnx
from diffopt.ir.signature import Signature
from diffopt.optimize import optimize
from diffopt.passes.base import GraphPass
from diffopt.runtime.bundle import Manifest
from diffopt.runtime.denoiser import InputError
from diffopt.runtime.runtimes import load_bundle

logger = logging.getLogger("diffopt")


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
    call = {**program.call, "weights": weights_fingerprint(component.original)}
    return to_onnx(denoiser, directory, call=call, example_inputs=program.example, **options)


def weights_fingerprint(model) -> str:
    """SHA-256 of ``model``'s config and every parameter and buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(dict(config), sort_keys=True, default=repr).encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_weights(record: Mapping[str, Any], model, directory: Path, allow_other_weights: bool) -> None:
    """Refuse a bundle exported from other weights or config than ``model``'s."""
    recorded = record.get("weights")
    if recorded is None:
        logger.warning("diffopt: bundle %s records no weights fingerprint (exported by an older diffopt)", directory)
        return
    if not allow_other_weights and recorded != weights_fingerprint(model):
        raise ValueError(
            f"bundle {directory} was exported from other weights or config than this pipeline's "
            f"{type(model).__name__}: it would compute the exported model, not this one. Export a bundle from this "
            f"pipeline, or pass allow_other_weights=True if you mean to run it"
        )


def check_resolution(program, values: Mapping[str, Any], directory: str) -> None:
    """Refuse a call whose latent has another size than the one the bundle was exported at."""
    spec = program.inputs[0]
    latent = values[program.signature.latent]
    if tuple(latent.shape[1:]) != tuple(spec.shape[1:]):
        raise InputError(
            f"the bundle {directory} holds one resolution: latents of shape {list(spec.shape[1:])} per sample, and "
            f"this call's are {list(latent.shape[1:])}. Export another bundle for this resolution: call the enabled "
            f"pipeline once at it, then diffopt.export_pipeline(pipe, another_directory)"
        )


def output_type_of(record: Mapping[str, Any], directory: Path) -> type:
    """The model output class the manifest records: a dataclass (diffusers' ``BaseOutput``)."""
    recorded = record.get("output_type")
    module, _, name = recorded.partition(":") if isinstance(recorded, str) else ("", "", "")
    if not module or not name:
        raise ValueError(f"bundle {directory}: its output type is 'module:Class', found {recorded!r:.80}")
    try:
        value = importlib.import_module(module)
        for part in name.split("."):
            value = getattr(value, part)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"bundle {directory}: its output type {recorded!r} cannot be imported") from error
    if not (isinstance(value, type) and dataclasses.is_dataclass(value)):
        raise ValueError(
            f"bundle {directory}: its output type {recorded!r} is not a model output class (a dataclass such as "
            f"diffusers' Transformer2DModelOutput): the manifest was edited or is not diffopt's"
        )
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
    record = denoiser.bundle.manifest.call
    if record is None:
        raise ValueError(
            f"bundle {directory} was not exported from a pipeline (its manifest has no 'call' section): export it "
            f"with diffopt.export(pipe, directory) after a call of the enabled pipeline"
        )
    return denoiser, record
