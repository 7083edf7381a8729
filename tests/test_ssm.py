"""The selective scan: every chunked form against the sequential recurrence (fp64),
forward and backward, decay steps, and the one-op view fvcore / export see."""
import math

import pytest
import torch
import torch.nn.functional as F

from tokenreduce.flops import flop_analysis
from tokenreduce.ssm import chunk_count, chunked_scan, selective_scan, selective_scan_reference

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def scan_inputs(batch: int = 2, channels: int = 12, length: int = 37, state: int = 16, seed: int = 0):
    """Inputs with Mamba's ranges: A = -(1..N)·rand, small dt, so decays span 1e-7..1."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, length, generator=g),
        torch.randn(batch, channels, length, generator=g) - 1.0,
        -torch.rand(channels, state, generator=g) * torch.arange(1, state + 1) - 0.05,
        torch.randn(batch, state, length, generator=g),
        torch.randn(batch, state, length, generator=g),
        torch.randn(channels, generator=g),
        torch.randn(batch, channels, length, generator=g),
        0.5 * torch.randn(channels, generator=g),
    ]


def steps_for(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 5, (batch, length), generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("with_steps", [False, True])
def test_op_matches_the_sequential_recurrence_forward_and_backward(with_steps):
    inputs = scan_inputs()
    steps = steps_for(2, 37) if with_steps else None
    exact = [t.double().requires_grad_() for t in inputs]
    expected = selective_scan_reference(*exact, steps)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, exact, grad)
    ours = [t.clone().requires_grad_() for t in inputs]
    out = selective_scan(*ours, steps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for name, g, e in zip(INPUT_NAMES, torch.autograd.grad(out, ours, grad.float()), expected_grads):
        torch.testing.assert_close(g.double(), e, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")
    with torch.no_grad():  # the registered op (no autograd) gives the same numbers
        assert torch.equal(selective_scan(*inputs, steps), out.detach())


@pytest.mark.parametrize("num_chunks", [1, 3, 4, 6, 7, 37, 50])
def test_every_chunk_count_gives_the_sequential_sums(num_chunks):
    u, delta, A, B, C = scan_inputs(length=37)[:5]
    delta = F.softplus(delta).transpose(1, 2)
    args = (delta * u.transpose(1, 2), delta * steps_for(2, 37)[..., None], A, B.transpose(1, 2), C.transpose(1, 2))
    exact = chunked_scan(*(t.double() for t in args), 1)
    torch.testing.assert_close(chunked_scan(*args, num_chunks).double(), exact, atol=1e-5, rtol=1e-5)


def test_unit_decay_steps_are_mambas_scan_exactly():
    inputs = scan_inputs()
    with torch.no_grad():
        assert torch.equal(selective_scan(*inputs, torch.ones(2, 37)), selective_scan(*inputs))


def test_low_precision_inputs_are_scanned_in_fp32():
    inputs = scan_inputs()
    low = [t.bfloat16() if t.dim() == 3 else t for t in inputs]
    with torch.no_grad():
        out = selective_scan(*low)
    assert out.dtype == torch.bfloat16
    expected = selective_scan_reference(*[t.double() for t in low])
    torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)  # bf16 output rounding only


def test_chunk_count_uses_chunks_only_for_small_steps():
    assert chunk_count(2, 197, 32, 16) == math.isqrt(197)  # tiny model: per-op overhead dominates
    assert chunk_count(1, 197, 768, 16) == 1  # Vim-S: the per-token loop is faster on CPU
    assert chunk_count(1, 197, 768, 16, on_gpu=True) == math.isqrt(197)
    assert chunk_count(2, 197, 512, 8) == 1 and chunk_count(1, 197, 128, 16) == 14


class ScanModule(torch.nn.Module):
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        channels = u.shape[1]
        bc = u[:, :4]
        return selective_scan(u, u, -torch.ones(channels, 4), bc, bc, torch.ones(channels), u, torch.zeros(channels))


def test_one_op_for_fvcore_and_export_with_its_flop_count():
    x = torch.randn(3, 8, 5)
    with torch.no_grad():
        analysis = flop_analysis(ScanModule(), x)
        assert analysis.by_operator()["selective_scan"] == 2 * 3 * 8 * 5 * 4  # (update + read-out) x B·D·L·N
        program = torch.export.export(ScanModule(), (x,))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("tokenreduce.selective_scan.default") == 1
    torch.testing.assert_close(program.module()(x), ScanModule()(x))
