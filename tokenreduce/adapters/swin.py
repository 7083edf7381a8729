"""Adapter for timm's ``SwinTransformer`` (v1), whole or as a ``features_only`` pyramid.

Swin attends inside windows of equal size, the next block shifts the windows,
and PatchMerging reads the whole grid. So a method reduces *inside every window
by the same amount*: the window batch [B·nW, N, C] is the batch of its
``Reduction`` (ToMe's ``ratio``, MCTF's fractional r, Zero-TPrune's fractions
are fractions of each window's N tokens), and every block hands its tokens back
through the core's restore before the window reverse and the reverse shift. In
a block where the method acts::

    x [B, H, W, C] → shift, pad, partition (as timm) → residual-stream and
    LayerNorm-ed windows → reduce ("before_attention": MCTF) → window attention
    → reduce ("after_attention": ToMe, Zero-TPrune) → MLP on the reduced windows
    → restore (``ReductionState.restore``) → reverse, crop, reverse shift

Blocks where the method does nothing run timm's own forward, so an inactive
method is bit-identical to timm; only classes change (state-dict keys do not),
and ``remove`` swaps them back. The model's own ``forward``,
``forward_features`` and ``forward_intermediates`` run unchanged on full grids.

Tokens always come back at the end of the block that reduced them (a
grid-forming method's at the end of the stage, below): so on Swin
``mode="reduce"`` runs as restore mode (what follows a block is a window reverse
and a shift, which need every cell), ``restore_at`` has one meaning (reduced
tokens never outlive their block: its end is both "block" and "end") and
``restore_form`` applies ("residual" by default).

The rule for merged tokens in window attention:

* merges never cross a shifted-window mask region, and padding never merges
  with image cells: the adapter hands the regions to the method as
  ``BlockTensors.groups`` and refuses methods that cannot keep to them; a token
  left without a partner in its region (a corner region of one image cell, when
  the grid is padded) is set aside: it keeps its value through the rest of the
  block and is no key for the others (one-step-ahead rows are renormalised);
* a merged token takes the relative position bias and the mask of the window
  cell nearest the centroid of the cells it covers (weighted by patch counts).
  Regions are rectangles, so that cell lies in the token's own region: its mask
  row and column are exactly those of every member. Keys add log(size)
  (proportional attention), so a merged window attends as the unmerged window
  would with each member holding its merged token.

Attention on merged tokens only runs for MCTF with ``one_step_ahead=False``:
ToMe and Zero-TPrune reduce after attention (the MLP runs on fewer tokens), and
MCTF's one-step-ahead attention is this block's unreduced map, bias and mask
included, merged through the reduction.

A method that reduces to a grid (``Method.forms_grid``: Expedit's clustering)
works by stage instead, as the official Expedit Swin: at the input of its block
every unshifted window (zero padding included, as timm pads; the official code
clusters the padding cells too) is clustered to a smaller window of g cells
(7×7 → 5×5), those windows are put back together as a smaller grid, and this
block and the rest of its stage run timm's block on that grid with windows of
g: shifted by g//2 where timm's block shifts, the shift mask rebuilt for that
grid, the relative position bias table resized bilinearly (as the official
``resize_rpb_table``; timm's own ``set_input_size`` resizes bicubically). The
last block of the stage reconstructs the full grid (the method's ``inverse``,
per window), so PatchMerging and the stage's feature map see every cell. Padding cells enter attention as zeros,
as in timm, and the MLP skips the tokens that hold padding only (timm crops
padding before its MLP). ``token_counts`` counts the tokens of all windows of an image;
``source_map`` / ``source_maps`` are per window ([B·nW, M, N]).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from timm.models._features import FeatureDictNet, FeatureGetterNet
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    WindowAttention,
    get_relative_position_index,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn

from ..attention import ProbabilityMaps
from ..exporting import ExportError
from ..methods.base import BlockTensors, Method, Need, available_methods, get_method_class
from ..reduction import Reduction
from ..state import Restore, ReductionState
from .vit import (
    APPLY_RANGE,
    REDUCE_RANGE,
    _attend,
    _Patch,
    _profiled,
    _restore_class,
    _subclass,
    attention_probabilities,
    merge_heads,
    project,
    split_heads,
)

_ATTR = "_tokenreduce_swin"


class Windows(NamedTuple):
    """How a block cuts a [B, H, W, C] grid into windows, as timm does: cyclic
    shift, zero padding at the bottom and right, batch-major partition."""

    height: int
    width: int
    size: tuple[int, int]
    shift: tuple[int, int]

    @property
    def padded(self) -> tuple[int, int]:
        return -(-self.height // self.size[0]) * self.size[0], -(-self.width // self.size[1]) * self.size[1]

    @property
    def area(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def count(self) -> int:
        """Windows per image."""
        padded_h, padded_w = self.padded
        return padded_h // self.size[0] * (padded_w // self.size[1])

    def partition(self, x: Tensor) -> Tensor:
        """[B, H, W, C] → [B·nW, N, C]."""
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        padded_h, padded_w = self.padded
        x = F.pad(x, (0, 0, 0, padded_w - self.width, 0, padded_h - self.height))
        return window_partition(x, self.size).view(-1, self.area, x.shape[-1])

    def reverse(self, windows: Tensor) -> Tensor:
        """[B·nW, N, C] → [B, H, W, C] (padding dropped, shift undone)."""
        x = window_reverse(windows.view(-1, *self.size, windows.shape[-1]), self.size, *self.padded)
        x = x[:, :self.height, :self.width].contiguous()
        return torch.roll(x, shifts=self.shift, dims=(1, 2)) if any(self.shift) else x

    def padding(self, like: Tensor) -> Optional[Tensor]:
        """[nW, N] True on padding cells, or None when the grid needs none."""
        if self.padded == (self.height, self.width):
            return None
        return self.partition(like.new_ones(1, self.height, self.width, 1))[..., 0] == 0


def shift_mask(block: SwinTransformerBlock, windows: Windows, like: Tensor) -> Optional[Tensor]:
    """timm's shifted-window mask [nW, N, N] (0 within a region, −100 across), or None."""
    if block.dynamic_mask:
        return block.get_attn_mask(like.new_empty(1, *windows.padded, 1))
    return block.attn_mask


def window_regions(mask: Optional[Tensor], padding: Optional[Tensor], windows: Windows,
                   device: torch.device) -> Tensor:
    """[nW, N] labels: the first cell of each cell's mask region (one region without
    a shift), padding cells kept apart from image cells (label + N)."""
    if mask is None:
        labels = torch.zeros(windows.count, windows.area, dtype=torch.long, device=device)
    else:
        labels = (mask == 0).long().argmax(dim=-1)
    return labels if padding is None else labels + windows.area * padding.long()


def window_bias(attn: WindowAttention, mask: Optional[Tensor]) -> Tensor:
    """Relative position bias plus the shift mask, [nW or 1, H, N, N]: broadcast over
    the images of a [B, nW, H, N, N] view of the windows."""
    bias = attn._get_rel_pos_bias()
    return bias if mask is None else bias + mask.unsqueeze(1)


def centroid_cells(reduction: Reduction, sizes: Optional[Tensor], windows: Windows, like: Tensor) -> Tensor:
    """[B·nW, M]: each reduced token's window cell nearest the centroid of the cells
    it covers, weighted by patch counts (its own cell when it covers one)."""
    rows, cols = torch.meshgrid(torch.arange(windows.size[0], device=like.device),
                                torch.arange(windows.size[1], device=like.device), indexing="ij")
    cells = torch.stack([rows, cols], dim=-1).view(1, windows.area, 2).float()
    weights = like.new_ones(like.shape[0], windows.area, 1) if sizes is None else sizes
    weights = weights.float()
    centroid = reduction.carry(cells * weights) / reduction.carry(weights)
    row, col = centroid.round().long().unbind(-1)
    return row * windows.size[1] + col


def merged_bias(attn: WindowAttention, mask: Optional[Tensor], cells: Tensor, num_windows: int,
                sizes: Optional[Tensor]) -> Tensor:
    """[B·nW, H, M, M]: relative position bias and shift mask between the ``cells``
    [B·nW, M] the reduced tokens sit at, plus log(size) per key when ``sizes`` is given."""
    query, key = cells[:, :, None], cells[:, None, :]
    bias = attn.relative_position_bias_table[attn.relative_position_index[query, key]].permute(0, 3, 1, 2)
    if mask is not None:
        window = torch.arange(cells.shape[0], device=cells.device)[:, None, None] % num_windows
        bias = bias + mask[window, query, key].unsqueeze(1)
    if sizes is not None:
        bias = bias + sizes.log().to(bias.dtype)[:, None, None, :, 0]
    return bias


def _per_image(drop_path: nn.Module, y: Tensor, batch: int) -> Tensor:
    """Stochastic depth with one draw per image, as timm's block, not per window."""
    if isinstance(drop_path, nn.Identity):
        return y
    return drop_path(y.reshape(batch, -1, y.shape[-1])).view_as(y)


def _by_image(t: Tensor, batch: int) -> Tensor:
    """[B·nW, ...] → [B, nW, ...], so a [nW, ...] bias broadcasts over the images."""
    return t.view(batch, -1, *t.shape[1:])


def _finish(attn: WindowAttention, heads: Tensor) -> Tensor:
    """timm's tail after attention: heads [B·nW, H, N, D] → projected [B·nW, N, C]."""
    return attn.proj_drop(attn.proj(merge_heads(heads)))


# What a window's explicit probabilities give a method (windows are small: N = 49 by default).
PROBABILITY_NEEDS = Need.ATTENTION | Need.RECEIVED_ATTENTION | Need.ATTENTION_MAPS


def window_extras(need: Need, keys: Tensor, probs: Optional[Tensor]) -> dict:
    """What ``need`` asks for, from the keys and the probabilities [B, nW, H, N, N]
    (flattened to the window batch [B·nW, ...])."""
    extras: dict = {"keys": keys} if Need.KEYS in need else {}
    if probs is None:
        return extras
    probs = probs.flatten(0, 1)
    if Need.ATTENTION in need:
        extras["attention"] = probs
    if Need.RECEIVED_ATTENTION in need:
        extras["received_attention"] = probs.detach().float().mean(dim=-2)
    if Need.ATTENTION_MAPS in need:
        extras["attention_maps"] = ProbabilityMaps(probs)
    return extras


def window_attention(attn: WindowAttention, normed: Tensor, bias: Tensor, batch: int,
                     need: Need) -> tuple[Tensor, dict]:
    """timm ``WindowAttention`` on windows [B·nW, N, C] that also returns what
    ``need`` asks for (keys, probabilities; [B·nW, ...]). Like timm, SDPA (the bias
    as its mask) only where the module's ``fused_attn`` is set and no probabilities
    are needed: on CPU the explicit softmax is faster than SDPA with a float mask
    (and, at window sizes, than the ViT adapter's in-place softmax)."""
    q, k, v = split_heads(attn, project(attn, normed), "qkv")
    probs = None
    if need & PROBABILITY_NEEDS or not attn.fused_attn:
        probs = attention_probabilities(attn, _by_image(q, batch), _by_image(k, batch), bias)
    extras = window_extras(need, k, probs)
    heads = _attend(attn, _by_image(q, batch), _by_image(k, batch), _by_image(v, batch), bias.to(q.dtype), probs)
    return _finish(attn, heads.flatten(0, 1)), extras


class _Block(NamedTuple):
    """What one reducing block works with, computed once per forward."""

    module: SwinTransformerBlock
    state: ReductionState
    method: Method
    index: int
    batch: int
    windows: Windows
    mask: Optional[Tensor]  # [nW, N, N]
    padding: Optional[Tensor]  # [nW, N]
    groups: Tensor  # [B·nW, N]
    bias: Tensor  # [nW or 1, H, N, N]

    def tensors(self, x: Tensor, extras: dict) -> BlockTensors:
        return BlockTensors(self.index, x, self.state.sizes, 0, groups=self.groups, **extras)


def attend_then_reduce(b: _Block, shortcut: Tensor, normed: Tensor, need: Need) -> Tensor:
    """The attention residual on whole windows, then the method's reduction of it
    (stage "after_attention"): the MLP runs on the reduced windows."""
    out, extras = window_attention(b.module.attn, normed, b.bias, b.batch, need)
    x = shortcut + _per_image(b.module.drop_path1, out, b.batch)
    with _profiled(REDUCE_RANGE):
        reduction = b.method.reduce(b.tensors(x, extras))
    if reduction is None:
        return x
    with _profiled(APPLY_RANGE):
        return b.state.apply(reduction, x)


def reduce_then_attend(b: _Block, shortcut: Tensor, normed: Tensor, need: Need) -> Tensor:
    """Stage "before_attention" (MCTF): the method reduces the block input from this
    block's attention on whole windows; returns the reduced input plus the attention
    residual of the reduced tokens: this block's probabilities merged through the
    reduction (``one_step_ahead``, as the ViT adapter) or attention recomputed on
    the merged tokens under the rule above (bias, mask, log(size))."""
    attn, method = b.module.attn, b.method
    reuse = method.one_step_ahead
    if reuse:
        need = need | Need.ATTENTION
    with torch.set_grad_enabled(torch.is_grad_enabled() and reuse):
        q, k = split_heads(attn, project(attn, normed, "qk"), "qk")
        probs = None
        if need & PROBABILITY_NEEDS:
            probs = attention_probabilities(attn, _by_image(q, b.batch), _by_image(k, b.batch), b.bias)
        extras = window_extras(need, k, probs)
    with _profiled(REDUCE_RANGE):
        reduction = method.reduce(b.tensors(shortcut, extras))
    if reduction is None:
        (v,) = split_heads(attn, project(attn, normed, "v"), "v")
        heads = _attend(attn, _by_image(q, b.batch), _by_image(k, b.batch), _by_image(v, b.batch),
                        b.bias.to(q.dtype), probs)
        return shortcut + _per_image(b.module.drop_path1, _finish(attn, heads.flatten(0, 1)), b.batch)
    sizes = b.state.sizes
    with _profiled(APPLY_RANGE):
        x = b.state.apply(reduction, shortcut)
    normed = b.module.norm1(x)
    if b.padding is not None:  # padding cells enter attention as zeros, as in timm
        image = (~b.padding).repeat(b.batch, 1).unsqueeze(-1).to(normed.dtype)
        normed = normed * (reduction.carry(image) > 0).to(normed.dtype)
    if not reuse:
        q, k, v = split_heads(attn, project(attn, normed), "qkv")
        cells = centroid_cells(reduction, sizes, b.windows, x)
        bias = merged_bias(attn, b.mask, cells, b.windows.count,
                           b.state.sizes if method.proportional_attention else None)
        out = _finish(attn, _attend(attn, q, k, v, bias.to(q.dtype), None))
    else:
        probs = attn.attn_drop(extras["attention"])
        values = reduction.spread(project(attn, normed, "v"), num_in=shortcut.shape[1])
        (values,) = split_heads(attn, values, "v")
        heads = probs @ values
        if reduction.mass is not None:  # set-aside tokens leave the keys: renormalise the rows over the rest
            present = reduction.spread(torch.ones_like(x[..., :1]), num_in=shortcut.shape[1])
            heads = heads / (probs @ present.unsqueeze(1))
        out = attn.proj_drop(attn.proj(reduction.apply(merge_heads(heads), sizes)[0]))
    return x + _per_image(b.module.drop_path1, out, b.batch)


def reduce_in_windows(block: SwinTransformerBlock, x: Tensor, patch: _Patch, index: int, need: Need) -> Tensor:
    """One block with the method acting inside its windows; returns the full grid."""
    state, method = patch.state, patch.method
    batch = x.shape[0]
    windows = Windows(x.shape[1], x.shape[2], tuple(block.window_size), tuple(block.shift_size))
    mask = shift_mask(block, windows, x)
    padding = windows.padding(x)
    if padding is not None and torch.onnx.is_in_onnx_export():
        raise ExportError(
            f"block {index}: a {windows.height}×{windows.width} grid is padded to {windows.size} windows; the "
            "padding cells are identical tokens whose tied scores ONNX Runtime sorts unlike eager PyTorch, so its "
            "merges would differ: export at an image size whose grid fills the windows at every stage "
            "(e.g. 224 for window 7)"
        )
    groups = window_regions(mask, padding, windows, x.device).repeat(batch, 1)
    b = _Block(block, state, method, index, batch, windows, mask, padding, groups, window_bias(block.attn, mask))
    shortcut = windows.partition(x)
    normed = block.norm1(shortcut)
    if padding is not None:  # padding cells enter attention as zeros, as in timm
        normed = normed.masked_fill(padding.repeat(batch, 1).unsqueeze(-1), 0.0)
    if method.stage == "before_attention":
        y = reduce_then_attend(b, shortcut, normed, need)
    else:
        y = attend_then_reduce(b, shortcut, normed, need)
    image = None
    if padding is not None:
        image = ~padding.repeat(batch, 1)
        if state.frames:  # this block's reduction (each block restores its own)
            image = state.frames[-1].reduction.carry(image.unsqueeze(-1).to(y.dtype))[..., 0] > 0
    y = mlp_residual(block, y, image, batch)
    state.record_count(windows.count * y.shape[1])
    return windows.reverse(state.restore(y))


def mlp_residual(block: SwinTransformerBlock, y: Tensor, image: Optional[Tensor], batch: int) -> Tensor:
    """The MLP residual of the (reduced) windows. timm crops padding before its MLP;
    here, where ``image`` [B·nW, M] marks the tokens holding image cells, the MLP runs
    on those rows only (a data-dependent count: not while compiling, nor with
    stochastic depth in training, where every row runs and padding rows are dropped later)."""
    stochastic = block.training and not isinstance(block.drop_path2, nn.Identity)
    if image is None or stochastic or torch.compiler.is_compiling():
        return y + _per_image(block.drop_path2, block.mlp(block.norm2(y)), batch)
    rows = image.flatten().nonzero().squeeze(-1)
    flat = y.reshape(-1, y.shape[-1])
    taken = flat.index_select(0, rows)
    return flat.index_copy(0, rows, taken + block.mlp(block.norm2(taken))).view_as(y)


def region_mask(windows: Windows, like: Tensor) -> Optional[Tensor]:
    """timm's shifted-window mask [nW, N, N] (0 within a region, −100 across) for
    any window size and shift (a clustered grid's), or None without a shift."""
    if not any(windows.shift):
        return None
    regions = like.new_zeros(1, *windows.padded, 1)
    cuts = [(slice(0, -size), slice(-size, -shift), slice(-shift, None)) if shift else (slice(None),)
            for size, shift in zip(windows.size, windows.shift)]
    for label, (rows, cols) in enumerate((rows, cols) for rows in cuts[0] for cols in cuts[1]):
        regions[:, rows, cols] = label
    labels = window_partition(regions, windows.size).view(-1, windows.area)
    return (labels.unsqueeze(1) != labels.unsqueeze(2)).to(like.dtype) * -100.0


def resized_bias(attn: WindowAttention, size: tuple[int, int]) -> Tensor:
    """The relative position bias [1, H, N, N] of windows of ``size``: the table
    resized bilinearly from (2·window − 1)² to (2·size − 1)² offsets (as the
    official Expedit Swin, ``resize_rpb_table``), then indexed as timm does."""
    window = attn.window_size
    table = attn.relative_position_bias_table.t().reshape(1, -1, 2 * window[0] - 1, 2 * window[1] - 1)
    table = F.interpolate(table, size=(2 * size[0] - 1, 2 * size[1] - 1), mode="bilinear", align_corners=False)
    table = table.flatten(2)[0].t()  # [(2h − 1)(2w − 1), H]
    area = size[0] * size[1]
    index = get_relative_position_index(*size, device=table.device).view(-1)
    return table[index].view(area, area, -1).permute(2, 0, 1).unsqueeze(0)


def cluster_stage(block: SwinTransformerBlock, x: Tensor, patch: _Patch, index: int) -> Tensor:
    """A grid-forming method (clustering) at this block's input: every window of
    the grid (unshifted, zero-padded as timm pads; padding cells are clustered with
    the rest, as the official Expedit Swin does) becomes a smaller window of
    tokens, the windows are put back together as a smaller grid, and this block
    and the rest of its stage run on it (``clustered_block``)."""
    state, method = patch.state, patch.method
    windows = Windows(x.shape[1], x.shape[2], tuple(block.window_size), (0, 0))
    grid = method.output_grid(windows.size)
    tokens = windows.partition(x)
    with _profiled(REDUCE_RANGE):
        reduction = method.reduce(BlockTensors(index, tokens, state.sizes, 0, grid=windows.size))
    if reduction is None:
        x = super(ReducingSwinBlock, block).forward(x)
        state.record_count(x.shape[1] * x.shape[2])
        return x
    state.grid = (x.shape[1], x.shape[2])  # the grid the reconstruction returns to
    with _profiled(APPLY_RANGE):
        clusters = state.apply(reduction, tokens)
    padded = windows.padded
    small = Windows(padded[0] // windows.size[0] * grid[0], padded[1] // windows.size[1] * grid[1], grid, (0, 0))
    return clustered_block(block, small.reverse(clusters), patch, index)


def clustered_block(block: SwinTransformerBlock, x: Tensor, patch: _Patch, index: int) -> Tensor:
    """timm's block on the clustered grid [B, h, w, C]: windows of the clustered
    size, shifted by half of it where the block shifts, the shift mask rebuilt for
    that grid and the relative position bias resized (``resized_bias``). The last
    block of the stage reconstructs the full grid (the method's inverse, per
    window) for what follows: PatchMerging, the stage's feature map."""
    state, method = patch.state, patch.method
    batch, height, width, channels = x.shape
    grid = method.output_grid(tuple(block.window_size))
    shift = tuple(size // 2 if shifted else 0 for size, shifted in zip(grid, block.shift_size))
    windows = Windows(height, width, grid, shift)
    mask = region_mask(windows, x)
    bias = resized_bias(block.attn, grid)
    bias = bias if mask is None else bias + mask.unsqueeze(1)
    out, _ = window_attention(block.attn, windows.partition(block.norm1(x)), bias, batch, Need.NOTHING)
    x = x + block.drop_path1(windows.reverse(out))
    x = x.reshape(batch, -1, channels)
    x = (x + block.drop_path2(block.mlp(block.norm2(x)))).reshape(batch, height, width, channels)
    state.record_count(height * width)
    if index != block._tokenreduce_stage_end:
        return x
    unclustered = Windows(*state.grid, tuple(block.window_size), (0, 0))
    return unclustered.reverse(state.restore(Windows(height, width, grid, (0, 0)).partition(x)))


class ReducingSwinBlock:
    """Mixin over timm ``SwinTransformerBlock``: timm's forward where the method
    does nothing, the windowed reduction (and restore) where it acts."""

    def forward(self, x: Tensor) -> Tensor:
        patch: _Patch = getattr(self, _ATTR)
        index: int = self._tokenreduce_index
        need = patch.needs[index]
        state = patch.state
        cells = x.shape[1] * x.shape[2]
        if index == 0:  # every forward (whole model, features_only, intermediates) starts here
            state.reset()
            state.record_count(cells)
        if patch.method.forms_grid and state.frames:  # clusters of an earlier block of this stage
            return clustered_block(self, x, patch, index)
        if not need:
            x = super().forward(x)
            state.record_count(cells)
            return x
        if patch.method.forms_grid:
            return cluster_stage(self, x, patch, index)
        return reduce_in_windows(self, x, patch, index, need)


def _blocks(model: nn.Module) -> list[SwinTransformerBlock]:
    return [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]


def is_supported(model: nn.Module) -> bool:
    if isinstance(model, SwinTransformer):
        return True
    return isinstance(model, (FeatureDictNet, FeatureGetterNet)) and bool(_blocks(model))


def num_blocks(model: nn.Module) -> int:
    return len(_blocks(model))


def num_prefix_tokens(model: nn.Module) -> int:
    return 0


def works_on_swin(method: Union[Method, type[Method]]) -> bool:
    """A method can reduce inside Swin's windows: no class token needed, and its
    merges stay inside the shifted-window mask regions, or it reduces every
    (unshifted) window to a smaller grid of tokens (clustering)."""
    return not method.requires_class_token and (method.respects_groups or method.forms_grid)


def check_model(model: nn.Module, method: Method) -> None:
    """Refuse blocks this adapter would run wrongly and methods that cannot work per window."""
    for i, block in enumerate(_blocks(model)):
        if type(block) is not SwinTransformerBlock:
            raise ValueError(f"block {i} is {type(block).__name__}; the timm Swin adapter supports "
                             "timm.models.swin_transformer.SwinTransformerBlock")
        if type(block.attn) is not WindowAttention:
            raise ValueError(f"block {i} attention is {type(block.attn).__name__}; the timm Swin adapter "
                             "supports timm.models.swin_transformer.WindowAttention")
    if works_on_swin(method):
        return
    working = [name for name in available_methods() if works_on_swin(get_method_class(name))]
    if method.requires_class_token:
        reason = "needs a class token, which Swin has not"
    else:
        reason = "would merge tokens across Swin's shifted-window mask regions"
    raise ValueError(f"method {method.name!r} {reason}; methods that work on Swin: {working}")


def install(model: nn.Module, method: Method, trace_source: bool, restore: Optional[Restore] = None) -> None:
    patch = _Patch(method, trace_source, restore or Restore())
    setattr(model, _ATTR, patch)
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        setattr(block, _ATTR, patch)
        block._tokenreduce_index = i
        block._tokenreduce_stage_end = i
        block.__class__ = _subclass(type(block), ReducingSwinBlock)
    for stage in (m for m in model.modules() if isinstance(m, SwinTransformerStage)):
        members = [block for block in stage.blocks if isinstance(block, SwinTransformerBlock)]
        for block in members:
            block._tokenreduce_stage_end = members[-1]._tokenreduce_index


def uninstall(model: nn.Module) -> None:
    for block in _blocks(model):
        _restore_class(block)
        del block._tokenreduce_index
        del block._tokenreduce_stage_end
        delattr(block, _ATTR)
    delattr(model, _ATTR)


def state_of(model: nn.Module) -> Optional[ReductionState]:
    patch = getattr(model, _ATTR, None)
    return None if patch is None else patch.state


def method_of(model: nn.Module) -> Optional[Method]:
    patch = getattr(model, _ATTR, None)
    return None if patch is None else patch.method
