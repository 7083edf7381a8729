"""DToP: dynamic token pruning by early exit (Tang et al., *Dynamic Token Pruning in
Plain Vision Transformers for Semantic Segmentation*, ICCV 2023, arXiv 2308.01045).

Facts kept from the paper and its official code (zbwxp/Dynamic-Token-Pruning):
auxiliary heads after chosen blocks (ViT-B/12: after blocks 5 and 7, 0-based;
ViT-L/24: 7 and 15) predict a class distribution per token; a token whose top
class probability exceeds ``p0`` (0.9 ViT-B, 0.95 ViT-L) exits: it skips the
later blocks and its prediction is frozen from that stage, except that for every
class among the confident tokens the ``top_k`` = min(5, count) most confident
stay; the final map takes the frozen predictions where tokens exited and the
final head's elsewhere.

What this implementation chooses:

* an exit after block b is a reduction of the input of block b + 1 (stage
  "before_attention", ``Need.TOKENS``: nothing read from attention), so the
  frozen features are the output of block b. In restore mode
  (``tokenreduce.apply(..., mode="restore")``) the core puts every exited token
  back at the end with that frozen value (the reduction's ``restore``), so a
  dense decoder sees the full grid; the frozen *predictions* are in
  :attr:`DToP.record` and :meth:`ExitRecord.combine` puts them into a final map.
* batched, no per-image loop: images keep different numbers of tokens, so after
  an exit every image keeps the same number M = prefix + the largest count of
  staying patch tokens in the batch, its staying tokens first (in their order)
  and then *padding*. A padding token is the Reduction's output with weight 0 and
  mass 0: its features are 0 and its size is 0, the adapter's log(size) key bias
  (``proportional_attention``, here only ever 0 or -inf since every real token
  has size 1) masks it out of every attention, it has no weight in the pooled
  mean, and restore gives back nothing from it. So an image's outputs do not
  depend on the others in its batch (equal up to float rounding to running it
  alone); the padding's own compute is what batching costs.
* ``p0`` is compared strictly (a token exits when its top probability > p0), so
  ``p0=1.0`` exits nothing (the model is bit-identical to the unreduced one)
  and ``p0=0`` sends every token away except the per-class ``top_k``.
* the heads are modules given as the option ``heads`` (one per exit block):
  the patch grid [B, C, h, w] (staying tokens at their positions, exited ones
  with their frozen features) → per-position class logits [B, K, h, w]. So a
  token-wise MLP and a convolutional decode head (mmseg) both fit. Prefix tokens
  (class, registers) never exit. No proportional attention beyond the padding
  mask, as in the official code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reduction import Reduction
from .base import BlockTensors, Method, Need, Options, check_blocks, check_range, register_method


@dataclass
class DToPOptions(Options):
    p0: float = 0.9
    exit_after: tuple = (5, 7)
    top_k: int = 5
    heads: Any = None  # one module per exit: patch grid [B, C, h, w] -> class logits [B, K, h, w]

    def validate(self, num_blocks: int) -> None:
        check_range("p0", self.p0, 0.0, 1.0)
        self.exit_after = check_blocks("exit_after", self.exit_after, num_blocks - 1)
        check_range("top_k", self.top_k, 0, float("inf"), kinds=(int,))
        if self.heads is None or isinstance(self.heads, (str, bytes)) or not all(callable(h) for h in self.heads):
            raise ValueError(f"heads={self.heads!r} must be a sequence of modules, one per exit block "
                             f"{list(self.exit_after)}: patch grid [B, C, h, w] -> class logits [B, K, h, w]")
        if len(self.heads) != len(self.exit_after):
            raise ValueError(f"heads has {len(self.heads)} modules but exit_after={list(self.exit_after)} "
                             f"has {len(self.exit_after)} blocks: give one head per exit block")


@dataclass
class ExitRecord:
    """What the early exits of the last forward decided, per patch position [B, P]
    (P = h·w, row-major): the frozen logits of exited tokens and the exit stage."""

    logits: Tensor  # [B, P, K]; 0 where a token did not exit
    stage: Tensor  # [B, P] int64: the exit stage (index into exit_after), -1 for tokens that stayed

    @property
    def exited(self) -> Tensor:
        return self.stage >= 0

    def combine(self, final_logits: Tensor) -> Tensor:
        """The final map [B, K, h, w]: the frozen logits where a token exited, ``final_logits`` elsewhere."""
        batch, classes, height, width = final_logits.shape
        if height * width != self.stage.shape[1] or classes != self.logits.shape[-1]:
            raise ValueError(f"final logits {tuple(final_logits.shape)} do not match the exit record: "
                             f"{self.logits.shape[-1]} classes on {self.stage.shape[1]} patch positions")
        frozen = self.logits.transpose(1, 2).reshape(batch, classes, height, width).to(final_logits.dtype)
        return torch.where(self.exited.view(batch, 1, height, width), frozen, final_logits)


def exit_decision(logits: Tensor, valid: Tensor, p0: float, top_k: int) -> Tensor:
    """[B, P] bool: which ``valid`` tokens exit, from their logits [B, P, K].

    A token exits when its top class probability > ``p0``, except that for each
    class the ``top_k`` most confident of the tokens that would exit with that
    class stay (all of them when fewer)."""
    confidence, label = logits.float().softmax(dim=-1).max(dim=-1)
    confident = valid & (confidence > p0)
    keep_k = min(top_k, confident.shape[1])
    if keep_k == 0:
        return confident
    classes = logits.shape[-1]
    # score of each token for each class it would exit with, -1 elsewhere: [B, K, P]
    per_class = torch.where(confident[:, None] & (label[:, None] == torch.arange(classes, device=label.device)[:, None]),
                            confidence[:, None], -1.0)
    best, index = per_class.topk(keep_k, dim=-1)  # [B, K, k]
    # a class with fewer than k candidates fills its slots with non-candidates (score -1), which
    # may point at a candidate of another class: reduce with amax so such a slot never unmarks it
    stays = torch.zeros(confident.shape, dtype=torch.float32, device=confident.device).scatter_reduce_(
        1, index.flatten(1), (best >= 0).flatten(1).float(), "amax") > 0
    return confident & ~stays


def padded_selection(keep: Tensor, num_prefix_tokens: int, dtype: torch.dtype) -> tuple[Reduction, Tensor]:
    """Keep the prefix tokens and the patch tokens where ``keep`` [B, P], in order,
    padded to the batch's largest count: (the Reduction, [B, M] bool of real outputs).

    Padding outputs read token 0 with weight 0 and mass 0 (features 0, size 0)."""
    batch, _ = keep.shape
    device = keep.device
    counts = keep.sum(dim=1)
    width = int(counts.max())
    # staying patch tokens first, in order (stable sort of "exits")
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width] + num_prefix_tokens
    real_patch = torch.arange(width, device=device) < counts[:, None]
    prefix = torch.arange(num_prefix_tokens, device=device).expand(batch, -1)
    real = torch.cat([torch.ones_like(prefix, dtype=torch.bool), real_patch], dim=1)
    in_index = torch.cat([prefix, torch.where(real_patch, order, 0)], dim=1)
    num_out = in_index.shape[1]
    weight = real.to(dtype)
    reduction = Reduction.sparse(out_index=torch.arange(num_out, device=device).expand(batch, -1), num_out=num_out,
                                 weight=weight, in_index=in_index, mass=weight)
    return reduction, real


def scatter_positions(target: Tensor, positions: Tensor, values: Tensor) -> Tensor:
    """``target`` [B, P, D] with row ``positions[b, m]`` set to ``values[b, m]`` ([B, M, D]);
    positions -1 are left out (they write to a spare row that is dropped)."""
    batch, num_positions, channels = target.shape
    index = torch.where(positions >= 0, positions, num_positions)[..., None].expand(-1, -1, channels)
    spare = torch.cat([target, target.new_zeros(batch, 1, channels)], dim=1)
    return spare.scatter(1, index, values.to(target.dtype))[:, :-1]


@register_method
class DToP(Method):
    """Early exit: confident tokens leave the later blocks with their prediction frozen."""

    name = "dtop"
    Options = DToPOptions
    stage = "before_attention"

    def __init__(self, options: DToPOptions, num_blocks: int, num_prefix_tokens: int) -> None:
        super().__init__(options, num_blocks, num_prefix_tokens)
        self.record: Optional[ExitRecord] = None
        self._positions: Optional[Tensor] = None  # [B, M - prefix]: patch position of each token, -1 padding
        self._grid_features: Optional[Tensor] = None  # [B, P, C] the patch grid as the heads see it

    @property
    def proportional_attention(self) -> bool:
        """Always on: sizes are 1 for real tokens and 0 for padding, so the log(size)
        key bias is 0 or -inf, which masks the padding out of attention."""
        return True

    def needs(self, block: int) -> Need:
        return Need.TOKENS if block - 1 in self.options.exit_after else Need.NOTHING

    def reduce(self, inputs: BlockTensors) -> Optional[Reduction]:
        stage = self.options.exit_after.index(inputs.block - 1)
        prefix = self.num_prefix_tokens
        x = inputs.x
        patches = x[:, prefix:]
        batch, num_tokens, channels = patches.shape
        if inputs.grid is None:
            raise ValueError("dtop needs the patch-token grid of the forward (the adapter sets it)")
        height, width = inputs.grid
        if stage == 0:
            if num_tokens != height * width:
                raise ValueError(f"dtop's first exit needs the full {height}x{width} patch grid, got {num_tokens} "
                                 "patch tokens (no other reduction may run before it)")
            self._positions = torch.arange(num_tokens, device=x.device).expand(batch, -1)
            self._grid_features = patches
        else:  # the grid the head sees: the current tokens at their positions, exited ones frozen
            self._grid_features = scatter_positions(self._grid_features, self._positions, patches)
        positions = self._positions
        valid = positions >= 0
        head_in = self._grid_features.transpose(1, 2).reshape(batch, channels, height, width)
        logits = self.options.heads[stage](head_in)
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        logits = logits.flatten(2).transpose(1, 2)  # [B, P, K]
        token_logits = logits.gather(1, positions.clamp_min(0)[..., None].expand(-1, -1, logits.shape[-1]))
        exits = exit_decision(token_logits, valid, self.options.p0, self.options.top_k)
        if stage == 0:
            self.record = ExitRecord(logits=logits.new_zeros(logits.shape),
                                     stage=torch.full((batch, num_tokens), -1, device=x.device))
        record = self.record
        if not exits.any():
            return None
        exit_positions = torch.where(exits, positions, -1)
        record.logits = scatter_positions(record.logits, exit_positions, token_logits)
        record.stage = scatter_positions(record.stage[..., None], exit_positions,
                                         torch.full_like(exit_positions, stage)[..., None])[..., 0]
        reduction, real = padded_selection(valid & ~exits, prefix, x.dtype)
        patch_in = (reduction.in_index[:, prefix:] - prefix).clamp_min(0)
        self._positions = torch.where(real[:, prefix:], positions.gather(1, patch_in), -1)
        return reduction
