"""EViT: token reorganisation by class-token attention (Liang et al., ICLR 2022,
arXiv 2202.07800).

Facts kept from the official code: at blocks 3, 6, 9 keep ceil(keep_rate·(N-1))
non-class tokens with the highest class-token attention (softmax over keys,
averaged over heads; a token fused at an earlier stage is an ordinary
candidate); with ``fuse`` the dropped tokens become one extra token
Σ aᵢ·xᵢ with the raw attention weights aᵢ (not renormalised), appended last;
the reduction sits after the attention residual, before the MLP. The official
code has no proportional attention, hence ``prop_attn=False``.

Difference from the official code: kept tokens stay in their original spatial
order instead of top-k order. For a ViT whose absolute position embeddings are
already added this does not change any output (attention is permutation
equivariant), and it keeps token order meaningful for dense prediction and
visualisation. With more prefix tokens (distillation, registers) all of them
are kept in front and only patch tokens are candidates.

The method reads ``Need.IMPORTANCE``: on a ViT that is exactly the head-mean
class-attention row above; on a Vision Mamba it is the SSM output's token
importance (``tokenreduce.adapters.vim``), so the same rule prunes a Vim
(keep ``fuse=False`` there unless a fused token placed by the mean position of
the tokens it absorbs suits the scan).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..reduction import Reduction
from .base import BlockTensors, Method, Need, Options, check_blocks, check_range, register_method


@dataclass
class EViTOptions(Options):
    keep_rate: float = 0.7
    locations: tuple = (3, 6, 9)
    fuse: bool = True
    prop_attn: bool = False

    def validate(self, num_blocks: int) -> None:
        check_range("keep_rate", self.keep_rate, 0.0, 1.0, low_open=True)
        self.locations = check_blocks("locations", self.locations, num_blocks)
        for flag in ("fuse", "prop_attn"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} must be True or False")


def evit_reduction(importance: torch.Tensor, keep: int, num_prefix_tokens: int, fuse: bool) -> Reduction:
    """Keep the ``keep`` patch tokens of highest importance ([B, N]: the class
    attention averaged over heads), in spatial order; optionally fuse the rest
    into one token weighted by their importance."""
    batch, num_tokens = importance.shape
    candidates = importance[:, num_prefix_tokens:]
    top = candidates.topk(keep, dim=1, sorted=False).indices
    prefix = torch.arange(num_prefix_tokens, device=top.device).expand(batch, -1)
    if not fuse:
        return Reduction.select(torch.cat([prefix, top.sort(dim=1).values + num_prefix_tokens], dim=1))
    kept = torch.zeros_like(candidates, dtype=torch.bool).scatter_(1, top, torch.ones_like(top, dtype=torch.bool))
    num_out = num_prefix_tokens + keep + 1
    position = torch.where(kept, num_prefix_tokens + kept.long().cumsum(1) - 1, num_out - 1)
    weight = torch.where(kept, torch.ones_like(candidates), candidates)
    return Reduction.sparse(
        out_index=torch.cat([prefix, position], dim=1),
        num_out=num_out,
        weight=torch.cat([torch.ones_like(prefix, dtype=weight.dtype), weight], dim=1),
    )


@register_method
class EViT(Method):
    """Keep the tokens the class token attends to; fuse the rest into one."""

    name = "evit"
    Options = EViTOptions
    requires_class_token = True

    def needs(self, block: int) -> Need:
        active = block in self.options.locations and self.options.keep_rate < 1
        return Need.IMPORTANCE if active else Need.NOTHING

    @property
    def fuse(self) -> bool:
        return self.options.fuse

    def num_kept(self, num_candidates: int) -> int:
        """Patch tokens kept out of ``num_candidates``: ceil(keep_rate·N)."""
        return math.ceil(self.options.keep_rate * num_candidates)

    def reduce(self, inputs: BlockTensors) -> Optional[Reduction]:
        if inputs.importance is None:
            return None
        num_candidates = inputs.x.shape[1] - self.num_prefix_tokens
        keep = self.num_kept(num_candidates)
        if not 0 < keep < num_candidates:
            return None
        return evit_reduction(inputs.importance, keep, self.num_prefix_tokens, self.fuse)
