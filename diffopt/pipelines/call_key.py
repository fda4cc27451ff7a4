"""What a captured program bakes in, as hashable keys: one for a call's arguments, one for the model.

Capture turns tensor arguments into graph inputs with a dynamic batch dimension and bakes
everything else in: the other dimensions of every tensor, dtypes, devices, non-tensor
arguments (flags, ``cross_attention_kwargs``' LoRA scale, ``None`` for an optional input)
and the model itself (its module tree, attention processors, adapter settings, weights).
A program is reused for a call only when both keys are equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diffopt.capture import flatten_argument, infer_signature

BATCH = "B"  # a dimension that follows the call's batch size
ADAPTER_ATTRIBUTES = ("scaling", "_active_adapter", "merged_adapters", "_disable_adapters")  # peft's LoRA layers


def flatten_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Every argument as capture names its values (``capture.flatten_argument``)."""
    flat: dict[str, Any] = {}
    for name, value in arguments.items():
        flat.update(flatten_argument(name, value))
    return flat


def call_key(values: Mapping[str, Any]) -> tuple:
    """The key of a call's flattened arguments: tensors by shape (the latent's batch size as
    ``B``), dtype and device; other values by value."""
    batch = values[infer_signature(values).latent].shape[0]

    def freeze(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            shape = tuple(BATCH if i == 0 and size == batch else size for i, size in enumerate(value.shape))
            return ("tensor", shape, value.dtype, value.device)
        if isinstance(value, Mapping):
            return ("dict", tuple(sorted((str(k), freeze(v)) for k, v in value.items())))
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, tuple(freeze(v) for v in value))
        try:
            hash(value)
        except TypeError:
            return ("repr", repr(value))
        return value

    return tuple(sorted((name, freeze(value)) for name, value in values.items()))


def describe_change(before: tuple | None, after: tuple) -> str:
    """The arguments whose key entries differ, for the log line of a new capture."""
    if before is None:
        return "first call"
    old, new = dict(before), dict(after)
    changed = [name for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]
    return "; ".join(f"{name}: {_short(old.get(name))} -> {_short(new.get(name))}" for name in changed[:4])


def _short(entry: Any) -> str:
    if isinstance(entry, tuple) and entry and entry[0] == "tensor":
        return f"tensor{tuple(entry[1])} {str(entry[2]).removeprefix('torch.')}"
    return f"{entry!r:.60}" if entry is not None else "absent"


def model_fingerprint(model: torch.nn.Module) -> tuple:
    """What a program bakes in from ``model``: its module tree (LoRA layers, fused
    projections), attention processor types, peft adapter settings (active adapters, scales,
    merged), and each weight's identity, place and version (an in-place edit bumps it).
    Edits through ``tensor.data`` bypass the version counter and are not seen."""
    modules = []
    for name, module in model.named_modules():
        processor = module.__dict__.get("processor")
        adapters = tuple(_hashable(module.__dict__.get(a)) for a in ADAPTER_ATTRIBUTES if a in module.__dict__)
        modules.append((name, type(module), type(processor) if processor is not None else None, adapters))
    tensors = [
        (name, id(t), t._version, t.dtype, t.device, tuple(t.shape))
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    ]
    return tuple(modules), tuple(tensors)


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _hashable(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set)):
        return tuple(_hashable(v) for v in value)
    return value
