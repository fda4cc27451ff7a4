"""The OpenVINO bundle runtime and bundle precisions: every variant of block, first-block,
forecast and ICC programs runs on OpenVINO from the same bundle as onnxruntime (a float32 run
equal to onnxruntime's, a bf16 step close to it), and exports in int8-dynamic and runs on
both; the shipped model's int8 steps stay within 2 % of float32."""

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


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_variant_exports_in_int8_dynamic_and_runs_on_both_runtimes(dit_graph, program, tmp_path):
    from diffopt.serving.engine import batch_coupled_layers

    optimized = optimize(dit_graph, PROGRAMS[program])
    manifest = to_onnx(optimized, tmp_path / "int8", precision="int8-dynamic")
    assert manifest.precision == "int8-dynamic"
    assert {step["scheme"] for steps in manifest.quantization.values() for step in steps} == {
        "dynamic int8 per tensor (onnxruntime)"
    }
    sampler = Sampler(make_scheduler(CONFIG, "ddim", 12), progress=False)
    labels = torch.arange(3) % 10
    reference = sampler.sample(optimized, (labels,), shape=(3, 1, 8, 8), seed=5)
    for runtime in ("onnxruntime", "openvino"):
        denoiser = load_bundle(tmp_path / "int8", runtime, threads=1)
        run = sampler.sample(denoiser, (labels,), shape=(3, 1, 8, 8), seed=5)
        assert set(sampler.last_stats.variants) == set(manifest.variants) - {"probe"}  # every variant ran
        assert torch.isfinite(run).all() and _relative(run, reference) < 0.2  # a random model: int8 drifts, not more
    # activations are scaled per batch: the serving engines never batch two requests in these forwards
    assert batch_coupled_layers(load_bundle(tmp_path / "int8", threads=1))


def test_a_bf16_bundle_runs_at_bf16_on_openvino_and_float32_on_onnxruntime(dit_graph, tmp_path):
    optimized = optimize(dit_graph, PROGRAMS["block cache"])
    assert to_onnx(optimized, tmp_path / "bf16", precision="bf16").precision == "bf16"
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((3,), 500)
    labels = torch.arange(3)
    expected, _ = optimized.step(0, x, t, labels, state=optimized.init_state(3))
    steps = {}
    for runtime in ("onnxruntime", "openvino"):
        denoiser = load_bundle(tmp_path / "bf16", runtime, threads=1)
        steps[runtime], _ = denoiser.step(0, x, t, labels, state=denoiser.init_state(3))
    assert _relative(steps["onnxruntime"], expected) < 1e-5
    assert 1e-5 < _relative(steps["openvino"], expected) < 2e-2  # bfloat16 products: close, not equal


def test_int8_dynamic_steps_of_the_shipped_model_stay_within_2_percent_of_float32(tmp_path):
    from diffopt.models import example_inputs, load

    model, config = load("dit-digits")
    optimized = optimize(capture(model, example_inputs("dit-digits")))
    to_onnx(optimized, tmp_path / "int8", precision="int8-dynamic")
    generator = torch.Generator().manual_seed(3)
    x, labels = torch.randn(8, 1, 16, 16, generator=generator), torch.arange(8)
    for timestep in (900, 500, 100):
        t = torch.full((8,), timestep)
        expected, _ = optimized.step(0, x, t, labels, state=optimized.init_state(8))
        for runtime in ("onnxruntime", "openvino"):
            denoiser = load_bundle(tmp_path / "int8", runtime, threads=1)
            out, _ = denoiser.step(0, x, t, labels, state=denoiser.init_state(8))
            assert _relative(out, expected) < 2e-2, (runtime, timestep)


def test_precisions_that_cannot_be_written_are_refused_by_name(dit_graph, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        to_onnx(optimize(dit_graph), tmp_path / "a", precision="int4")
    with pytest.raises(ValueError, match="TensorRT does not read"):
        to_onnx(optimize(dit_graph), tmp_path / "b", precision="int8-dynamic", profile="tensorrt")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
