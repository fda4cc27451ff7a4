import pytest
import torch
from models import simple_dit
from toy_passes import CarryActivationPass, StepCounterPass

from diffopt import Schedule, StateEntry, StateError, StateSpec, capture, optimize
from diffopt.ir.schedules import AdaptiveSchedule
from diffopt.ir.specs import BATCH


def _captured_model():
    model = simple_dit()
    example = (torch.randn(2, 1, 16, 16), torch.tensor([999, 500]), torch.tensor([1, 2]))
    return model, capture(model, example)


def _reference_run(model, xs, ts, y):
    """Independent reference for CarryActivationPass: hooks the first Linear of the eager model."""
    stored = {}
    hook = model.time_mlp[0].register_forward_hook(lambda m, i, o: stored.__setitem__("a", o))
    outputs, previous = [], None
    with torch.no_grad():
        for x, t in zip(xs, ts):
            out = model(x, t, y)
            if previous is not None:
                out = out + previous.mean(dim=1).view(-1, 1, 1, 1)
            previous = stored["a"]
            outputs.append(out)
    hook.remove()
    return outputs


def _trajectory(batch, steps, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 1, 16, 16, generator=g) for _ in range(steps)]
    ts = [torch.full((batch,), 900 - 100 * k) for k in range(steps)]
    return xs, ts, torch.randint(0, 10, (batch,), generator=g)


def test_schedule_picks_variants():
    assert [Schedule().variant_at(k) for k in range(3)] == ["full"] * 3
    assert [Schedule("full", "delta").variant_at(k) for k in range(3)] == ["full", "delta", "delta"]
    periodic = Schedule("full", "cached", period=3)
    assert [periodic.variant_at(k) for k in range(7)] == [
        "full",
        "cached",
        "cached",
        "full",
        "cached",
        "cached",
        "full",
    ]
    with pytest.raises(ValueError):
        Schedule(period=0)


def test_adaptive_schedule_refreshes_on_large_or_undefined_signals():
    adaptive = AdaptiveSchedule("probe", threshold=0.1, refresh="full", between="cached")
    assert adaptive.variants == ("probe", "full", "cached")
    assert [
        adaptive.variant_at(k, s) for k, s in enumerate([0.0, 0.05, 0.1, 0.2, float("inf"), float("nan"), 0.0])
    ] == ["full", "cached", "cached", "full", "full", "full", "cached"]
    with pytest.raises(ValueError):
        AdaptiveSchedule("probe", threshold=-1.0)


def test_state_spec_rejects_mismatched_state():
    spec = StateSpec((StateEntry("a", (BATCH, 4), torch.float32, "test"),))
    spec.check(spec.allocate(3), 3)
    with pytest.raises(StateError, match="batch size 2"):
        spec.check(spec.allocate(3), 2)
    with pytest.raises(StateError, match="expected 1 state tensors"):
        spec.check((), 3)
    with pytest.raises(StateError, match="already exists"):
        spec.with_entry(StateEntry("a", (BATCH,), torch.float32, "other"))


def test_stateful_pass_values_across_steps_eager_and_functional():
    model, captured = _captured_model()
    optimized = optimize(captured, [CarryActivationPass()])
    assert optimized.program.schedule == Schedule("first", "carry")
    assert optimized.program.state.names == ("carried_activation",)
    xs, ts, y = _trajectory(batch=3, steps=4, seed=1)
    expected = _reference_run(model, xs, ts, y)
    eager = [optimized(x, t, y) for x, t in zip(xs, ts)]
    state = optimized.init_state(3)
    functional = []
    for k, (x, t) in enumerate(zip(xs, ts)):
        out, state = optimized.step(k, x, t, y, state=state)
        functional.append(out)
    for e, a, b in zip(expected, eager, functional):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, e, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected[1], model(xs[1], ts[1], y))  # the carried state really matters


def test_state_resets_between_runs_and_on_batch_change():
    model, captured = _captured_model()
    optimized = optimize(captured, [CarryActivationPass()])
    xs, ts, y = _trajectory(batch=2, steps=3, seed=2)
    first_run = [optimized(x, t, y) for x, t in zip(xs, ts)]
    second_run = [optimized(x, t, y) for x, t in zip(xs, ts)]  # timestep goes back up: a new run
    for a, b in zip(first_run, second_run):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # switch to batch 5 mid-run: stale batch-2 state must not be reused
    xs5, ts5, y5 = _trajectory(batch=5, steps=3, seed=3)
    optimized(xs[0], ts[0], y)
    got = [optimized(x, t, y5) for x, t in zip(xs5, ts5)]
    for a, e in zip(got, _reference_run(model, xs5, ts5, y5)):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    # explicit reset restarts at step 0 even with a decreasing timestep
    optimized(xs[0], ts[0], y)
    optimized.reset()
    torch.testing.assert_close(optimized(xs[1], ts[1], y), model(xs[1], ts[1], y), rtol=1e-5, atol=1e-6)


def test_functional_step_refuses_stale_state():
    _, captured = _captured_model()
    optimized = optimize(captured, [CarryActivationPass()])
    stale = optimized.init_state(2)
    with pytest.raises(StateError, match="batch size 4"):
        optimized.step(1, torch.randn(4, 1, 16, 16), 500, torch.zeros(4, dtype=torch.long), state=stale)


def test_two_stateful_passes_compose():
    _, captured = _captured_model()
    optimized = optimize(captured, [CarryActivationPass(), StepCounterPass()])
    assert optimized.program.state.names == ("carried_activation", "step_counter")
    xs, ts, y = _trajectory(batch=2, steps=4, seed=4)
    state = optimized.init_state(2)
    for k, (x, t) in enumerate(zip(xs, ts)):
        _, state = optimized.step(k, x, t, y, state=state)
        assert torch.equal(state[1], torch.full((2,), float(k + 1)))
