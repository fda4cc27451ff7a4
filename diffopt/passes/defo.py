"""Defo: decide per layer whether temporal-difference processing pays, keep the rest full.

Before: a ``TemporalDifferencePass`` would turn every linear op into its delta form.
After: the same pass runs with the layer policy extended by one decision per layer
group (layers that read one input share one difference, so they are decided together):
``delta`` where the group's delta computation costs less than its ops in full form,
``full`` otherwise, with the reason (both costs) in each layer's annotation.

The costs come from a ``LayerProfile`` measured during calibration (``profile_layers``):
the all-delta program runs a sampling trajectory; at one delta step, each group's delta
nodes (tagged by the pass) and its original ops are cut out as small graphs and run on
the values they saw. ``cost="measured"`` uses their median wall time on this backend;
``cost="model"`` a cost model that never looks at a clock during the decision:
per node ``overhead + max(MACs / MAC rate of its dtype, bytes read and written / bandwidth)``
with machine constants from a few micro-benchmarks (``MachineModel.measure``). A layer the
user's policy sets ``mode`` for keeps the user's choice (reason: "policy override").
"""
from __future__ import annotations

import dataclasses
import json
import statistics as stats
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx

from diffopt.analysis import node_macs
from diffopt.denoiser import OptimizedDenoiser
from diffopt.passes.base import GraphPass, PassContext, PassResult, require_single_variant
from diffopt.passes.linear_ops import linear_layers, op_name
from diffopt.passes.temporal_difference import DELTA, GROUP_INPUT_KEY, GROUP_KEY, TemporalDifferencePass
from diffopt.policy import LayerPolicy
from diffopt.program import FULL, StepProgram
from diffopt.runtime.sampler import Sampler

COSTS = ("model", "measured")


def _median_seconds(run, repeats: int, number: int = 10) -> float:
    """Median over ``repeats`` of the mean time of ``number`` back-to-back calls (after a warm-up)."""
    return _interleaved_medians([run], repeats, number)[0]


def _interleaved_medians(runs, repeats: int, number: int = 10) -> list[float]:
    """``_median_seconds`` of several callables, measured in turns (A B A B ...) so that
    machine noise hits them alike."""
    for run in runs:
        run()
    times = [[] for _ in runs]
    for _ in range(repeats):
        for run, samples in zip(runs, times):
            started = time.perf_counter()
            for _ in range(number):
                run()
            samples.append((time.perf_counter() - started) / number)
    return [stats.median(samples) for samples in times]


@dataclass(frozen=True)
class MachineModel:
    """Per-op overhead (s), memory bandwidth (bytes/s) and MAC rate per dtype (MACs/s)."""

    overhead_s: float
    bytes_per_s: float
    macs_per_s: dict[str, float]

    @classmethod
    def measure(cls, repeats: int = 30) -> "MachineModel":
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
        return cls(overhead, bandwidth, rates)

    def node_seconds(self, node: fx.Node, args: Sequence[Any], out: Any) -> float:
        tensors = [a for a in (*args, out) if isinstance(a, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        macs = node_macs(node, args, out)
        rate = self.macs_per_s.get(str(out.dtype).removeprefix("torch."), min(self.macs_per_s.values())) \
            if isinstance(out, torch.Tensor) else 1.0
        return self.overhead_s + max(macs / rate, moved / self.bytes_per_s)


@dataclass
class GroupCost:
    layers: list[str]
    full_measured_s: float
    delta_measured_s: float
    full_model_s: float
    delta_model_s: float

    def delta_wins(self, cost: str) -> bool:
        return getattr(self, f"delta_{cost}_s") < getattr(self, f"full_{cost}_s")


@dataclass
class LayerProfile:
    """Per layer group: the cost of its ops in full form and of its delta nodes, measured and modelled."""

    difference: dict[str, Any]  # the TemporalDifferencePass options profiled
    batch_size: int
    step_index: int
    machine: MachineModel
    groups: dict[str, GroupCost] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "LayerProfile":
        data = json.loads(Path(path).read_text())
        return cls(data["difference"], data["batch_size"], data["step_index"], MachineModel(**data["machine"]),
                   {name: GroupCost(**group) for name, group in data["groups"].items()})

    def agreement(self) -> float:
        """Fraction of layers where the cost model decides as the measurement does."""
        weights = [(len(g.layers), g.delta_wins("model") == g.delta_wins("measured")) for g in self.groups.values()]
        return sum(n for n, agree in weights if agree) / max(sum(n for n, _ in weights), 1)


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


class _ValueRecorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, wanted: set[str]):
        super().__init__(module)
        self.wanted, self.values = wanted, {}

    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        if node.name in self.wanted:
            self.values[node.name] = result
        return result


class _RecordingBackend:
    """Runs the program; at ``step_index`` records the values of the named nodes of ``delta``."""

    def __init__(self, program: StepProgram, step_index: int, wanted: set[str]):
        self.program, self.step_index, self.wanted = program, step_index, wanted
        self.calls, self.values = 0, {}

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        module = self.program.variants[variant]
        with torch.no_grad():
            if self.calls == self.step_index and variant == DELTA:
                recorder = _ValueRecorder(module, self.wanted)
                outputs = tuple(recorder.run(*inputs))
                self.values = recorder.values
            else:
                outputs = tuple(module(*inputs))
        self.calls += 1
        return outputs


def _modelled_seconds(module: fx.GraphModule, inputs: Sequence[torch.Tensor], machine: MachineModel) -> float:
    total = 0.0

    class Modelling(fx.Interpreter):
        def run_node(self, node):
            nonlocal total
            result = super().run_node(node)
            if node.op == "call_function":
                args, _ = self.fetch_args_kwargs_from_env(node)
                total += machine.node_seconds(node, args, result)
            return result
    with torch.no_grad():
        Modelling(module).run(*inputs)
    return total


def profile_layers(program: StepProgram, difference: TemporalDifferencePass, sampler: Sampler,
                   conditions: Sequence[torch.Tensor], shape: Sequence[int], *, calibration: Any = None,
                   step_index: int | None = None, repeats: int = 20, machine: MachineModel | None = None,
                   seed: int = 0) -> LayerProfile:
    """Measure and model each layer group's full and delta cost at one delta step of a run."""
    from diffopt.optimize import optimize

    machine = machine or MachineModel.measure()
    all_delta = optimize(program, [difference], calibration=calibration).program
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
    backend = _RecordingBackend(all_delta, step_index, wanted)
    sampler.sample(OptimizedDenoiser(all_delta, backend=backend), conditions, shape=shape, seed=seed)
    profile = LayerProfile(dataclasses.asdict(difference), int(shape[0]), step_index, machine)
    for group, (delta_graph, inputs) in cuts.items():
        delta_inputs = [backend.values[n.name] for n in inputs]
        layers = list(dict.fromkeys(n.meta["diffopt"].details["layer"] for n in members[group]
                                    if "diffopt" in n.meta and "layer" in n.meta["diffopt"].details))
        op_names = {layer_ops[layer].name for layer in layers}  # the ops in full form, or their integer form:
        full_graph, full_inputs = _cut(full_module, [n for n in full_module.graph.nodes
                                                     if n.name in op_names or n.meta.get(GROUP_KEY) == group])
        full_values = [backend.values[sources[group]]] * len(full_inputs)  # the ops of a group read one input
        with torch.no_grad():
            full_s, delta_s = _interleaved_medians([lambda: full_graph(*full_values),
                                                    lambda: delta_graph(*delta_inputs)], repeats)
        profile.groups[group] = GroupCost(layers, full_s, delta_s, _modelled_seconds(full_graph, full_values, machine),
                                          _modelled_seconds(delta_graph, delta_inputs, machine))
    return profile


@dataclass(frozen=True)
class DefoPass(GraphPass):
    profile: LayerProfile = field(compare=False, repr=False, default=None)
    difference: TemporalDifferencePass = TemporalDifferencePass("exact")
    cost: str = "model"

    def __post_init__(self) -> None:
        if self.cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, found {self.cost!r}")
        if not isinstance(self.profile, LayerProfile):
            raise ValueError("DefoPass needs profile=profile_layers(...) (or LayerProfile.load(path))")
        if self.profile.difference != dataclasses.asdict(self.difference):
            raise ValueError(f"the profile was measured for {self.profile.difference}, not for {self.difference}")

    def requires(self, program: StepProgram, context: PassContext) -> None:
        if DELTA not in program.variants:
            require_single_variant(self.name, program)

    def decisions(self, context: PassContext) -> dict[str, dict[str, str]]:
        """Per layer: ``{"mode": ..., "reason": ...}`` (the user's policy wins where it sets a mode)."""
        decided = {}
        for group in self.profile.groups.values():
            delta_s, full_s = getattr(group, f"delta_{self.cost}_s"), getattr(group, f"full_{self.cost}_s")
            mode = DELTA if delta_s < full_s else FULL
            reason = (f"Defo ({self.cost}): delta {delta_s * 1e6:.1f} us {'<' if mode == DELTA else '>='} "
                      f"full {full_s * 1e6:.1f} us at batch {self.profile.batch_size}")
            for layer in group.layers:
                decided[layer] = {"mode": mode, "reason": reason}
        return decided

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        if DELTA in program.variants:
            return PassResult(program, False)
        user, decisions, decided = context.policy, self.decisions(context), {}
        for op, layer in linear_layers(program.variants[FULL].graph).items():
            if "mode" in user.resolve(layer, op_name(op)):
                decided[layer] = {"reason": "policy override"}
            elif layer in decisions:
                decided[layer] = decisions[layer]
        exact_names = {**decided, **{name: {**decided.get(name, {}), **settings}
                                     for name, settings in user.exact_names.items()}}
        policy = LayerPolicy(user.global_settings, user.op_types, user.module_patterns, exact_names)
        return self.difference.call(program, dataclasses.replace(context, policy=policy))
