"""The one cache rewrite: a target, a refresh policy and a predictor make a step program.

Before: every step computes the targets. After: variant ``full`` computes them and feeds
each one's value to the predictor's ``update``; variant ``cached`` (a reusing predictor)
or ``forecast`` (any other) puts the predictor's ``predict`` where each target's value
was, so the target's work, and everything that only fed it, is gone from that graph. A
residual target adds the prediction to the value entering its first block. The predictor's
state, and a step counter, are threaded through every variant; the policy's schedule picks
the variant of each step. An adaptive policy also gets a ``probe`` variant (``_gate``): the
model up to the block before the target, whose forecast error picks each step's variant.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from torch import fx

from diffopt.ir.annotations import NodeAnnotation, annotate
from diffopt.ir.blocks import all_blocks, first_and_last_streams, stream_named
from diffopt.ir.graph_tools import (
    add_variant,
    finish_probe,
    insert_relative_change,
    placeholders,
    remove_dead_code,
    state_shape,
    thread_states,
)
from diffopt.ir.program import StepProgram
from diffopt.ir.specs import BATCH, CACHED, FORECAST, FULL, PROBE, StateEntry
from diffopt.passes.base import PassNotApplicable
from diffopt.passes.caching.policies import Policy
from diffopt.passes.caching.predictors import Predictor, Traced, trace_checked, trace_into
from diffopt.passes.caching.targets import CacheTarget, Target

aten = torch.ops.aten
EXAMPLE_BATCH = 2  # the batch size predictors are traced at (and checked one above)
CLOCK_NAMES = ("value", "t", "step")


def cache_rewrite(
    program: StepProgram,
    owner: str,
    target: Target,
    policy: Policy,
    predictor: Predictor,
    state_name: Callable[[CacheTarget, str], str] | None = None,
) -> StepProgram:
    """``program`` with a cache of ``target`` refreshed by ``policy`` and stood in for by
    ``predictor`` (see the module docstring); state entries are owned by ``owner`` and named
    ``<target>.<predictor's name>``, or by ``state_name(target, name)`` (presets keep the
    names their bundles were written with)."""
    targets = target.select(program.variants[FULL].graph, owner)
    gate = _gate_block(program.variants[FULL].graph, targets, owner) if policy.adaptive else None
    if gate is not None:
        add_variant(program, PROBE, copy_of=FULL)
    between = CACHED if predictor.reuses else FORECAST
    add_variant(program, between, copy_of=FULL)
    clock: dict[str, dict[str, fx.Node]] = {}  # variant -> "t", "step" (if used), the shared clock state
    device = program.variants[FULL].graph.output_node().args[0][0].meta["val"].device
    batch = _example_batch(program)
    column = torch.zeros(batch, device=device)
    for variant, module in program.variants.items():
        clock[variant] = {"t": _time_input(module.graph)}
    if predictor.uses_step:
        program = thread_states(
            program, (StateEntry(f"{owner}.step", (BATCH,), torch.float32, owner),), _count_steps(clock)
        )
    shared = {name: _example_like(tensor, batch) for name, tensor in predictor.clock_state(column).items()}
    clock_inputs = {"t": column, **({"step": column} if predictor.uses_step else {}), **shared}
    constants = predictor.constants()
    _check_names(predictor, shared, constants)
    if shared:
        update_clock = trace_checked(
            f"{predictor.kind} predictor's clock_update",
            lambda **given: predictor.clock_update({name: given[name] for name in clock_inputs}),
            clock_inputs,
            list(clock_inputs),
        )
        entries = tuple(_entry(f"{owner}.{name}", tensor, owner) for name, tensor in shared.items())

        def thread_clock(variant, graph, state_inputs):
            clock[variant].update(zip(shared, state_inputs))
            if variant != FULL:
                return list(state_inputs)
            with graph.inserting_before(clock[variant]["t"].next):
                new = trace_into(graph, update_clock, [clock[variant][name] for name in clock_inputs])
            return [new[name] for name in shared]

        program = thread_states(program, entries, thread_clock)
    for cache_target in targets:
        program = _cache_one(
            program, owner, cache_target, predictor, between, clock, clock_inputs, constants, state_name
        )
    if gate is not None:
        relative_to_forecast = policy.relative_to == "forecast"
        gate_parts = (gate, targets[0].last, relative_to_forecast)
        program = _gate(program, owner, gate_parts, predictor, between, clock, clock_inputs, constants)
        remove_dead_code(program.variants[FULL])
    remove_dead_code(program.variants[between])
    return dataclasses.replace(program, schedule=policy.schedule(between))


def _gate_block(graph: fx.Graph, targets: list[CacheTarget], owner: str) -> str:
    """The block an error-gated cache probes: the one right before its targets' first block."""
    firsts = {target.first for target in targets}
    blocks = all_blocks(graph)
    if len(firsts) != 1:
        raise ValueError(f"{owner}: an adaptive policy gates one span of blocks, the targets start at {sorted(firsts)}")
    (first,) = firsts
    if blocks.index(first) == 0:
        raise PassNotApplicable(f"{owner}: an adaptive policy probes the block before the target; {first} is the first")
    return blocks[blocks.index(first) - 1]


def _gate(
    program: StepProgram,
    owner: str,
    gate_parts: tuple[str, str, bool],
    predictor: Predictor,
    between: str,
    clock: dict[str, dict[str, fx.Node]],
    clock_inputs: dict[str, torch.Tensor],
    constants: dict[str, torch.Tensor],
) -> StepProgram:
    """The probe of an adaptive policy; ``gate_parts``: the gate block, the target's last
    block, and whether the error is relative to the forecast. The ``probe`` variant runs the
    model up to the gate's outputs and returns ``mean|forecast - value| / mean|value|`` (or
    ``/ mean|forecast|``) of the gate's value (the residual, or output, of the gate stream
    the target's first stream continues) against ``predictor``'s forecast of it; the gate's
    outputs reach ``full`` and ``between`` through state (the gate runs once per step), and
    ``full`` updates the gate's predictor state with its value."""
    gate, last, relative_to_forecast = gate_parts
    graph = program.variants[FULL].graph
    batch = _example_batch(program)
    streams, pairs = first_and_last_streams(graph, gate, last)
    signal_stream = streams.index(pairs[0][0])
    names = [stream.output.name for stream in streams]
    suffixes = [f".stream{index}" if len(streams) > 1 else "" for index in range(len(streams))]
    outputs, hidden_inputs = {}, {}  # variant -> the gate's outputs, its signal stream's hidden input

    def pass_outputs(variant, graph, state_inputs):
        boundaries = [stream_named(graph, gate, name) for name in names]
        hidden_inputs[variant] = boundaries[signal_stream].hidden_input
        if variant == PROBE:
            outputs[variant] = [boundary.output for boundary in boundaries]
            return outputs[variant]
        for boundary, state_input in zip(boundaries, state_inputs):
            boundary.output.replace_all_uses_with(state_input)  # the probe computed it
        outputs[variant] = list(state_inputs)
        return list(state_inputs)

    entries = tuple(
        _entry(f"{gate}{suffix}.gate_output", _example(stream.output, batch), owner)
        for stream, suffix in zip(streams, suffixes)
    )
    program = thread_states(program, entries, pass_outputs)
    example = _example(streams[signal_stream].output, batch)
    state, update, predict = _traced(predictor, example, clock_inputs, constants)
    signal = {}

    def gate_state(variant, graph, state_inputs):
        if variant == between:
            return list(state_inputs)
        constant_nodes = _constants(program.variants[variant], graph, owner, f"{gate}.gate", constants)
        times = [clock[variant][name] for name in clock_inputs]
        with graph.inserting_before(graph.output_node()):
            value = outputs[variant][signal_stream]
            if hidden_inputs[variant] is not None:
                value = graph.call_function(aten.sub.Tensor, (value, hidden_inputs[variant]))
            if variant == FULL:
                new = trace_into(graph, update, [value, *times, *state_inputs, *constant_nodes])
                return [new[name] for name in state]
            forecast = trace_into(graph, predict, [*times, *state_inputs, *constant_nodes])["value"]
        signal[variant] = (
            insert_relative_change(graph, value, forecast)
            if relative_to_forecast
            else insert_relative_change(graph, forecast, value)
        )
        return list(state_inputs)

    entries = tuple(_entry(f"{gate}.gate.{name}", tensor, owner) for name, tensor in state.items())
    program = thread_states(program, entries, gate_state)
    finish_probe(program.variants[PROBE], signal[PROBE])
    return program


def _count_steps(clock: dict[str, dict[str, fx.Node]]):
    """A ``thread_states`` update: every variant adds one to the step counter."""

    def count(variant, graph, state_inputs):
        (step,) = state_inputs
        clock[variant]["step"] = step
        if variant == PROBE:  # the step's variant counts it
            return (step,)
        with graph.inserting_before(graph.output_node()):
            return (graph.call_function(aten.add.Tensor, (step, 1.0)),)

    return count


def _check_names(predictor: Predictor, shared: dict, constants: dict) -> None:
    names = [*CLOCK_NAMES, *shared, *constants]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ValueError(
            f"{predictor.kind} predictor: the names {clashes} are taken twice (value, t and step included)"
        )


def _entry(name: str, example: torch.Tensor, owner: str) -> StateEntry:
    return StateEntry(name, (BATCH, *example.shape[1:]), example.dtype, owner)


def _cache_one(
    program: StepProgram,
    owner: str,
    target: CacheTarget,
    predictor: Predictor,
    between: str,
    clock: dict[str, dict[str, fx.Node]],
    clock_inputs: dict[str, torch.Tensor],
    constants: dict[str, torch.Tensor],
    state_name: Callable[[CacheTarget, str], str] | None,
) -> StepProgram:
    """Thread ``predictor``'s state for ``target`` and rewrite its value in every variant."""
    output = stream_named(program.variants[FULL].graph, target.last, target.output).output
    state, update, predict = _traced(predictor, _example(output, _example_batch(program)), clock_inputs, constants)
    named = state_name or (lambda target, name: f"{target.name}.{name}")
    entries = tuple(_entry(named(target, name), tensor, owner) for name, tensor in state.items())
    block = target.first if target.first == target.last else f"{target.first}..{target.last}"
    details = {"target": target.name, "block": block, "predictor": predictor.kind}

    def rewrite(variant, graph, state_inputs):
        if variant == PROBE:  # an adaptive policy's probe stops before the target
            return list(state_inputs)
        constant_nodes = _constants(program.variants[variant], graph, owner, target.name, constants)
        times = [clock[variant][name] for name in clock_inputs]
        if variant == FULL:
            current = _target_value(graph, target)
            annotate(current, NodeAnnotation(FULL, owner, details=details))
            with graph.inserting_before(current.next):  # inserting_after would reverse the copied nodes
                new = trace_into(graph, update, [current, *times, *state_inputs, *constant_nodes])
            return [new[name] for name in state]
        boundary = stream_named(graph, target.last, target.output)
        with graph.inserting_before(boundary.output):
            predicted = trace_into(graph, predict, [*times, *state_inputs, *constant_nodes])["value"]
            replacement = predicted
            if target.head is not None:
                hidden_input = stream_named(graph, target.first, target.head).hidden_input
                replacement = graph.call_function(aten.add.Tensor, (hidden_input, predicted))
        replacement.meta["val"] = boundary.output.meta["val"]  # later blocks find their input by shape
        annotate(replacement, NodeAnnotation(between, owner, reason=f"{target.name} {predictor.kind}", details=details))
        boundary.output.replace_all_uses_with(replacement)
        return list(state_inputs)

    return thread_states(program, entries, rewrite)


def _traced(
    predictor: Predictor, value: torch.Tensor, clock_inputs: dict[str, torch.Tensor], constants: dict
) -> tuple[dict[str, torch.Tensor], Traced, Traced]:
    """``predictor``'s state examples for a value like ``value``, and its ``update`` and
    ``predict`` traced for it."""
    batch = value.shape[0]
    state = {name: _example_like(tensor, batch) for name, tensor in predictor.state(value).items()}
    _check_names(predictor, {**{k: v for k, v in clock_inputs.items() if k not in CLOCK_NAMES}, **state}, constants)
    batched = ["value", *clock_inputs, *state]

    def split(given):
        return {name: given[name] for name in (*state, *constants)}, {name: given[name] for name in clock_inputs}

    update = trace_checked(
        f"{predictor.kind} predictor's update",
        lambda value, **given: predictor.update(*split(given)[:1], value, split(given)[1]),
        {"value": value, **clock_inputs, **state, **constants},
        batched,
    )
    predict = trace_checked(
        f"{predictor.kind} predictor's predict",
        lambda **given: predictor.predict(*split(given)),
        {**clock_inputs, **state, **constants},
        batched,
    )
    if set(update.outputs) != set(state):
        raise ValueError(
            f"{predictor.kind} predictor: update returns {sorted(update.outputs)}, its state is {sorted(state)}"
        )
    return state, update, predict


def _example_batch(program: StepProgram) -> int:
    """The batch size predictors are traced at: ``EXAMPLE_BATCH``, or the one a graph captured
    for a fixed batch size has (Chroma)."""
    size = placeholders(program.variants[FULL].graph)[0].meta["val"].shape[0]
    return size if type(size) is int else EXAMPLE_BATCH


def _example(node: fx.Node, batch: int) -> torch.Tensor:
    """Zeros like ``node``'s value at ``batch``, on its device (traced creation ops keep the
    device they saw, as capture's do)."""
    shape = tuple(batch if d == BATCH else d for d in state_shape(node))
    return torch.zeros(shape, dtype=node.meta["val"].dtype, device=node.meta["val"].device)


def _example_like(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.dim() == 0 or tensor.shape[0] != batch:
        raise ValueError(f"a predictor's state tensors are batch first, found shape {tuple(tensor.shape)}")
    return torch.zeros(tensor.shape, dtype=tensor.dtype, device=tensor.device)


def _time_input(graph: fx.Graph) -> fx.Node:
    """The timestep input as float32 (one cast node per graph, shared by every cache)."""
    timestep = placeholders(graph)[1]
    for user in timestep.users:
        if (
            user.target == aten._to_copy.default
            and user.kwargs.get("dtype") == torch.float32
            and user.meta.get("clock")
        ):
            return user
    with graph.inserting_after(placeholders(graph)[-1]):
        time = graph.call_function(aten._to_copy.default, (timestep,), {"dtype": torch.float32})
    time.meta["clock"] = True
    return time


def _target_value(graph: fx.Graph, target: CacheTarget) -> fx.Node:
    """The target's value in ``graph``: its output, or ``out - in`` of its blocks (inserted)."""
    output = stream_named(graph, target.last, target.output).output
    if target.head is None:
        return output
    hidden_input = stream_named(graph, target.first, target.head).hidden_input
    with graph.inserting_before(output.next):
        residual = graph.call_function(aten.sub.Tensor, (output, hidden_input))
    residual.meta["val"] = output.meta["val"]
    return residual


def _constants(
    module: fx.GraphModule, graph: fx.Graph, owner: str, user: str, constants: dict[str, torch.Tensor]
) -> list[fx.Node]:
    """``get_attr`` nodes of the predictor's constants for ``user`` (a target's name),
    registered as buffers of ``module``."""
    nodes = []
    for name, tensor in constants.items():
        attribute = re.sub(r"\W", "_", f"{owner}.{user}.{name}")
        module.register_buffer(attribute, tensor)
        with graph.inserting_after(placeholders(graph)[-1]):
            nodes.append(graph.get_attr(attribute))
    return nodes
