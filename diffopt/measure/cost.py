"""Cost accounting of sampling runs: per step and per run, MACs, bit-operations, state bytes
and peak activation memory, counted while the program really runs.

A ``CostCounter`` hook sees every node of every variant run (``measure.interpreter``;
unchanged state is carried without copies, as on the torch backend). MACs come from
``macs.node_macs`` on the real shapes (row skipping shows up as smaller matmuls).
Bit-operations of a linear op are ``MACs x activation bits x weight bits``: a matmul a
quantization pass annotated with ``activation_bits="codes"`` is charged per code by its
width (``quantization.WIDTH_BITS``: zero codes skipped, 4 / 8 / 16 bits), counted on the
values that ran; other annotated matmuls by their declared bits; unannotated ones by their
dtype (32 x 32 for float32). Peak memory is the largest total of live intermediate
tensors (inputs and state included, weights not) during a step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx

from diffopt.ir.annotations import annotation_of
from diffopt.ir.graph_tools import attribute
from diffopt.ir.layers import LINEAR_OPS
from diffopt.ir.program import StepProgram
from diffopt.measure.interpreter import InstrumentedBackend, NodeHook
from diffopt.measure.macs import node_macs
from diffopt.quant.arithmetic import code_width_fractions, mean_operand_bits
from diffopt.runtime.denoiser import OptimizedDenoiser
from diffopt.sampling.sequential import Sampler


@dataclass
class StepCost:
    variant: str
    macs: int = 0
    linear_macs: int = 0
    linear_bit_operations: float = 0.0
    peak_activation_bytes: int = 0


@dataclass
class RunCost:
    steps: list[StepCost] = field(default_factory=list)
    state_bytes: int = 0
    weight_bytes: int = 0

    @property
    def macs(self) -> int:
        return sum(s.macs for s in self.steps)

    @property
    def linear_bit_operations(self) -> float:
        return sum(s.linear_bit_operations for s in self.steps)

    @property
    def peak_activation_bytes(self) -> int:
        return max((s.peak_activation_bytes for s in self.steps), default=0)

    def summary(self) -> dict[str, Any]:
        return {
            "macs": self.macs,
            "linear_bit_operations": self.linear_bit_operations,
            "state_bytes": self.state_bytes,
            "peak_activation_bytes": self.peak_activation_bytes,
            "weight_bytes": self.weight_bytes,
            "steps": [asdict(s) for s in self.steps],
        }


def _details(node: fx.Node) -> dict:
    annotation = annotation_of(node)
    return annotation.details if annotation is not None else {}


def operand_bits_of(node: fx.Node, activation: torch.Tensor) -> float:
    """Activation bits x weight bits charged per MAC of linear op ``node`` (or of a matmul a
    pass annotated with its operand bits)."""
    details = _details(node)
    if "activation_bits" not in details:
        bits = activation.element_size() * 8
        return float(bits * bits)
    if details["activation_bits"] == "codes":
        codes = torch.round(activation / details["code_scale"])
        return mean_operand_bits(code_width_fractions(codes)) * details["weight_bits"]
    return float(details["activation_bits"] * details["weight_bits"])


def _storage_key(value: Any) -> tuple[int, int] | None:
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return None
    storage = value.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class CostCounter(NodeHook):
    """Counts MACs / bit-operations per node and tracks live tensor bytes (by storage) into
    one ``StepCost`` per variant run."""

    def __init__(self):
        self.steps: list[StepCost] = []

    def begin(self, variant: str, step_index: int) -> None:
        self.steps.append(StepCost(variant))
        self.live: dict[int, list[int]] = {}  # storage pointer -> [bytes, nodes holding it]
        self.holders: dict[fx.Node, int] = {}
        self.live_bytes = 0

    def on_node(self, node: fx.Node, args: Sequence[Any], result: Any, released: Sequence[fx.Node]) -> None:
        cost = self.steps[-1]
        if node.op == "call_function":
            macs = node_macs(node, args, result)
            cost.macs += macs
            if macs and (node.target in LINEAR_OPS or "activation_bits" in _details(node)):
                cost.linear_macs += macs
                cost.linear_bit_operations += macs * operand_bits_of(node, args[0])
        if node.op != "get_attr":
            self._hold(node, result)
        cost.peak_activation_bytes = max(cost.peak_activation_bytes, self.live_bytes)
        for used in released:
            self._release(used)

    def _hold(self, node: fx.Node, value: Any) -> None:
        key = _storage_key(value)
        if key is None:
            return
        pointer, nbytes = key
        entry = self.live.setdefault(pointer, [nbytes, 0])
        if entry[1] == 0:
            self.live_bytes += nbytes
        entry[1] += 1
        self.holders[node] = pointer

    def _release(self, node: fx.Node) -> None:
        pointer = self.holders.pop(node, None)
        if pointer is None:
            return
        entry = self.live[pointer]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.live[pointer]


def state_bytes(program: StepProgram, batch_size: int) -> int:
    return sum(
        math.prod(e.shape_for(batch_size)) * torch.empty((), dtype=e.dtype).element_size()
        for e in program.state.entries
    )


def weight_bytes(program: StepProgram) -> int:
    """Bytes of the distinct parameters and buffers the variants' graphs read (``get_attr``)."""
    seen: dict[int, int] = {}
    for module in program.variants.values():
        for node in module.graph.nodes:
            if node.op == "get_attr":
                tensor = attribute(module, node.target)
                if isinstance(tensor, torch.Tensor):
                    seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def measure_run_cost(
    program: StepProgram, sampler: Sampler, conditions: Sequence[torch.Tensor], shape: Sequence[int], seed: int = 0
) -> RunCost:
    """Sample once with cost counting (a probe of an adaptive schedule counts as a step of its own)."""
    counter = CostCounter()
    sampler.sample(
        OptimizedDenoiser(program, backend=InstrumentedBackend(program, [counter])), conditions, shape=shape, seed=seed
    )
    return RunCost(counter.steps, state_bytes(program, shape[0]), weight_bytes(program))
