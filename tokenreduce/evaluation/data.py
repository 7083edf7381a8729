"""Labelled image folders: reading the two layouts, the eval preprocessing, loaders."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .distributed import is_distributed

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


def read_image_list(root: Path) -> tuple[list[tuple[Path, int]], Optional[list[str]]]:
    """(path, label) pairs of an image folder, and its class names when it has them.

    Two layouts: a ``labels.csv`` (``file,class_index,...``: labels are already in
    the model's index space, no class names), or one sub-folder per class whose
    order comes from a ``classes.json`` in the folder or its parent (a split
    shares the file with its siblings), else from the sorted folder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} does not exist")
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        with labels_csv.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"file", "class_index"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{labels_csv} lacks the column(s) {sorted(missing)}")
            samples = [(root / row["file"], int(row["class_index"])) for row in reader]
        absent = [str(p) for p, _ in samples if not p.is_file()]
        if absent:
            raise ValueError(f"{labels_csv} names {len(absent)} missing file(s), e.g. {absent[0]}")
        classes = None
    else:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
        classes = _class_order(root) or folders
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise ValueError(f"class folder(s) {unknown[:5]} of {root} are not in its classes.json")
        position = {name: i for i, name in enumerate(classes)}
        samples = [
            (path, position[name])
            for name in folders
            for path in sorted((root / name).rglob("*"))
            if path.suffix.lower() in IMAGE_SUFFIXES
        ]
    if not samples:
        raise ValueError(f"no images in {root}: expected class sub-folders or a labels.csv")
    return samples, classes


def _class_order(root: Path) -> Optional[list[str]]:
    """The class list of the nearest ``classes.json`` (``{"classes": [...]}`` or a list)."""
    for candidate in (root / "classes.json", root.parent / "classes.json"):
        if candidate.is_file():
            content = json.loads(candidate.read_text())
            return list(content["classes"] if isinstance(content, dict) else content)
    return None


def evenly_spaced(count: int, limit: Optional[int]) -> list[int]:
    """``limit`` indices spread evenly over ``range(count)`` (all when None).

    Folders list images class by class, so the first N would all be one class;
    an even spread keeps every class while staying deterministic.
    """
    if limit is None or limit >= count:
        return list(range(count))
    if limit < 1:
        raise ValueError(f"limit={limit} must be at least 1")
    return [i * count // limit for i in range(limit)]


class ImageDataset(Dataset):
    """Labelled images; items are ``(image, label, index)`` so that results
    computed on shards can be put back in dataset order."""

    def __init__(self, root: Path, transform: Optional[Callable] = None, limit: Optional[int] = None):
        self.root = Path(root)
        samples, self.classes = read_image_list(self.root)
        self.total = len(samples)
        # the label space: named classes, else up to the largest label of the whole folder
        self.num_classes = len(self.classes) if self.classes else 1 + max(label for _, label in samples)
        self.samples = [samples[i] for i in evenly_spaced(len(samples), limit)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")  # some ImageNet photos are greyscale or CMYK
        return (self.transform(image) if self.transform else image), label, index

    def align_labels(self, num_outputs: int) -> None:
        """Make labels index a classifier with ``num_outputs`` classes.

        Folder labels are positions in the folder's class list. A 1000-way head is
        taken to be ImageNet-1k: class folders named by WordNet id are re-indexed
        into it (e.g. Imagenette's 10 folders evaluated with an ImageNet model).
        """
        if self.classes and num_outputs == 1000:
            from timm.data import ImageNetInfo

            wnids = {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}
            if all(name in wnids for name in self.classes):
                mapping = [wnids[name] for name in self.classes]
                self.samples = [(path, mapping[label]) for path, label in self.samples]
                self.classes, self.num_classes = None, num_outputs
                return
        if self.num_classes > num_outputs:
            raise ValueError(
                f"{self.root} has {self.num_classes} classes but the classifier has "
                f"{num_outputs} outputs"
            )


def data_config(model: nn.Module, crop_pct: Optional[float] = None) -> dict[str, Any]:
    """timm's eval preprocessing for ``model`` at the input size it was built with.

    The pretrained config can describe another resolution than the instance (the
    DINOv2 config says 518 px for a model created at 224), so the instance's
    patch-embedding size wins.
    """
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        config["input_size"] = (config["input_size"][0], *img_size)
    if crop_pct is not None:
        config["crop_pct"] = crop_pct
    return config


def eval_transform(config: dict[str, Any]) -> Callable:
    """The deterministic eval transform (resize, centre crop, normalise) of a data config."""
    from timm.data import create_transform

    return create_transform(**config, is_training=False)


def make_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """In-order loader; under torch.distributed each rank reads its own shard."""
    sampler = DistributedSampler(dataset, shuffle=False) if is_distributed() else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False)
