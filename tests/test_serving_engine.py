"""Step-level continuous batching (``diffopt.serving.engine``): a request's result equals the
same request sampled alone, whatever shared its forwards; bounds and malformed requests."""

import threading

import pytest
import torch
from models import simple_dit

from diffopt import capture, optimize
from diffopt.passes.block_cache import BlockCachePass, FirstBlockCachePass
from diffopt.passes.forecast_cache import ForecastCachePass
from diffopt.sampling.schedulers import make_scheduler
from diffopt.sampling.sequential import Sampler
from diffopt.serving.engine import Overloaded, RequestError, StepEngine

CONFIG = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2", "clip_sample": 1.0}  # samples stay in [-1, 1]
SHAPE = (1, 16, 16)
NULL = torch.tensor(10)  # the null class (SimpleDiT has 10 classes and a null row)


@pytest.fixture(scope="module")
def graph():
    return capture(simple_dit(), (torch.randn(2, *SHAPE), torch.tensor([999, 5]), torch.tensor([0, 1])))


def _alone(program, labels, steps, seed, guidance=1.0):
    sampler = Sampler(
        make_scheduler(CONFIG, num_steps=steps), guidance_scale=guidance, null_conditions=(NULL,), progress=False
    )
    return sampler.sample(program, (labels,), shape=(len(labels), *SHAPE), seed=seed)


REQUESTS = [  # (arrives at tick, labels, steps, seed, guidance)
    (0, torch.tensor([1]), 6, 0, 1.0),
    (0, torch.tensor([2, 3]), 4, 1, 2.0),
    (1, torch.tensor([4]), 5, 2, 1.0),
    (3, torch.tensor([5, 6, 7]), 6, 3, 1.0),
    (4, torch.tensor([8]), 3, 4, 3.0),
]


@pytest.mark.parametrize(
    "passes",
    [[], [BlockCachePass(period=2)], [ForecastCachePass(order=1, period=3, warmup=2, targets="blocks")]],
    ids=["identity", "block cache", "forecast cache"],
)
def test_staggered_requests_equal_their_solo_runs(graph, passes):
    program = optimize(graph, passes)
    engine = StepEngine(program, CONFIG, max_batch=8)
    futures, tick = {}, 0
    while len(futures) < len(REQUESTS) or any(engine.load):
        for index, (arrival, labels, steps, seed, guidance) in enumerate(REQUESTS):
            if arrival == tick:
                futures[index] = engine.submit(
                    (labels,),
                    steps=steps,
                    seed=seed,
                    samples=len(labels),
                    guidance_scale=guidance,
                    null_conditions=(NULL,),
                )
        engine.tick()
        tick += 1
    for index, (_, labels, steps, seed, guidance) in enumerate(REQUESTS):
        result = futures[index].result(timeout=0)
        expected = _alone(program, labels, steps, seed, guidance)
        torch.testing.assert_close(result.sample, expected, rtol=1e-5, atol=1e-5)
        assert len(result.variants) == steps
    sizes = [rows for _, rows in engine.forwards]
    assert max(sizes) > 3 and all(rows <= 8 for rows in sizes)  # requests shared forwards, within max_batch
    if passes:  # in one tick, requests at different steps ran different variants
        by_variant = {variant for variant, _ in engine.forwards}
        assert len(by_variant) == 2


def test_a_background_loop_serves_concurrent_submitters(graph):
    program = optimize(graph, [BlockCachePass(period=2)])
    engine = StepEngine(program, CONFIG, max_batch=4)
    stop = threading.Event()
    loop = threading.Thread(target=engine.serve_forever, args=(stop,))
    loop.start()
    try:
        futures = [engine.submit((torch.tensor([i]),), steps=3 + i % 3, seed=i) for i in range(6)]
        results = [future.result(timeout=60) for future in futures]
    finally:
        stop.set()
        loop.join(timeout=10)
    for i, result in enumerate(results):
        torch.testing.assert_close(
            result.sample, _alone(program, torch.tensor([i]), 3 + i % 3, i), rtol=1e-5, atol=1e-5
        )


def test_bounds_and_malformed_requests_are_refused_by_field(graph):
    program = optimize(graph)
    engine = StepEngine(program, CONFIG, max_batch=2, max_waiting=2)
    labels = (torch.tensor([1]),)
    for request, field in [
        ({"conditions": (torch.tensor([1, 2]),), "steps": 4}, "y: expected shape"),  # 2 labels for 1 sample
        ({"conditions": (torch.tensor([1.5]),), "steps": 4}, "y: expected int64"),  # float labels
        ({"conditions": (torch.tensor([12]),), "steps": 4}, r"y: values must be in \[0, 10\]"),  # past the table
        ({"conditions": labels, "steps": 100_000}, "steps"),
        ({"conditions": labels, "steps": 4, "samples": 3}, "samples"),
        ({"conditions": labels, "steps": 4, "guidance_scale": float("nan")}, "guidance_scale"),
        ({"conditions": (), "steps": 4}, "conditions"),
    ]:
        with pytest.raises(RequestError, match=field):
            engine.submit(**request)
    first = [engine.submit(labels, steps=2, seed=i) for i in range(2)]
    with pytest.raises(Overloaded, match="max_waiting=2"):
        engine.submit(labels, steps=2)
    engine.run_until_idle()
    assert all(future.done() for future in first)
    with pytest.raises(ValueError, match="adaptive"):
        StepEngine(optimize(graph, [FirstBlockCachePass(0.1)]), CONFIG)


def test_a_cancelled_request_neither_kills_the_loop_nor_changes_the_others(graph):
    """A caller that cancels its future (or ``abort``) mid-run: the request leaves, the engine's
    loop lives on, and the other requests equal their solo runs."""
    program = optimize(graph, [BlockCachePass(period=2)])
    engine = StepEngine(program, CONFIG, max_batch=8)
    kept = engine.submit((torch.tensor([1]),), steps=5, seed=0)
    dropped = engine.submit((torch.tensor([2]),), steps=5, seed=1)
    engine.tick()
    assert engine.abort(dropped) and dropped.cancelled()
    engine.run_until_idle()
    torch.testing.assert_close(kept.result(timeout=0).sample, _alone(program, torch.tensor([1]), 5, 0))
    assert engine.load == (0, 0)
    # cancelled while its forward fails: settling a cancelled future must not raise
    stop = threading.Event()
    loop = threading.Thread(target=engine.serve_forever, args=(stop,), daemon=True)
    loop.start()
    try:
        failing = engine.submit((torch.tensor([3]),), steps=3, seed=2)
        failing.cancel()
        later = engine.submit((torch.tensor([4]),), steps=3, seed=3)
        torch.testing.assert_close(later.result(timeout=60).sample, _alone(program, torch.tensor([4]), 3, 3))
        assert loop.is_alive()
    finally:
        stop.set()
        loop.join(timeout=10)


def test_a_failed_forward_settles_even_a_cancelled_future(graph, monkeypatch):
    program = optimize(graph, [])
    engine = StepEngine(program, CONFIG, max_batch=8)
    future = engine.submit((torch.tensor([1]),), steps=2, seed=0)
    engine.tick()  # admitted

    def fail(*args):
        future.cancel()  # the caller gives up while the forward runs
        raise RuntimeError("forward failed")

    monkeypatch.setattr(engine.denoiser.backend, "run", fail)
    engine.tick()  # must not raise InvalidStateError
    assert engine.load == (0, 0)


def test_a_null_condition_out_of_range_is_refused_at_submit(graph):
    engine = StepEngine(optimize(graph, []), CONFIG, max_batch=8)
    with pytest.raises(RequestError, match=r"null_conditions.y: values must be in \[0, 10\]"):
        engine.submit((torch.tensor([1]),), steps=2, guidance_scale=2.0, null_conditions=(torch.tensor(99),))
    with pytest.raises(RequestError, match="null_conditions.y"):
        engine.submit((torch.tensor([1]),), steps=2, guidance_scale=2.0, null_conditions=(torch.tensor(-1),))
    assert engine.load == (0, 0)


def test_a_request_is_copied_at_submit(graph):
    program = optimize(graph, [])
    engine = StepEngine(program, CONFIG, max_batch=8)
    labels, null = torch.tensor([1, 2]), torch.tensor(10)
    future = engine.submit((labels,), steps=3, seed=5, samples=2, guidance_scale=2.0, null_conditions=(null,))
    labels[:] = 7  # the caller reuses its tensors
    null.fill_(3)
    engine.run_until_idle()
    expected = _alone(program, torch.tensor([1, 2]), 3, 5, guidance=2.0)
    torch.testing.assert_close(future.result(timeout=0).sample, expected, rtol=1e-5, atol=1e-5)


def test_programs_that_couple_the_samples_of_a_batch_are_refused_by_name(graph):
    from diffopt.passes.temporal_difference import TemporalDifferencePass

    with pytest.raises(ValueError, match="one scale per batch"):
        StepEngine(optimize(graph, [TemporalDifferencePass("dynamic")]), CONFIG)
    with pytest.raises(ValueError, match="adaptive"):
        StepEngine(optimize(graph, [FirstBlockCachePass(0.1)]), CONFIG)


@pytest.mark.parametrize("value", [-1, 0, "3", 2.0, True])
def test_max_active_must_be_a_positive_int(graph, value):
    with pytest.raises(ValueError, match="max_active must be an int >= 1"):
        StepEngine(optimize(graph, []), CONFIG, max_active=value)
