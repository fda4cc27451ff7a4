import pytest
import torch

from diffopt import Sampler, make_scheduler
from diffopt.evaluation.metrics.two_sample import energy_test
from diffopt.models.gaussian_mixture import two_moons_mixture


def _monte_carlo_posterior_mean(model, x_t, alpha, sigma, draws=400_000, seed=0):
    """Self-normalised importance sampling: E[x0 | x_t] = E_prior[x0 p(x_t|x0)] / E_prior[p(x_t|x0)]."""
    x0 = model.sample_data(draws, torch.Generator().manual_seed(seed)).double()
    log_w = -((x_t.double()[None] - alpha * x0) ** 2).sum(1) / (2 * sigma**2)
    w = torch.softmax(log_w, 0)
    return (w[:, None] * x0).sum(0)


@pytest.mark.parametrize("timestep", [100, 400, 700])
def test_ddpm_posterior_mean_matches_monte_carlo(timestep):
    model = two_moons_mixture(prediction="sample")
    points = torch.tensor([[0.3, -0.2], [1.5, 1.0], [-1.0, 2.0]])
    alpha, sigma = model.noise_levels(torch.tensor([timestep]))
    exact = model(points, torch.full((3,), timestep))
    for point, value in zip(points, exact):
        estimate = _monte_carlo_posterior_mean(model, point, float(alpha), float(sigma))
        torch.testing.assert_close(value.double(), estimate, atol=0.03, rtol=0)


def test_flow_velocity_is_consistent_with_the_posterior_mean():
    model_v = two_moons_mixture(parametrization="flow", prediction="velocity")
    model_x0 = two_moons_mixture(parametrization="flow", prediction="sample")
    x, t = torch.randn(6, 2), torch.full((6,), 0.6)
    estimate = _monte_carlo_posterior_mean(model_x0, x[0], 0.4, 0.6)
    torch.testing.assert_close(model_x0(x, t * 1000)[0].double(), estimate, atol=0.03, rtol=0)
    x0 = model_x0(x, t * 1000)
    eps = (x - 0.4 * x0) / 0.6
    torch.testing.assert_close(model_v(x, t * 1000), eps - x0, rtol=1e-5, atol=1e-5)


def test_class_label_conditions_on_one_component():
    model = two_moons_mixture(prediction="sample")
    x = torch.tensor([[5.0, 5.0]])  # far from component 0
    near_zero = model(x, torch.tensor([950]), torch.tensor([0]))  # high noise: the component mean
    assert float((near_zero - model.means[0].float()).norm()) < 1.0
    assert torch.equal(model(x, torch.tensor([50]), torch.tensor([4])), model(x, torch.tensor([50])))


def test_thousand_step_ddpm_reproduces_the_mixture():
    model = two_moons_mixture()
    sampler = Sampler(
        make_scheduler({"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}, "ddpm", 1000), progress=False
    )
    generated = sampler.sample(model, shape=(1500, 2), seed=0)
    real = model.sample_data(1500, torch.Generator().manual_seed(1))
    _, p_value = energy_test(generated, real, permutations=200)
    assert p_value > 0.05
    # the test has power: a visibly wrong sampler (10 DDPM steps of a rough schedule) fails it
    crude = Sampler(
        make_scheduler({"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2"}, "ddim", 2), progress=False
    ).sample(model, shape=(1500, 2), seed=0)
    assert energy_test(crude, real, permutations=200)[1] < 0.01
