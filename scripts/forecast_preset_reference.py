"""Reference samples of ``ForecastCachePass`` before it became a preset of ``passes.caching``,
for ``tests/test_cache_parts.py``. Run once, from the repository root, with the former
implementation beside it:

    git show 3b78a66:diffopt/passes/forecast_cache.py > /tmp/w/old_forecast.py
    python scripts/forecast_preset_reference.py   # writes tests/data/forecast_preset_reference.pt
"""

import importlib.util
import sys

import torch

sys.path.insert(0, "tests")
from diffopt import capture, optimize
from diffopt.models import example_inputs, load
from diffopt.runtime.schedulers import make_scheduler
from diffopt.sampling.sequential import Sampler

spec = importlib.util.spec_from_file_location("old_forecast", "/tmp/w/old_forecast.py")
old = importlib.util.module_from_spec(spec)
sys.modules["old_forecast"] = old
spec.loader.exec_module(old)
model, config = load("dit-digits")
graph = capture(model, example_inputs("dit-digits"))
SETTINGS = [
    dict(order=1, period=3, warmup=2, targets="blocks"),
    dict(order=2, period=4, warmup=2, targets="modules"),
    dict(order=1, period=3),
    dict(order=2, period=2, targets="blocks", blocks=("transformer_blocks.1", "transformer_blocks.2")),
]
out = {}
for i, s in enumerate(SETTINGS):
    sampler = Sampler(make_scheduler(config, num_steps=16), progress=False)
    out[i] = sampler.sample(
        optimize(graph, [old.ForecastCachePass(**s)]),
        (torch.tensor([0, 3, 7, 9]),),
        shape=(4, *example_inputs("dit-digits")[0].shape[1:]),
        seed=11,
    )
torch.save({"settings": SETTINGS, "samples": out}, "tests/data/forecast_preset_reference.pt")
print({k: tuple(v.shape) for k, v in out.items()})
