"""Save a batch of [-1, 1] digit images as one PNG grid (rows of ``columns`` images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from diffopt.util.files import replacing


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 10, scale: int = 3) -> None:
    from PIL import Image

    images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    rows = (len(images) + columns - 1) // columns
    h, w = images.shape[1:]
    canvas = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1), 64, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = image
    image = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    with replacing(path) as partial:
        image.save(partial, format="PNG")
