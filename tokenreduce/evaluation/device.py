"""The device side of a run: ``--device`` checks, autocast for ``--amp``, synchronisation."""
from __future__ import annotations

import contextlib

import torch

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``--amp`` (bf16 / fp16), or nothing for fp32."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp={amp!r}; allowed: {sorted(AMP_DTYPES)}")
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def check_device(text: str) -> torch.device:
    """``--device`` text as a torch device, or a ValueError saying what is wrong."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a timer sees it finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
