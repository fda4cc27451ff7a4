"""Fitting the ``learned`` cache predictor: least squares over calibration trajectories.

1. The calibration runs (``sample``, any seeds and conditions) sample with the cache
   itself, its ``guide`` predictor standing in on the cached steps, so the values the
   fitted predictor will see are those of a cached trajectory, not of the plain one. A hook
   records each cache target's value (``passes.caching.targets``: a module or span output,
   or a span residual ``out - in``) at every full step, and at every cached step from the
   ``full`` variant run on the same inputs alongside (its outputs discarded): the value the
   predictor should have given there.
2. For the plan the policy lowers to (``steps`` steps), each step ``k`` that is not a full
   step gets weights ``w_k`` over the last ``history`` full values before it (the newest
   first; missing ones count as zero): the ridge-regularised least-squares solution of
   ``value_k ~ sum_j w_kj v_j`` over every sample, element and target, in float64. That is
   a ``history x history`` system per step: seconds on a CPU.

The fitted ``Learned`` predictor holds the table (rows of full steps are unused); it is
fitted for one plan and step count, and saved in pass files like any option (its
``weights``). ``learned_candidate`` makes a scored tune candidate's cache use one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from diffopt.ir.blocks import stream_named
from diffopt.ir.program import StepProgram
from diffopt.ir.specs import FULL
from diffopt.measure.interpreter import InstrumentedBackend, NodeHook
from diffopt.measure.plan_search import fixed_plan_cache
from diffopt.measure.workload import Configuration
from diffopt.passes.caching.policies import Policy
from diffopt.passes.caching.predictors import Learned, Newton, Predictor
from diffopt.passes.caching.rewrite import cache_rewrite
from diffopt.passes.caching.targets import Target
from diffopt.passes.registry import pass_to_dict
from diffopt.runtime.denoiser import OptimizedDenoiser

LEARNED_HISTORY = 2  # full values a tune-fitted predictor weighs
RIDGE = 1e-8  # relative to the mean diagonal of each system: keeps steps with missing history solvable


class _TargetRecorder(NodeHook):
    """Records each target's value in the ``full`` variant at every step (runs of ``steps``
    steps, back to back)."""

    def __init__(self, nodes: list[tuple[str, str | None]], steps: int):
        self.nodes, self.steps = nodes, steps
        self.values: list[dict[int, list[torch.Tensor]]] = [{} for _ in nodes]  # target -> step -> runs' values
        self.step, self.recording = 0, False
        self._seen: dict[str, torch.Tensor] = {}

    def begin(self, variant: str, step_index: int) -> None:
        self.step = step_index % self.steps
        self.recording = variant == FULL
        self._seen = {}

    def on_node(self, node, args, result, released) -> None:
        if not self.recording or not any(node.name in pair for pair in self.nodes):
            return
        self._seen[node.name] = result
        for index, (output, hidden_input) in enumerate(self.nodes):
            if output in self._seen and (hidden_input is None or hidden_input in self._seen):
                if node.name in (output, hidden_input):
                    value = self._seen[output] - (self._seen[hidden_input] if hidden_input else 0)
                    self.values[index].setdefault(self.step, []).append(value.detach().to(torch.float64).flatten(1))


class _AlongsideBackend(InstrumentedBackend):
    """Runs ``full`` alongside every other variant, on its inputs, for the hooks only."""

    def run(self, variant, inputs):
        if variant != FULL:
            super().run(FULL, inputs)
            self.step_index -= 1  # the step is the variant's
        return super().run(variant, inputs)


def record_targets(
    program: StepProgram, target: Target, steps: int, sample: Callable[[OptimizedDenoiser], Any]
) -> list[list[torch.Tensor]]:
    """Per target of ``target`` in ``program`` (plain or cached), per step, its ``full``
    values over the runs ``sample(denoiser)`` makes (each run ``steps`` steps) as (samples,
    elements) float64; on cached steps the ``full`` variant runs alongside to give them."""
    graph = program.variants[FULL].graph
    nodes = []
    for cache_target in target.select(graph, "learned predictor fit"):
        output = stream_named(graph, cache_target.last, cache_target.output).output.name
        hidden = None
        if cache_target.head is not None:
            hidden = stream_named(graph, cache_target.first, cache_target.head).hidden_input.name
        nodes.append((output, hidden))
    recorder = _TargetRecorder(nodes, steps)
    sample(OptimizedDenoiser(program, backend=_AlongsideBackend(program, [recorder])))
    recorded = []
    for values in recorder.values:
        if sorted(values) != list(range(steps)):
            raise ValueError(f"learned predictor fit: the runs made {sorted(values)[-1] + 1} steps, not {steps}")
        recorded.append([torch.cat(values[k]) for k in range(steps)])
    return recorded


def fit_learned(
    program: StepProgram,
    target: Target,
    policy: Policy,
    steps: int,
    history: int,
    sample: Callable[[OptimizedDenoiser], Any],
    guide: Predictor | None = None,
) -> Learned:
    """The ``Learned`` predictor for ``target`` under ``policy`` over ``steps`` steps, fitted
    on the runs ``sample(denoiser)`` makes with the plain ``program`` cached by ``guide``
    (default: first-order Newton), see the module docstring."""
    cached = cache_rewrite(program.copy(), "learned predictor fit", target, policy, guide or Newton(order=1))
    recorded = record_targets(cached, target, steps, sample)
    schedule = policy.schedule("cached")
    full = [schedule.variant_at(k) == FULL for k in range(steps)]
    rows = []
    for k in range(steps):
        earlier = [j for j in range(k) if full[j]][::-1][:history]
        if full[k] or not earlier:
            rows.append((1.0,) + (0.0,) * (history - 1))
            continue
        system = torch.zeros(history, history, dtype=torch.float64)
        right = torch.zeros(history, dtype=torch.float64)
        for values in recorded:
            columns = [values[j] for j in earlier]
            for a, first in enumerate(columns):
                right[a] += (first * values[k]).sum()
                for b, second in enumerate(columns):
                    system[a, b] += (first * second).sum()
        used = len(earlier)
        ridge = RIDGE * float(system.diagonal()[:used].mean()) + 1e-30
        solved = torch.linalg.solve(system[:used, :used] + ridge * torch.eye(used, dtype=torch.float64), right[:used])
        rows.append(tuple(float(w) for w in solved) + (0.0,) * (history - used))
    return Learned(history=history, weights=tuple(rows))


def learned_candidate(
    row: dict, program: StepProgram, sample: Callable[[OptimizedDenoiser, int], Any], history: int = LEARNED_HISTORY
) -> Configuration | None:
    """``row`` (a scored tune candidate) with its cache's predictor replaced by a ``Learned``
    one fitted for its plan and step count on the runs ``sample(denoiser, steps)`` makes (the
    caller's calibration inputs; it scores the result on others); None when ``row`` is not
    one ``CachePass`` with a fixed plan, or already uses a learned predictor."""
    cache = fixed_plan_cache(row)
    if cache is None or isinstance(cache.predictor, Learned):
        return None
    steps = row["steps"]
    fitted = fit_learned(
        program, cache.target, cache.policy, steps, history, lambda denoiser: sample(denoiser, steps), cache.predictor
    )
    item = pass_to_dict(dataclasses.replace(cache, predictor=fitted))
    return Configuration(f"{row['name']}, learned h{history}", (item,), steps, family=row["family"])
