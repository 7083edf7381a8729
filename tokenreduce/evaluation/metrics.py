"""Per-sample metrics: top-k hits and how well a reduced model keeps the unreduced features."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

TOPK = (1, 5)


def topk_correct(logits: Tensor, labels: Tensor, ks: Sequence[int] = TOPK) -> Tensor:
    """Per-sample hits [N, len(ks)] (bool): is the label among the k best logits.

    Only the ks that do not exceed the number of classes are scored (no top-5
    for fewer than 5 classes).
    """
    ks = [k for k in ks if k <= logits.shape[1]]
    best = logits.topk(max(ks), dim=1).indices
    hits = best == labels.to(best.device)[:, None]
    return torch.stack([hits[:, :k].any(dim=1) for k in ks], dim=1)


def cosine_similarities(reference: Tensor, other: Tensor) -> Tensor:
    """Per-sample cosine similarity [N] of two feature sets [N, D] (in float64)."""
    return F.cosine_similarity(reference.double(), other.double(), dim=1)


def nearest_neighbours(features: Tensor, chunk: int = 4096) -> Tensor:
    """Index [N] of each sample's cosine nearest neighbour among the others.

    Computed in row chunks so 50k ImageNet features never need an N×N matrix.
    """
    if len(features) < 2:
        raise ValueError("nearest neighbours need at least 2 samples")
    unit = F.normalize(features.double(), dim=1)
    result = []
    for start in range(0, len(unit), chunk):
        sims = unit[start:start + chunk] @ unit.T
        rows = torch.arange(len(sims))
        sims[rows, rows + start] = -float("inf")
        result.append(sims.argmax(dim=1))
    return torch.cat(result)


def feature_fidelity(reference: Tensor, other: Tensor) -> dict[str, float]:
    """How well a reduced model keeps the unreduced one's features.

    ``cos_mean`` / ``cos_p5``: mean and 5th percentile of the per-image cosine
    similarity (the tail shows images the reduction breaks); ``nn_agreement``:
    fraction of images whose nearest neighbour among the others is the same under
    both models (whether the embedding's geometry, used for retrieval, survives).
    """
    if reference.shape != other.shape:
        raise ValueError(f"feature shapes differ: {tuple(reference.shape)} vs {tuple(other.shape)}")
    sims = cosine_similarities(reference, other)
    agreement = float("nan")
    if len(reference) >= 2:
        agreement = (nearest_neighbours(reference) == nearest_neighbours(other)).double().mean().item()
    return {"cos_mean": sims.mean().item(), "cos_p5": torch.quantile(sims, 0.05).item(),
            "nn_agreement": agreement}


def token_coverage(features: Tensor, kept: Tensor) -> Tensor:
    """How well kept tokens stand for all of them: per sample [B], the mean over
    all tokens of features [B, N, C] of the best cosine to a token at ``kept`` [B, M]."""
    unit = F.normalize(features.float(), dim=-1)
    chosen = unit.gather(1, kept[:, :, None].expand(-1, -1, unit.shape[-1]))
    return (unit @ chosen.transpose(1, 2)).amax(dim=2).mean(dim=1)


def mass_covered(mass: Tensor, kept: Tensor) -> Tensor:
    """Share of each sample's non-negative per-token mass [B, N] (e.g. saliency) at ``kept`` [B, M], [B]."""
    return mass.gather(1, kept).sum(dim=1) / mass.sum(dim=1).clamp_min(torch.finfo(mass.dtype).tiny)
