"""Pass lists as JSON: what ``diffopt tune`` saves and deployment loads, so that it applies
exactly the chosen passes with exactly their options.

A pass is written as ``{"pass": "<class name>", <option>: <value>, ...}`` with only the
options that differ from their defaults; tuples become lists and come back as tuples.
Passes whose options hold tensors or profiles (a length embedding, a Defo profile) are
refused by name: they are built in code, not from a file.

A pass class joins with ``@register_pass`` (``passes.base``); the built-in passes and the
plugins (``util.plugins``: entry points, ``DIFFOPT_PLUGINS``, ``--plugin``) are loaded before a
name is looked up, and a pass defined anywhere else is known once its module is imported. A
pass outside diffopt is written as ``"pass": "package.module:Class"``, which imports its
module when the file is read, so its pass files need no plugin option.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffopt.passes.base import PASS_TYPES, GraphPass
from diffopt.util.files import read_json, write_text
from diffopt.util.plugins import class_reference, import_package, imported_class


def registered_passes() -> dict[str, type[GraphPass]]:
    """Every registered pass class by name, the built-in ones included."""
    import_package("diffopt.passes")
    return dict(PASS_TYPES)


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(item, where) for item in value]
    if hasattr(value, "to_dict"):  # a part of a pass (CachePass' target, policy, predictor): an object with a kind
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(key): _plain(item, f"{where}.{key}") for key, item in value.items()}
    raise ValueError(
        f"{where} is a {type(value).__name__}: only numbers, strings, lists and objects are written to a pass file"
    )


def _tuples(value: Any) -> Any:
    return tuple(_tuples(item) for item in value) if isinstance(value, list) else value


def pass_to_dict(graph_pass: GraphPass) -> dict[str, Any]:
    """``graph_pass`` as a JSON-ready dict of its class and non-default options."""
    cls = type(graph_pass)
    known = registered_passes()
    if known.get(cls.__name__) is not cls:
        raise ValueError(f"{cls.__name__} cannot be written to a pass file; passes that can: {sorted(known)}")
    name = cls.__name__ if cls.__module__.startswith("diffopt.") else class_reference(cls)
    options = {}
    for option in dataclasses.fields(graph_pass):
        value = getattr(graph_pass, option.name)
        if option.default is not dataclasses.MISSING and value == option.default:
            continue
        options[option.name] = _plain(value, f"{name}.{option.name}")
    return {"pass": name, **options}


def pass_from_dict(data: Mapping[str, Any]) -> GraphPass:
    """Inverse of ``pass_to_dict``; unknown passes and options are errors that name them."""
    if not isinstance(data, Mapping) or "pass" not in data:
        raise ValueError(f"a pass is a JSON object with a 'pass' key naming its class, found {data!r}")
    name, known = data["pass"], registered_passes()
    if isinstance(name, str) and ":" in name:
        cls = imported_class(name, GraphPass, f"pass {name!r}")
    elif name in known:
        cls = known[name]
    else:
        raise ValueError(f"unknown pass {name!r}: expected one of {sorted(known)}, or 'package.module:Class'")
    known = {option.name for option in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known - {"pass"})
    if unknown:
        raise ValueError(f"{name} has no options {unknown}; its options are {sorted(known)}")
    return cls(**{key: _tuples(value) for key, value in data.items() if key != "pass"})


def save_passes(path: str | os.PathLike, passes: Sequence[GraphPass], **extra: Any) -> Path:
    """Write ``passes`` (and JSON-ready ``extra`` fields, e.g. the step count) to ``path``,
    replacing an existing file only once the new one is complete."""
    path = Path(path)
    text = json.dumps({"passes": [pass_to_dict(p) for p in passes], **extra}, indent=2)
    return write_text(path, text + "\n")


def load_passes(path: str | os.PathLike) -> tuple[list[GraphPass], dict[str, Any]]:
    """The passes of a pass file, and its other fields."""
    data = read_json(path, "a pass file")
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list):
        raise ValueError(f"{path} is not a pass file: expected a JSON object with a 'passes' list")
    return [pass_from_dict(item) for item in data["passes"]], {k: v for k, v in data.items() if k != "passes"}
