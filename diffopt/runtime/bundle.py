"""The bundle manifest: everything a runtime needs to drive exported variants, as JSON.

A bundle is a directory: one ONNX file per step variant, one shared weights file, and
``manifest.json`` (signature, input and output tensors per variant, state spec,
schedule, export profile, quantization scales, noise-schedule config, diffopt version). ``Manifest.interface()``
rebuilds the step program's interface (no graphs), which is all ``OptimizedDenoiser``
and the samplers need; no model code is imported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffopt.ir.program import AnySchedule, ProgramInterface, StateEntry, StateSpec, schedule_from_dict
from diffopt.ir.signature import Signature

FORMAT = "diffopt-bundle"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: shape with ``"batch"`` where the batch size goes."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class VariantFile:
    file: str
    inputs: tuple[TensorSpec, ...]  # (latent, timestep, *conditions, *state)
    outputs: tuple[TensorSpec, ...]  # (out or signal, *new state)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantFile:
        return cls(
            data["file"],
            tuple(map(TensorSpec.from_dict, data["inputs"])),
            tuple(map(TensorSpec.from_dict, data["outputs"])),
        )


@dataclass(frozen=True)
class Manifest:
    signature: Signature
    state: StateSpec
    schedule: AnySchedule
    variants: dict[str, VariantFile]
    profile: str  # "onnxruntime" or "tensorrt"
    weights_file: str
    diffopt_version: str
    model_class: str = ""
    opset: int | None = None
    quantization: dict[str, Any] = field(default_factory=dict)  # quantized_ops.quantization_summary; {} without
    scheduler: dict[str, Any] | None = None  # the model's noise-schedule config (make_scheduler), if given

    def interface(self) -> ProgramInterface:
        """The step program's interface (signature, state, schedule) without graphs."""
        return ProgramInterface(self.signature, self.state, self.schedule, self.model_class)

    def save(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
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
            "variants": {name: v.to_dict() for name, v in self.variants.items()},
            "quantization": self.quantization,
            "scheduler": self.scheduler,
        }
        path.write_text(json.dumps(data, indent=2))
        return path

    @classmethod
    def load(cls, directory: Path | str) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} in {directory}: expected a bundle written by "
                f"diffopt.export.to_onnx (or `diffopt export`)"
            )
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, found "
                f"{data.get('format')!r} version {data.get('format_version')}; re-export the bundle "
                f"with this diffopt"
            )
        return cls(
            Signature.from_dict(data["signature"]),
            StateSpec(tuple(StateEntry.from_dict(e) for e in data["state"])),
            schedule_from_dict(data["schedule"]),
            {name: VariantFile.from_dict(v) for name, v in data["variants"].items()},
            data["profile"],
            data["weights_file"],
            data["diffopt_version"],
            data["model_class"],
            data["opset"],
            data["quantization"],
            data["scheduler"],
        )
