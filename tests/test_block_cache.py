import pytest
import torch
from models import diffusers_dit, diffusers_unet, inputs_for, run_along

from diffopt import PassError, capture, optimize
from diffopt.evaluation.baselines import DiffusersCacheHook
from diffopt.ir.annotations import annotation_of
from diffopt.ir.graph_tools import module_scopes
from diffopt.ir.schedules import AdaptiveSchedule, Schedule
from diffopt.ir.specs import CACHED, FULL, PROBE
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.increment_calibrated_cache import IncrementCalibratedCachePass

aten = torch.ops.aten
BLOCKS = tuple(f"transformer_blocks.{i}" for i in range(4))
LABELS = torch.tensor([1, 5, 9])


@pytest.fixture(scope="module")
def dit_and_graph():
    model = diffusers_dit(seed=4, num_layers=4)
    return model, capture(model, inputs_for("diffusers_dit", 2, seed=0))


def _slow_trajectory(steps, seed=1, drift=0.02):
    """Inputs that change a little from step to step, as in sampling."""
    g = torch.Generator().manual_seed(seed)
    x, direction = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    return [(x + drift * k * direction, torch.full((3,), 900 - 10 * k)) for k in range(steps)]


def _run(optimized, trajectory):
    return run_along(optimized, [(x, t, LABELS) for x, t in trajectory])


def _hooked_block_reuse(model, trajectory, blocks, period):
    """Independent eager reference: forward hooks that replay each block's residual."""
    residual, step = {}, {"k": 0}

    def hook(module, args, kwargs, output, index):
        hidden = args[0] if args else kwargs["hidden_states"]
        if step["k"] % period == 0:
            residual[index] = output - hidden
            return output
        return hidden + residual[index]

    handles = [
        model.transformer_blocks[i].register_forward_hook(
            lambda m, a, kw, out, i=i: hook(m, a, kw, out, i), with_kwargs=True
        )
        for i in blocks
    ]
    outputs = []
    try:
        with torch.no_grad():
            for x, t in trajectory:
                outputs.append(model(x, t, LABELS, return_dict=False)[0])
                step["k"] += 1
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _close(actual, expected, tolerance=1e-5):
    return all((a - e).norm() <= tolerance * e.norm() for a, e in zip(actual, expected))


def test_block_reuse_matches_an_eager_hook_reference(dit_and_graph):
    model, graph = dit_and_graph
    trajectory = _slow_trajectory(5)
    optimized = optimize(graph, [BlockCachePass(blocks=BLOCKS[1:3], period=2)])
    outputs, variants = _run(optimized, trajectory)
    assert variants == [FULL, CACHED, FULL, CACHED, FULL]
    assert _close(outputs, _hooked_block_reuse(model, trajectory, (1, 2), period=2))
    plain = [model(x, t, LABELS, return_dict=False)[0] for x, t in trajectory]
    assert not _close(outputs, plain, 1e-3)  # the cached steps really differ from recomputation


def test_block_reuse_structure_and_period_one_is_exact(dit_and_graph):
    model, graph = dit_and_graph
    optimized = optimize(graph, [BlockCachePass(blocks=BLOCKS[1:3], period=2)])
    program = optimized.program
    assert program.schedule == Schedule(FULL, CACHED, 2)
    assert program.state.names == ("transformer_blocks.1.cached_residual", "transformer_blocks.2.cached_residual")
    cached_scopes = {
        s for n in program.variants[CACHED].graph.nodes if n.target == aten.linear.default for s in module_scopes(n)
    }
    assert "transformer_blocks.0" in cached_scopes and "transformer_blocks.3" in cached_scopes
    assert not {"transformer_blocks.1", "transformer_blocks.2"} & cached_scopes  # the work is gone
    assert [
        annotation_of(n).details["block"] for n in program.variants[CACHED].graph.nodes if annotation_of(n) is not None
    ] == ["transformer_blocks.1", "transformer_blocks.2"]
    every_step = optimize(graph, [BlockCachePass(blocks=BLOCKS, period=1)])
    trajectory = _slow_trajectory(3, seed=2)
    outputs, _ = _run(every_step, trajectory)
    assert _close(outputs, [model(x, t, LABELS, return_dict=False)[0] for x, t in trajectory], 1e-6)


def test_unet_up_block_reuse_keeps_only_the_outer_blocks():
    model = diffusers_unet(seed=1)
    graph = capture(model, inputs_for("diffusers_unet", 2, seed=0))
    optimized = optimize(graph, [BlockCachePass(blocks=("up_blocks.0",), period=3)])
    assert optimized.program.state.names == ("up_blocks.0.cached_output",)  # the block changes shape
    live = {s for n in optimized.program.variants[CACHED].graph.nodes for s in module_scopes(n)}
    assert {"down_blocks.0", "up_blocks.1"} <= live
    assert not {"down_blocks.1", "mid_block", "up_blocks.0"} & live  # DeepCache: the deep path is skipped
    # a block that also feeds skip connections passes several values on: each is a cached stream
    down = optimize(graph, [BlockCachePass(blocks=("down_blocks.0",))]).program
    assert len(down.state.names) > 1 and all(".stream" in name for name in down.state.names)
    assert "down_blocks.0" not in {s for n in down.variants[CACHED].graph.nodes for s in module_scopes(n)}


def test_block_passes_refuse_other_caches_and_run_once(dit_and_graph):
    _, graph = dit_and_graph
    icc = optimize(graph, [IncrementCalibratedCachePass(rank=4)]).program
    for block_pass, other in ((BlockCachePass(), FirstBlockCachePass()), (FirstBlockCachePass(), BlockCachePass())):
        with pytest.raises(PassError, match="already has cache variants from IncrementCalibratedCachePass"):
            optimize(icc, [block_pass])
        once = optimize(graph, [block_pass])
        twice = optimize(once.program, [block_pass])
        assert [r.modified for r in once.pass_records + twice.pass_records] == [True, False]
        with pytest.raises(PassError, match=f"{other.name} cannot apply: the program already has cache variants"):
            optimize(once.program, [other])
    with pytest.raises(PassError, match="not found"):
        optimize(graph, [BlockCachePass(blocks=("transformer_blocks.9",))])
    with pytest.raises(ValueError, match=r"BlockCachePass.blocks must be a tuple of names"):
        BlockCachePass(blocks="transformer_blocks.1")
    with pytest.raises(ValueError, match=r"BlockCachePass.period must be an int >= 1, found 2.5"):
        BlockCachePass(period=2.5)


def test_first_block_cache_matches_diffusers_first_block_cache(dit_and_graph):
    model, graph = dit_and_graph
    threshold, trajectory = 0.1, _slow_trajectory(8, seed=3, drift=0.01)
    optimized = optimize(graph, [FirstBlockCachePass(threshold)])
    assert optimized.program.schedule == AdaptiveSchedule(PROBE, threshold, FULL, CACHED)
    outputs, variants = _run(optimized, trajectory)
    assert FULL in variants[1:] and CACHED in variants  # both decisions happen on this trajectory
    first_block = {s for n in optimized.program.variants[PROBE].graph.nodes for s in module_scopes(n)}
    assert "transformer_blocks.0" in first_block and "transformer_blocks.1" not in first_block
    hooked = DiffusersCacheHook(model, "first-block-cache", threshold=threshold)
    for _ in range(2):  # the second run checks that a new run starts from a fresh hook state
        assert _close(outputs, [hooked(x, t, LABELS) for x, t in trajectory])
