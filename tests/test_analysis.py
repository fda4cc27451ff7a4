import pytest
import torch
from models import diffusers_dit, inputs_for

from diffopt import capture, optimize
from diffopt.measure.macs import count_macs, macs_per_node, macs_per_run, variant_macs
from diffopt.passes.block_cache import FirstBlockCachePass


def test_counted_macs_agree_with_the_graph_count_including_attention():
    model = diffusers_dit(seed=0)
    inputs = tuple(inputs_for("diffusers_dit", 3, seed=1).values())
    graph = capture(model, inputs)
    per_node = macs_per_node(graph.module, inputs)
    attention = sum(m for node, m in per_node.items() if "attention" in str(node.target))
    assert attention > 0
    with count_macs() as eager, torch.no_grad():
        model(*inputs)
    with count_macs() as traced:
        graph.module(*inputs)
    assert eager.macs == traced.macs == sum(per_node.values())


def test_adaptive_runs_are_charged_for_the_probe_and_the_variants_they_ran():
    graph = capture(diffusers_dit(seed=0), inputs_for("diffusers_dit", 2, seed=0))
    program = optimize(graph, [FirstBlockCachePass(0.1)]).program
    inputs = tuple(inputs_for("diffusers_dit", 2, seed=3).values())
    per_variant = variant_macs(program, inputs)
    run = ["full", "cached", "cached", "full"]
    assert (
        macs_per_run(program, inputs, variants_run=run)
        == 4 * per_variant["probe"] + 2 * per_variant["full"] + 2 * per_variant["cached"]
    )
    with pytest.raises(ValueError, match="variants_run"):  # an adaptive schedule has no fixed per-step variants
        macs_per_run(program, inputs, num_steps=4)
