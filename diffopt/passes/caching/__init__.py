"""Caching from three parts: a target (what is stood in for), a refresh policy (when it runs
in full) and a predictor (what stands in on the other steps), each a small registered class
(``targets``, ``policies``, ``predictors``), joined by one rewrite (``rewrite``) that
``CachePass`` and the named presets (``ForecastCachePass``) run."""

from diffopt.passes.caching import policies, predictors, targets  # noqa: F401 - they register their kinds
