"""ToMe: Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461).

Facts kept from the official code: the metric is the attention keys averaged
over heads; A/B alternate by position; each A token takes its best cosine match
in B and the r best-matched A tokens merge into their match (size-weighted
mean, sizes add); merging happens after the attention residual, before the MLP;
r is capped at (tokens - protected) // 2; proportional attention by default.
Default r=13 is the paper's off-the-shelf setting for ViT-S/16 (DeiT-S: 2.7 GFLOPs).
``ratio`` (an alternative to r, ours) merges a fraction of the tokens entering
each block instead of a count: what windowed backbones need, where every
window of Swin merges the same fraction of its own tokens.

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
RatioSpec = Union[float, list]
DEFAULT_R = 13
MAX_RATIO = 0.5  # bipartite matching merges at most half of the tokens


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


def validate_ratio(ratio: RatioSpec, num_blocks: int) -> None:
    """A fraction in [0, 0.5] for every block, or a list of them per block."""
    if isinstance(ratio, list):
        if len(ratio) > num_blocks:
            raise ValueError(f"ratio={ratio!r} has {len(ratio)} entries but the model has {num_blocks} blocks")
        for value in ratio:
            check_range("ratio (list entry)", value, 0.0, MAX_RATIO)
    else:
        check_range("ratio", ratio, 0.0, MAX_RATIO)


def ratio_schedule(ratio: RatioSpec, num_blocks: int) -> list[float]:
    """Per-block fraction from a number (constant) or a list (per block, padded with 0)."""
    if isinstance(ratio, list):
        return list(ratio) + [0.0] * (num_blocks - len(ratio))
    return [ratio] * num_blocks


@dataclass
class ToMeOptions(Options):
    r: Optional[RSpec] = None  # tokens merged per block; None: 13 unless ratio is given
    ratio: Optional[RatioSpec] = None  # fraction of each block's (each window's) tokens merged there
    prop_attn: bool = True

    def validate(self, num_blocks: int) -> None:
        if self.r is not None and self.ratio is not None:
            raise ValueError(f"r={self.r!r} and ratio={self.ratio!r}: pass one of them "
                             "(r: tokens merged per block; ratio: a fraction of each block's tokens)")
        if self.ratio is not None:
            validate_ratio(self.ratio, num_blocks)
        else:
            validate_r(DEFAULT_R if self.r is None else self.r, num_blocks)
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn={self.prop_attn!r} must be True or False")


@register_method
class ToMe(Method):
    """Bipartite soft matching on the keys; r tokens (or a ratio of them) merged per block."""

    name = "tome"
    Options = ToMeOptions
    respects_groups = True

    def __init__(self, options: ToMeOptions, num_blocks: int, num_prefix_tokens: int) -> None:
        super().__init__(options, num_blocks, num_prefix_tokens)
        if options.ratio is not None:
            self.schedule: list = ratio_schedule(options.ratio, num_blocks)
        else:
            self.schedule = r_schedule(DEFAULT_R if options.r is None else options.r, num_blocks)

    def needs(self, block: int) -> Need:
        return Need.KEYS if self.schedule[block] > 0 else Need.NOTHING

    def reduce(self, inputs: BlockTensors) -> Optional[Reduction]:
        candidates = inputs.x.shape[1] - self.num_prefix_tokens
        r = self.schedule[inputs.block]
        if self.options.ratio is not None:
            r = int(r * candidates)
        r = min(r, candidates // 2)
        if r <= 0:
            return None
        return bipartite_soft_matching(inputs.keys.mean(dim=1), r, self.num_prefix_tokens, inputs.groups)
