"""Step programs: a denoiser whose step k may depend on earlier steps, made explicit.

Every variant of a program is a plain graph with one signature::

    variant(latent, timestep, *conditions, *state) -> (out, *new_state)

``ir.specs`` describes the inputs and state tensors, ``ir.schedules`` picks the variant for
step k, and ``OptimizedDenoiser`` runs the program on a backend: functionally (``step``) or
like the original model (``__call__``, keeping the state itself).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from diffopt.ir.schedules import BaseSchedule, Schedule
from diffopt.ir.signature import CapturedGraph, Signature
from diffopt.ir.specs import FULL, StateSpec, TensorSpec


@dataclass(frozen=True)
class ProgramInterface:
    """What running a program needs, without its graphs: the signature with the model
    inputs' specs, the state it threads and its schedule (a bundle's manifest describes
    exactly this)."""

    signature: Signature
    inputs: tuple[TensorSpec, ...]  # (latent, timestep, *conditions)
    state: StateSpec
    schedule: BaseSchedule
    model_class: str = ""
    device: torch.device = torch.device("cpu")  # where inputs and state go

    @property
    def num_inputs(self) -> int:
        return len(self.signature.input_names)


@dataclass
class StepProgram:
    """Variants (name -> graph) sharing one signature, the state they thread, and a schedule."""

    signature: Signature
    variants: dict[str, fx.GraphModule]
    state: StateSpec = field(default_factory=StateSpec)
    schedule: BaseSchedule = field(default_factory=Schedule)
    model_class: str = ""
    applied: tuple[tuple[str, str], ...] = ()  # (kind, pass) of every variant-creating pass, in order
    input_specs: tuple[TensorSpec, ...] | None = None  # set by placement; None: read from the graphs
    device: torch.device = torch.device("cpu")  # where the weights are (ir.placement.place moves them)

    @classmethod
    def from_captured(cls, captured: CapturedGraph) -> StepProgram:
        """The identity program: one ``full`` variant, no state."""
        program = cls(captured.signature, {FULL: captured.module}, model_class=captured.model_class)
        return program.copy()

    def copy(self) -> StepProgram:
        """New graphs (so passes may edit them), same weight tensors."""
        variants = {name: fx.GraphModule(gm, copy.deepcopy(gm.graph)) for name, gm in self.variants.items()}
        return dataclasses.replace(self, variants=variants)

    @property
    def num_inputs(self) -> int:
        return len(self.signature.input_names)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """Specs of the model inputs ``(latent, timestep, *conditions)``, from the graphs."""
        if self.input_specs is not None:
            return self.input_specs
        module = next(iter(self.variants.values()))
        placeholders = [node for node in module.graph.nodes if node.op == "placeholder"][: self.num_inputs]
        return tuple(
            dataclasses.replace(TensorSpec.of_node(name, node), bounds=_index_bounds(module, node))
            for name, node in zip(self.signature.input_names, placeholders)
        )

    @property
    def interface(self) -> ProgramInterface:
        return ProgramInterface(self.signature, self.inputs, self.state, self.schedule, self.model_class, self.device)

    def fingerprint(self) -> str:
        """Text that changes whenever the program's structure does (used to check ``modified``)."""
        parts = [repr(self.state), repr(self.schedule), repr(self.applied)]
        for name in sorted(self.variants):
            graph = self.variants[name].graph
            parts.append(name)
            parts.extend(f"{n.format_node()} {n.meta.get('diffopt')!r}" for n in graph.nodes)
        return "\n".join(parts)


def _attribute(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part, None)
    return module


_INDEX_PASS_THROUGH = {  # ops an index input may pass through on its way to an embedding table
    torch.ops.aten._to_copy.default,
    torch.ops.aten.to.dtype,
    torch.ops.aten.clone.default,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.flatten.using_ints,
}


def _index_bounds(module: fx.GraphModule, placeholder: fx.Node) -> tuple[int, int] | None:
    """``(0, rows - 1)`` for an integer input that indexes embedding tables (class labels: an
    index past the table is an error in torch and silently something else in onnxruntime);
    None for any other input."""
    value = placeholder.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype == torch.bool:
        return None
    rows, frontier = [], [placeholder]
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user.op != "call_function":
                continue
            if user.target == torch.ops.aten.embedding.default and user.args[1] is node:
                weight = user.args[0]
                table = _attribute(module, weight.target) if weight.op == "get_attr" else weight.meta.get("val")
                if isinstance(table, torch.Tensor):
                    rows.append(int(table.shape[0]))
            elif user.target in _INDEX_PASS_THROUGH and user.args[0] is node:
                frontier.append(user)
    return (0, min(rows) - 1) if rows else None
