"""Image trees for benchmarks and tests: uint8 pixels written as a class-per-folder tree of PNG files.

    ROOT/<class>/<index>.png      one folder per class, one file per image, index in input order

PNG is lossless, so reading a file back gives exactly the pixels written (after `colour` and `pad_to`,
which `rendered` applies). A tree is written into a temporary sibling folder and renamed into place
when whole, so a tree that exists is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

TINT = (1.0, 0.8, 0.55)  # grey to a warm colour: every channel differs, none is lost


def folder_names(classes: Sequence[str]) -> tuple[str, ...]:
    """Safe folder names for `classes` that sort in label order: `0-T-shirt-top` ... `9-Ankle boot`."""
    digits = len(str(max(len(classes) - 1, 0)))
    return tuple(f"{i:0{digits}d}-{name.replace('/', '-').replace(os.sep, '-')}" for i, name in enumerate(classes))


def _check_folders(classes: Sequence[str]) -> None:
    if len(set(classes)) != len(classes):
        raise ValueError(f"class folder names repeat: {list(classes)}")
    for name in classes:
        if not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
            raise ValueError(f"{name!r} is not a folder name (see folder_names)")


def rendered(images: np.ndarray, pad_to: tuple[int, int] | None = None, colour: bool = False) -> np.ndarray:
    """The pixels `write_image_tree` stores for uint8 `images` [N, C, H, W]: grey turned into three
    tinted channels when `colour`, and each image centred on a black canvas of `pad_to` (H, W)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, 1 or 3, H, W], got {images.dtype} {images.shape}")
    if colour and images.shape[1] == 1:
        tint = np.array(TINT, dtype=np.float32).reshape(1, 3, 1, 1)
        images = np.round(images.astype(np.float32) * tint).astype(np.uint8)
    if pad_to is None:
        return images
    n, c, h, w = images.shape
    height, width = pad_to
    if height < h or width < w:
        raise ValueError(f"pad_to {pad_to} is smaller than the images ({h}, {w})")
    canvas = np.zeros((n, c, height, width), dtype=np.uint8)
    top, left = (height - h) // 2, (width - w) // 2
    canvas[:, :, top : top + h, left : left + w] = images
    return canvas


def _save(pixels: np.ndarray, path: Path) -> None:
    """One image [C, H, W] as PNG: grey for one channel, RGB for three (fast, lossless compression)."""
    array = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", compress_level=1)


def write_image_tree(
    images: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[str],
    root: Path,
    pad_to: tuple[int, int] | None = None,
    colour: bool = False,
) -> Path:
    """Write uint8 `images` [N, C, H, W] with their `labels` as PNGs under ROOT/<classes[label]>/,
    every class a folder (empty ones too); `colour` and `pad_to` as in `rendered`. Returns `root`.
    An existing `root` is refused; a tree left unfinished by an interrupted call is started over."""
    root = Path(root)
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(f"labels must be in [0, {len(classes)}), got {labels.min()}..{labels.max()}")
    _check_folders(classes)
    if root.exists():
        raise FileExistsError(f"{root} exists; an image tree is written only where there is none")
    pixels = rendered(images, pad_to, colour)
    partial = root.with_name(f"{root.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    folders = [partial / name for name in classes]
    for folder in folders:
        folder.mkdir(parents=True)
    digits = len(str(max(len(labels) - 1, 0)))
    for index, (image, label) in enumerate(zip(pixels, labels)):
        _save(image, folders[label] / f"{index:0{digits}d}.png")
    os.replace(partial, root)
    return root
