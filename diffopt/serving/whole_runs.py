"""The comparison servers: whole sampling runs, one request at a time or batched per request
by Ray Serve's ``@serve.batch`` (how diffusion servers batch today: a request that arrives
after a batch started waits for the whole batch).

A batch of requests with the same step count samples as one ``Sampler`` run over their
stacked noise (each request's own seeded noise), so with a deterministic scheduler (DDIM,
``eta=0``) every request gets the sample it would get alone.
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from typing import Any

import torch

from diffopt.sampling.schedulers import make_scheduler
from diffopt.sampling.sequential import Sampler, initial_noise
from diffopt.serving.deployment import _load
from diffopt.serving.engine import RequestError, Result, checked_request
from diffopt.serving.http import encode_result, parse_request, response_headers


class WholeRunServer:
    """One replica sampling whole runs; ``__call__`` answers HTTP as ``deployment.HttpIngress`` does."""

    def __init__(self, source, scheduler_config=None, max_batch=32, threads=None):
        torch.set_num_threads(threads or torch.get_num_threads())
        self.denoiser, self.config = _load(source, scheduler_config, threads)
        self.names = [spec.name for spec in self.denoiser.inputs[2:]]
        self.max_batch = max_batch

    def sample_runs(self, requests: list[dict[str, Any]]) -> list[Result]:
        """Sample ``requests`` (checked ``submit`` arguments), one Sampler run per step count."""
        results: dict[int, Result] = {}
        by_steps = defaultdict(list)
        for index, request in enumerate(requests):
            by_steps[request["steps"]].append(index)
        latent = tuple(int(d) for d in self.denoiser.inputs[0].shape[1:])
        for steps, members in by_steps.items():
            noise = torch.cat(
                [
                    initial_noise("server", (requests[i]["samples"], *latent), None, requests[i]["seed"])[0]
                    for i in members
                ]
            )
            conditions = tuple(
                torch.cat([requests[i]["conditions"][c] for i in members]) for c in range(len(self.names))
            )
            sampler = Sampler(make_scheduler(self.config, num_steps=steps), progress=False)
            samples = sampler.sample(self.denoiser, conditions, noise=noise)
            for i, part in zip(members, samples.split([requests[i]["samples"] for i in members])):
                results[i] = Result(part, tuple(sampler.last_stats.variants), (len(noise),) * steps)
        return [results[i] for i in range(len(requests))]

    async def handle(self, request, run) -> Any:
        from starlette.responses import JSONResponse, Response

        if request.method == "GET":
            return JSONResponse({"status": "ok", "pid": os.getpid()})
        try:
            arguments = parse_request(await request.body(), self.names)
            output = arguments.pop("format")
            if arguments["guidance_scale"] != 1.0:
                raise RequestError("guidance_scale: the whole-run comparison server samples without guidance")
            conditions, steps, samples = arguments["conditions"], arguments["steps"], arguments["samples"]
            arguments["conditions"], _ = checked_request(
                self.denoiser, self.max_batch, conditions, steps, samples, 1.0, None
            )
            result = await run(arguments)
            body, content_type = encode_result(result, output)
        except RequestError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return Response(body, media_type=content_type, headers=response_headers(result))


def whole_run_deployment(
    source, *, scheduler_config=None, max_batch=32, batch_wait_s=0.02, num_replicas=1, threads=None
):
    """Ray Serve's request-level batching of whole runs (``max_batch=1``: one request at a time)."""
    from ray import serve

    # as many requests inside a replica as the engine server admits, so @serve.batch can fill its batches
    options = {"num_replicas": num_replicas, "ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": 512}

    @serve.deployment(name=f"diffopt-whole-runs-{max_batch}", **options)
    class BatchedWholeRuns(WholeRunServer):
        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_s)
        async def run_batch(self, requests: list[dict]) -> list[Result]:
            return await asyncio.to_thread(self.sample_runs, requests)

        async def __call__(self, request):
            return await self.handle(request, self.run_batch)

    return BatchedWholeRuns.bind(source, scheduler_config, max_batch, threads)
