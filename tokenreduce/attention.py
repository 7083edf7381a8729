"""One block's attention probabilities P = softmax(q·kᵀ·scale + bias), formed
only on demand and in bounded pieces.

Methods that read the attention graph (the attention each token receives,
Page Rank over each head's map) need it once, for a decision, while the block's
own output comes from fused attention (SDPA). Forming the B·H·N² map for that
makes memory and time grow with N² where tokens are many; here column sums are
accumulated over chunks of query rows, and per-map computations run over chunks
of whole (sample, head) maps, the logits and probabilities of each piece
holding at most ``max_elements`` values. Everything is float32 and without
gradient: these tensors only feed decisions.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .exporting import is_exporting


class AttentionMaps:
    """The probabilities of one block's attention, computed from its queries and
    keys when asked: ``received`` (weighted column sums, O(chunk·N) memory) and
    ``per_map`` (a function over whole maps, a few maps at a time).

    ``queries``, ``keys`` [B, H, N, D] (after any q/k norm, queries not yet
    scaled), ``bias`` [B, 1, 1, N] added to the logits of each key (log sizes for
    proportional attention) or None; ``max_elements`` bounds the logits and
    probabilities held at once (at least one query row of every map, or one
    whole map).
    """

    def __init__(self, queries: Tensor, keys: Tensor, scale: float, bias: Optional[Tensor],
                 max_elements: int) -> None:
        self.queries, self.keys, self.scale, self.bias = queries, keys, scale, bias
        self.max_elements = max_elements

    @property
    def shape(self) -> torch.Size:
        """[B, H, N, N]: the shape of the probabilities these stand for."""
        return self.queries.shape[:-1] + self.keys.shape[-2:-1]

    @property
    def device(self) -> torch.device:
        return self.queries.device

    def _logits(self, queries: Tensor, keys: Tensor, bias: Optional[Tensor]) -> Tensor:
        logits = (queries.float() * self.scale) @ keys.float().transpose(-2, -1)
        if bias is not None:
            logits += bias.float()
        return logits

    def received(self, weights: Optional[Tensor] = None) -> Tensor:
        """Σ_i w_i·P[i, j] per head: the attention each token j receives, [B, H, N].

        ``weights`` [N] over the queries (default 1/N: the mean over queries; a
        start vector s gives one Page Rank step sᵀP). Query rows go in chunks:
        one more q·kᵀ than fused attention, never the N×N map."""
        batch, heads, num_tokens, _ = self.queries.shape
        rows = max(1, self.max_elements // (2 * batch * heads * num_tokens))  # logits + softmax alive at once
        total = self.queries.new_zeros(batch, heads, num_tokens, dtype=torch.float32)
        with torch.no_grad(), torch.autocast(self.queries.device.type, enabled=False):
            # scale and bias folded into the product, [q·scale, 1]·[k, bias]ᵀ: no pass over each chunk for them
            bias = self.queries.new_zeros(batch, 1, 1, num_tokens) if self.bias is None else self.bias
            keys = torch.cat([self.keys.float(), bias.float().expand(-1, heads, -1, -1).transpose(-2, -1)], dim=-1)
            ones = self.queries.new_ones(batch, heads, min(rows, num_tokens), 1, dtype=torch.float32)
            for start in range(0, num_tokens, rows):
                queries = self.queries[:, :, start:start + rows].float() * self.scale
                queries = torch.cat([queries, ones[:, :, :queries.shape[2]]], dim=-1)
                chunk = (queries @ keys.transpose(-2, -1)).softmax(dim=-1)
                total += chunk.sum(dim=-2) if weights is None else weights[start:start + rows].float() @ chunk
                del chunk  # before the next one is formed
        return total / num_tokens if weights is None else total

    def _pieces(self, size: int) -> list[tuple[slice, list[slice]]]:
        """(samples, [heads, ...]) slices covering every map among ``size`` tokens,
        each piece's logits and probabilities within ``max_elements``. While a graph
        is exported: one head of every sample at a time, so that the batch size
        stays a dimension of the graph instead of a loop count baked into it."""
        batch, heads = self.queries.shape[:2]
        if is_exporting():
            return [(slice(None), [slice(h, h + 1) for h in range(heads)])]
        maps = max(1, self.max_elements // (2 * size * size))  # logits + softmax alive at once
        samples, head_step = (maps // heads, heads) if maps >= heads else (1, maps)
        head_steps = [slice(h, h + head_step) for h in range(0, heads, head_step)]
        return [(slice(b, b + samples), head_steps) for b in range(0, batch, samples)]

    def per_map(self, fn: Callable[[Tensor], Tensor], tokens: Optional[Tensor] = None) -> Tensor:
        """``fn`` over the probability maps among ``tokens`` [B, M] (queries and keys
        restricted to them, softmax over those keys only; None: all tokens).

        ``fn`` takes maps [b, h, M, M] and returns [b, h, ...]; it runs on pieces
        of whole maps (all heads of a few samples, or a few heads of one sample)
        whose logits and probabilities hold at most ``max_elements`` values (one
        map at least), and its results are put back together as [B, H, ...]."""
        dim = self.queries.shape[-1]
        rows = []
        with torch.no_grad(), torch.autocast(self.queries.device.type, enabled=False):
            for samples, head_steps in self._pieces(self.queries.shape[2] if tokens is None else tokens.shape[1]):
                pieces = []
                for heads in head_steps:
                    queries, keys = self.queries[samples, heads], self.keys[samples, heads]
                    bias = None if self.bias is None else self.bias[samples]
                    if tokens is not None:
                        index = tokens[samples, None, :, None]
                        index = index.expand(-1, queries.shape[1], -1, dim)
                        queries, keys = queries.gather(2, index), keys.gather(2, index)
                        bias = None if bias is None else bias.gather(-1, tokens[samples, None, None, :])
                    pieces.append(fn(self._logits(queries, keys, bias).softmax(dim=-1)))
                rows.append(torch.cat(pieces, dim=1))
        return torch.cat(rows, dim=0)


class ProbabilityMaps:
    """The :class:`AttentionMaps` interface over probabilities that already exist
    ([B, H, N, N]): for adapters whose attention is small and explicit (Swin's
    windows), where a bias per query–key pair (relative positions, the shift
    mask) rules out recomputing pieces from q and k."""

    def __init__(self, probabilities: Tensor) -> None:
        self.probabilities = probabilities.detach().float()
        self.shape, self.device = self.probabilities.shape, self.probabilities.device

    def received(self, weights: Optional[Tensor] = None) -> Tensor:
        """Σ_i w_i·P[i, j] per head, [B, H, N] (default: the mean over queries)."""
        if weights is None:
            return self.probabilities.mean(dim=-2)
        return weights.float() @ self.probabilities

    def per_map(self, fn: Callable[[Tensor], Tensor], tokens: Optional[Tensor] = None) -> Tensor:
        """``fn`` over the maps among ``tokens`` [B, M]: the rows and columns of those
        tokens, renormalised (softmax over the remaining keys gives exactly that)."""
        maps = self.probabilities
        if tokens is not None:
            batch, heads, num_tokens, _ = maps.shape
            flat = (tokens[:, :, None] * num_tokens + tokens[:, None, :]).flatten(1)
            maps = maps.flatten(2).gather(2, flat[:, None].expand(-1, heads, -1))
            maps = maps.view(batch, heads, tokens.shape[1], tokens.shape[1])
            maps = maps / maps.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        return fn(maps)
