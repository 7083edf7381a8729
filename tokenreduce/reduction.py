"""The value every method produces at a block: how N tokens become M tokens.

A :class:`Reduction` is a sparse M×N matrix stored as a list of entries
``(out_index[e], in_index[e])`` per sample. Every method in the library fits it:

* pruning keeps one input per output (``Reduction.select``: a pure gather);
* merging sends each input to one output, outputs are size-weighted means
  (``Reduction.merge``: ToMe, MCTF, clustering);
* fusing / many-to-many transforms give entries explicit feature weights and
  the share of each input's *mass* (patch count) that each output receives
  (``Reduction.sparse``: EViT's fused token, Token Transforming).

Features are combined with ``weight`` (or a size-weighted mean); per-token state
that counts patches (sizes, the source map) is carried with ``mass``. Both are
applied with a gather and an ``index_add_`` over the entries: O(E·C) work, never
a dense N×N product, and at most max(N, M)·C of gathered entries at a time.

The same entries give the way back (:meth:`Reduction.restore`): every input
position receives the mass-weighted mean of the outputs it fed, so restore mode
and dense prediction work for every method without method-specific code. A
method whose paper reconstructs differently (Expedit's clustering) attaches its
own map from outputs to inputs as ``inverse``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .exporting import is_torchscript_onnx_export


def _batch_offsets(index: Tensor, stride: int) -> Tensor:
    """Flatten a per-sample index [B, E] into rows of a [B*stride, ...] view."""
    offsets = torch.arange(index.shape[0], device=index.device) * stride
    return (index + offsets[:, None]).reshape(-1)


def _add_rows(out: Tensor, rows: Tensor, values: Tensor) -> Tensor:
    """out[rows[e]] += values[e] for out [R, C], rows [E], values [E, C] (repeated rows add up).

    ``index_add_`` in eager and under torch.compile / torch.export; while the
    TorchScript ONNX exporter traces, a ``scatter_add_`` with the index expanded
    over the channels (ONNX ScatterElements with reduction "add"), because that
    exporter writes ``index_add_`` as a scatter that keeps one of the repeated
    rows instead of their sum: a wrong graph, not an error."""
    if is_torchscript_onnx_export():
        return out.scatter_add_(0, rows.unsqueeze(-1).expand(-1, values.shape[-1]), values)
    return out.index_add_(0, rows, values)


def _index_sum(values: Tensor, out_index: Tensor, num_out: int) -> Tensor:
    """out[b, m] = Σ_{e: out_index[b, e] = m} values[b, e]   (values: [B, E, C])."""
    batch, _, channels = values.shape
    out = values.new_zeros(batch * num_out, channels)
    _add_rows(out, _batch_offsets(out_index, num_out), values.reshape(-1, channels))
    return out.view(batch, num_out, channels)


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, e]] for x: [B, N, C], index: [B, E].

    Whole rows with ``index_select`` on the flattened batch: ~10x faster on CPU
    than an element-wise ``gather`` with an expanded index, same values."""
    batch, num_tokens, channels = x.shape
    rows = x.reshape(batch * num_tokens, channels).index_select(0, _batch_offsets(index, num_tokens))
    return rows.view(batch, index.shape[1], channels)


@dataclass
class Reduction:
    """A sparse map from N input tokens to ``num_out`` output tokens (per sample).

    ``in_index``/``out_index`` are [B, E] (``in_index`` None means entry e reads
    input e, so E = N). ``weight`` [B, E] multiplies features; None means each
    output is the mass·size-weighted mean of its inputs. ``mass`` [B, E] is the
    share of an input's patches the output receives; None means 1. ``inverse``,
    when set, is the map :meth:`restore` uses instead of the transpose: a
    Reduction from the ``num_out`` outputs to the N inputs whose ``weight``
    gives each input as a weighted sum of outputs.
    """

    num_out: int
    out_index: Optional[Tensor]
    in_index: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    mass: Optional[Tensor] = None
    inverse: Optional["Reduction"] = None

    @classmethod
    def select(cls, index: Tensor) -> "Reduction":
        """Keep the tokens ``index`` [B, M] (in that order): pruning."""
        return cls(num_out=index.shape[1], out_index=None, in_index=index)

    @classmethod
    def merge(cls, out_index: Tensor, num_out: int) -> "Reduction":
        """Send input n to output ``out_index[:, n]``; outputs are size-weighted means."""
        return cls(num_out=num_out, out_index=out_index)

    @classmethod
    def sparse(
        cls,
        out_index: Tensor,
        num_out: int,
        weight: Optional[Tensor] = None,
        in_index: Optional[Tensor] = None,
        mass: Optional[Tensor] = None,
    ) -> "Reduction":
        """General linear map: output m = Σ weight·x_in over its entries, or with
        ``weight`` None the mass·size-weighted mean of its entries (soft merging)."""
        return cls(num_out=num_out, out_index=out_index, in_index=in_index, weight=weight, mass=mass)

    @property
    def is_selection(self) -> bool:
        return self.out_index is None

    def reorder(self, inputs: Optional[Tensor] = None, outputs: Optional[Tensor] = None) -> "Reduction":
        """The same map composed with two permutations, still one gather and one
        ``index_add_``: it reads input i where this one read input ``inputs[:, i]``
        ([B, N]), and emits as output m this one's output ``outputs[:, m]`` ([B, M]).

        Why: an adapter can show a method its tokens in another order (a Vim's
        middle class token first) and put the result back in the order its
        backbone needs, without moving the tokens twice."""
        in_index, out_index = self.in_index, self.out_index
        if inputs is not None:
            in_index = inputs if in_index is None else inputs.gather(1, in_index)
        if outputs is not None:
            if out_index is None:
                in_index = in_index.gather(1, outputs)
            else:
                out_index = torch.argsort(outputs, dim=1).gather(1, out_index)
        return Reduction(self.num_out, out_index, in_index, self.weight, self.mass)

    def _entries(self, x: Tensor) -> Tensor:
        return x if self.in_index is None else _gather_tokens(x, self.in_index)

    def _sum_entries(self, x: Tensor, scale: Optional[Tensor]) -> Tensor:
        """out[b, m] = Σ_{e: out_index[b, e] = m} scale[b, e]·x[b, in[e]]  (scale None: 1).

        Entries are gathered max(N, M) at a time, so a map with many entries per
        token (Expedit's window of centroids, its k-nearest reconstruction) holds
        one [B, max(N, M), C] copy of them at a time, not [B, E, C]; maps with
        E ≤ max(N, M) take one pass. The sums are the same, in the same order."""
        batch, _, channels = x.shape
        num_entries = self.out_index.shape[1]
        chunk = max(x.shape[1], self.num_out)
        out = x.new_zeros(batch * self.num_out, channels)
        for start in range(0, num_entries, chunk):
            part = slice(start, start + chunk)
            values = x[:, part] if self.in_index is None else _gather_tokens(x, self.in_index[:, part])
            if scale is not None:
                values = values * scale[:, part].unsqueeze(-1)
            _add_rows(out, _batch_offsets(self.out_index[:, part], self.num_out), values.reshape(-1, channels))
        return out.view(batch, self.num_out, channels)

    def carry(self, state: Tensor) -> Tensor:
        """Move a per-token quantity that counts patches (sizes [B,N,1], source [B,N,N0])."""
        if self.is_selection:
            return _gather_tokens(state, self.in_index)
        return self._sum_entries(state, None if self.mass is None else self.mass.to(state.dtype))

    def spread(self, y: Tensor, num_in: int) -> Tensor:
        """The transpose of ``carry``: y [B, M, C] on the outputs back onto the
        ``num_in`` inputs, input n receiving Σ mass·y[out] over its entries.

        Why: summing the key columns of an attention map P through this reduction
        and multiplying by values v' of the reduced tokens equals P · spread(v'),
        so one-step-ahead attention never forms the merged M×M map. For a merge
        this is one gather."""
        if self.is_selection:
            out = y.new_zeros(y.shape[0], num_in, y.shape[-1])
            return out.scatter(1, self.in_index.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)
        values = _gather_tokens(y, self.out_index)
        if self.mass is not None:
            values = values * self.mass.unsqueeze(-1).to(values.dtype)
        if self.in_index is None:
            return values
        return _index_sum(values, self.in_index, num_in)

    def restore(self, y: Tensor, fill: Tensor) -> Tensor:
        """Outputs ``y`` [B, M, C] back onto the N input positions of ``fill`` [B, N, C].

        An input receives the mass-weighted mean of the outputs it fed: a merged
        token's output goes to every token it covers, a many-to-many map is read
        back through its normalised columns; an input that fed no output (pruned)
        keeps its ``fill`` row. With ``inverse`` set, every input is instead
        ``inverse``'s weighted sum of the outputs (``fill`` unused)."""
        if self.inverse is not None:
            return self.inverse.apply(y, None)[0]
        num_in = fill.shape[1]
        if self.is_selection:
            return fill.scatter(1, self.in_index.unsqueeze(-1).expand(-1, -1, y.shape[-1]), y)
        if self.in_index is None:  # one entry per input: its output, or the fill where its mass is 0
            received = _gather_tokens(y, self.out_index)
            return received if self.mass is None else torch.where(self.mass.unsqueeze(-1) > 0, received, fill)
        received = self.spread(y, num_in)
        total = self.spread(torch.ones_like(y[..., :1]), num_in)
        return torch.where(total > 0, received / total.clamp_min(torch.finfo(y.dtype).tiny), fill)

    def apply(self, x: Tensor, sizes: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Reduce features ``x`` [B,N,C]; returns (x_out, sizes_out [B,M,1]).

        ``sizes`` None stands for all ones (nothing reduced yet).
        """
        if sizes is None:
            sizes = x.new_ones(x.shape[0], x.shape[1], 1)
        sizes_out = self.carry(sizes)
        if self.is_selection:
            return _gather_tokens(x, self.in_index), sizes_out
        if self.weight is not None:
            return self._sum_entries(x, self.weight.to(x.dtype)), sizes_out
        # Size-weighted mean: Σ mass·size·x / Σ mass·size.
        entry_mass = self._entries(sizes)[..., 0].to(x.dtype)
        if self.mass is not None:
            entry_mass = entry_mass * self.mass.to(x.dtype)
        return self._sum_entries(x, entry_mass) / sizes_out.to(x.dtype), sizes_out


def merge_attention(probs: Tensor, reduction: Reduction, sizes: Optional[Tensor]) -> Tensor:
    """An attention map [B, H, N, N] through a reduction → [B, H, M, M].

    Key columns are summed with their mass (``carry``: the probability of attending
    to any token of a group), query rows are combined like the tokens themselves
    (``apply`` with the pre-reduction ``sizes``), so rows still sum to one after a
    merge. This is MCTF's one-step-ahead attention as a map; the adapter computes
    the same output as ``probs @ spread(v')`` followed by the row combination,
    without forming it.
    """
    batch, heads, num_tokens, _ = probs.shape
    num_out = reduction.num_out
    keys = reduction.carry(probs.permute(0, 3, 1, 2).reshape(batch, num_tokens, heads * num_tokens))
    keys = keys.view(batch, num_out, heads, num_tokens).permute(0, 3, 2, 1).reshape(batch, num_tokens, heads * num_out)
    rows = reduction.apply(keys, sizes)[0]
    return rows.view(batch, num_out, heads, num_out).permute(0, 2, 1, 3)
