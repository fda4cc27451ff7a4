"""The sampler + identity program against plain reference loops written independently.

The denoiser is the closed-form Gaussian mixture (16-D, shaped 1x4x4, 4 classes + null),
captured like any model, so the runs are well conditioned and exactly comparable.

DDPM and DDIM references use diffusers' own schedulers (trailing spacing, no clipping,
final alpha 1); the flow-matching Euler reference is written out by hand.
"""

import inspect
import json

import pytest
import torch

from diffopt import Sampler, capture, make_scheduler, optimize
from diffopt.models.gaussian_mixture import GaussianMixtureDenoiser
from diffopt.sampling.noise import make_alphas_cumprod

CONFIG = {"kind": "ddpm", "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}
SHAPE = (3, 1, 4, 4)
NULL_CLASS = 4


def mixture(**kwargs):
    g = torch.Generator().manual_seed(0)
    return GaussianMixtureDenoiser(
        torch.randn(4, 16, generator=g),
        torch.tensor([0.2, 0.5, 0.3, 0.4]),
        torch.ones(4),
        sample_shape=(1, 4, 4),
        **kwargs,
    )


@pytest.fixture(scope="module")
def model_and_program():
    model = mixture()
    captured = capture(model, (torch.randn(2, 1, 4, 4), torch.tensor([999, 10]), torch.tensor([1, 2])))
    return model, optimize(captured)


def _diffusers_loop(scheduler, model, noise, labels, steps, seed_for_noise, **step_options):
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed_for_noise)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(x, t.expand(x.shape[0]), labels)
            x = scheduler.step(eps, t, x, generator=generator, **step_options).prev_sample
    return x


def _seeded_noise(seed):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


# step counts that divide 1000: diffusers' DDIM steps to t - 1000 // K rather than to the
# next visited timestep, which only agree when K divides the training steps
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_ddim_matches_reference_loop(model_and_program, steps, clip):
    from diffusers import DDIMScheduler

    model, program = model_and_program
    labels = torch.tensor([0, 3, NULL_CLASS])
    reference_scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=clip is not None,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    expected = _diffusers_loop(
        reference_scheduler, model, _seeded_noise(0), labels, steps, seed_for_noise=0, use_clipped_model_output=True
    )
    sampler = Sampler(make_scheduler({**CONFIG, "clip_sample": clip}, "ddim", steps), progress=False)
    for denoiser in (program, model):
        got = sampler.sample(denoiser, (labels,), shape=SHAPE, seed=0)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("steps", [10, 100])
def test_ddpm_matches_reference_loop(model_and_program, steps, clip):
    from diffusers import DDPMScheduler

    model, program = model_and_program
    labels = torch.tensor([1, 2, NULL_CLASS])
    reference_scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=clip is not None,
        timestep_spacing="trailing",
        variance_type="fixed_small",
    )
    # the sampler draws the initial noise and then each step's noise from one generator
    generator = torch.Generator().manual_seed(4)
    noise = torch.randn(SHAPE, generator=generator)
    reference_scheduler.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in reference_scheduler.timesteps:
            x = reference_scheduler.step(model(x, t.expand(3), labels), t, x, generator=generator).prev_sample
    scheduler = make_scheduler({**CONFIG, "clip_sample": clip}, "ddpm", steps)
    got = Sampler(scheduler, progress=False).sample(program, (labels,), shape=SHAPE, seed=4)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_ddim_with_eta_is_seeded_and_stochastic(model_and_program):
    _, program = model_and_program
    labels = torch.tensor([1, 2, 3])
    sampler = Sampler(make_scheduler(CONFIG, "ddim", 10, eta=1.0), progress=False)
    a = sampler.sample(program, (labels,), shape=SHAPE, seed=1)
    b = sampler.sample(program, (labels,), shape=SHAPE, seed=1)
    c = sampler.sample(program, (labels,), shape=SHAPE, seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_flow_euler_matches_hand_written_loop():
    model = mixture(parametrization="flow", prediction="velocity")
    program = optimize(
        model, example_inputs=(torch.randn(2, 1, 4, 4), torch.tensor([999.0, 10.0]), torch.tensor([1, 2]))
    )
    labels = torch.tensor([0, 2, NULL_CLASS])
    steps = 12
    x = _seeded_noise(3)
    with torch.no_grad():
        for i in range(steps):
            t, t_next = 1 - i / steps, 1 - (i + 1) / steps
            v = model(x, torch.full((3,), t * 1000.0), labels)
            x = x + (t_next - t) * v
    sampler = Sampler(make_scheduler({"kind": "flow", "timestep_scale": 1000.0}, num_steps=steps), progress=False)
    got = sampler.sample(program, (labels,), shape=SHAPE, seed=3)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_classifier_free_guidance_combines_the_two_halves(model_and_program):
    model, program = model_and_program
    labels, null, scale, steps = torch.tensor([1, 2, 3]), NULL_CLASS, 3.0, 5
    scheduler = make_scheduler(CONFIG, "ddim", steps)
    alphas = make_alphas_cumprod("squaredcos_cap_v2")
    x = _seeded_noise(7)
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            tt = t.expand(3)
            eps_c, eps_u = model(x, tt, labels), model(x, tt, torch.full((3,), null))
            eps = eps_u + scale * (eps_c - eps_u)
            a = alphas[t].item()
            a_prev = alphas[scheduler.timesteps[k + 1]].item() if k + 1 < steps else 1.0
            x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    sampler = Sampler(scheduler, guidance_scale=scale, null_conditions=(torch.tensor(null),), progress=False)
    got = sampler.sample(program, (labels,), shape=SHAPE, seed=7)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    assert sampler.last_stats.model_calls == steps and sampler.last_stats.variants == ["full"] * steps


def test_guidance_without_null_conditions_is_rejected():
    with pytest.raises(ValueError, match="null_conditions"):
        Sampler(make_scheduler(CONFIG, "ddim", 5), guidance_scale=2.0)


def test_bad_scheduler_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_steps"):
        make_scheduler(CONFIG, "ddim", 0)
    with pytest.raises(ValueError, match="sampler kind"):
        make_scheduler(CONFIG, "euler", 10)
    with pytest.raises(ValueError, match="flow-euler"):
        make_scheduler({"kind": "flow"}, "ddim", 10)


def _scaled_diffusers_loop(scheduler, model, labels, steps, seed):
    """The loop diffusers pipelines run (scale the input, call the model, step), drawing the
    initial noise and then each step's noise from one generator, as the sampler does."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=generator)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_x = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            out = model(model_x, t.expand(x.shape[0]), labels)
            x = scheduler.step(out, t, x, **({"generator": generator} if takes_generator else {})).prev_sample
    return x


DIFFUSERS_SCHEDULERS = {  # (class, options): each runs as diffusers runs it
    "DPM-Solver++ (multistep)": ("DPMSolverMultistepScheduler", {"beta_schedule": "squaredcos_cap_v2"}),
    "Euler (scaled input, float timesteps)": ("EulerDiscreteScheduler", {"beta_schedule": "squaredcos_cap_v2"}),
    "flow matching Euler": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
    "Heun (two calls per step)": ("HeunDiscreteScheduler", {"beta_schedule": "squaredcos_cap_v2"}),
    "DDPM with clip_sample=False": ("DDPMScheduler", {"clip_sample": False}),
}


@pytest.mark.parametrize("name", DIFFUSERS_SCHEDULERS)
def test_diffusers_schedulers_and_their_configs_drive_the_sampler_unchanged(model_and_program, name):
    import diffusers

    model, program = model_and_program
    class_name, options = DIFFUSERS_SCHEDULERS[name]
    scheduler = getattr(diffusers, class_name)(**options)
    if class_name.startswith("FlowMatch"):  # a velocity model on the flow-matching time axis
        model = mixture(parametrization="flow", prediction="velocity")
    labels = torch.tensor([0, 3, NULL_CLASS])
    expected = _scaled_diffusers_loop(scheduler, model, labels, 6, seed=0)
    scheduler.set_timesteps(6)
    denoisers = (model, program) if not scheduler.timesteps.is_floating_point() else (model,)
    for given in (scheduler, json.loads(scheduler.to_json_string())):  # the object, or its config as saved
        made = make_scheduler(given, num_steps=6)
        assert made.name == class_name and len(made.timesteps) == made.num_steps
        sampler = Sampler(made, progress=False)
        for denoiser in denoisers:
            for _ in range(2):  # runs share nothing (a multistep solver's history, the step counter)
                torch.testing.assert_close(sampler.sample(denoiser, (labels,), shape=SHAPE, seed=0), expected)


@pytest.mark.parametrize("name", ["DPM-Solver++ (multistep)", "flow matching Euler"])
def test_calibration_runs_on_a_diffusers_scheduler_config(name):
    import diffusers
    from models import simple_dit

    from diffopt import calibrate

    class_name, options = DIFFUSERS_SCHEDULERS[name]
    config = json.loads(getattr(diffusers, class_name)(**options).to_json_string())
    made = make_scheduler(config, num_steps=5)
    assert made.name == class_name  # flow matching stays flow matching
    timestep = torch.tensor([999.0, 5.0]) if made.timesteps.is_floating_point() else torch.tensor([999, 5])
    graph = capture(simple_dit(), (torch.randn(2, 1, 16, 16), timestep, torch.tensor([0, 1])))
    sampler = Sampler(made, progress=False)
    statistics = calibrate(optimize(graph).program, sampler, (torch.tensor([0, 3]),), (2, 1, 16, 16), progress=False)
    assert statistics.temporal.input_absmax and all(v > 0 for v in statistics.temporal.input_absmax.values())
    assert len(next(iter(statistics.temporal.step_counts.values()))) == 5  # one entry per step of the solver


def test_diffusers_scheduler_configs_are_refused_by_name_where_they_cannot_run():
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="names scheduler 'NoSuchScheduler', which is not a diffusers scheduler"):
        make_scheduler({"_class_name": "NoSuchScheduler"})
    with pytest.raises(ValueError, match="a diffusers scheduler samples as itself; drop kind='ddpm'"):
        make_scheduler(DDIMScheduler(), "ddpm")
    with pytest.raises(ValueError, match=r"config has keys \['shift'\] that diffopt's scheduler config does not have"):
        make_scheduler({"shift": 3.0, "num_train_timesteps": 1000})  # a flow-matching config is never read as DDIM
    plain = make_scheduler({**CONFIG, "clip_sample": False}, "ddim", 10)  # diffusers' flag in diffopt's config
    assert plain.clip_sample is None
    assert make_scheduler({**CONFIG, "clip_sample": True, "clip_sample_range": 2.0}, "ddim", 10).clip_sample == 2.0
