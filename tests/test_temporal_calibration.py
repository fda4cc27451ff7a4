import math

import pytest
import torch
from models import simple_dit

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.ir.statistics import PAPER, CalibrationStatistics, TemporalStatistics
from diffopt.measure.calibration import calibrate
from diffopt.passes.observers import InsertObserversPass, observed_values
from diffopt.quant.arithmetic import code_width_fractions, quantize, symmetric_scale

LABELS = torch.tensor([1, 5, 9])
SHAPE = (3, 1, 16, 16)
STEPS = 6


def _sampler():
    return Sampler(
        make_scheduler({"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}, "ddim", STEPS), progress=False
    )


@pytest.fixture(scope="module")
def model_graph_statistics():
    model = simple_dit(seed=4)
    graph = capture(model, (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
    statistics = calibrate(optimize(graph).program, _sampler(), (LABELS,), SHAPE, seeds=(3,), progress=False)
    return model, graph, statistics


def test_observers_are_inserted_on_every_linear_conv_and_attention_input(model_graph_statistics):
    _, graph, statistics = model_graph_statistics
    observed = optimize(graph, [InsertObserversPass(), InsertObserversPass()])
    assert [r.modified for r in observed.pass_records] == [True, False]
    watched = observed_values(observed.program.variants["full"].graph).values()
    layers = [value.layer for value in watched if value.role == "input"]
    assert sorted(value.layer for value in watched if value.role == "output") == sorted(
        value.layer for value in watched if value.role == "input" and value.op != "attention"
    )
    assert "blocks.0.fc1" in layers and "patch_embed" in layers
    assert {"blocks.1.query", "blocks.1.key", "blocks.1.value"} <= set(layers)  # attention operands
    linear_ops = [
        n
        for n in graph.module.graph.nodes
        if n.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
    ]
    assert len(layers) == len(linear_ops) + 3 * 2  # nothing else is observed (2 blocks with attention)
    assert set(layers) == set(statistics.temporal.ops)
    inputs = (torch.randn(3, 1, 16, 16), torch.tensor([900, 10, 500]), LABELS)
    torch.testing.assert_close(observed(*inputs), optimize(graph)(*inputs), rtol=0, atol=0)


def test_statistics_match_an_independent_hook_on_the_eager_model(model_graph_statistics):
    model, _, statistics = model_graph_statistics
    seen = []
    handle = model.blocks[1].fc1.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    try:
        _sampler().sample(model, (LABELS,), shape=SHAPE, seed=3)
    finally:
        handle.remove()
    assert len(seen) == STEPS
    scale = max(float(x.abs().max()) for x in seen) / 127
    temporal = statistics.temporal
    assert symmetric_scale(temporal.input_range("blocks.1.fc1"), 8) == pytest.approx(scale, rel=1e-6)
    cosine = temporal.per_step("blocks.1.fc1", "cosine")
    zero = temporal.per_step("blocks.1.fc1", "zero")
    assert math.isnan(cosine[0])
    for k in range(1, STEPS):
        flat, previous = seen[k].reshape(3, -1), seen[k - 1].reshape(3, -1)
        expected_cosine = torch.nn.functional.cosine_similarity(flat, previous, dim=1).mean()
        assert cosine[k] == pytest.approx(float(expected_cosine), abs=1e-5)
        codes = quantize(seen[k], scale, 8) - quantize(seen[k - 1], scale, 8)
        assert zero[k] == pytest.approx(code_width_fractions(codes)["zero"], abs=1e-3)


def test_statistics_round_trip_and_report_the_paper_beside_ours(model_graph_statistics, tmp_path):
    _, _, statistics = model_graph_statistics
    statistics.save(tmp_path / "calibration.json")
    loaded = CalibrationStatistics.load(tmp_path / "calibration.json")
    assert loaded.temporal == statistics.temporal
    assert loaded.activations.counts == statistics.activations.counts
    for layer, kinds in statistics.activations.sums.items():
        for kind, value in kinds.items():
            assert torch.equal(loaded.activations.sums[layer][kind], value)
    report = loaded.temporal.report(per_layer=True)
    assert f"{PAPER['zero']:.1%}" in report and f"{PAPER['cosine']:.3f}" in report
    assert "blocks.0.qkv" in report
    with pytest.raises(KeyError, match="was not calibrated"):
        loaded.temporal.input_range("no.such.layer")
    (tmp_path / "other.json").write_text('{"bits": 8}')
    with pytest.raises(ValueError, match="other.json is not a diffopt-calibration file"):
        CalibrationStatistics.load(tmp_path / "other.json")


def test_cost_counts_bit_operations_from_code_widths():
    from diffopt.measure.cost import CostCounter
    from diffopt.measure.interpreter import InstrumentedBackend
    from diffopt.passes.static_quantization import StaticQuantizationPass
    from diffopt.runtime.denoiser import OptimizedDenoiser

    class OneLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 4)

        def forward(self, x, t):
            return self.layer(x)

    graph = capture(OneLinear().eval(), (torch.randn(2, 3, 8), torch.tensor([1, 2])))
    temporal = TemporalStatistics(input_absmax={"layer": 127.0}, ops={"layer": "linear"})  # scale 1: codes = x
    quantized = optimize(graph, [StaticQuantizationPass()], calibration=CalibrationStatistics(temporal=temporal))
    x = torch.zeros(1, 3, 8)
    x[0, 0, :4] = 3.0  # four 4-bit codes
    x[0, 1, :2] = 100.0  # two 8-bit codes; the other 18 are zero (skipped)
    counter = CostCounter()
    OptimizedDenoiser(quantized.program, backend=InstrumentedBackend(quantized.program, [counter]))(
        x, torch.tensor([1])
    )
    (step,) = counter.steps
    assert step.linear_macs == 3 * 8 * 4
    mean_bits = (4 * 4 + 2 * 8) / 24
    assert step.linear_bit_operations == pytest.approx(step.linear_macs * mean_bits * 8)
