"""Defo profiling: measure and model each layer group's full and delta cost at one delta step.

The all-delta program (a ``TemporalDifferencePass``) runs a sampling trajectory through
the instrumented interpreter; at one delta step a hook records the values each layer
group's delta nodes (tagged by the pass) and its original ops read. Both are cut out as
small graphs and run on those values: their interleaved median wall time is the
measured cost, and ``modelled_seconds`` (per node ``overhead + max(MACs / MAC rate of its
dtype, bytes read and written / bandwidth)``, constants from ``measure_machine``'s
micro-benchmarks) the modelled one. ``DefoPass`` decides from the resulting ``LayerProfile``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from diffopt.ir.layers import linear_layers
from diffopt.ir.profile import GroupCost, LayerProfile, MachineModel
from diffopt.ir.program import StepProgram
from diffopt.ir.specs import FULL
from diffopt.measure.interpreter import InstrumentedBackend, NodeHook, run_with_hooks
from diffopt.measure.macs import node_macs
from diffopt.measure.timing import median_times
from diffopt.passes.base import PassContext, Pipeline
from diffopt.passes.temporal_difference import DELTA, GROUP_INPUT_KEY, GROUP_KEY, TemporalDifferencePass
from diffopt.runtime.denoiser import OptimizedDenoiser
from diffopt.sampling.sequential import Sampler


def _median_seconds(run, repeats: int, number: int = 10) -> float:
    """Median over ``repeats`` of the mean time of ``number`` back-to-back calls (after a warm-up)."""
    return _interleaved_medians([run], repeats, number)[0]


def _interleaved_medians(runs, repeats: int, number: int = 10) -> list[float]:
    """``_median_seconds`` of several callables, measured in turns (``measure.timing``)."""
    medians = median_times(
        {index: (lambda _, run=run: run()) for index, run in enumerate(runs)}, repeats, number=number
    )
    return [medians[index] for index in range(len(runs))]


def measure_machine(repeats: int = 30) -> MachineModel:
    """Per-op overhead, memory bandwidth and fp32 / fp64 MAC rates of this machine (torch, CPU)."""
    with torch.no_grad():
        tiny = torch.zeros(1)
        overhead = _median_seconds(lambda: tiny + tiny, repeats)
        big = torch.randn(1 << 20)
        bandwidth = 3 * big.numel() * 4 / max(_median_seconds(lambda: big + big, repeats) - overhead, 1e-9)
        rates = {}
        for dtype in (torch.float32, torch.float64):
            x, w = torch.randn(2048, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
            seconds = _median_seconds(lambda: torch.nn.functional.linear(x, w), repeats)
            rates[str(dtype).removeprefix("torch.")] = 2048 * 256 * 256 / max(seconds - overhead, 1e-9)
    return MachineModel(overhead, bandwidth, rates)


def node_seconds(machine: MachineModel, node: fx.Node, args: Sequence[Any], out: Any) -> float:
    """Modelled seconds of one node: ``overhead + max(MACs / rate of its dtype, bytes moved / bandwidth)``."""
    tensors = [a for a in (*args, out) if isinstance(a, torch.Tensor)]
    moved = sum(t.numel() * t.element_size() for t in tensors)
    macs = node_macs(node, args, out)
    rate = (
        machine.macs_per_s.get(str(out.dtype).removeprefix("torch."), min(machine.macs_per_s.values()))
        if isinstance(out, torch.Tensor)
        else 1.0
    )
    return machine.overhead_s + max(macs / rate, moved / machine.bytes_per_s)


class _ModelledTime(NodeHook):
    def __init__(self, machine: MachineModel):
        self.machine, self.seconds = machine, 0.0

    def on_node(self, node: fx.Node, args: Sequence[Any], result: Any, released: Sequence[fx.Node]) -> None:
        if node.op == "call_function":
            self.seconds += node_seconds(self.machine, node, args, result)


def modelled_seconds(module: fx.GraphModule, inputs: Sequence[torch.Tensor], machine: MachineModel) -> float:
    hook = _ModelledTime(machine)
    run_with_hooks(module, inputs, [hook])
    return hook.seconds


class _ValueRecorder(NodeHook):
    """Records the values of the named nodes while variant ``DELTA`` runs at ``step_index``."""

    def __init__(self, step_index: int, wanted: set[str]):
        self.step_index, self.wanted = step_index, wanted
        self.recording, self.values = False, {}

    def begin(self, variant: str, step_index: int) -> None:
        self.recording = variant == DELTA and step_index == self.step_index

    def on_node(self, node: fx.Node, args: Sequence[Any], result: Any, released: Sequence[fx.Node]) -> None:
        if self.recording and node.name in self.wanted:
            self.values[node.name] = result


def _cut(module: fx.GraphModule, nodes: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A graph computing ``nodes`` from their outside inputs (weights stay attributes);
    it returns every value of theirs used outside. Also returns the outside inputs."""
    members = set(nodes)
    graph, env, inputs = fx.Graph(), {}, []
    for node in nodes:
        for used in node.all_input_nodes:
            if used not in members and used not in env and used.op != "get_attr":
                env[used] = graph.placeholder(used.name)
                inputs.append(used)
            elif used.op == "get_attr" and used not in env:
                env[used] = graph.get_attr(used.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
    results = [env[n] for n in nodes if any(user not in members for user in n.users)]
    graph.output(tuple(results))
    return fx.GraphModule(module, graph), inputs


def profile_layers(
    program: StepProgram,
    difference: TemporalDifferencePass,
    sampler: Sampler,
    conditions: Sequence[torch.Tensor],
    shape: Sequence[int],
    *,
    calibration: Any = None,
    step_index: int | None = None,
    repeats: int = 20,
    machine: MachineModel | None = None,
    seed: int = 0,
) -> LayerProfile:
    """Measure and model each layer group's full and delta cost at one delta step of a run."""
    machine = machine or measure_machine()
    all_delta, _ = Pipeline([difference]).run(program.copy(), PassContext(statistics=calibration))
    step_index = sampler.scheduler.num_steps // 2 if step_index is None else step_index
    delta_module, full_module = all_delta.variants[DELTA], all_delta.variants[FULL]
    members: dict[str, list[fx.Node]] = {}
    sources: dict[str, str] = {}  # group -> name of the node its layers read
    for node in delta_module.graph.nodes:
        if GROUP_KEY in node.meta:
            members.setdefault(node.meta[GROUP_KEY], []).append(node)
        if GROUP_INPUT_KEY in node.meta:
            sources[node.meta[GROUP_INPUT_KEY]] = node.name
    layer_ops = {name: op for op, name in linear_layers(program.variants[FULL].graph).items()}
    cuts = {group: _cut(delta_module, nodes) for group, nodes in members.items()}
    wanted = {n.name for _, inputs in cuts.values() for n in inputs} | set(sources.values())
    recorder = _ValueRecorder(step_index, wanted)
    sampler.sample(
        OptimizedDenoiser(all_delta, backend=InstrumentedBackend(all_delta, [recorder])),
        conditions,
        shape=shape,
        seed=seed,
    )
    profile = LayerProfile(dataclasses.asdict(difference), int(shape[0]), step_index, machine)
    for group, (delta_graph, inputs) in cuts.items():
        delta_inputs = [recorder.values[n.name] for n in inputs]
        layers = list(
            dict.fromkeys(
                n.meta["diffopt"].details["layer"]
                for n in members[group]
                if "diffopt" in n.meta and "layer" in n.meta["diffopt"].details
            )
        )
        op_names = {layer_ops[layer].name for layer in layers}  # the ops in full form, or their integer form:
        full_graph, full_inputs = _cut(
            full_module, [n for n in full_module.graph.nodes if n.name in op_names or n.meta.get(GROUP_KEY) == group]
        )
        full_values = [recorder.values[sources[group]]] * len(full_inputs)  # the ops of a group read one input
        with torch.no_grad():
            full_s, delta_s = _interleaved_medians(
                [lambda: full_graph(*full_values), lambda: delta_graph(*delta_inputs)], repeats
            )
        profile.groups[group] = GroupCost(
            layers,
            full_s,
            delta_s,
            modelled_seconds(full_graph, full_values, machine),
            modelled_seconds(delta_graph, delta_inputs, machine),
        )
    return profile
