"""Length shortcuts: the rewiring pass against independent eager implementations, the
depth schedule, ONNX export, the fine-tuning loop and the budget API."""

import pytest
import torch
from models import assert_same_weights, diffusers_dit, diffusers_pixart, inputs_for, simple_dit, trained_twice
from torch import nn

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.export.onnx import to_onnx
from diffopt.ir.graph_tools import module_scopes
from diffopt.ir.schedules import ListSchedule, schedule_from_dict
from diffopt.measure.shortcuts import ShortcutConfig, ShortcutTable, calibrate_shortcuts, spread
from diffopt.models.length_shortcut import LengthShortcutDiT
from diffopt.models.simple_dit import timestep_embedding
from diffopt.passes.base import PassError
from diffopt.passes.length_shortcut import LengthShortcutPass, depth_schedule
from diffopt.runtime.runtimes import load_bundle

FLOW = {"kind": "flow", "timestep_scale": 1000.0, "prediction_type": "velocity"}
MIN_ACCURACY = {2: 0.8, 4: 0.85, 6: 0.85}  # the shipped dit-digits-flow-odel, 10 Euler steps, 40 samples


def _random_embedding(model: LengthShortcutDiT, seed: int) -> torch.Tensor:
    with torch.no_grad():
        model.length_embedding.weight.copy_(
            torch.randn(model.length_embedding.weight.shape, generator=torch.Generator().manual_seed(seed))
        )
    return model.length_embedding.weight.detach()


def _dit_program(group_size: int, num_layers: int = 4, seed: int = 0, **options):
    base = diffusers_dit(seed, num_layers=num_layers)
    eager = LengthShortcutDiT(base, group_size)
    embedding = _random_embedding(eager, seed + 1)
    graph = capture(base, inputs_for("diffusers_dit", 2, seed))
    optimized = optimize(graph, [LengthShortcutPass(group_size, length_embedding=embedding, **options)])
    return eager, optimized


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_every_depth_matches_the_eager_accumulated_form_on_fresh_inputs(group_size):
    eager, optimized = _dit_program(group_size)
    assert sorted(optimized.program.variants) == [f"depth{d}" for d in eager.depths]
    for seed, batch in ((5, 3), (6, 1)):
        inputs = inputs_for("diffusers_dit", batch, seed)
        x, t, y = inputs["hidden_states"], inputs["timestep"], inputs["class_labels"]
        for depth in eager.depths:
            with torch.no_grad():
                expected = eager(x, t, y, depth)
            out = optimized.backend.run(f"depth{depth}", (x, t, y))[0]
            torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_blocks_beyond_a_variants_depth_are_absent_from_its_graph():
    _, optimized = _dit_program(1)
    for depth in (1, 2, 3, 4):
        graph = optimized.program.variants[f"depth{depth}"].graph
        present = {
            int(scope.split(".")[1])
            for node in graph.nodes
            for scope in module_scopes(node)
            if scope.startswith("transformer_blocks.") and scope.count(".") >= 2
        }
        present.discard(0)  # the head calls block 0's embedder
        # blocks 1 .. depth-1 run; deeper ones (and their embedders) are gone
        assert present == set(range(1, depth)), (depth, present)


def test_one_group_without_embedding_is_the_unmodified_model_and_group_l_is_naive_truncation():
    base = diffusers_dit(3, num_layers=4)
    graph = capture(base, inputs_for("diffusers_dit", 2, 3))
    inputs = inputs_for("diffusers_dit", 3, 9)
    x, t, y = inputs["hidden_states"], inputs["timestep"], inputs["class_labels"]
    identity = optimize(graph, [LengthShortcutPass(group_size=4)])
    with torch.no_grad():
        torch.testing.assert_close(identity.backend.run("depth4", (x, t, y))[0], base(**inputs).sample)
    truncated = optimize(graph, [LengthShortcutPass(group_size=2, depths=(2,))])
    shallow = diffusers_dit(3, num_layers=4)
    shallow.transformer_blocks = shallow.transformer_blocks[:2]
    with torch.no_grad():
        torch.testing.assert_close(truncated.backend.run("depth2", (x, t, y))[0], shallow(**inputs).sample)


def _simple_dit_accumulated(model, x, t, y, depth: int, group_size: int, row: torch.Tensor):
    """SimpleDiT's forward in the accumulated form, written out by hand."""
    h0 = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    c = model.time_mlp(timestep_embedding(t, model.hidden)) + model.class_embed(y) + row
    a, v, current = h0, 0, h0
    for index in range(depth):
        o = model.blocks[index](current, c)
        if (index + 1) % group_size == 0:
            a, v = a + o, v + o
            current = a
        else:
            current = o
    shift, scale = model.final_modulation(nn.functional.silu(c))[:, None].chunk(2, dim=-1)
    h = model.head(model.final_norm(v) * (1 + scale) + shift)
    p, g, b = model.patch_size, model.grid, x.shape[0]
    return h.reshape(b, g, g, p, p, model.channels).permute(0, 5, 1, 3, 2, 4).reshape(b, model.channels, g * p, g * p)


def test_a_hand_written_dit_gets_the_embedding_on_its_shared_conditioning():
    model = simple_dit(4)
    embedding = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    optimized = optimize(
        capture(model, inputs_for("simple_dit", 2, 0)), [LengthShortcutPass(group_size=1, length_embedding=embedding)]
    )
    inputs = inputs_for("simple_dit", 3, 7)
    for depth in (1, 2):
        with torch.no_grad():
            expected = _simple_dit_accumulated(model, *inputs.values(), depth, 1, embedding[depth])
        out = optimized.backend.run(f"depth{depth}", tuple(inputs.values()))[0]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_pixart_blocks_share_the_adaln_single_conditioning_that_the_embedding_joins():
    model = diffusers_pixart(2)
    embedding = torch.randn(2, 6 * 16, generator=torch.Generator().manual_seed(3))
    graph = capture(model, inputs_for("diffusers_pixart", 2, 0))
    optimized = optimize(graph, [LengthShortcutPass(group_size=2, length_embedding=embedding)])
    inputs = inputs_for("diffusers_pixart", 3, 5)
    # independent: add the row to adaln_single's block conditioning with a hook, run the model
    handle = model.adaln_single.register_forward_hook(lambda _m, _i, out: (out[0] + embedding[1], out[1]))
    try:
        with torch.no_grad():
            expected = model(**inputs).sample
    finally:
        handle.remove()
    flat = (inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"])
    torch.testing.assert_close(optimized.backend.run("depth2", flat)[0], expected, atol=1e-5, rtol=1e-5)


def test_depth_schedules_pick_the_variant_per_step_and_round_trip():
    _, optimized = _dit_program(2, schedule=(2, 2, 4))
    schedule = optimized.program.schedule
    assert [schedule.variant_at(k) for k in range(3)] == ["depth2", "depth2", "depth4"]
    with pytest.raises(ValueError, match="step 3 is past its end"):
        schedule.variant_at(3)
    assert schedule_from_dict(schedule.to_dict()) == schedule
    fixed = optimized.with_schedule(depth_schedule(2))
    assert [fixed.program.schedule.variant_at(k) for k in range(5)] == ["depth2"] * 5
    with pytest.raises(ValueError, match="depth6"):
        optimized.with_schedule(depth_schedule(6))
    assert spread([2, 4], 5) == [2, 2, 2, 4, 4]
    with pytest.raises(ValueError, match="non-empty list"):
        ListSchedule(())


def test_bad_options_are_refused_with_the_reason():
    graph = capture(diffusers_dit(0, num_layers=4), inputs_for("diffusers_dit", 2, 0))
    for options, message in (
        ({"group_size": 5}, "exceeds the chain's 4 blocks"),
        ({"group_size": 3, "depths": (4,)}, "not multiples of 3"),
        ({"group_size": 2, "depths": (3,)}, "not multiples of 2"),
        ({"group_size": 2, "length_embedding": torch.zeros(2, 32)}, "needs 3"),
        ({"group_size": 2, "length_embedding": torch.zeros(3, 7)}, r"not \(batch, 7\)"),
        ({"group_size": 2, "schedule": (2, 6)}, "depth6"),
        ({"group_size": 2, "length_embedding": torch.zeros(3, 32), "conditioning": "norm9"}, "no block has"),
    ):
        with pytest.raises(PassError, match=message):
            optimize(graph, [LengthShortcutPass(**options)])
    with pytest.raises(ValueError, match="group_size"):
        LengthShortcutPass(group_size=0)


def test_length_variants_export_to_onnx_and_match_torch(tmp_path):
    eager, optimized = _dit_program(2, schedule=(2, 4))
    to_onnx(optimized, tmp_path / "bundle", scheduler_config=FLOW)
    bundle = load_bundle(tmp_path / "bundle", threads=1)
    assert bundle.program.schedule == optimized.program.schedule
    inputs = inputs_for("diffusers_dit", 3, 11)
    x, t, y = inputs["hidden_states"], inputs["timestep"].float(), inputs["class_labels"]
    for depth in eager.depths:
        with torch.no_grad():
            expected = eager(x, t, y, depth)
        torch.testing.assert_close(bundle.backend.run(f"depth{depth}", (x, t, y))[0], expected, atol=1e-4, rtol=1e-4)


def test_budget_api_picks_the_best_calibrated_configuration_within_the_budget(tmp_path):
    _, optimized = _dit_program(2)
    table = calibrate_shortcuts(
        optimized,
        FLOW,
        (torch.arange(4) % 10,),
        (4, 1, 8, 8),
        steps=(1, 2),
        depth_plans=[2, 4, [2, 4]],
        reference_steps=4,
        repeats=1,
    )
    assert len(table.configs) == 6
    by_key = {(c.steps, c.depths): c for c in table.configs}
    assert by_key[(2, (2, 4))].macs == (by_key[(2, (2,))].macs + by_key[(2, (4,))].macs) // 2
    assert by_key[(1, (4,))].macs < by_key[(2, (4,))].macs
    plan = by_key[(2, (2, 4))]
    assert [plan.schedule.variant_at(k) for k in range(plan.steps)] == ["depth2", "depth4"]
    assert by_key[(1, (2, 4))].schedule.steps == ("depth2",)  # the plan spread over the config's own steps
    budget = by_key[(2, (2,))].macs
    chosen = table.pick(max_macs=budget)
    assert chosen.macs <= budget
    assert chosen.quality == max(c.quality for c in table.configs if c.macs <= budget)
    with pytest.raises(ValueError, match="cheapest"):
        table.pick(max_macs=1)
    table.save(tmp_path / "table.json")
    assert ShortcutTable.load(tmp_path / "table.json") == table
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not a shortcut table"):
        ShortcutTable.load(tmp_path / "broken.json")
    front = table.pareto()
    assert all(a.macs <= b.macs and a.quality < b.quality for a, b in zip(front, front[1:]))


def test_pick_prefers_quality_then_cost():
    table = ShortcutTable(
        (
            ShortcutConfig(4, (2,), 100, 1.0, 30.0),
            ShortcutConfig(2, (4,), 100, 0.5, 28.0),
            ShortcutConfig(8, (2,), 200, 2.0, 35.0),
        ),
        50,
    )
    assert table.pick(max_macs=150).steps == 4
    assert table.pick(max_seconds=0.9).steps == 2
    assert table.pick(max_macs=500).steps == 8


def test_fine_tuning_is_seeded_and_resumes_exactly(tmp_path):
    from diffopt.evaluation.training import train_length_shortcut

    straight, resumed = trained_twice(train_length_shortcut, "dit-digits-flow-odel", tmp_path, batch_size=8)
    assert_same_weights(straight, resumed)
    assert straight.length_embedding.weight.abs().sum() > 0  # the embedding trained


def test_the_shipped_fine_tuned_model_reads_as_digits_at_every_depth():
    from diffopt.evaluation.metrics.digits import class_accuracy
    from diffopt.models import example_inputs, load

    odel, config = load("dit-digits-flow-odel")
    embedding = odel.length_embedding.weight.detach()
    shortcut = optimize(
        capture(odel.base, example_inputs("dit-digits-flow-odel")),
        [LengthShortcutPass(odel.group_size, length_embedding=embedding)],
    )
    x, t, y = example_inputs("dit-digits-flow-odel", batch_size=3)
    labels = torch.arange(40) % 10
    sampler = Sampler(make_scheduler(config, num_steps=10), progress=False)
    for depth in odel.depths:
        with torch.no_grad():
            expected = odel(x, t, y, depth)
        torch.testing.assert_close(shortcut.backend.run(f"depth{depth}", (x, t, y))[0], expected, atol=1e-5, rtol=1e-5)
        program = shortcut.with_schedule(depth_schedule(depth))
        samples = sampler.sample(program, (labels,), shape=(40, 1, 16, 16), seed=0)
        # random weights read as ~0.1 and the un-fine-tuned truncation collapses (benchmarks/shortcuts.py)
        assert class_accuracy(samples, labels) >= MIN_ACCURACY[depth], depth
