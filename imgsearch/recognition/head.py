"""Classifier heads for a closed label set: a linear probe on stored vectors, or a fine-tuned backbone; training
them on a collection, and recognising with them.

A head is saved as PATH.safetensors (weights) plus PATH.json (labels, encoder, dim, mode, collection,
metrics), and refuses to run for another encoder or collection.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from imgsearch import storage
from imgsearch.config import DEFAULT_MAX_PIXELS, HEAD_EPOCHS, HEAD_STAGES, HeadMode
from imgsearch.datasets import FileImage
from imgsearch.encoders import Encoder, canonical_model_name, load_torch_encoder
from imgsearch.encoders.torch_encoder import TorchEncoder, backbone_stages
from imgsearch.errors import ImgsearchError, UsageError
from imgsearch.images import decode_in_batches
from imgsearch.ingest.catalog import as_location
from imgsearch.recognition.abstention import Abstention
from imgsearch.recognition.knn import NoReferencesError, Recognition
from imgsearch.recognition.scoring import ACCEPTED_ACCURACY, least_for_accuracy
from imgsearch.session import open_existing_store
from imgsearch.store import LABELED, MilvusStore

log = logging.getLogger(__name__)

HEAD_FORMAT = "1"


class HeadError(ImgsearchError):
    """A head file is missing, unreadable, or made for another encoder or collection."""


@dataclass
class HeadInfo:
    labels: list[str]
    encoder: str
    dim: int
    mode: str
    collection: str
    metrics: dict[str, Any] = field(default_factory=dict)
    format: str = HEAD_FORMAT


@dataclass
class TrainedHead:
    info: HeadInfo
    state: dict[str, torch.Tensor]  # linear: weight/bias; finetune: the whole backbone and classifier

    def save(self, path: Path) -> tuple[Path, Path]:
        from safetensors.torch import save_file

        weights_path, info_path = head_paths(path)
        weights_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.state.items()}, str(weights_path))
        info_path.write_text(json.dumps(asdict(self.info), indent=2) + "\n", encoding="utf-8")
        return weights_path, info_path


def default_head_path(collection: str, mode: HeadMode | str) -> Path:
    return Path("heads") / f"{collection}-{HeadMode(mode).value}"


def head_paths(path: Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def load_head(path: Path, *, encoder_name: str, collection: str) -> TrainedHead:
    from safetensors.torch import load_file

    weights_path, info_path = head_paths(path)
    if not weights_path.is_file() or not info_path.is_file():
        raise HeadError(f"no head at {path}: expected {weights_path.name} and {info_path.name}; run `imgsearch train-head`")
    try:
        info = HeadInfo(**json.loads(info_path.read_text(encoding="utf-8")))
        state = load_file(str(weights_path))
    except (ValueError, TypeError, OSError) as error:
        raise HeadError(f"cannot read head {path}: {error}") from None
    if info.encoder != encoder_name:
        raise HeadError(
            f"head {info_path} was trained for encoder {info.encoder}, not {encoder_name}; use --model {info.encoder} "
            "or train a head for this model"
        )
    if info.collection != collection:
        raise HeadError(
            f"head {info_path} was trained on collection {info.collection}, not {collection}; "
            f"use --collection {info.collection} or train a head on this collection"
        )
    return TrainedHead(info=info, state=state)


# --- linear probe on stored vectors --------------------------------------------------------------
def train_linear(
    vectors: np.ndarray,
    labels: Sequence[str],
    *,
    epochs: int = HEAD_EPOCHS[HeadMode.linear],
    validation_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """Softmax regression, full batch with AdamW; keeps the weights with the best validation accuracy."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise HeadError(f"a head needs at least 2 labels, found {len(classes)}")
    targets = torch.tensor([classes.index(label) for label in labels])
    features = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
    train_index, validation_index = stratified_split(targets.numpy(), validation_fraction, seed)
    torch.manual_seed(seed)
    layer = torch.nn.Linear(features.shape[1], len(classes))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=1e-4)
    # Unit vectors give tiny logits; a fixed scale lets the softmax get sharp without huge weights.
    scale = 16.0
    best = (-1.0, copy.deepcopy(layer.state_dict()))
    started = time.perf_counter()
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(features[train_index] * scale), targets[train_index])
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            check = validation_index if len(validation_index) else train_index
            accuracy = (layer(features[check] * scale).argmax(1) == targets[check]).float().mean().item()
        if accuracy > best[0]:
            best = (accuracy, copy.deepcopy(layer.state_dict()))
    state = {"weight": best[1]["weight"] * scale, "bias": best[1]["bias"]}
    held = torch.as_tensor(validation_index, dtype=torch.long)
    metrics = {
        "validation_accuracy": round(best[0], 4),
        **head_threshold(linear_probabilities(state, features[held].numpy()), targets[held].numpy()),
        "train_images": len(train_index),
        "validation_images": len(validation_index),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return state, classes, metrics


def linear_probabilities(state: dict[str, torch.Tensor], vectors: np.ndarray) -> np.ndarray:
    logits = torch.as_tensor(np.asarray(vectors, dtype=np.float32)) @ state["weight"].T + state["bias"]
    return logits.softmax(dim=1).numpy()


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out `fraction` of each class (at least one image when a class has two or more)."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for target in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == target))
        count = int(round(len(members) * fraction)) if fraction > 0 else 0
        if fraction > 0 and len(members) >= 2:
            count = max(1, count)
        held.extend(members[:count])
        train.extend(members[count:])
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(held), dtype=np.int64)


# --- fine-tuning the backbone ------------------------------------------------------------------
class FinetuneModel(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, dim: int, classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = torch.nn.Linear(dim, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(images).float().flatten(1))


def unfreeze_last_stages(backbone: torch.nn.Module, stages: int) -> int:
    """Freeze everything, then unfreeze the last `stages` stages that have parameters; returns trainable count."""
    for parameter in backbone.parameters():
        parameter.requires_grad = False
    with_parameters = [stage for stage in backbone_stages(backbone) if any(True for _ in stage.parameters())]
    for stage in with_parameters[len(with_parameters) - stages :] if stages > 0 else []:
        for parameter in stage.parameters():
            parameter.requires_grad = True
    return sum(parameter.numel() for parameter in backbone.parameters() if parameter.requires_grad)


def augmentation(encoder: Encoder) -> T.Compose:
    """Random resized crop, flip, small rotation and colour jitter, then the encoder's own normalisation."""
    spec = getattr(encoder, "spec", None)  # the numpy preprocessing, when the encoder has one
    if spec is not None:
        normalize = T.Normalize(mean=list(spec.mean), std=list(spec.std))
    else:
        normalize = next(t for t in getattr(encoder.preprocess, "transforms", []) if isinstance(t, T.Normalize))
    size = encoder.input_size
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, scale=(0.6, 1.0), interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomRotation(10, interpolation=T.InterpolationMode.BILINEAR),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            T.ToDtype(torch.float32, scale=True),
            normalize,
        ]
    )


ImageSource = Callable[[], Image.Image]  # loads one image when called (a file, or an array in memory)


class LabeledImages(Dataset):
    def __init__(self, sources: Sequence[ImageSource], targets: Sequence[int], transform: Callable) -> None:
        self.sources = sources
        self.targets = targets
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.sources[index]()), int(self.targets[index])


@dataclass
class FinetuneRun:
    """What one fine-tuning run trains: the model on its device (its last stages unfrozen), the two splits, and the
    optimiser with its schedule."""

    encoder: TorchEncoder
    model: FinetuneModel
    trainable: int  # parameters
    train: DataLoader
    validation: DataLoader
    validation_images: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def train_finetune(
    encoder_name: str,
    sources: Sequence[ImageSource],
    labels: Sequence[str],
    *,
    weights: Path | None = None,
    device: str = "auto",
    epochs: int = HEAD_EPOCHS[HeadMode.finetune],
    stages: int = HEAD_STAGES,
    batch_size: int | None = None,
    learning_rate: float = 1e-3,
    validation_fraction: float = 0.1,
    patience: int = 2,
    workers: int = 0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str], dict[str, Any]]:
    """Fine-tune the last `stages` backbone stages and a new final layer from labeled images, with augmentation,
    early stopping on a held-out split, and CUDA autocast when a GPU is present."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise HeadError(f"a head needs at least 2 labels, found {len(classes)}")
    encoder = load_torch_encoder(encoder_name, weights=weights, device=device)  # before the seed: building it draws
    targets = np.array([classes.index(label) for label in labels])
    train_index, validation_index = stratified_split(targets, validation_fraction, seed)
    torch.manual_seed(seed)
    run = _prepare_finetune(
        encoder, sources, targets, train_index, validation_index,
        classes=len(classes), stages=stages, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, workers=workers,
    )
    started = time.perf_counter()
    best_accuracy, best_state, history = _train_epochs(run, epochs=epochs, patience=patience, progress=progress)
    if best_state is not None:
        run.model.load_state_dict(best_state)
    if len(validation_index):
        probabilities, truth = _probabilities(run.model, run.validation, run.encoder)
    else:
        probabilities, truth = np.zeros((0, len(classes))), np.zeros(0)
    metrics = {
        "validation_accuracy": round(best_accuracy, 4),
        **head_threshold(probabilities, truth),
        "epochs_run": len(history),
        "history": history,
        "trainable_parameters": run.trainable,
        "stages": stages,
        "device": str(run.encoder.device),
        "train_images": len(train_index),
        "validation_images": len(validation_index),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return best_state or run.model.state_dict(), classes, metrics


def _prepare_finetune(
    encoder: TorchEncoder, sources: Sequence[ImageSource], targets: np.ndarray, train_index: np.ndarray, validation_index: np.ndarray,
    *, classes: int, stages: int, epochs: int, batch_size: int | None, learning_rate: float, workers: int,
) -> FinetuneRun:
    model = FinetuneModel(encoder.module, encoder.dim, classes).to(encoder.device)
    trainable = unfreeze_last_stages(model.backbone, stages)
    on_cuda = encoder.device.type == "cuda"
    batch_size = batch_size or (256 if on_cuda else 32)
    loader_options = {"num_workers": workers, "pin_memory": on_cuda, "persistent_workers": workers > 0}
    train = DataLoader(
        LabeledImages([sources[i] for i in train_index], targets[train_index], augmentation(encoder)),
        batch_size=batch_size, shuffle=True, drop_last=len(train_index) > batch_size, **loader_options,
    )
    validation = DataLoader(
        LabeledImages([sources[i] for i in validation_index], targets[validation_index], encoder.preprocess),
        batch_size=batch_size, **loader_options,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=max(1, epochs * len(train)), pct_start=0.15
    )
    return FinetuneRun(encoder, model, trainable, train, validation, len(validation_index), optimizer, scheduler)


def _train_epochs(
    run: FinetuneRun, *, epochs: int, patience: int, progress: Callable[[str], None] | None
) -> tuple[float, dict[str, torch.Tensor] | None, list[dict[str, Any]]]:
    """Train until `epochs` or `patience` epochs without a better validation accuracy; the best accuracy, its
    weights (None if nothing was validated) and each epoch's loss and accuracy."""
    model, encoder = run.model, run.encoder
    best_accuracy, best_state, stale, history = -1.0, None, 0, []
    for epoch in range(1, epochs + 1):
        model.train()
        _freeze_batchnorm_of_frozen(model.backbone)
        loss = _train_one_epoch(run)
        accuracy = _accuracy(model, run.validation, encoder) if run.validation_images else float("nan")
        history.append({"epoch": epoch, "loss": round(loss, 4), "validation_accuracy": round(accuracy, 4)})
        if progress:
            progress(f"epoch {epoch}/{epochs}: loss {history[-1]['loss']}, validation accuracy {accuracy:.4f}")
        if not run.validation_images or accuracy > best_accuracy:
            best_accuracy, best_state, stale = accuracy, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    return best_accuracy, best_state, history


def _train_one_epoch(run: FinetuneRun) -> float:
    """One pass over the training split; the mean loss."""
    seen, loss_sum = 0, 0.0
    for images, batch_targets in run.train:
        images = images.to(run.encoder.device, non_blocking=True)
        batch_targets = batch_targets.to(run.encoder.device, non_blocking=True)
        with run.encoder.autocast():
            loss = F.cross_entropy(run.model(images), batch_targets, label_smoothing=0.1)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        loss_sum += loss.detach() * len(images)  # a tensor: no device sync per step
        seen += len(images)
    return float(loss_sum) / max(seen, 1)


def _freeze_batchnorm_of_frozen(backbone: torch.nn.Module) -> None:
    """Frozen stages keep their ImageNet batch statistics."""
    for module in backbone.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
            parameter.requires_grad for parameter in module.parameters()
        ):
            module.eval()


@torch.inference_mode()
def _probabilities(model: torch.nn.Module, loader: DataLoader, encoder: TorchEncoder) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probabilities, truth = [], []
    for images, targets in loader:
        with encoder.autocast():
            logits = model(images.to(encoder.device, non_blocking=True))
        probabilities.append(logits.float().softmax(1).cpu().numpy())
        truth.append(targets.numpy())
    return np.concatenate(probabilities), np.concatenate(truth)


def head_threshold(probabilities: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """The head's own abstention threshold, on its softmax scale, from its validation answers: the least top
    probability at which the accepted answers are right ACCEPTED_ACCURACY of the time (rejecting at most a quarter),
    and at least the 5th percentile of the right answers' probability, so an unfamiliar input can still be
    "unknown" when validation was all right. None without a validation split."""
    if len(probabilities) == 0:
        return {"threshold": None}
    confidence = probabilities.max(axis=1)
    right = probabilities.argmax(axis=1) == truth
    floor = float(np.quantile(confidence[right], 0.05)) if right.any() else 0.0
    return {
        "threshold": round(max(least_for_accuracy(confidence, right), floor), 6),
        "threshold_rule": f"validation: accepted answers right >= {ACCEPTED_ACCURACY}, at least the 5th percentile of right ones",
    }


@torch.inference_mode()
def _accuracy(model: torch.nn.Module, loader: DataLoader, encoder: TorchEncoder) -> float:
    model.eval()
    correct, total = torch.zeros((), device=encoder.device), 0
    for images, targets in loader:
        with encoder.autocast():
            logits = model(images.to(encoder.device, non_blocking=True))
        correct += (logits.argmax(1) == targets.to(encoder.device)).sum()
        total += len(targets)
    return float(correct) / max(total, 1)


class FinetunedClassifier:
    """A fine-tuned head ready to classify images (it has its own backbone)."""

    def __init__(self, head: TrainedHead, *, weights: Path | None = None, device: str = "auto") -> None:
        encoder = load_torch_encoder(head.info.encoder, weights=weights, device=device)
        self.encoder = encoder
        self.model = FinetuneModel(encoder.module, encoder.dim, len(head.info.labels))
        self.model.load_state_dict(head.state)
        self.model.to(encoder.device).eval()
        self.labels = head.info.labels

    @torch.inference_mode()
    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        batch = torch.stack([self.encoder.preprocess(image) for image in images]).to(self.encoder.device)
        with self.encoder.autocast():
            logits = self.model(batch)
        return logits.float().softmax(dim=1).cpu().numpy()


# --- heads on a collection ----------------------------------------------------------------------
def labeled_rows(store: MilvusStore, fields: Sequence[str]) -> list[dict]:
    rows = list(store.iter_rows(fields=fields, filter=LABELED))
    if not rows:
        raise NoReferencesError(f"collection {store.collection} has no labeled images to train on")
    return rows


def labeled_image_sources(store: MilvusStore) -> tuple[list[ImageSource], list[str]]:
    """The labeled references' image files (those that still exist) and their labels, for training from pixels."""
    rows = labeled_rows(store, ("path", "label"))
    gone = storage.missing(row["path"] for row in rows)  # objects: from one listing per prefix
    rows = [row for row in rows if row["path"] not in gone]
    if not rows:
        raise NoReferencesError(f"none of the labeled images of {store.collection} exist on disk or in their bucket any more")
    return [FileImage(as_location(row["path"])) for row in rows], [row["label"] for row in rows]


def train_head_on_store(
    store: MilvusStore,
    mode: HeadMode | str,
    *,
    epochs: int | None = None,
    stages: int = HEAD_STAGES,
    weights: Path | None = None,
    device: str = "auto",
    workers: int = 0,
    progress=None,
) -> TrainedHead:
    """linear: the stored labeled vectors, nothing re-encoded; finetune: the labeled image files."""
    mode = HeadMode(mode)
    epochs = epochs or HEAD_EPOCHS[mode]
    if mode is HeadMode.linear:
        rows = labeled_rows(store, ("vector", "label"))
        vectors = np.array([row["vector"] for row in rows], dtype=np.float32)
        state, labels, metrics = train_linear(vectors, [row["label"] for row in rows], epochs=epochs)
    else:
        sources, labels = labeled_image_sources(store)
        state, labels, metrics = train_finetune(
            store.model, sources, labels, weights=weights, device=device,
            epochs=epochs, stages=stages, workers=workers, progress=progress,
        )
    return TrainedHead(HeadInfo(labels, store.model, store.dim, mode.value, store.collection, metrics), state)


def train_head_for(
    settings, mode: HeadMode | str, *, epochs: int | None = None, stages: int = HEAD_STAGES, out: Path | None = None, progress=None
) -> tuple[TrainedHead, Path, Path]:
    """Train a head on the settings' collection and save it (default: heads/<collection>-<mode>); a model given
    in the settings must be the collection's. Returns the head and its two files."""
    mode = HeadMode(mode)
    with open_existing_store(settings) as store:
        if "model" in settings.model_fields_set and store.model != canonical_model_name(settings.model):
            raise UsageError(f"collection {settings.collection_name} holds model {store.model}, not {settings.model}")
        head = train_head_on_store(
            store, mode, epochs=epochs, stages=stages, weights=settings.weights, device=settings.device,
            workers=settings.workers or 0, progress=progress,
        )
    weights_path, info_path = head.save(out or default_head_path(settings.collection_name, mode))
    return head, weights_path, info_path


def recognize_paths_with_head(
    encoder: Encoder,
    store: MilvusStore,
    head_path: Path,
    paths: Iterable[str | Path],
    *,
    threshold: float | None = None,
    weights: Path | None = None,
    device: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[list[Recognition], list[dict[str, str]], Abstention]:
    """Classify with a trained head; confidence is the softmax probability, so the threshold is the head's own
    (calibrated on its validation split when it was trained) unless one is given. Refuses a head made for another
    encoder or collection."""
    head = load_head(head_path, encoder_name=encoder.name, collection=store.collection)
    own = head.info.metrics.get("threshold")
    if threshold is not None:
        abstention = Abstention(threshold, None, "given")
    elif isinstance(own, (int, float)):
        abstention = Abstention(float(own), None, f"the head's, calibrated on its validation split ({head_path.name})")
    else:
        abstention = Abstention(None, None, "none (a head trained before heads had thresholds: train it again)")
    classifier = FinetunedClassifier(head, weights=weights, device=device) if head.info.mode == HeadMode.finetune else None
    recognitions: list[Recognition] = []
    failed: list[dict[str, str]] = []
    for names, images in decode_in_batches(paths, min_side=encoder.input_size, max_pixels=max_pixels, failed=failed):
        if classifier is not None:
            probabilities = classifier.probabilities(images)
        else:
            probabilities = linear_probabilities(head.state, encoder.encode_images(images))
        for name, row in zip(names, probabilities):
            best = int(row.argmax())
            confidence = float(row[best])
            label = head.info.labels[best] if abstention.threshold is None or confidence >= abstention.threshold else None
            recognitions.append(Recognition(path=name, label=label, confidence=confidence, abstention=abstention.to_dict()))
    return recognitions, failed, abstention
