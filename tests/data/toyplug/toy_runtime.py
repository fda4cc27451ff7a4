"""A bundle runtime outside diffopt: onnx's reference evaluator (plain numpy) runs each variant file."""

from typing import ClassVar

import numpy as np
import torch
from onnx.reference import ReferenceEvaluator

from diffopt.runtime.runtimes import register_runtime


@register_runtime
class ReferenceRuntime:
    name: ClassVar[str] = "onnx-reference"
    device = torch.device("cpu")

    def __init__(self, bundle):
        self.manifest = bundle.manifest
        self.evaluators = {
            name: ReferenceEvaluator(str(bundle.directory / variant.file))
            for name, variant in bundle.manifest.variants.items()
        }

    @property
    def variants(self):
        return tuple(self.manifest.variants)

    def run(self, variant, inputs):
        names = [spec.name for spec in self.manifest.variants[variant].inputs]
        feeds = {name: tensor.detach().numpy() for name, tensor in zip(names, inputs, strict=True)}
        return tuple(torch.from_numpy(np.ascontiguousarray(out)) for out in self.evaluators[variant].run(None, feeds))
