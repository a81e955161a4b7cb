"""Instance images arrive in every shape; the loader makes each usable one an RGB square, or names it."""

import numpy as np
import pytest
from PIL import Image

from common import images
from common.errors import LessonError
from conftest import SHARED_SEED, needs_shared


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_modes_and_formats_become_rgb_squares(tmp_path, capsys):
    rgb = Image.new("RGB", (80, 60), (200, 50, 10))
    _save(rgb, tmp_path / "a.JPG", format="JPEG")
    _save(Image.new("RGBA", (64, 64), (255, 0, 0, 0)), tmp_path / "b.png")  # fully transparent: white
    _save(Image.new("L", (64, 64), 128), tmp_path / "c.webp", format="WEBP")
    _save(rgb.convert("P"), tmp_path / "d.bmp", format="BMP")
    _save(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), tmp_path / "e.jpeg", format="JPEG")
    _save(Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)), tmp_path / "f.png")  # 16-bit
    out = images.load_instance_images(tmp_path, 32)
    assert len(out) == 6
    assert all(im.mode == "RGB" and im.size == (32, 32) for im in out)
    by_name = dict(zip(["a", "b", "c", "d", "e", "f"], out))
    assert by_name["b"].getpixel((5, 5)) == (255, 255, 255)  # transparency over white
    assert by_name["f"].getpixel((5, 5)) == (255, 255, 255)  # 16-bit white stays white
    assert by_name["e"].getpixel((5, 5))[0] > 200  # CMYK red -> RGB red


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (80, 40), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _save(img, tmp_path / "rot.jpg", format="JPEG", exif=exif)
    assert images.open_image(tmp_path / "rot.jpg").size == (40, 80)


def test_animated_image_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (64, 64), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    r, g, _ = images.open_image(tmp_path / "anim.gif").getpixel((10, 10))
    assert r > 200 and g < 50


def test_bad_files_are_skipped_and_named(tmp_path, capsys):
    _save(Image.new("RGB", (64, 64), "red"), tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    full = tmp_path / "full.jpg"
    _save(Image.new("RGB", (256, 256), "blue"), full, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(full.read_bytes()[:200])
    _save(Image.new("RGB", (16, 16), "red"), tmp_path / "tiny.png")
    (tmp_path / "notes.txt").write_text("hello")
    out = images.load_instance_images(tmp_path, 64)
    said = capsys.readouterr().out
    assert len(out) == 2  # good.png and full.jpg
    for name in ["empty.jpg", "text.png", "truncated.jpg", "tiny.png", "notes.txt"]:
        assert name in said, name


def test_upscaling_warns(tmp_path, capsys):
    _save(Image.new("RGB", (64, 64), "red"), tmp_path / "small.png")
    images.load_instance_images(tmp_path, 512)
    said = capsys.readouterr().out
    assert "upscaled" in said and "8x" in said and "small.png" in said


@pytest.mark.parametrize("setup", ["missing", "empty", "only_text"])
def test_no_usable_images_is_a_clear_error(tmp_path, setup):
    folder = tmp_path / "training_images"
    if setup != "missing":
        folder.mkdir()
    if setup == "only_text":
        (folder / "readme.txt").write_text("x")
        (folder / "broken.png").write_text("x")
    with pytest.raises(LessonError, match="training_images"):
        images.load_instance_images(folder, 64)


def test_non_ascii_names(tmp_path):
    _save(Image.new("RGB", (64, 64), "red"), tmp_path / "tissu_àéü_布.png")
    assert len(images.load_instance_images(tmp_path, 64)) == 1


def test_tensor_range():
    t = images.to_tensor([Image.new("RGB", (8, 8), (0, 255, 128))])
    assert t.shape == (1, 3, 8, 8)
    assert t[0, 0].min() == -1 and t[0, 1].max() == 1


def test_shipped_training_images_are_512_and_reproducible(tmp_path):
    from pocket.textiles import shipped_designs
    from conftest import ROOT

    shipped = sorted((ROOT / "training_images").glob("*.jpg"))
    assert len(shipped) == 10
    assert all(Image.open(p).size == (512, 512) for p in shipped)
    name, first = shipped_designs()[0]
    assert name == shipped[0].name
    small = [np.asarray(im.resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
             for im in (Image.open(shipped[0]), first)]
    assert np.abs(small[0] - small[1]).mean() < 3  # the same drawing, JPEG noise aside


@needs_shared
def test_course_photos_load_with_upscale_warning(capsys):
    out = images.load_instance_images(SHARED_SEED / "training_images_64px", 512)
    assert len(out) == 10
    assert "8x" in capsys.readouterr().out
