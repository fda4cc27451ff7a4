"""What the command line hands to ``enable``, ``tune`` and ``export`` besides zoo names: a
diffusers pipeline saved with ``save_pretrained`` (loaded offline), a user's factory
``package.module:function``, and pipeline call arguments from a file.

- ``load_pipeline(DIR)``: ``DiffusionPipeline.from_pretrained(DIR, local_files_only=True)``,
  with the components the pipeline was saved without (``text_encoder=None``: a pipeline
  driven by ``prompt_embeds``) passed as ``None`` so diffusers does not ask for them.
- ``load_factory("package.module:function")``: the function called without arguments;
  it returns a diffusers pipeline, or ``(model, example_inputs)`` /
  ``(model, example_inputs, scheduler_config)`` for a bare denoiser.
- ``load_calls(FILE)``: a JSON list of call-argument objects, or a ``torch.save``d list of
  dicts (tensors allowed, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_PROMPTS = ("a photo of a cat", "a red car on a street", "a mountain lake at dawn", "a bowl of fruit")


@dataclass(frozen=True)
class BareModel:
    """A denoiser without a pipeline: the model, example inputs for capture, and optionally
    the noise schedule config a bundle records."""

    model: torch.nn.Module
    inputs: tuple | dict
    scheduler_config: dict | None = None


def load_pipeline(directory: str | os.PathLike) -> Any:
    """The diffusers pipeline saved in ``directory``, loaded without network access."""
    from diffusers import DiffusionPipeline

    directory = Path(directory)
    index = directory / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{directory} is not a saved diffusers pipeline: it has no model_index.json")
    try:
        entries = json.loads(index.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{index} is not valid JSON: {error}") from None
    missing = {
        name: None
        for name, entry in entries.items()
        if not name.startswith("_") and isinstance(entry, list) and entry[:1] == [None]
    }
    return DiffusionPipeline.from_pretrained(directory, local_files_only=True, **missing)


def load_factory(spec: str) -> Any:
    """A diffusers pipeline or a ``BareModel`` from ``package.module:function``."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--model {spec!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--model {spec!r}: cannot import {module_name!r} ({error})") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ValueError(f"--model {spec!r}: {module_name} has no function {function_name!r}")
    made = factory()
    if isinstance(made, tuple) and len(made) in (2, 3) and isinstance(made[0], torch.nn.Module):
        return BareModel(*made)
    if hasattr(made, "components") and callable(made):
        return made
    raise ValueError(
        f"--model {spec!r} returned a {type(made).__name__}: expected a diffusers pipeline, "
        f"(model, example_inputs) or (model, example_inputs, scheduler_config)"
    )


def load_calls(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Pipeline call arguments from a ``.json`` or ``.pt`` file (a list of dicts)."""
    path = Path(path)
    if path.suffix == ".json":
        try:
            calls = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    elif path.suffix == ".pt":
        calls = torch.load(path, weights_only=True)
    else:
        raise ValueError(f"{path}: calls are a .json or a .pt file (a list of call-argument dicts)")
    if not isinstance(calls, list) or not calls or not all(isinstance(c, Mapping) for c in calls):
        raise ValueError(f"{path} does not hold a non-empty list of call-argument dicts")
    return [dict(call) for call in calls]


def default_calls(pipe: Any, count: int) -> list[dict[str, Any]]:
    """``count`` seeded calls a pipeline can take without the user's arguments: prompts for
    a pipeline with a text encoder, class labels for a class-conditional one."""
    parameters = inspect.signature(type(pipe).__call__).parameters
    if "prompt" in parameters and getattr(pipe, "text_encoder", None) is not None:
        return [{"prompt": DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)], "seed": i} for i in range(count)]
    if "class_labels" in parameters:
        return [{"class_labels": [i % 10], "seed": i} for i in range(count)]
    raise ValueError(
        f"{type(pipe).__name__} has no text encoder or class labels to make calls from: "
        f"give --calls FILE (a .json or .pt list of call arguments, e.g. prompt_embeds)"
    )
