"""Executors run one variant of a step program: ``run(variant, inputs) -> outputs``.

``inputs`` are ``(latent, timestep, *conditions, *state)`` and outputs
``(out, *new_state)``, exactly the variant signature, so every executor is interchangeable
under ``OptimizedDenoiser`` and the samplers. ``Executor`` is everything they use of one.
Two kinds make executors, each with its own registry and factory:
- a program backend (``ProgramBackend``, here) is built from a ``StepProgram``'s graphs:
  ``@register_backend``, named by ``optimize``, ``enable``, bench files and the CLI;
- a bundle runtime (``runtime.runtimes``) opens an exported bundle's files:
  ``@register_runtime``, named by ``load_bundle(directory, runtime=...)``.
Each registry imports diffopt's ``runtime`` modules and the plugins (``util.plugins``) before a
name is looked up: adding either is one file.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch
from torch import fx

from diffopt.ir.program import StepProgram
from diffopt.util.plugins import import_package, register_named


class Executor(Protocol):
    """Runs the variants of one program (its graphs, or a bundle's files)."""

    @property
    def device(self) -> torch.device:
        """Where inputs, outputs and state live."""

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants it can run."""

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Run one variant on flat inputs; return its flat outputs."""


class ProgramBackend(Executor, Protocol):
    """An executor built from a ``StepProgram`` (``cls(program)``)."""

    name: ClassVar[str]  # the registry name

    @classmethod
    def for_program(cls, program: StepProgram, like: ProgramBackend) -> ProgramBackend:
        """A backend of this kind, with ``like``'s options, for another program (e.g. placed elsewhere)."""


BACKENDS: dict[str, type] = {}


def register_backend(cls: type) -> type:
    """Class decorator: ``cls`` (a ``ProgramBackend``) is known by ``cls.name``."""
    return register_named(BACKENDS, cls, "register_backend", ("for_program",))


def registered_backends() -> dict[str, type]:
    """Every registered program backend by name (diffopt's ``runtime`` modules and the plugins imported first)."""
    import_package("diffopt.runtime")
    return dict(BACKENDS)


def program_backend(name: str, where: str) -> type:
    """The backend class ``name`` that runs a ``StepProgram``; a ``ValueError`` naming ``where``
    and the choices otherwise (a bundle runtime's name says how to get there)."""
    from diffopt.runtime.runtimes import registered_runtimes

    known = registered_backends()
    if name in known:
        return known[name]
    if name in registered_runtimes():
        raise ValueError(
            f"{where}: {name!r} is a bundle runtime: export the program (diffopt.export.to_onnx, or `diffopt "
            f"export`) and load the bundle with load_bundle(directory, runtime={name!r}); backends for a program: "
            f"{sorted(known)}"
        )
    raise ValueError(f"{where}: backend must be one of {sorted(known)}, found {name!r}")


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
