"""The OpenVINO bundle runtime: every variant of block, first-block, forecast and ICC programs
runs on it from the same bundle as onnxruntime, a float32 run equal to onnxruntime's, a bf16
step (OpenVINO's inference precision) close to it."""

import pytest
import torch
from models import diffusers_dit, inputs_for

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.export import to_onnx
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
from diffopt.runtime.runtimes import load_bundle

CONFIG = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2", "clip_sample": 1.0}
PROGRAMS = {
    "block cache": [BlockCachePass(period=3)],
    "first-block cache": [FirstBlockCachePass(0.1)],
    "forecast cache": [ForecastCachePass(order=2, period=3, warmup=2, targets="blocks")],
    "icc": [IncrementCalibratedCachePass(rank=4, period=2)],
}


@pytest.fixture(scope="module")
def dit_graph():
    return capture(diffusers_dit(seed=2), inputs_for("diffusers_dit", 2, seed=0))


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_variant_runs_on_openvino_equal_to_onnxruntime_in_float32_and_close_in_bf16(dit_graph, program, tmp_path):
    to_onnx(optimize(dit_graph, PROGRAMS[program]), tmp_path / "bundle")
    sampler = Sampler(make_scheduler(CONFIG, "ddim", 12), progress=False)
    labels = torch.arange(3) % 10
    runs = {}
    for runtime, options in {"onnxruntime": {}, "openvino": {}, "openvino bf16": {"precision": "bf16"}}.items():
        denoiser = load_bundle(tmp_path / "bundle", runtime.split()[0], threads=1, **options)
        runs[runtime] = sampler.sample(denoiser, (labels,), shape=(3, 1, 8, 8), seed=5)
        variants = set(sampler.last_stats.variants)
        assert variants == set(denoiser.bundle.manifest.variants) - {"probe"}  # every variant ran
    assert _relative(runs["openvino"], runs["onnxruntime"]) < 1e-5
    assert torch.isfinite(runs["openvino bf16"]).all()  # a bf16 run of a random model drifts: one step is compared
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((3,), 500)
    steps = {}
    for runtime, options in {"onnxruntime": {}, "openvino": {"precision": "bf16"}}.items():
        denoiser = load_bundle(tmp_path / "bundle", runtime, threads=1, **options)
        steps[runtime], _ = denoiser.step(0, x, t, labels, state=denoiser.init_state(3))
    assert _relative(steps["openvino"], steps["onnxruntime"]) < 2e-2


def test_openvino_refuses_an_unknown_precision_by_name(dit_graph, tmp_path):
    to_onnx(optimize(dit_graph), tmp_path / "bundle")
    with pytest.raises(ValueError, match=r"precision must be one of \['bf16', 'f32'\], found 'int4'"):
        load_bundle(tmp_path / "bundle", "openvino", precision="int4")
