import json
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch
from models import MODEL_FACTORIES, diffusers_dit, inputs_for
from onnx import helper

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.export import ExportError, Manifest, to_onnx
from diffopt.export.onnx import WEIGHTS_FILE, check_tensorrt_ready
from diffopt.measure.calibration import calibrate
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
from diffopt.passes.temporal_difference import TemporalDifferencePass
from diffopt.runtime.runtimes import load_bundle

CONFIG = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2", "clip_sample": 1.0}
PASSES = {
    "identity": [],
    "icc rank 4": [IncrementCalibratedCachePass(rank=4, period=2)],
    "icc adaptive": [IncrementCalibratedCachePass(rank=None, refresh_threshold=0.05)],
    "block cache": [BlockCachePass(period=3)],
    "first-block cache": [FirstBlockCachePass(0.1)],
    "forecast cache order 2": [ForecastCachePass(order=2, period=3, warmup=2)],
    "temporal difference exact": [TemporalDifferencePass("exact")],
    "temporal difference, zero rows skipped": [TemporalDifferencePass("exact", row_threshold=0.0)],  # lossless
}


@pytest.fixture(scope="module")
def dit_graph():
    return capture(diffusers_dit(seed=2), inputs_for("diffusers_dit", 2, seed=0))


def _relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("passes", PASSES)
def test_fifty_step_runs_on_onnxruntime_match_torch_at_other_batch_sizes(dit_graph, passes, tmp_path):
    sampler = Sampler(make_scheduler(CONFIG, "ddim", 50), progress=False)
    calibration = None
    if any(getattr(p, "needs_calibration", False) for p in PASSES[passes]):  # a short run: threshold 0 ignores it
        short = Sampler(make_scheduler(CONFIG, "ddim", 5), progress=False)
        calibration = calibrate(optimize(dit_graph).program, short, (torch.arange(2),), (2, 1, 8, 8), progress=False)
    optimized = optimize(dit_graph, PASSES[passes], calibration=calibration)
    manifest = to_onnx(optimized, tmp_path, export_batch=2)
    assert list(manifest.variants) == list(optimized.program.variants)
    exported = load_bundle(tmp_path)
    for batch in (3, 1):
        labels = torch.arange(batch) % 10
        expected = sampler.sample(optimized, (labels,), shape=(batch, 1, 8, 8), seed=batch)
        torch_variants = sampler.last_stats.variants
        actual = sampler.sample(exported, (labels,), shape=(batch, 1, 8, 8), seed=batch)
        assert sampler.last_stats.variants == torch_variants
        assert _relative_error(actual, expected) < 1e-4
    if passes != "identity":
        assert len(set(torch_variants)) == 2  # the run really used both variants


@pytest.mark.parametrize("kind", ["diffusers_pixart", "diffusers_unet"])
def test_other_architectures_export_and_match_on_fresh_inputs(kind, tmp_path):
    model = MODEL_FACTORIES[kind](seed=1)
    optimized = optimize(capture(model, inputs_for(kind, 2, seed=0)))
    to_onnx(optimized, tmp_path, export_batch=2)  # PixArt's no-op squeeze must survive the export
    exported = load_bundle(tmp_path)
    inputs = inputs_for(kind, 3, seed=7)
    arguments = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    with torch.no_grad():
        expected = model(**inputs, return_dict=False)[0]
    assert _relative_error(exported(*arguments), expected) < 1e-4


def test_bundle_files_are_valid_and_weights_are_stored_once(dit_graph, tmp_path):
    optimized = optimize(dit_graph, PASSES["icc rank 4"])
    to_onnx(optimized, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["schedule"] == {"kind": "periodic", "refresh": "full", "between": "calibrated", "period": 2}
    assert [e["name"] for e in manifest["state"]] == list(optimized.program.state.names)
    stored_per_variant = 0
    for variant in manifest["variants"].values():
        path = tmp_path / variant["file"]
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert [i.name for i in model.graph.input] == [t["name"] for t in variant["inputs"]]
        external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        stored_per_variant += sum(int(next(e.value for e in t.external_data if e.key == "length")) for t in external)
    weights = (tmp_path / WEIGHTS_FILE).stat().st_size
    assert 0 < weights < 0.75 * stored_per_variant  # the full and calibrated variants share their weights
    to_onnx(optimize(dit_graph), tmp_path)  # re-exporting replaces the old bundle's files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SHA256SUMS", "full.onnx", "manifest.json", WEIGHTS_FILE]


def test_a_bundle_is_sampled_in_a_fresh_process_without_model_code(dit_graph, tmp_path):
    optimized = optimize(dit_graph, PASSES["first-block cache"])
    to_onnx(optimized, tmp_path / "bundle", scheduler_config=CONFIG)
    sampler = Sampler(make_scheduler(CONFIG, "ddim", 20), progress=False)
    labels = torch.tensor([3, 1, 4])
    torch.save(sampler.sample(optimized, (labels,), shape=(3, 1, 8, 8), seed=5), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from diffopt import Sampler, make_scheduler
        from diffopt.runtime.runtimes import load_bundle
        denoiser = load_bundle({str(tmp_path / "bundle")!r})
        config = denoiser.bundle.manifest.scheduler
        sampler = Sampler(make_scheduler(config, "ddim", 20), progress=False)
        samples = sampler.sample(denoiser, (torch.tensor([3, 1, 4]),), shape=(3, 1, 8, 8), seed=5)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        error = float((samples - expected).norm() / expected.norm())
        model_code = sorted(m for m in sys.modules if m.split(".")[0] == "diffusers" or m.startswith("diffopt.models"))
        print(error, model_code)
        assert error < 1e-4 and not model_code, (error, model_code)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def _tiny_model(op_type: str, output_name: str = "y"):
    node = helper.make_node(op_type, ["x"], [output_name])
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph)


def test_tensorrt_profile_rejects_unsupported_operators_and_aliased_state(dit_graph, tmp_path):
    manifest = to_onnx(optimize(dit_graph, PASSES["first-block cache"]), tmp_path, profile="tensorrt")
    assert Manifest.load(tmp_path).profile == manifest.profile == "tensorrt"
    check_tensorrt_ready(_tiny_model("Relu"), "ok")
    with pytest.raises(ExportError, match="Unique"):
        check_tensorrt_ready(_tiny_model("Unique"), "bad")
    with pytest.raises(ExportError, match="returns its inputs"):
        check_tensorrt_ready(_tiny_model("Identity", output_name="x"), "aliased")


def test_clear_errors_for_bad_requests(dit_graph, tmp_path):
    with pytest.raises(ValueError, match="unknown export profile"):
        to_onnx(optimize(dit_graph), tmp_path, profile="coreml")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        load_bundle(tmp_path / "missing")
    bundle = load_bundle(to_onnx(optimize(dit_graph), tmp_path) and tmp_path)
    with pytest.raises(TypeError, match="loaded from a bundle has no graphs"):
        to_onnx(bundle, tmp_path / "again")


def test_flux_exports_with_its_float64_rotary_tables_computed_in_float32(tmp_path):
    from models import diffusers_flux

    captured = capture(diffusers_flux(seed=1), inputs_for("diffusers_flux", 2, seed=0))
    optimized = optimize(captured)
    assert any(  # the torch program keeps diffusers' float64 rotary tables
        n.meta.get("val") is not None and getattr(n.meta["val"], "dtype", None) == torch.float64
        for n in optimized.program.variants["full"].graph.nodes
    )
    to_onnx(optimized, tmp_path)
    inputs = inputs_for("diffusers_flux", 3, seed=4)
    arguments = [inputs[name] for name in captured.signature.input_names]
    assert _relative_error(load_bundle(tmp_path)(*arguments), optimized(*arguments)) < 1e-5
