"""Caching from three parts (``passes.caching``, ``CachePass``): target x refresh policy x
predictor. The TaylorSeer-form predictor on TaylorSeer's plan equals diffusers' hook; the
``ForecastCachePass`` preset equals the implementation it replaced; a predictor defined in
this file runs through ``optimize``, a pass file, export and onnxruntime; every predictor x
policy exports; the learned predictor beats Newton's on held-out seeds at a quarter of the
work."""

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from models import diffusers_dit, inputs_for, max_relative, run_along, simple_dit

from diffopt import capture, optimize
from diffopt.ir.schedules import ListSchedule, Schedule, schedule_from_dict
from diffopt.ir.specs import CACHED, FORECAST, FULL, PROBE
from diffopt.passes.base import PassError
from diffopt.passes.cache import CachePass
from diffopt.passes.caching.policies import Periodic, StepMask, TaylorSeerPlan
from diffopt.passes.caching.predictors import Predictor, per_sample
from diffopt.passes.caching.targets import Span
from diffopt.passes.registry import load_passes, pass_from_dict, pass_to_dict, save_passes

LABELS = torch.tensor([1, 4, 7])


@pytest.fixture(scope="module")
def dit_and_graph():
    model = diffusers_dit(seed=4, num_layers=4)
    return model, capture(model, inputs_for("diffusers_dit", 2, seed=0))


def _steps(count):
    g = torch.Generator().manual_seed(7)
    x, direction = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    return [
        (x + 0.03 * k * direction + 0.002 * k * k * x, torch.full((3,), 900 - 20 * k), LABELS) for k in range(count)
    ]


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize(
    "targets",
    ["modules", "blocks"],
    ids=["attention and feed-forward modules", "blocks (their output hidden states)"],
)
def test_taylorseer_predictor_on_its_plan_equals_diffusers_hook(dit_and_graph, order, targets):
    from diffopt.evaluation.baselines import DiffusersCacheHook

    model, graph = dit_and_graph
    target = (
        {"kind": "modules", "modules": [r"transformer_blocks\.\d+\.(attn1|ff)"]}
        if targets == "modules"
        else {"kind": "span", "value": "output"}
    )
    identifiers = r"transformer_blocks\.\d+\.(attn1|ff)" if targets == "modules" else r"transformer_blocks\.\d+"
    cache = CachePass(
        target=target,
        policy={"kind": "taylorseer", "warmup": 2, "period": 3},
        predictor={"kind": "taylorseer", "order": order},
    )
    optimized = optimize(graph, [cache])
    hook = DiffusersCacheHook(
        model,
        "taylorseer",
        cache_interval=3,
        disable_cache_before_step=2,
        max_order=order,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[identifiers],
    )
    steps = _steps(14)
    outputs, variants = run_along(optimized, steps)
    assert variants == [FULL, FULL, FORECAST, FULL, FORECAST, FORECAST, FULL, FORECAST, FORECAST, FULL] + [
        FORECAST,
        FORECAST,
        FULL,
        FORECAST,
    ]
    assert max_relative(outputs, [hook(*step) for step in steps]) < 1e-5


PRESET_REFERENCES = {  # preset -> (its former implementation's samples, the pass, sampling steps)
    "forecast": ("forecast_preset_reference.pt", "ForecastCachePass", 16),
    "first block": ("first_block_preset_reference.pt", "FirstBlockCachePass", 20),
}


@pytest.mark.parametrize("preset", PRESET_REFERENCES)
def test_the_presets_equal_the_implementations_they_replaced(preset):
    """``tests/data/<preset>_preset_reference.pt``: samples of the shipped dit-digits made by
    the pass before it became a preset of ``passes.caching`` (``scripts/preset_reference.py``);
    each file holds several settings whose samples differ (different steps cached)."""
    from pathlib import Path

    from diffopt.models import example_inputs, load
    from diffopt.passes.registry import registered_passes
    from diffopt.sampling.schedulers import make_scheduler
    from diffopt.sampling.sequential import Sampler

    file, pass_name, steps = PRESET_REFERENCES[preset]
    reference = torch.load(Path(__file__).parent / "data" / file)
    model, config = load("dit-digits")
    graph = capture(model, example_inputs("dit-digits"))
    samples = []
    for index, settings in enumerate(reference["settings"]):
        sampler = Sampler(make_scheduler(config, num_steps=steps), progress=False)
        shape = (4, *example_inputs("dit-digits")[0].shape[1:])
        cache = registered_passes()[pass_name](**settings)
        samples.append(sampler.sample(optimize(graph, [cache]), (torch.tensor([0, 3, 7, 9]),), shape=shape, seed=11))
        torch.testing.assert_close(samples[-1], reference["samples"][index], rtol=0, atol=1e-6, msg=str(settings))
    assert min(float((x - y).abs().max()) for x, y in zip(samples, samples[1:])) > 1e-2


def test_a_second_cache_in_one_program_is_refused_by_name(dit_and_graph):
    _, graph = dit_and_graph
    first = CachePass(target={"kind": "span", "blocks": ["transformer_blocks.0"]}, label="early")
    second = CachePass(target={"kind": "span", "blocks": ["transformer_blocks.2"]}, label="late")
    with pytest.raises(PassError, match="cache passes do not stack"):
        optimize(graph, [first, second])


def test_parts_compose_and_round_trip_through_a_pass_file(tmp_path):
    cache = CachePass(
        target={"kind": "span", "value": "output", "blocks": ["transformer_blocks.1", "transformer_blocks.2"]},
        policy={"kind": "mask", "steps": [1, 1, 0, 0, 1, 0]},
        predictor={"kind": "newton", "order": 2},
        label="late blocks",
    )
    assert pass_from_dict(pass_to_dict(cache)) == cache
    save_passes(tmp_path / "p.json", [cache])
    assert load_passes(tmp_path / "p.json")[0] == [cache]
    assert isinstance(cache.target, Span) and isinstance(cache.policy, StepMask)
    assert cache.policy.schedule(FORECAST) == ListSchedule((FULL, FULL, FORECAST, FORECAST, FULL, FORECAST))
    plan = TaylorSeerPlan(period=4, warmup=3).schedule(CACHED)
    assert [plan.variant_at(k) for k in range(10)] == [FULL] * 3 + [CACHED, FULL, CACHED, CACHED, CACHED, FULL, CACHED]
    assert schedule_from_dict(plan.to_dict()) == plan and Periodic(3, 2).schedule(CACHED) == Schedule(
        FULL, CACHED, 3, 2
    )
    for bad, message in [
        ({"predictor": {"kind": "oracle"}}, "'kind' in"),
        ({"predictor": {"kind": "newton", "degree": 2}}, r"has no options \['degree'\]"),
        ({"policy": {"kind": "mask", "steps": [0, 1]}}, "starting with 1"),
        ({"target": {"kind": "span", "value": "input"}}, "value must be one of"),
        ({"predictor": {"kind": "learned", "history": 2, "weights": [[1.0]]}}, r"weights\[0\] has 2 numbers"),
    ]:
        with pytest.raises(ValueError, match=message):
            CachePass(**bad)


@dataclass(frozen=True)
class DampedReuse(Predictor):
    """A predictor written in a test: the last full value, pulled toward the one before it
    by ``pull`` per step since the last full step."""

    kind: ClassVar[str] = "test_cache_parts:DampedReuse"
    uses_step: ClassVar[bool] = True
    pull: float = 0.1

    def clock_state(self, column):
        return {"last_full": column}

    def clock_update(self, clock):
        return {"last_full": clock["step"]}

    def state(self, value):
        return {"newest": value, "older": value}

    def update(self, state, value, clock):
        return {"newest": value, "older": state["newest"]}

    def predict(self, state, clock):
        weight = per_sample(torch.clamp((clock["step"] - clock["last_full"]) * self.pull, max=1.0), state["newest"])
        return state["newest"] + weight * (state["newest"] - state["older"])


def test_a_predictor_defined_in_a_test_runs_through_optimize_a_pass_file_export_and_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from diffopt.export.onnx import to_onnx
    from diffopt.runtime.runtimes import load_bundle

    graph = capture(simple_dit(), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
    cache = CachePass(target="span", policy={"kind": "periodic", "period": 3}, predictor=DampedReuse(pull=0.2))
    save_passes(tmp_path / "passes.json", [cache])
    assert '"kind": "test_cache_parts:DampedReuse"' in (tmp_path / "passes.json").read_text()
    (loaded,), _ = load_passes(tmp_path / "passes.json")
    assert loaded == cache
    optimized = optimize(graph, [loaded])
    to_onnx(optimized, tmp_path / "bundle")
    bundle = load_bundle(tmp_path / "bundle", threads=1)
    steps = [(torch.randn(2, 1, 16, 16), torch.full((2,), 999 - 50 * k), torch.tensor([3, 8])) for k in range(7)]
    expected, variants = run_along(optimized, steps)
    got, _ = run_along(bundle, steps)
    assert variants.count(FORECAST) == 4 and max_relative(got, expected) < 1e-5


PREDICTORS = {
    "reuse": "reuse",
    "newton o2": {"kind": "newton", "order": 2},
    "taylorseer o2": {"kind": "taylorseer", "order": 2},
    "learned h2": {"kind": "learned", "history": 2, "weights": [[1.0, 0.0], [1.5, -0.5], [1.2, -0.2]] * 3},
}
POLICIES = {
    "periodic": {"kind": "periodic", "period": 2, "warmup": 2},
    "taylorseer": {"kind": "taylorseer", "period": 2, "warmup": 2},
    "mask": {"kind": "mask", "steps": [1, 1, 0, 0, 1, 0, 1, 0, 0]},
    # adaptive, on the blocks after the first; so high a threshold that only step 0 refreshes (each step's
    # inputs here are fresh noise, so the probe's signal is large): the probe and its state run, the decisions are fixed
    "error_gated": {"kind": "error_gated", "threshold": 1e9},
}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("predictor", PREDICTORS)
def test_every_predictor_and_policy_exports_and_runs_on_onnxruntime(tmp_path, predictor, policy):
    pytest.importorskip("onnxruntime")
    from diffopt.export.onnx import to_onnx
    from diffopt.runtime.runtimes import load_bundle

    graph = capture(simple_dit(), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
    target = "after_first" if policy == "error_gated" else "span"
    optimized = optimize(graph, [CachePass(target=target, policy=POLICIES[policy], predictor=PREDICTORS[predictor])])
    to_onnx(optimized, tmp_path / "bundle")
    g = torch.Generator().manual_seed(2)
    steps = [
        (torch.randn(3, 1, 16, 16, generator=g), torch.full((3,), 990 - 60 * k), torch.tensor([1, 5, 9]))
        for k in range(9)
    ]
    expected, variants = run_along(optimized, steps)
    got, _ = run_along(load_bundle(tmp_path / "bundle", threads=1), steps)
    assert set(variants) == {FULL, CACHED if predictor == "reuse" else FORECAST}
    assert max_relative(got, expected) < 1e-5


def test_the_learned_predictor_beats_newton_on_held_out_seeds_at_a_quarter_of_the_work():
    """The shipped dit-digits, 50 DDIM steps, the span output forecast on a periodic plan
    (0.24 of the MACs): fitted on calibration seeds, scored on others against the plain run."""
    from diffopt.evaluation.runs import generate
    from diffopt.ir.program import StepProgram
    from diffopt.measure.fidelity import psnr
    from diffopt.measure.macs import macs_per_run
    from diffopt.measure.predictor_fit import fit_learned
    from diffopt.models import example_inputs, load

    model, config = load("dit-digits")
    graph = capture(model, example_inputs("dit-digits"))
    target, policy, steps = Span(value="output"), Periodic(period=5, warmup=3), 50
    learned = fit_learned(
        StepProgram.from_captured(graph), target, policy, steps, 2, lambda d: generate(d, config, steps, 16, seed=0)
    )
    reference = generate(model, config, steps, 32, seed=5000)  # held-out noise
    newton = optimize(graph, [CachePass(target=target, policy=policy, predictor={"kind": "newton", "order": 1})])
    fitted = optimize(graph, [CachePass(target=target, policy=policy, predictor=learned)])
    work = macs_per_run(fitted.program, example_inputs("dit-digits"), num_steps=steps) / macs_per_run(
        optimize(graph, []).program, example_inputs("dit-digits"), num_steps=steps
    )
    assert work <= 0.25
    newton_psnr = psnr(generate(newton, config, steps, 32, seed=5000), reference)
    learned_psnr = psnr(generate(fitted, config, steps, 32, seed=5000), reference)
    assert learned_psnr > newton_psnr + 1.0, (learned_psnr, newton_psnr)


@pytest.mark.parametrize("predictor", PREDICTORS)
def test_the_serving_engine_batches_every_fixed_plan_cache_like_solo_runs(predictor):
    from diffopt.sampling.schedulers import make_scheduler
    from diffopt.sampling.sequential import Sampler
    from diffopt.serving.engine import StepEngine

    config = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2", "clip_sample": 1.0}
    graph = capture(simple_dit(), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
    program = optimize(
        graph, [CachePass(target="span", policy=POLICIES["taylorseer"], predictor=PREDICTORS[predictor])]
    )
    engine = StepEngine(program, config, max_batch=8)
    requests = [(torch.tensor([1, 2]), 9, 0), (torch.tensor([3]), 7, 1), (torch.tensor([4, 5, 6]), 9, 2)]
    futures = [
        engine.submit((labels,), steps=steps, seed=seed, samples=len(labels)) for labels, steps, seed in requests[:2]
    ]
    engine.tick()
    futures.append(engine.submit((requests[2][0],), steps=9, seed=2, samples=3))  # joins a step later
    engine.run_until_idle()
    for (labels, steps, seed), future in zip(requests, futures):
        sampler = Sampler(make_scheduler(config, num_steps=steps), progress=False)
        alone = sampler.sample(program, (labels,), shape=(len(labels), 1, 16, 16), seed=seed)
        torch.testing.assert_close(future.result(timeout=0).sample, alone, rtol=1e-5, atol=1e-5)


def test_the_committed_tune_picks_rebuild_from_their_pass_files_alone():
    """``benchmarks/caching_pareto.py`` commits tune's pick per budget for dit-digits;
    ``load_passes`` + ``optimize`` rebuild each, at the step count the file names."""
    from pathlib import Path

    from diffopt.models import example_inputs, load
    from diffopt.sampling.schedulers import make_scheduler
    from diffopt.sampling.sequential import Sampler

    files = sorted(
        (Path(__file__).parents[1] / "benchmarks" / "results" / "caching_pareto").glob("dit-digits_*.passes.json")
    )
    assert len(files) == 7, files
    model, config = load("dit-digits")
    graph = capture(model, example_inputs("dit-digits"))
    for path in files:
        passes, fields = load_passes(path)
        assert fields["mac_fraction"] <= fields["budget"] and fields["steps"] == 50
        sampler = Sampler(make_scheduler(config, num_steps=fields["steps"]), progress=False)
        images = sampler.sample(optimize(graph, passes), (torch.tensor([1, 7]),), shape=(2, 1, 16, 16), seed=0)
        assert torch.isfinite(images).all()


def _first_block_residuals(model, steps) -> list[torch.Tensor]:
    """The first block's ``out - in`` at each step of the plain eager model (a forward hook)."""
    residuals = []
    hook = model.transformer_blocks[0].register_forward_hook(
        lambda module, args, output: residuals.append((output - args[0]).detach())
    )
    try:
        with torch.no_grad():
            for x, t, labels in steps:
                model(x, timestep=t, class_labels=labels)
    finally:
        hook.remove()
    return residuals


def test_error_gated_refreshes_exactly_where_the_gate_forecast_misses_and_equals_its_own_plan(dit_and_graph):
    """Reuse as the predictor: the probe's signal is ``mean|r_last_full - r_k| / mean|r_k|``
    of the first block's residual ``r``. An eager reference (a hook on the plain model)
    gives the decisions; the adaptive run must make them, and equal the fixed mask of them."""
    model, graph = dit_and_graph
    steps = _steps(14)
    residuals = _first_block_residuals(model, steps)
    plain, _ = run_along(optimize(graph), steps)
    target = {"kind": "after_first", "value": "output"}
    for threshold in (0.0, 0.1, 0.15):
        expected, last_full = [], None
        for r in residuals:
            full = last_full is None or float((last_full - r).abs().mean() / r.abs().mean()) > threshold
            expected.append(FULL if full else CACHED)
            last_full = r if full else last_full
        gated = optimize(graph, [CachePass(target=target, policy={"kind": "error_gated", "threshold": threshold})])
        outputs, variants = run_along(gated, steps)
        assert variants == expected, threshold
        if threshold == 0.0:
            assert variants == [FULL] * len(steps) and max_relative(outputs, plain) < 1e-6
            continue
        assert CACHED in variants and variants.count(FULL) > 1
        mask = [int(variant == FULL) for variant in variants]
        fixed, _ = run_along(optimize(graph, [CachePass(target=target, policy={"kind": "mask", "steps": mask})]), steps)
        assert max_relative(outputs, fixed) < 1e-6


def test_error_gated_with_a_forecasting_predictor_and_its_refusals(dit_and_graph):
    _, graph = dit_and_graph
    cache = CachePass(
        target={"kind": "after_first", "value": "residual"},
        policy={"kind": "error_gated", "threshold": 0.15},
        predictor={"kind": "newton", "order": 1},
    )
    program = optimize(graph, [cache]).program
    assert set(program.variants) == {FULL, PROBE, FORECAST}
    assert {entry for entry in program.state.names if ".gate" in entry} >= {"transformer_blocks.0.gate_output"}
    outputs, variants = run_along(optimize(graph, [cache]), _steps(12))
    assert variants[0] == FULL and variants.count(FULL) > 1 and FORECAST in variants
    assert all(torch.isfinite(output).all() for output in outputs)
    with pytest.raises(PassError, match="probes the block before the target; transformer_blocks.0 is the first"):
        optimize(graph, [CachePass(target="span", policy={"kind": "error_gated"})])
    with pytest.raises(PassError, match="gates one span of blocks"):
        optimize(graph, [CachePass(target="blocks", policy={"kind": "error_gated"})])
    with pytest.raises(ValueError, match="threshold"):
        CachePass(policy={"kind": "error_gated", "threshold": -1})
