"""Typed calibration statistics: what a calibration run measured, for the passes that read it.

``CalibrationStatistics`` holds both kinds one calibration run collects (``measure.calibration``):

- ``activations`` (``ActivationStatistics``): per linear layer, the per-channel mean
  |input|, |output| and |input increment|, min-max normalised per sample: channel-aware
  SVD's weights (``IncrementCalibratedCachePass``).
- ``temporal`` (``TemporalStatistics``): per observed input, its max |value| and max
  |step difference| (static quantization scales: Ditto's ``integer`` / ``difference``
  modes, ``StaticQuantizationPass``, row skipping), and per-step means of Ditto's metrics.

Layers are named by ``ir.layers`` (one scheme). One file format: JSON (``save`` / ``load``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffopt.util.files import read_json, write_text

FORMAT = "diffopt-calibration"
FORMAT_VERSION = 1
WIDTH_CLASSES = ("zero", "4bit", "8bit", "wider")  # |code| == 0, <= 7, <= 127, > 127
PAPER = {"cosine": 0.983, "zero": 0.445, "within_4bit": 0.960, "range_ratio": 1 / 9}  # Ditto, METHODS.md
ROW_THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)  # row skipping limits, relative to a layer's max |difference|
STEP_METRICS = ("cosine", "range_ratio", *WIDTH_CLASSES, "zero_rows", *(f"rows_below_{r:g}" for r in ROW_THRESHOLDS))


@dataclass
class ActivationStatistics:
    """Per layer and magnitude kind: summed normalised channel magnitudes and their count."""

    sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    source: str = field(default="", compare=False, repr=False)  # the file it was loaded from, for errors

    def add(self, layer: str, kind: str, per_sample: torch.Tensor) -> None:
        sums, counts = self.sums.setdefault(layer, {}), self.counts.setdefault(layer, {})
        sums[kind] = sums.get(kind, 0) + per_sample.sum(0)
        counts[kind] = counts.get(kind, 0) + per_sample.shape[0]

    def mean(self, layer: str, kind: str) -> torch.Tensor:
        if layer not in self.sums or kind not in self.sums[layer]:
            raise KeyError(
                f"no {kind!r} statistics for layer {layer!r}{_in(self.source)}; calibrated layers: "
                f"{sorted(self.sums)[:8]}... (statistics of another model? calibrate this one)"
            )
        return self.sums[layer][kind] / self.counts[layer][kind]

    def channel_weights(self, layer: str, kind: str) -> torch.Tensor:
        """sqrt of the mean normalised magnitude, clamped below at max/1000 (channel-aware SVD)."""
        weights = self.mean(layer, kind).sqrt()
        return weights.clamp_min(float(weights.max()) / 1000)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts,
            "sums": {
                layer: {kind: value.tolist() for kind, value in kinds.items()} for layer, kinds in self.sums.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActivationStatistics:
        sums = {
            layer: {kind: torch.tensor(value, dtype=torch.float64) for kind, value in kinds.items()}
            for layer, kinds in data["sums"].items()
        }
        return cls(sums, {layer: dict(kinds) for layer, kinds in data["counts"].items()})


@dataclass
class TemporalStatistics:
    """Per layer: op type, calibrated maxima, and per-step means of ``STEP_METRICS``."""

    bits: int = 8
    ops: dict[str, str] = field(default_factory=dict)
    input_absmax: dict[str, float] = field(default_factory=dict)
    difference_absmax: dict[str, float] = field(default_factory=dict)
    step_sums: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # layer -> metric -> per step
    step_counts: dict[str, list[int]] = field(default_factory=dict)  # layer -> samples per step
    source: str = field(default="", compare=False, repr=False)  # the file it was loaded from, for errors

    def input_range(self, layer: str) -> float:
        """Calibrated max |input| of ``layer`` (a static scale is ``quant.symmetric_scale`` of it)."""
        return self._lookup(self.input_absmax, layer)

    def difference_range(self, layer: str) -> float:
        """Calibrated max |input_t - input_prev| of ``layer``."""
        return self._lookup(self.difference_absmax, layer)

    def _lookup(self, table: dict[str, float], layer: str) -> float:
        if layer not in table:
            raise KeyError(
                f"layer {layer!r} was not calibrated{_in(self.source)}; calibrated layers: {sorted(table)[:6]}... "
                f"(statistics of another model? calibrate this one with calibrate_temporal or `diffopt calibrate`)"
            )
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

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "source"}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TemporalStatistics:
        return cls(**data)

    def report(self, per_layer: bool = False) -> str:
        """Model-wide numbers beside Ditto's published ones; optionally one line per layer."""
        within4 = lambda name=None: (
            (self.layer_mean(name, "zero") + self.layer_mean(name, "4bit"))
            if name
            else self.model_mean("zero") + self.model_mean("4bit")
        )
        lines = [
            f"temporal calibration: {len(self.step_sums)} observed inputs, int{self.bits} codes, "
            f"one static scale per layer",
            f"{'':34}{'diffopt':>10}{'Ditto paper':>14}",
            f"{'cosine similarity to previous step':34}{self.model_mean('cosine'):10.3f}{PAPER['cosine']:14.3f}",
            f"{'difference range / input range':34}{self.model_mean('range_ratio'):10.3f}{PAPER['range_ratio']:14.3f}",
            f"{'code differences exactly zero':34}{self.model_mean('zero'):10.1%}{PAPER['zero']:14.1%}",
            f"{'code differences within 4 bits':34}{within4():10.1%}{PAPER['within_4bit']:14.1%}",
            f"{'code differences wider than 8 bits':34}{self.model_mean('wider'):10.1%}{'':>14}",
            f"{'token rows entirely zero':34}{self.model_mean('zero_rows'):10.1%}{'':>14}",
            "rows skippable at threshold (x max |difference|): "
            + "  ".join(f"{r:g}: {self.model_mean(f'rows_below_{r:g}', 'linear'):.1%}" for r in ROW_THRESHOLDS)
            + "  (linear layers)",
        ]
        for op in sorted(set(self.ops.values())):
            lines.append(
                f"  {op:12} cos {self.model_mean('cosine', op):.3f}  zero {self.model_mean('zero', op):6.1%}"
                f"  within 4 bits {self.model_mean('zero', op) + self.model_mean('4bit', op):6.1%}"
            )
        if per_layer:
            lines.append(f"\n{'layer':44}{'op':>10}{'cos':>7}{'range':>7}{'zero':>7}{'<=4b':>7}{'rows0':>7}")
            for name in self.step_sums:
                lines.append(
                    f"{name:44}{self.ops[name]:>10}{self.layer_mean(name, 'cosine'):7.3f}"
                    f"{self.layer_mean(name, 'range_ratio'):7.3f}{self.layer_mean(name, 'zero'):7.1%}"
                    f"{within4(name):7.1%}{self.layer_mean(name, 'zero_rows'):7.1%}"
                )
        return "\n".join(lines)


@dataclass
class CalibrationStatistics:
    """Everything one calibration run measured (module docstring)."""

    activations: ActivationStatistics = field(default_factory=ActivationStatistics)
    temporal: TemporalStatistics = field(default_factory=TemporalStatistics)

    def save(self, path: str | Path) -> None:
        data = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "activations": self.activations.to_dict(),
            "temporal": self.temporal.to_dict(),
        }
        write_text(path, json.dumps(data))

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStatistics:
        """Statistics from ``path``, every section, layer and value checked (``_check_file``): a
        ``ValueError`` names the file, the layer and the field of the first bad value."""
        path = Path(path)
        data = read_json(path, "calibration statistics")
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is not a {FORMAT} file of version {FORMAT_VERSION} (write one with "
                f"diffopt.measure.calibration.calibrate(...).save(path) or `diffopt calibrate`)"
            )
        _check_file(path, data)
        activations = ActivationStatistics.from_dict(data["activations"])
        temporal = TemporalStatistics.from_dict(data["temporal"])
        activations.source = temporal.source = str(path)
        return cls(activations, temporal)


def _check_file(path: Path, data: dict) -> None:
    """Every section and value a statistics file must hold, with its type and range; the
    error names the file, the section, the layer and the field."""

    def fail(where: str, problem: str) -> None:
        raise ValueError(f"calibration statistics {path}: {where}: {problem}")

    def mapping(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            fail(where, f"expected an object, found {type(value).__name__}")
        return value

    def number(value: Any, where: str, positive: bool) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail(where, f"expected a finite number, found {value!r:.40}")
        if value < 0 or (positive and value == 0):
            fail(where, f"expected a {'positive' if positive else 'non-negative'} range, found {value!r}")

    activations = mapping(data.get("activations"), "section 'activations'")
    sums, counts = (mapping(activations.get(k), f"activations.{k}") for k in ("sums", "counts"))
    for layer, kinds in sums.items():
        for kind, values in mapping(kinds, f"activations.sums[{layer!r}]").items():
            where = f"activations.sums[{layer!r}][{kind!r}]"
            if not isinstance(values, list) or not values:
                fail(where, f"expected a non-empty list of numbers, found {values!r:.40}")
            for value in values:
                number(value, where, positive=False)
            count = mapping(counts.get(layer), f"activations.counts[{layer!r}]").get(kind)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                fail(f"activations.counts[{layer!r}][{kind!r}]", f"expected a count >= 1, found {count!r}")
    temporal = mapping(data.get("temporal"), "section 'temporal'")
    bits = temporal.get("bits")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        fail("temporal.bits", f"expected an int in [2, 16], found {bits!r}")
    for section in ("ops", "input_absmax", "difference_absmax", "step_sums", "step_counts"):
        mapping(temporal.get(section), f"temporal.{section}")
    for layer, value in temporal["input_absmax"].items():
        number(value, f"temporal.input_absmax[{layer!r}]", positive=True)  # a zero scale quantizes all to 0
    for layer, value in temporal["difference_absmax"].items():
        number(value, f"temporal.difference_absmax[{layer!r}]", positive=False)  # an input that never changes
    if temporal["difference_absmax"] and not any(temporal["difference_absmax"].values()):
        fail(
            "temporal.difference_absmax",
            "every layer's input difference is 0: the calibration never saw an input change between two steps "
            "(the latent changes at every step); calibrate again",
        )
    known = {f.name for f in dataclasses.fields(TemporalStatistics)} - {"source"}
    unknown = sorted(set(temporal) - known)
    if unknown:
        fail("section 'temporal'", f"unknown fields {unknown}")


def _in(source: str) -> str:
    return f" in {source}" if source else ""
