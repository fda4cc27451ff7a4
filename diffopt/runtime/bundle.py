"""The bundle format: everything a runtime needs to drive exported variants, checked on load.

A bundle is a directory: one ONNX file per step variant, one shared weights file,
``manifest.json`` (signature, input and output tensors per variant, state spec,
schedule, export profile, quantization scales, noise-schedule config, diffopt version)
and ``SHA256SUMS`` (the sha256 of every other file, written last at export).
``Manifest.interface()`` rebuilds the step program's interface (no graphs), which is all
``OptimizedDenoiser`` and the samplers need; no model code is imported.

``Manifest.load`` verifies the checksums (``verify_checksums=False`` skips hashing for
huge bundles) and that each graph file and the weights are the ones the manifest was
written for (their sha256 is in the manifest too, so graph files swapped between
variants are refused even with a re-summed ``SHA256SUMS``), refuses symbolic links,
then the manifest's schema (format, version, every field's type) and its consistency (the
schedule's variants exist; every variant file declares the signature's inputs and the
state entries, in order, with their shapes and dtypes). Every failure is a
``BundleError`` naming the bundle, the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffopt.ir.noise_schedule import check_scheduler_config
from diffopt.ir.program import ProgramInterface
from diffopt.ir.schedules import BaseSchedule, schedule_from_dict
from diffopt.ir.signature import Signature
from diffopt.ir.specs import StateEntry, StateSpec, TensorSpec
from diffopt.util.files import read_json

FORMAT = "diffopt-bundle"
FORMAT_VERSION = 3  # 3: the manifest holds each graph file's and the weights' sha256
MANIFEST_NAME = "manifest.json"
CHECKSUMS_NAME = "SHA256SUMS"
PROFILES = ("onnxruntime", "tensorrt")
# fp32: float32 graphs. bf16: float32 graphs that OpenVINO runs at bfloat16 inference precision
# (onnxruntime runs them in float32). int8-dynamic: onnxruntime's dynamic quantization (int8
# weights per channel, activations quantized at run time) of each variant's matrix products.
# int8-static: Q/DQ graphs with fixed calibrated activation scales and int8 weights per channel.
PRECISIONS = ("fp32", "bf16", "int8-dynamic", "int8-static")


class BundleError(ValueError):
    """A bundle is corrupt or inconsistent; the message names the bundle, the file and the field."""


@dataclass(frozen=True)
class VariantFile:
    file: str
    inputs: tuple[TensorSpec, ...]  # (latent, timestep, *conditions, *state)
    outputs: tuple[TensorSpec, ...]  # (out or signal, *new state)
    sha256: str  # of ``file``: ties the graph to its variant (a swapped file is refused)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantFile:
        file = data["file"]
        if not isinstance(file, str) or Path(file).name != file:
            raise ValueError(f"file must be a plain file name inside the bundle, found {file!r}")
        return cls(
            file,
            tuple(map(TensorSpec.from_dict, data["inputs"])),
            tuple(map(TensorSpec.from_dict, data["outputs"])),
            _digest(data["sha256"]),
        )


def _digest(value: Any) -> str:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, found {value!r:.80}")
    return value


@dataclass(frozen=True)
class Manifest:
    signature: Signature
    state: StateSpec
    schedule: BaseSchedule
    variants: dict[str, VariantFile]
    profile: str  # "onnxruntime" or "tensorrt"
    weights_file: str
    weights_sha256: str
    diffopt_version: str
    model_class: str = ""
    opset: int | None = None
    quantization: dict[str, Any] = field(default_factory=dict)  # quant.ops.quantization_summary; {} without
    scheduler: dict[str, Any] | None = None  # the model's noise-schedule config (make_scheduler), if given
    call: dict[str, Any] | None = None  # exported from a pipeline: its non-tensor arguments and output type
    precision: str = "fp32"  # one of PRECISIONS: what the variant files compute in

    def interface(self) -> ProgramInterface:
        """The step program's interface (signature, inputs, state, schedule) without graphs."""
        inputs = next(iter(self.variants.values())).inputs[: len(self.signature.input_names)]
        return ProgramInterface(self.signature, inputs, self.state, self.schedule, self.model_class)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the bundle consists of, checksums last."""
        return (*(v.file for v in self.variants.values()), self.weights_file, MANIFEST_NAME, CHECKSUMS_NAME)

    def save(self, directory: Path) -> Path:
        """Write ``manifest.json``, then ``SHA256SUMS`` over every file of the bundle."""
        directory = Path(directory)
        data = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "diffopt_version": self.diffopt_version,
            "profile": self.profile,
            "model_class": self.model_class,
            "opset": self.opset,
            "signature": self.signature.to_dict(),
            "state": self.state.to_list(),
            "schedule": self.schedule.to_dict(),
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "variants": {str(name): v.to_dict() for name, v in self.variants.items()},
            "quantization": self.quantization,
            "scheduler": self.scheduler,
            "call": self.call,
            "precision": self.precision,
        }
        (directory / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
        sums = "".join(f"{sha256_of(directory / name)}  {name}\n" for name in self.files[:-1])
        (directory / CHECKSUMS_NAME).write_text(sums)
        return directory / MANIFEST_NAME

    @classmethod
    def load(cls, directory: Path | str, *, verify_checksums: bool = True) -> Manifest:
        from diffopt.runtime.bundle_writing import recover_interrupted_swap

        directory = Path(directory)
        recover_interrupted_swap(directory)
        path = directory / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} in {directory}: expected a bundle written by "
                f"diffopt.export.to_onnx (or `diffopt export`)"
            )
        listed = _read_checksums(directory) if verify_checksums else None
        try:
            data = read_json(path, "a bundle manifest")
        except ValueError as error:
            raise BundleError(f"bundle {directory}: {error}") from None
        manifest = _parse(path, data)
        linked = [name for name in manifest.files if (directory / name).is_symlink()]
        if linked:
            raise BundleError(
                f"bundle {directory}: {linked} are symbolic links; a bundle holds its own files (copy them in)"
            )
        if listed is not None:
            missing = sorted(set(manifest.files[:-1]) - set(listed))
            if missing:
                raise BundleError(f"bundle {directory}: {CHECKSUMS_NAME} does not list {missing}; re-export the bundle")
            owned = [(f"variants.{name}", v.file, v.sha256) for name, v in manifest.variants.items()]
            for field_name, file, digest in [
                *owned,
                ("weights_sha256", manifest.weights_file, manifest.weights_sha256),
            ]:
                if listed[file] != digest:
                    raise BundleError(
                        f"bundle {directory}: {file} is not the file {MANIFEST_NAME} field {field_name!r} was exported "
                        f"with (sha256 {listed[file][:16]}..., expected {digest[:16]}...): graph files were swapped "
                        f"or replaced; re-export the bundle"
                    )
        return manifest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_checksums(directory: Path) -> dict[str, str]:
    """Verify every file ``SHA256SUMS`` lists; return name -> sha256."""
    path = directory / CHECKSUMS_NAME
    if not path.exists():
        raise BundleError(
            f"bundle {directory}: no {CHECKSUMS_NAME} (bundles from diffopt before format version "
            f"{FORMAT_VERSION}, or an interrupted export): re-export it, or load with verify_checksums=False"
        )
    listed = {}
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise BundleError(f"bundle {directory}: {CHECKSUMS_NAME} is not text ({error})") from error
    for number, line in enumerate(lines, 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or Path(name).name != name:
            raise BundleError(f"bundle {directory}: {CHECKSUMS_NAME} line {number} is not '<sha256>  <file>': {line!r}")
        listed[name] = digest
    if MANIFEST_NAME not in listed:
        raise BundleError(f"bundle {directory}: {CHECKSUMS_NAME} does not list {MANIFEST_NAME}")
    for name, digest in listed.items():
        if (directory / name).is_symlink():
            raise BundleError(f"bundle {directory}: {name} is a symbolic link; a bundle holds its own files")
        if not (directory / name).is_file():
            raise BundleError(f"bundle {directory}: {name} is missing (listed in {CHECKSUMS_NAME})")
        found = sha256_of(directory / name)
        if found != digest:
            raise BundleError(
                f"bundle {directory}: {name} changed after export (sha256 {found[:16]}..., expected "
                f"{digest[:16]}...): the file is corrupt or was edited; re-export the bundle"
            )
    return listed


def _field(path: Path, data: dict, key: str, kind: type | tuple[type, ...], parse: Callable | None = None):
    """``data[key]`` checked against ``kind`` (and parsed), or a ``BundleError`` naming the field."""
    where = f"bundle {path.parent}: {path.name}: field {key!r}"
    if key not in data:
        raise BundleError(f"{where} is missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BundleError(f"{where}: expected {names}, found {type(value).__name__} {value!r:.80}")
    if parse is None:
        return value
    try:
        return parse(value)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise BundleError(f"{where}: {type(error).__name__}: {error}") from error


def _parse(path: Path, data: Any) -> Manifest:
    if not isinstance(data, dict):
        raise BundleError(f"bundle {path.parent}: {path.name} must hold a JSON object, found {type(data).__name__}")
    format_name = _field(path, data, "format", str)
    version = _field(path, data, "format_version", int)
    if format_name != FORMAT or version != FORMAT_VERSION:
        raise BundleError(
            f"bundle {path.parent}: {path.name}: expected format {FORMAT!r} version {FORMAT_VERSION}, found "
            f"{format_name!r} version {version}; re-export the bundle with this diffopt"
        )
    profile = _field(path, data, "profile", str)
    if profile not in PROFILES:
        raise BundleError(
            f"bundle {path.parent}: {path.name}: field 'profile': expected one of {PROFILES}, found {profile!r}"
        )
    manifest = Manifest(
        signature=_field(path, data, "signature", dict, Signature.from_dict),
        state=_field(path, data, "state", list, lambda v: StateSpec(tuple(StateEntry.from_dict(e) for e in v))),
        schedule=_field(path, data, "schedule", dict, schedule_from_dict),
        variants=_field(path, data, "variants", dict, lambda v: {k: VariantFile.from_dict(f) for k, f in v.items()}),
        profile=profile,
        weights_file=_field(path, data, "weights_file", str),
        weights_sha256=_field(path, data, "weights_sha256", str, _digest),
        diffopt_version=_field(path, data, "diffopt_version", str),
        model_class=_field(path, data, "model_class", str),
        opset=_field(path, data, "opset", (int, type(None))),
        quantization=_field(path, data, "quantization", dict),
        scheduler=_field(path, data, "scheduler", (dict, type(None)), _checked_scheduler_config),
        call=_field(path, data, "call", (dict, type(None)), _checked_call),
        precision=_field(path, {"precision": "fp32", **data}, "precision", str, _checked_precision),
    )
    _check_consistency(path, manifest)
    return manifest


CALL_FIELDS = {"static", "output_type", "weights"}


def _checked_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"expected one of {PRECISIONS}, found {precision!r:.40}")
    return precision


def _checked_call(call: dict | None) -> dict | None:
    """A pipeline call's record: ``static`` (argument name -> repr), ``output_type``
    ("module:Class") and, from bundles that record it, ``weights`` (the source model's
    SHA-256 fingerprint, ``pipelines.bundles.weights_fingerprint``)."""
    if call is None:
        return None
    static, output_type = call["static"], call["output_type"]
    if not isinstance(static, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in static.items()):
        raise ValueError(f"call.static must map argument names to strings, found {static!r:.80}")
    if not isinstance(output_type, str) or ":" not in output_type or not set(call) <= CALL_FIELDS:
        raise ValueError(
            f"call holds 'static', an 'output_type' as 'module:Class' and a 'weights' fingerprint, found {call!r:.80}"
        )
    weights = call.get("weights")
    if weights is not None and not (isinstance(weights, str) and re.fullmatch(r"[0-9a-f]{64}", weights)):
        raise ValueError(f"call.weights is a SHA-256 hex digest, found {weights!r:.80}")
    return call


def _checked_scheduler_config(config: dict | None) -> dict | None:
    """The noise-schedule config, refused unless it is one (``ir.noise_schedule``)."""
    if config is not None:
        check_scheduler_config(config)
    return config


def _check_consistency(path: Path, manifest: Manifest) -> None:
    """The schedule's variants exist; every variant file declares the model inputs and the
    state entries (in order, same shapes and dtypes) and returns one value plus the state."""
    where = f"bundle {path.parent}: {path.name}"
    if not manifest.variants:
        raise BundleError(f"{where}: field 'variants' is empty")
    missing = [name for name in manifest.schedule.variants if name not in manifest.variants]
    if missing:
        raise BundleError(f"{where}: field 'schedule' uses variants {missing} that field 'variants' does not have")
    num_inputs = len(manifest.signature.input_names)
    state = [entry.spec for entry in manifest.state.entries]
    for entry in manifest.state.entries:
        try:
            entry.shape_for(1)
        except (TypeError, ValueError) as error:
            raise BundleError(f"{where}: field 'state': entry {entry.name!r} has shape {entry.shape}") from error
    reference = next(iter(manifest.variants.values())).inputs[:num_inputs]
    for name, variant in manifest.variants.items():
        field_name = f"variants.{name}"
        names = [spec.name for spec in variant.inputs[:num_inputs]]
        if names != list(manifest.signature.input_names) or tuple(variant.inputs[:num_inputs]) != reference:
            raise BundleError(
                f"{where}: field {field_name}.inputs: model inputs {names} disagree with the signature "
                f"{list(manifest.signature.input_names)} or with the other variants"
            )
        for kind, specs in (("inputs", variant.inputs[num_inputs:]), ("outputs", variant.outputs[1:])):
            declared = [(s.shape, s.dtype) for s in specs]
            expected = [(tuple(s.shape), s.dtype) for s in state]
            if [(tuple(shape), dtype) for shape, dtype in declared] != expected:
                raise BundleError(
                    f"{where}: field {field_name}.{kind}: state tensors {declared} disagree with field "
                    f"'state' {expected}"
                )
        if len(variant.outputs) != 1 + len(state):
            raise BundleError(f"{where}: field {field_name}.outputs: expected 1 + {len(state)} outputs")
