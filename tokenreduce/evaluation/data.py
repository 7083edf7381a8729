"""Labelled image folders: reading the two layouts, the eval preprocessing, loaders.

A file that cannot be decoded (empty, truncated, not an image) must not end a
long run: with ``skip_unreadable`` the dataset yields None for it, the loader
drops it from its batch, and ``inference.evaluate`` reports its position, so the
tools list it at the end; ``find_unreadable`` decodes everything up front for
``--strict`` runs, which stop before any work instead.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from .distributed import all_gather_lists, is_distributed

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
# What PIL raises for a file it cannot decode: UnidentifiedImageError (empty file, text)
# and "image file is truncated" are OSErrors; some decoders raise SyntaxError or ValueError.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
SHOWN_UNREADABLE = 5  # files named in an error message or on screen; the JSON lists them all


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; the message names the file and PIL's reason."""


def read_rgb(path: Path) -> Image.Image:
    """The image at ``path``, fully decoded, as RGB (some ImageNet photos are greyscale or CMYK)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except DECODE_ERRORS as error:
        raise UnreadableImageError(f"{path}: {type(error).__name__}: {error}") from None


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
    computed on shards can be put back in dataset order.

    An image that cannot be decoded raises UnreadableImageError, or with
    ``skip_unreadable`` gives the item None (``make_loader`` drops it).
    """

    def __init__(self, root: Path, transform: Optional[Callable] = None, limit: Optional[int] = None,
                 skip_unreadable: bool = False):
        self.root = Path(root)
        self.skip_unreadable = skip_unreadable
        samples, self.classes = read_image_list(self.root)
        self.total = len(samples)
        # the label space: named classes, else up to the largest label of the whole folder
        self.num_classes = len(self.classes) if self.classes else 1 + max(label for _, label in samples)
        self.samples = [samples[i] for i in evenly_spaced(len(samples), limit)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[tuple[Any, int, int]]:
        path, label = self.samples[index]
        try:
            image = read_rgb(path)
        except UnreadableImageError:
            if self.skip_unreadable:
                return None
            raise
        return (self.transform(image) if self.transform else image), label, index

    def unreadable_files(self, positions: Sequence[int]) -> list[dict[str, str]]:
        """``{"path", "error"}`` of the images at ``positions`` (PIL's reason, read again)."""
        files = []
        for position in positions:
            path = self.samples[position][0]
            try:
                read_rgb(path)
                error = "decoded when read again"
            except UnreadableImageError as unreadable:
                error = str(unreadable).removeprefix(f"{path}: ")
            files.append({"path": str(path), "error": error})
        return files

    def require_readable(self, workers: int) -> None:
        """Decode every image up front; ValueError naming the ones that cannot be (``--strict``)."""
        bad = find_unreadable(self, workers)
        if bad:
            raise ValueError(f"{len(bad)} of the {len(self)} images cannot be decoded: "
                             f"{format_unreadable(self.unreadable_files(bad[:SHOWN_UNREADABLE]), len(bad))}. "
                             "Remove or replace them, or run without --strict to skip and list them")

    def drop(self, positions: Sequence[int]) -> None:
        """Leave the samples at ``positions`` out (e.g. the unreadable ones before training)."""
        left_out = set(positions)
        self.samples = [sample for i, sample in enumerate(self.samples) if i not in left_out]

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


def format_unreadable(files: Sequence[dict[str, str]], count: Optional[int] = None) -> str:
    """The first few ``{"path", "error"}`` entries as one line, "; ..." when ``count`` says there are more."""
    shown = "; ".join(f"{f['path']} ({f['error']})" for f in files[:SHOWN_UNREADABLE])
    return shown + ("; ..." if (len(files) if count is None else count) > SHOWN_UNREADABLE else "")


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


def collate_readable(items: Sequence[Any]) -> Optional[Any]:
    """Collate a batch without the items that are None (unreadable images); None when none is left."""
    readable = [item for item in items if item is not None]
    return default_collate(readable) if readable else None


def make_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    """In-order loader; under torch.distributed each rank reads its own shard.

    Batches leave out unreadable images (a batch of nothing but those is None).
    """
    sampler = DistributedSampler(dataset, shuffle=False) if is_distributed() else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, collate_fn=collate_readable,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=False)


class _DecodeCheck(Dataset):
    """``(position, decodes)`` for each image of an ImageDataset."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, bool]:
        try:
            read_rgb(self.dataset.samples[index][0])
        except UnreadableImageError:
            return index, False
        return index, True


def find_unreadable(dataset: ImageDataset, workers: int, batch_size: int = 64) -> list[int]:
    """Positions of the images that cannot be decoded, found by decoding each one
    (in ``workers`` processes; under torch.distributed each rank checks its shard
    and every rank gets the whole list)."""
    bad: list[int] = []
    for positions, decodes in make_loader(_DecodeCheck(dataset), batch_size, workers):
        bad += positions[~decodes].tolist()
    return sorted(set(all_gather_lists(bad)))
