"""Autospeculative DDPM: exact with L=1, exact in law for longer windows, fewer rounds."""

import pytest
import torch
from toy_passes import StepCounterPass

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.evaluation.metrics.two_sample import energy_test
from diffopt.models.gaussian_mixture import two_moons_mixture
from diffopt.sampling.noise import make_alphas_cumprod
from diffopt.sampling.speculative import SpeculativeDDPMSampler

CONFIG = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}
ALPHAS = make_alphas_cumprod("squaredcos_cap_v2")


def _sequential(model, steps, n, seed, prediction="epsilon"):
    scheduler = make_scheduler({**CONFIG, "prediction_type": prediction}, "ddpm", steps)
    return Sampler(scheduler, progress=False).sample(model, shape=(n, 2), seed=seed)


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
@pytest.mark.parametrize("steps", [1, 10, 100])
def test_window_one_reproduces_sequential_ddpm_draw_for_draw(prediction, steps):
    model = two_moons_mixture(prediction=prediction)
    sampler = SpeculativeDDPMSampler(ALPHAS, steps, window=1, prediction_type=prediction, progress=False)
    got = sampler.sample(model, shape=(64, 2), seed=3)
    torch.testing.assert_close(got, _sequential(model, steps, 64, seed=3, prediction=prediction), rtol=1e-4, atol=1e-4)
    assert sampler.last_stats.rounds == steps
    assert sampler.last_stats.acceptance_rate == 1.0


@pytest.mark.parametrize("window", [4, None])
def test_exact_in_law_on_the_mixture(window):
    model = two_moons_mixture()
    steps, n = 100, 500
    p_values = []
    for seed in range(4):
        speculative = SpeculativeDDPMSampler(ALPHAS, steps, window=window, progress=False).sample(
            model, shape=(n, 2), seed=seed
        )
        sequential = _sequential(model, steps, n, seed=100 + seed)
        p_values.append(energy_test(speculative, sequential, permutations=200, seed=seed)[1])
    # under the null the p-values are uniform: P(min < 0.001) ~ 0.4%, P(mean of 4 < 0.15) ~ 0.5%;
    # a biased sampler puts all of them near 1/201 (see the shifted-law check below)
    assert min(p_values) > 0.001, p_values
    assert sum(p_values) / len(p_values) > 0.15, p_values


def test_the_energy_test_detects_a_wrong_law():
    model = two_moons_mixture()
    sequential = _sequential(model, 100, 600, seed=0)
    shifted = sequential + torch.tensor([0.3, 0.0])
    assert energy_test(shifted, _sequential(model, 100, 600, seed=1), permutations=200)[1] < 0.01


def test_acceptance_rate_matches_the_gaussian_overlap_formula():
    model = two_moons_mixture()
    sampler = SpeculativeDDPMSampler(ALPHAS, 200, window=8, progress=False)
    sampler.sample(model, shape=(400, 2), seed=0)
    stats = sampler.last_stats
    tested = int(stats.proposed.sum())
    predicted = float(stats.predicted_acceptance.sum())
    rejected_observed, rejected_predicted = tested - int(stats.accepted.sum()), tested - predicted
    # rejections are a sum of independent Bernoullis: compare within 4 standard deviations
    assert abs(rejected_observed - rejected_predicted) < 4 * rejected_predicted**0.5 + 1
    assert rejected_predicted > 50  # enough rejections for the check to mean something


def test_thousand_steps_need_far_fewer_rounds():
    model = two_moons_mixture()
    sampler = SpeculativeDDPMSampler(ALPHAS, 1000, window=None, progress=False)
    sampler.sample(model, shape=(100, 2), seed=0)
    assert sampler.last_stats.rounds * 5 <= 1000, sampler.last_stats.rounds


def test_samples_in_a_batch_are_independent_of_each_other():
    """A sample's result depends on its own noise only through its own history: changing
    another sample's class changes nothing for it when both use window 1 (lock step)."""
    model = two_moons_mixture()
    sampler = SpeculativeDDPMSampler(ALPHAS, 50, window=1, progress=False)
    a = sampler.sample(model, (torch.tensor([0, 1, 4]),), shape=(3, 2), seed=5)
    b = sampler.sample(model, (torch.tensor([0, 2, 4]),), shape=(3, 2), seed=5)
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]])
    assert not torch.allclose(a[1], b[1])


def test_clipped_drift_matches_sequential_ddpm_with_clip_sample():
    model = two_moons_mixture()
    clip = 1.5  # the mixture's components reach beyond it, so clipping changes the result
    speculative = SpeculativeDDPMSampler(ALPHAS, 30, window=1, clip_sample=clip, progress=False)
    sequential = Sampler(make_scheduler({**CONFIG, "clip_sample": clip}, "ddpm", 30), progress=False)
    got = speculative.sample(model, shape=(32, 2), seed=2)
    torch.testing.assert_close(got, sequential.sample(model, shape=(32, 2), seed=2), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, _sequential(model, 30, 32, seed=2), atol=1e-2)


def test_guidance_is_folded_into_the_drift():
    model = two_moons_mixture()
    labels = torch.tensor([0, 1, 2, 3])
    guided = dict(guidance_scale=2.0, null_conditions=(torch.tensor(4),))
    speculative = SpeculativeDDPMSampler(ALPHAS, 20, window=1, progress=False, **guided)
    sequential = Sampler(make_scheduler(CONFIG, "ddpm", 20), progress=False, **guided)
    torch.testing.assert_close(
        speculative.sample(model, (labels,), shape=(4, 2), seed=1),
        sequential.sample(model, (labels,), shape=(4, 2), seed=1),
        rtol=1e-4,
        atol=1e-4,
    )


def test_runs_on_captured_programs_but_refuses_stateful_ones():
    model = two_moons_mixture()
    captured = capture(model, (torch.randn(2, 2), torch.tensor([999, 1])))
    sampler = SpeculativeDDPMSampler(ALPHAS, 30, window=4, progress=False)
    torch.testing.assert_close(
        sampler.sample(optimize(captured), shape=(16, 2), seed=2), sampler.sample(model, shape=(16, 2), seed=2)
    )
    with pytest.raises(ValueError, match="stateless"):
        sampler.sample(optimize(captured, [StepCounterPass()]), shape=(4, 2), seed=0)
    with pytest.raises(ValueError, match="window"):
        SpeculativeDDPMSampler(ALPHAS, 30, window=0)
