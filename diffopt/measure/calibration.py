"""Calibration: observer nodes + sampling runs -> ``CalibrationStatistics``.

``calibrate`` inserts observer nodes (``passes.observers``) into the unoptimized program
and runs a few sampling trajectories on it through the instrumented interpreter; a
``CalibrationCollector`` hook receives every observed value. Sampling is deterministic,
so it runs each seed twice and both passes see the same activations:

1. ranges: per observed input its max |value| and max |step difference| (the static
   scales), and per linear layer the per-channel mean |input|, |output| and |input
   increment|, min-max normalised per sample (channel-aware SVD's weights);
2. codes: with those scales fixed, the per-step statistics of Ditto (METHODS.md, method
   1): cosine similarity to the previous step, range of the difference vs range of the
   input, and the difference of int8 codes ``Q(x_t) - Q(x_prev)`` (one static per-layer
   scale): fraction zero / within 4 bits / 8 bits / wider, and the fraction of token rows
   whose code difference is entirely zero or below row-skipping limits.

One run feeds every pass that reads statistics (channel-aware ICC, Ditto's static
modes, static quantization) in one ``optimize()`` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from tqdm import tqdm

from diffopt.ir.program import StepProgram
from diffopt.ir.statistics import ROW_THRESHOLDS, CalibrationStatistics, TemporalStatistics
from diffopt.measure.interpreter import InstrumentedBackend, NodeHook
from diffopt.passes.base import Pipeline
from diffopt.passes.observers import InsertObserversPass, is_observer, observed_values
from diffopt.quant.arithmetic import code_width_fractions, quantize, symmetric_scale
from diffopt.runtime.denoiser import OptimizedDenoiser
from diffopt.sampling.sequential import Sampler

PHASES = ("ranges", "codes")


def _normalised_channel_magnitude(value: torch.Tensor) -> torch.Tensor:
    """(B, ..., C) -> (B, C): mean |value| over tokens, min-max normalised per sample."""
    magnitude = value.detach().abs().reshape(value.shape[0], -1, value.shape[-1]).mean(1).double()
    low, high = magnitude.min(1, keepdim=True).values, magnitude.max(1, keepdim=True).values
    return (magnitude - low) / (high - low).clamp_min(1e-12)


def rows(value: torch.Tensor, op: str) -> torch.Tensor:
    """(rows, channels): a token row of a linear / attention input, a pixel of a conv input."""
    if op in ("conv1d", "conv2d"):
        value = value.movedim(1, -1)
    return value.reshape(-1, value.shape[-1])


class CalibrationCollector(NodeHook):
    """Receives every observed value of one sampling run in one ``phase`` (module docstring)."""

    def __init__(self, statistics: CalibrationStatistics, ops: dict[str, str], phase: str):
        self.statistics, self.ops, self.phase = statistics, ops, phase
        self.previous: dict[str, torch.Tensor] = {}
        self.step_index = 0

    def begin(self, variant: str, step_index: int) -> None:
        self.step_index = step_index

    def on_node(self, node: fx.Node, args: Sequence[Any], result: Any, released: Sequence[fx.Node]) -> None:
        if not is_observer(node):
            return
        _, layer, role, _ = node.args
        value = result.detach().float()
        if role == "output":
            if self.phase == "ranges" and self.ops[layer] == "linear":
                self.statistics.activations.add(layer, "output", _normalised_channel_magnitude(value))
            return
        previous = self.previous.get(layer)
        if self.phase == "ranges":
            self._observe_range(layer, value, previous)
            self.previous[layer] = value
            return
        temporal = self.statistics.temporal
        codes = quantize(value, symmetric_scale(temporal.input_range(layer), temporal.bits), temporal.bits)
        if previous is not None:
            self._observe_step(layer, self.step_index, value, codes, previous)
        self.previous[layer] = torch.stack([value, codes])

    def _observe_range(self, layer: str, value: torch.Tensor, previous: torch.Tensor | None) -> None:
        table = self.statistics.temporal
        table.input_absmax[layer] = max(table.input_absmax.get(layer, 0.0), float(value.abs().max()))
        linear = self.ops[layer] == "linear"
        if linear:
            self.statistics.activations.add(layer, "input", _normalised_channel_magnitude(value))
        if previous is not None:
            change = float((value - previous).abs().max())
            table.difference_absmax[layer] = max(table.difference_absmax.get(layer, 0.0), change)
            if linear:
                self.statistics.activations.add(layer, "increment", _normalised_channel_magnitude(value - previous))

    def _observe_step(
        self, layer: str, step: int, value: torch.Tensor, codes: torch.Tensor, previous: torch.Tensor
    ) -> None:
        previous_value, previous_codes = previous
        batch = value.shape[0]
        flat, flat_previous = value.reshape(batch, -1), previous_value.reshape(batch, -1)
        cosine = torch.nn.functional.cosine_similarity(flat, flat_previous, dim=1, eps=1e-12).mean()
        difference = flat - flat_previous
        ranges = (difference.amax(1) - difference.amin(1)) / (flat.amax(1) - flat.amin(1)).clamp_min(1e-12)
        code_difference = codes - previous_codes
        op = self.ops[layer]
        row_change = rows(value - previous_value, op).abs().amax(1)
        limit = self.statistics.temporal.difference_absmax.get(layer, 0.0)
        metrics = {
            "cosine": float(cosine),
            "range_ratio": float(ranges.mean()),
            **code_width_fractions(code_difference),
            "zero_rows": float((rows(code_difference, op).abs().amax(1) == 0).float().mean()),
            **{f"rows_below_{r:g}": float((row_change <= r * limit).float().mean()) for r in ROW_THRESHOLDS},
        }
        self.statistics.temporal.add_step(layer, step, metrics, batch)


def calibrate(
    program: StepProgram,
    sampler: Sampler,
    conditions: Sequence[torch.Tensor],
    shape: Sequence[int],
    seeds: Sequence[int] = (0,),
    bits: int = 8,
    progress: bool = True,
) -> CalibrationStatistics:
    """Observe ``program`` over one sampling run per seed and phase (module docstring)."""
    if len(program.variants) != 1:
        raise ValueError(f"calibrate the unoptimized program (one variant); this one has {sorted(program.variants)}")
    if not seeds:
        raise ValueError("calibrate needs at least one seed")
    observed, _ = Pipeline([InsertObserversPass()]).run(program.copy())
    watched = observed_values(next(iter(observed.variants.values())).graph).values()
    ops = {value.layer: value.op for value in watched}
    statistics = CalibrationStatistics(temporal=TemporalStatistics(bits=bits, ops=ops))
    runs = [(phase, seed) for phase in PHASES for seed in seeds]
    for phase, seed in tqdm(runs, desc="calibrating", disable=not progress, leave=False):
        collector = CalibrationCollector(statistics, ops, phase)
        denoiser = OptimizedDenoiser(observed, backend=InstrumentedBackend(observed, [collector]))
        sampler.sample(denoiser, conditions, shape=shape, seed=seed)
    return statistics
