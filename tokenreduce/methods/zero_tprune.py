"""Zero-TPrune: zero-shot token pruning through the attention graph (Wang, Dedhia
& Jha, CVPR 2024, arXiv 2305.17328). No official code is published; this
follows the paper as described in its abstract, project page and secondary
summaries (the full text could not be read here).

Facts followed:

* I-stage, Weighted Page Rank (WPR): each head's attention matrix A
  (row-stochastic, A[i, j] = how much token i attends to j) is the adjacency
  matrix of a graph and s ← Aᵀ s is iterated from a uniform start, so a token
  is important when important tokens attend to it. "Zero-TPrune" starts the
  class token at √N times the others; "Zero-TPrune-uni" starts uniform
  (option ``cls_start``). Iterations are fixed per layer: 30–50 in the first
  three layers, 5–10 in the middle ones, 1 in the last three.
* Emphasizing Informative Region (EIR): heads are combined by the root of the
  mean of the squared head scores. Variance-based Head Filter (VHF): heads
  whose score-distribution variance lies outside [0.01, 0.7] are left out of
  that mean.
* S-stage: tokens sorted by importance are split into two halves
  ("Sequential-U": the less important half is A, where pruning happens); each
  A token finds its most similar B token by cosine similarity of the keys; the
  r most similar A tokens are dropped (pruned, not merged).
* One pruning layer runs I′ (one WPR iteration, ranking only) → S → I (drop
  the lowest WPR scores). Reported: DeiT-S without fine-tuning, −34.7 % FLOPs,
  +45.3 % throughput, −0.4 % top-1.

Not confirmed, chosen here (and why):

* Variance scale of the VHF. WPR scores sum to one, so their raw variance is
  about 1/N² and [0.01, 0.7] would reject every head. The variance is taken
  of each head's patch-token scores divided by their mean (equivalently, of the
  scores scaled by the number of patch tokens, when they sum to one): 0 for a
  uniform head, n − 1 for a head that puts everything on one token. This is
  independent of N and of the class token's share. When every head of a sample
  is filtered out, all its heads are used.
* The I-stage WPR runs on the attention restricted to the tokens the S-stage
  kept, rows renormalised (the softmax over the remaining keys): the paper puts
  S before I so that similar background tokens no longer vote for each other.
* Memory: WPR needs each head's whole graph, but not all of them at once. The
  method reads the attention as ``Need.ATTENTION_MAPS``: the I′ step (sᵀA from
  the start vector) is summed over chunks of query rows, and the I-stage maps
  are formed among the survivors (the softmax over the remaining keys, from
  their queries and keys) a few whole maps at a time, with one batched product
  per WPR iteration within each chunk; the peak memory stays that of the
  unreduced forward instead of growing with B·H·N².
* Class-token start: every prefix token (class, distillation, registers)
  starts at √N; the start vector is normalised to sum to one. Prefix tokens
  are never pruned and take no part in the S-stage (neither in A nor in B).
* The key vectors are averaged over heads (as ToMe's metric); |A| = n // 2.
* Pruning blocks and the S/I budget split are not public. Defaults: pruning
  after the attention of blocks 3, 6, 9 (0-based, as DynamicViT/EViT, whose
  keep rate 0.7 lands at the paper's ≈ 3.0 GFLOPs), each dropping 15 % of the
  patch tokens entering the block (rounded) in the S-stage and 15 % in the
  I-stage (196 → 138 → 96 → 68 patch tokens): 3.00 GFLOPs on DeiT-S, −34.9 %
  of 4.61, with each pruning block's map formed once. As counted (fvcore; the
  WPR and similarity products included) 3.05, −33.9 %: forming the maps in
  pieces instead of keeping them costs one more q·kᵀ over the N tokens entering
  each pruning block (I′) and one over the M survivors of its S-stage (I),
  H·D multiply-adds per pair.
* Default WPR iterations by depth: 50 in blocks 0–2, 10 in the middle, 1 in
  the last three (the upper ends of the ranges, for convergence; their cost is
  H·N² multiply-adds per iteration, ≈ 0.1 % of the model). Where the first and
  last three overlap (models of fewer than 6 blocks) the first rule wins.

Kept tokens keep their original order after the prefix tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..attention import AttentionMaps
from ..reduction import Reduction
from .base import BlockTensors, Method, Need, Options, check_blocks, check_range, register_method

Budget = Union[int, float, list, tuple]
Iterations = Union[None, int, list, tuple]


def default_iterations(num_blocks: int) -> list[int]:
    """WPR iterations per block: 50 in the first three, 1 in the last three, 10 between."""
    return [50 if b < 3 else 1 if b >= num_blocks - 3 else 10 for b in range(num_blocks)]


def start_scores(num_tokens: int, num_prefix_tokens: int, cls_start: bool, device: torch.device) -> Tensor:
    """WPR start [N] summing to one; prefix tokens weigh √N times a patch token with ``cls_start``."""
    start = torch.ones(num_tokens, device=device, dtype=torch.float32)
    if cls_start:
        start[:num_prefix_tokens] = math.sqrt(num_tokens)
    return start / start.sum()


def weighted_page_rank(attention: Tensor, start: Tensor, iterations: int) -> Tensor:
    """Iterate s ← Aᵀ s per head: attention [B, H, N, N] (rows sum to one), start [N]
    → scores [B, H, N]. One batched product over all samples and heads per iteration."""
    batch, heads, num_tokens, _ = attention.shape
    with torch.autocast(attention.device.type, enabled=False):  # float32 however the model runs
        attention = attention.float()
        scores = start.to(attention.device).expand(batch, heads, 1, num_tokens)
        for _ in range(iterations):
            scores = scores @ attention  # (Aᵀ s)ᵀ = sᵀ A
    return scores.squeeze(-2)


def head_variance(scores: Tensor) -> Tensor:
    """Variance of each head's scores [B, H, n] divided by their mean → [B, H]
    (0: uniform; n - 1: everything on one token)."""
    normalised = scores / scores.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    return normalised.var(dim=-1, unbiased=False)


def combine_heads(scores: Tensor, variance_range: Optional[tuple[float, float]]) -> Tensor:
    """EIR with VHF: root of the mean over kept heads of the squared scores
    [B, H, n] → [B, n]; a head is kept when its ``head_variance`` lies in
    ``variance_range`` (None keeps all); a sample with no head kept uses all."""
    if variance_range is None:
        return scores.square().mean(dim=1).sqrt()
    variance = head_variance(scores)
    low, high = variance_range
    kept = (variance >= low) & (variance <= high)
    kept = kept | ~kept.any(dim=1, keepdim=True)
    weight = kept.to(scores.dtype).unsqueeze(-1)
    return ((scores.square() * weight).sum(dim=1) / weight.sum(dim=1)).sqrt()


def similarity_prune(metric: Tensor, importance: Tensor, r: int) -> Tensor:
    """S-stage (Sequential-U): of ``metric`` [B, n, D] ranked by ``importance`` [B, n],
    the n // 2 least important form A, the rest B; the r A tokens with the highest
    cosine similarity to their best B match are dropped. Returns the kept token
    indices [B, n - r], ascending."""
    num_tokens = metric.shape[1]
    order = importance.argsort(dim=1)  # ascending: the less important half first
    half = num_tokens // 2
    a_index, b_index = order[:, :half], order[:, half:]
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    set_a, set_b = (metric.gather(1, i.unsqueeze(-1).expand(-1, -1, metric.shape[-1])) for i in (a_index, b_index))
    best = (set_a @ set_b.transpose(1, 2)).amax(dim=-1)  # [B, |A|]: each A token's best cosine in B
    kept_a = a_index.gather(1, best.topk(half - r, dim=1, largest=False).indices)
    return torch.cat([kept_a, b_index], dim=1).sort(dim=1).values


def zero_tprune_reduction(
    maps: AttentionMaps,
    keys: Optional[Tensor],
    num_prefix_tokens: int,
    prune_s: int,
    prune_i: int,
    iterations: int,
    cls_start: bool = True,
    variance_range: Optional[tuple[float, float]] = (0.01, 0.7),
) -> Reduction:
    """One pruning layer, I′ → S → I: ``maps`` the block's attention (probabilities
    formed in bounded pieces), ``keys`` [B, H, N, D] (needed when ``prune_s`` > 0).
    Drops ``prune_s`` then ``prune_i`` patch tokens; keeps the prefix and the kept
    tokens in their original order."""
    batch, _, num_tokens, _ = maps.shape
    prefix = num_prefix_tokens
    device = maps.device
    prefix_index = torch.arange(prefix, device=device).expand(batch, -1)
    survivors = None
    if prune_s > 0:
        start = start_scores(num_tokens, prefix, cls_start, device)
        ranking = combine_heads(maps.received(start)[..., prefix:], variance_range)  # one WPR step: sᵀA
        kept = similarity_prune(keys.mean(dim=1)[:, prefix:], ranking, prune_s) + prefix
        survivors = torch.cat([prefix_index, kept], dim=1)
        if prune_i <= 0:
            return Reduction.select(survivors)
    size = num_tokens if survivors is None else survivors.shape[1]
    start = start_scores(size, prefix, cls_start, device)
    # WPR on the attention among the survivors (softmax over the remaining keys), a few maps at a time
    scores = maps.per_map(lambda graph: weighted_page_rank(graph, start, iterations), tokens=survivors)
    importance = combine_heads(scores[..., prefix:], variance_range)
    keep = importance.topk(size - prefix - prune_i, dim=1).indices.sort(dim=1).values + prefix
    if survivors is not None:
        keep = survivors.gather(1, keep)
    return Reduction.select(torch.cat([prefix_index, keep], dim=1))


def _budget_count(value: Union[int, float], num_tokens: int) -> int:
    """Tokens to drop: an int as is, a float as a fraction of the patch tokens (rounded)."""
    return value if isinstance(value, int) else math.floor(value * num_tokens + 0.5)


def _per_location(value: Budget, num_locations: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * num_locations


def _validate_budget(name: str, value: Budget, num_locations: int, max_fraction: float) -> list:
    values = _per_location(value, num_locations)
    if isinstance(value, (list, tuple)) and len(values) != num_locations:
        raise ValueError(f"{name}={value!r} has {len(values)} entries but there are {num_locations} locations")
    for entry in values:
        if isinstance(entry, int) and not isinstance(entry, bool):
            check_range(name, entry, 0, float("inf"), kinds=(int,))
        else:
            check_range(name, entry, 0.0, max_fraction, high_open=max_fraction == 1.0, kinds=(int, float))
    return values


@dataclass
class ZeroTPruneOptions(Options):
    locations: tuple = (3, 6, 9)  # blocks that prune (0-based), after the attention residual
    prune_s: Budget = 0.15  # S-stage: int tokens or fraction of the patch tokens; one value or one per location
    prune_i: Budget = 0.15  # I-stage: likewise
    wpr_iterations: Iterations = None  # None: 50 / 10 / 1 by depth; an int for every block; a list per block
    cls_start: bool = True  # True: "Zero-TPrune" (prefix starts at √N); False: "Zero-TPrune-uni"
    head_variance: Optional[tuple] = (0.01, 0.7)  # VHF range of head_variance(); None disables the filter

    def validate(self, num_blocks: int) -> None:
        self.locations = check_blocks("locations", self.locations, num_blocks)
        count = len(self.locations)
        s_values = _validate_budget("prune_s", self.prune_s, count, 0.5)
        i_values = _validate_budget("prune_i", self.prune_i, count, 1.0)
        for s, i in zip(s_values, i_values):
            if isinstance(s, float) and isinstance(i, float) and s + i >= 1.0:
                raise ValueError(f"prune_s + prune_i = {s} + {i} must be below 1 (fractions of the patch tokens)")
        iterations = self.wpr_iterations
        if isinstance(iterations, (list, tuple)):
            if len(iterations) != num_blocks:
                raise ValueError(
                    f"wpr_iterations={iterations!r} has {len(iterations)} entries but the model has {num_blocks} blocks"
                )
            for value in iterations:
                check_range("wpr_iterations (list entry)", value, 1, float("inf"), kinds=(int,))
        elif iterations is not None:
            check_range("wpr_iterations", iterations, 1, float("inf"), kinds=(int,))
        if not isinstance(self.cls_start, bool):
            raise ValueError(f"cls_start={self.cls_start!r} must be True or False")
        if self.head_variance is not None:
            bounds = self.head_variance
            if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
                raise ValueError(f"head_variance={bounds!r} must be (low, high) or None")
            check_range("head_variance low", bounds[0], 0.0, float("inf"))
            check_range("head_variance high", bounds[1], bounds[0], float("inf"))
            self.head_variance = (float(bounds[0]), float(bounds[1]))


@register_method
class ZeroTPrune(Method):
    """Prune by Weighted Page Rank on the attention graph, after dropping
    near-duplicates of more important tokens (I′ → S → I)."""

    name = "zero_tprune"
    Options = ZeroTPruneOptions
    respects_groups = True  # pruning: no token mixes with another

    def __init__(self, options: ZeroTPruneOptions, num_blocks: int, num_prefix_tokens: int) -> None:
        super().__init__(options, num_blocks, num_prefix_tokens)
        count = len(options.locations)
        prune_s, prune_i = (_per_location(v, count) for v in (options.prune_s, options.prune_i))
        self.budgets = dict(zip(options.locations, zip(prune_s, prune_i)))
        iterations = options.wpr_iterations
        if iterations is None:
            self.iterations = default_iterations(num_blocks)
        elif isinstance(iterations, int):
            self.iterations = [iterations] * num_blocks
        else:
            self.iterations = list(iterations)

    def needs(self, block: int) -> Need:
        prune_s, prune_i = self.budgets.get(block, (0, 0))
        if prune_s == 0 and prune_i == 0:
            return Need.NOTHING
        return Need.ATTENTION_MAPS | Need.KEYS if prune_s != 0 else Need.ATTENTION_MAPS

    def reduce(self, inputs: BlockTensors) -> Optional[Reduction]:
        if inputs.attention_maps is None:
            return None
        candidates = inputs.x.shape[1] - self.num_prefix_tokens
        prune_s, prune_i = (_budget_count(v, candidates) for v in self.budgets[inputs.block])
        prune_s = min(prune_s, candidates // 2) if inputs.keys is not None else 0
        prune_i = min(prune_i, candidates - prune_s - 1)
        if prune_s <= 0 and prune_i <= 0:
            return None
        return zero_tprune_reduction(
            inputs.attention_maps, inputs.keys, self.num_prefix_tokens, prune_s, max(prune_i, 0),
            self.iterations[inputs.block], self.options.cls_start, self.options.head_variance,
        )
