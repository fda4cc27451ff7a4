"""What ``diffopt bench`` and ``diffopt tune`` measure: a ``Workload`` runs ``Configuration``s.

A configuration is a pass list (pass-file dicts, ``passes.registry``) on a backend at a step
count, the unmodified model (``passes=None``), or a baseline from another library
(``baseline={"kind": ...}``, where the workload knows it). With ``bundle={"runtime": ...,
"precision": ...}`` the pass list's program is exported (``to_onnx`` in that precision) and
its bundle runs on that bundle runtime: precision and runtime are one more axis. A workload is one model with the
inputs it is judged on: a shipped digits model with seeded noise and class labels
(``evaluation.workload.DigitsWorkload``), or a diffusers pipeline with the user's calls
(``pipelines.workload.PipelineWorkload``). Each run returns its outputs and its work (MACs
counted while it ran, in whatever unit the workload counts; bench and tune only use ratios
of work on the same inputs). Scoring, timing, validating and choosing are
``measure.tuning``'s, one implementation for every workload.

Inputs come in four sets, named by their role: ``scoring`` (what candidates are ranked on),
``held-out`` (what a choice is validated on: noise or seeds no scoring run draws), ``plan``
(what a plan search measures each plan on: the scoring inputs or a few of them) and ``fit``
(what a learned predictor is fitted on).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

from diffopt.measure.fidelity import psnr
from diffopt.passes.registry import pass_from_dict
from diffopt.runtime.backends import program_backend
from diffopt.runtime.bundle import PRECISIONS
from diffopt.util.validation import require_int

INPUTS = ("scoring", "held-out", "plan", "fit")


@dataclass(frozen=True)
class Configuration:
    """One thing to run: ``passes`` (None: the unmodified model; ``()``: the captured graph,
    no passes) on ``backend`` at ``steps`` (None: the reference's), or exported as a
    ``bundle`` (``{"runtime": name, "precision": one of PRECISIONS}``, both optional), or
    another library's ``baseline``; ``family`` groups rows in plots."""

    name: str
    passes: tuple[dict, ...] | None = None
    steps: int | None = None
    backend: str = "torch"
    baseline: dict | None = None
    family: str = ""
    bundle: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a configuration's name is a non-empty string, found {self.name!r}")
        if self.steps is not None:
            require_int(f"configuration {self.name!r}", "steps", self.steps, minimum=1)
        if self.passes is not None and not (
            isinstance(self.passes, (list, tuple)) and all(isinstance(p, dict) for p in self.passes)
        ):
            raise ValueError(
                f"configuration {self.name!r}: passes is a list of pass objects, found {self.passes!r:.80}"
            )
        if self.baseline is not None and not isinstance(self.baseline, dict):
            raise ValueError(f"configuration {self.name!r}: baseline is an object, found {self.baseline!r:.80}")
        if not isinstance(self.family, str):
            raise ValueError(f"configuration {self.name!r}: family is a string, found {self.family!r:.80}")
        program_backend(self.backend, f"configuration {self.name!r}")
        if self.baseline is not None and self.passes is not None:
            raise ValueError(f"configuration {self.name!r}: a baseline has no passes, found {self.passes!r:.80}")
        if self.bundle is not None:
            self._check_bundle()
        if self.passes is not None:
            object.__setattr__(self, "passes", tuple(self.passes))
            for item in self.passes:
                pass_from_dict(item)  # an unknown pass or option fails here, naming it

    def _check_bundle(self) -> None:
        from diffopt.runtime.runtimes import registered_runtimes

        where = f"configuration {self.name!r}: bundle"
        if not isinstance(self.bundle, dict) or set(self.bundle) - {"runtime", "precision"}:
            raise ValueError(f"{where} is an object with 'runtime' and 'precision', found {self.bundle!r:.80}")
        if self.passes is None:
            raise ValueError(f"{where} exports a program: give passes ([] for the captured graph)")
        runtimes = sorted(registered_runtimes())
        if self.bundle.get("runtime", "onnxruntime") not in runtimes:
            raise ValueError(f"{where}.runtime must be one of {runtimes}, found {self.bundle['runtime']!r:.40}")
        if self.bundle.get("precision", "fp32") not in PRECISIONS:
            raise ValueError(f"{where}.precision must be one of {PRECISIONS}, found {self.bundle['precision']!r:.40}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Configuration:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or "name" not in data or set(data) - known:
            raise ValueError(f"a configuration is an object with a name and fields among {sorted(known)}: {data!r}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passes"] = None if self.passes is None else list(self.passes)
        return data

    def for_reference(self, steps: int) -> Configuration:
        """This configuration, sampling ``steps`` steps when it names none."""
        return self if self.steps is not None else dataclasses.replace(self, steps=steps)

    @property
    def needs_calibration(self) -> bool:
        """Whether its passes, or its bundle's precision (``int8-static``), read calibration statistics."""
        static = (self.bundle or {}).get("precision") == "int8-static"
        return static or any(pass_from_dict(item).needs_calibration for item in self.passes or ())

    @classmethod
    def of_row(cls, row: dict) -> Configuration:
        """The configuration a scored row (``to_dict`` plus its scores) was made from."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({key: value for key, value in row.items() if key in fields})


class Run(NamedTuple):
    """A run's outputs (one float tensor) and its work."""

    outputs: torch.Tensor
    work: float


class Workload(ABC):
    """One model and the inputs bench and tune judge it on (module docstring)."""

    name: str  # what results call it
    reference_steps: int  # the steps of the plain reference run

    @abstractmethod
    def graph(self) -> torch.fx.GraphModule:
        """The captured denoiser, whose blocks the default search space walks."""

    @abstractmethod
    def run(self, configuration: Configuration, inputs: str) -> Run:
        """``configuration``'s run on the inputs of role ``inputs`` (one of ``INPUTS``).
        Raises ``PassError``, ``CaptureError`` or ``ValueError`` when it does not fit."""

    @abstractmethod
    def timers(self, configurations: Sequence[Configuration]) -> dict[str, Callable[[int], Any]]:
        """Per configuration name, one timed run (given the round's index) of the timing inputs."""

    def unavailable(self, configuration: Configuration) -> str | None:
        """Why ``configuration`` cannot run here before trying it (None: it may)."""
        return None

    def quality(self, outputs: torch.Tensor, reference: torch.Tensor) -> float:
        """PSNR of ``outputs`` against ``reference`` (the workload's data range)."""
        return psnr(outputs, reference)

    def metrics(self, outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        """Bench's further columns for a run of the scoring inputs (none by default)."""
        return {}

    def learned(self, row: dict) -> Configuration | None:
        """``row``'s cache with a learned predictor fitted on the ``fit`` inputs; None where
        the workload cannot fit one or ``row`` has no fixed plan."""
        return None

    def description(self) -> dict[str, Any]:
        """Summary fields naming the inputs (``scored_on``, ``validated_on``, ...)."""
        return {}
