"""Block caches on joint (dual-stream) blocks: SD3's blocks pass the text and the image
stream on; its last block ends the text stream. Checked against eager hook references
(diffusers' own FirstBlockCache hook fails on this model: it subtracts the last block's
missing text output)."""

import pytest
import torch
from models import diffusers_sd3, inputs_for, max_relative, run_along

from diffopt import PassError, capture, optimize
from diffopt.ir.specs import CACHED, FORECAST, FULL
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass


@pytest.fixture(scope="module")
def sd3_and_graph():
    model = diffusers_sd3(seed=1)
    return model, capture(model, inputs_for("diffusers_sd3", 2, seed=0))


def _trajectory(steps, seed=3):
    inputs = inputs_for("diffusers_sd3", 3, seed)
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(inputs["hidden_states"].shape, generator=g)
    conditions = (inputs["encoder_hidden_states"], inputs["pooled_projections"])
    return [
        (inputs["hidden_states"] + 0.02 * k * direction, torch.full((3,), 900 - 15 * k), *conditions)
        for k in range(steps)
    ]


def _eager(model, trajectory, hooks):
    handles = [block.register_forward_hook(hook, with_kwargs=True) for block, hook in hooks]
    outputs = []
    try:
        with torch.no_grad():
            for x, t, text, pooled in trajectory:
                outputs.append(
                    model(
                        hidden_states=x,
                        timestep=t,
                        encoder_hidden_states=text,
                        pooled_projections=pooled,
                        return_dict=False,
                    )[0]
                )
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def test_block_cache_caches_every_joint_block_like_an_eager_reference(sd3_and_graph):
    model, graph = sd3_and_graph
    trajectory = _trajectory(5)
    optimized = optimize(graph, [BlockCachePass(period=2)])
    assert optimized.program.state.names == (
        "transformer_blocks.0.stream0.cached_residual",
        "transformer_blocks.0.stream1.cached_residual",
        "transformer_blocks.1.stream0.cached_residual",
        "transformer_blocks.1.stream1.cached_residual",
        "transformer_blocks.2.cached_residual",
    )
    step, residuals = {"k": -1}, {}

    def replay(index):
        def hook(module, args, kwargs, output):
            if index == 0:
                step["k"] += 1
            inputs = (kwargs["encoder_hidden_states"], kwargs["hidden_states"])
            if step["k"] % 2 == 0:
                residuals[index] = [None if o is None else o - i for o, i in zip(output, inputs)]
                return output
            return tuple(None if r is None else i + r for i, r in zip(inputs, residuals[index]))

        return hook

    expected = _eager(model, trajectory, [(block, replay(i)) for i, block in enumerate(model.transformer_blocks)])
    outputs, variants = run_along(optimized, trajectory)
    assert variants == [FULL, CACHED, FULL, CACHED, FULL]
    assert max_relative(outputs, expected) < 1e-5


def test_first_block_cache_on_joint_blocks_matches_an_eager_reference(sd3_and_graph):
    model, graph = sd3_and_graph
    threshold = 0.3
    optimized = optimize(graph, [FirstBlockCachePass(threshold)])
    state = {"reference": None, "later": None, "full": True, "head": None}
    decisions = []

    def first(module, args, kwargs, output):
        residual = output[1] - kwargs["hidden_states"]  # the image stream decides, as diffusers' hook does
        reference = state["reference"]
        change = None if reference is None else float((residual - reference).abs().mean() / reference.abs().mean())
        state["full"] = change is None or change > threshold
        decisions.append(FULL if state["full"] else CACHED)
        if state["full"]:
            state["reference"] = residual
        state["head"] = output[1]
        return output

    def last(module, args, kwargs, output):
        if state["full"]:
            state["later"] = output[1] - state["head"]
            return output
        return output[0], state["head"] + state["later"]

    blocks = model.transformer_blocks
    trajectory = _trajectory(8)
    expected = _eager(model, trajectory, [(blocks[0], first), (blocks[-1], last)])
    outputs, variants = run_along(optimized, trajectory)
    assert variants == decisions and CACHED in variants and variants.count(FULL) > 1
    assert max_relative(outputs, expected) < 1e-5


def test_block_discovery_names_what_it_skips_and_a_selection_of_nothing_is_an_error(sd3_and_graph, monkeypatch):
    _, graph = sd3_and_graph
    with pytest.raises(PassError, match=r"blocks \['transformer_blocks.7'\] not found"):
        optimize(graph, [BlockCachePass(blocks=("transformer_blocks.7",))])
    import diffopt.passes.caching.targets as targets

    real = targets.block_streams
    monkeypatch.setattr(  # as if block 1 passed nothing on that could be cached
        targets, "block_streams", lambda g, block: [] if block == "transformer_blocks.1" else real(g, block)
    )
    with pytest.warns(
        UserWarning, match=r"BlockCachePass skips blocks \{'transformer_blocks.1': 'passes no tensor on'\}"
    ):
        program = optimize(graph, [BlockCachePass()]).program
    assert not any(name.startswith("transformer_blocks.1.") for name in program.state.names)


def _forecast_hook(history, step, schedule, name):
    """An eager reference for order-1 forecasting of a module's outputs (each stream its own line)."""

    def hook(module, args, kwargs, output):
        values = output if isinstance(output, tuple) else (output,)
        if schedule.variant_at(step["k"]) == FULL:
            history[name] = [(step["t"], values), *history.get(name, [])][:2]
            return output
        (t0, y0), (t1, y1) = history[name]  # the warm-up gives two full steps before a forecast
        line = tuple(None if a is None else a + (step["t"] - t0) / (t0 - t1) * (a - b) for a, b in zip(y0, y1))
        return line if isinstance(output, tuple) else line[0]

    return hook


def test_forecast_of_joint_attention_forecasts_both_streams_like_an_eager_reference(sd3_and_graph):
    model, graph = sd3_and_graph
    optimized = optimize(graph, [ForecastCachePass(order=1, period=3, warmup=2)])
    attention = [f"transformer_blocks.{i}.attn" for i in range(2)]  # the last block's ends the text stream
    assert {f"{a}.stream{k}.forecast_value" for a in attention for k in (0, 1)} <= set(optimized.program.state.names)
    modules = [
        (name, module)
        for name, module in model.named_modules()
        if name.count(".") == 2 and type(module).__name__ in ("Attention", "FeedForward")
    ]
    history, step, schedule = {}, {"k": -1, "t": 0.0}, optimized.program.schedule

    def clock(module, args, kwargs):
        step["k"] += 1
        step["t"] = float(kwargs["timestep"][0])

    trajectory = _trajectory(8)
    hooks = [(module, _forecast_hook(history, step, schedule, name)) for name, module in modules]
    model_clock = model.register_forward_pre_hook(clock, with_kwargs=True)
    try:
        expected = _eager(model, trajectory, hooks)
    finally:
        model_clock.remove()
    outputs, variants = run_along(optimized, trajectory)
    assert variants == [schedule.variant_at(k) for k in range(8)] and FORECAST in variants
    assert max_relative(outputs, expected) < 1e-5
