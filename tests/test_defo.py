import dataclasses

import pytest
import torch
from models import simple_dit

from diffopt import LayerPolicy, Sampler, capture, make_scheduler, optimize
from diffopt.ir.profile import GroupCost, LayerProfile, MachineModel
from diffopt.ir.specs import FULL
from diffopt.measure.defo_profile import node_seconds, profile_layers
from diffopt.passes.defo import DefoPass
from diffopt.passes.temporal_difference import DELTA, TemporalDifferencePass, layer_decisions

LABELS = torch.arange(32) % 10
SHAPE = (32, 1, 16, 16)
EXACT = TemporalDifferencePass("exact")


@pytest.fixture(scope="module")
def graph_and_profile():
    graph = capture(simple_dit(seed=5), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
    sampler = Sampler(make_scheduler({"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}, "ddim", 6), progress=False)
    profile = profile_layers(optimize(graph).program, EXACT, sampler, (LABELS,), SHAPE, repeats=15)
    return graph, profile


def test_profile_covers_every_layer_and_models_the_extra_work_of_a_float_difference(graph_and_profile):
    graph, profile = graph_and_profile
    layers = [layer for group in profile.groups.values() for layer in group.layers]
    linear_layers = [
        n
        for n in graph.module.graph.nodes
        if n.target in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)
    ]
    assert len(layers) == len(linear_layers) and "blocks.0.qkv" in layers and "patch_embed" in layers
    assert all(g.full_measured_s > 0 and g.delta_measured_s > 0 for g in profile.groups.values())
    # exact mode: the same matmul plus a subtraction and an addition -> the model never prefers delta
    # (whether the clock agrees is measured in benchmarks/temporal_difference.py, not asserted here)
    assert all(g.delta_model_s > g.full_model_s for g in profile.groups.values())


def test_cost_model_charges_overhead_plus_the_slower_of_compute_and_memory():
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    node = graph.call_function(torch.ops.aten.linear.default, (x, w))
    args, out = (torch.randn(100, 8), torch.randn(4, 8)), torch.randn(100, 4)
    moved = (800 + 32 + 400) * 4
    compute_bound = MachineModel(overhead_s=1e-6, bytes_per_s=1e12, macs_per_s={"float32": 1e6})
    memory_bound = MachineModel(overhead_s=1e-6, bytes_per_s=1e3, macs_per_s={"float32": 1e12})
    assert node_seconds(compute_bound, node, args, out) == pytest.approx(1e-6 + 3200 / 1e6)
    assert node_seconds(memory_bound, node, args, out) == pytest.approx(1e-6 + moved / 1e3)


def test_decisions_follow_the_profile_with_reasons_and_the_policy_overrides(graph_and_profile):
    graph, profile = graph_and_profile
    groups = dict(profile.groups)
    cheap = next(name for name, g in groups.items() if "fc1" in name)
    groups[cheap] = dataclasses.replace(groups[cheap], delta_model_s=0.0)  # pretend its delta is free
    rigged = dataclasses.replace(profile, groups=groups)
    decided = layer_decisions(optimize(graph, [DefoPass(rigged, EXACT)]).program)
    assert decided[cheap][0] == DELTA and decided[cheap][1].startswith("Defo (model): delta 0.0 us <")
    others = [mode for layer, (mode, _) in decided.items() if layer != cheap]
    assert others and all(mode == FULL for mode in others)
    policy = LayerPolicy(exact_names={cheap: {"mode": "full"}, "blocks.0.fc2": {"mode": DELTA}})
    overridden = layer_decisions(optimize(graph, [DefoPass(rigged, EXACT)], policy=policy).program)
    assert overridden[cheap] == (FULL, "policy override")
    assert overridden["blocks.0.fc2"] == (DELTA, "policy override")


def test_defo_program_stays_exact(graph_and_profile):
    graph, profile = graph_and_profile
    groups = {
        name: dataclasses.replace(g, delta_model_s=0.0) if "blocks.0" in name else g
        for name, g in profile.groups.items()
    }
    mixed = optimize(graph, [DefoPass(dataclasses.replace(profile, groups=groups), EXACT)])
    sampler = Sampler(make_scheduler({"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}, "ddim", 8), progress=False)
    expected = sampler.sample(optimize(graph), (LABELS,), shape=SHAPE, seed=2)
    actual = sampler.sample(mixed, (LABELS,), shape=SHAPE, seed=2)
    assert "delta" in sampler.last_stats.variants
    assert float((actual - expected).norm() / expected.norm()) < 1e-5


def test_profile_round_trips_and_bad_options_are_refused(graph_and_profile, tmp_path):
    _, profile = graph_and_profile
    profile.save(tmp_path / "profile.json")
    assert LayerProfile.load(tmp_path / "profile.json") == profile
    with pytest.raises(ValueError, match="was measured for"):
        DefoPass(profile, TemporalDifferencePass("difference"))
    with pytest.raises(ValueError, match="cost must be"):
        DefoPass(profile, EXACT, cost="guess")
    with pytest.raises(ValueError, match="profile_layers"):
        DefoPass(None, EXACT)
    group = GroupCost(["a"], full_measured_s=2.0, delta_measured_s=1.0, full_model_s=1.0, delta_model_s=2.0)
    assert group.delta_wins("measured") and not group.delta_wins("model")
