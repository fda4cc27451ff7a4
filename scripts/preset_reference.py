"""Reference samples of a cache pass before it became a preset of ``passes.caching``, for
``tests/test_cache_parts.py``. Run once per preset, from the repository root, with the
former implementation's module saved beside it:

    git show 3b78a66:diffopt/passes/forecast_cache.py > /tmp/w/old.py
    python scripts/preset_reference.py forecast        # tests/data/forecast_preset_reference.pt
    git show 34960fd:diffopt/passes/block_cache.py > /tmp/w/old.py
    python scripts/preset_reference.py first_block     # tests/data/first_block_preset_reference.pt
"""

import importlib.util
import sys

import torch

from diffopt import capture, optimize
from diffopt.models import example_inputs, load
from diffopt.sampling.schedulers import make_scheduler
from diffopt.sampling.sequential import Sampler

PRESETS = {  # preset -> (the pass class, sampling steps, its settings)
    "forecast": (
        "ForecastCachePass",
        16,
        [
            dict(order=1, period=3, warmup=2, targets="blocks"),
            dict(order=2, period=4, warmup=2, targets="modules"),
            dict(order=1, period=3),
            dict(order=2, period=2, targets="blocks", blocks=("transformer_blocks.1", "transformer_blocks.2")),
        ],
    ),
    "first_block": ("FirstBlockCachePass", 20, [dict(threshold=0.05), dict(threshold=0.1), dict(threshold=0.3)]),
}

preset = sys.argv[1]
pass_name, steps, settings = PRESETS[preset]
spec = importlib.util.spec_from_file_location("old", "/tmp/w/old.py")
old = importlib.util.module_from_spec(spec)
sys.modules["old"] = old
spec.loader.exec_module(old)
model, config = load("dit-digits")
graph = capture(model, example_inputs("dit-digits"))
out = {}
for i, s in enumerate(settings):
    sampler = Sampler(make_scheduler(config, num_steps=steps), progress=False)
    out[i] = sampler.sample(
        optimize(graph, [getattr(old, pass_name)(**s)]),
        (torch.tensor([0, 3, 7, 9]),),
        shape=(4, *example_inputs("dit-digits")[0].shape[1:]),
        seed=11,
    )
torch.save({"settings": settings, "samples": out}, f"tests/data/{preset}_preset_reference.pt")
print({k: tuple(v.shape) for k, v in out.items()})
