"""LightningDataModules and the multi-crop view pipeline."""
from .base import ClassificationDataMixin, ImageList, LayoutError, PretrainDataModule
from .coco import COCODataModule
from .datasets import ImageFiles, MultiCropImages, SegmentationPairs, UnknownMaskValueError, UnreadableImageError
from .folder import ImageFolderDataModule
from .imagenet import ImageNetDataModule
from .resumable import ResumableDataLoader, ResumableSampler
from .reading import CorruptImageWarning, MaskFormatError, read_image, read_mask
from .synthetic import SceneConfig, SyntheticScenesDataModule
from .transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, ResizeTransform, SegmentationEvalTransform
from .views import MultiCropViews, Views, ViewSample, collate_views
from .voc import VOCSegmentationDataModule

__all__ = [
    "Views",
    "ViewSample",
    "MultiCropViews",
    "collate_views",
    "ResumableSampler",
    "ResumableDataLoader",
    "PretrainDataModule",
    "ClassificationDataMixin",
    "ImageList",
    "ImageNetDataModule",
    "COCODataModule",
    "VOCSegmentationDataModule",
    "ImageFolderDataModule",
    "SyntheticScenesDataModule",
    "SceneConfig",
    "EvalTransform",
    "ResizeTransform",
    "SegmentationEvalTransform",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageFiles",
    "MultiCropImages",
    "SegmentationPairs",
    "read_image",
    "read_mask",
    "LayoutError",
    "UnknownMaskValueError",
    "UnreadableImageError",
    "MaskFormatError",
    "CorruptImageWarning",
]
