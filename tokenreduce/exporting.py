"""Graph export of reduced models (ONNX, torch.export): when a forward is being
captured, and a clear error where something cannot be captured correctly.

Eager code may loop over the samples of a batch or bake shapes into Python
ints; a captured graph must work for every batch size. Code with such an eager
fast path asks :func:`is_exporting` and takes its shape-generic form then.
"""
from __future__ import annotations

import torch


class ExportError(RuntimeError):
    """Raised at export time instead of writing a graph that would compute something else."""


def is_exporting() -> bool:
    """True while ``torch.export``, ``torch.onnx.export`` (TorchScript or dynamo)
    or ``torch.jit.trace`` captures a graph."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def is_torchscript_onnx_export() -> bool:
    """True while ``torch.onnx.export(dynamo=False)`` traces the model (not under
    other TorchScript tracing, e.g. fvcore's FLOP count): ops that exporter writes
    wrongly or refuses take an equivalent form then."""
    return torch.jit.is_tracing() and torch.onnx.is_in_onnx_export()
