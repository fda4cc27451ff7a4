import pytest
import torch
from models import MODEL_FACTORIES, inputs_for

from diffopt import LayerPolicy, PassError, Sampler, capture, make_scheduler, optimize
from diffopt.ir.annotations import annotation_of
from diffopt.ir.specs import FULL
from diffopt.measure.calibration import calibrate
from diffopt.measure.cost import measure_run_cost
from diffopt.models import zoo
from diffopt.passes.static_quantization import StaticQuantizationPass
from diffopt.passes.temporal_difference import DELTA, TemporalDifferencePass, layer_decisions

aten = torch.ops.aten
DDPM = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}


def _sampler(config=DDPM, steps=50):
    return Sampler(make_scheduler(config, "ddim", steps), progress=False)


def _recorded_inputs(denoiser, conditions, shape, steps=50):
    """The (latent, timestep) the baseline sees at each step of a DDIM run."""
    calls = []

    def model(x, t, *c):
        calls.append((x.clone(), t.clone()))
        return denoiser(x, t, *c)

    _sampler(steps=steps).sample(model, conditions, shape=shape, seed=0)
    return calls


def _stepwise(denoiser, calls, conditions):
    state, outputs = denoiser.init_state(calls[0][0].shape[0]), []
    for k, (x, t) in enumerate(calls):
        out, state = denoiser.step(k, x, t, *conditions, state=state)
        outputs.append(out)
    return outputs


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def _reference(name):
    model, config = zoo.load(name)
    return model, config, capture(model, zoo.example_inputs(name))


@pytest.fixture(scope="module")
def dit_digits():
    model, config, graph = _reference("dit-digits")
    calibration = calibrate(
        optimize(graph).program, _sampler(config), (torch.arange(4) % 10,), (4, 1, 16, 16), seeds=(5,), progress=False
    )
    return config, graph, calibration


def _conditions_and_shape(kind, batch):
    if kind in ("dit-digits", "unet-digits"):
        return (torch.arange(batch) % 10,), (batch, 1, 16, 16)
    inputs = inputs_for(kind, batch, seed=3)
    latent = next(iter(inputs.values()))
    return tuple(v for k, v in list(inputs.items())[2:] if isinstance(v, torch.Tensor)), tuple(latent.shape)


@pytest.mark.parametrize("kind", ["dit-digits", "unet-digits", "diffusers_pixart", "diffusers_unet"])
def test_exact_mode_matches_the_model_at_every_step(kind):
    if kind in MODEL_FACTORIES:
        graph = capture(MODEL_FACTORIES[kind](seed=2), inputs_for(kind, 2, seed=0))
    else:
        graph = _reference(kind)[2]
    baseline = optimize(graph)
    exact = optimize(graph, [TemporalDifferencePass("exact")])
    for batch in (1, 3):
        conditions, shape = _conditions_and_shape(kind, batch)
        calls = _recorded_inputs(baseline, conditions, shape)
        expected = _stepwise(baseline, calls, conditions)
        actual = _stepwise(exact, calls, conditions)
        assert exact.last_variant == DELTA
        errors = [_relative(a, e) for a, e in zip(actual, expected)]
        assert max(errors) < 1e-5, (kind, batch, max(errors))


def test_structure_state_and_second_run(dit_digits):
    _, graph, calibration = dit_digits
    optimized = optimize(graph, [TemporalDifferencePass("exact"), TemporalDifferencePass("exact")])
    assert [r.modified for r in optimized.pass_records] == [True, False]
    program = optimized.program
    assert set(program.variants) == {FULL, DELTA}
    assert [program.schedule.variant_at(k) for k in range(3)] == [FULL, DELTA, DELTA]
    names = program.state.names
    # q, k and v of an attention read one input: one previous-input state, three previous outputs
    assert "transformer_blocks.0.attn1.to_q.previous_input" in names
    assert "transformer_blocks.0.attn1.to_k.previous_input" not in names
    assert {f"transformer_blocks.0.attn1.to_{p}.previous_output" for p in "qkv"} <= set(names)
    delta = program.variants[DELTA].graph
    full_linears = [n for n in program.variants[FULL].graph.nodes if n.target == aten.linear.default]
    delta_linears = [n for n in delta.nodes if n.target == aten.linear.default]
    assert len(delta_linears) == len(full_linears)
    assert all(len(n.args) == 2 or n.args[2] is None for n in delta_linears)  # no bias on differences
    assert all(annotation_of(n).mode == DELTA for n in delta_linears)


def test_policy_keeps_layers_full_and_says_why(dit_digits):
    _, graph, _ = dit_digits
    policy = LayerPolicy(module_patterns=[(r".*ff\..*", {"mode": "full", "reason": "memory-bound"})])
    program = optimize(graph, [TemporalDifferencePass("exact")], policy=policy).program
    assert not any(".ff." in name for name in program.state.names)
    kept = [
        n
        for n in program.variants[DELTA].graph.nodes
        if annotation_of(n) is not None
        and annotation_of(n).mode == FULL
        and ".ff." in annotation_of(n).details["layer"]
    ]
    assert kept and all(annotation_of(n).reason == "memory-bound" for n in kept)


def test_modes_other_than_exact_need_calibration_and_valid_options(dit_digits):
    _, graph, _ = dit_digits
    with pytest.raises(PassError, match="TemporalDifferencePass needs calibration statistics"):
        optimize(graph, [TemporalDifferencePass("integer")])
    with pytest.raises(ValueError, match="unknown mode"):
        TemporalDifferencePass("fuzzy")
    with pytest.raises(ValueError, match="bits must be 8"):
        TemporalDifferencePass("integer", bits=4)


def test_integer_mode_equals_a8w8_bit_for_bit_with_half_the_bit_operations(dit_digits):
    config, graph, calibration = dit_digits
    a8w8 = optimize(graph, [StaticQuantizationPass()], calibration=calibration)
    integer = optimize(graph, [TemporalDifferencePass("integer")], calibration=calibration)
    conditions, shape = _conditions_and_shape("dit-digits", 3)
    calls = _recorded_inputs(optimize(graph), conditions, shape, steps=10)
    for actual, expected in zip(_stepwise(integer, calls, conditions), _stepwise(a8w8, calls, conditions)):
        assert torch.equal(actual, expected)
    # bit-operations of a whole 50-step run (with 10 steps the differences are larger: ~43% saved)
    a8w8_cost = measure_run_cost(a8w8.program, _sampler(config), conditions, shape, seed=1)
    integer_cost = measure_run_cost(integer.program, _sampler(config), conditions, shape, seed=1)
    assert a8w8_cost.macs == integer_cost.macs
    assert integer_cost.linear_bit_operations < 0.5 * a8w8_cost.linear_bit_operations


def test_difference_mode_is_far_closer_to_fp32_than_static_int8(dit_digits):
    config, graph, calibration = dit_digits
    conditions, shape = _conditions_and_shape("dit-digits", 4)
    reference = _sampler(config).sample(optimize(graph), conditions, shape=shape, seed=11)
    int8 = optimize(graph, [StaticQuantizationPass(weight_bits=None)], calibration=calibration)
    difference = optimize(graph, [TemporalDifferencePass("difference", bits=8)], calibration=calibration)
    int8_error = _relative(_sampler(config).sample(int8, conditions, shape=shape, seed=11), reference)
    difference_error = _relative(_sampler(config).sample(difference, conditions, shape=shape, seed=11), reference)
    assert difference_error * 5 < int8_error


def test_row_skipping_at_threshold_zero_is_lossless_and_skips_work(dit_digits):
    config, graph, calibration = dit_digits
    skipping = optimize(graph, [TemporalDifferencePass("exact", row_threshold=0.0)], calibration=calibration)
    delta = skipping.program.variants[DELTA].graph
    assert any(n.target == aten.index_select.default for n in delta.nodes)
    assert any(n.target == aten.index_add.default for n in delta.nodes)
    conditions, shape = _conditions_and_shape("dit-digits", 2)
    calls = _recorded_inputs(optimize(graph), conditions, shape, steps=10)
    expected = _stepwise(optimize(graph), calls, conditions)
    for actual, wanted in zip(_stepwise(skipping, calls, conditions), expected):
        assert _relative(actual, wanted) < 1e-5
    # a coarse threshold skips rows: the delta step runs smaller matmuls
    coarse = optimize(graph, [TemporalDifferencePass("exact", row_threshold=0.5)], calibration=calibration)
    full_cost = measure_run_cost(optimize(graph).program, _sampler(config, 10), conditions, shape)
    coarse_cost = measure_run_cost(coarse.program, _sampler(config, 10), conditions, shape)
    assert coarse_cost.steps[-1].linear_macs < 0.95 * full_cost.steps[-1].linear_macs


def test_integer_mode_keeps_full_layers_in_a8w8_so_it_still_equals_a8w8(dit_digits):
    _, graph, calibration = dit_digits
    policy = LayerPolicy(module_patterns=[(r".*attn1.*", {"mode": "full"})])
    partial = optimize(graph, [TemporalDifferencePass("integer")], calibration=calibration, policy=policy)
    decided = layer_decisions(partial.program)
    assert (
        decided["transformer_blocks.0.attn1.to_q"][0] == FULL and decided["transformer_blocks.0.ff.net.2"][0] == DELTA
    )
    a8w8 = optimize(graph, [StaticQuantizationPass()], calibration=calibration)
    conditions, shape = _conditions_and_shape("dit-digits", 2)
    calls = _recorded_inputs(optimize(graph), conditions, shape, steps=6)
    for actual, expected in zip(_stepwise(partial, calls, conditions), _stepwise(a8w8, calls, conditions)):
        assert torch.equal(actual, expected)


def test_row_skipping_works_on_a_unet_whose_attention_inputs_are_not_contiguous():
    graph = capture(MODEL_FACTORIES["diffusers_unet"](seed=4), inputs_for("diffusers_unet", 2, seed=0))
    conditions, shape = _conditions_and_shape("diffusers_unet", 2)
    calibration = calibrate(optimize(graph).program, _sampler(steps=6), conditions, shape, progress=False)
    skipping = optimize(graph, [TemporalDifferencePass("exact", row_threshold=0.0)], calibration=calibration)
    calls = _recorded_inputs(optimize(graph), conditions, shape, steps=6)
    for actual, expected in zip(_stepwise(skipping, calls, conditions), _stepwise(optimize(graph), calls, conditions)):
        assert _relative(actual, expected) < 1e-5
