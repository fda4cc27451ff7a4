"""Composition: apply a variant-creating rewrite to every variant of a program.

Before: a program with variants ``V`` (e.g. a block cache's ``full`` / ``cached``), state
``S`` and schedule ``outer``; a rewrite that turns a one-variant program into variants
``R`` (e.g. temporal differences' ``full`` / ``delta``) with new state and a periodic
schedule ``inner``.
After: one variant per pair (v, r), named by ``combined_name`` (``cached+delta``), each
being v rewritten into role r; state ``S`` followed by the union of the state each
rewrite added, every variant threading all of it (a variant that does not touch an entry
passes it on unchanged); schedule ``ComposedSchedule(outer, inner)``.

Passing untouched state on is what keeps compositions exact: a temporal-difference
layer that a cached step skips keeps the previous input and output of the last step it
ran, and its next difference is taken against that pair.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from torch import fx

from diffopt.ir.graph_tools import output_values, placeholders
from diffopt.ir.program import StepProgram
from diffopt.ir.schedules import ComposedSchedule, Schedule
from diffopt.ir.specs import FULL, StateEntry, StateSpec, combined_name

aten = torch.ops.aten


def rewrite_every_variant(program: StepProgram, rewrite: Callable[[StepProgram], StepProgram]) -> StepProgram:
    """Apply ``rewrite`` (one-variant program -> its variants, periodic schedule) to each
    variant of ``program`` and combine the results (module docstring)."""
    if set(program.variants) == {FULL}:
        return rewrite(program)
    results = {
        name: rewrite(dataclasses.replace(program, variants={FULL: module}, schedule=Schedule()))
        for name, module in program.variants.items()
    }
    inner = _common_schedule(results)
    base = program.state.entries
    added: dict[str, StateEntry] = {}
    for result in results.values():
        for entry in result.state.entries[len(base) :]:
            known = added.setdefault(entry.name, entry)
            if (known.shape, known.dtype) != (entry.shape, entry.dtype):
                raise ValueError(
                    f"state {entry.name!r} has shape {entry.shape} {entry.dtype} in one variant and "
                    f"{known.shape} {known.dtype} in another"
                )
    state = StateSpec((*base, *added.values()))
    variants, names = {}, []
    for source, result in results.items():
        for role, module in result.variants.items():
            combined = combined_name(source, role, inner.refresh)
            align_state(module, program.num_inputs, result.state.entries, state.entries)
            variants[combined] = module
            names.append((source, role, combined))
    schedule = ComposedSchedule(program.schedule, inner, tuple(names))
    return dataclasses.replace(program, variants=variants, state=state, schedule=schedule)


def _common_schedule(results: dict[str, StepProgram]) -> Schedule:
    schedules = {result.schedule for result in results.values()}
    if len(schedules) != 1 or not isinstance(next(iter(schedules)), Schedule):
        raise ValueError(
            f"a rewrite composed over variants must give every variant the same periodic schedule, found {schedules}"
        )
    return next(iter(schedules))


def align_state(
    module: fx.GraphModule, num_inputs: int, have: tuple[StateEntry, ...], want: tuple[StateEntry, ...]
) -> None:
    """Make ``module``'s state inputs and outputs ``want`` (in that order) instead of
    ``have``: entries it lacks are passed on unchanged (``clone`` of the input)."""
    graph = module.graph
    inputs = placeholders(graph)
    outputs = output_values(graph)
    state_inputs = dict(zip([e.name for e in have], inputs[num_inputs:], strict=True))
    state_outputs = dict(zip([e.name for e in have], outputs[1:], strict=True))
    last = inputs[num_inputs - 1]
    for entry in want:
        if entry.name not in state_inputs:
            with graph.inserting_after(last):
                state_inputs[entry.name] = graph.placeholder(re.sub(r"\W", "_", entry.name))
            with graph.inserting_before(graph.output_node()):
                state_outputs[entry.name] = graph.call_function(aten.clone.default, (state_inputs[entry.name],))
        if last.next is not state_inputs[entry.name]:
            last.append(state_inputs[entry.name])  # moves the placeholder into position
        last = state_inputs[entry.name]
    graph.output_node().args = ((outputs[0], *(state_outputs[e.name] for e in want)),)
