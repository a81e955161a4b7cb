"""Draw the ten African-textile-inspired training pictures into training_images/.

    python tools/make_training_images.py            # writes training_images/fabric_001_kente.jpg ...

They stand in for the course's photos so the exercises run offline; replace them with photos of your
own subject whenever you like. The drawing is deterministic, so running this again reproduces them.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.files import save_image  # noqa: E402
from pocket.textiles import shipped_designs  # noqa: E402


def main(folder: str = "training_images") -> None:
    for name, image in shipped_designs():
        path = save_image(image, Path(folder) / name, quality=92)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(*sys.argv[1:])
