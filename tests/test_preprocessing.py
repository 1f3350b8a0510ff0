"""The Pillow/numpy preprocessing the ONNX runtime runs without torch computes what the libraries' transforms do."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from helpers import fashion_images
from imgsearch.encoders.preprocessing import ResizeCrop, from_transforms
from imgsearch.images import load_image


@pytest.fixture(scope="module")
def images(photos) -> list[Image.Image]:
    """Real photos of several shapes, shrunk and enlarged: landscape, portrait, square, 28 px product shots."""
    chosen = [photos["chelsea"], photos["coffee"], photos["astronaut"], photos["rocket"], photos["coins"]]
    chosen.append(photos["chelsea"].transpose(Image.Transpose.ROTATE_90))  # portrait
    chosen.append(photos["coffee"].resize((171, 333)))
    return chosen + [load_image(path) for path in fashion_images(1)[:3]]


def _max_difference(spec: ResizeCrop, transform, images) -> float:
    return max(float(np.abs(spec(image) - transform(image).numpy()).max()) for image in images)


def test_torchvision_weights_transforms_match(images):
    import torchvision

    transform = torchvision.models.get_model_weights("resnet50").DEFAULT.transforms(antialias=True)  # bilinear tensors
    spec = from_transforms(transform)
    assert spec == ResizeCrop(232, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", "bilinear")
    assert _max_difference(spec, transform, images) <= 1e-5


def test_timm_transforms_match(images):
    from timm.data import create_transform

    transform = create_transform(input_size=(3, 240, 240), interpolation="bicubic", crop_pct=0.875, mean=(0.5,) * 3, std=(0.5,) * 3)
    spec = from_transforms(transform)
    assert spec is not None and (spec.resize, spec.crop, spec.shrink) == (274, 240, "bicubic")
    assert _max_difference(spec, transform, images) <= 1e-5


def test_open_clip_transforms_match(images):
    import open_clip

    transform = open_clip.image_transform(224, is_train=False)
    spec = from_transforms(transform)
    assert spec is not None and (spec.resize, spec.crop, spec.shrink) == (224, 224, "bicubic")
    assert _max_difference(spec, transform, images) <= 1e-5


def test_torch_resizes_that_pillow_does_not_reproduce_keep_their_torch_preprocessing():
    """torchvision's uint8 bicubic tensor resize differs from Pillow's by up to 2 levels: no numpy equivalent."""
    import torch
    import torchvision
    from torchvision.transforms import v2

    bicubic_tensors = v2.Compose(
        [v2.ToImage(), v2.Resize(224, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(224),
         v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    )
    assert from_transforms(bicubic_tensors) is None
    vit = torchvision.models.get_model_weights("vit_b_16").DEFAULT.transforms()  # bilinear, but check the rule
    assert (from_transforms(vit) is None) == (vit.interpolation != v2.InterpolationMode.BILINEAR)


def test_lite0_preprocessing_is_scaled_to_plus_minus_one_and_picklable(images):
    import pickle

    from imgsearch.encoders.lite import lite_preprocess

    spec = lite_preprocess()
    for image in images:
        values = spec(image)
        assert values.shape == (3, 224, 224) and values.dtype == np.float32 and -1.0 <= values.min() and values.max() <= 1.0
    assert pickle.loads(pickle.dumps(spec)) == spec and ResizeCrop.from_dict(spec.to_dict()) == spec
