"""The real dataset the reference models are trained and judged on.

scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, 10 classes) ships
with the package, so nothing is downloaded. Images are upsampled bilinearly to 16x16
(patch-2 DiTs then see 64 tokens) and scaled to [-1, 1]. A stratified held-out split
of 600 digits is never used for training; the metrics compare against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from diffopt.models.zoo import IMAGE_SIZE

HELD_OUT = 600
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    images: torch.Tensor  # (N, 1, 16, 16) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64


def _to_model_space(raw: torch.Tensor) -> torch.Tensor:
    """8x8 pixel values 0..16 -> (N, 1, 16, 16) in [-1, 1]."""
    images = (raw.reshape(-1, 1, 8, 8) / 16.0) * 2.0 - 1.0
    return F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)


@cache
def _splits() -> dict[str, DigitsSplit]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = list(range(len(digits.target)))
    train_idx, test_idx = train_test_split(indices, test_size=HELD_OUT, stratify=digits.target, random_state=SPLIT_SEED)
    raw = torch.tensor(digits.data, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    images = _to_model_space(raw)
    return {
        "train": DigitsSplit(images[train_idx], labels[train_idx]),
        "test": DigitsSplit(images[test_idx], labels[test_idx]),
    }


def load_digits_split(split: str) -> DigitsSplit:
    """Return the ``"train"`` (1,197 digits) or ``"test"`` (600 held-out digits) split."""
    splits = _splits()
    if split not in splits:
        raise ValueError(f"unknown digits split {split!r}: expected one of {sorted(splits)}")
    return splits[split]
