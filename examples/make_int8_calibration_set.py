"""Rebuild imgsearch/encoders/calibration, the images `--runtime onnx-int8` calibrates its quantisation on
(needs scikit-image and examples/catalog).

Real images of the kinds a catalog holds: 22 scikit-image photos (colour and grey; chelsea, coffee, astronaut and
rocket are left out, so tests can check the int8 vectors on photos it was not calibrated on) and 30 Fashion-MNIST
product images from the sample catalog. Photos are stored at 256 px on the shorter side, which the encoders'
224-260 px crops need no more than.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent
TARGET = HERE.parent / "imgsearch" / "encoders" / "calibration"
PHOTOS = (
    "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo", "camera", "moon", "coins", "clock",
    "brick", "grass", "gravel", "page", "text", "horse", "cell",
)
HELD_OUT = ("chelsea", "coffee", "astronaut", "rocket")  # the tests' photos


def main() -> None:
    from skimage import data

    shutil.rmtree(TARGET, ignore_errors=True)
    TARGET.mkdir(parents=True)
    photos = {name: getattr(data, name)() for name in PHOTOS}
    left, right = data.stereo_motorcycle()[:2]
    photos |= {"motorcycle_left": left, "motorcycle_right": right}
    photos |= {f"face_{n}": (face * 255).round().astype("uint8") for n, face in enumerate(data.lfw_subset()[:4])}  # floats in [0, 1]
    for name, pixels in photos.items():
        image = Image.fromarray(pixels).convert("RGB")
        scale = 256 / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        image.save(TARGET / f"{name}.jpg", quality=90)
    products = sorted(path for path in (HERE / "catalog").glob("*/*.png"))
    for path in products[1::10]:
        shutil.copy(path, TARGET / path.name)


if __name__ == "__main__":
    main()
