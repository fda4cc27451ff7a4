"""The one instrumented way to run graphs: an fx Interpreter that hands every node to hooks.

Everything that measures a program while it runs uses it: MAC counts and cost accounting
(``measure.macs``, ``measure.cost``), calibration (observer nodes, ``measure.calibration``)
and Defo profiling (``measure.defo_profile``). A hook sees each node with its concrete
arguments and result, and the nodes whose values die after it.

``InstrumentedBackend`` is a ``TorchBackend`` that runs its (state-carrying) graphs this
way and tells the hooks which variant runs at which step of the sampling run; a probe of
an adaptive schedule belongs to the step it decides, so the step index is exact whatever
the schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from diffopt.ir.program import StepProgram
from diffopt.runtime.backends import TorchBackend


class NodeHook:
    """Base of the hooks; override what you need."""

    def begin(self, variant: str, step_index: int) -> None:
        """A variant starts running at ``step_index`` (only under ``InstrumentedBackend``)."""

    def on_node(self, node: fx.Node, args: Sequence[Any], result: Any, released: Sequence[fx.Node]) -> None:
        """``node`` ran on ``args`` and produced ``result``; ``released`` are the nodes whose
        values are no longer needed after it."""


class HookedInterpreter(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, hooks: Sequence[NodeHook]):
        super().__init__(module, garbage_collect_values=True)
        self.hooks = hooks

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        args = self.fetch_args_kwargs_from_env(node)[0] if node.op == "call_function" else ()
        released = self.user_to_last_uses.get(node, [])
        for hook in self.hooks:
            hook.on_node(node, args, result, released)
        return result


def run_with_hooks(module: fx.GraphModule, inputs: Sequence[torch.Tensor], hooks: Sequence[NodeHook]) -> tuple:
    """Run ``module`` on ``inputs`` (no autograd), calling ``hooks`` at every node."""
    with torch.no_grad():
        return tuple(HookedInterpreter(module, hooks).run(*inputs))


class InstrumentedBackend(TorchBackend):
    """A torch backend that runs every variant through ``HookedInterpreter``."""

    name = "torch-instrumented"

    def __init__(self, program: StepProgram, hooks: Sequence[NodeHook]):
        super().__init__(program)
        self.hooks = tuple(hooks)
        self.step_index = 0

    @classmethod
    def for_program(cls, program: StepProgram, like: InstrumentedBackend) -> InstrumentedBackend:
        return cls(program, like.hooks)

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for hook in self.hooks:
            hook.begin(variant, self.step_index)
        outputs = run_with_hooks(self.modules[variant], inputs, self.hooks)
        if variant not in self.program.schedule.probes:
            self.step_index += 1
        return outputs
