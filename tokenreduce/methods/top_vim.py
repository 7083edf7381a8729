"""ToP-ViM: token pruning for vision state-space models (Zhan et al., "Exploring
Token Pruning in Vision State Space Models", NeurIPS 2024, arXiv 2409.18962).

Facts kept from the paper and the official snapshot (ZLKong/ToP-ViM, an
incomplete release of its Vim code): prune after blocks 5, 10 and 15 (1-based;
``locations`` are 0-based: 4, 9, 14) with ``keep_rate`` 0.8; the class token is
never scored and goes back in the middle of the kept sequence; kept tokens stay
in spatial order; the hidden states and the residual stream are gathered
together. Kept patch count: the snapshot takes K = ceil(keep_rate·M) of the M
patches, raises K to the next odd number and keeps K - 1 patches, so that
patches + class token is odd and the class token sits exactly in the middle; we
do the same. Reported: PlainMamba-L3 81.7 % top-1 at -41.6 % FLOPs (fine-tuned).

Importance. The paper scores a token by the channel sum of the clipped (>= 0)
SSM output of the block. The snapshot reads the backward branch's output
without flipping it back (so position i gets the score of position N-1-i, the
mirror token) and does not clip. We score the SSM output that enters
``out_proj`` -- (forward + flipped-back backward) / 2, in token order, clipped
at 0 -- because a score must be indexed like the tokens it ranks, and both scan
directions make a token's output. The adapter gives it as ``Need.IMPORTANCE``
(normalised over the tokens, which does not change the ranking).

Alignment (``align``, default True). The paper's pruning-aware hidden-state
alignment keeps "the neighbourhood of the remaining tokens stable" for the
scan, with a position map of the kept tokens guiding its kernel; its text is
not reproduced in the snapshot. Our reading: in the unpruned scan the state
reaching a kept token has decayed over every token between it and the previous
kept token; after pruning those decays are gone and the state carries far
tokens too strongly. With ``align`` every later scan multiplies each token's
decay exp(Δ·A) by the number of original scan steps it stands for (its
distance in original positions to the previous kept token in that scan
direction), using the kept token's own Δ for the gap: exact when the pruned
tokens had the same Δ, no extra FLOPs beyond one multiply, and nothing changes
while no token is removed. ``align=False`` is plain pruning;
``tools/eval_imagenet.py --model vim_small_patch16_224 --setting top_vim:align=False``
measures both (feature cosine to the unreduced model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Options, check_blocks, check_range, register_method
from .evit import EViT


@dataclass
class ToPViMOptions(Options):
    keep_rate: float = 0.8
    locations: tuple = (4, 9, 14)
    align: bool = True

    def validate(self, num_blocks: int) -> None:
        check_range("keep_rate", self.keep_rate, 0.0, 1.0, low_open=True)
        self.locations = check_blocks("locations", self.locations, num_blocks)
        if not isinstance(self.align, bool):
            raise ValueError(f"align={self.align!r} must be True or False")


def kept_patches(keep_rate: float, num_patches: int) -> int:
    """The snapshot's count: K = ceil(keep_rate·M), made odd, minus the class token."""
    keep = math.ceil(keep_rate * num_patches)
    return keep if keep % 2 == 0 else keep - 1


@register_method
class ToPViM(EViT):
    """EViT's rule on the SSM's importance: keep the tokens with the largest
    clipped SSM output, an even count, no fused token; the class token in the
    middle (the adapter's placement)."""

    name = "top_vim"
    Options = ToPViMOptions
    fuse = False

    def num_kept(self, num_candidates: int) -> int:
        return kept_patches(self.options.keep_rate, num_candidates)
