"""Flow maps: the AYF-EMD objective converges to the true flow map of Gaussian data, the
sampler's jumps, and the flow-map model (starts as its teacher, captures, exports)."""

import pytest
import torch
from models import MODEL_FACTORIES, assert_same_weights, diffusers_dit, inputs_for, trained_twice
from torch import nn

from diffopt import capture, optimize
from diffopt.evaluation.distillation import ayf_emd_loss, draw_times, r_at
from diffopt.export.onnx import to_onnx
from diffopt.models.flow_map import FlowMapTransformer
from diffopt.models.gaussian_mixture import GaussianMixtureDenoiser
from diffopt.runtime.runtimes import load_bundle
from diffopt.sampling.flow_map import FlowMapSampler

MEAN = torch.tensor([[1.0, -0.5, 0.3, 2.0]])
STD = 0.5


def _velocity_teacher() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(
        MEAN, torch.tensor([STD]), torch.tensor([1.0]), parametrization="flow", prediction="velocity"
    )


def _true_flow_map(x, t, s):
    """Data N(MEAN, STD^2 I): marginals N((1-t) MEAN, sigma_t^2 I) with sigma_t^2 = (1-t)^2 STD^2 + t^2,
    and the ODE maps x_t affinely onto x_s."""

    def sigma(time):
        return ((1 - time) ** 2 * STD**2 + time**2).sqrt()[:, None]

    return (1 - s[:, None]) * MEAN + sigma(s) / sigma(t) * (x - (1 - t[:, None]) * MEAN)


def _integrate(teacher, x, t, s, steps=200):
    """The exact ODE dx/dt = v(x, t) from t to s with RK4 (float64)."""
    x, h = x.double(), (s - t).double()[:, None] / steps
    time = t.double()

    def v(x, time):
        return teacher(x, time * 1000.0).double()

    for _ in range(steps):
        k1 = v(x, time)
        k2 = v(x + h / 2 * k1, time + h[:, 0] / 2)
        k3 = v(x + h / 2 * k2, time + h[:, 0] / 2)
        k4 = v(x + h * k3, time + h[:, 0])
        x, time = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), time + h[:, 0]
    return x.float()


class _Student(nn.Module):
    """F(x, t, s) = v(x, t) + MLP(x, t, s), the MLP's output layer at zero: F starts as the teacher."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher
        self.mlp = nn.Sequential(nn.Linear(6, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, 4))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x, t, s):
        return self.teacher(x, t * 1000.0) + self.mlp(torch.cat([x, t[:, None], s[:, None]], dim=1))


def _pairs(n, generator):
    """(t, s) with 0 <= s <= t, t >= 0.05 (the closed-form teacher divides by t)."""
    t, s = draw_times(n, generator)
    return 0.05 + 0.95 * t, 0.95 * s


def test_the_closed_form_map_is_what_the_exact_ode_integrates_to():
    teacher = _velocity_teacher()
    g = torch.Generator().manual_seed(0)
    t, s = _pairs(64, g)
    x = (1 - t[:, None]) * MEAN + ((1 - t) ** 2 * STD**2 + t**2).sqrt()[:, None] * torch.randn(64, 4, generator=g)
    torch.testing.assert_close(_integrate(teacher, x, t, s), _true_flow_map(x, t, s), atol=1e-4, rtol=1e-4)


def test_ayf_emd_distillation_converges_to_the_true_flow_map_and_beats_one_euler_step():
    torch.manual_seed(0)
    teacher = _velocity_teacher()
    student = _Student(teacher)
    optimizer = torch.optim.Adam(student.mlp.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    t_eval, s_eval = _pairs(2048, g)
    x_data = MEAN + STD * torch.randn(2048, 4, generator=g)
    x_eval = (1 - t_eval[:, None]) * x_data + t_eval[:, None] * torch.randn(2048, 4, generator=g)
    truth = _true_flow_map(x_eval, t_eval, s_eval)

    def error(flow):
        return float((flow - truth).square().sum(1).mean())

    def distilled_error():
        with torch.no_grad():
            F = student(x_eval, t_eval, s_eval)
        return error(x_eval + (s_eval - t_eval)[:, None] * F)

    with torch.no_grad():
        euler = error(x_eval + (s_eval - t_eval)[:, None] * teacher(x_eval, t_eval * 1000.0))
    errors = [distilled_error()]
    steps, warmup = 400, 100
    for step in range(steps):
        t, s = _pairs(256, g)
        x0 = MEAN + STD * torch.randn(256, 4, generator=g)
        x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(256, 4, generator=g)
        with torch.no_grad():
            v = teacher(x_t, t * 1000.0)
        loss = ayf_emd_loss(student, x_t, t, s, v, r_at(step, warmup))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % 200 == 0:
            errors.append(distilled_error())
    print(f"one Euler step: {euler:.5f}; distilled map during training: {[round(e, 5) for e in errors]}")
    assert abs(errors[0] - euler) < 1e-6 * max(euler, 1)  # F starts as the teacher: one Euler step
    assert errors[-1] < errors[1] < errors[0]
    assert errors[-1] < 0.1 * euler


def test_the_sampler_with_the_true_map_lands_on_the_same_sample_in_any_number_of_steps():
    def true_F(x, timestep, target_timestep):  # F = (f - x) / (s - t), on the 1000x timestep scale
        t, s = timestep / 1000.0, target_timestep / 1000.0
        return (_true_flow_map(x, t, s) - x) / (s - t)[:, None]

    noise = torch.randn(256, 4, generator=torch.Generator().manual_seed(3))
    expected = _true_flow_map(noise, torch.ones(256), torch.zeros(256))
    for steps in (1, 2, 4):
        out = FlowMapSampler(steps, progress=False).sample(true_F, noise=noise)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    uneven = FlowMapSampler(times=[1.0, 0.7, 0.2, 0.0], progress=False)
    torch.testing.assert_close(uneven.sample(true_F, noise=noise), expected, atol=1e-5, rtol=1e-5)
    assert uneven.last_stats.model_calls == 3
    for bad in ([1.0], [1.0, 1.0, 0.0], [0.0, 1.0], [1.5, 0.0]):
        with pytest.raises(ValueError, match="times"):
            FlowMapSampler(times=bad)


@pytest.mark.parametrize("kind", ["diffusers_dit", "diffusers_pixart"])
def test_the_flow_map_model_starts_as_its_teacher(kind):
    base = MODEL_FACTORIES[kind](0)
    flow_map = FlowMapTransformer(base).eval()
    inputs = inputs_for(kind, 3, 1)
    inputs.pop("added_cond_kwargs", None)
    t = inputs.pop("timestep").float()
    with torch.no_grad():
        for s in (t, t * 0.3):
            torch.testing.assert_close(
                flow_map(timestep=t, target_timestep=s, **inputs), base(timestep=t, **inputs).sample
            )
        flow_map.target_embedding[-1].weight.normal_(0, 0.5)  # once trained, s conditions the model
        jump, stay = (flow_map(timestep=t, target_timestep=s, **inputs) for s in (t * 0.3, t))
    assert not torch.allclose(jump, stay)


def test_a_flow_map_program_samples_like_the_module_and_exports_to_onnxruntime(tmp_path):
    flow_map = FlowMapTransformer(diffusers_dit(0)).eval()
    with torch.no_grad():
        flow_map.target_embedding[-1].weight.normal_(0, 0.5)  # make s matter
    inputs = inputs_for("diffusers_dit", 2, 0)
    t = inputs["timestep"].float()
    program = optimize(capture(flow_map, (inputs["hidden_states"], t, t * 0.5, inputs["class_labels"])))
    to_onnx(program, tmp_path / "bundle")
    bundle = load_bundle(tmp_path / "bundle", threads=1)
    labels = torch.arange(3) % 10
    sampler = FlowMapSampler(times=[1.0, 0.6, 0.0], progress=False)

    def eager(x, timestep, target_timestep, class_labels):
        with torch.no_grad():
            return flow_map(x, timestep, target_timestep, class_labels)

    expected = sampler.sample(eager, (labels,), shape=(3, 1, 8, 8), seed=4)
    for runner in (program, bundle):
        torch.testing.assert_close(
            sampler.sample(runner, (labels,), shape=(3, 1, 8, 8), seed=4), expected, atol=1e-4, rtol=1e-4
        )
    with torch.no_grad():
        moved = flow_map(expected, t[:1].expand(3), t[:1].expand(3) * 0, labels)
        still = flow_map(expected, t[:1].expand(3), t[:1].expand(3), labels)
    assert not torch.allclose(moved, still)  # the target time reaches the output


def test_distillation_is_seeded_and_resumes_exactly(tmp_path):
    from diffopt.evaluation.distillation import train_flow_map

    straight, resumed = trained_twice(train_flow_map, "dit-digits-flowmap", tmp_path, batch_size=4)
    assert_same_weights(straight, resumed)
    assert straight.target_embedding[-1].weight.abs().sum() > 0  # the target-time embedding trained


def test_the_shipped_flow_map_reads_as_digits_in_four_jumps_and_captures():
    from diffopt.evaluation.metrics.digits import class_accuracy
    from diffopt.models import example_inputs, load

    flow_map, _ = load("dit-digits-flowmap")
    program = optimize(capture(flow_map, example_inputs("dit-digits-flowmap")))
    x, t, s, y = example_inputs("dit-digits-flowmap", batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(program.backend.run("full", (x, t, s, y))[0], flow_map(x, t, s, y))
    labels = torch.arange(40) % 10
    samples = FlowMapSampler(4, progress=False).sample(program, (labels,), shape=(40, 1, 16, 16), seed=0)
    assert class_accuracy(samples, labels) >= 0.85  # random weights read as ~0.1
