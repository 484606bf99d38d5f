"""Reference image: loading errors, the official output-size rule and the official preprocessing."""

import numpy as np
import pytest
from PIL import Image

from liveavatar_jax.io.image import (ImageError, load_image, load_reference_image, preprocess_reference,
                                     size_for_area)


@pytest.mark.parametrize("image_hw, expected", [
    ((1920, 1080), (704, 384)),   # 9:16 portrait
    ((1280, 720), (704, 384)),
    ((1080, 1920), (384, 704)),   # 16:9 landscape
    ((1024, 1024), (512, 512)),   # square
    ((512, 512), (512, 512)),
    ((900, 600), (640, 448)),     # 2:3 portrait
    ((600, 900), (448, 640)),
    ((100, 100), (128, 128)),     # smaller than the budget: padded up to multiples of 64, as officially
])
def test_size_table_for_720x400(image_hw, expected):
    assert size_for_area(*image_hw, "720*400") == expected
    assert size_for_area(*image_hw, 720 * 400) == expected


def test_sizes_are_multiples_of_divisor_within_area():
    for h, w in [(777, 333), (333, 777), (4000, 3000), (1234, 4321)]:
        for area in ("704*384", "1024*704", "384*256"):
            out_h, out_w = size_for_area(h, w, area)
            assert out_h % 64 == 0 and out_w % 64 == 0
            a, b = (int(v) for v in area.split("*"))
            assert out_h * out_w <= a * b


def test_preprocess_pads_black_bars_when_the_resize_is_too_short():
    # 1080x1920 (w x h) -> shorter side 384 -> 384 x 682 -> center crop to 704 rows pads 11 + 11 rows with zeros.
    white = Image.new("RGB", (1080, 1920), (255, 255, 255))
    x = preprocess_reference(white, 704, 384)
    assert x.shape == (3, 1, 704, 384) and x.dtype == np.float32
    assert np.all(x[:, :, :11] == -1) and np.all(x[:, :, 693:] == -1)
    assert np.all(x[:, :, 11:693] == 1)


def test_preprocess_matches_resize_then_center_crop():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)       # h=300, w=200
    x = preprocess_reference(pixels, 256, 192)
    # Resize(192): 200x300 -> 192 x int(192 * 300 / 200) = 192 x 288; crop rows round((288 - 256) / 2) = 16.
    resized = np.asarray(Image.fromarray(pixels).resize((192, 288), Image.BILINEAR), np.float32)
    expected = (resized[16:272] / 255 * 2 - 1).transpose(2, 0, 1)[:, None]
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert x.min() >= -1 and x.max() <= 1


def test_center_crop_offset_rounds_half_to_even():
    # 64 x 69 (w x h) at (64, 64): offset (69 - 64) / 2 = 2.5 -> 2 (Python round, as torchvision).
    pixels = np.repeat(np.arange(69, dtype=np.uint8)[:, None, None], 64, axis=1).repeat(3, axis=2)
    x = preprocess_reference(pixels, 64, 64)
    assert round((x[0, 0, 0, 0] + 1) / 2 * 255) == 2


def test_load_reference_image(tmp_path):
    path = tmp_path / "portrait.png"
    Image.new("RGB", (540, 960), (10, 200, 30)).save(path)
    x, (h, w) = load_reference_image(path, "720*400")
    assert (h, w) == (704, 384) and x.shape == (3, 1, 704, 384)


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "directory"])
def test_bad_images_name_the_file(tmp_path, case):
    path = tmp_path / f"{case}.png"
    if case == "text":
        path.write_text("not an image at all")
    elif case == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif case == "directory":
        path.mkdir()
    with pytest.raises(ImageError, match=str(path)) as info:
        load_image(path)
    assert isinstance(info.value, ValueError)
