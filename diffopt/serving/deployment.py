"""Ray Serve deployments of a ``StepEngine`` (``pip install -e ".[serve]"``).

``deployment(bundle_dir)`` (or ``deployment(denoiser, scheduler_config=...)``) returns a Ray
Serve application: each replica loads the bundle (onnxruntime, no model code) or the
program, runs one ``StepEngine`` on a background thread, and answers HTTP (``serving.http``:
``POST /sample``, ``GET /health``). ``num_replicas`` or an ``autoscaling_config`` scales it;
on a multi-node Ray cluster the same application runs unchanged (``ray start --head`` on one
node, ``ray start --address=HEAD:6379`` on the others, then ``diffopt serve`` with
``RAY_ADDRESS=HEAD:6379``): Ray Serve places replicas on any node and proxies HTTP on each.

A replica that dies takes its in-flight requests with it; Ray Serve starts a new one.
``Client.sample`` (and ``benchmarks/serving.py``) retries a request that got no answer, and
a seeded request gives the same sample on any replica, so no accepted request is lost
silently: each ends with its sample or an error.

``whole_run_deployment`` is the comparison: Ray Serve's request-level batching
(``@serve.batch``) of whole sampling runs, as diffusion servers batch today.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping
from typing import Any

from diffopt.serving.engine import Overloaded, RequestError, StepEngine
from diffopt.serving.http import encode_result, parse_request, response_headers

APP_NAME = "diffopt"


def _load(source: Any, scheduler_config: Mapping[str, Any] | None, threads: int | None):
    """(denoiser, scheduler config) from a bundle directory or an ``OptimizedDenoiser``."""
    if isinstance(source, (str, os.PathLike)):
        from diffopt.runtime.onnxruntime_backend import load_bundle

        denoiser = load_bundle(source, threads=threads)
        config = scheduler_config or denoiser.backend.manifest.scheduler
        if config is None:
            raise ValueError(f"bundle {source} has no noise-schedule config: export it with scheduler_config=...")
        return denoiser, dict(config)
    if scheduler_config is None:
        raise ValueError("deployment(denoiser): pass scheduler_config= (the model's noise schedule)")
    return source, dict(scheduler_config)


class EngineServer:
    """One replica: a ``StepEngine`` ticking on a background thread, answering HTTP."""

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

    async def __call__(self, request):
        from starlette.responses import JSONResponse, Response

        if request.method == "GET" and request.url.path.rstrip("/").endswith("health"):
            active, waiting = self.engine.load
            return JSONResponse({"status": "ok", "active": active, "waiting": waiting, "pid": os.getpid()})
        if request.method != "POST" or not request.url.path.rstrip("/").endswith("sample"):
            return JSONResponse({"error": "POST /sample or GET /health"}, status_code=404)
        try:
            arguments = parse_request(await request.body(), self.names)
            output = arguments.pop("format")
            future = self.engine.submit(**arguments, null_conditions=self.null_conditions)
        except RequestError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        except Overloaded as error:
            return JSONResponse({"error": str(error)}, status_code=503)
        try:
            result = await asyncio.wrap_future(future)
            body, content_type = encode_result(result, output)
        except RequestError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        except Exception as error:  # a failed forward: this request's error, not the server's
            return JSONResponse({"error": f"{type(error).__name__}: {error}"}, status_code=500)
        return Response(body, media_type=content_type, headers=response_headers(result))

    def __del__(self):
        self.stop.set()


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
    options: dict[str, Any] = {"max_ongoing_requests": max_batch + max_waiting, "ray_actor_options": actor}
    options |= (
        {"autoscaling_config": dict(autoscaling_config)} if autoscaling_config else {"num_replicas": num_replicas}
    )
    server = serve.deployment(EngineServer, name="diffopt-engine", **options)
    return server.bind(source, scheduler_config, max_batch, max_waiting, null_conditions, threads)
