"""The user's own images and index-PNG masks, matched by file stem."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _pil():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError("FolderDataset and `segfast predict` need Pillow (pip install pillow)") from error
    return Image


class FolderDataset(Dataset):
    """Pairs ``images_dir/<stem>.png|jpg|jpeg`` with ``masks_dir/<stem>.png``.

    Items are ``(image, mask)``: image float32 (C, H, W) in [0, 1] (C = 1 for grayscale, 3 for
    colour), or with ``decoded=True`` the file's bytes as uint8 (H, W, C) (a quarter of the bytes
    through the DataLoader; ``segfast.augment.RandomAffine`` takes them with
    ``image_layout="NHWC"`` and writes the float batch), mask int64 (H, W) holding the PNG's palette
    indices or gray levels. Every mask
    value must be < ``num_classes`` or equal ``ignore_index``; a file that breaks this, a missing
    partner or a size mismatch raises ValueError naming the file.
    """

    def __init__(self, images_dir, masks_dir, num_classes: int, ignore_index: int = 255, decoded: bool = False):
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        for d in (self.images_dir, self.masks_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"FolderDataset: {d} is not a directory")
        images = {p.stem: p for p in sorted(self.images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        masks = {p.stem: p for p in sorted(self.masks_dir.iterdir()) if p.suffix.lower() == ".png"}
        if not images:
            raise ValueError(f"FolderDataset: no .png/.jpg/.jpeg images in {self.images_dir}")
        missing = sorted(set(images) - set(masks))
        if missing:
            raise ValueError(
                f"FolderDataset: no mask <stem>.png in {self.masks_dir} for {len(missing)} image(s), "
                f"e.g. {images[missing[0]].name}"
            )
        self.pairs = [(images[s], masks[s]) for s in sorted(images)]
        self.num_classes, self.ignore_index, self.decoded = num_classes, ignore_index, decoded

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        Image = _pil()
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path, self.decoded)
        size = image.shape[:2] if self.decoded else image.shape[1:]
        with Image.open(mask_path) as m:
            if m.mode not in ("P", "L", "I", "I;16"):
                raise ValueError(
                    f"FolderDataset: {mask_path} must be an index (palette) or grayscale PNG, got mode {m.mode}"
                )
            mask = torch.from_numpy(np.array(m, dtype=np.int64))
        if mask.shape != size:
            raise ValueError(
                f"FolderDataset: {mask_path} is {tuple(mask.shape)} but {image_path.name} is {tuple(size)}"
            )
        # binary segmentation (num_classes 1): masks hold 0 / 1
        bad = (mask >= max(self.num_classes, 2)) & (mask != self.ignore_index)
        if bad.any():
            raise ValueError(
                f"FolderDataset: {mask_path} holds value {int(mask[bad][0])}, not a class in "
                f"[0, {max(self.num_classes, 2)}) nor ignore_index {self.ignore_index}"
            )
        return image, mask


def read_image(path, decoded: bool = False) -> torch.Tensor:
    """An image file as float32 (C, H, W) in [0, 1], or with ``decoded`` as its uint8 (H, W, C)
    bytes: C = 1 for grayscale, else RGB."""
    Image = _pil()
    with Image.open(path) as im:
        im = im.convert("L") if im.mode in ("L", "I", "I;16", "1") else im.convert("RGB")
        array = np.array(im, dtype=np.uint8)
    t = torch.from_numpy(array)
    t = t.unsqueeze(-1) if t.dim() == 2 else t
    return t if decoded else t.permute(2, 0, 1).float().div(255.0).contiguous()


def write_mask_png(mask: torch.Tensor, path, num_classes: int) -> None:
    """An (H, W) class mask as a palette PNG: the indices are the classes, colours a fixed palette."""
    Image = _pil()
    palette = _palette(max(num_classes, 1))
    im = Image.fromarray(mask.to(torch.uint8).cpu().numpy(), mode="P")
    im.putpalette([v for rgb in palette for v in rgb])
    im.save(path)


def _palette(n: int) -> list[tuple[int, int, int]]:
    """Black for class 0, then well-separated colours (the PASCAL VOC bit-interleaving scheme)."""
    colours = []
    for c in range(256):
        r = g = b = 0
        label = c
        for shift in range(7, -1, -1):
            r |= (label & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        colours.append((r, g, b))
    return colours[: max(n, 256)]
