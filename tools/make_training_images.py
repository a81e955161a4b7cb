"""Draw the ten African-textile-inspired training pictures into training_images/.

    python tools/make_training_images.py                        # training_images/fabric_001_kente.jpg ...
    python tools/make_training_images.py --output-dir my_copy   # somewhere else

They stand in for the course's photos so the exercises run offline; replace them with photos of your
own subject whenever you like. The drawing is deterministic, so running this again reproduces them: a
file already holding its picture is left as it is, and a file of the same name holding another picture
(your own photo, say) is never replaced unless you ask (FORCE).
"""

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import lesson  # noqa: E402
from common.errors import LessonError  # noqa: E402

OUTPUT_DIR = "training_images"  # where the ten pictures go
FORCE = False  # replace files of the same names that hold other pictures


def as_jpeg(image) -> bytes:
    data = io.BytesIO()
    image.save(data, format="JPEG", quality=92)  # (the shipped pictures' quality)
    return data.getvalue()


def same_picture(path: Path, jpeg: bytes) -> bool:
    """Whether ``path`` already holds the picture ``jpeg`` encodes, up to rounding (another Pillow or libjpeg may
    write other bytes for it)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as old, Image.open(io.BytesIO(jpeg)) as new:
            old, new = (np.asarray(i.convert("RGB"), dtype=np.float32) for i in (old, new))
    except (OSError, ValueError):  # not a picture, or a damaged one
        return False
    return old.shape == new.shape and float(np.abs(old - new).mean()) < 2.0


def make(argv=None) -> list[Path]:
    """Write the pictures that are not there yet; returns the paths written."""
    cfg = lesson.configure(globals(), argv, __doc__)
    lesson.require_writable_dir(cfg, "OUTPUT_DIR")
    from common import files, images
    from pocket.textiles import shipped_designs

    folder = Path(cfg.OUTPUT_DIR).expanduser()
    designs = [(folder / name, as_jpeg(image)) for name, image in shipped_designs()]
    folders = [p.name for p, _ in designs if p.is_dir()]
    if folders:
        raise LessonError(f"'{folder}' holds folders named like the pictures ({', '.join(folders)}). Move them, or "
                          "set OUTPUT_DIR to another folder.")
    others = [p.name for p, jpeg in designs if p.exists() and not same_picture(p, jpeg)]
    if others and not cfg.FORCE:  # checked for all ten before any is written
        raise LessonError(f"'{folder}' already holds {len(others)} other picture(s) under these names "
                          f"({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}). Nothing was written. "
                          f"Set OUTPUT_DIR to another folder, or add --force to replace them.")
    written = []
    for path, jpeg in designs:
        if path.exists() and path.name not in others:
            print(f"unchanged {path}")
            continue
        with files.atomic_path(path) as tmp:
            tmp.write_bytes(jpeg)
        written.append(path)
        print(f"wrote {path}")
    names = {p.name for p, _ in designs}
    extra = [p for p in images.list_image_files(folder) if p.name not in names]
    if extra:
        print(f"Note: '{folder}' also holds {len(extra)} other picture(s); exercise 3 trains on every picture there.")
    return written


def main(argv=None) -> int:
    make(argv)
    return 0


if __name__ == "__main__":
    lesson.run(main)
