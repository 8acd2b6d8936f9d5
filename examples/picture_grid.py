"""The grid the example pictures are drawn as: rows of equal-height (H, W, 3) uint8 tiles with grey
spacers, saved enlarged (nearest) so that pixels stay visible."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

GREY, GAP = 128, 4


def grid(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """(H, W, 3) uint8 tiles, row by row, into one picture."""
    lines = []
    for tiles in rows:
        spacer = torch.full((tiles[0].shape[0], GAP, 3), GREY, dtype=torch.uint8)
        lines.append(torch.cat([t for tile in tiles for t in (tile, spacer)][:-1], 1))
    spacer = torch.full((GAP, lines[0].shape[1], 3), GREY, dtype=torch.uint8)
    return torch.cat([t for line in lines for t in (line, spacer)][:-1])


def save(picture: torch.Tensor, path: Path, scale: int = 3) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (picture.shape[1] * scale, picture.shape[0] * scale)
    Image.fromarray(picture.numpy()).resize(size, Image.NEAREST).save(path)
