"""Serving step programs and diffusers pipelines to many concurrent requests (a layer on top
of ``runtime``, ``sampling`` and ``pipelines``; only the deployments import Ray, when called).

Bundles and programs: ``engine.StepEngine`` (step-level continuous batching in one replica),
``http`` (request bodies and responses), ``deployment.deployment(...)`` (the Ray Serve
application of ``diffopt serve BUNDLE``), ``whole_runs`` (Ray Serve's request-level batching
of whole sampling runs, the comparison in ``benchmarks/serving.py``).

Pipelines: ``pipeline_engine.PipelineEngine`` (pipeline calls whose denoiser forwards a
``forward_batcher.ForwardBatcher`` shares; ``slo_admission`` against a latency SLO),
``images_api`` (OpenAI's images API, the client), ``pipeline_server`` (the Ray Serve
application of ``diffopt serve --pipeline DIR`` and the comparison in
``benchmarks/serving_pipeline.py``).
"""
