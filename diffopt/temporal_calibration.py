"""Temporal calibration: how much the inputs of linear ops change from one step to the next.

``InsertObserversPass`` rewrites every ``op(x, ...)`` among Linear, Conv1d/2d and the
attention products (query, key, value of ``scaled_dot_product_attention``) into
``op(observe_input(x, layer), ...)``; ``observe_input`` returns ``x`` unchanged and hands
it to the active ``TemporalRecorder``. ``calibrate_temporal`` runs a few sampling
trajectories twice on the observed program (deterministic sampling, so both passes see
the same activations): first for ranges (per-layer |input| and |step difference| maxima,
which become the static scales), then, with those scales fixed, for the per-step
statistics of Ditto (METHODS.md, method 1): cosine similarity to the previous step, range
of the difference vs range of the input, and the difference of int8 codes
``Q(x_t) - Q(x_prev)`` (one static per-layer scale): fraction zero / within 4 bits / 8
bits / wider, and the fraction of token rows whose code difference is entirely zero.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import fx
from tqdm import tqdm

from diffopt.analysis import LINEAR_OPS
from diffopt.calibration import unique_layer_keys
from diffopt.denoiser import OptimizedDenoiser
from diffopt.passes.base import GraphPass, PassContext, PassResult
from diffopt.program import StepProgram
from diffopt.quantization import WIDTH_CLASSES, code_width_fractions, quantize, symmetric_scale
from diffopt.runtime.sampler import Sampler

aten = torch.ops.aten
ATTENTION_OPERANDS = ("query", "key", "value")
PAPER = {"cosine": 0.983, "zero": 0.445, "within_4bit": 0.960, "range_ratio": 1 / 9}  # Ditto, METHODS.md
ROW_THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # row skipping limits, relative to a layer's max |difference|
STEP_METRICS = ("cosine", "range_ratio", *WIDTH_CLASSES, "zero_rows", *(f"rows_below_{r:g}" for r in ROW_THRESHOLDS))


def observed_operands(graph: fx.Graph) -> list[tuple[str, str, fx.Node, int]]:
    """(layer name, op type, op node, argument index) of every observed activation input."""
    ops = [n for n in graph.nodes if n.op == "call_function"
           and (n.target in LINEAR_OPS or n.target == aten.scaled_dot_product_attention.default)]
    found = []
    for node, key in unique_layer_keys(graph, ops).items():
        if node.target in LINEAR_OPS:
            found.append((key, node.target.overloadpacket.__name__, node, 0))
        else:
            found.extend((f"{key}.{operand}", "attention", node, index)
                         for index, operand in enumerate(ATTENTION_OPERANDS))
    return found


_RECORDERS: list["TemporalRecorder"] = []


def observe_input(value: torch.Tensor, layer: str) -> torch.Tensor:
    """Graph-visible observer: hands ``value`` to the active recorder; returns it unchanged."""
    if _RECORDERS:
        _RECORDERS[-1].observe(layer, value)
    return value


@dataclass(frozen=True)
class InsertObserversPass(GraphPass):
    """Insert ``observe_input`` on the activation input of every observed op (all variants)."""

    def call(self, program: StepProgram, context: PassContext) -> PassResult:
        modified = False
        for module in program.variants.values():
            for layer, _, node, index in observed_operands(module.graph):
                value = node.args[index]
                if getattr(value, "target", None) is observe_input:
                    continue
                with module.graph.inserting_before(node):
                    observed = module.graph.call_function(observe_input, (value, layer))
                observed.meta["val"] = value.meta.get("val")
                node.update_arg(index, observed)
                modified = True
            module.recompile()
        return PassResult(program, modified)


def rows(value: torch.Tensor, op: str) -> torch.Tensor:
    """(rows, channels): a token row of a linear / attention input, a pixel of a conv input."""
    if op in ("conv1d", "conv2d"):
        value = value.movedim(1, -1)
    return value.reshape(-1, value.shape[-1])


@dataclass
class TemporalStatistics:
    """Per layer: op type, calibrated maxima, and per-step means of ``STEP_METRICS``."""

    bits: int = 8
    ops: dict[str, str] = field(default_factory=dict)
    input_absmax: dict[str, float] = field(default_factory=dict)
    difference_absmax: dict[str, float] = field(default_factory=dict)
    step_sums: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # layer -> metric -> per step
    step_counts: dict[str, list[int]] = field(default_factory=dict)  # layer -> samples per step

    def input_scale(self, layer: str, bits: int) -> float:
        return symmetric_scale(self._lookup(self.input_absmax, layer), bits)

    def difference_scale(self, layer: str, bits: int) -> float:
        return symmetric_scale(self._lookup(self.difference_absmax, layer), bits)

    def _lookup(self, table: dict[str, float], layer: str) -> float:
        if layer not in table:
            raise KeyError(f"layer {layer!r} was not calibrated; calibrated layers: {sorted(table)[:6]}... "
                           f"(calibrate the same model with calibrate_temporal or `diffopt calibrate`)")
        return table[layer]

    def add_step(self, layer: str, step: int, metrics: dict[str, float], count: int) -> None:
        sums = self.step_sums.setdefault(layer, {m: [] for m in STEP_METRICS})
        counts = self.step_counts.setdefault(layer, [])
        while len(counts) <= step:
            counts.append(0)
            for values in sums.values():
                values.append(0.0)
        counts[step] += count
        for metric, value in metrics.items():
            sums[metric][step] += value * count

    def per_step(self, layer: str, metric: str) -> list[float]:
        """Mean of ``metric`` at each step (NaN at step 0, which has no previous step)."""
        counts = self.step_counts[layer]
        return [s / c if c else math.nan for s, c in zip(self.step_sums[layer][metric], counts)]

    def layer_mean(self, layer: str, metric: str) -> float:
        counts = self.step_counts[layer]
        return sum(self.step_sums[layer][metric]) / max(sum(counts), 1)

    def model_mean(self, metric: str, op: str | None = None) -> float:
        """Mean over layers (each layer's steps weighted equally), optionally of one op type."""
        layers = [name for name in self.step_sums if op is None or self.ops[name] == op]
        return sum(self.layer_mean(name, metric) for name in layers) / max(len(layers), 1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "TemporalStatistics":
        return cls(**json.loads(Path(path).read_text()))

    def report(self, per_layer: bool = False) -> str:
        """Model-wide numbers beside Ditto's published ones; optionally one line per layer."""
        within4 = lambda name=None: (self.layer_mean(name, "zero") + self.layer_mean(name, "4bit")) if name \
            else self.model_mean("zero") + self.model_mean("4bit")
        lines = [f"temporal calibration: {len(self.step_sums)} observed inputs, int{self.bits} codes, "
                 f"one static scale per layer",
                 f"{'':34}{'diffopt':>10}{'Ditto paper':>14}",
                 f"{'cosine similarity to previous step':34}{self.model_mean('cosine'):10.3f}{PAPER['cosine']:14.3f}",
                 f"{'difference range / input range':34}{self.model_mean('range_ratio'):10.3f}"
                 f"{PAPER['range_ratio']:14.3f}",
                 f"{'code differences exactly zero':34}{self.model_mean('zero'):10.1%}{PAPER['zero']:14.1%}",
                 f"{'code differences within 4 bits':34}{within4():10.1%}{PAPER['within_4bit']:14.1%}",
                 f"{'code differences wider than 8 bits':34}{self.model_mean('wider'):10.1%}{'':>14}",
                 f"{'token rows entirely zero':34}{self.model_mean('zero_rows'):10.1%}{'':>14}",
                 "rows skippable at threshold (x max |difference|): " + "  ".join(
                     f"{r:g}: {self.model_mean(f'rows_below_{r:g}', 'linear'):.1%}" for r in ROW_THRESHOLDS)
                 + "  (linear layers)"]
        for op in sorted(set(self.ops.values())):
            lines.append(f"  {op:12} cos {self.model_mean('cosine', op):.3f}  zero {self.model_mean('zero', op):6.1%}"
                         f"  within 4 bits {self.model_mean('zero', op) + self.model_mean('4bit', op):6.1%}")
        if per_layer:
            lines.append(f"\n{'layer':44}{'op':>10}{'cos':>7}{'range':>7}{'zero':>7}{'<=4b':>7}{'rows0':>7}")
            for name in self.step_sums:
                lines.append(f"{name:44}{self.ops[name]:>10}{self.layer_mean(name, 'cosine'):7.3f}"
                             f"{self.layer_mean(name, 'range_ratio'):7.3f}{self.layer_mean(name, 'zero'):7.1%}"
                             f"{within4(name):7.1%}{self.layer_mean(name, 'zero_rows'):7.1%}")
        return "\n".join(lines)


class TemporalRecorder:
    """Receives observed inputs during sampling runs; ``phase`` is "ranges" or "codes"."""

    def __init__(self, statistics: TemporalStatistics, ops: dict[str, str], phase: str):
        self.statistics, self.ops, self.phase = statistics, ops, phase
        self.start_run()

    def start_run(self) -> None:
        self.previous: dict[str, torch.Tensor] = {}
        self.steps: dict[str, int] = defaultdict(int)

    def __enter__(self) -> "TemporalRecorder":
        _RECORDERS.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        _RECORDERS.remove(self)

    def observe(self, layer: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        previous = self.previous.get(layer)
        step = self.steps[layer]
        self.steps[layer] += 1
        if self.phase == "ranges":
            self._observe_range(layer, value, previous)
            self.previous[layer] = value
        else:
            codes = quantize(value, self.statistics.input_scale(layer, self.statistics.bits), self.statistics.bits)
            if previous is not None:
                self._observe_step(layer, step, value, codes, previous)
            self.previous[layer] = torch.stack([value, codes])

    def _observe_range(self, layer: str, value: torch.Tensor, previous: torch.Tensor | None) -> None:
        table = self.statistics
        table.input_absmax[layer] = max(table.input_absmax.get(layer, 0.0), float(value.abs().max()))
        if previous is not None:
            change = float((value - previous).abs().max())
            table.difference_absmax[layer] = max(table.difference_absmax.get(layer, 0.0), change)

    def _observe_step(self, layer: str, step: int, value: torch.Tensor, codes: torch.Tensor,
                      previous: torch.Tensor) -> None:
        previous_value, previous_codes = previous
        batch = value.shape[0]
        flat, flat_previous = value.reshape(batch, -1), previous_value.reshape(batch, -1)
        cosine = torch.nn.functional.cosine_similarity(flat, flat_previous, dim=1, eps=1e-12).mean()
        difference = flat - flat_previous
        ranges = (difference.amax(1) - difference.amin(1)) / (flat.amax(1) - flat.amin(1)).clamp_min(1e-12)
        code_difference = codes - previous_codes
        op = self.ops[layer]
        row_change = rows(value - previous_value, op).abs().amax(1)
        limit = self.statistics.difference_absmax.get(layer, 0.0)
        metrics = {"cosine": float(cosine), "range_ratio": float(ranges.mean()),
                   **code_width_fractions(code_difference),
                   "zero_rows": float((rows(code_difference, op).abs().amax(1) == 0).float().mean()),
                   **{f"rows_below_{r:g}": float((row_change <= r * limit).float().mean()) for r in ROW_THRESHOLDS}}
        self.statistics.add_step(layer, step, metrics, batch)


def calibrate_temporal(program: StepProgram, sampler: Sampler, conditions: Sequence[torch.Tensor],
                       shape: Sequence[int], seeds: Sequence[int] = (0,), bits: int = 8,
                       progress: bool = True) -> TemporalStatistics:
    """Observe ``program`` over one sampling run per seed (twice: ranges, then codes)."""
    from diffopt.optimize import optimize

    if len(program.variants) != 1:
        raise ValueError(f"calibrate the unoptimized program (one variant); this one has {sorted(program.variants)}")
    observed = optimize(program, [InsertObserversPass()])
    ops = {layer: op for layer, op, _, _ in observed_operands(program.variants[program.schedule.refresh].graph)}
    statistics = TemporalStatistics(bits=bits, ops=ops)
    runs = [(phase, seed) for phase in ("ranges", "codes") for seed in seeds]
    for phase, seed in tqdm(runs, desc="calibrating", disable=not progress, leave=False):
        with TemporalRecorder(statistics, ops, phase):
            sampler.sample(OptimizedDenoiser(observed.program), conditions, shape=shape, seed=seed)
    return statistics
