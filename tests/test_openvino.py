"""The OpenVINO bundle runtime and bundle precisions: every variant of block, first-block,
forecast and ICC programs runs on OpenVINO from the same bundle as onnxruntime (a float32 run
equal to onnxruntime's, a bf16 step close to it), and exports in int8-dynamic and int8-static
and runs on both; int8-static graphs are Q/DQ that onnx.checker and TensorRT's operator list
accept, run as the torch program computes them; the shipped model's int8 steps stay within
2 % (dynamic) and 3 % (static) of float32."""

import pytest
import torch
from models import diffusers_dit, inputs_for

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.export import to_onnx
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
from diffopt.passes.static_quantization import StaticQuantizationPass
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


@pytest.fixture(scope="module")
def dit_calibration(dit_graph):
    from diffopt.measure.calibration import calibrate

    sampler = Sampler(make_scheduler(CONFIG, "ddim", 6), progress=False)
    return calibrate(
        optimize(dit_graph).program, sampler, (torch.arange(3) % 10,), (3, 1, 8, 8), seeds=(4,), progress=False
    )


INT8_STATIC = StaticQuantizationPass(weight_form="qdq", float_ends=True)


def _program_and_bundle_runs(optimized, directory):
    """A 12-step run of the program, and of its bundle in ``directory`` on each runtime (each
    bundle run checked to have taken every variant), from the same noise."""
    sampler = Sampler(make_scheduler(CONFIG, "ddim", 12), progress=False)
    labels = torch.arange(3) % 10
    reference = sampler.sample(optimized, (labels,), shape=(3, 1, 8, 8), seed=5)
    runs = {}
    for runtime in ("onnxruntime", "openvino"):
        denoiser = load_bundle(directory, runtime, threads=1)
        runs[runtime] = sampler.sample(denoiser, (labels,), shape=(3, 1, 8, 8), seed=5)
        assert set(sampler.last_stats.variants) == set(denoiser.bundle.manifest.variants) - {"probe"}, runtime
    return reference, runs


def _relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_variant_runs_on_openvino_equal_to_onnxruntime_in_float32_and_close_in_bf16(dit_graph, program, tmp_path):
    assert to_onnx(optimize(dit_graph, PROGRAMS[program]), tmp_path / "bundle", precision="bf16").precision == "bf16"
    sampler = Sampler(make_scheduler(CONFIG, "ddim", 12), progress=False)
    labels = torch.arange(3) % 10
    runs = {}
    for runtime, options in {"onnxruntime": {}, "openvino": {"precision": "f32"}, "openvino bf16": {}}.items():
        denoiser = load_bundle(tmp_path / "bundle", runtime.split()[0], threads=1, **options)
        runs[runtime] = sampler.sample(denoiser, (labels,), shape=(3, 1, 8, 8), seed=5)
        variants = set(sampler.last_stats.variants)
        assert variants == set(denoiser.bundle.manifest.variants) - {"probe"}  # every variant ran
    assert _relative(runs["openvino"], runs["onnxruntime"]) < 1e-5
    assert torch.isfinite(runs["openvino bf16"]).all()  # a bf16 run of a random model drifts: one step is compared
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.full((3,), 500)
    steps = {}
    for runtime in ("onnxruntime", "openvino"):  # the bundle's precision: bf16 on OpenVINO
        denoiser = load_bundle(tmp_path / "bundle", runtime, threads=1)
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
    reference, runs = _program_and_bundle_runs(optimized, tmp_path / "int8")
    for run in runs.values():
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


def test_precisions_that_cannot_be_written_are_refused_by_name(dit_graph, tmp_path):
    with pytest.raises(ValueError, match="precision must be one of"):
        to_onnx(optimize(dit_graph), tmp_path / "a", precision="int4")
    with pytest.raises(ValueError, match="TensorRT does not read"):
        to_onnx(optimize(dit_graph), tmp_path / "b", precision="int8-dynamic", profile="tensorrt")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_variant_exports_in_int8_static_and_runs_on_both_runtimes_as_torch_computes_it(
    dit_graph, dit_calibration, program, tmp_path
):
    import onnx

    from diffopt.export.onnx import tensorrt_supported_ops

    optimized = optimize(dit_graph, [*PROGRAMS[program], INT8_STATIC], calibration=dit_calibration)
    manifest = to_onnx(optimized, tmp_path / "int8", precision="int8-static", profile="tensorrt")
    assert manifest.precision == "int8-static"
    for name, variant in manifest.variants.items():
        path = tmp_path / "int8" / variant.file
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        ops = {node.op_type for node in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops and ops <= tensorrt_supported_ops(), name
        schemes = {(step["operand"], step["scheme"]) for step in manifest.quantization[name]}
        assert schemes == {("activation", "static symmetric"), ("weight", "int8 per output channel")}, name
    reference, runs = _program_and_bundle_runs(optimized, tmp_path / "int8")
    for runtime, run in runs.items():
        assert _relative(run, reference) < 1e-3, runtime  # the same Q/DQ arithmetic, float32 sums


def test_int8_static_keeps_the_first_and_last_layers_float_and_needs_qdq_weights(dit_graph, dit_calibration, tmp_path):
    from diffopt.ir.layers import linear_layers

    optimized = optimize(dit_graph, [INT8_STATIC], calibration=dit_calibration)
    layers = list(linear_layers(optimize(dit_graph).program.variants["full"].graph).values())
    quantized = {
        step["layer"] for step in to_onnx(optimized, tmp_path / "a", precision="int8-static").quantization["full"]
    }
    assert layers[0] not in quantized and layers[-1] not in quantized and len(quantized) >= len(layers) - 3
    activation_only = optimize(dit_graph, [StaticQuantizationPass(weight_bits=None)], calibration=dit_calibration)
    for program in (optimize(dit_graph), activation_only):
        with pytest.raises(ValueError, match="int8-static' exports Q/DQ graphs, and this program has none"):
            to_onnx(program, tmp_path / "b", precision="int8-static")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("precision, tolerance", [("int8-dynamic", 2e-2), ("int8-static", 3e-2)])
def test_int8_steps_of_the_shipped_model_stay_close_to_float32(precision, tolerance, tmp_path):
    from diffopt.measure.calibration import calibrate
    from diffopt.models import example_inputs, load

    model, config = load("dit-digits")
    graph = capture(model, example_inputs("dit-digits"))
    plain, optimized = optimize(graph), optimize(graph)
    if precision == "int8-static":
        sampler = Sampler(make_scheduler(config, "ddim", 10), progress=False)
        shape = (10, 1, 16, 16)
        statistics = calibrate(plain.program, sampler, (torch.arange(10),), shape, seeds=(2,), progress=False)
        optimized = optimize(graph, [INT8_STATIC], calibration=statistics)
    to_onnx(optimized, tmp_path / "int8", precision=precision)
    generator = torch.Generator().manual_seed(3)
    x, labels = torch.randn(8, 1, 16, 16, generator=generator), torch.arange(8)
    for timestep in (900, 500, 100):
        t = torch.full((8,), timestep)
        expected, _ = plain.step(0, x, t, labels, state=plain.init_state(8))
        for runtime in ("onnxruntime", "openvino"):
            denoiser = load_bundle(tmp_path / "int8", runtime, threads=1)
            out, _ = denoiser.step(0, x, t, labels, state=denoiser.init_state(8))
            assert _relative(out, expected) < tolerance, (runtime, timestep)
