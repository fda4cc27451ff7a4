"""Which layers to keep in float when a program is quantized: each layer's measured int8 error.

``int8_layer_errors`` quantizes one linear layer at a time (``quantization``, a pass such as
``StaticQuantizationPass(weight_form="qdq")``, with a layer policy that leaves every other
layer float) and measures the relative error of the denoiser's output over the plain
program's, max |difference| / max |plain|, on the given step inputs (several timesteps of a
real run's inputs, e.g.). ``largest_errors`` names the ``count`` layers with the largest
errors: the layers a ``LayerPolicy`` keeps float (``{"quantize": False}``) so that the
quantized program's error is smallest for what it keeps in int8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from diffopt.ir.layers import linear_layers
from diffopt.ir.policy import LayerPolicy
from diffopt.ir.program import StepProgram
from diffopt.ir.specs import FULL
from diffopt.ir.statistics import CalibrationStatistics
from diffopt.passes.base import GraphPass, PassContext, Pipeline
from diffopt.runtime.denoiser import OptimizedDenoiser


def int8_layer_errors(
    program: StepProgram,
    quantization: GraphPass,
    calibration: CalibrationStatistics,
    step_inputs: Sequence[Sequence[torch.Tensor]],
    progress: bool = True,
) -> dict[str, float]:
    """Per linear layer of the unoptimized ``program``: the largest relative output error over
    ``step_inputs`` (each ``(latent, timestep, *conditions)``) with that layer alone quantized."""
    expected = [_step(OptimizedDenoiser(program), inputs) for inputs in step_inputs]
    layers = list(dict.fromkeys(linear_layers(program.variants[FULL].graph).values()))
    errors = {}
    for layer in tqdm(layers, desc="int8 error per layer", disable=not progress, leave=False):
        policy = LayerPolicy(global_settings={"quantize": False}, exact_names={layer: {"quantize": True}})
        quantized, _ = Pipeline([quantization]).run(program.copy(), PassContext(statistics=calibration, policy=policy))
        one = OptimizedDenoiser(quantized)
        errors[layer] = max(
            float((_step(one, inputs) - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
            for inputs, reference in zip(step_inputs, expected)
        )
    return errors


def largest_errors(errors: dict[str, float], count: int) -> list[str]:
    """The ``count`` layers of ``errors`` with the largest errors, largest first."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count is the number of layers to keep float (an int >= 0), found {count!r}")
    return sorted(errors, key=errors.get, reverse=True)[:count]


def float_policy(layers: Sequence[str]) -> LayerPolicy:
    """The layer policy that keeps ``layers`` float and lets a quantization pass do the rest."""
    return LayerPolicy(exact_names={layer: {"quantize": False} for layer in layers})


def _step(denoiser, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    latent = inputs[0]
    out, _ = denoiser.step(0, *inputs, state=denoiser.init_state(latent.shape[0]))
    return out
