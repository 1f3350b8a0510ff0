"""`imgsearch adapt`: fine-tune the encoder's embedding on a collection's labeled references with a metric-learning
loss, so that recognition and search see the catalog's own distinctions (the frozen ImageNet features are the limit:
docs/recognition.md).

What trains: the last `stages` backbone stages and a projection after the pooled features (encoders/adapted_model.py),
with CosFace (a cosine softmax against one learned proxy per label, with an additive margin, on the vectors after
the power transform frozen features are scored with): it needs no pair mining and works at the small batches a CPU affords. The proxies
start at the labels' mean frozen embeddings and the projection at the identity, so training starts from the base
model's embedding. Two distillation terms hold on to what the base model knew: each image is pulled towards its own
frozen embedding (without it the labels it never saw lost a third of their 5-shot accuracy), and each pair of
same-label images towards the cosine the frozen embedding gave them (without it the margin loss makes different
products of one type look like copies of each other: near-duplicate recall halved; docs/recognition.md). The
augmentation is what catalog photos suffer: crops, flips, small rotations, light, JPEG re-encoding. A stratified
part of the references is held out: each epoch is scored by the held-out images' nearest neighbour among themselves
(the label of the most similar other held-out image), and the best epoch is kept. The card records that figure and
the separation (mean cosine within a label minus between labels) for the frozen embedding and the adapted one.
"""

from __future__ import annotations

import copy
import io
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from imgsearch.config import ADAPT_DISTILL, ADAPT_DISTILL_MAX, ADAPT_EPOCHS, ADAPT_FROZEN_SHARE, ADAPT_PAIR_DISTILL, ADAPT_STAGES
from imgsearch.encoders import canonical_model_name, load_torch_encoder
from imgsearch.encoders.adapted import AdaptedCard, adapted_paths, unused_stem
from imgsearch.encoders.adapted_model import AdaptedEmbedding, save_adapted
from imgsearch.encoders.torch_encoder import TorchEncoder
from imgsearch.errors import UsageError
from imgsearch.recognition.head import (
    HeadError,
    ImageSource,
    LabeledImages,
    _freeze_batchnorm_of_frozen,
    augmentation,
    labeled_image_sources,
    stratified_split,
    unfreeze_last_stages,
)
from imgsearch.recognition.scoring import DEFAULT_POWER, power_normalize
from imgsearch.session import open_existing_store

log = logging.getLogger(__name__)

MARGIN = 0.2  # CosFace's additive margin on the true label's cosine
SCALE = 16.0  # its logit scale
PROGRESS_SECONDS = 30.0


class RandomJpeg:
    """Re-encode as JPEG at a random quality with probability `p` (catalog photos are recompressed on the way)."""

    def __init__(self, p: float = 0.5, quality: tuple[int, int] = (30, 95)) -> None:
        self.p, self.quality = p, quality

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.p:
            return image
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=random.randint(*self.quality))
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")


def catalog_augmentation(encoder: TorchEncoder) -> T.Compose:
    return T.Compose([RandomJpeg(), *augmentation(encoder).transforms])


def signed_power(vectors: torch.Tensor, power: float = DEFAULT_POWER) -> torch.Tensor:
    """recognition/scoring.py's power_normalize before the cosine, in torch (a small floor keeps the gradient finite)."""
    return vectors if power == 1.0 else torch.sign(vectors) * (vectors.abs() + 1e-6) ** power


class CosFace(torch.nn.Module):
    """The margin loss on the power-transformed vectors (as frozen features are scored; an adapted collection is then
    scored without the transform, which did better on labels it never trained on: recognition/scoring.py)."""

    def __init__(self, proxies: torch.Tensor, margin: float = MARGIN, scale: float = SCALE, power: float = DEFAULT_POWER) -> None:
        super().__init__()
        self.proxies = torch.nn.Parameter(F.normalize(proxies.float(), dim=1))
        self.margin, self.scale, self.power = margin, scale, power

    def forward(self, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        embeddings = signed_power(F.normalize(embeddings.float(), dim=1), self.power)
        cosine = F.normalize(embeddings, dim=1) @ F.normalize(self.proxies, dim=1).T
        cosine = cosine - self.margin * F.one_hot(targets, cosine.shape[1])
        return F.cross_entropy(self.scale * cosine, targets)


@torch.inference_mode()
def embed(model: AdaptedEmbedding, loader: DataLoader, encoder: TorchEncoder, whole: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings and targets of a loader's images (no augmentation: the loader's transform is the encoder's):
    of the trained half, or with `whole` of the vector a collection stores."""
    model.eval()
    forward = model if whole else model.adapted
    vectors, targets = [], []
    for images, batch_targets in loader:
        with encoder.autocast():
            output = forward(images.to(encoder.device, non_blocking=True))
        vectors.append(F.normalize(output.float().flatten(1), dim=1).cpu().numpy())
        targets.append(batch_targets.numpy())
    return np.concatenate(vectors), np.concatenate(targets)


def embedding_figures(vectors: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Of held-out images among themselves: nearest-neighbour accuracy (each image takes the label of the most
    similar other one) and separation (mean cosine within a label minus mean cosine between labels)."""
    similarity = vectors @ vectors.T
    same = targets[:, None] == targets[None, :]
    off_diagonal = ~np.eye(len(targets), dtype=bool)
    masked = np.where(off_diagonal, similarity, -np.inf)
    nearest = targets[masked.argmax(axis=1)]
    within, between = similarity[same & off_diagonal], similarity[~same]
    return {
        "nearest_neighbour_accuracy": round(float((nearest == targets).mean()), 4),
        "separation": round(float(within.mean() - between.mean()), 4) if len(within) and len(between) else 0.0,
    }


def adapt_embedding(
    encoder_name: str,
    sources: Sequence[ImageSource],
    labels: Sequence[str],
    *,
    weights: Path | None = None,
    device: str = "auto",
    epochs: int = ADAPT_EPOCHS,
    stages: int = ADAPT_STAGES,
    batch_size: int | None = None,
    learning_rate: float = 1e-3,
    margin: float = MARGIN,
    scale: float = SCALE,
    distill: float = ADAPT_DISTILL,
    pair_distill: float = ADAPT_PAIR_DISTILL,
    frozen_share: float = ADAPT_FROZEN_SHARE,
    power: float = DEFAULT_POWER,
    validation_fraction: float = 0.1,
    patience: int = 2,
    workers: int = 0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[AdaptedEmbedding, AdaptedCard]:
    """Train the adapted embedding on labeled images; returns the module (its best epoch, with the base model's
    embedding beside it when `frozen_share` > 0) and its card (no digest until saved). Adapting an adapted embedding
    again trains it further; its frozen half stays the base model's."""
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise HeadError(f"adapting needs at least 2 labels, found {len(classes)}")
    for weight in (distill, pair_distill):
        if not 0 <= weight <= ADAPT_DISTILL_MAX:  # NaN fails both comparisons
            raise HeadError(f"a distillation weight must be between 0 and {ADAPT_DISTILL_MAX:g}, not {weight}")
    if not 0 <= frozen_share < 1:
        raise HeadError(f"the frozen share must be at least 0 and below 1, not {frozen_share}")
    base = load_torch_encoder(encoder_name, weights=weights, device=device)
    targets = np.array([classes.index(label) for label in labels])
    train_index, validation_index = stratified_split(targets, validation_fraction, seed)
    if len(validation_index) < 2 * len(classes):
        raise HeadError(f"{len(labels)} references are too few to hold some out for validation: give each label at least 10")
    torch.manual_seed(seed)
    random.seed(seed)
    on_cuda = base.device.type == "cuda"
    batch_size = batch_size or (256 if on_cuda else 32)
    loader_options = {"num_workers": workers, "pin_memory": on_cuda, "persistent_workers": workers > 0}
    train = DataLoader(
        LabeledImages([sources[i] for i in train_index], targets[train_index], catalog_augmentation(base)),
        batch_size=batch_size, shuffle=True, drop_last=len(train_index) > batch_size, **loader_options,
    )
    frozen_train = DataLoader(LabeledImages([sources[i] for i in train_index], targets[train_index], base.preprocess),
                              batch_size=batch_size, **loader_options)
    validation = DataLoader(LabeledImages([sources[i] for i in validation_index], targets[validation_index], base.preprocess),
                            batch_size=batch_size, **loader_options)

    model, frozen_backbone = _starting_embedding(base, encoder_name, stages, frozen_share)
    model = model.to(base.device)
    started = time.perf_counter()
    frozen = embedding_figures(*embed(model, validation, base))
    if progress:
        progress(f"held-out references ({len(validation_index)}), frozen embedding: nearest-neighbour accuracy "
                 f"{frozen['nearest_neighbour_accuracy']}, separation {frozen['separation']}")
    # each label's proxy starts at its mean frozen embedding: the loss starts from what the base model knows
    train_vectors, train_targets = embed(model, frozen_train, base)
    train_vectors = power_normalize(train_vectors, power)
    means = torch.stack([torch.from_numpy(train_vectors[train_targets == target].mean(axis=0)) for target in range(len(classes))])
    loss_function = CosFace(means, margin, scale, power).to(base.device)
    teacher = _frozen_copy(model) if distill > 0 or pair_distill > 0 else None
    trainable = unfreeze_last_stages(model.backbone, stages) + model.projection.weight.numel()
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in model.parameters() if p.requires_grad], "lr": learning_rate},
            {"params": loss_function.parameters(), "lr": learning_rate * 10},  # proxies move faster than the backbone
        ],
        weight_decay=0.01,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[learning_rate, learning_rate * 10], total_steps=max(1, epochs * len(train)), pct_start=0.15
    )
    best, best_state, stale, history = frozen, copy.deepcopy(model.state_dict()), 0, []
    for epoch in range(1, epochs + 1):
        loss = _train_one_epoch(model, loss_function, train, optimizer, scheduler, base, epoch, epochs, progress, teacher, distill, pair_distill)
        figures = embedding_figures(*embed(model, validation, base))
        history.append({"epoch": epoch, "loss": round(loss, 4), **figures})
        if progress:
            progress(f"epoch {epoch}/{epochs}: loss {loss:.4f}, held-out nearest-neighbour accuracy "
                     f"{figures['nearest_neighbour_accuracy']}, separation {figures['separation']}")
        if (figures["nearest_neighbour_accuracy"], figures["separation"]) > (best["nearest_neighbour_accuracy"], best["separation"]):
            best, best_state, stale = figures, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= patience:
                break
    if best is frozen:
        log.warning("no epoch did better than the starting embedding on the held-out references: it is saved unchanged")
    model.load_state_dict(best_state)
    model = model.cpu().eval()
    saved = None
    if frozen_share > 0:
        if frozen_backbone is not None:
            model.with_frozen_tail(frozen_backbone.cpu(), frozen_share, stages, DEFAULT_POWER)  # scored as the model's own vectors are
        model.frozen_share = frozen_share
        saved = embedding_figures(*embed(model, validation, base, whole=True))
    else:  # an embedding with a frozen half adapted again may be saved alone
        model.without_frozen_tail()
    counts = Counter(labels[i] for i in train_index)
    card = AdaptedCard(
        base_model=encoder_name, dim=model.output_dim, frozen_share=frozen_share, frozen_power=model.frozen_power,
        loss=loss_name(margin, scale, distill, power, pair_distill), labels={label: counts[label] for label in classes},
        epochs=epochs, epochs_run=len(history), stages=stages,
        validation={"images": len(validation_index), "frozen": frozen, "adapted": best, "best_epoch": _best_epoch(history, best),
                    **({"saved": saved} if saved else {})},
        history=history,
        training={
            "seconds": round(time.perf_counter() - started, 1), "device": str(base.device), "seed": seed, "batch_size": batch_size,
            "learning_rate": learning_rate, "train_images": len(train_index), "trainable_parameters": trainable,
        },
    )
    return model, card


def _starting_embedding(base: TorchEncoder, encoder_name: str, stages: int, frozen_share: float):
    """(the module to train, the backbone whose last stages make the frozen half, or None when the module has them)."""
    if not isinstance(base.module, AdaptedEmbedding):
        return AdaptedEmbedding(base.module, base.dim, base.dim), copy.deepcopy(base.module) if frozen_share > 0 else None
    model = base.module
    if model.frozen_share:
        if stages != model.stages:
            raise HeadError(f"this adapted embedding trained its last {model.stages} stages: adapt it again with --stages "
                            f"{model.stages}, or adapt the base model")
        return model, None
    # an adapted embedding saved alone: the frozen half comes from the model's own weights
    return model, load_torch_encoder(encoder_name, device="cpu").module if frozen_share > 0 else None


def _best_epoch(history: list[dict[str, Any]], best: dict[str, float]) -> int:
    """0 when no epoch beat the frozen embedding."""
    return next((row["epoch"] for row in history if all(row[key] == value for key, value in best.items())), 0)


def loss_name(margin: float, scale: float, distill: float, power: float, pair_distill: float = 0.0) -> str:
    name = f"cosface(margin={margin}, scale={scale}, power={power})"
    if distill > 0:
        name += f" + {distill} * (1 - cosine to the frozen embedding)"
    if pair_distill > 0:
        name += f" + {pair_distill} * (same-label pair cosine - its frozen cosine)^2"
    return name


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The starting embedding, kept to pull each image's adapted embedding towards its own frozen one."""
    teacher = copy.deepcopy(model).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def pair_drift(embeddings: torch.Tensor, anchors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared change, adapted against frozen, of the cosine of each pair of same-label images in the batch."""
    adapted, frozen = F.normalize(embeddings.float(), dim=1), F.normalize(anchors.float(), dim=1)
    pairs = (targets[:, None] == targets[None, :]) & ~torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    if not pairs.any():
        return adapted.new_zeros(())
    return ((adapted @ adapted.T - frozen @ frozen.T)[pairs] ** 2).mean()


def _train_one_epoch(model, loss_function, loader, optimizer, scheduler, encoder, epoch, epochs, progress, teacher=None, distill=0.0,
                     pair_distill=0.0) -> float:
    model.train()
    _freeze_batchnorm_of_frozen(model.backbone)
    seen, loss_sum, said = 0, 0.0, time.monotonic()
    for images, targets in loader:
        images = images.to(encoder.device, non_blocking=True)
        targets = targets.to(encoder.device, non_blocking=True)
        with encoder.autocast():
            embeddings = model.adapted(images)
            loss = loss_function(embeddings, targets)
            if teacher is not None:
                with torch.no_grad():
                    anchors = teacher.adapted(images)
                loss = loss + distill * (1 - F.cosine_similarity(embeddings.float(), anchors.float(), dim=1)).mean()
                if pair_distill > 0:
                    loss = loss + pair_distill * pair_drift(embeddings, anchors, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(images)
        seen += len(images)
        if progress and time.monotonic() - said >= PROGRESS_SECONDS:
            said = time.monotonic()
            progress(f"epoch {epoch}/{epochs}: {seen:,} of {len(loader.dataset):,} images, loss {loss_sum / seen:.4f}")
    return loss_sum / max(seen, 1)


def default_adapted_path(collection: str) -> Path:
    return Path("adapted") / collection


def adapt_collection(
    settings, *, epochs: int = ADAPT_EPOCHS, stages: int = ADAPT_STAGES, distill: float = ADAPT_DISTILL,
    pair_distill: float = ADAPT_PAIR_DISTILL, frozen_share: float = ADAPT_FROZEN_SHARE, out: Path | None = None, progress=None,
) -> tuple[AdaptedCard, Path, Path]:
    """Adapt the settings' model to the labeled references of the settings' collection and save it (default:
    adapted/<collection>, or -2, -3, ... when taken; an `out` that exists is refused). Returns the card and the files."""
    if out is not None and any(file.exists() for file in adapted_paths(out)):  # before an hour of training, not after
        raise UsageError(f"{adapted_paths(out)[0]} exists: give another --out (an adapted embedding is never overwritten)")
    with open_existing_store(settings) as store:
        if "model" in settings.model_fields_set and store.model != canonical_model_name(settings.model):
            raise UsageError(f"collection {settings.collection_name} holds model {store.model}, not {settings.model}")
        sources, labels = labeled_image_sources(store)
        model_name, collection = store.model, store.collection
    module, card = adapt_embedding(
        model_name, sources, labels, weights=settings.weights, device=settings.device,
        epochs=epochs, stages=stages, distill=distill, pair_distill=pair_distill, frozen_share=frozen_share,
        workers=settings.workers or 0, progress=progress,
    )
    card.collection = collection
    weights_path, card_path = save_adapted(out or unused_stem(default_adapted_path(collection)), module, card)
    return card, weights_path, card_path
