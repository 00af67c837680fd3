"""Image files to model input: modes, sizes and the files that must be refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cloud.build import images
from cloud.build.images import ImageError, open_image, preprocess


def _gradient(height: int, width: int, channels: int = 3) -> np.ndarray:
    rows = np.arange(height, dtype=np.int64)[:, None]
    cols = np.arange(width, dtype=np.int64)[None, :]
    planes = [(rows * 7 + cols * 3 + 50 * c) % 256 for c in range(channels)]
    return np.stack(planes, axis=-1).astype(np.uint8)


def _saved(tmp_path, image: Image.Image, name: str) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def test_an_image_at_the_target_size_is_not_resampled(tmp_path):
    pixels = _gradient(28, 28)
    path = _saved(tmp_path, Image.fromarray(pixels), "same.png")
    out = preprocess(open_image(path), (3, 28, 28))
    assert out.dtype == np.uint8 and out.shape == (3, 28, 28) and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, pixels.transpose(2, 0, 1))


def test_grey_at_the_target_size_is_left_exactly(tmp_path):
    pixels = _gradient(28, 28, channels=1)[..., 0]
    out = preprocess(open_image(_saved(tmp_path, Image.fromarray(pixels), "g.png")), (1, 28, 28))
    np.testing.assert_array_equal(out[0], pixels)


def test_non_square_is_resized_to_cover_then_centre_cropped(tmp_path):
    # a wide image with a distinct centre square: cover-resize keeps the aspect, the crop keeps the centre
    pixels = np.zeros((40, 120, 3), dtype=np.uint8)
    pixels[:, 40:80] = 200
    out = preprocess(open_image(_saved(tmp_path, Image.fromarray(pixels), "wide.png")), (3, 20, 20))
    assert out.shape == (3, 20, 20)
    assert (out[:, :, 2:-2] == 200).all()  # the centre square fills the crop (edges may blend)
    tall = np.ascontiguousarray(pixels.transpose(1, 0, 2))
    out_tall = preprocess(Image.fromarray(tall), (3, 20, 10))
    assert out_tall.shape == (3, 20, 10)


def test_preprocess_matches_pillow_resize_then_crop():
    image = Image.fromarray(_gradient(50, 80))
    out = preprocess(image, (3, 25, 25))
    expected = image.resize((40, 25), Image.Resampling.BILINEAR).crop((7, 0, 32, 25))
    np.testing.assert_array_equal(out, np.asarray(expected).transpose(2, 0, 1))


def test_grey_becomes_three_equal_channels(tmp_path):
    pixels = _gradient(16, 16, channels=1)[..., 0]
    out = preprocess(open_image(_saved(tmp_path, Image.fromarray(pixels), "g.png")), (3, 16, 16))
    for channel in out:
        np.testing.assert_array_equal(channel, pixels)


def test_rgb_becomes_grey_for_one_channel():
    out = preprocess(Image.fromarray(_gradient(8, 8)), (1, 8, 8))
    assert out.shape == (1, 8, 8)
    expected = np.asarray(Image.fromarray(_gradient(8, 8)).convert("L"))
    np.testing.assert_array_equal(out[0], expected)


def test_rgba_drops_alpha(tmp_path):
    rgb = _gradient(12, 12)
    rgba = np.concatenate([rgb, np.zeros((12, 12, 1), dtype=np.uint8)], axis=-1)  # fully transparent
    path = _saved(tmp_path, Image.fromarray(rgba), "a.png")
    out = preprocess(open_image(path), (3, 12, 12))
    np.testing.assert_array_equal(out, rgb.transpose(2, 0, 1))


def test_palette_uses_its_colours(tmp_path):
    image = Image.fromarray(_gradient(10, 10)).quantize(colors=16)
    assert image.mode == "P"
    path = _saved(tmp_path, image, "p.png")
    out = preprocess(open_image(path), (3, 10, 10))
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")).transpose(2, 0, 1))


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = _saved(tmp_path, Image.fromarray(values), "wide.png")
    out = preprocess(open_image(path), (1, 1, 4))
    np.testing.assert_array_equal(out[0, 0], [0, 1, 128, 255])


def test_cmyk_converts_to_rgb():
    out = preprocess(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (3, 4, 4))
    assert (out == 255).all()


def test_a_truncated_file_is_refused_by_name(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(_gradient(64, 64)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        open_image(path)


def test_a_non_image_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not pixels at all\n")
    with pytest.raises(ImageError, match="notes.png.*not an image"):
        open_image(path)


def test_a_missing_file_is_refused_by_name(tmp_path):
    with pytest.raises(ImageError, match="absent.png: no such file"):
        open_image(tmp_path / "absent.png")


def test_an_oversized_image_is_refused_before_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    path = _saved(tmp_path, Image.fromarray(_gradient(11, 10)), "big.png")
    with pytest.raises(ImageError, match="big.png: 10x11 is 110 pixels, over the limit of 100"):
        open_image(path)


def test_an_image_past_pillows_own_bomb_guard_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    path = _saved(tmp_path, Image.fromarray(_gradient(10, 10)), "bomb.png")
    with pytest.raises(ImageError, match="bomb.png"):
        open_image(path)


def test_bad_input_shapes_are_refused():
    image = Image.new("RGB", (4, 4))
    for shape in ((2, 4, 4), (3, 0, 4), (3, 4)):
        with pytest.raises(ValueError):
            preprocess(image, shape)
