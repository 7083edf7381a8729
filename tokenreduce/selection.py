"""Visual-token selectors: which of a ViT's output tokens to pass on to a language model.

In a LLaVA-style vision-language model the number of visual tokens dominates
the language model's cost; these training-free selectors choose ``keep`` of a
ViT's patch tokens at one layer (LLaVA reads the penultimate, ``layer=-2``):

- ``fastervlm`` (FasterVLM, Theia-4869/FasterVLM): the ``keep`` tokens the class
  token attends to most (softmax row, averaged over heads).
- ``vtc_cls`` (VTC-CLS, THU-MIG/VTC-CLS): that class attention summed over the
  blocks ``start_layer`` .. ``layer`` (the official reproduce scripts start at 0).
- ``vispruner`` (VisPruner, Theia-4869/VisPruner): int(keep·important_ratio)
  tokens by class attention, the rest chosen for diversity among the others
  (see :func:`vispruner`).
- ``divprune`` (DivPrune, vbdi/divprune): greedy max–min diversity on cosine
  distance, no attention (see :func:`divprune`).

Each selector is a batched tensor function returning ascending indices
[B, keep] (original order preserved; ``keep`` = every token returns them all).
The official releases run one image at a time with hard-coded sizes (576
tokens); these take any batch and token count. :func:`select` runs a timm ViT
once through the ViT adapter (``Need.IMPORTANCE`` at the blocks read,
``forward_intermediates`` for the features) and applies one of them. A ViT
without a class token scores each patch by the mean attention it receives over
all queries (``Need.RECEIVED_ATTENTION``), averaged over heads, instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import vit
from .methods.base import BlockTensors, Method, Need, Options, check_range
from .reduction import Reduction, _gather_tokens
from .state import Restore

SELECTORS = ("divprune", "fastervlm", "vispruner", "vtc_cls")
# Options each selector takes in ``select`` and their defaults (the papers').
SELECTOR_OPTIONS: dict[str, dict[str, Any]] = {
    "divprune": {},
    "fastervlm": {},
    "vispruner": {"important_ratio": 0.5, "step": 8},
    "vtc_cls": {"start_layer": 0},
}


def check_keep(keep: Any, available: int) -> None:
    """ValueError unless ``keep`` is an int in [1, available]."""
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= available:
        raise ValueError(f"keep={keep!r} must be an int from 1 to the {available} tokens available")


def _all_tokens(batch: int, num_tokens: int, device: torch.device) -> Tensor:
    return torch.arange(num_tokens, device=device).expand(batch, -1)


def top_tokens(scores: Tensor, keep: int) -> Tensor:
    """The ``keep`` highest-scoring tokens of scores [B, N], as ascending indices [B, keep]."""
    check_keep(keep, scores.shape[1])
    return scores.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values


def fastervlm(importance: Tensor, keep: int) -> Tensor:
    """FasterVLM: the ``keep`` tokens of highest class attention ([B, N], head mean)."""
    return top_tokens(importance, keep)


def vtc_cls(layer_importance: Tensor, keep: int) -> Tensor:
    """VTC-CLS: the ``keep`` tokens of highest class attention summed over layers ([B, L, N])."""
    return top_tokens(layer_importance.sum(dim=1), keep)


def vispruner(features: Tensor, importance: Tensor, keep: int, important_ratio: float = 0.5, step: int = 8) -> Tensor:
    """VisPruner: important tokens by class attention, then diverse ones among the rest.

    int(keep·important_ratio) tokens of highest ``importance`` [B, N] are kept.
    The others, in descending importance, are L2-normalised features [B, N, C]
    and pruned until the remaining count fits: split alternately into a (even
    positions) and b (odd), drop the ``step`` a-tokens whose highest cosine to
    any b-token is largest (fewer when fewer are left to drop; ties: the more
    important first), keep the other a-tokens in descending order of that
    cosine followed by b, and repeat. Returns ascending indices [B, keep].
    """
    batch, num_tokens, _ = features.shape
    check_keep(keep, num_tokens)
    check_range("important_ratio", important_ratio, 0.0, 1.0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step={step!r} must be an int >= 1 (tokens dropped per round)")
    if keep == num_tokens:
        return _all_tokens(batch, num_tokens, features.device)
    num_important = int(keep * important_ratio)
    num_diverse = keep - num_important
    order = importance.argsort(dim=1, descending=True, stable=True)
    important, residual = order[:, :num_important], order[:, num_important:]
    if num_diverse:
        # every round's a·bᵀ is a block of one cosine matrix of the candidates: formed once, then gathered
        candidates = F.normalize(_gather_tokens(features.float(), residual), dim=-1)
        cosine = (candidates @ candidates.transpose(1, 2)).flatten(1)  # [B, R0·R0]
        num_candidates = residual.shape[1]
        remaining = _all_tokens(batch, num_candidates, features.device)  # positions in ``residual``
        while remaining.shape[1] > num_diverse:
            a, b = remaining[:, ::2], remaining[:, 1::2]
            drop = min(step, remaining.shape[1] - num_diverse, a.shape[1])
            pairs = (a[:, :, None] * num_candidates + b[:, None, :]).flatten(1)
            redundancy = cosine.gather(1, pairs).view(batch, a.shape[1], b.shape[1]).amax(dim=2)
            kept_a = redundancy.argsort(dim=1, descending=True, stable=True)[:, drop:]
            remaining = torch.cat([a.gather(1, kept_a), b], dim=1)
        important = torch.cat([important, residual.gather(1, remaining)], dim=1)
    return important.sort(dim=1).values


def divprune(features: Tensor, keep: int) -> Tensor:
    """DivPrune: greedy max–min diversity on cosine distance 1 − cos of features [B, N, C].

    The first pick is the token whose nearest other token is farthest; each next
    pick maximises its distance to the nearest token picked so far (a picked
    token is never picked again, even among exact duplicates). Ties go to the
    lower index. Returns ascending indices [B, keep].
    """
    batch, num_tokens, _ = features.shape
    check_keep(keep, num_tokens)
    if keep == num_tokens:
        return _all_tokens(batch, num_tokens, features.device)
    unit = F.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.transpose(1, 2)
    itself = torch.eye(num_tokens, dtype=torch.bool, device=features.device)
    nearest = distance.masked_fill(itself, math.inf).amin(dim=2)
    picked = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
    picks = []
    for _ in range(keep):
        pick = nearest.masked_fill(picked, -math.inf).argmax(dim=1, keepdim=True)
        picks.append(pick)
        picked.scatter_(1, pick, True)
        to_pick = distance.gather(1, pick[:, :, None].expand(-1, 1, num_tokens))[:, 0]
        nearest = to_pick if len(picks) == 1 else torch.minimum(nearest, to_pick)
    return torch.cat(picks, dim=1).sort(dim=1).values


def gather_tokens(features: Tensor, indices: Tensor) -> Tensor:
    """features [B, N, C] at indices [B, M] → [B, M, C]."""
    return _gather_tokens(features, indices)


@dataclass
class _ReadOptions(Options):
    blocks: tuple = ()
    class_token: bool = True


class _AttentionReader(Method):
    """A method that never reduces: it records the head-mean attention score of
    the patch tokens at ``blocks`` (class-token row, or received attention
    without a class token), so that :func:`read_vit` reuses the adapter's
    attention extras instead of a copy of timm's forward."""

    name = "select"
    Options = _ReadOptions

    def __init__(self, options: _ReadOptions, num_blocks: int, num_prefix_tokens: int) -> None:
        super().__init__(options, num_blocks, num_prefix_tokens)
        self.scores: list[Tensor] = []

    def needs(self, block: int) -> Need:
        if block not in self.options.blocks:
            return Need.NOTHING
        return Need.IMPORTANCE if self.options.class_token else Need.RECEIVED_ATTENTION

    def reduce(self, inputs: BlockTensors) -> Optional[Reduction]:
        if inputs.block not in self.options.blocks:
            return None
        scores = inputs.importance if inputs.importance is not None else inputs.received_attention.mean(dim=1)
        self.scores.append(scores[:, self.num_prefix_tokens:].float())
        return None


def _block_index(name: str, value: Any, num_blocks: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -num_blocks <= value < num_blocks:
        raise ValueError(f"{name}={value!r} must be a block index from {-num_blocks} to {num_blocks - 1}")
    return value % num_blocks


def _check_supported(model: nn.Module) -> None:
    if not vit.is_supported(model):
        raise ValueError(f"{type(model).__name__} is not supported: selectors read timm VisionTransformer models")


def read_vit(model: nn.Module, images: Tensor, layer: int = -2, first_layer: Optional[int] = None
             ) -> tuple[Tensor, Tensor]:
    """One forward of a timm ViT up to block ``layer``: its patch-token outputs
    [B, N, C] (no final norm, as LLaVA reads hidden states) and the head-mean
    attention score of every patch token at blocks ``first_layer`` .. ``layer``
    [B, L, N] (class-token row; without a class token, the mean attention each
    token receives). Negative indices count from the end; gradient-free."""
    _check_supported(model)
    if vit.method_of(model) is not None:
        raise ValueError("select() reads the unreduced model; call tokenreduce.remove(model) first")
    num_blocks = vit.num_blocks(model)
    last = _block_index("layer", layer, num_blocks)
    first = last if first_layer is None else _block_index("start_layer", first_layer, num_blocks)
    if first > last:
        raise ValueError(f"start_layer={first_layer!r} (block {first}) must not come after layer={layer!r} "
                         f"(block {last})")
    reader = _AttentionReader(_ReadOptions(tuple(range(first, last + 1)), model.cls_token is not None),
                              num_blocks, vit.num_prefix_tokens(model))
    vit.check_model(model, reader)
    # restore mode is what lets the adapter give intermediates; nothing is reduced, so they are exact
    vit.install(model, reader, trace_source=False, restore=Restore())
    try:
        with torch.no_grad():
            (features,) = model.forward_intermediates(images, indices=[last], norm=False, stop_early=True,
                                                      output_fmt="NLC", intermediates_only=True)
    finally:
        vit.uninstall(model)
    return features, torch.stack(reader.scores, dim=1)


def select(model: nn.Module, images: Tensor, method: str = "vispruner", keep: int = 64, layer: int = -2,
           **options: Any) -> tuple[Tensor, Tensor]:
    """Choose ``keep`` patch tokens of ``model`` (a timm ViT) at block ``layer`` for images [B, 3, H, W].

    ``method``: one of ``SELECTORS``; ``options`` are its own (``SELECTOR_OPTIONS``:
    VisPruner's ``important_ratio``, ``step``; VTC-CLS's ``start_layer``).
    Returns (features [B, keep, C], indices [B, keep] ascending) of the patch
    tokens (prefix tokens excluded), features as the block outputs them.
    """
    options = _selector_options(method, options)
    _check_supported(model)
    rows, cols = model.patch_embed.dynamic_feat_size(images.shape[-2:])
    check_keep(keep, int(rows) * int(cols))  # before the forward, not after it
    features, scores = read_vit(model, images, layer, options.pop("start_layer", None))
    indices = choose(method, features, scores, keep, **options)
    return gather_tokens(features, indices), indices


def _selector_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The selector's options with their defaults; ValueError for an unknown selector or option."""
    if method not in SELECTORS:
        raise ValueError(f"unknown selector {method!r}; available: {list(SELECTORS)}")
    unknown = sorted(set(options) - set(SELECTOR_OPTIONS[method]))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for selector {method!r}; "
                         f"allowed: {sorted(SELECTOR_OPTIONS[method])}")
    return {**SELECTOR_OPTIONS[method], **options}


def choose(method: str, features: Tensor, layer_scores: Tensor, keep: int, **options: Any) -> Tensor:
    """Ascending indices [B, keep] of selector ``method`` from what :func:`read_vit`
    gives: features [B, N, C] and attention scores [B, L, N] (the last row is the
    selection layer's). ``start_layer`` is not an option here: ``layer_scores``
    already holds the layers VTC-CLS sums."""
    options = _selector_options(method, options)
    options.pop("start_layer", None)
    if method == "divprune":
        return divprune(features, keep)
    if method == "fastervlm":
        return fastervlm(layer_scores[:, -1], keep)
    if method == "vtc_cls":
        return vtc_cls(layer_scores, keep)
    return vispruner(features, layer_scores[:, -1], keep, **options)
