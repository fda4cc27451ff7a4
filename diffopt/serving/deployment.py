"""Ray Serve deployments of a ``StepEngine`` (``pip install -e ".[serve]"``).

``deployment(bundle_dir)`` (or ``deployment(denoiser, scheduler_config=...)``) returns a Ray
Serve application of two deployments:

- ``diffopt-engine`` replicas (``EngineServer``) each load the bundle (onnxruntime, no model
  code) or the program and run one ``StepEngine`` on a background thread. Ray sends a replica
  at most ``max_active + max_waiting`` requests (what its engine holds) and keeps at most
  ``max_waiting`` more waiting to be routed (``max_queued_requests``); past that it refuses.
- ``diffopt-http`` (``HttpIngress``) answers HTTP (``serving.http``: ``POST /sample``,
  ``GET /health``) and hands each request body to an engine replica.

What a client sees:
- a malformed request: 400 naming the field;
- a full server (every engine replica holds as many requests as it can): 503 with
  ``Retry-After`` (while a replica restarts, requests wait for it instead);
- a replica that dies with the request in flight: the ingress sends it again to another (or
  the restarted) replica until one takes it, for up to ``REPLICA_WAIT_S``: a seeded request
  gives the same sample on any replica, so a plain HTTP client gets its sample. Only when no
  replica answers in time does it get 503 with ``Retry-After``, which ``post_sample`` retries;
- a client that disconnects: Ray Serve cancels its request, and the engine aborts it.

``num_replicas`` or an ``autoscaling_config`` scales the engine; on a multi-node Ray cluster
the same application runs unchanged (``ray start --head`` on one node, ``ray start
--address=HEAD:6379`` on the others, then ``diffopt serve`` with ``RAY_ADDRESS=HEAD:6379``).

``whole_run_deployment`` is the comparison: Ray Serve's request-level batching
(``@serve.batch``) of whole sampling runs, as diffusion servers batch today.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from diffopt.serving.engine import Overloaded, RequestError, StepEngine
from diffopt.serving.http import encode_result, parse_request, response_headers

APP_NAME = "diffopt"
REPLICA_WAIT_S = 120  # a request whose engine replica died is sent again until one answers, this long
RETRY_AFTER_S = 1  # what a 503 asks the client to wait


def _load(source: Any, scheduler_config: Mapping[str, Any] | None, threads: int | None):
    """(denoiser, scheduler config) from a bundle directory or an ``OptimizedDenoiser``."""
    if isinstance(source, (str, os.PathLike)):
        from diffopt.runtime.runtimes import load_bundle

        denoiser = load_bundle(source, threads=threads)
        config = scheduler_config or denoiser.bundle.manifest.scheduler
        if config is None:
            raise ValueError(f"bundle {source} has no noise-schedule config: export it with scheduler_config=...")
        return denoiser, dict(config)
    if scheduler_config is None:
        raise ValueError("deployment(denoiser): pass scheduler_config= (the model's noise schedule)")
    return source, dict(scheduler_config)


class EngineServer:
    """One engine replica: a ``StepEngine`` ticking on a background thread; ``answer`` serves the
    HTTP requests ``HttpIngress`` hands it."""

    def __init__(self, source, scheduler_config=None, max_batch=32, max_waiting=64, null_conditions=None, threads=None):
        import torch

        torch.set_num_threads(threads or torch.get_num_threads())
        denoiser, config = _load(source, scheduler_config, threads)
        self.engine = StepEngine(denoiser, config, max_batch=max_batch, max_waiting=max_waiting)
        self.names = [spec.name for spec in denoiser.inputs[2:]]
        self.null_conditions = None if null_conditions is None else tuple(torch.as_tensor(n) for n in null_conditions)
        self.stop = threading.Event()
        self.loop = threading.Thread(target=self.engine.serve_forever, args=(self.stop,), daemon=True)
        self.loop.start()

    async def answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes, str, dict[str, str]]:
        """(status, body, content type, headers) of one HTTP request. Cancelled (its client went
        away), it aborts the request in the engine."""
        if method == "GET" and path.rstrip("/").endswith("health"):
            active, waiting = self.engine.load
            return _json(
                200,
                {
                    "status": "ok",
                    "active": active,
                    "waiting": waiting,
                    "aborted": self.engine.aborted,
                    "pid": os.getpid(),
                },
            )
        if method != "POST" or not path.rstrip("/").endswith("sample"):
            return _json(404, {"error": "POST /sample or GET /health"})
        try:
            arguments = parse_request(body, self.names)
            output = arguments.pop("format")
            future = self.engine.submit(**arguments, null_conditions=self.null_conditions)
        except RequestError as error:
            return _json(400, {"error": str(error)})
        except Overloaded as error:
            return _json(503, {"error": str(error)}, {"Retry-After": str(RETRY_AFTER_S)})
        try:
            result = await asyncio.wrap_future(future)
            content, content_type = encode_result(result, output)
        except asyncio.CancelledError:
            self.engine.abort(future)
            raise
        except RequestError as error:
            return _json(400, {"error": str(error)})
        except Exception as error:  # a failed forward: this request's error, not the server's
            return _json(500, {"error": f"{type(error).__name__}: {error}"})
        return 200, content, content_type, response_headers(result)

    def __del__(self):
        self.stop.set()


class HttpIngress:
    """The HTTP front: hands each request to an engine replica (see the module docstring)."""

    def __init__(self, engine, error_body=None):
        self.engine = engine  # a DeploymentHandle of an EngineServer or PipelineServer deployment
        self.error_body = error_body or (lambda message, status, param=None: {"error": message})  # the API's shape
        self.replica_died_at = -math.inf  # when a request last found its engine replica dead (monotonic)

    async def __call__(self, request):
        from ray import exceptions as ray_errors
        from ray.serve.exceptions import BackPressureError
        from starlette.responses import Response

        body = await request.body()
        deadline, attempt = time.monotonic() + REPLICA_WAIT_S, 0
        while True:
            try:
                status, content, content_type, headers = await self.engine.answer.remote(
                    request.method, request.url.path, body
                )
                return Response(content, status_code=status, media_type=content_type, headers=headers)
            except BackPressureError:
                restarting = time.monotonic() - self.replica_died_at < REPLICA_WAIT_S
                if attempt == 0 and not restarting:  # every replica full: the client's to retry
                    message = "every engine replica is full: try again later"
                    break
                message = "no engine replica took the request while one restarts"  # waits for the restart
            except (ray_errors.RayActorError, ray_errors.ActorUnavailableError) as error:  # its replica died
                self.replica_died_at = time.monotonic()
                message = f"no engine replica answered ({type(error).__name__}): try again"
            attempt += 1
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(min(0.25 * 2**attempt, 2.0))
        status, content, content_type, headers = _json(
            503, self.error_body(message, 503), {"Retry-After": str(RETRY_AFTER_S)}
        )
        return Response(content, status_code=status, media_type=content_type, headers=headers)


def _json(status: int, data: dict, headers: dict[str, str] | None = None) -> tuple[int, bytes, str, dict[str, str]]:
    import json

    return status, json.dumps(data).encode(), "application/json", dict(headers or {})


def deployment(
    source: Any,
    *,
    scheduler_config: Mapping[str, Any] | None = None,
    max_batch: int = 32,
    max_waiting: int = 64,
    null_conditions: Any = None,
    num_replicas: int = 1,
    autoscaling_config: Mapping[str, Any] | None = None,
    threads: int | None = None,
    cpus_per_replica: float = 0.0,
):
    """A Ray Serve application serving ``source`` (a bundle directory, or an
    ``OptimizedDenoiser`` with ``scheduler_config``) with step-level continuous batching.
    ``cpus_per_replica`` is what Ray reserves per replica: 0 packs replicas anywhere (one
    machine); on a cluster, the threads each replica runs spread them over the nodes."""
    from ray import serve

    actor = {"num_cpus": cpus_per_replica}
    options: dict[str, Any] = {  # a replica gets what its engine holds (max_active = max_batch); few wait in front
        "max_ongoing_requests": max_batch + max_waiting,
        "max_queued_requests": max_waiting,
        "ray_actor_options": actor,
    }
    options |= (
        {"autoscaling_config": dict(autoscaling_config)} if autoscaling_config else {"num_replicas": num_replicas}
    )
    engine = serve.deployment(EngineServer, name="diffopt-engine", **options)
    ingress = serve.deployment(HttpIngress, name="diffopt-http", max_ongoing_requests=10_000, ray_actor_options=actor)
    return ingress.bind(engine.bind(source, scheduler_config, max_batch, max_waiting, null_conditions, threads))
