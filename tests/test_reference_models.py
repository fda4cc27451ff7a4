"""The shipped reference models and metrics load offline and are genuinely trained."""

import pytest
import torch

from diffopt import Sampler, capture, make_scheduler
from diffopt.evaluation.data import load_digits_split
from diffopt.evaluation.metrics.digits import class_accuracy, digits_fd, frechet_distance, label_agreement
from diffopt.measure.fidelity import psnr, relative_l2
from diffopt.models import REFERENCE_MODELS, example_inputs, get_spec, load

# denoisers called (x, t, y); the length-shortcut and flow-map models have their own tests
PLAIN_MODELS = sorted(name for name in REFERENCE_MODELS if get_spec(name).architecture in ("dit", "unet"))


def test_digits_split_is_stratified_and_disjoint():
    train, test = load_digits_split("train"), load_digits_split("test")
    assert len(test.labels) == 600 and len(train.labels) == 1797 - 600
    assert torch.bincount(test.labels).min() >= 55  # every class held out
    assert train.images.shape[1:] == (1, 16, 16) and float(train.images.min()) >= -1.0
    flat_train = {tuple(v.tolist()) for v in train.images.flatten(1)[:, ::7]}
    assert not any(tuple(v.tolist()) in flat_train for v in test.images.flatten(1)[:, ::7])
    with pytest.raises(ValueError, match="unknown digits split"):
        load_digits_split("validation")


def test_classifier_reads_held_out_digits_and_fd_separates_real_from_noise():
    test = load_digits_split("test")
    assert class_accuracy(test.images, test.labels) >= 0.95
    real = digits_fd(test.images)
    noise = digits_fd(torch.randn(600, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert real < 5.0 and noise > 100 * real


def test_frechet_distance_of_identical_feature_sets_is_zero():
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(features, features)) < 1e-6
    assert frechet_distance(features, features + 1.0) == pytest.approx(8.0, rel=1e-3)


def test_fidelity_metrics():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    assert psnr(x, x) == float("inf") and relative_l2(x, x) == 0.0
    assert psnr(x + 0.02, x) == pytest.approx(20 * torch.log10(torch.tensor(2 / 0.02)).item(), rel=1e-4)
    assert label_agreement(x, x) == 1.0


@pytest.mark.parametrize("name", PLAIN_MODELS)
def test_reference_model_loads_and_generates_readable_digits(name):
    model, config = load(name)
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())
    labels = torch.arange(40) % 10
    sampler = Sampler(make_scheduler(config, num_steps=10), progress=False)
    samples = sampler.sample(model, (labels,), shape=(40, 1, 16, 16), seed=0)
    # random weights give ~0.1; the trained models read as the digit they were asked for
    assert class_accuracy(samples, labels) >= 0.6


@pytest.mark.parametrize("name", PLAIN_MODELS)
def test_reference_models_capture(name):
    model, _ = load(name)
    captured = capture(model, example_inputs(name))
    x, t, y = example_inputs(name, batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(captured.module(x, t, y)[0], model(x, t, y, return_dict=False)[0])


def test_unknown_model_names_are_reported():
    with pytest.raises(KeyError, match="available are"):
        load("sd-xl")
