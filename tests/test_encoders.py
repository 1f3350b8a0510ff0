"""Real pretrained weights, the registry, and clear errors when weights are missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgsearch.encoders import load_encoder
from imgsearch.encoders.lite import lite_preprocess, load_lite_classifier
from imgsearch.errors import InvalidWeightsError, UnknownModelError, WeightsNotFoundError

pytestmark = pytest.mark.slow  # real weights


CAT_CLASSES = {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"}


def test_lite0_weights_are_real_imagenet_weights(photos):
    model = load_lite_classifier()
    with torch.inference_mode():
        logits = model(torch.from_numpy(lite_preprocess()(photos["chelsea"]))[None])
    top3 = logits.topk(3).indices[0].tolist()
    assert set(top3) & set(CAT_CLASSES), f"chelsea predicted as ImageNet classes {top3}"
    with torch.inference_mode():
        coffee = model(torch.from_numpy(lite_preprocess()(photos["coffee"]))[None]).argmax().item()
    assert coffee == 967  # espresso


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_and_lite2_load_offline_with_real_weights_in_both_runtimes(name, photos, tmp_path):
    from imgsearch.encoders.lite import MODELS

    model = load_lite_classifier(name)
    with torch.inference_mode():
        logits = model(torch.from_numpy(lite_preprocess(name)(photos["chelsea"]))[None])
    top3 = logits.topk(3).indices[0].tolist()
    assert set(top3) & set(CAT_CLASSES), f"{name}: chelsea predicted as ImageNet classes {top3}"
    onnx = load_encoder(name, device="cpu", runtime="onnx", onnx_cache=tmp_path)
    torch_encoder = load_encoder(name, device="cpu", runtime="torch")
    size = MODELS[name].input_size
    assert (onnx.name, onnx.dim, onnx.input_size, type(onnx).__name__) == (name, 1280, size, "OnnxEncoder")
    images = [photos["chelsea"], photos["coffee"]]
    fast, reference = onnx.encode_images(images), torch_encoder.encode_images(images)
    assert np.allclose(fast, reference, atol=1e-4) and fast[0] @ fast[1] < 0.5


def test_lite0_vectors_are_unit_float32(encoder, photos):
    vectors = encoder.encode_images([photos["chelsea"], photos["coffee"], photos["chelsea"]])
    assert vectors.shape == (3, 1280) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[2] > 0.9999
    assert vectors[0] @ vectors[1] < 0.5


def test_lite0_inputs_are_scaled_to_plus_minus_one(photos):
    tensor = lite_preprocess()(photos["camera"])
    assert tensor.shape == (3, 224, 224)
    assert -1.0 <= tensor.min() < -0.9 and 0.9 < tensor.max() <= 1.0


def test_lite0_missing_weights_file_says_which(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="not found"):
        load_encoder("efficientnet_lite0", weights=tmp_path / "missing.pth")


def test_lite0_wrong_weights_file_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(InvalidWeightsError, match="tensors"):
        load_encoder("efficientnet_lite0", weights=path)


def test_timm_model_loads_a_local_weights_file(tmp_path):
    """The file-loading path: weights written to disk must be exactly the ones the encoder runs with."""
    import timm

    source = timm.create_model("resnet10t", num_classes=5)
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    encoder = load_encoder("timm:resnet10t", weights=path, device="cpu")
    assert encoder.dim == source.num_features
    assert encoder.name == "timm:resnet10t"  # canonical: collections record it, and bare names are ambiguous
    loaded = encoder.module.state_dict()
    assert torch.equal(loaded["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    vectors = encoder.encode(torch.randn(2, 3, 64, 64))
    assert vectors.shape == (2, encoder.dim)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_timm_without_weights_is_a_clear_error_not_random_weights():
    with pytest.raises(WeightsNotFoundError, match="--weights"):
        load_encoder("resnet10t")


def test_torchvision_without_weights_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # The real download path runs, but against a closed loopback port: tests never leave the machine.
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(WeightsNotFoundError) as caught:
        load_encoder("resnet18")
    message = str(caught.value)
    assert "resnet18-" in message and str(tmp_path) in message


def test_torchvision_local_weights_drop_the_classifier(tmp_path):
    import torchvision

    source = torchvision.models.get_model("resnet18", weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    encoder = load_encoder("resnet18", weights=path, device="cpu")
    assert encoder.dim == 512 and encoder.name == "torchvision:resnet18"
    assert encoder.encode(torch.randn(1, 3, 224, 224)).shape == (1, 512)


def test_open_clip_needs_a_tag_or_weights():
    with pytest.raises(WeightsNotFoundError, match="random weights are never used"):
        load_encoder("open_clip:ViT-B-32")


def test_unknown_model():
    with pytest.raises(UnknownModelError, match="no_such_model"):
        load_encoder("no_such_model")


def test_text_needs_clip(encoder):
    from imgsearch.errors import TextNotSupportedError

    with pytest.raises(TextNotSupportedError):
        encoder.encode_text(["a red bag"])


def test_uint8_transfer_matches_float_preprocessing(encoder, photos):
    """On CUDA, workers send uint8 images and encode() scales and normalises them; the vectors are the same."""
    from imgsearch.encoders.torch_encoder import split_normalization

    uint8_preprocess, mean, std = split_normalization(encoder.preprocess)
    images = [photos["chelsea"], photos["coins"], photos["camera"]]
    raw = torch.stack([uint8_preprocess(image) for image in images])
    assert raw.dtype == torch.uint8 and mean == (0.5, 0.5, 0.5)
    normalised = (raw.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(normalised, torch.stack([encoder.preprocess(image) for image in images]), atol=1e-6)
    assert np.allclose(encoder.encode(raw), encoder.encode_images(images), atol=1e-5)


def test_open_clip_preprocessing_splits_the_same_way(photos):
    import open_clip

    from imgsearch.encoders.torch_encoder import split_normalization

    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    uint8_preprocess, mean, std = split_normalization(preprocess)
    raw = uint8_preprocess(photos["astronaut"])
    assert raw.dtype == torch.uint8 and raw.shape == (3, 224, 224)
    normalised = (raw.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(normalised, preprocess(photos["astronaut"]), atol=1e-6)


def test_bare_names_map_to_the_names_collections_record():
    """train-head --model resnet50 must accept the collection `ingest --model resnet50` made (it records
    torchvision:resnet50); it used to refuse it."""
    from imgsearch.encoders import canonical_model_name

    assert canonical_model_name("efficientnet_lite0") == "efficientnet_lite0"
    assert canonical_model_name("resnet50") == "torchvision:resnet50"
    assert canonical_model_name("torchvision:resnet50") == "torchvision:resnet50"
    assert canonical_model_name("convnext_atto") == "timm:convnext_atto"
    assert canonical_model_name("ViT-B-32/laion2b_s34b_b79k") == "ViT-B-32/laion2b_s34b_b79k"
