"""The configs of ``configs/`` outside a Runner: loading them (data root from the user),
building their models on CPU, their baselines (the same config without reduction), and batches
of synthetic input. Shared by tools/train.py, tools/test.py, tools/mm_benchmark.py and the tests.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from torch import Tensor, nn

DATA_ROOT_VARIABLE = "DATA_ROOT"  # read by configs/_base_/datasets/*.py: '{{$DATA_ROOT:default}}'
TASKS = {"mmseg": "segmentation", "mmdet": "detection"}


def load_config(path: Path, data_root: Optional[Path] = None, options: Optional[dict] = None) -> Config:
    """``path`` with its dataset root replaced by ``data_root`` (when given) and ``options``
    (mmengine's ``--cfg-options``) merged in."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path} does not exist")
    saved = os.environ.get(DATA_ROOT_VARIABLE)
    if data_root is not None:
        os.environ[DATA_ROOT_VARIABLE] = str(Path(data_root).resolve())
    try:
        cfg = Config.fromfile(str(path))
    finally:
        if saved is None:
            os.environ.pop(DATA_ROOT_VARIABLE, None)
        else:
            os.environ[DATA_ROOT_VARIABLE] = saved
    if options:
        cfg.merge_from_dict(options)
    task_of(cfg)
    return cfg


def task_of(cfg: Config) -> str:
    """"segmentation" (mmseg) or "detection" (mmdet), from the config's default scope."""
    scope = cfg.get("default_scope")
    if scope not in TASKS:
        raise ValueError(f"config default_scope={scope!r}: supported are {sorted(TASKS)} (mmseg, mmdet)")
    return TASKS[scope]


def reduction_of(cfg: Config) -> Optional[dict]:
    return cfg.model.backbone.get("reduction")


def baseline_of(cfg: Config) -> Config:
    """The same config without token reduction (what a reduced config is a diff against)."""
    baseline = copy.deepcopy(cfg)
    baseline.model.backbone.pop("reduction", None)
    return baseline


def checkpoint_state_dict(checkpoint: Path) -> dict[str, Tensor]:
    """The model weights of a (trusted, local) mmengine checkpoint. Its training state is pickled
    too (numpy arrays, history buffers), which torch >= 2.6 refuses to load by default
    (``weights_only``), and mmengine 0.10.7 passes no flag: hence the explicit load."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state.get("state_dict", state)


def build_model(cfg: Config, seed: int = 0) -> nn.Module:
    """The config's model in eval mode on CPU, seeded; SyncBN (multi-GPU recipes) becomes BN."""
    init_default_scope(cfg.default_scope)
    if task_of(cfg) == "segmentation":
        from mmseg.registry import MODELS
    else:
        from mmdet.registry import MODELS
    torch.manual_seed(seed)
    return revert_sync_batchnorm(MODELS.build(cfg.model)).eval()


def backbone_for_flops(model: nn.Module) -> nn.Module:
    """What a backbone FLOP count traces: the backbone, or with the modules its reduction calls
    (a DToP segmentor's exit heads, ``models/mm_dtop.py``) where the model provides that."""
    provider = getattr(model, "backbone_for_flops", None)
    return model.backbone if provider is None else provider()


def synthetic_batch(task: str, height: int, width: int, batch_size: int = 1, num_classes: int = 2,
                    seed: int = 0) -> dict[str, Any]:
    """A data batch as the configs' pipelines produce it (uint8 images, data samples with
    their metainfo and ground truth: a label map, or two boxes with masks), for a model's
    ``train_step`` / ``test_step`` without a dataset."""
    generator = torch.Generator().manual_seed(seed)
    shape = (height, width)
    meta = dict(img_shape=shape, ori_shape=shape, pad_shape=shape, scale_factor=(1.0, 1.0))
    inputs, samples = [], []
    for _ in range(batch_size):
        inputs.append(torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator))
        labels = torch.randint(0, num_classes, (2,), generator=generator)
        if task == "segmentation":
            from mmengine.structures import PixelData
            from mmseg.structures import SegDataSample
            label_map = torch.full((1, height, width), int(labels[0]), dtype=torch.long)
            label_map[:, height // 4: height // 2, width // 4: width // 2] = int(labels[1])
            sample = SegDataSample(metainfo=meta, gt_sem_seg=PixelData(data=label_map))
        else:
            from mmdet.structures import DetDataSample
            from mmdet.structures.mask import BitmapMasks
            from mmengine.structures import InstanceData
            boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.9]]) * torch.tensor([width, height] * 2)
            masks = np.zeros((2, height, width), dtype=np.uint8)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
                mask[y0:y1, x0:x1] = 1
            sample = DetDataSample(metainfo=meta, gt_instances=InstanceData(
                bboxes=boxes, labels=labels, masks=BitmapMasks(masks, height, width)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


class TensorForward(nn.Module):
    """``model(x)`` = the model's tensor-mode forward (heads' raw outputs, no post-processing)
    on a preprocessed batch: what fvcore can trace for the whole model's FLOPs."""

    def __init__(self, model: nn.Module, data_samples: list) -> None:
        super().__init__()
        self.model = model
        self.data_samples = data_samples

    def forward(self, x: Tensor) -> Any:
        return self.model(x, self.data_samples, mode="tensor")


class TestStep(nn.Module):
    """``model(x)`` = one ``test_step`` (preprocessing, inference, post-processing) of a fixed
    batch, whatever ``x``: the whole pipeline's speed, for the throughput timer."""

    def __init__(self, model: nn.Module, batch: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.batch = batch

    def forward(self, x: Tensor) -> Any:
        return self.model.test_step(self.batch)
