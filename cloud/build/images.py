"""Image files to model input: the one place that decodes a person's images.

Training on an image folder and `prunefleet predict` both call `open_image` and then `preprocess`,
so the pixels a variant is asked about are made exactly as its training pixels were: the mode is
converted to grey ("L") for one channel or "RGB" for three, the image is resized (bilinear, with
Pillow's antialiasing) to cover the target size keeping its aspect ratio, then centre-cropped to it.
An image already at the target size is not resampled at all. The result is uint8 `[C, H, W]`;
normalizing with the variant's mean and std happens where the model runs.

Decoding honours the EXIF orientation, so a photo is seen the way a viewer shows it. 16-bit grey
(and 32-bit integer) images are scaled from 0..65535 to 0..255; alpha is dropped, not composited.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from common.errors import PrunefleetError

MAX_PIXELS = 50_000_000  # refuse larger images before decoding them
MAX_SIDE = 4096  # the largest height or width a model input may ask for
_MODES = {1: "L", 3: "RGB"}
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, Image.DecompressionBombError)


class ImageError(PrunefleetError, ValueError):
    """An image that cannot be used; the message names the file and the problem."""


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode the image at `path`, upright; refuse anything unusable by name."""
    name = str(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(f"{name}: {width}x{height} is {width * height} pixels, over the limit of {MAX_PIXELS}")
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
    except ImageError:
        raise
    except FileNotFoundError as error:
        raise ImageError(f"{name}: no such file") from error
    except IsADirectoryError as error:
        raise ImageError(f"{name}: is a directory, not an image") from error
    except Image.UnidentifiedImageError as error:
        raise ImageError(f"{name}: not an image Pillow can read") from error
    except _DECODE_ERRORS as error:
        raise ImageError(f"{name}: cannot decode the image ({error})") from error
    if image.mode not in _WIDE_GREY_MODES and not _convertible(image.mode):
        raise ImageError(f"{name}: images of mode {image.mode} are not supported")
    return image


def preprocess(image: Image.Image, input_shape: tuple[int, int, int]) -> np.ndarray:
    """`image` as a new uint8 array `[C, H, W]` for a model whose input shape is `input_shape`."""
    channels, height, width = _checked_shape(input_shape)
    converted = _to_mode(image, _MODES[channels])
    fitted = _cover_and_crop(converted, width, height)
    pixels = np.asarray(fitted, dtype=np.uint8)
    if channels == 1:
        pixels = pixels[np.newaxis]
    else:
        pixels = pixels.transpose(2, 0, 1)
    return np.array(pixels, dtype=np.uint8, order="C")  # a writable copy, not a view of the image


def _checked_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    channels, height, width = (int(value) for value in input_shape)
    if channels not in _MODES:
        raise ValueError(f"images give 1 or 3 channels, the model wants {channels}")
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise ValueError(f"image height and width must be within 1..{MAX_SIDE}, got {height}x{width}")
    return channels, height, width


def _convertible(mode: str) -> bool:
    try:
        Image.new(mode, (1, 1)).convert("RGB").convert("L")
    except ValueError:
        return False
    return True


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in _WIDE_GREY_MODES:
        image = _wide_grey_to_grey(image)
    if image.mode == mode:
        return image
    try:
        return image.convert(mode)
    except ValueError:
        pass
    try:
        return image.convert("RGB").convert(mode)
    except ValueError as error:
        name = getattr(image, "filename", "") or "image"
        raise ImageError(f"{name}: cannot convert mode {image.mode} to {mode}") from error


def _wide_grey_to_grey(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grey to 8-bit, mapping 0..65535 onto 0..255 with rounding."""
    values = np.asarray(image).astype(np.int64)
    values = np.clip(values, 0, 65535)
    grey = (values * 255 + 32767) // 65535
    return Image.fromarray(grey.astype(np.uint8))


def _cover_and_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    source_width, source_height = image.size
    scale = max(width / source_width, height / source_height)
    cover = (
        max(width, round(source_width * scale)),
        max(height, round(source_height * scale)),
    )
    if cover != image.size:
        image = image.resize(cover, Image.Resampling.BILINEAR)
    left = (cover[0] - width) // 2
    top = (cover[1] - height) // 2
    return image.crop((left, top, left + width, top + height))
