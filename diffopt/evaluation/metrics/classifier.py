"""The digits classifier that judges generated samples (trained by the project, weights shipped).

A small CNN on 16x16 digits in [-1, 1]: three conv layers -> global average pool ->
a 64-d feature vector (the space the digits Fréchet distance lives in) -> 10 logits.
Trained on the train split with small random shifts, so slightly off-centre generated
digits are still read correctly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from diffopt.evaluation.data import load_digits_split
from diffopt.models.zoo import NUM_CLASSES

CLASSIFIER_WEIGHTS = Path(__file__).parent / "weights" / "digits-classifier.safetensors"
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(64, FEATURE_DIM, 3, stride=2, padding=1)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(images))
        h = F.silu(self.conv2(h))
        h = F.silu(self.conv3(h))
        return h.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    dx, dy = (int(v) for v in torch.randint(0, 2 * max_shift + 1, (2,), generator=generator))
    return padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]


def train_classifier(epochs: int = 40, seed: int = 0) -> DigitsClassifier:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    data = load_digits_split("train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in tqdm(range(epochs), desc="train classifier"):
        order = torch.randperm(len(data.labels), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(_random_shift(data.images[idx], generator)), data.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@lru_cache(maxsize=1)
def load_classifier() -> DigitsClassifier:
    from safetensors.torch import load_file

    if not CLASSIFIER_WEIGHTS.exists():
        raise FileNotFoundError(
            f"classifier weights missing at {CLASSIFIER_WEIGHTS}; train them with "
            f"`python scripts/train_reference.py classifier`"
        )
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(CLASSIFIER_WEIGHTS)))
    return model.eval().requires_grad_(False)
