"""Passes compose: a variant-creating pass rewrites every variant of a cached program, the
schedules compose, one calibration feeds every pass, and the result exports."""

import pytest
import torch

from diffopt import ComposedSchedule, PassError, Sampler, capture, make_scheduler, optimize
from diffopt.ir.schedules import schedule_from_dict
from diffopt.ir.specs import CACHED, CALIBRATED, DELTA, FULL, PROBE
from diffopt.measure.calibration import calibrate
from diffopt.models import zoo
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass
from diffopt.passes.static_quantization import StaticQuantizationPass
from diffopt.passes.temporal_difference import TemporalDifferencePass

LABELS = torch.tensor([3, 7])
SHAPE = (2, 1, 16, 16)


def _sampler(config, steps=50):
    return Sampler(make_scheduler(config, "ddim", steps), progress=False)


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def dit_digits():
    model, config = zoo.load("dit-digits")
    graph = capture(model, zoo.example_inputs("dit-digits"))
    statistics = calibrate(
        optimize(graph).program, _sampler(config), (torch.arange(4) % 10,), (4, 1, 16, 16), seeds=(5,), progress=False
    )
    return config, graph, statistics


def _baseline_steps(denoiser, config, seed=0):
    """(latent, timestep) the unoptimized model sees at each step of a 50-step DDIM run, and its outputs."""
    calls = []

    def model(x, t, *conditions):
        out = denoiser(x, t, *conditions)
        calls.append((x.clone(), t.clone(), out))
        return out

    _sampler(config).sample(model, (LABELS,), shape=SHAPE, seed=seed)
    return calls


def _stepwise(denoiser, calls):
    state, errors, variants = denoiser.init_state(SHAPE[0]), [], []
    for k, (x, t, expected) in enumerate(calls):
        out, state = denoiser.step(k, x, t, LABELS, state=state)
        errors.append(_relative(out, expected))
        variants.append(denoiser.last_variant)
    return errors, variants


def test_full_rank_icc_with_exact_differences_is_exact_at_every_step(dit_digits):
    config, graph, _ = dit_digits
    composed = optimize(graph, [IncrementCalibratedCachePass(rank=None, period=3), TemporalDifferencePass("exact")])
    program = composed.program
    assert set(program.variants) == {FULL, DELTA, CALIBRATED, f"{CALIBRATED}+{DELTA}"}
    assert isinstance(program.schedule, ComposedSchedule)
    assert [program.schedule.variant_at(k) for k in range(5)] == [
        FULL,
        f"{CALIBRATED}+{DELTA}",
        f"{CALIBRATED}+{DELTA}",
        DELTA,
        f"{CALIBRATED}+{DELTA}",
    ]
    errors, variants = _stepwise(composed, _baseline_steps(optimize(graph), config))
    assert set(variants) == {FULL, DELTA, f"{CALIBRATED}+{DELTA}"}
    assert max(errors) < 1e-4, max(errors)
    # the layers a calibrated step skips keep the previous input and output of the last step they ran
    calibrated = program.variants[f"{CALIBRATED}+{DELTA}"].graph
    inputs = [n for n in calibrated.nodes if n.op == "placeholder"][program.num_inputs :]
    outputs = calibrated.output_node().args[0][1:]
    passed_on = {
        entry.name
        for entry, value, state_input in zip(program.state.entries, outputs, inputs)
        if value.target == torch.ops.aten.clone.default and value.args[0] is state_input
    }
    assert "transformer_blocks.0.ff.net.2.previous_output" in passed_on  # cached by ICC: skipped by Ditto
    assert "transformer_blocks.0.ff.net.2.cached_output" in passed_on  # ICC keeps the last full step's cache


@pytest.mark.parametrize(
    "cache", [BlockCachePass(period=2), FirstBlockCachePass(threshold=0.05)], ids=["block", "first-block"]
)
def test_block_caches_with_exact_differences_equal_the_cache_alone(dit_digits, cache):
    config, graph, _ = dit_digits
    cached = optimize(graph, [cache])
    composed = optimize(graph, [cache, TemporalDifferencePass("exact")])
    if isinstance(cache, FirstBlockCachePass):
        assert composed.program.schedule.probes == {PROBE, f"{PROBE}+{DELTA}"}
    calls = _baseline_steps(cached, config)
    errors, variants = _stepwise(composed, calls)
    assert any(CACHED in v for v in variants) and any(v == DELTA for v in variants)
    assert max(errors) < 1e-4, max(errors)


def test_block_cache_with_dynamic_int8_differences_keeps_the_dynamic_mode_error(dit_digits):
    config, graph, _ = dit_digits
    reference, dynamic = optimize(graph), optimize(graph, [TemporalDifferencePass("dynamic")])
    cached = optimize(graph, [BlockCachePass(period=2)])
    composed = optimize(graph, [BlockCachePass(period=2), TemporalDifferencePass("dynamic")])
    samples = {
        name: _sampler(config).sample(d, (LABELS,), shape=SHAPE, seed=1)
        for name, d in (("reference", reference), ("dynamic", dynamic), ("cached", cached), ("composed", composed))
    }
    dynamic_error = _relative(samples["dynamic"], samples["reference"])  # the mode's own error (README: ~3e-3)
    composed_error = _relative(samples["composed"], samples["cached"])
    print(f"dynamic int8 vs fp32 {dynamic_error:.2e}; block cache + dynamic vs block cache {composed_error:.2e}")
    assert 0 < composed_error < max(2 * dynamic_error, 5e-3)


def test_one_calibration_feeds_channel_aware_icc_and_difference_mode_in_one_call(dit_digits):
    config, graph, statistics = dit_digits
    passes = [
        IncrementCalibratedCachePass(rank=16, period=2, factorization="channel-aware"),
        TemporalDifferencePass("difference", bits=8),
    ]
    composed = optimize(graph, passes, calibration=statistics)
    assert [r.modified for r in composed.pass_records] == [True, True]
    icc_alone = optimize(graph, passes[:1], calibration=statistics)
    reference = _sampler(config).sample(icc_alone, (LABELS,), shape=SHAPE, seed=2)
    error = _relative(_sampler(config).sample(composed, (LABELS,), shape=SHAPE, seed=2), reference)
    assert error < 2e-2, error  # int8 differences (README: difference int8 ~2.7e-3 to fp32)


def test_order_and_stacking_are_checked(dit_digits):
    _, graph, _ = dit_digits
    ditto = optimize(graph, [TemporalDifferencePass("exact")]).program
    with pytest.raises(PassError, match="cannot apply after TemporalDifferencePass"):
        optimize(ditto, [BlockCachePass()])
    with pytest.raises(PassError, match="already has temporal-difference variants"):
        optimize(ditto, [TemporalDifferencePass("dynamic")])
    assert optimize(ditto, [TemporalDifferencePass("exact")]).pass_records[0].modified is False


def test_composed_schedules_round_trip_through_their_dict(dit_digits):
    _, graph, _ = dit_digits
    program = optimize(graph, [FirstBlockCachePass(0.1), TemporalDifferencePass("exact", refresh_period=4)]).program
    schedule = program.schedule
    assert schedule_from_dict(schedule.to_dict()) == schedule
    assert [schedule.probe_at(k) for k in (0, 1, 4)] == [PROBE, f"{PROBE}+{DELTA}", PROBE]
    assert schedule.variant_at(5, signal=0.0) == f"{CACHED}+{DELTA}"
    assert schedule.variant_at(4, signal=1.0) == FULL


def test_first_block_cache_with_static_int8_runs_on_onnxruntime(dit_digits, tmp_path):
    pytest.importorskip("onnxruntime")
    from diffopt.export import to_onnx
    from diffopt.runtime.runtimes import load_bundle

    config, graph, statistics = dit_digits
    optimized = optimize(
        graph, [FirstBlockCachePass(0.05), StaticQuantizationPass(weight_bits=None)], calibration=statistics
    )
    manifest = to_onnx(optimized, tmp_path / "bundle")
    assert set(manifest.variants) == {PROBE, FULL, CACHED}
    assert all(manifest.quantization[name] for name in manifest.variants)  # every variant is quantized
    bundle = load_bundle(tmp_path / "bundle", threads=2)
    torch_samples = _sampler(config, 20).sample(optimized, (LABELS,), shape=SHAPE, seed=3)
    onnx_samples = _sampler(config, 20).sample(bundle, (LABELS,), shape=SHAPE, seed=3)
    assert torch.isfinite(onnx_samples).all()
    assert _relative(onnx_samples, torch_samples) < 2e-2


def test_a_composed_program_exports_and_matches_torch_on_onnxruntime(dit_digits, tmp_path):
    pytest.importorskip("onnxruntime")
    from diffopt.export import to_onnx
    from diffopt.runtime.runtimes import load_bundle

    config, graph, _ = dit_digits
    optimized = optimize(graph, [BlockCachePass(period=3), TemporalDifferencePass("exact")])
    manifest = to_onnx(optimized, tmp_path / "bundle")
    assert set(manifest.variants) == {FULL, DELTA, CACHED, f"{CACHED}+{DELTA}"}
    assert manifest.schedule == optimized.program.schedule  # the composed schedule travels in the manifest
    bundle = load_bundle(tmp_path / "bundle", threads=2)
    torch_samples = _sampler(config, 20).sample(optimized, (LABELS,), shape=SHAPE, seed=4)
    onnx_samples = _sampler(config, 20).sample(bundle, (LABELS,), shape=SHAPE, seed=4)
    assert _relative(onnx_samples, torch_samples) < 1e-4
