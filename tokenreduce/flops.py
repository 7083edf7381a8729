"""FLOP counting with fvcore, including the ops it skips by default.

Convention (fvcore's): one multiply-add counts as one FLOP, so numbers compare
with papers that report GMACs as "GFLOPs" (DeiT-S: 4.6; Vim-S: 5.1).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from math import prod
from typing import Any, Iterator

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::scaled_dot_product_attention``: Q·Kᵀ plus P·V multiply-adds."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    batch_heads = prod(q[:-2])
    queries, head_dim = q[-2], q[-1]
    keys, value_dim = k[-2], v[-1]
    return batch_heads * queries * keys * (head_dim + value_dim)


def index_add_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``aten::index_add``: one add per source element (the weighting multiply
    before it makes it a multiply-add): the cost of merging / transforming tokens."""
    return prod(get_shape(inputs[3]))


def selective_scan_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """``tokenreduce::selective_scan`` (Mamba's S6): per token, channel and state
    one multiply-add for the state update (h = exp(δA)·h + δBu) and one for the
    read-out (C·h). Like the attention handle, which counts Q·Kᵀ and P·V but not
    the softmax, the element-wise work around them (the discretisation exp(δA)
    and δ·B·u, the D skip, the SiLU gate) is not counted."""
    batch, channels, length = get_shape(inputs[0])
    return 2 * batch * channels * length * get_shape(inputs[2])[-1]


EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::index_add": index_add_flop_jit,
    "aten::index_add_": index_add_flop_jit,
    "tokenreduce::selective_scan": selective_scan_flop_jit,
}


def flop_analysis(model: nn.Module, inputs: torch.Tensor) -> FlopCountAnalysis:
    """fvcore analysis with this library's extra handles and quiet warnings."""
    analysis = FlopCountAnalysis(model, inputs).set_op_handle(**EXTRA_HANDLES)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


@contextmanager
def _method_modules_as_constants(model: nn.Module) -> Iterator[None]:
    """Modules a method holds in its options (DToP's exit heads) are not the model's
    submodules, so tracing meets their parameters as constants, which the tracer
    refuses while they require grad: count with their gradients off, then restore."""
    from .api import applied_method  # the api imports the adapters, which count nothing

    method = applied_method(model)
    options = getattr(method, "options", None)
    values = [getattr(options, f.name) for f in fields(options)] if is_dataclass(options) else []
    modules = [m for v in values for m in (v if isinstance(v, (list, tuple, nn.ModuleList)) else [v])
               if isinstance(m, nn.Module)]
    wanted = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    try:
        for p, _ in wanted:
            p.requires_grad_(False)
        yield
    finally:
        for p, requires_grad in wanted:
            p.requires_grad_(requires_grad)


def count_flops_per_image(model: nn.Module, images: torch.Tensor) -> list[float]:
    """GFLOPs of each of ``images`` [B, C, H, W] run alone (batch 1), as the model really runs on it.

    Why: a reduction that depends on the input (DToP's early exit) keeps a different
    number of tokens per image, and a traced batch would count the padding that
    batching adds. fvcore traces every image once (seconds each for a ViT-S)."""
    if images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _method_modules_as_constants(model):
            return [flop_analysis(model, image[None]).total() / 1e9 for image in images]
    finally:
        model.train(was_training)


def count_flops(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> float:
    """GFLOPs (multiply-adds) of one forward of a single image, as the model really runs."""
    if len(input_size) != 3 or not all(isinstance(s, int) and s > 0 for s in input_size):
        raise ValueError(f"input_size={input_size!r} must be (channels, height, width) positive ints")
    param = next(model.parameters())
    inputs = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _method_modules_as_constants(model):
            return flop_analysis(model, inputs).total() / 1e9
    finally:
        model.train(was_training)
