"""ToMe: Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461).

Facts kept from the official code: the metric is the attention keys averaged
over heads; A/B alternate by position; each A token takes its best cosine match
in B and the r best-matched A tokens merge into their match (size-weighted
mean, sizes add); merging happens after the attention residual, before the MLP;
r is capped at (tokens - protected) // 2; proportional attention by default.
Default r=13 is the paper's off-the-shelf setting for ViT-S/16 (DeiT-S: 2.7 GFLOPs).

Checked against the official timm patch (same weights, fp64): outputs agree to
1e-14 on DeiT-S, DeiT-S distilled, ViT-S and DINOv2 (with LayerScale restored in
the official block, which drops it). For models without a class token we keep
unmerged tokens in spatial order and average-pool with size weights, as the
official MAE patch does; the official timm patch does neither there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ..merging import bipartite_soft_matching
from ..reduction import Reduction
from .base import BlockTensors, Method, Need, Options, check_range, register_method

RSpec = Union[int, list, tuple]


def r_schedule(r: RSpec, num_blocks: int) -> list[int]:
    """Per-block r from an int (constant), a list (per block, padded with 0) or
    ``(r, inflection)``: a linear ramp with the same total as constant r, rising
    for inflection > 0 and falling for inflection < 0."""
    if isinstance(r, list):
        return list(r) + [0] * (num_blocks - len(r))
    r, inflection = r if isinstance(r, tuple) else (r, 0.0)
    first = int(r * (1.0 - inflection))
    last = 2 * r - first
    step = (last - first) / (num_blocks - 1) if num_blocks > 1 else 0.0
    return [int(first + step * i) for i in range(num_blocks)]


def validate_r(r: RSpec, num_blocks: int) -> None:
    """Clear errors for every accepted form of r."""
    if isinstance(r, list):
        if len(r) > num_blocks:
            raise ValueError(f"r={r!r} has {len(r)} entries but the model has {num_blocks} blocks")
        for value in r:
            check_range("r (list entry)", value, 0, float("inf"), kinds=(int,))
    elif isinstance(r, tuple):
        if len(r) != 2:
            raise ValueError(f"r={r!r}: a tuple must be (r, inflection)")
        check_range("r", r[0], 0, float("inf"), kinds=(int,))
        check_range("inflection", r[1], -1.0, 1.0)
    else:
        check_range("r", r, 0, float("inf"), kinds=(int,))


@dataclass
class ToMeOptions(Options):
    r: RSpec = 13
    prop_attn: bool = True

    def validate(self, num_blocks: int) -> None:
        validate_r(self.r, num_blocks)
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn={self.prop_attn!r} must be True or False")


@register_method
class ToMe(Method):
    """Bipartite soft matching on the keys; r tokens merged per block."""

    name = "tome"
    Options = ToMeOptions

    def __init__(self, options: ToMeOptions, num_blocks: int, num_prefix_tokens: int) -> None:
        super().__init__(options, num_blocks, num_prefix_tokens)
        self.schedule = r_schedule(options.r, num_blocks)

    def needs(self, block: int) -> Need:
        return Need.KEYS if self.schedule[block] > 0 else Need.NOTHING

    def reduce(self, inputs: BlockTensors) -> Optional[Reduction]:
        num_tokens = inputs.x.shape[1]
        r = min(self.schedule[inputs.block], (num_tokens - self.num_prefix_tokens) // 2)
        if r <= 0:
            return None
        return bipartite_soft_matching(inputs.keys.mean(dim=1), r, self.num_prefix_tokens)
