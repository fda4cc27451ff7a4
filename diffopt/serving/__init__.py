"""Serving step programs to many concurrent requests (a layer on top of ``runtime`` and
``sampling``; only ``deployment`` and ``whole_runs`` import Ray, when called).

``engine.StepEngine``: step-level continuous batching in one replica. ``http``: request
bodies and responses. ``deployment.deployment(...)``: the Ray Serve application
(``diffopt serve BUNDLE``). ``whole_runs``: Ray Serve's request-level batching of whole
sampling runs, the comparison in ``benchmarks/serving.py``.
"""
