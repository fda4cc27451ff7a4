"""The HTTP side of serving, without Ray: request bodies in, samples out.

``POST /sample`` takes a JSON object:
- ``class_labels``: one label per sample (class-conditional models, e.g. the digits
  models), or ``conditions``: ``{name: base64 of a .npy array}`` for each condition input;
- ``seed`` (default 0), ``steps`` (default 50), ``guidance_scale`` (default 1; needs a
  server started with null conditions), ``format``: ``"npy"`` (default) or ``"png"`` (a
  grid, for one-channel images in [-1, 1]).
It answers the sample as ``.npy`` (or PNG), with the variants its steps ran in the header
``X-Diffopt-Variants``; a malformed request gets 400 with ``{"error": ...}`` naming the
field, a full server 503. ``GET /health`` answers ``{"status": "ok", "active", "waiting"}``.

``post_sample`` is the client: it retries what got no answer (a replica that died, a
restart, 502/503/504) with backoff, so an accepted request ends with its sample (a seeded
request gives the same one on any replica) or a ``ServingError`` that says what happened.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import torch

from diffopt.serving.engine import RequestError, Result

INT64_RANGE = (-(2**63), 2**63 - 1)
FIELDS = {"class_labels", "conditions", "seed", "steps", "guidance_scale", "format"}
FORMATS = {"npy": "application/octet-stream", "png": "image/png"}


def parse_request(body: bytes, condition_names: list[str]) -> dict[str, Any]:
    """The engine's ``submit`` arguments (and ``format``) from a request body; ``RequestError``
    names what is wrong."""
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"body: not JSON ({error})") from None
    except RecursionError:
        raise RequestError("body: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("body: expected a JSON object")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise RequestError(f"unknown fields {unknown}; the fields are {sorted(FIELDS)}")
    if ("class_labels" in data) == ("conditions" in data):
        raise RequestError("give exactly one of class_labels (a list of ints) or conditions ({name: base64 .npy})")
    if "class_labels" in data:
        labels = data["class_labels"]
        if len(condition_names) != 1:
            raise RequestError(f"class_labels: this model takes conditions {condition_names}: send conditions")
        if not isinstance(labels, list) or not labels or not all(type(v) is int for v in labels):
            raise RequestError(f"class_labels: a non-empty list of ints, found {labels!r:.60}")
        if not all(INT64_RANGE[0] <= v <= INT64_RANGE[1] for v in labels):
            raise RequestError(f"class_labels: ints within int64, found {max(labels, key=abs)!r:.40}")
        conditions = (torch.tensor(labels),)
    else:
        conditions = _decoded_conditions(data["conditions"], condition_names)
    output = data.get("format", "npy")
    if output not in FORMATS:
        raise RequestError(f"format: one of {sorted(FORMATS)}, found {output!r:.40}")
    arguments = {"seed": data.get("seed", 0), "steps": data.get("steps", 50)}
    for name, value in arguments.items():
        if type(value) is not int or not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
            raise RequestError(f"{name}: an int within int64, found {value!r:.40}")
    guidance = data.get("guidance_scale", 1.0)
    if type(guidance) not in (int, float):
        raise RequestError(f"guidance_scale: a number, found {guidance!r:.40}")
    if arguments["seed"] < 0:
        raise RequestError(f"seed: >= 0, found {arguments['seed']}")
    samples = conditions[0].shape[0] if conditions and conditions[0].dim() else 1
    return {
        **arguments,
        "conditions": conditions,
        "guidance_scale": float(guidance),
        "samples": samples,
        "format": output,
    }


def _decoded_conditions(given: Any, names: list[str]) -> tuple[torch.Tensor, ...]:
    if not isinstance(given, dict) or sorted(given) != sorted(names):
        found = sorted(given) if isinstance(given, dict) else type(given).__name__
        raise RequestError(f"conditions: an object with {names} (base64 .npy each), found {found}")
    tensors = []
    for name in names:
        try:
            array = np.load(io.BytesIO(base64.b64decode(given[name], validate=True)), allow_pickle=False)
        except (binascii.Error, ValueError, TypeError, OSError) as error:
            raise RequestError(f"conditions.{name}: not a base64 .npy array ({error})") from None
        tensors.append(_as_tensor(array, f"conditions.{name}"))
    return tuple(tensors)


def _as_tensor(array: np.ndarray, field: str) -> torch.Tensor:
    """A request's array as a tensor: any byte order, plain numeric dtypes only."""
    if array.dtype.names is not None or array.dtype.kind not in "biuf":
        raise RequestError(f"{field}: a numeric array (bool, int, uint or float), found dtype {array.dtype.descr}")
    try:
        return torch.from_numpy(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="), copy=False)))
    except TypeError as error:  # a dtype torch has no tensor of (e.g. uint32 in old torch)
        raise RequestError(f"{field}: dtype {array.dtype} is not supported ({error})") from None


def encode_result(result: Result, output: str) -> tuple[bytes, str]:
    """(body, content type) of a finished request."""
    if output == "png":
        return _png(result.sample), FORMATS["png"]
    buffer = io.BytesIO()
    np.save(buffer, result.sample.detach().cpu().numpy())
    return buffer.getvalue(), FORMATS["npy"]


def response_headers(result: Result) -> dict[str, str]:
    """What a sample's response says besides the sample: the variants its steps ran, the mean
    rows of the forwards it shared, and the replica's process id."""
    mean_rows = sum(result.batch_rows) / max(len(result.batch_rows), 1)
    return {
        "X-Diffopt-Variants": ",".join(result.variants),
        "X-Diffopt-Batch-Rows": f"{mean_rows:.2f}",
        "X-Diffopt-Pid": str(os.getpid()),
    }


def _png(samples: torch.Tensor) -> bytes:
    """One row of one-channel images in [-1, 1] as a PNG."""
    from PIL import Image

    if samples.dim() != 4 or samples.shape[1] != 1:
        raise RequestError(f"format: png needs one-channel images, this model makes shape {list(samples.shape)}")
    pixels = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    row = torch.cat(list(pixels), dim=1).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(row).save(buffer, format="PNG")
    return buffer.getvalue()


class ServingError(RuntimeError):
    """A request that ended without a sample: refused (4xx, the server's message) or not
    answered after every retry."""


RETRIED = {500, 502, 503, 504}  # a replica died mid-request, is restarting, or is full


def post_sample(url: str, payload: dict[str, Any], *, retries: int = 6, timeout: float = 120.0):
    """(sample array, response headers by lower-case name) of ``POST url`` with ``payload``;
    see the module docstring."""
    body, last = json.dumps(payload).encode(), None
    for attempt in range(retries + 1):
        request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                headers = {name.lower(): value for name, value in response.headers.items()}
                return np.load(io.BytesIO(response.read()), allow_pickle=False), headers
        except urllib.error.HTTPError as error:
            message = error.read().decode(errors="replace")
            if error.code not in RETRIED:
                raise ServingError(f"HTTP {error.code}: {message}") from None
            last = f"HTTP {error.code}: {message}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = f"no answer: {error}"
        time.sleep(min(0.5 * 2**attempt, 8.0))
    raise ServingError(f"{url}: no sample after {retries + 1} attempts; last: {last}")
