"""OpenAI's images API in front of a diffusers pipeline: request bodies in, images out.

``POST /v1/images/generations`` takes OpenAI's fields (``prompt``, ``n``, ``size`` as
``"WIDTHxHEIGHT"``, ``response_format``: ``"b64_json"`` only, as nothing is hosted;
``model`` and ``user`` are accepted and ignored) and the diffusion fields OpenAI lacks:
``seed`` (default: a random one, reported back), ``num_inference_steps``,
``guidance_scale``, ``negative_prompt``, ``output_format`` (``"png"``, default, or
``"npy"``: the pipeline's float image array, for exact comparisons) and ``embeddings``
(``{argument: base64 .npy}`` for the pipeline's ``*_embeds`` / ``*_mask`` arguments: a
pipeline saved without its text encoder takes prompt embeddings instead of a prompt). A
class-conditional pipeline (``DiTPipeline``) takes its class as the prompt: a label id
(``"7"``) or one of its label names.

It answers ``{"created", "data": [{"b64_json"}, ...], "seed"}``. A malformed request gets
400 with OpenAI's error shape, ``{"error": {"message", "type": "invalid_request_error",
"param", "code"}}``, naming the field in ``param``; a full server 503 (``server_error``).

``post_images`` is the client: it retries what got no answer (a replica that died, a
restart, 5xx) with backoff; a seeded request gives the same images on any replica.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffopt.serving.engine import MAX_STEPS, RequestError

PATH = "/v1/images/generations"
FIELDS = {
    "prompt",
    "n",
    "size",
    "response_format",
    "output_format",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "embeddings",
    "model",
    "user",
}
MAX_IMAGES = 8  # per request
MAX_SIDE = 4096
MAX_PROMPT = 10_000  # characters
SEED_RANGE = (0, 2**63 - 1)
OUTPUT_FORMATS = ("png", "npy")


@dataclass(frozen=True)
class ImagesRequest:
    """A parsed request: the pipeline call's arguments, its seed and how to answer."""

    call: dict[str, Any]
    seed: int
    output_format: str


def parse_images_request(
    body: bytes, parameters: Collection[str], labels: Mapping[str, int] | None = None
) -> ImagesRequest:
    """The pipeline call of a request body, for a pipeline whose ``__call__`` takes
    ``parameters`` (a class-conditional one: ``labels``, name to class id, may be empty);
    ``RequestError`` names the field that is wrong."""
    data = _json_object(body)
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise RequestError(f"{unknown[0]}: unknown field; the fields are {sorted(FIELDS)}", param=unknown[0])
    if data.get("response_format", "b64_json") != "b64_json":
        raise RequestError(
            f"response_format: only 'b64_json' (this server hosts no URLs), found {data['response_format']!r:.40}",
            param="response_format",
        )
    output_format = data.get("output_format", "png")
    if output_format not in OUTPUT_FORMATS:
        raise RequestError(
            f"output_format: one of {OUTPUT_FORMATS}, found {output_format!r:.40}", param="output_format"
        )
    n = _int(data, "n", 1, 1, MAX_IMAGES)
    seed = _int(data, "seed", None, *SEED_RANGE)
    call: dict[str, Any] = {"output_type": "np"}
    embeddings = _embeddings(data.get("embeddings"), parameters) if "embeddings" in data else {}
    call |= embeddings
    if "class_labels" in parameters and "prompt" not in parameters:
        call["class_labels"] = [_class_of(data.get("prompt"), labels or {})] * n
    else:
        _prompt(data, embeddings, parameters, call)
        if n != 1 or "num_images_per_prompt" in parameters:
            _take(call, parameters, "num_images_per_prompt", n, "n")
    if "size" in data:
        width, height = _size(data["size"])
        _take(call, parameters, "width", width, "size")
        _take(call, parameters, "height", height, "size")
    if "num_inference_steps" in data:
        call["num_inference_steps"] = _int(data, "num_inference_steps", None, 1, MAX_STEPS)
    if "guidance_scale" in data:
        guidance = data["guidance_scale"]
        if type(guidance) not in (int, float) or not math.isfinite(guidance):
            raise RequestError(f"guidance_scale: a finite number, found {guidance!r:.40}", param="guidance_scale")
        _take(call, parameters, "guidance_scale", float(guidance), "guidance_scale")
    if "negative_prompt" in data:
        negative = data["negative_prompt"]
        if not isinstance(negative, str) or len(negative) > MAX_PROMPT:
            raise RequestError(f"negative_prompt: a string of at most {MAX_PROMPT} characters", param="negative_prompt")
        _take(call, parameters, "negative_prompt", negative, "negative_prompt")
    elif "negative_prompt_embeds" in embeddings and "negative_prompt" in parameters:
        call["negative_prompt"] = None  # PixArt's default negative prompt is "", which may not come with embeddings
    if seed is None:
        seed = int.from_bytes(np.random.default_rng().bytes(7), "little")
    return ImagesRequest(call, seed, output_format)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"body: not JSON ({error})", param="body") from None
    except RecursionError:
        raise RequestError("body: JSON nested too deeply", param="body") from None
    if not isinstance(data, dict):
        raise RequestError("body: expected a JSON object", param="body")
    return data


def _int(data: Mapping[str, Any], name: str, default: int | None, lowest: int, highest: int) -> int | None:
    value = data.get(name, default)
    if value is default:
        return value
    if type(value) is not int or not lowest <= value <= highest:
        raise RequestError(f"{name}: an int in [{lowest}, {highest}], found {value!r:.40}", param=name)
    return value


def _take(call: dict[str, Any], parameters: Collection[str], argument: str, value: Any, field: str) -> None:
    """``call[argument] = value`` if the pipeline takes ``argument``; else a ``RequestError`` on ``field``."""
    if argument not in parameters:
        raise RequestError(f"{field}: this pipeline takes no {argument}", param=field)
    call[argument] = value


def _prompt(data: Mapping[str, Any], embeddings: Mapping[str, Any], parameters: Collection[str], call: dict) -> None:
    prompt = data.get("prompt")
    if "prompt_embeds" in embeddings:
        if prompt is not None:
            raise RequestError("prompt: give a prompt or embeddings.prompt_embeds, not both", param="prompt")
        return
    if not isinstance(prompt, str) or not prompt or len(prompt) > MAX_PROMPT:
        raise RequestError(f"prompt: a non-empty string of at most {MAX_PROMPT} characters", param="prompt")
    _take(call, parameters, "prompt", prompt, "prompt")


def _class_of(prompt: Any, labels: Mapping[str, int]) -> int:
    """A class-conditional pipeline's class from the prompt: an id or a label name."""
    if isinstance(prompt, str) and prompt.strip().isdigit():
        return int(prompt.strip())
    if isinstance(prompt, str) and prompt.strip().lower() in labels:
        return labels[prompt.strip().lower()]
    names = f", or one of {sorted(labels)[:10]}" if labels else ""
    raise RequestError(f"prompt: this pipeline is class-conditional: a class id such as '3'{names}", param="prompt")


def _size(size: Any) -> tuple[int, int]:
    width, _, height = size.partition("x") if isinstance(size, str) else ("", "", "")
    if not (width.isdigit() and height.isdigit()) or not all(1 <= int(s) <= MAX_SIDE for s in (width, height)):
        raise RequestError(f"size: 'WIDTHxHEIGHT' with sides in [1, {MAX_SIDE}], found {size!r:.40}", param="size")
    return int(width), int(height)


def _embeddings(given: Any, parameters: Collection[str]) -> dict[str, torch.Tensor]:
    takes = sorted(p for p in parameters if p.endswith(("_embeds", "_mask")))
    if not isinstance(given, dict) or not given or not set(given) <= set(takes):
        found = sorted(given) if isinstance(given, dict) else type(given).__name__
        raise RequestError(f"embeddings: an object of {takes} (base64 .npy each), found {found}", param="embeddings")
    tensors = {}
    for name, encoded in given.items():
        field = f"embeddings.{name}"
        try:
            array = np.load(io.BytesIO(base64.b64decode(encoded, validate=True)), allow_pickle=False)
        except (binascii.Error, ValueError, TypeError, OSError) as error:
            raise RequestError(f"{field}: not a base64 .npy array ({error})", param=field) from None
        if array.dtype.kind not in "biuf" or array.dtype.names is not None:
            raise RequestError(f"{field}: a numeric array, found dtype {array.dtype.descr}", param=field)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise RequestError(f"{field}: values must be finite (found NaN or inf)", param=field)
        array = array.astype(array.dtype.newbyteorder("="), copy=False)
        tensors[name] = torch.from_numpy(
            np.ascontiguousarray(array.astype(np.float32) if array.dtype.kind == "f" else array)
        )
    return tensors


def images_response(images: np.ndarray, seed: int, output_format: str) -> dict[str, Any]:
    """The response body of a request's images ((n, H, W, C) floats in [0, 1])."""
    return {
        "created": int(time.time()),
        "data": [{"b64_json": _encoded(image, output_format)} for image in images],
        "seed": seed,
    }


def _encoded(image: np.ndarray, output_format: str) -> str:
    buffer = io.BytesIO()
    if output_format == "npy":
        np.save(buffer, np.asarray(image, dtype=np.float32))
    else:
        from PIL import Image

        pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def decode_image(entry: Mapping[str, str]) -> np.ndarray:
    """One ``data`` entry of a response as an array: the float array of an ``npy`` answer,
    the uint8 pixels of a PNG."""
    raw = base64.b64decode(entry["b64_json"])
    if raw.startswith(b"\x93NUMPY"):
        return np.load(io.BytesIO(raw), allow_pickle=False)
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(raw)))


class ImagesError(RuntimeError):
    """A request that ended without images: refused (4xx, with the server's error) or not
    answered after every retry."""

    def __init__(self, message: str, error: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.error = dict(error or {})


RETRIED = {500, 502, 503, 504}  # a replica died mid-request, is restarting, or is full


@dataclass(frozen=True)
class ImagesAnswer:
    """What ``post_images`` got: the images as arrays, the response body and its headers (by
    lower-case name)."""

    images: list[np.ndarray]
    body: dict[str, Any]
    headers: dict[str, str]


def post_images(url: str, payload: Mapping[str, Any], *, retries: int = 6, timeout: float = 300.0) -> ImagesAnswer:
    """The answer to ``POST url/v1/images/generations`` with ``payload``; see the module
    docstring."""
    body, last = json.dumps(payload).encode(), None
    for attempt in range(retries + 1):
        request = urllib.request.Request(
            url.rstrip("/") + PATH, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
                headers = {name.lower(): value for name, value in response.headers.items()}
                return ImagesAnswer([decode_image(entry) for entry in answer["data"]], answer, headers)
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            if error.code not in RETRIED:
                raise ImagesError(f"HTTP {error.code}: {text}", _error_of(text)) from None
            last = f"HTTP {error.code}: {text}"
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last = f"no answer: {error}"
        time.sleep(min(0.5 * 2**attempt, 8.0))
    raise ImagesError(f"{url}: no images after {retries + 1} attempts; last: {last}")


def _error_of(text: str) -> dict[str, Any]:
    try:
        return json.loads(text).get("error") or {}
    except (json.JSONDecodeError, AttributeError):
        return {}
