"""``linear``: linear classification on a frozen backbone, with the recipe of the paper chosen by preset.

Presets (Caron et al. 2021 ``eval_linear.py``; BAM ``eval_linear.py``; VICRegL ``evaluate.py``):

- ``dino`` (DINO's ImageNet linear results): ViTs concatenate the CLS tokens of the last 4 blocks (each after the
  final norm), CNNs the pooled map; ``Linear`` with N(0, 0.01); SGD momentum 0.9, lr 0.001 x batch / 256,
  no weight decay, cosine over 100 epochs (stepped per epoch), batch 1024.
- ``bam`` (BAM's linear results): CLS token and mean patch token; BatchNorm (no affine, eps 1e-6) + Linear;
  SGD lr 0.002 x batch / 256, cosine over 100 epochs, batch 1024.
- ``vicregl`` (VICRegL's ImageNet linear results): pooled last stage; Linear; SGD lr 0.3 (ConvNeXt) / 0.02 (ResNet),
  weight decay 1e-6, cosine over 100 epochs, batch 256.

Training images: ``RandomResizedCrop(image_size)`` (scale 0.08-1) + horizontal flip; validation: resize to
``image_size * 256 / 224`` and centre crop. Top-1/top-5 of the validation set after the last epoch.
``augment=False`` (not a paper's recipe) trains the head on the features of the un-augmented training images
(the validation transform), extracted once: the online probes' cheap variant, for a quick CPU evaluation.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torch.utils.data import Dataset

from ssl_modules.evaluation.batches import global_batches, local_slice
from ssl_modules.evaluation.datasets import ClassificationFolder, imagenet_split
from ssl_modules.evaluation.features import Extractor
from ssl_modules.evaluation.knn import classification_floors
from ssl_modules.evaluation.training import (
    HeadRecipe,
    broadcast_module_,
    lr_factor,
    normal_init_,
    recipe_optimizer,
    set_lr_,
    train_step,
)
from ssl_modules.evaluation.transforms import (
    normalise,
    random_resized_crop_params,
    resize_centre_crop,
    sample_generator,
    uniform_draw,
)
from ssl_modules.networks.backbones import Backbone
from ssl_modules.run import distributed
from ssl_modules.run.distributed import gather_in_index_order

__all__ = ["LinearSettings", "LINEAR_PRESETS", "linear_preset", "linear_features", "run_linear"]


@dataclass(frozen=True)
class LinearSettings:
    """One linear-classification recipe (see the module docstring for the presets)."""

    features: str = "last4_cls"
    batchnorm: bool = False
    optimizer: str = "sgd"
    base_lr: float = 0.001
    lr_scaling: bool = True
    weight_decay: float = 0.0
    epochs: int = 100
    batch_size: int = 1024
    image_size: int = 224
    augment: bool = True
    seed: int = 0
    paper: str = ""

    def __post_init__(self) -> None:
        if self.features not in ("last4_cls", "cls_mean", "global"):
            raise ValueError(f"linear: features={self.features!r}; use 'last4_cls', 'cls_mean' or 'global'")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"linear: epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")

    def recipe(self) -> HeadRecipe:
        lr = self.base_lr * self.batch_size / 256 if self.lr_scaling else self.base_lr
        return HeadRecipe("sgd", lr, self.weight_decay, "cosine")


LINEAR_PRESETS: dict[str, LinearSettings] = {
    "dino": LinearSettings(paper="DINO (Caron et al. 2021) ImageNet table, linear column; eval_linear.py"),
    "bam": LinearSettings(features="cls_mean", batchnorm=True, base_lr=0.002,
                          paper="BAM (Shalam et al. 2024) ImageNet linear-evaluation table; eval_linear.py"),
    "vicregl": LinearSettings(features="global", base_lr=0.3, lr_scaling=False, weight_decay=1e-6, batch_size=256,
                              paper="VICRegL (Bardes et al. 2022) ImageNet linear column of its main table; "
                                    "evaluate.py (lr 0.02 for ResNets)"),
}


def linear_preset(name: str, backbone: Backbone) -> LinearSettings:
    """The preset's settings for this backbone (VICRegL trains ResNet heads with lr 0.02)."""
    if name not in LINEAR_PRESETS:
        raise ValueError(f"linear: unknown preset {name!r}; choose one of {sorted(LINEAR_PRESETS)}")
    settings = LINEAR_PRESETS[name]
    if name == "vicregl" and "resnet" in backbone.name:
        settings = replace(settings, base_lr=0.02)
    return settings


def linear_features(backbone: Backbone, kind: str) -> Callable[[Tensor], Tensor]:
    """The feature function of a recipe: ``images -> (B, D)`` float32."""
    if kind == "global" or (kind == "last4_cls" and not backbone.is_vit):
        return lambda images: backbone(images).global_.float()
    if kind == "cls_mean":
        def cls_mean(images: Tensor) -> Tensor:
            features = backbone(images)
            return torch.cat([features.global_, features.dense.mean(1)], dim=1).float()
        return cls_mean
    return _last_blocks_cls(backbone, 4)


def _last_blocks_cls(backbone: Backbone, count: int) -> Callable[[Tensor], Tensor]:
    """DINO's ``get_intermediate_layers(n)``: the CLS token of each of the last ``count`` blocks, normed."""
    model = backbone.model

    def features(images: Tensor) -> Tensor:
        outputs: list[Tensor] = []
        hooks = [block.register_forward_hook(lambda _m, _i, out: outputs.append(out))
                 for block in model.blocks[-count:]]
        try:
            backbone.check_input(images)
            model.forward_features(images)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat([model.norm(out)[:, 0] for out in outputs], dim=1).float()
    return features


class LinearHead(nn.Module):
    """``[BatchNorm1d(affine=False, eps=1e-6)] + Linear`` with N(0, 0.01) weights."""

    def __init__(self, dim: int, num_classes: int, batchnorm: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.linear = normal_init_(nn.Linear(dim, num_classes))

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(self.norm(features))


def _train_transform(size: int, seed: int, epoch: int) -> Callable[[Tensor, int], Tensor]:
    def transform(image: Tensor, index: int) -> Tensor:
        generator = sample_generator(seed, epoch, index)
        top, left, h, w = random_resized_crop_params(*image.shape[-2:], (0.08, 1.0), (3 / 4, 4 / 3), generator,
                                                     uniform_draw)
        crop = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if float(torch.rand((), generator=generator)) < 0.5:
            crop = TF.horizontal_flip(crop)
        return normalise(crop)
    return transform


class _EpochImages(Dataset):
    """Item ``epoch * N + i`` of a training set of ``N`` images: image ``i`` with epoch ``epoch``'s augmentation."""

    def __init__(self, train: ClassificationFolder, size: int, seed: int, epochs: int) -> None:
        self.train, self.size, self.seed, self.epochs = train, size, seed, epochs

    def __len__(self) -> int:
        return len(self.train) * self.epochs

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        epoch, index = divmod(item, len(self.train))
        return self.train.item_with(index, _train_transform(self.size, self.seed, epoch))


@torch.no_grad()
def _plain_features(extractor: Extractor, feature_fn: Callable[[Tensor], Tensor], train: ClassificationFolder,
                    size: int) -> tuple[Tensor, Tensor]:
    """Features and labels of every training image under the validation transform (``augment=False``), on
    every process in dataset order."""
    plain = train.with_transform(lambda image, index: normalise(resize_centre_crop(image, size)))
    batches = extractor.my_batches(len(plain))
    rows, labels, owners = [], [], []
    for batch, (images, targets) in zip(batches, extractor.progress(extractor.loader(plain, batches), len(batches),
                                                                    "linear: train features")):
        with extractor.autocast():
            rows.append(feature_fn(images.to(extractor.device)).float())
        labels.append(torch.as_tensor(targets, device=extractor.device))
        owners.append(torch.as_tensor(batch, device=extractor.device))
    if not distributed.is_distributed():
        return torch.cat(rows), torch.cat(labels)
    _, table, table_labels = gather_in_index_order(torch.cat(owners), torch.cat(rows), torch.cat(labels))
    return table, table_labels


def run_linear(extractor: Extractor, root: str, settings: LinearSettings) -> tuple[dict[str, float], dict[str, float]]:
    """``(metrics, floors)``: train the head on ``<root>/train`` (augmented), score ``<root>/val``."""
    backbone = extractor.backbone
    feature_fn = linear_features(backbone, settings.features)
    train = imagenet_split(root, "train", _train_transform(settings.image_size, settings.seed, 0))
    val = imagenet_split(root, "val", lambda image, index: normalise(resize_centre_crop(image, settings.image_size)))
    device = extractor.device
    with torch.no_grad():
        dim = feature_fn(train[0][0][None].to(device)).shape[1]
    torch.manual_seed(settings.seed)
    head = LinearHead(dim, train.num_classes, settings.batchnorm).to(device)
    broadcast_module_(head)
    recipe = settings.recipe()
    optimizer = recipe_optimizer(head, recipe)
    batch_size = min(settings.batch_size, len(train))
    if batch_size < distributed.world_size():
        raise ValueError(f"a global batch of {batch_size} leaves some of the {distributed.world_size()} processes "
                         "without images; use a batch_size of at least the number of processes")
    epoch_batches = [global_batches(len(train), batch_size, settings.seed, epoch) for epoch in range(settings.epochs)]
    steps = [(epoch, batch) for epoch, batches in enumerate(epoch_batches) for batch in batches]
    if settings.augment:
        # One loader for every epoch (its workers start once): item ``epoch * N + i`` is image ``i`` under the
        # augmentation of ``epoch``, so each epoch's batches and crops are those of a loader per epoch.
        loader: Iterable = extractor.loader(_EpochImages(train, settings.image_size, settings.seed, settings.epochs),
                                            [[epoch * len(train) + i for i in local_slice(batch)]
                                             for epoch, batch in steps])
    else:
        table, train_labels = _plain_features(extractor, feature_fn, train, settings.image_size)
        loader = ((table[local_slice(batch)], train_labels[local_slice(batch)]) for _, batch in steps)
    bar = extractor.progress(zip(steps, loader), len(steps), f"linear: head training ({settings.epochs} epochs)")
    current = -1
    for (epoch, batch), (inputs, labels) in bar:
        if epoch != current:
            current = epoch
            set_lr_(optimizer, lr_factor(recipe, epoch, settings.epochs))
            head.train()
        if settings.augment:
            with torch.no_grad(), extractor.autocast():
                features = feature_fn(inputs.to(device)).float()
        else:
            features = inputs
        labels = torch.as_tensor(labels, device=device)
        train_step(head, optimizer,
                   lambda features=features, labels=labels: F.cross_entropy(head(features), labels,
                                                                            reduction="sum"),
                   len(batch))
    head.eval()
    return _score(extractor, head, feature_fn, val, train.num_classes, settings, train.labels)


@torch.no_grad()
def _score(extractor: Extractor, head: nn.Module, feature_fn: Callable[[Tensor], Tensor], val, num_classes: int,
           settings: LinearSettings, train_labels: list[int]) -> tuple[dict[str, float], dict[str, float]]:
    counts = torch.zeros(3, dtype=torch.long, device=extractor.device)
    batches = extractor.my_batches(len(val))
    for images, labels in (extractor.loader(val, batches) if batches else []):
        with extractor.autocast():
            logits = head(feature_fn(images.to(extractor.device)).float())
        labels = torch.as_tensor(labels, device=extractor.device)
        ranked = logits.float().topk(min(5, num_classes), dim=1).indices
        counts += torch.stack([(ranked[:, 0] == labels).sum(), (ranked == labels[:, None]).any(1).sum(),
                               torch.tensor(labels.numel(), device=labels.device)])
    if distributed.is_distributed():
        counts = distributed.all_reduce(counts, "sum")
    total = max(int(counts[2]), 1)
    metrics = {"top1": float(counts[0]) / total, "top5": float(counts[1]) / total}
    floors = classification_floors(torch.tensor(train_labels), torch.tensor(val.labels), num_classes)
    return metrics, floors
