"""Every odd file is either converted to RGB or refused with a clear error, never a crash."""

import io

import numpy as np
import pytest
from helpers import bomb_png, write_zoo
from PIL import Image

from pipeline.model.errors import ImageDecodeError
from pipeline.model.imaging import load_image, to_rgb


def _jpeg(size=(40, 30), colour=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_truncated_jpeg_is_refused(tmp_path):
    data = _jpeg((64, 64))
    f = tmp_path / "cut.jpg"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="cut.jpg"):
        load_image(f)


def test_zero_byte_and_text_files_are_refused(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("this is not a photo\n")
    for name in ("empty.jpg", "notes.jpg"):
        with pytest.raises(ImageDecodeError, match="not a readable image"):
            load_image(tmp_path / name)
    with pytest.raises(ImageDecodeError, match="cannot open"):
        load_image(tmp_path / "missing.jpg")


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    f = tmp_path / "cmyk.jpg"
    f.write_bytes(_jpeg((32, 32), (0, 255, 255, 0), mode="CMYK"))  # CMYK red
    img = load_image(f)
    assert img.mode == "RGB"
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    img.paste(1, (0, 0, 10, 20))
    f = tmp_path / "pal.png"
    img.save(f, transparency=0)  # index 0 (blue) transparent
    out = np.asarray(load_image(f))
    assert out.shape == (20, 20, 3)
    assert (out[:, 15] == 255).all()  # transparent half -> white, not blue
    assert (out[:, 5] == [0, 255, 0]).all()


def test_16bit_grayscale_png_keeps_its_tones(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    f = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(f)
    assert Image.open(f).mode.startswith("I")
    out = np.asarray(load_image(f))
    assert out.shape == (8, 8, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert 100 < out[4, 0, 0] < 160  # mid-grey, not clipped to white


def test_rgba_and_grayscale_and_bytes():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba)).tolist()[0][0] == [255, 255, 255]
    assert to_rgb(Image.new("L", (4, 4), 80)).getpixel((0, 0)) == (80, 80, 80)
    img = load_image(_jpeg((50, 40)))
    assert img.mode == "RGB" and img.size == (50, 40)


def test_draft_keeps_at_least_the_requested_side(tmp_path):
    f = tmp_path / "big.jpg"
    f.write_bytes(_jpeg((800, 600)))
    img = load_image(f, min_side=128)
    assert min(img.size) >= 128 and img.size[0] < 800  # decoded at a reduced scale


def test_the_image_zoo_decodes_or_is_refused_with_the_reason(tmp_path):
    kinds = write_zoo(tmp_path)
    for name, kind in kinds.items():
        if kind == "bad":
            with pytest.raises(ImageDecodeError) as err:
                load_image(tmp_path / name)
            assert name in str(err.value)
        elif kind == "odd":
            img = load_image(tmp_path / name)
            assert img.mode == "RGB" and min(img.size) >= 80, name
    assert load_image(tmp_path / "rotated.jpg").size == (80, 96)  # EXIF applied
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(bomb_png(10_000, 9_000))  # between PIL's warning and error limits
