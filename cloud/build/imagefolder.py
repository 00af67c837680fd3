"""Image folders (`--dataset imagefolder --data-dir DIR`): one sub-folder per class of PNG or JPEG files,
decoded by DataLoader workers and never held whole in memory.

Layouts:
- `DIR/train` with `DIR/val` and/or `DIR/test`, each holding the same class folders. With `val` alone
  it is the test split too; with `test` alone, validation is held out of train by seed.
- Class folders directly in `DIR`: split by seed into train, validation and test (`val_fraction` of
  the images each for validation and test).

Classes are the folder names, sorted (label i is the i-th name), as torchvision's `ImageFolder` finds
them; files other than .png, .jpg and .jpeg are ignored.

Opening the folder reads the header of every file (Pillow reads no pixels for it). Files that are not
images Pillow can read are refused, naming the first few and how many there are. The headers also give
each image's mode and size: all grey makes 1 channel, otherwise 3 (every image is converted to that
mode); without `--input-size`, the size every image has is the input size (differing sizes are
refused, asking for `--input-size H,W`). The pixels are decoded later, in the workers, by
`cloud.build.images` (converted, resized to cover H x W keeping the aspect ratio, centre-cropped), the
same functions `prunefleet predict` uses. A file that fails to decode then (a truncated file, say)
raises `DatasetError` naming it. Mean and std come from a seeded sample (`cloud.build.streamed`).

Also refused: a folder that is not there, no class folders, a single class, a training class folder
without images, and splits whose class folders differ (named).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import ExifTags, Image
from tqdm import tqdm

from cloud.build import images, streamed
from common.datasets import Dataset, DatasetError

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

EXTENSIONS = (".png", ".jpg", ".jpeg")
SHOWN = 5  # bad files named in an error; the rest are counted
_HEADER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, Image.DecompressionBombError)
_TURNED = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def is_image_file(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


def read_image(path: str) -> Image.Image:
    """The folder's loader: the decoded image, or DatasetError naming the file."""
    try:
        return images.open_image(path)
    except images.ImageError as err:
        raise DatasetError(f"unreadable image in the dataset: {err}") from err


def _trees(data_dir: Path) -> dict[str, Path]:
    """{"train": ..., "val"/"test": ...} for the split layout, {"all": DIR} for one tree of classes."""
    if not data_dir.is_dir():
        raise DatasetError(f"image folder {data_dir} is not a directory")
    named = {part: data_dir / part for part in ("train", "val", "test") if (data_dir / part).is_dir()}
    if named and "train" not in named:
        raise DatasetError(f"{data_dir} has {' and '.join(f'{p}/' for p in named)} but no train/")
    if list(named) == ["train"]:
        raise DatasetError(
            f"{data_dir} has train/ but neither val/ nor test/; add one, or put the class folders directly "
            f"in {data_dir} to have them split by seed"
        )
    return named or {"all": data_dir}


def _folder(root: Path, training: bool) -> ImageFolder:
    from torchvision.datasets import ImageFolder  # here: importing torchvision costs every CLI command a second

    try:
        folder = ImageFolder(root, loader=read_image, is_valid_file=is_image_file, allow_empty=True)
    except FileNotFoundError as err:
        raise DatasetError(f"{root} has no class folders; expected a sub-folder of PNG/JPEG files per class") from err
    if not folder.samples:
        raise DatasetError(f"{root}: no PNG or JPEG files in its class folders ({', '.join(folder.classes[:SHOWN])})")
    counts = Counter(folder.targets)
    empty = [name for i, name in enumerate(folder.classes) if not counts[i]]
    if training and empty:
        raise DatasetError(f"{root}: class folder(s) {', '.join(empty)} hold no PNG or JPEG files")
    return folder


def _classes(folders: dict[str, ImageFolder], data_dir: Path) -> tuple[str, ...]:
    """The class list, the same in every split."""
    first, *others = folders
    classes = folders[first].classes
    for part in others:
        if folders[part].classes != classes:
            missing = sorted(set(classes) - set(folders[part].classes))
            extra = sorted(set(folders[part].classes) - set(classes))
            raise DatasetError(
                f"{data_dir}: {part}/ has other class folders than {first}/ (missing: {', '.join(missing) or 'none'}; "
                f"not in {first}/: {', '.join(extra) or 'none'}); every split needs the same classes"
            )
    return streamed.check_classes(classes, str(data_dir))


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(H, W) as the image will be seen once its EXIF orientation is applied."""
    width, height = image.size
    turned = "exif" in image.info and image.getexif().get(ExifTags.Base.Orientation) in _TURNED
    return (width, height) if turned else (height, width)


def _header(path: str) -> tuple[str, tuple[int, int]]:
    with Image.open(path) as image:
        mode, size = image.mode, _upright_size(image)
    if size[0] * size[1] > images.MAX_PIXELS:
        raise ValueError(f"{size[0]}x{size[1]} pixels, over the limit of {images.MAX_PIXELS}")
    return mode, size


def _scan(paths: Sequence[str], data_dir: Path) -> tuple[Counter, Counter]:
    """Every file's mode and (H, W) from its header; refuses the folder if any file is no image."""
    modes, sizes, bad = Counter(), Counter(), []
    for path in tqdm(paths, desc="reading image headers", unit="file", leave=False, disable=len(paths) < 10_000):
        try:
            mode, size = _header(path)
        except _HEADER_ERRORS as err:
            reason = "not an image Pillow can read" if isinstance(err, Image.UnidentifiedImageError) else str(err)
            bad.append(f"{os.path.relpath(path, data_dir)} ({reason[:80]})")
            continue
        modes[mode] += 1
        sizes[size] += 1
    if bad:
        more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise DatasetError(
            f"{data_dir}: {len(bad)} of {len(paths)} files are not images that can be read: "
            f"{', '.join(bad[:SHOWN])}{more}; remove or replace them"
        )
    return modes, sizes


def load(
    data_dir: Path | None,
    *,
    input_size: Sequence[int] = (),
    seed: int = 0,
    val_fraction: float = 0.1,
    workers: int = 0,
) -> Dataset:
    """The image folder at `data_dir` as streamed splits read by `workers` DataLoader processes."""
    if data_dir is None:
        raise DatasetError("--dataset imagefolder needs --data-dir DIR: a folder of class folders of PNG or JPEG files")
    data_dir = Path(data_dir)
    where = str(data_dir)
    folders = {part: _folder(root, training=part in ("train", "all")) for part, root in _trees(data_dir).items()}
    classes = _classes(folders, data_dir)
    modes, sizes = _scan([path for folder in folders.values() for path, _ in folder.samples], data_dir)
    shape = streamed.input_shape(streamed.channels_for(modes, where), sizes, input_size, where)
    for folder in folders.values():
        folder.transform = streamed.Preprocess(shape)
    parts = streamed.splits(folders, seed, val_fraction, workers)
    return streamed.dataset("imagefolder", classes, shape, parts, seed, where)
