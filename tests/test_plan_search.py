"""Plan search: a cache's full steps moved to where they help, their count (the MACs) kept."""

import pytest
from models import dit_pipeline

import diffopt
from diffopt.evaluation.workload import DigitsWorkload
from diffopt.measure.plan_search import MOVES, plan_mask, refine_mask
from diffopt.measure.tuning import tune
from diffopt.measure.workload import Configuration
from diffopt.passes.caching.policies import StepMask, TaylorSeerPlan
from diffopt.passes.caching.predictors import Learned
from diffopt.passes.registry import pass_from_dict


def test_a_plan_lowers_to_its_mask():
    assert plan_mask(TaylorSeerPlan(period=3, warmup=2), 9) == (1, 1, 0, 1, 0, 0, 1, 0, 0)
    assert plan_mask(StepMask(steps=(1, 0, 1)), 3) == (1, 0, 1)


def test_the_climb_moves_full_steps_to_where_quality_wants_them_and_keeps_their_count():
    wanted = (0, 4, 7, 11)

    def quality(mask):  # the closer the i-th full step is to the i-th wanted one, the better
        return -sum(abs(step - w) for step, w in zip([s for s, flag in enumerate(mask) if flag], wanted))

    start = (1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0)  # full at 0, 2, 5, 9
    mask, best, measured = refine_mask(start, quality, rounds=10)
    assert sum(mask) == sum(start) and mask[0] == 1
    assert {step for step, flag in enumerate(mask) if flag} == set(wanted) and best == 0
    assert measured > 1
    assert refine_mask(start, lambda mask: 0.0) == (start, 0.0, measured_once(start))


def measured_once(start):
    """A climb that never gains measures the start and each possible move once (one round)."""
    moves = 0
    for step in range(1, len(start)):
        for move in MOVES:
            to = step + move
            moves += bool(start[step] and 0 < to < len(start) and not start[to])
    return 1 + moves


@pytest.mark.parametrize("mask", [(), (0, 1), (1, 2)])
def test_a_mask_the_climb_cannot_start_from_is_refused(mask):
    with pytest.raises(ValueError, match="mask is 0/1 flags starting with 1"):
        refine_mask(mask, lambda mask: 0.0)


def test_tune_under_a_budget_refines_its_choice_plan_then_predictor_keeping_each_only_when_held_out_noise_agrees():
    cache = {
        "pass": "CachePass",
        "target": {"kind": "span", "value": "output"},
        "policy": {"kind": "taylorseer", "warmup": 1, "period": 4},
        "predictor": {"kind": "newton", "order": 1},
    }
    candidates = [Configuration("forecast D1 i4", (cache,), steps=8, family="forecast cache")]
    summary = tune(
        DigitsWorkload("dit-digits", samples=4, validation_samples=4), budget=0.6, candidates=candidates, progress=False
    )
    rows = {row["name"]: row for row in summary["rows"]}
    original = rows["forecast D1 i4"]
    refined = next(row for name, row in rows.items() if name.startswith("forecast D1 i4, plan "))
    policy = pass_from_dict(refined["passes"][0]).policy
    assert isinstance(policy, StepMask) and len(policy.steps) == 8
    assert sum(policy.steps) == sum(plan_mask(TaylorSeerPlan(period=4, warmup=1), 8))
    assert refined["mac_fraction"] == pytest.approx(original["mac_fraction"], rel=1e-6)
    assert refined["plans_tried"] > 1
    better = refined if refined["validation_psnr"] > original["validation_psnr"] else original
    learned = rows[f"{better['name']}, learned h2"]  # the predictor fitted for the better plan
    cache = pass_from_dict(learned["passes"][0])
    assert isinstance(cache.predictor, Learned) and len(cache.predictor.weights) == 8
    assert cache.policy == pass_from_dict(better["passes"][0]).policy
    assert learned["mac_fraction"] == pytest.approx(original["mac_fraction"], rel=1e-6)
    best = learned if learned["validation_psnr"] > better["validation_psnr"] else better
    assert summary["chosen"]["name"] == best["name"]


def test_a_pipeline_tune_under_a_budget_refines_the_plan_on_its_calls():
    pipe = dit_pipeline()
    pipe.set_progress_bar_config(disable=True)
    calls = [{"class_labels": [1, 2], "guidance_scale": 1.0, "num_inference_steps": 6, "seed": 0}]
    cache = {
        "pass": "CachePass",
        "target": {"kind": "span", "value": "output"},
        "policy": {"kind": "periodic", "warmup": 1, "period": 3},
        "predictor": {"kind": "newton", "order": 1},
    }
    candidates = [
        Configuration("forecast p3", (cache,), family="forecast cache"),
        Configuration("3 steps", (), 3, family="steps"),
    ]
    summary = diffopt.tune(pipe, calls, budget=0.8, candidates=candidates, progress=False)
    rows = {row["name"]: row for row in summary["rows"]}
    refined = next(row for name, row in rows.items() if name.startswith("forecast p3, plan "))
    assert sum(pass_from_dict(refined["passes"][0]).policy.steps) == 2  # periodic p3 w1 of 6: full at 0 and 3
    assert refined["mac_fraction"] == pytest.approx(rows["forecast p3"]["mac_fraction"], rel=1e-6)
    assert summary["budget"] == 0.8 and summary["chosen"]["mac_fraction"] <= 0.8
    assert "validation_psnr" in refined and "validation_psnr" in summary["chosen"]
    with pytest.raises(ValueError, match="exactly one of min_psnr"):
        diffopt.tune(pipe, calls, 30.0, budget=0.5)
    with pytest.raises(ValueError, match=r"budget is a fraction .* found 1.5"):  # before any candidate runs
        diffopt.tune(pipe, calls, budget=1.5)
    with pytest.raises(ValueError, match=r"budget is a fraction .* found 0"):
        tune(DigitsWorkload("dit-digits", samples=10), budget=0, candidates=[Configuration("x", (), steps=2)])
    with pytest.raises(ValueError, match="use cost='macs' and no metric"):
        diffopt.tune(pipe, calls, budget=0.5, cost="time")
