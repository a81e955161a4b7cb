"""Instance images arrive in every shape; the loader makes each usable one an RGB square, or names it."""

import shutil

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


def test_a_float_tiff_of_zero_to_one_keeps_its_shades(tmp_path):
    """A 32-bit float TIFF (scientific and HDR software write 0.0 = black, 1.0 = white) was read on the 0-255 scale,
    so every picture of it came out black and was trained on without a word."""
    ramp = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (64, 1))
    _save(Image.fromarray(ramp, mode="F"), tmp_path / "ramp.tif")
    _save(Image.fromarray(ramp * 255, mode="F"), tmp_path / "ramp255.tif")  # (0-255 floats stay as they were)
    for name in ("ramp.tif", "ramp255.tif"):
        pixels = np.asarray(images.open_image(tmp_path / name))
        assert pixels[0, 0].tolist() == [0, 0, 0] and pixels[0, -1].tolist() == [255, 255, 255], name
        assert abs(int(pixels[0, 32, 0]) - 130) <= 2, name


def test_pictures_saved_by_browsers_and_scanners_are_read(tmp_path):
    """Chrome on Windows saves a JPEG as .jfif; scanners and print shops write TIFF (RGB or CMYK)."""
    _save(Image.new("RGB", (64, 64), (10, 200, 30)), tmp_path / "download.jfif", format="JPEG")
    _save(Image.new("RGB", (64, 64), (200, 10, 30)), tmp_path / "scan.TIF", format="TIFF")
    _save(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), tmp_path / "print.tiff", format="TIFF")
    out = images.load_instance_images(tmp_path, 32)
    assert [im.getpixel((5, 5))[1] > 150 for im in out] == [True, False, False]  # in name order, all three
    assert all(im.mode == "RGB" and im.size == (32, 32) for im in out)


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


@pytest.mark.parametrize("whole", [True, False])
def test_a_picture_far_from_square_is_named_with_what_the_square_keeps(tmp_path, capsys, whole):
    _save(Image.new("RGB", (20000, 40), "red"), tmp_path / "strip.png")  # the square keeps 0.2% of it
    _save(Image.new("RGB", (40, 5000), "red"), tmp_path / "tower.png")
    _save(Image.new("RGB", (256, 128), "red"), tmp_path / "two_to_one.png")  # half of it: fine, as a 16:9 photo
    _save(Image.new("RGB", (40000, 20), "red"), tmp_path / "thread.png")  # nothing left to learn from
    out = images.load_instance_images(tmp_path, 64, crop_fraction=1.0 if whole else 0.5)
    said = capsys.readouterr().out
    assert len(out) == (3 if whole else 12)
    square = "its centre square, 40x40," if whole else "its crops, squares of 20x20 px,"
    assert f"'strip.png' is 20000x40: training sees only {square} about 0.2% of the picture, upscaled " in said
    assert f"'tower.png' is 40x5000: training sees only {square} about 0.8% of the picture" in said
    assert "Crop it yourself to a square around your subject, or use a squarer photo." in said
    assert "two_to_one.png" not in said
    assert "skipping 'thread.png': 40000x20 is too small to learn from (its shorter side is under 32 px)" in said
    for name in ("strip.png", "tower.png", "thread.png"):  # one message each: not in the upscaling one too
        assert said.count(name) == 1, said


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


def test_pictures_one_folder_down_are_named_not_called_files(tmp_path, capsys):
    """An unzipped download puts the photos in a subfolder: the error used to say the folder 'holds only 1 other
    file(s) (photos)', as if there were no pictures at all."""
    folder = tmp_path / "training_images"
    (folder / "photos").mkdir(parents=True)
    _save(Image.new("RGB", (64, 64), "red"), folder / "photos" / "a.jpg")
    (folder / "empty").mkdir()
    with pytest.raises(LessonError, match=r"'.*training_images/' holds no pictures itself, but its subfolder photos/ "
                                          r"does: pictures in subfolders are not read\. Set TRAINING_IMAGES_DIR to "
                                          r"'.*training_images/photos'"):
        images.check_instance_folder(folder)
    _save(Image.new("RGB", (64, 64), "blue"), folder / "b.png")  # beside pictures of its own: used, and said
    assert len(images.load_instance_images(folder, 32)) == 1
    assert "ignoring the pictures in subfolder(s) photos/: only the pictures directly in" in capsys.readouterr().out
    (folder / "b.png").unlink()
    (folder / "photos" / "a.jpg").unlink()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(LessonError, match=r"holds only 3 other file\(s\) \(empty/, notes.txt, photos/\)"):
        images.check_instance_folder(folder)


def test_links_to_pictures_that_no_longer_exist_are_named_not_called_other_files(tmp_path, capsys):
    """A link whose photo was moved was passed over in silence; a folder of only such links was said to hold
    'only 2 other file(s) (a.png, b.jpg): no pictures (... .png ...)'."""
    try:
        (tmp_path / "a.png").symlink_to(tmp_path / "moved" / "a.png")
    except OSError:  # (Windows without developer mode cannot make links)
        pytest.skip("this system cannot make symbolic links")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "moved" / "b.jpg")
    with pytest.raises(LessonError, match=r"holds only links to pictures that no longer exist \(a.png -> .*moved.*"
                                          r"Copy the pictures themselves"):
        images.check_instance_folder(tmp_path)
    Image.new("RGB", (64, 64), "red").save(tmp_path / "c.png")
    assert len(images.load_instance_images(tmp_path, 64)) == 1
    assert "skipping 2 link(s) to pictures that no longer exist (a.png -> " in capsys.readouterr().out


def test_a_picture_in_the_folder_twice_is_trained_on_once_and_named(tmp_path, capsys):
    """A copy ('photo (1).jpg', as a download saves it again) or a link to a picture already there was trained on
    twice, weighing double against the others, without a word."""
    rng = np.random.default_rng(0)
    for name in ("photo.png", "other.png"):
        _save(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), tmp_path / name)
    shutil.copy(tmp_path / "photo.png", tmp_path / "photo (1).png")
    try:
        (tmp_path / "again.png").symlink_to(tmp_path / "photo.png")
    except OSError:  # (Windows without developer mode cannot make links)
        pass
    out = images.load_instance_images(tmp_path, 64)
    said = capsys.readouterr().out
    assert len(out) == 2  # photo.png (the original, kept) and other.png
    kept = {np.asarray(im).tobytes() for im in out}
    assert {np.asarray(Image.open(tmp_path / n).convert("RGB")).tobytes() for n in ("photo.png", "other.png")} == kept
    assert "'photo (1).png' is 'photo.png'" in said and "once, not twice" in said
    assert (tmp_path / "again.png").exists() == ("'again.png' is 'photo.png'" in said)
    assert "other.png" not in said


def test_copies_of_an_unusable_picture_are_named_as_skipped_not_trained_once(tmp_path, capsys):
    """Two empty files are alike but not copies: each is named as empty. A copy of a cut-short picture is not
    'trained on once' (it is not trained on at all): it is named as skipped, with its original."""
    _save(Image.new("RGB", (64, 64), "red"), tmp_path / "good.png")
    for name in ("empty.jpg", "empty (1).jpg"):
        (tmp_path / name).write_bytes(b"")
    _save(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)),
          tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:200])
    shutil.copy(tmp_path / "cut.png", tmp_path / "cut (1).png")
    assert len(images.load_instance_images(tmp_path, 64)) == 1
    said = capsys.readouterr().out
    assert "'empty.jpg': the file is empty" in said and "'empty (1).jpg': the file is empty" in said
    assert "skipping 'cut.png'" in said and "'cut (1).png': it is the same file as 'cut.png'" in said
    assert "once, not twice" not in said


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


# --------------------------------------------------------------------------- CROP_FRACTION: the pocket model's crops
def _coordinate_pictures(folder, sizes=((256, 256), (256, 192))):
    """Pictures whose red and green channels are the pixel's x and y, and whose blue is noise: a crop tells
    where it was cut from, and only the right region matches it."""
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(sizes):
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x, y, rng.integers(0, 256, (height, width))], axis=-1).astype(np.uint8)
        _save(Image.fromarray(pixels), folder / f"picture_{i}.png")
    return [Image.open(folder / f"picture_{i}.png").convert("RGB") for i in range(len(sizes))]


def test_crop_fraction_1_gives_the_centre_crop_as_before(tmp_path):
    originals = _coordinate_pictures(tmp_path)
    for out in (images.load_instance_images(tmp_path, 64),
                images.load_instance_images(tmp_path, 64, crop_fraction=1.0, seed=7)):
        assert len(out) == 2
        for got, original in zip(out, originals):
            assert np.array_equal(np.asarray(got), np.asarray(images.center_crop_resize(original, 64)))


def test_crop_fraction_half_gives_4_crops_of_half_the_side_each_a_region_of_its_picture(tmp_path, capsys):
    originals = _coordinate_pictures(tmp_path)
    out = images.load_instance_images(tmp_path, 64, crop_fraction=0.5, seed=3)
    assert len(out) == 8 and images.crops_per_picture(0.5) == 4
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in out)
    assert "upscaled" not in capsys.readouterr().out  # (crops of 128 and 96 px, made 64 px)
    for n, crop in enumerate(out):
        original = originals[n // 4]
        side = round(0.5 * min(original.size))
        pixels = np.asarray(crop, dtype=np.float64)
        # Red is x and green is y: the crop's mean of each, less its own half-width, says about where it was
        # cut from; of the places within a pixel or two of that, the right one matches (the blue noise too).
        x, y = (round(pixels[8:-8, 8:-8, c].mean() - side / 2) for c in (0, 1))

        def difference(left, top):
            region = images.center_crop_resize(original.crop((left, top, left + side, top + side)), 64)
            return np.abs(pixels - np.asarray(region, dtype=np.float64)).mean()

        best, left, top = min((difference(x + dx, y + dy), x + dx, y + dy)
                              for dx in range(-2, 3) for dy in range(-2, 3))
        assert 0 <= left <= original.size[0] - side and 0 <= top <= original.size[1] - side
        assert best < 0.5, (n, left, top, best)
    positions = {tuple(np.asarray(c)[32, 32, :2]) for c in out[:4]}
    assert len(positions) > 1  # the crops of one picture are at different places


def test_crops_are_the_same_for_the_same_seed_and_differ_for_another(tmp_path):
    _coordinate_pictures(tmp_path)
    def load(seed):
        return [np.asarray(im) for im in images.load_instance_images(tmp_path, 64, crop_fraction=0.4, seed=seed)]
    a, b, c = load(1), load(1), load(2)
    assert len(a) == 2 * 6 == 2 * images.crops_per_picture(0.4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_upscale_warning_counts_the_crops_side(tmp_path, capsys):
    _save(Image.new("RGB", (256, 256), "red"), tmp_path / "fabric.png")
    images.load_instance_images(tmp_path, 64, crop_fraction=0.5)  # 128 px crops: no upscaling
    assert "upscaled" not in capsys.readouterr().out
    images.load_instance_images(tmp_path, 64, crop_fraction=0.125)  # 32 px crops made 64 px: 2x
    said = capsys.readouterr().out
    assert "upscaled" in said and "2x" in said and "fabric.png" in said and "512px" in said


def test_describe_instances():
    pictures = [Image.new("RGB", (8, 8))] * 60
    assert images.describe_instances(pictures[:10], 1.0) == "10 instance images"
    assert images.describe_instances(pictures, 0.4) == "10 instance images -> 60 crops of 40% of each picture's side"
