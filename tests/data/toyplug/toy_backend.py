"""A program backend outside diffopt: torch's, counting the variants it runs in a file named by TOY_BACKEND_LOG."""

import os
from typing import ClassVar

from diffopt.runtime.backends import TorchBackend, register_backend


@register_backend
class CountingBackend(TorchBackend):
    name: ClassVar[str] = "toy-counting"

    def run(self, variant, inputs):
        with open(os.environ["TOY_BACKEND_LOG"], "a") as log:
            log.write(variant + "\n")
        return super().run(variant, inputs)
