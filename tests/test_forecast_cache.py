import pytest
import torch
from models import diffusers_dit, inputs_for, max_relative, run_along, simple_dit

from diffopt import PassError, capture, optimize
from diffopt.ir.graph_tools import module_scopes
from diffopt.ir.schedules import Schedule, schedule_from_dict
from diffopt.ir.specs import FORECAST, FULL
from diffopt.passes.forecast_cache import ForecastCachePass

aten = torch.ops.aten
LABELS = torch.tensor([1, 5, 9])


@pytest.fixture(scope="module")
def dit_and_graph():
    model = diffusers_dit(seed=4, num_layers=4)
    return model, capture(model, inputs_for("diffusers_dit", 2, seed=0))


def _trajectory(steps, seed=1):
    """Inputs that move along a curve from step to step, on an uneven timestep grid."""
    g = torch.Generator().manual_seed(seed)
    x, a, b = (torch.randn(3, 1, 8, 8, generator=g) for _ in range(3))
    times = [900 - 12 * k - k * k for k in range(steps)]
    return [(x + 0.03 * k * a + 0.002 * k * k * b, torch.full((3,), t)) for k, t in enumerate(times)]


def _interpolate(points, t):
    """Lagrange's form of the polynomial through ``points`` [(time, value)], evaluated at ``t``."""
    total = torch.zeros_like(points[0][1])
    for i, (ti, yi) in enumerate(points):
        weight = 1.0
        for j, (tj, _) in enumerate(points):
            if j != i:
                weight *= (t - tj) / (ti - tj)
        total = total + weight * yi
    return total


def _hooked_forecast(model, trajectory, schedule, order, modules=None, span=None):
    """Independent eager reference: forward hooks that keep each target's last ``order + 1``
    full-step values and, on forecast steps, return the interpolating polynomial instead."""
    history, step, hidden = {}, {"k": 0, "t": 0.0}, {}

    def forecast(key, value):
        if schedule.variant_at(step["k"]) == FULL:
            history[key] = [(step["t"], value), *history.get(key, [])][: order + 1]
            return value
        return _interpolate(history[key], step["t"])

    handles = []
    if modules is not None:
        for name in modules:
            module = model.get_submodule(name)
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: forecast(name, out)))
    else:
        first, last = (model.transformer_blocks[i] for i in span)
        handles.append(
            first.register_forward_pre_hook(
                lambda m, a, kw: hidden.update(x=a[0] if a else kw["hidden_states"]), with_kwargs=True
            )
        )
        handles.append(last.register_forward_hook(lambda m, a, out: hidden["x"] + forecast("span", out - hidden["x"])))
    outputs = []
    try:
        with torch.no_grad():
            for x, t in trajectory:
                step["t"] = float(t[0])
                outputs.append(model(x, t, LABELS, return_dict=False)[0])
                step["k"] += 1
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _run(optimized, trajectory):
    return run_along(optimized, [(x, t, LABELS) for x, t in trajectory])


MODULES = [f"transformer_blocks.{i}.{part}" for i in range(4) for part in ("attn1", "ff")]


@pytest.mark.parametrize("order", [0, 1, 2])
def test_module_forecast_matches_an_eager_lagrange_reference_at_every_step(dit_and_graph, order):
    model, graph = dit_and_graph
    trajectory = _trajectory(12)
    optimized = optimize(graph, [ForecastCachePass(order=order, period=3, warmup=2)])
    schedule = optimized.program.schedule
    outputs, variants = _run(optimized, trajectory)
    assert variants == [schedule.variant_at(k) for k in range(12)]
    assert variants.count(FULL) == 5 and variants[:2] == [FULL, FULL]  # steps 0, 1, 4, 7, 10
    assert max_relative(outputs, _hooked_forecast(model, trajectory, schedule, order, modules=MODULES)) < 1e-5
    with torch.no_grad():
        plain = [model(x, t, LABELS, return_dict=False)[0] for x, t in trajectory]
    assert max_relative(outputs, plain) > 1e-3  # the forecast steps really differ from recomputation


def test_block_span_forecast_matches_an_eager_reference(dit_and_graph):
    model, graph = dit_and_graph
    trajectory = _trajectory(10, seed=3)
    blocks = ("transformer_blocks.1", "transformer_blocks.2")
    optimized = optimize(graph, [ForecastCachePass(order=1, period=2, targets="blocks", blocks=blocks)])
    outputs, _ = _run(optimized, trajectory)
    expected = _hooked_forecast(model, trajectory, optimized.program.schedule, 1, span=(1, 2))
    assert max_relative(outputs, expected) < 1e-5
    # one forecast value for the two consecutive blocks, and their work is gone from the forecast graph
    assert [e.name for e in optimized.program.state.entries][2:] == [
        "transformer_blocks.1..transformer_blocks.2.forecast_value",
        "transformer_blocks.1..transformer_blocks.2.forecast_difference1",
    ]
    scopes = {s for n in optimized.program.variants[FORECAST].graph.nodes for s in module_scopes(n)}
    assert "transformer_blocks.0" in scopes and not {"transformer_blocks.1", "transformer_blocks.2"} & scopes


def test_order_two_is_exact_where_the_features_are_quadratic_in_time():
    """A model whose block adds a quadratic function of the timestep: the order-2 forecast
    reproduces it exactly on forecast steps, order 1 does not."""

    class Curve(torch.nn.Module):
        def forward(self, t):
            s = t.float().view(-1, 1, 1, 1) / 100
            return 0.5 * s * s - s + 2.0

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.curve = Curve()

        def forward(self, x, t):
            return x + self.curve(t)

    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])

        def forward(self, x, t):
            for block in self.blocks:
                x = block(x, t)
            return x

    model = Quadratic()
    graph = capture(model, (torch.randn(2, 1, 4, 4), torch.tensor([900, 900])))
    x = torch.randn(3, 1, 4, 4)
    times = [900, 870, 800, 760, 700, 610, 580]
    expected = [model(x, torch.full((3,), t)) for t in times]
    for order, exact in ((2, True), (1, False)):
        optimized = optimize(graph, [ForecastCachePass(order=order, period=3, warmup=3, targets="blocks")])
        optimized.reset()
        outputs = [optimized(x, torch.full((3,), t)) for t in times]
        assert optimized.last_variant == FORECAST
        assert (max_relative(outputs, expected) < 1e-5) is exact, order


def test_warmup_schedule_counts_its_period_from_the_last_warmup_step():
    schedule = Schedule(FULL, FORECAST, 4, warmup=3)
    assert [schedule.variant_at(k) == FULL for k in range(12)] == [
        True, True, True, False, False, False, True, False, False, False, True, False
    ]  # fmt: skip
    assert schedule_from_dict(schedule.to_dict()) == schedule
    assert "warmup" not in Schedule(FULL, FORECAST, 2).to_dict()  # manifests written before stay the same
    with pytest.raises(ValueError, match="warmup"):
        Schedule(FULL, FORECAST, 2, warmup=0)


def test_simple_dit_modules_by_name_and_clear_errors():
    graph = capture(simple_dit(seed=1), (torch.randn(2, 1, 16, 16), torch.tensor([999, 5]), torch.tensor([0, 1])))
    optimized = optimize(graph, [ForecastCachePass(modules=(r"blocks\.\d+\.(proj|fc2)",))])
    assert [e.name for e in optimized.program.state.entries if e.name.endswith("value")] == [
        "blocks.0.proj.forecast_value",
        "blocks.0.fc2.forecast_value",
        "blocks.1.proj.forecast_value",
        "blocks.1.fc2.forecast_value",
    ]
    with pytest.raises(PassError, match=r"no module to forecast .*blocks\.0\.qkv"):
        optimize(graph, [ForecastCachePass()])  # SimpleDiT's attention is not a submodule
    with pytest.raises(PassError, match=r"blocks \['blocks.7'\] not found; the chain's blocks are"):
        optimize(graph, [ForecastCachePass(targets="blocks", blocks=("blocks.7",))])
    with pytest.raises(ValueError, match="targets must be one of"):
        ForecastCachePass(targets="layers")
    with pytest.raises(ValueError, match="needs targets='modules'"):
        ForecastCachePass(targets="blocks", modules=("x",))
    with pytest.raises(ValueError, match="not a regular expression"):
        ForecastCachePass(modules=("blocks.(",))


def test_order_one_on_taylorseers_plan_equals_diffusers_taylorseer_hook(dit_and_graph):
    """On a uniform grid, order 1 is TaylorSeer: with the hook's own plan (full at step 0,
    then at 2, 5, 8, ...: interval 3 after 1 warm-up step) the outputs agree at every step."""
    from diffopt.evaluation.baselines import DiffusersCacheHook
    from diffopt.ir.schedules import ListSchedule

    model, graph = dit_and_graph
    g = torch.Generator().manual_seed(7)
    x, direction = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    steps = [(x + 0.03 * k * direction, torch.full((3,), 900 - 20 * k), LABELS) for k in range(11)]
    plan = tuple(FULL if k < 1 or (k - 2) % 3 == 0 else FORECAST for k in range(11))
    optimized = optimize(graph, [ForecastCachePass(order=1)]).with_schedule(ListSchedule(plan))
    hook = DiffusersCacheHook(
        model,
        "taylorseer",
        cache_interval=3,
        disable_cache_before_step=1,
        max_order=1,
        taylor_factors_dtype=torch.float32,
        cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|ff)"],
    )
    outputs, variants = run_along(optimized, steps)
    assert variants == list(plan) and variants.count(FORECAST) == 7
    assert max_relative(outputs, [hook(*step) for step in steps]) < 1e-5
