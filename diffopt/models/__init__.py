"""Reference denoisers trained on real digits (weights ship with the package)."""

from diffopt.models.zoo import NULL_CLASS, REFERENCE_MODELS, example_inputs, get_spec, load

__all__ = ["REFERENCE_MODELS", "NULL_CLASS", "example_inputs", "get_spec", "load"]
