"""Graph export of reduced models (ONNX, torch.export): when a forward is being
captured, and a clear error where something cannot be captured correctly.

Eager code may loop over the samples of a batch or bake shapes into Python
ints; a captured graph must work for every batch size. Code with such an eager
fast path asks :func:`is_exporting` and takes its shape-generic form then.
:func:`export_model` and :func:`load_exported` write and run an export with a
dynamic batch dimension (``tools/export.py``, the tests).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

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


@contextmanager
def _export_errors_surface() -> Iterator[None]:
    """An :class:`ExportError` raised inside the model reaches the caller as itself,
    not wrapped in the dynamo ONNX exporter's own error."""
    try:
        yield
    except ExportError:
        raise
    except Exception as error:
        cause: Optional[BaseException] = error
        while cause is not None and not isinstance(cause, ExportError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


EXPORTERS = ("onnx", "onnx-dynamo", "torch-export")
SUFFIXES = {"onnx": ".onnx", "onnx-dynamo": ".onnx", "torch-export": ".pt2"}


def export_model(model: torch.nn.Module, example: torch.Tensor, path: Union[str, Path], exporter: str = "onnx",
                 opset: int = 17) -> Path:
    """Write ``model`` (eval mode, no gradient) traced on ``example`` [B, ...] with a
    dynamic batch dimension: ``"onnx"`` (``torch.onnx.export``, TorchScript
    exporter), ``"onnx-dynamo"`` (``torch.onnx.export(dynamo=True)``, needs
    onnxscript) or ``"torch-export"`` (``torch.export`` saved as .pt2)."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter={exporter!r} must be one of {EXPORTERS}")
    path = Path(path)
    if path.suffix != SUFFIXES[exporter]:
        raise ValueError(f"path {str(path)!r}: exporter {exporter!r} writes a {SUFFIXES[exporter]} file")
    batch = {0: torch.export.Dim("batch")}
    with torch.no_grad(), _export_errors_surface():
        if exporter == "onnx":
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=["output"], dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
        elif exporter == "onnx-dynamo":
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=max(opset, 18),
                              input_names=["images"], output_names=["output"], dynamic_shapes=(batch,), verbose=False)
        else:
            torch.export.save(torch.export.export(model, (example,), dynamic_shapes=(batch,)), str(path))
    return path


def load_exported(path: Union[str, Path], threads: Optional[int] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function images → output of an exported file: ONNX under ONNX Runtime
    (CPU, ``threads`` intra-op threads; None: its default), .pt2 via ``torch.export.load``."""
    path = Path(path)
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()
        return lambda images: module(images)
    if path.suffix != ".onnx":
        raise ValueError(f"path {str(path)!r} must be a .onnx or .pt2 file")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.detach().cpu().numpy()})[0])

    return run
