"""Mamba's selective scan (S6) as one op: the token mixer of Vision Mamba.

    δ_t = softplus(delta_t + delta_bias)
    h_t = exp(δ_t·s_t·A) ⊙ h_{t-1} + δ_t·u_t·B_t        (per channel d: A[d] ∈ R^N, h ∈ R^N)
    y_t = C_t·h_t + D·u_t,   out_t = y_t · silu(z_t)

``s_t`` (``decay_steps``) is 1 in Mamba; token reduction sets it to the number
of original tokens a kept token stands for in the scan order, so the state
decays across a pruned gap as it did over the tokens that were there
(ToP-ViM's hidden-state alignment, see ``tokenreduce.methods.top_vim``).

Registered as ``tokenreduce::selective_scan`` (``torch.library``) so that
fvcore sees one op with its own FLOP handle (``tokenreduce.flops``) and
``torch.compile`` / ``torch.export`` keep it whole; when a gradient is needed
the same code runs under autograd instead. On CUDA with ``mamba_ssm``
importable (and no decay steps, which its kernel has no input for) the op runs
``mamba_ssm``'s fused kernel; otherwise the chunked PyTorch form below, in fp32
like the kernel.

The chunked form splits the L steps into K chunks of T and is exact (the same
sums as the sequential recurrence, float rounding apart): (1) the recurrence
runs inside every chunk at once from a zero state (T steps over [B, K, D, N]);
(2) the chunk-end states are carried across chunks (K steps over [B, D, N]),
each decayed by its chunk's total exp(A·Σδ·s); (3) each chunk's incoming state,
decayed to every step, is read out and added. About T + 2K Python steps
instead of L, for about twice the arithmetic of the sequential loop, so it
pays only where per-op overhead dominates: small steps on the CPU (tiny models,
tests) and any GPU run without ``mamba_ssm``; at Vim's real sizes on the CPU
the per-token loop (one chunk) is the faster exact form and is what runs.
``tools/benchmark_scan.py`` measures the forms side by side.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the fused CUDA kernel, when installed (never required)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan
except ImportError:
    _mamba_selective_scan = None

# CPU, one thread, Vim's 197 tokens (tools/benchmark_scan.py, busy machine): the
# chunked form beats the per-token loop only while one step of the loop is a
# small tensor (B·D·N up to ~4096 elements: 1.4-2x faster), where per-op
# overhead dominates; at Vim's real sizes the loop's small, cache-resident steps
# win (chunked 0.2-0.5x). 2-3 chunks never pay for the extra read-out pass.
LOOP_STEP_ELEMENTS = 4096
CHUNKED_STEP_ELEMENTS = 1 << 15  # what one chunked step may cover
MIN_CHUNKS = 4


def chunk_count(batch: int, length: int, channels: int, state: int, on_gpu: bool = False) -> int:
    """K: up to sqrt(L) chunks where per-op overhead dominates (small steps on the
    CPU; on a GPU every op is a kernel launch), else 1 (the per-token loop)."""
    if on_gpu:
        return max(1, math.isqrt(length))
    step = batch * channels * state
    if step > LOOP_STEP_ELEMENTS:
        return 1
    chunks = min(math.isqrt(length), CHUNKED_STEP_ELEMENTS // step)
    return chunks if chunks >= MIN_CHUNKS else 1


def chunked_scan(du: Tensor, decay: Tensor, A: Tensor, B: Tensor, C: Tensor, num_chunks: int) -> Tensor:
    """y_t = C_t·h_t with h_t = exp(decay_t·A) ⊙ h_{t-1} + du_t·B_t, h_0 = 0.

    ``du``, ``decay``: [b, l, d]; ``A``: [d, n]; ``B``, ``C``: [b, l, n] → y [b, l, d].
    ``num_chunks`` 1 is the sequential loop; any value gives the same sums.
    """
    batch, length, channels = du.shape
    state = A.shape[1]
    num_chunks = max(1, min(num_chunks, length))
    steps = -(-length // num_chunks)
    num_chunks = -(-length // steps)
    pad = num_chunks * steps - length
    if pad:  # zero decay (exp(0) = 1) and zero input leave the state as it is
        du, decay, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (du, decay, B, C))
    du, decay = (t.view(batch, num_chunks, steps, channels) for t in (du, decay))
    B, C = (t.view(batch, num_chunks, steps, state) for t in (B, C))
    h = du.new_zeros(batch, num_chunks, channels, state)
    outputs = []
    for t in range(steps):
        step_input = du[:, :, t, :, None] * B[:, :, t, None, :]
        h = torch.addcmul(step_input, torch.exp(decay[:, :, t, :, None] * A), h)
        outputs.append(h @ C[:, :, t, :, None])
    if num_chunks > 1:
        chunk_decay = torch.exp(decay.sum(2)[..., None] * A)
        carried = [h.new_zeros(batch, channels, state)]
        for k in range(num_chunks - 1):
            carried.append(torch.addcmul(h[:, k], chunk_decay[:, k], carried[-1]))
        incoming = torch.stack(carried, 1)
        elapsed = decay.cumsum(2)
        outputs = [out + (torch.exp(elapsed[:, :, t, :, None] * A) * incoming) @ C[:, :, t, :, None]
                   for t, out in enumerate(outputs)]
    y = torch.cat(outputs, -1).transpose(2, 3).reshape(batch, num_chunks * steps, channels)
    return y[:, :length]


def _pytorch_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                  delta_bias: Tensor, decay_steps: Optional[Tensor]) -> Tensor:
    dtype = u.dtype
    u, delta, z = (t.float().transpose(1, 2) for t in (u, delta, z))
    B, C = (t.float().transpose(1, 2) for t in (B, C))
    delta = F.softplus(delta + delta_bias.float())
    decay = delta if decay_steps is None else delta * decay_steps.float()[:, :, None]
    A = A.float()
    chunks = chunk_count(u.shape[0], u.shape[1], u.shape[2], A.shape[1], on_gpu=u.is_cuda)
    y = chunked_scan(delta * u, decay, A, B, C, chunks)
    out = (y + u * D.float()) * F.silu(z)
    return out.transpose(1, 2).to(dtype)


def _scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
          delta_bias: Tensor, decay_steps: Optional[Tensor]) -> Tensor:
    if _mamba_selective_scan is not None and u.is_cuda and decay_steps is None:
        return _mamba_selective_scan(u, delta, A, B, C, D.float(), z=z, delta_bias=delta_bias.float(),
                                     delta_softplus=True)
    return _pytorch_scan(u, delta, A, B, C, D, z, delta_bias, decay_steps)


@torch.library.custom_op("tokenreduce::selective_scan", mutates_args=())
def _selective_scan_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                       delta_bias: Tensor, decay_steps: Optional[Tensor]) -> Tensor:
    return _scan(u, delta, A, B, C, D, z, delta_bias, decay_steps)


@_selective_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, decay_steps):
    return torch.empty_like(u)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                   delta_bias: Tensor, decay_steps: Optional[Tensor] = None) -> Tensor:
    """Mamba's ``selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)``.

    ``u``, ``delta``, ``z``: [b, d, l]; ``A``: [d, n]; ``B``, ``C``: [b, n, l];
    ``D``, ``delta_bias``: [d]; ``decay_steps``: [b, l] or None (all ones).
    Returns [b, d, l] in ``u``'s dtype.

    Without gradients (inference, FLOP counting, export) this is the one op
    ``tokenreduce::selective_scan``; when a gradient is needed it runs the same
    code under autograd (``mamba_ssm``'s kernel has its own backward).
    """
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _scan(*inputs, decay_steps)
    return torch.ops.tokenreduce.selective_scan(u, delta, A, B, C, D, z, delta_bias, decay_steps)


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor,
                             delta_bias: Tensor, decay_steps: Optional[Tensor] = None) -> Tensor:
    """The definition: the recurrence one token at a time, in fp32 or wider (for tests)."""
    dtype = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C, D, z, delta_bias = (t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias))
    delta = F.softplus(delta + delta_bias[:, None])
    decay = delta if decay_steps is None else delta * decay_steps.to(dtype)[:, None, :]
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = torch.exp(decay[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return (torch.stack(ys, -1) + u * D[:, None]) * F.silu(z)
