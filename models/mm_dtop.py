"""DToP early exit (``tokenreduce`` method ``dtop``) in mmsegmentation: mmseg decode heads as the
auxiliary exit heads of a ``TokenReduceBackbone`` ViT.

``DToPEncoderDecoder`` is an ``EncoderDecoder`` with ``exit_heads`` (mmseg decode heads, e.g.
``FCNHead``) reading the ViT's patch grid after the blocks ``exit_after``::

    model = dict(type='DToPEncoderDecoder', exit_after=(5, 7),
                 exit_heads=[dict(type='FCNHead', in_channels=384, ...), dict(type='FCNHead', ...)],
                 backbone=dict(type='TokenReduceBackbone', ...,
                               reduction=dict(type='dtop', p0=0.9, mode='restore')), ...)

Training (``loss``) runs the backbone unreduced and adds each exit head's own loss on the grid of
its block (the official step 2: fine-tuning a trained segmentor with its auxiliary heads).
Inference with a ``dtop`` reduction hands the exit heads to it (its ``heads`` and
``exit_after`` come from here): confident tokens exit, and the predicted map takes the exit
heads' frozen logits at the pixels of exited patches, the decode head's elsewhere
(:func:`combine_exits`). Without a reduction the exit heads are trained but never run at
inference, so the model predicts exactly as a plain ``EncoderDecoder``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch.nn.functional as F
from mmseg.models.segmentors import EncoderDecoder
from mmseg.registry import MODELS
from mmseg.utils import add_prefix
from torch import Tensor, nn

import tokenreduce
from tokenreduce.methods.dtop import ExitRecord

from models.mm_backbones import TokenReduceBackbone

EXIT_OPTIONS_SET_HERE = ("heads", "exit_after")


class GridHead:
    """An mmseg decode head as a ``dtop`` head: the patch grid [B, C, h, w] → logits [B, K, h', w'].
    Not a module: the head is registered once, as the segmentor's ``exit_heads``."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head

    def __call__(self, grid: Tensor) -> Tensor:
        return self.head([grid])


def combine_exits(record: ExitRecord, seg_logits: Tensor, grid: tuple[int, int]) -> Tensor:
    """The final map [B, K, H, W]: at the pixels of exited patches the frozen logits (bilinear
    from the patch grid, where the decode head's logits, average-pooled to the grid, fill the
    patches that stayed), ``seg_logits`` elsewhere. The grid covers the whole of ``seg_logits``."""
    batch = seg_logits.shape[0]
    size = seg_logits.shape[-2:]
    coarse = record.combine(F.adaptive_avg_pool2d(seg_logits, grid))
    frozen = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    exited = F.interpolate(record.exited.view(batch, 1, *grid).float(), size=size, mode="nearest") > 0
    return seg_logits.where(~exited, frozen)


class BackboneWithExits(nn.Module):
    """A DToP segmentor's backbone and exit heads as one module, for FLOP counts of the backbone
    (``tokenreduce.count_flops``): returns the backbone's maps and the exit record's logits, so a
    traced count keeps the exit heads, which the reduction calls but the maps do not read."""

    def __init__(self, segmentor: "DToPEncoderDecoder") -> None:
        super().__init__()
        self.backbone, self.exit_heads = segmentor.backbone, segmentor.exit_heads
        self.exit_record = segmentor.exit_record

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        maps = self.backbone(x)
        record = self.exit_record()
        return maps if record is None else (*maps, record.logits)


@MODELS.register_module()
class DToPEncoderDecoder(EncoderDecoder):
    """``EncoderDecoder`` with DToP exit heads (see the module docstring).

    Args:
        exit_heads: one mmseg decode head config per block of ``exit_after``; each reads that
            block's output tokens as a patch grid [B, C, h, w] (before the final norm, what the
            ``dtop`` reduction gives its heads) and predicts the decode head's classes.
        exit_after: blocks (0-based) after which the exit heads read (official ViT-B: 5 and 7).
        Other arguments: ``EncoderDecoder``'s; the backbone is a plain-ViT ``TokenReduceBackbone``
        whose ``reduction`` may be ``dict(type='dtop', p0=..., top_k=..., mode='restore')``.
    """

    def __init__(self, backbone: dict, exit_heads: Sequence[dict], exit_after: Sequence[int] = (5, 7),
                 **kwargs) -> None:
        backbone = dict(backbone)
        reduction = backbone.pop("reduction", None)
        if reduction is not None and reduction.get("type") != "dtop":
            raise ValueError(f"reduction={reduction!r}: {type(self).__name__} runs type='dtop' (its exit heads "
                             "read every token of their blocks) or no reduction")
        if reduction is not None:
            set_here = sorted(set(EXIT_OPTIONS_SET_HERE) & set(reduction))
            if set_here:
                raise ValueError(f"reduction={reduction!r}: {set_here} come from the segmentor's exit_heads and "
                                 "exit_after; leave them out of the reduction")
        if len(exit_heads) != len(exit_after):
            raise ValueError(f"{len(exit_heads)} exit_heads for exit_after={tuple(exit_after)!r}: give one head "
                             "per exit block")
        super().__init__(backbone=backbone, **kwargs)
        if not isinstance(self.backbone, TokenReduceBackbone) or not self.backbone.is_plain_vit:
            raise ValueError(f"{type(self).__name__} needs a plain-ViT TokenReduceBackbone, got "
                             f"{type(self.backbone).__name__}")
        num_blocks = len(self.backbone.model.blocks)
        if not all(0 <= b < num_blocks - 1 for b in exit_after) or list(exit_after) != sorted(set(exit_after)):
            raise ValueError(f"exit_after={tuple(exit_after)!r} must be increasing blocks in [0, {num_blocks - 2}] "
                             f"(blocks the backbone runs, before its last)")
        self.exit_after = tuple(int(b) for b in exit_after)
        self.exit_heads = nn.ModuleList(MODELS.build(head) for head in exit_heads)
        mismatched = [h.num_classes for h in self.exit_heads if h.num_classes != self.num_classes]
        if mismatched:
            raise ValueError(f"exit heads predict {mismatched} classes, the decode head {self.num_classes}: "
                             "the final map combines them, so they must agree")
        self.reduction = None
        if reduction is not None:
            self.reduction = dict(reduction, heads=[GridHead(h) for h in self.exit_heads],
                                  exit_after=self.exit_after)
            self.backbone.apply_reduction(self.reduction)

    def backbone_for_flops(self) -> nn.Module:
        """The backbone with the exit heads it runs (see :class:`BackboneWithExits`)."""
        return BackboneWithExits(self)

    def patch_grid(self, inputs: Tensor) -> tuple[int, int]:
        """(h, w) of the ViT's patch tokens for ``inputs`` [B, C, H, W]."""
        return tuple(self.backbone.model.patch_embed.dynamic_feat_size(inputs.shape[-2:]))

    @contextlib.contextmanager
    def _unreduced_block_grids(self, inputs: Tensor) -> Iterator[list[Tensor]]:
        """Within: the backbone without its reduction; yields the list that receives, in order, the
        patch grid [B, C, h, w] after each block of ``exit_after`` in the forward run within."""
        vit = self.backbone.model
        grid, prefix = self.patch_grid(inputs), vit.num_prefix_tokens
        grids: list[Tensor] = []

        def keep(module: nn.Module, args, output: Tensor) -> None:
            grids.append(output[:, prefix:].transpose(1, 2).reshape(output.shape[0], -1, *grid))

        handles = [vit.blocks[b].register_forward_hook(keep) for b in self.exit_after]
        if self.reduction is not None:
            tokenreduce.remove(vit)
        try:
            yield grids
        finally:
            for handle in handles:
                handle.remove()
            if self.reduction is not None:
                self.backbone.apply_reduction(self.reduction)

    def loss(self, inputs: Tensor, data_samples: list) -> dict:
        """The segmentor's losses on the unreduced backbone plus each exit head's, ``exit_{i}.*``."""
        with self._unreduced_block_grids(inputs) as grids:
            losses = super().loss(inputs, data_samples)
        for index, (head, grid) in enumerate(zip(self.exit_heads, grids, strict=True)):
            losses.update(add_prefix(head.loss([grid], data_samples, self.train_cfg), f"exit_{index}"))
        return losses

    def exit_record(self) -> Optional[ExitRecord]:
        """What the early exits of the last reduced forward decided (None without ``dtop``)."""
        if self.reduction is None:
            return None
        return tokenreduce.applied_method(self.backbone.model).record

    def _forward(self, inputs: Tensor, data_samples: Optional[list] = None) -> Tensor:
        """Tensor mode (what FLOP counts trace): the decode head's logits, at its resolution, with
        the exit heads' frozen ones at exited patches."""
        seg_logits = super()._forward(inputs, data_samples)
        record = self.exit_record()
        if record is None:
            return seg_logits
        return combine_exits(record, seg_logits, self.patch_grid(inputs))

    def encode_decode(self, inputs: Tensor, batch_img_metas: list[dict]) -> Tensor:
        """The decode head's logits, with the exit heads' frozen ones at exited patches."""
        seg_logits = super().encode_decode(inputs, batch_img_metas)
        record = self.exit_record()
        if record is None:
            return seg_logits
        return combine_exits(record, seg_logits, self.patch_grid(inputs))
