"""Calibration: run a few sampling trajectories and record per-layer activation statistics.

An ``ObservingBackend`` runs the program's graphs with an fx Interpreter that sees the
input and output of every linear op (``aten.linear``) at every step. Per layer it keeps,
averaged over samples and steps, the per-channel mean |input|, |output| and
|input increment| (vs the previous step of the same run), each min-max normalised per
sample as channel-aware SVD prescribes. The result is serialisable (``save`` / ``load``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import fx

from diffopt.denoiser import OptimizedDenoiser
from diffopt.graph_tools import module_path
from diffopt.program import StepProgram
from diffopt.runtime.sampler import Sampler

aten = torch.ops.aten
MAGNITUDES = ("input", "output", "increment")


def _normalised_channel_magnitude(value: torch.Tensor) -> torch.Tensor:
    """(B, ..., C) -> (B, C): mean |value| over tokens, min-max normalised per sample."""
    magnitude = value.detach().abs().reshape(value.shape[0], -1, value.shape[-1]).mean(1).double()
    low, high = magnitude.min(1, keepdim=True).values, magnitude.max(1, keepdim=True).values
    return (magnitude - low) / (high - low).clamp_min(1e-12)


def layer_key(node: fx.Node) -> str:
    """Statistics are keyed by the layer's module name (its node name if it has none)."""
    return module_path(node) or node.name


def unique_layer_keys(graph: fx.Graph, nodes: list[fx.Node]) -> dict[fx.Node, str]:
    """``layer_key`` of each of ``nodes``, made unique in graph order: a module called twice
    gets ``#2`` on its second call (DiT's block-0 embedder also conditions the output layer)."""
    keys, seen = {}, {}
    for node in nodes:
        key = layer_key(node)
        seen[key] = seen.get(key, 0) + 1
        keys[node] = key if seen[key] == 1 else f"{key}#{seen[key]}"
    return keys


@dataclass
class ActivationStatistics:
    """Per layer and magnitude kind: summed normalised channel magnitudes and their count."""

    sums: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, layer: str, kind: str, per_sample: torch.Tensor) -> None:
        sums, counts = self.sums.setdefault(layer, {}), self.counts.setdefault(layer, {})
        sums[kind] = sums.get(kind, 0) + per_sample.sum(0)
        counts[kind] = counts.get(kind, 0) + per_sample.shape[0]

    def mean(self, layer: str, kind: str) -> torch.Tensor:
        if layer not in self.sums or kind not in self.sums[layer]:
            raise KeyError(f"no {kind!r} statistics for layer {layer!r}; calibrated layers: {sorted(self.sums)[:8]}...")
        return self.sums[layer][kind] / self.counts[layer][kind]

    def channel_weights(self, layer: str, kind: str) -> torch.Tensor:
        """sqrt of the mean normalised magnitude, clamped below at max/1000 (channel-aware SVD)."""
        weights = self.mean(layer, kind).sqrt()
        return weights.clamp_min(float(weights.max()) / 1000)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"{layer}|{kind}": value.contiguous() for layer, kinds in self.sums.items()
                   for kind, value in kinds.items()}
        save_file(tensors, str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps({"counts": self.counts}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ActivationStatistics":
        from safetensors.torch import load_file

        path = Path(path)
        statistics = cls(counts=json.loads(path.with_suffix(".json").read_text())["counts"])
        for key, value in load_file(str(path.with_suffix(".safetensors"))).items():
            layer, kind = key.split("|")
            statistics.sums.setdefault(layer, {})[kind] = value
        return statistics


class _LinearObserver(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, backend: "ObservingBackend"):
        super().__init__(module)
        self.backend = backend

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if node.op == "call_function" and node.target == aten.linear.default:
            x = self.env[node.args[0]]
            self.backend.observe(layer_key(node), x, result)
        return result


class ObservingBackend:
    """A torch backend that records linear-layer statistics while it runs."""

    name = "torch-observing"

    def __init__(self, program: StepProgram, statistics: ActivationStatistics):
        self.program = program
        self.statistics = statistics
        self.previous_inputs: dict[str, torch.Tensor] = {}

    def observe(self, layer: str, x: torch.Tensor, y: torch.Tensor) -> None:
        self.statistics.add(layer, "input", _normalised_channel_magnitude(x))
        self.statistics.add(layer, "output", _normalised_channel_magnitude(y))
        previous = self.previous_inputs.get(layer)
        if previous is not None and previous.shape == x.shape:
            self.statistics.add(layer, "increment", _normalised_channel_magnitude(x - previous))
        self.previous_inputs[layer] = x.detach()

    def run(self, variant: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(_LinearObserver(self.program.variants[variant], self).run(*inputs))


def collect_activation_statistics(program: StepProgram, sampler: Sampler, conditions: Sequence[torch.Tensor],
                                  shape: Sequence[int], seeds: Sequence[int] = (0,)) -> ActivationStatistics:
    """Run ``sampler`` once per seed on ``program`` and return the linear layers' statistics."""
    statistics = ActivationStatistics()
    for seed in seeds:
        backend = ObservingBackend(program, statistics)
        sampler.sample(OptimizedDenoiser(program, backend=backend), conditions, shape=shape, seed=seed)
    return statistics
