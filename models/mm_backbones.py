"""A timm backbone with token reduction for mmsegmentation and mmdetection.

Configs import this module (``custom_imports = dict(imports=['models.mm_backbones'])``) and
name the backbone ``TokenReduceBackbone``; it is registered in mmseg's and mmdet's ``MODELS``::

    backbone=dict(type='TokenReduceBackbone', model_name='vit_small_patch16_224', out_indices=(11,),
                  pyramid_scales=(4, 2, 1, 0.5), reduction=dict(type='tome', r=8, mode='restore'),
                  img_size=512, dynamic_img_size=True)

``reduction`` is ``tokenreduce.apply``'s arguments with the method as ``type``. Dense heads need
every token position back: a plain ViT runs in ``mode='restore'`` (merged tokens give their
output back to every position they cover; a method's own reconstruction, e.g. Expedit
clustering, where it has one). Swin reduces inside its windows and keeps its grid.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import timm
from mmdet.registry import MODELS as MMDET_MODELS
from mmseg.registry import MODELS as MMSEG_MODELS
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

import tokenreduce

PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


def _upsample_twice(channels: int) -> nn.Sequential:
    """×4 as in ViTDet: two stride-2 deconvolutions (C → C/2 → C/4) with LayerNorm and GELU between."""
    return nn.Sequential(
        nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2),
        LayerNorm2d(channels // 2),
        nn.GELU(),
        nn.ConvTranspose2d(channels // 2, channels // 4, kernel_size=2, stride=2),
    )


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid (Li et al., ECCV 2022): the maps of every stride built
    from the last map of a plain ViT alone, by deconvolution (×4, ×2), identity (×1) and max
    pooling (×0.5). Channels C/4, C/2, C, C; an FPN or UperNet head follows."""

    def __init__(self, channels: int, scales: Sequence[float]) -> None:
        super().__init__()
        bad = [s for s in scales if s not in PYRAMID_SCALES]
        if bad or not scales:
            raise ValueError(f"pyramid_scales={tuple(scales)!r}: allowed scales are {PYRAMID_SCALES}")
        layers = {
            4.0: lambda: _upsample_twice(channels),
            2.0: lambda: nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2),
            1.0: nn.Identity,
            0.5: lambda: nn.MaxPool2d(kernel_size=2, stride=2),
        }
        self.scales = tuple(float(s) for s in scales)
        self.levels = nn.ModuleList(layers[s]() for s in self.scales)
        widths = {4.0: channels // 4, 2.0: channels // 2, 1.0: channels, 0.5: channels}
        self.out_channels = [widths[s] for s in self.scales]

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(level(x) for level in self.levels)


class TokenReduceBackbone(nn.Module):
    """Any timm ViT or Swin (any model with timm's ``forward_intermediates``) as a dense
    backbone, reduced by a ``tokenreduce`` method, returning NCHW maps at every position.

    Args:
        model_name: timm model name; ``timm_kwargs`` go to ``timm.create_model`` (e.g.
            ``img_size``, ``dynamic_img_size=True`` for a ViT fed any size, ``strict_img_size=False``
            for Swin, ``drop_path_rate``).
        out_indices: blocks (ViT) or stages (Swin) whose outputs are returned, as timm's
            ``features_only`` takes them; layers after the last one and the head are dropped.
        reduction: ``dict(type=method, **tokenreduce.apply options)`` or None.
        pyramid_scales: plain ViT only: build ViTDet's simple feature pyramid at these scales
            from the one map of ``out_indices``; None returns the maps themselves.
        norm: apply the model's final norm to the returned maps (timm's ``features_only`` norm).
        pretrained, checkpoint_path: timm weights; only a local ``checkpoint_path`` (or
            ``pretrained_cfg_overlay=dict(file=...)``) works offline. Default: random init.

    Parameters are the timm model's under ``model.`` (plus ``pyramid.``), the same with or
    without reduction: ``tokenreduce`` swaps classes, never parameters.
    """

    def __init__(self, model_name: str, out_indices: Sequence[int], reduction: Optional[dict] = None,
                 pyramid_scales: Optional[Sequence[float]] = None, norm: bool = True, pretrained: bool = False,
                 checkpoint_path: str = "", init_cfg: Optional[dict] = None, **timm_kwargs: Any) -> None:
        super().__init__()
        if init_cfg is not None:
            raise ValueError(f"init_cfg={init_cfg!r}: timm loads the weights here; give checkpoint_path "
                             "(a local timm checkpoint) or the whole model's load_from")
        self.model = self.create_model(model_name, pretrained=pretrained, checkpoint_path=checkpoint_path,
                                       **timm_kwargs)
        self.out_indices = self.model.prune_intermediate_layers(list(out_indices), prune_norm=not norm)
        self.norm = norm
        self.is_plain_vit = isinstance(self.model, VisionTransformer)
        channels = [self.model.feature_info[i]["num_chs"] for i in self.out_indices]
        self.pyramid = None
        if pyramid_scales is not None:
            if not self.is_plain_vit or len(self.out_indices) != 1:
                raise ValueError(f"pyramid_scales needs a plain ViT and one out index (ViTDet builds the pyramid "
                                 f"from the last map); got {type(self.model).__name__}, out_indices={out_indices!r}")
            self.pyramid = SimpleFeaturePyramid(channels[0], pyramid_scales)
            channels = self.pyramid.out_channels
        self.out_channels = channels
        if reduction is not None:
            self.apply_reduction(dict(reduction))

    def create_model(self, model_name: str, **kwargs: Any) -> nn.Module:
        """The timm model to wrap; subclasses that load weights their own way override it."""
        return timm.create_model(model_name, **kwargs)

    def apply_reduction(self, reduction: dict) -> None:
        """Patch the model with ``reduction`` (``dict(type=method, **tokenreduce.apply options)``),
        replacing any earlier one; a segmentor that owns a method's modules (DToP's exit heads,
        ``models/mm_dtop.py``) calls it after building them."""
        options = dict(reduction)
        method = options.pop("type", None)
        if method is None:
            raise ValueError(f"reduction={reduction!r} needs type=<method>, one of {sorted(tokenreduce.available_methods())}")
        if self.is_plain_vit and options.get("mode", "reduce") != "restore":
            raise ValueError(f"reduction={reduction!r}: a plain ViT gives dense heads every token position only "
                             "with mode='restore'")
        tokenreduce.apply(self.model, method, **options)

    def init_weights(self) -> None:
        """Nothing to do: timm initialised (or loaded) the model when it was built, the pyramid
        has PyTorch's initialisation. (mmengine's default would call timm's own ``init_weights``
        and redraw loaded weights.)"""

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        maps = self.model.forward_intermediates(x, indices=self.out_indices, norm=self.norm,
                                                output_fmt="NCHW", intermediates_only=True)
        if self.pyramid is not None:
            return self.pyramid(maps[-1])
        return tuple(maps)


MMSEG_MODELS.register_module(module=TokenReduceBackbone)
MMDET_MODELS.register_module(module=TokenReduceBackbone)
