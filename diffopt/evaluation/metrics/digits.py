"""Distribution metrics for generated digits, in the shipped classifier's feature space.

- digits FD: Fréchet distance between Gaussians fitted to the 64-d classifier
  features of generated samples and of the real TRAIN split (what the models learned);
  ``||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``.
- class accuracy: how often the classifier reads the label a sample was generated for.
Both are distribution checks: at 600 samples FD moves by a few tenths from seed to seed
(see docs/metrics.md), so paired fidelity (``diffopt.measure.fidelity``) is the primary
signal when comparing a lossy pass with the exact sampler.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from scipy import linalg

from diffopt.evaluation.data import load_digits_split
from diffopt.evaluation.metrics.classifier import load_classifier


def classifier_features(images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    classifier = load_classifier()
    with torch.no_grad():
        return torch.cat(
            [
                classifier.features(images[i : i + batch_size].float().clamp(-1, 1))
                for i in range(0, len(images), batch_size)
            ]
        )


def predicted_labels(images: torch.Tensor) -> torch.Tensor:
    classifier = load_classifier()
    with torch.no_grad():
        return classifier.head(classifier_features(images)).argmax(dim=1)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted_labels(images) == labels).float().mean())


def label_agreement(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of samples whose predicted label matches the paired reference sample's."""
    return float((predicted_labels(images) == predicted_labels(reference)).float().mean())


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    a, b = features_a.double().numpy(), features_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: regularise both covariances slightly
        offset = np.eye(len(mu_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.real(root)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@lru_cache(maxsize=2)
def _real_features(split: str) -> torch.Tensor:
    return classifier_features(load_digits_split(split).images)


def digits_fd(images: torch.Tensor, reference_split: str = "train") -> float:
    """Fréchet distance of ``images`` to the real digits of ``reference_split``."""
    return frechet_distance(classifier_features(images), _real_features(reference_split))
