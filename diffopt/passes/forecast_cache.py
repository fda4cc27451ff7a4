"""Forecast caching: extrapolate module or block outputs in time instead of reusing them.

Before: every step computes the chosen targets. After: two variants.
- ``full`` computes them and updates, per target, the Newton divided differences of
  its value over the timesteps of the last ``order + 1`` full steps:
  ``f[t0]``, ``f[t0, t1]``, ..., ``f[t0 .. t_order]`` (``t0`` the newest).
- ``forecast`` evaluates the interpolating polynomial through those points at the
  current timestep, ``y(t) = f[t0] + (t - t0) (f[t0, t1] + (t - t1) (f[t0, t1, t2] + ...))``,
  in place of the target, so the target's work (and everything that only fed it) is
  gone from that graph.

Targets (``targets=``):
- ``"modules"``: each selected block's attention and feed-forward submodules (class
  names with ``Attention``, ``FeedForward`` or ``MLP``), or the modules named by
  ``modules=`` (regular expressions, full match). Their outputs are forecast; the
  block's gates, norms and residual adds stay live.
- ``"blocks"``: block residuals ``out - in``; consecutive selected blocks form one span
  whose summed residual is forecast as one value (forecasting is linear, so this equals
  forecasting each block's residual, at a fraction of the elementwise work).

Time is the program's timestep input (its second input), so the forecast follows the
sampler's real grid, uneven spacing included. Until ``order + 1`` full steps have run,
the polynomial uses the points there are (one point: plain reuse). The schedule is
periodic with ``warmup`` leading full steps (``Schedule.warmup``); any other plan can be
set afterwards with ``OptimizedDenoiser.with_schedule``.

What is TaylorSeer's and what is not: TaylorSeer (Liu et al. 2025) forecasts the same
module outputs with a Taylor series whose derivatives are backward finite differences
over the step index. For ``order=1`` on a uniform grid that is exactly this forecast. For
``order >= 2`` TaylorSeer's series is not the interpolating polynomial (its second
difference is centred one interval back); Newton's form is, so it is exact for features
that are polynomials of degree ``order`` in ``t``. FoCa (Zheng et al. 2025) views the
feature sequence as an ODE: it predicts recursively from the last two values, forecasts
included (BDF2), and corrects with the derivative at the last full step (Heun). Its
authors' code is not published; cache-dit implements it as a calibrator, and
``benchmarks/configs/forecast_correctors_dit-digits.json`` compares it with TaylorSeer
on the same cache schedule (``benchmarks/results/forecast_correctors_dit-digits.md``): on
dit-digits FoCa reached 36.2 dB against TaylorSeer's 43.7 (order 1) and 47.3 (order 2)
at the same MACs, so no corrector is implemented here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from diffopt.ir.annotations import NodeAnnotation, annotate
from diffopt.ir.blocks import block_chain, block_streams, first_and_last_streams, stream_named
from diffopt.ir.graph_tools import add_variant, placeholders, remove_dead_code, state_shape, thread_states
from diffopt.ir.program import StepProgram
from diffopt.ir.schedules import Schedule
from diffopt.ir.specs import BATCH, FORECAST, FULL, StateEntry
from diffopt.ir.validation import block_names, chain_names, require_int
from diffopt.passes.base import PassContext, PassKind, PassNotApplicable, VariantPass, register_pass

aten = torch.ops.aten
MAX_ORDER = 4  # highest forecast order accepted (see ForecastCachePass.__post_init__)
TARGET_KINDS = ("modules", "blocks")
_DEFAULT_MODULE_CLASSES = re.compile(r"Attention|FeedForward|MLP|Mlp")


@dataclass(frozen=True)
class ForecastTarget:
    """A value to forecast: a module's output, or the residual of blocks ``first..last``;
    one per stream for modules and blocks that pass several on (SD3 / Flux joint blocks)."""

    name: str  # the module, or "first..last" for a span of blocks (".streamK" where several)
    first: str
    last: str
    output: str  # the node ``last`` passes this value on as (variants keep node names)
    head: str | None = None  # a span: the node of ``first``'s stream it continues; None: a module output


@register_pass
@dataclass(frozen=True)
class ForecastCachePass(VariantPass):
    kind: ClassVar[PassKind] = PassKind.CACHE
    after: ClassVar[tuple[PassKind, ...]] = (PassKind.TEMPORAL_DIFFERENCE,)

    order: int = 1  # degree of the forecast polynomial; 0 is plain reuse
    period: int = 3  # a full step every `period` steps after the warm-up
    warmup: int = 1  # leading full steps
    targets: str = "modules"  # "modules" or "blocks"
    blocks: tuple[str, ...] | None = None  # which blocks of the chain; None: all
    modules: tuple[str, ...] | None = None  # targets="modules": regular expressions naming the modules
    container: str | tuple[str, ...] | None = None  # the chain(s) of blocks, see block_chain; None: the only one

    def __post_init__(self) -> None:
        object.__setattr__(self, "container", chain_names(self.name, self.container))
        require_int(self.name, "order", self.order, minimum=0)
        if self.order > MAX_ORDER:
            raise ValueError(
                f"{self.name}.order must be at most {MAX_ORDER}, found {self.order}: a polynomial through "
                f"{self.order + 1} full steps {self.period} steps apart is fitted only after "
                f"{self.warmup + self.order * self.period} steps, and extrapolating it amplifies each point's error "
                f"about 2^order-fold (TaylorSeer and diffusers' hook use order 1 or 2)"
            )
        require_int(self.name, "period", self.period, minimum=1)
        require_int(self.name, "warmup", self.warmup, minimum=1)
        if self.targets not in TARGET_KINDS:
            raise ValueError(f"{self.name}.targets must be one of {TARGET_KINDS}, found {self.targets!r}")
        if self.modules is not None and self.targets != "modules":
            raise ValueError(f"{self.name}.modules names modules to forecast: it needs targets='modules'")
        object.__setattr__(self, "blocks", block_names(self.name, self.blocks))
        if self.modules is not None:
            object.__setattr__(self, "modules", block_names(self.name, self.modules, field="modules"))
            for pattern in self.modules:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"{self.name}.modules: {pattern!r} is not a regular expression: {error}") from None

    def _chain(self, graph: fx.Graph) -> list[str]:
        chain = block_chain(graph, self.container, self.name)
        if self.blocks is None:
            return chain
        missing = sorted(set(self.blocks) - set(chain))
        if missing:
            raise ValueError(f"{self.name}: blocks {missing} are not in the chain {chain}")
        return [block for block in chain if block in self.blocks]

    def _targets(self, graph: fx.Graph) -> list[ForecastTarget]:
        chain = block_chain(graph, self.container, self.name)
        selected = self._chain(graph)
        if self.targets == "blocks":
            spans: list[list[str]] = []
            for block in selected:
                if spans and chain.index(block) == chain.index(spans[-1][-1]) + 1:
                    spans[-1].append(block)
                else:
                    spans.append([block])
            targets = []
            for span in spans:
                pairs = first_and_last_streams(graph, span[0], span[-1])[1]
                for index, (head, tail) in enumerate(pairs):
                    suffix = f".stream{index}" if len(pairs) > 1 else ""
                    name = f"{span[0]}..{span[-1]}{suffix}"
                    targets.append(ForecastTarget(name, span[0], span[-1], tail.output.name, head.output.name))
            return targets
        children = _child_modules(graph, selected)
        chosen = [
            name
            for name, class_name in children.items()
            if (
                any(re.fullmatch(p, name) for p in self.modules)
                if self.modules is not None
                else _DEFAULT_MODULE_CLASSES.search(class_name)
            )
        ]
        if not chosen:
            raise PassNotApplicable(
                f"{self.name}: no module to forecast in blocks {selected}; their submodules are "
                f"{sorted(children.items())}: name some with modules=, or use targets='blocks'"
            )
        targets = []
        for name in chosen:
            streams = block_streams(graph, name)
            for index, stream in enumerate(streams):
                suffix = f".stream{index}" if len(streams) > 1 else ""
                targets.append(ForecastTarget(f"{name}{suffix}", name, name, stream.output.name))
        return targets

    def rewrite(self, program: StepProgram, context: PassContext) -> StepProgram:
        targets = self._targets(program.variants[FULL].graph)
        forecast = add_variant(program, FORECAST, copy_of=FULL)
        clock: dict[str, dict[str, fx.Node]] = {}  # variant -> "time", "times", "count" nodes

        def update_clock(variant, graph, state):
            times, count = state
            time = _time_input(graph)
            clock[variant] = {"time": time, "times": times, "count": count}
            if variant != FULL:
                return times, count
            with graph.inserting_before(time.next):  # inserting_after would reverse the new nodes
                newest = graph.call_function(aten.unsqueeze.default, (time, 1))
                shifted = graph.call_function(aten.cat.default, ([newest, times], 1))
                new_times = graph.call_function(aten.slice.Tensor, (shifted, 1, 0, max(self.order, 1)))
                new_count = graph.call_function(aten.add.Tensor, (count, 1.0))
            return new_times, new_count

        program = thread_states(
            program,
            (
                StateEntry(f"{self.name}.times", (BATCH, max(self.order, 1)), torch.float32, self.name),
                StateEntry(f"{self.name}.full_steps", (BATCH,), torch.float32, self.name),
            ),
            update_clock,
        )
        for target in targets:
            value = _target_value(program.variants[FULL].graph, target)
            entries = tuple(
                StateEntry(f"{target.name}.{what}", state_shape(value), value.meta["val"].dtype, self.name)
                for what in ("forecast_value", *(f"forecast_difference{j}" for j in range(1, self.order + 1)))
            )

            def update(variant, graph, differences, target=target):
                details = {"target": target.name, "order": self.order, "period": self.period}
                if variant == FULL:
                    current = _target_value(graph, target, insert=True)
                    annotate(current, NodeAnnotation(FULL, self.name, details=details))
                    return _updated_differences(graph, current, differences, clock[variant])
                boundary = stream_named(graph, target.last, target.output)
                predicted = _evaluate(graph, differences, clock[variant], before=boundary.output)
                replacement = predicted
                if target.head is not None:
                    with graph.inserting_after(predicted):
                        replacement = graph.call_function(
                            aten.add.Tensor, (stream_named(graph, target.first, target.head).hidden_input, predicted)
                        )
                replacement.meta["val"] = boundary.output.meta["val"]  # later blocks find their input by shape
                annotate(
                    replacement, NodeAnnotation(FORECAST, self.name, reason=f"{target.name} forecast", details=details)
                )
                boundary.output.replace_all_uses_with(replacement)
                return differences

            program = thread_states(program, entries, update)
        remove_dead_code(forecast)
        schedule = Schedule(FULL, FORECAST, self.period, self.warmup)
        return dataclasses.replace(program, schedule=schedule)


def _child_modules(graph: fx.Graph, blocks: list[str]) -> dict[str, str]:
    """The direct submodules of ``blocks`` that produced nodes, name -> class name, in graph order."""
    found: dict[str, str] = {}
    for node in graph.nodes:
        for path, class_name in (node.meta.get("nn_module_stack") or {}).values():
            name = path.split(".", 1)[1] if "." in path else ""
            parent, _, _ = name.rpartition(".")
            if parent in blocks:
                found.setdefault(name, str(getattr(class_name, "__name__", class_name)).rsplit(".", 1)[-1])
    return found


def _time_input(graph: fx.Graph) -> fx.Node:
    """The timestep input as float32 (one cast node per graph, shared by every target)."""
    timestep = placeholders(graph)[1]
    for user in timestep.users:
        if (
            user.target == aten._to_copy.default
            and user.kwargs.get("dtype") == torch.float32
            and user.meta.get("forecast_time")
        ):
            return user
    with graph.inserting_after(placeholders(graph)[-1]):
        time = graph.call_function(aten._to_copy.default, (timestep,), {"dtype": torch.float32})
    time.meta["forecast_time"] = True
    return time


def _target_value(graph: fx.Graph, target: ForecastTarget, insert: bool = False) -> fx.Node:
    """The target's value: the module output, or ``out - in`` of the block span (inserted
    into the graph only with ``insert``; otherwise a shape-only stand-in for state specs)."""
    output = stream_named(graph, target.last, target.output).output
    if target.head is None:
        return output
    hidden_input = stream_named(graph, target.first, target.head).hidden_input
    if not insert:
        return output
    with graph.inserting_after(output):
        residual = graph.call_function(aten.sub.Tensor, (output, hidden_input))
    residual.meta["val"] = output.meta["val"]
    return residual


def _per_sample(graph: fx.Graph, column: fx.Node, like: torch.Tensor) -> fx.Node:
    """A (batch,) float32 node viewed to broadcast against values like ``like``, in its dtype."""
    node = graph.call_function(aten._to_copy.default, (column,), {"dtype": like.dtype})
    for _ in range(like.dim() - 1):
        node = graph.call_function(aten.unsqueeze.default, (node, -1))
    return node


def _node_time(graph: fx.Graph, clock: dict[str, fx.Node], j: int) -> fx.Node:
    return graph.call_function(aten.select.int, (clock["times"], 1, j))


def _updated_differences(
    graph: fx.Graph, current: fx.Node, old: tuple[fx.Node, ...], clock: dict[str, fx.Node]
) -> list[fx.Node]:
    """Newton's update with a new point ``(t, current)``: ``e0 = y``,
    ``e_j = (e_{j-1} - old_{j-1}) / (t - t_{j-1})`` where ``j`` earlier full steps exist, else 0."""
    new, like = [current], current.meta["val"]
    with graph.inserting_before(current.next):
        for j in range(1, len(old)):
            gap = graph.call_function(aten.sub.Tensor, (clock["time"], _node_time(graph, clock, j - 1)))
            known = graph.call_function(aten.ge.Scalar, (clock["count"], float(j)))
            safe_gap = graph.call_function(aten.where.ScalarOther, (known, gap, 1.0))
            change = graph.call_function(aten.sub.Tensor, (new[-1], old[j - 1]))
            difference = graph.call_function(aten.div.Tensor, (change, _per_sample(graph, safe_gap, like)))
            mask = graph.call_function(aten._to_copy.default, (known,), {"dtype": torch.float32})
            new.append(graph.call_function(aten.mul.Tensor, (difference, _per_sample(graph, mask, like))))
    return new


def _evaluate(graph: fx.Graph, differences: tuple[fx.Node, ...], clock: dict[str, fx.Node], before: fx.Node) -> fx.Node:
    """Horner's scheme on Newton's form at the current time."""
    value, *higher = differences
    with graph.inserting_before(before):
        result = None
        for j in reversed(range(len(higher))):
            gap = graph.call_function(aten.sub.Tensor, (clock["time"], _node_time(graph, clock, j)))
            term = higher[j] if result is None else graph.call_function(aten.add.Tensor, (higher[j], result))
            result = graph.call_function(aten.mul.Tensor, (term, _per_sample(graph, gap, before.meta["val"])))
        return value if result is None else graph.call_function(aten.add.Tensor, (value, result))
