"""Ray Serve deployments of a diffusers pipeline behind OpenAI's images API.

``pipeline_deployment(source, passes=..., bundle=...)`` returns a Ray Serve application of
the same two deployments as ``deployment.deployment``: ``diffopt-http`` (``HttpIngress``:
it hands each request to a replica, sends it again when its replica died, answers 503 when
every replica is full) and ``diffopt-pipeline`` replicas (``PipelineServer``). Each replica
loads the whole pipeline (text encoders, VAE, denoiser) from ``source`` (a directory saved
with ``save_pretrained``, loaded offline; a ``package.module:function`` factory; or a
pipeline object), enables diffopt on it with ``passes`` (a list or a pass file that ``diffopt
tune`` wrote) or an exported ``bundle``, and serves ``POST /v1/images/generations``
(``serving.images_api``) with a ``PipelineEngine``: step-level batching of the requests'
denoiser forwards. ``GET /health`` answers its load.

``whole_pipeline_deployment`` is the comparison: whole pipeline calls, one at a time
(``max_batch=1``) or batched per request by Ray Serve's ``@serve.batch`` (requests of the
same arguments but their prompt, class and seed run as one pipeline call, each image with
its own seeded generator).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from diffopt.serving.engine import Overloaded, RequestError
from diffopt.serving.images_api import PATH, ImagesRequest, error_body, images_response, parse_images_request
from diffopt.serving.pipeline_engine import PipelineEngine, call_parameters

RETRY_AFTER_S = 1


def load_served_pipeline(source: Any, passes: Any = None, bundle: str | None = None, threads: int | None = None):
    """The pipeline of ``source`` (see the module docstring), enabled with ``passes`` (a list,
    or a pass file's path) or ``bundle``."""
    from diffopt.passes.registry import load_passes
    from diffopt.pipelines import enable
    from diffopt.pipelines.loading import load_factory, load_pipeline

    if isinstance(source, (str, os.PathLike)):
        pipe = load_factory(str(source)) if ":" in str(source) and not os.path.isdir(source) else load_pipeline(source)
    else:
        pipe = source
    if isinstance(passes, (str, os.PathLike)):
        passes, _ = load_passes(passes)
    if bundle is not None:
        return enable(pipe, bundle=bundle, threads=threads)
    return enable(pipe, list(passes or ()))


def _json(status: int, data: dict, headers: Mapping[str, str] | None = None) -> tuple[int, bytes, str, dict]:
    return status, json.dumps(data).encode(), "application/json", dict(headers or {})


def _error(status: int, message: str, param: str | None = None) -> tuple[int, bytes, str, dict]:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else {}
    return _json(status, error_body(message, status, param), headers)


class PipelineServer:
    """One replica: the pipeline and its ``PipelineEngine``; ``answer`` serves what
    ``HttpIngress`` hands it."""

    def __init__(
        self,
        source,
        passes=None,
        bundle=None,
        call_defaults=None,
        max_batch=32,
        max_waiting=64,
        threads=None,
        slo_s=None,
    ):
        if threads:
            torch.set_num_threads(threads)
        pipe = load_served_pipeline(source, passes, bundle, threads)
        self.engine = PipelineEngine(
            pipe, max_batch=max_batch, max_waiting=max_waiting, call_defaults=call_defaults, slo_s=slo_s
        )
        self.labels = getattr(pipe, "labels", None)

    async def answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes, str, dict[str, str]]:
        """(status, body, content type, headers) of one HTTP request; a cancelled one (its
        client went away) is dropped if it has not started."""
        if method == "GET" and path.rstrip("/").endswith("health"):
            return _json(200, {"status": "ok", "load": self.engine.load, "pid": os.getpid()})
        if method != "POST" or not path.rstrip("/").endswith(PATH):
            return _error(404, f"POST {PATH} or GET /health")
        try:
            request = parse_images_request(body, self.engine.parameters, self.labels)
            future = self.engine.submit(request.call, request.seed)
        except RequestError as error:
            return _error(400, str(error), error.param)
        except Overloaded as error:
            return _error(503, str(error))
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except RequestError as error:
            return _error(400, str(error), error.param)
        except Overloaded as error:  # refused at its start: it could not make the SLO
            return _error(503, str(error))
        except Exception as error:  # a failed forward: this request's error, not the server's
            return _error(500, f"{type(error).__name__}: {error}")
        return _answer(request, result.images, result.batch_rows)


def _answer(request: ImagesRequest, images: Any, batch_rows: Sequence[int]) -> tuple[int, bytes, str, dict]:
    mean_rows = sum(batch_rows) / max(len(batch_rows), 1)
    body = images_response(np.asarray(images), request.seed, request.output_format)
    return _json(200, body, {"X-Diffopt-Batch-Rows": f"{mean_rows:.2f}", "X-Diffopt-Pid": str(os.getpid())})


def pipeline_deployment(
    source: Any,
    *,
    passes: Any = None,
    bundle: str | None = None,
    call_defaults: Mapping[str, Any] | None = None,
    max_batch: int = 32,
    max_waiting: int = 64,
    num_replicas: int = 1,
    threads: int | None = None,
    cpus_per_replica: float = 0.0,
    slo_s: float | None = None,
):
    """A Ray Serve application serving the pipeline of ``source`` (module docstring);
    ``slo_s``: admit requests against that latency SLO (``serving.slo_admission``)."""
    from ray import serve

    from diffopt.serving.deployment import HttpIngress

    actor = {"num_cpus": cpus_per_replica}
    server = serve.deployment(
        PipelineServer,
        name="diffopt-pipeline",
        num_replicas=num_replicas,
        max_ongoing_requests=max_batch + max_waiting,
        max_queued_requests=max_waiting,
        ray_actor_options=actor,
    )
    ingress = serve.deployment(HttpIngress, name="diffopt-http", max_ongoing_requests=10_000, ray_actor_options=actor)
    replica = server.bind(source, passes, bundle, dict(call_defaults or {}), max_batch, max_waiting, threads, slo_s)
    return ingress.bind(replica, error_body=error_body)


MERGED = ("prompt", "class_labels")  # what differs between requests one whole pipeline call can take together


def sample_whole_calls(pipe: Any, requests: Sequence[ImagesRequest]) -> list[Any]:
    """Each request's images, from as few pipeline calls as their arguments allow: requests of
    one image whose arguments differ only in prompt or class share a call (a list of prompts
    or classes, one seeded generator per image)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, request in enumerate(requests):
        single = request.call.get("num_images_per_prompt", 1) == 1 and not any(
            isinstance(v, torch.Tensor) for v in request.call.values()
        )
        rest = {k: v for k, v in request.call.items() if k not in MERGED}
        groups[repr(sorted(rest.items())) if single else f"alone {index}"].append(index)
    images: list[Any] = [None] * len(requests)
    for members in groups.values():
        call = dict(requests[members[0]].call)
        for name in MERGED:
            if name in call:
                call[name] = [v for i in members for v in _as_list(requests[i].call[name])]
        generators = [torch.Generator().manual_seed(requests[i].seed) for i in members]
        output = pipe(**call, generator=generators if len(members) > 1 else generators[0])
        for position, index in enumerate(members):
            images[index] = output.images[position : position + 1]
    return images


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


def whole_pipeline_deployment(
    source: Any,
    *,
    passes: Any = None,
    call_defaults: Mapping[str, Any] | None = None,
    max_batch: int = 32,
    batch_wait_s: float = 0.01,
    threads: int | None = None,
):
    """Ray Serve's request-level batching of whole pipeline calls (``max_batch=1``: one request
    at a time); it answers ``POST /v1/images/generations`` as ``PipelineServer`` does."""
    from ray import serve
    from starlette.responses import Response

    @serve.deployment(
        name=f"diffopt-whole-calls-{max_batch}", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=512
    )
    class WholePipelineCalls:
        def __init__(self):
            if threads:
                torch.set_num_threads(threads)
            self.pipe = load_served_pipeline(source, passes)
            self.pipe.set_progress_bar_config(disable=True)
            self.parameters = call_parameters(self.pipe)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_s)
        async def run_batch(self, requests: list[ImagesRequest]) -> list[Any]:
            calls = [dataclasses.replace(r, call={**(call_defaults or {}), **r.call}) for r in requests]
            return await asyncio.to_thread(sample_whole_calls, self.pipe, calls)

        async def __call__(self, request):
            try:
                parsed = parse_images_request(await request.body(), self.parameters, getattr(self.pipe, "labels", None))
                images = await self.run_batch(parsed)
                status, body, kind, headers = _answer(parsed, images, ())
            except RequestError as error:
                status, body, kind, headers = _error(400, str(error), error.param)
            except Exception as error:  # a failed call: this request's error, not the server's
                status, body, kind, headers = _error(500, f"{type(error).__name__}: {error}")
            return Response(body, status_code=status, media_type=kind, headers=headers)

    return WholePipelineCalls.bind()
