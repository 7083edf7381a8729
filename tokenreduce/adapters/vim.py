"""Adapter for Vision Mamba (the repository's ``models/vim.py``: ``VisionMamba``,
``VimBlock``, ``BiMambaMixer``).

Same contract as the ViT adapter: the classes of the model and of its blocks are
swapped for subclasses (parameters and state-dict keys untouched), ``remove``
swaps them back, and a block where the method does nothing runs the model's own
code, so an inactive method is bit-identical.

What a Vim block gives a method (``PROVIDES``): the tokens, ``Need.KEYS`` (the
block's mixer output as one "head" [B, 1, N, C]: Famba-V merges Vim tokens by
these hidden states) and ``Need.IMPORTANCE`` (the SSM's own signal, ToP-ViM's:
the channel sum of the clipped (>= 0) SSM output that enters ``out_proj``, both
directions in token order, normalised over the tokens). There is no attention
map: a method that needs one (or proportional attention) is refused, naming the
methods that work here.

Where: after a block's mixer, on the pair the blocks carry between them (the
mixer output and the fp32 residual), both moved by the same ``Reduction``; the
method sees their sum, the residual stream.

Order: a scan depends on order, and the class token sits in the middle. The
adapter shows a method the class token first (the core's prefix convention)
and the patches in scan order, then emits the reduced patches in scan order
(by the mean original position of the patches each one covers) with the class
token back in the middle of them (``VisionMamba.class_token_index``). Both
permutations are composed into the method's ``Reduction`` (``reorder``), so
each tensor moves once.

Alignment (a method's ``scan_alignment``, ToP-ViM's option ``align``): once
tokens are removed, every later scan decays each token's state by the original
scan steps it stands for: its distance in original patch positions to the
previous token in the scan direction (the class token: one step). The state
then fades across a pruned gap as it did over the tokens that were there, so
the kept tokens keep the neighbourhood they had (``tokenreduce.ssm``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..methods.base import BlockTensors, Method, Need, available_methods, get_method_class
from ..reduction import Reduction
from ..state import ReductionState, Restore
from .vit import (  # noqa: F401  (state_of, method_of: the adapter interface, shared)
    _ATTR, APPLY_RANGE, REDUCE_RANGE, _profiled, method_of, patch_classes, state_of, unpatch_classes,
)

PROVIDES = Need.KEYS | Need.IMPORTANCE
VIM_MODULES = ("models.vim", "tokenreduce.models.vim")  # the repository's models/, from the root or installed


def _is(module: nn.Module, class_name: str) -> bool:
    """``module`` is (a subclass of) the Vim class ``class_name``, under either import name."""
    return any(c.__name__ == class_name and c.__module__ in VIM_MODULES for c in type(module).__mro__)


class _Patch:
    """Per-model record shared by the patched model and its blocks."""

    def __init__(self, method: Method, trace_source: bool, class_token_index: Callable[[int], int]) -> None:
        self.method = method
        self.needs = [method.needs(i) for i in range(method.num_blocks)]
        self.state = ReductionState(trace_source=trace_source)
        self.class_token_index = class_token_index
        self.reset()

    def reset(self) -> None:
        self.state.reset()
        self.positions: Optional[Tensor] = None  # [B, N] original patch position of each token (its patches' mean)
        self.decay_steps: Optional[tuple[Tensor, Tensor]] = None  # alignment, once tokens are removed


def initial_positions(num_tokens: int, cls_index: int, device: torch.device) -> Tensor:
    """Patch positions 0..M-1 in sequence order; the class token between its two neighbours."""
    index = torch.arange(num_tokens, device=device, dtype=torch.float32)
    positions = torch.where(index < cls_index, index, index - 1)
    positions[cls_index] = cls_index - 0.5
    return positions


def class_token_first(num_tokens: int, cls_index: int, device: torch.device) -> Tensor:
    """[N] order that shows the class token first, then the patches in scan order."""
    index = torch.arange(num_tokens, device=device)
    return torch.cat([index[cls_index:cls_index + 1], index[:cls_index], index[cls_index + 1:]])


def scan_order(reduction: Reduction, positions: Tensor, sizes: Optional[Tensor],
               class_token_index: Callable[[int], int]) -> tuple[Reduction, Tensor]:
    """Emit a class-token-first reduction's patches by position with the class
    token in their middle; returns it and the positions of its outputs."""
    weights = torch.ones_like(positions[..., None]) if sizes is None else sizes.to(positions.dtype)
    centroid = (reduction.carry(positions[..., None] * weights) / reduction.carry(weights))[..., 0]
    patches = centroid[:, 1:].argsort(dim=1, stable=True) + 1
    middle = class_token_index(reduction.num_out)
    outputs = torch.cat([patches[:, :middle], torch.zeros_like(patches[:, :1]), patches[:, middle:]], dim=1)
    return reduction.reorder(outputs=outputs), centroid.gather(1, outputs)


def alignment_steps(positions: Tensor, cls_index: int) -> tuple[Tensor, Tensor]:
    """Scan steps each token stands for, (forward, backward) [B, N]: the distance
    to the previous patch in that direction (at least 1), the class token 1."""
    patches = torch.cat([positions[:, :cls_index], positions[:, cls_index + 1:]], dim=1)
    gaps = patches.diff(dim=1).clamp(min=1.0)
    one = torch.ones_like(patches[:, :1])

    def with_class_token(steps: Tensor) -> Tensor:
        return torch.cat([steps[:, :cls_index], one, steps[:, cls_index:]], dim=1)

    return with_class_token(torch.cat([one, gaps], dim=1)), with_class_token(torch.cat([gaps, one], dim=1))


def mix_then_reduce(block: nn.Module, normed: Tensor, residual: Tensor, patch: _Patch, index: int,
                    need: Need) -> tuple[Tensor, Tensor]:
    """The block's mixer, then the method's reduction of (mixer output, residual)."""
    mixer, method, state = block.mixer, patch.method, patch.state
    ssm = mixer.ssm_output(normed, patch.decay_steps)
    hidden = mixer.out_proj(ssm)
    num_tokens = hidden.shape[1]
    cls_index = patch.class_token_index(num_tokens)
    order = class_token_first(num_tokens, cls_index, hidden.device)
    extras: dict = {}
    if Need.KEYS in need:
        extras["keys"] = hidden[:, None, order]
    if Need.IMPORTANCE in need:
        score = ssm.clamp(min=0).sum(dim=-1)
        extras["importance"] = (score / score.sum(dim=1, keepdim=True).clamp(min=1e-12))[:, order]
    sizes = None if state.sizes is None else state.sizes[:, order]
    with _profiled(REDUCE_RANGE):
        reduction = method.reduce(BlockTensors(index, (residual + hidden)[:, order], sizes, 1, **extras))
    if reduction is None:
        return hidden, residual
    with _profiled(APPLY_RANGE):
        positions = patch.positions
        if positions is None:
            positions = initial_positions(num_tokens, cls_index, hidden.device).expand(hidden.shape[0], -1)
        reduction = reduction.reorder(inputs=order.expand(hidden.shape[0], -1))
        reduction, patch.positions = scan_order(reduction, positions, state.sizes, patch.class_token_index)
        residual = reduction.apply(residual, state.sizes)[0]
        hidden = state.apply(reduction, hidden)
    if method.scan_alignment:
        patch.decay_steps = alignment_steps(patch.positions, patch.class_token_index(reduction.num_out))
    return hidden, residual


class ReducingVimBlock:
    """Mixin over ``VimBlock``: the method's reduction after the mixer."""

    def forward(self, hidden: Tensor, residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        patch: _Patch = getattr(self, _ATTR)
        index: int = self._tokenreduce_index
        need = patch.needs[index]
        patch.state.record_tokens(hidden)
        normed, residual = self.add_norm(hidden, residual)
        if need:
            hidden, residual = mix_then_reduce(self, normed, residual, patch, index, need)
        else:
            hidden = self.mixer(normed, patch.decay_steps)
        if index == patch.method.num_blocks - 1:
            patch.state.record_tokens(hidden)
        return hidden, residual


class ReducingVisionMamba:
    """Mixin over ``VisionMamba``: resets the reduction state per forward."""

    def forward_features(self, x: Tensor) -> Tensor:
        getattr(self, _ATTR).reset()
        return super().forward_features(x)


def is_supported(model: nn.Module) -> bool:
    return _is(model, "VisionMamba")


def num_blocks(model: nn.Module) -> int:
    return len(model.layers)


def num_prefix_tokens(model: nn.Module) -> int:
    return 1


def methods_that_work(num_blocks: int) -> list[str]:
    """Registered methods whose needs at their defaults a Vim block can give."""
    names = []
    for name in available_methods():
        cls = get_method_class(name)
        try:
            method = cls(cls.Options(), num_blocks=num_blocks, num_prefix_tokens=1)
        except ValueError:
            continue
        if cls.stage == "after_attention" and all(method.needs(i) & ~PROVIDES == Need.NOTHING
                                                  for i in range(num_blocks)):
            names.append(name + (" (prop_attn=False)" if method.proportional_attention else ""))
    return names


def check_model(model: nn.Module, method: Method) -> None:
    """Refuse what this adapter would run wrongly, naming the reason and the methods that work."""
    for i, layer in enumerate(model.layers):
        if not (_is(layer, "VimBlock") and _is(layer.mixer, "BiMambaMixer")):
            raise ValueError(f"layer {i} is {type(layer).__name__}; the Vim adapter supports models/vim.py VimBlock")
    works = f"methods that work on Vision Mamba: {', '.join(methods_that_work(max(24, len(model.layers))))}"
    missing = Need.NOTHING
    for need in (method.needs(i) for i in range(method.num_blocks)):
        missing |= need & ~PROVIDES
    if missing or method.stage != "after_attention":
        what = f"needs {missing} from attention" if missing else f"acts at stage {method.stage!r} (on attention)"
        raise ValueError(f"method {method.name!r} {what}, but a Vision Mamba block has no attention map "
                         f"(it gives token features and the SSM's token importance); {works}")
    if method.proportional_attention:
        raise ValueError(f"method {method.name!r} with prop_attn=True weights attention by token size, but a "
                         f"Vision Mamba block has no attention: pass prop_attn=False; {works}")


def install(model: nn.Module, method: Method, trace_source: bool, restore: Optional[Restore] = None) -> None:
    if restore is not None:
        raise ValueError("mode='restore' is not available on Vision Mamba: its blocks carry a hidden state and a "
                         "residual that would both need restoring; use mode='reduce'")
    patch_classes(model, model.layers, _Patch(method, trace_source, model.class_token_index), ReducingVisionMamba,
                  ReducingVimBlock)


def uninstall(model: nn.Module) -> None:
    unpatch_classes(model, model.layers)
