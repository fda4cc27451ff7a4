"""Predictors: what stands in for a cache target on the steps it does not run.

A predictor is plain tensor code, written as a small class:
- ``state(value)``: its state tensors, named, given the target's value (batch first);
  they start at zero at every sampling run;
- ``update(state, value, clock)`` on full steps: the new state, having seen ``value``;
- ``predict(state, clock)`` on the other steps: the value that stands in;
- optionally ``clock_state(column)`` and ``clock_update(clock)``: state shared by every
  target of the cache (when the full steps were), updated once per full step, after the
  targets' updates have read it.

``clock`` holds per-sample float32 columns: ``t`` (the timestep input), ``step`` (the step
index in the run, where ``uses_step``) and the shared clock state. ``CachePass`` traces
``update`` and ``predict`` into aten nodes (``trace_into``) and threads the state through
every variant, so a predictor is exported, compiled and batched like the rest of the
graph. Write it with broadcasting ops
(``column[:, None, None]``, ``torch.where``), never with explicit sizes: the traces at two
batch sizes must be the same graph, or it is refused by name.

Registered (``@register_predictor``, looked up by ``kind`` in pass files):
- ``reuse``: the last full value;
- ``newton``: the interpolating polynomial through the last ``order + 1`` full values over
  the sampler's timesteps (Newton's divided differences; ``ForecastCachePass``'s);
- ``taylorseer``: diffusers' TaylorSeer hook: derivatives by recursive finite differences
  over the step index, a Taylor series in the step offset since the last full step;
- ``learned``: per step, fixed weights over the last ``history`` full values, fitted in
  closed form on calibration trajectories (``measure.predictor_fit``; L2P's idea).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from diffopt.util.plugins import class_reference, imported_class
from diffopt.util.validation import require_int

PREDICTORS: dict[str, type[Predictor]] = {}
Clock = Mapping[str, torch.Tensor]  # "t", "step": per-sample float32 columns


def register_predictor(cls: type[Predictor]) -> type[Predictor]:
    """Class decorator: ``cls`` can be named by its ``kind`` in a pass file."""
    PREDICTORS[cls.kind] = cls
    return cls


def per_sample(column: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (batch,) column broadcast against ``like`` (batch first), in ``like``'s dtype."""
    return column.to(like.dtype)[(slice(None),) + (None,) * (like.dim() - 1)]


class Predictor:
    """Base of the predictors (see the module docstring). ``reuses`` marks a predictor whose
    stand-in is a stored value (its variant is ``cached``, not ``forecast``). ``constants``
    are tensors the graphs hold (fitted weights); ``update`` and ``predict`` find them in
    ``state`` under their names."""

    kind: ClassVar[str]
    reuses: ClassVar[bool] = False
    uses_step: ClassVar[bool] = False  # the clock holds the step index (a counter threaded for it)

    def state(self, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """Example state tensors (batch first): only their shapes and dtypes are used."""
        raise NotImplementedError

    def clock_state(self, column: torch.Tensor) -> dict[str, torch.Tensor]:
        """Example shared state tensors (batch first), given a (batch,) float32 column."""
        return {}

    def clock_update(self, clock: Clock) -> dict[str, torch.Tensor]:
        """The shared state after a full step (``clock`` holds its values before it)."""
        return {}

    def constants(self) -> dict[str, torch.Tensor]:
        return {}

    def update(self, state: dict[str, torch.Tensor], value: torch.Tensor, clock: Clock) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, state: dict[str, torch.Tensor], clock: Clock) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        kind = self.kind if PREDICTORS.get(self.kind) is type(self) else class_reference(type(self))
        return {"kind": kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


@register_predictor
@dataclass(frozen=True)
class Reuse(Predictor):
    kind: ClassVar[str] = "reuse"
    reuses: ClassVar[bool] = True

    def state(self, value):
        return {"stored": value}

    def update(self, state, value, clock):
        return {"stored": value}

    def predict(self, state, clock):
        return state["stored"]


@register_predictor
@dataclass(frozen=True)
class Newton(Predictor):
    """The polynomial through the last ``order + 1`` full values, in the timestep: Newton's
    divided differences ``f[t0], f[t0,t1], ...`` (``t0`` the newest), evaluated by Horner.
    Until ``order + 1`` full steps have run it uses the points there are."""

    kind: ClassVar[str] = "newton"
    order: int = 1

    def __post_init__(self):
        require_int("newton predictor", "order", self.order, minimum=0)

    def clock_state(self, column):
        return {"times": column[:, None].expand(-1, max(self.order, 1)), "full_steps": column}

    def clock_update(self, clock):
        shifted = torch.cat([clock["t"][:, None], clock["times"]], dim=1)[:, : max(self.order, 1)]
        return {"times": shifted, "full_steps": clock["full_steps"] + 1.0}

    def state(self, value):
        return {self._name(j): value for j in range(self.order + 1)}

    @staticmethod
    def _name(j: int) -> str:
        return "forecast_value" if j == 0 else f"forecast_difference{j}"

    def update(self, state, value, clock):
        t, times, count = clock["t"], clock["times"], clock["full_steps"]
        new = [value]
        for j in range(1, self.order + 1):
            known = count >= j
            gap = torch.where(known, t - times[:, j - 1], 1.0)
            difference = (new[-1] - state[self._name(j - 1)]) / per_sample(gap, value)
            new.append(difference * per_sample(known.to(torch.float32), value))
        return {self._name(j): d for j, d in enumerate(new)}

    def predict(self, state, clock):
        t, times = clock["t"], clock["times"]
        result = state[self._name(self.order)]
        for j in range(self.order - 1, -1, -1):
            result = state[self._name(j)] + per_sample(t - times[:, j], result) * result
        return result


@register_predictor
@dataclass(frozen=True)
class TaylorSeer(Predictor):
    """diffusers' ``TaylorSeerState``: on a full step ``F0 = value``, ``F(j+1) = (F_j -
    F_j,old) / (step - last full step)`` for the orders the earlier updates gave; predicted:
    ``sum_j F_j offset^j / j!`` with ``offset`` the steps since the last full one."""

    kind: ClassVar[str] = "taylorseer"
    uses_step: ClassVar[bool] = True
    order: int = 1

    def __post_init__(self):
        require_int("taylorseer predictor", "order", self.order, minimum=0)

    def clock_state(self, column):
        return {"last_step": column, "updates": column}

    def clock_update(self, clock):
        return {"last_step": clock["step"], "updates": clock["updates"] + 1.0}

    def state(self, value):
        return {f"factor{j}": value for j in range(self.order + 1)}

    def update(self, state, value, clock):
        delta = torch.where(clock["updates"] > 0, clock["step"] - clock["last_step"], 1.0)
        new = [value]
        for j in range(self.order):
            known = per_sample((clock["updates"] > j).to(torch.float32), value)
            new.append((new[j] - state[f"factor{j}"]) / per_sample(delta, value) * known)
        return {f"factor{j}": factor for j, factor in enumerate(new)}

    def predict(self, state, clock):
        offset = clock["step"] - clock["last_step"]
        result = state["factor0"]
        for j in range(1, self.order + 1):
            coefficient = offset**j / math.factorial(j)
            result = result + state[f"factor{j}"] * per_sample(coefficient, result)
        return result


@register_predictor
@dataclass(frozen=True)
class Learned(Predictor):
    """``y_k = sum_j weights[k][j] * v_j``: at step k, fixed weights over the last ``history``
    full values (``v_0`` the newest). ``weights`` holds one row per step of the run it was
    fitted for (``measure.predictor_fit``); rows of full steps are unused."""

    kind: ClassVar[str] = "learned"
    uses_step: ClassVar[bool] = True
    history: int = 2
    weights: tuple[tuple[float, ...], ...] = ()

    def __post_init__(self):
        require_int("learned predictor", "history", self.history, minimum=1)
        rows = self.weights
        if not isinstance(rows, (tuple, list)) or not rows:
            raise ValueError("learned predictor: weights is a non-empty list of rows, one per step (fit them first)")
        for index, row in enumerate(rows):
            if not isinstance(row, (tuple, list)) or len(row) != self.history:
                raise ValueError(f"learned predictor: weights[{index}] has {self.history} numbers, found {row!r:.60}")
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in row):
                raise ValueError(f"learned predictor: weights[{index}] holds finite numbers, found {row!r:.60}")
        object.__setattr__(self, "weights", tuple(tuple(float(w) for w in row) for row in rows))

    def state(self, value):
        return {f"full{j}": value for j in range(self.history)}

    def update(self, state, value, clock):
        return {"full0": value, **{f"full{j}": state[f"full{j - 1}"] for j in range(1, self.history)}}

    def constants(self):
        return {"weights": torch.tensor(self.weights, dtype=torch.float32)}

    def predict(self, state, clock):
        row = clock["step"].to(torch.int64).clamp(0, len(self.weights) - 1)
        weights = state["weights"][row]  # (batch, history)
        result = state["full0"] * per_sample(weights[:, 0], state["full0"])
        for j in range(1, self.history):
            result = result + state[f"full{j}"] * per_sample(weights[:, j], result)
        return result


def part_from_dict(data: Any, base: type, registry: Mapping[str, type], where: str) -> Any:
    """A cache part (target, policy or predictor): ``data`` itself when it is one, else the
    registered class its pass-file dict (``{"kind": ..., options}``) or kind names; unknown
    kinds and options are named. A class given as ``"package.module:Class"`` is imported."""
    if isinstance(data, base):
        return data
    if isinstance(data, str):
        data = {"kind": data}
    kind = data.get("kind") if isinstance(data, Mapping) else None
    cls = registry.get(kind) if isinstance(kind, str) else None
    if cls is None and isinstance(kind, str) and ":" in kind:
        cls = imported_class(kind, base, where)
    if cls is None:
        raise ValueError(f"{where}: an object with a 'kind' in {sorted(registry)}, found {data!r:.80}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - {"kind"})
    if unknown:
        raise ValueError(f"{where}: {kind!r} has no options {unknown}; its options are {sorted(known)}")
    return cls(**{key: _tuples(value) for key, value in data.items() if key != "kind"})


def _tuples(value: Any) -> Any:
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


# tracing


@dataclass(frozen=True)
class Traced:
    """A function traced to aten: its graph and the names of its inputs and outputs."""

    graph: fx.Graph
    outputs: tuple[str, ...]


def trace(
    function: Callable[..., dict[str, torch.Tensor] | torch.Tensor], inputs: Mapping[str, torch.Tensor]
) -> Traced:
    """``function(**inputs)`` traced on zeros like ``inputs`` into an aten graph (one placeholder per
    input, in ``inputs``' order); its result (a tensor, or a dict of tensors) in ``outputs``."""
    names = list(inputs)
    outputs: list[str] = []

    def flat(*values):
        result = function(**dict(zip(names, values)))
        if isinstance(result, torch.Tensor):
            outputs[:] = ["value"]
            return (result,)
        outputs[:] = list(result)
        return tuple(result.values())

    with torch.no_grad():
        module = make_fx(flat)(*(torch.zeros_like(value) for value in inputs.values()))  # distinct tensors
    return Traced(module.graph, tuple(outputs))


def trace_checked(
    owner: str, function: Callable, inputs: Mapping[str, torch.Tensor], batch_axis_inputs: Sequence[str]
) -> Traced:
    """``trace`` at the inputs' batch and at one more: a predictor whose graph depends on the
    batch size (explicit sizes) is refused, naming it."""
    traced = trace(function, inputs)
    wider = {
        name: torch.cat([value, value[:1]]) if name in batch_axis_inputs else value for name, value in inputs.items()
    }
    if _code(trace(function, wider).graph) != _code(traced.graph):
        raise ValueError(
            f"{owner}: its traced graph changes with the batch size (it uses explicit sizes, e.g. view or "
            f"expand with numbers); write it with broadcasting (column[:, None], torch.where)"
        )
    return traced


def _code(graph: fx.Graph) -> str:
    return fx.GraphModule(torch.nn.Module(), graph).code


def trace_into(graph: fx.Graph, traced: Traced, arguments: Sequence[fx.Node]) -> dict[str, fx.Node]:
    """Copy ``traced``'s nodes into ``graph`` at its insertion point, its placeholders bound
    to ``arguments`` (in order); its outputs by name."""
    placeholders = [node for node in traced.graph.nodes if node.op == "placeholder"]
    values = dict(zip(placeholders, arguments, strict=True))
    result = graph.graph_copy(traced.graph, values)
    result = result if isinstance(result, (tuple, list)) else (result,)
    return dict(zip(traced.outputs, result, strict=True))
