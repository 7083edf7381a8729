"""Building blocks shared by the merging methods (ToMe, MCTF): turn "token n is
merged into token d" decisions into a :class:`~tokenreduce.reduction.Reduction`
whose output keeps prefix tokens first and a fixed order for the rest."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reduction import Reduction


def alternating_split_order(num_tokens: int, num_prefix_tokens: int, device: torch.device) -> Tensor:
    """Output order of a bipartite merge: prefix tokens, then set A (even positions), then set B.

    With a single class token this is exactly the official ToMe order
    (``cat([unmerged A, B])``); with more prefix tokens (distillation, registers)
    it keeps all of them in front, where timm's heads read them.
    """
    index = torch.arange(num_tokens, device=device)
    group = torch.where(index < num_prefix_tokens, 0, 1 + index % 2)
    return torch.argsort(group * num_tokens + index)


def merge_by_destination(destination: Tensor, merged: Tensor, order: Tensor, num_out: int,
                         set_aside: Optional[Tensor] = None) -> Reduction:
    """Reduction sending token n to ``destination[:, n]`` (itself when not merged).

    ``merged`` [B, N] marks tokens that disappear (exactly N - num_out per sample);
    the survivors are emitted in ``order`` (a permutation of 0..N-1).
    Ranks come from a cumulative sum, so no sort runs per forward.
    ``set_aside`` [B, N] marks disappearing tokens that found no partner in their
    group: they feed output 0 with mass 0 (their destination may be no survivor),
    so nothing mixes across groups and restore gives them back their own value.
    """
    batch, num_tokens = merged.shape
    order = order.expand(batch, num_tokens)
    rank = (~merged).gather(1, order).long().cumsum(1) - 1
    position = torch.empty_like(rank).scatter_(1, order, rank)
    out_index = position.gather(1, destination)
    if set_aside is None:
        return Reduction.merge(out_index, num_out)
    return Reduction.sparse(out_index.masked_fill(set_aside, 0), num_out, mass=(~set_aside).float())


def protect_prefix(scores: Tensor, num_prefix_tokens: int) -> Tensor:
    """Forbid merging into or out of prefix tokens in an A×B score matrix
    (A = even positions, B = odd positions of the full sequence)."""
    protected_a = (num_prefix_tokens + 1) // 2
    protected_b = num_prefix_tokens // 2
    if protected_a:
        scores[:, :protected_a, :] = -torch.inf
    if protected_b:
        scores[:, :, :protected_b] = -torch.inf
    return scores


def forbid_across_groups(scores: Tensor, groups: Optional[Tensor]) -> Tensor:
    """−inf in an A×B score matrix [B, N_A, N_B] (A = even, B = odd positions)
    between tokens of different ``groups`` labels [B, N] (None: no constraint)."""
    if groups is None:
        return scores
    return scores.masked_fill_(groups[:, ::2, None] != groups[:, None, 1::2], -torch.inf)


def unmatched(scores: Tensor, groups: Optional[Tensor]) -> Optional[Tensor]:
    """Which chosen matches (their best ``scores``) had no partner in their group:
    the tokens to set aside (None without groups, as nothing can be unmatched then)."""
    return None if groups is None else scores == -torch.inf


def bipartite_soft_matching(metric: Tensor, r: int, num_prefix_tokens: int,
                            groups: Optional[Tensor] = None) -> Reduction:
    """ToMe's matching: each A token picks its most similar B token (cosine of
    ``metric`` [B, N, D]); the r best-matched A tokens merge into their match.
    With ``groups`` an A token only matches inside its group; if fewer than r
    A tokens of a sample have a partner, the rest are set aside (see
    :func:`merge_by_destination`) so every sample still ends with N - r tokens."""
    batch, num_tokens, _ = metric.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
    forbid_across_groups(protect_prefix(scores, num_prefix_tokens), groups)
    best_score, best_b = scores.max(dim=-1)
    sources = best_score.argsort(dim=-1, descending=True)[:, :r]
    set_aside = unmatched(best_score.gather(1, sources), groups)
    return _merge_a_into_b(sources, best_b.gather(1, sources), num_tokens, num_prefix_tokens, set_aside)


def _merge_a_into_b(sources: Tensor, targets: Tensor, num_tokens: int, num_prefix_tokens: int,
                    set_aside: Optional[Tensor] = None) -> Reduction:
    """Merge A tokens ``sources`` (indices within A) into B tokens ``targets`` (within B);
    ``set_aside`` [B, r] marks sources that found no partner."""
    batch, r = sources.shape
    device = sources.device
    destination = torch.arange(num_tokens, device=device).repeat(batch, 1)
    destination.scatter_(1, 2 * sources, 2 * targets + 1)
    merged = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    merged.scatter_(1, 2 * sources, torch.ones_like(sources, dtype=torch.bool))
    if set_aside is not None:
        set_aside = torch.zeros_like(merged).scatter_(1, 2 * sources, set_aside)
    order = alternating_split_order(num_tokens, num_prefix_tokens, device)
    return merge_by_destination(destination, merged, order, num_tokens - r, set_aside)
