"""Backends execute one variant of a step program: ``run(variant, inputs) -> outputs``.

``inputs`` are ``(latent, timestep, *conditions, *state)`` and outputs
``(out, *new_state)``, exactly the variant signature, so every backend is interchangeable
under ``OptimizedDenoiser`` and the samplers. ``Backend`` is everything the code uses of one;
a backend class joins the registry with ``@register_backend`` (its module in
``diffopt.runtime`` is found and imported by ``registered_backends``), and ``optimize``,
``enable``, bench files and the CLI accept its name: adding a backend is one file.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import fx

from diffopt.ir.modules import import_package
from diffopt.ir.program import StepProgram


class Backend(Protocol):
    name: ClassVar[str]  # the registry name
    runs: ClassVar[Literal["program", "bundle"]]  # built from a StepProgram (optimize) or a bundle directory

    @property
    def device(self) -> torch.device:
        """Where inputs, outputs and state live."""

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants it can run."""

    @property
    def manifest(self) -> Any:
        """The bundle's ``Manifest`` (``runtime.bundle``), or None for a backend over graphs."""

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run one variant on flat inputs; return its flat outputs."""

    @classmethod
    def for_program(cls, program: StepProgram, like: Backend) -> Backend:
        """A backend of this kind, with ``like``'s options, for another program (e.g. placed
        elsewhere); a bundle's backend raises ``TypeError`` (its graphs are files)."""


BACKENDS: dict[str, type] = {}


def register_backend(cls: type) -> type:
    """Class decorator: ``cls`` (a ``Backend``) is known by ``cls.name``."""
    if not isinstance(getattr(cls, "name", None), str) or getattr(cls, "runs", None) not in ("program", "bundle"):
        raise TypeError(f"register_backend: {cls!r} needs a str `name` and `runs` = 'program' or 'bundle'")
    BACKENDS[cls.name] = cls
    return cls


def registered_backends() -> dict[str, type]:
    """Every registered backend by name (each module of ``diffopt.runtime`` imported first)."""
    import_package("diffopt.runtime")
    return dict(BACKENDS)


def program_backend(name: str, where: str) -> type:
    """The backend class ``name`` that runs a ``StepProgram``; a ``ValueError`` naming ``where``
    and the choices otherwise (a bundle backend says how to get there)."""
    known = registered_backends()
    choices = sorted(n for n, cls in known.items() if cls.runs == "program")
    if name not in known:
        raise ValueError(f"{where}: backend must be one of {choices}, found {name!r}")
    if known[name].runs != "program":
        raise ValueError(
            f"{where}: the {name!r} backend runs exported bundles: export the program (diffopt.export.to_onnx, "
            f"or `diffopt export`) and load the bundle; backends for a program: {choices}"
        )
    return known[name]


@register_backend
class TorchBackend:
    """Runs the variants' fx graphs eagerly in torch (no autograd).

    State a variant leaves unchanged is carried without a copy: the program returns
    ``clone(state_input)`` (no output may alias an input, which runtimes that bind
    buffers rely on), but torch tensors are never written in place here, so this backend
    runs a private copy of each graph whose unchanged state outputs are the inputs
    themselves. A calibrated ICC step of dit-digits thereby skips 72 tensor copies.
    """

    name: ClassVar[str] = "torch"
    runs: ClassVar[str] = "program"
    manifest = None

    def __init__(self, program: StepProgram):
        self.program = program
        self.modules = {name: _carrying_unchanged_state(module) for name, module in program.variants.items()}

    @property
    def device(self) -> torch.device:
        return self.program.device

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(self.program.variants)

    @classmethod
    def for_program(cls, program: StepProgram, like: TorchBackend) -> TorchBackend:
        """A backend of this kind, with ``like``'s options, for another program (e.g. placed elsewhere)."""
        return cls(program)

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(self.modules[variant](*inputs))


def _carrying_unchanged_state(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``module`` in which every output ``clone(placeholder)`` is the placeholder."""
    graph = copy.deepcopy(module.graph)
    output = graph.output_node()
    values = [value.args[0] if _is_input_copy(value) else value for value in output.args[0]]
    if values == list(output.args[0]):
        return module
    output.args = (tuple(values),)
    graph.eliminate_dead_code()
    return fx.GraphModule(module, graph)


def _is_input_copy(value) -> bool:
    return (
        isinstance(value, fx.Node)
        and value.target == torch.ops.aten.clone.default
        and value.args[0].op == "placeholder"
        and not value.kwargs.get("memory_format")
    )
