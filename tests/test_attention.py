"""AttentionMaps: received attention from query chunks and per-map functions over
chunks of maps equal the same computations on the explicit N×N probabilities,
whatever the chunk size, and no piece exceeds the budget."""
import pytest
import torch

from tokenreduce.attention import AttentionMaps

BATCH, HEADS, TOKENS, DIM, SCALE = 3, 4, 11, 8, 8 ** -0.5


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(BATCH, HEADS, TOKENS, DIM, generator=generator) for _ in range(2))
    sizes = torch.randint(1, 5, (BATCH, TOKENS), generator=generator).float()
    return q, k, sizes.log()[:, None, None, :]


def explicit(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return ((q * SCALE) @ k.transpose(-2, -1) + bias).softmax(dim=-1)


# budgets: one query row / one map at a time, a few heads of one sample, whole samples, everything
BUDGETS = [1, 3 * TOKENS * TOKENS, 6 * TOKENS * TOKENS, BATCH * HEADS * TOKENS * TOKENS]


@pytest.mark.parametrize("budget", BUDGETS)
def test_received_attention_is_the_mean_over_queries_or_a_weighted_sum(budget):
    q, k, bias = inputs()
    probs = explicit(q, k, bias)
    maps = AttentionMaps(q, k, SCALE, bias, max_elements=budget)
    received = maps.received()
    assert received.shape == (BATCH, HEADS, TOKENS) and received.dtype == torch.float32
    assert torch.allclose(received, probs.mean(dim=2), atol=1e-7)
    weights = torch.rand(TOKENS)
    assert torch.allclose(maps.received(weights), weights @ probs, atol=1e-6)  # one Page Rank step sᵀP


@pytest.mark.parametrize("budget", BUDGETS)
def test_per_map_restricted_to_tokens_is_the_renormalised_submatrix(budget):
    q, k, bias = inputs(1)
    probs = explicit(q, k, bias)
    tokens = torch.tensor([[0, 2, 3, 7, 10], [1, 2, 4, 5, 9], [0, 1, 6, 8, 9]])
    index = tokens[:, None, :, None]
    rows = probs.gather(2, index.expand(-1, HEADS, -1, TOKENS))
    sub = rows.gather(3, index.transpose(2, 3).expand(-1, HEADS, tokens.shape[1], -1))
    expected = sub / sub.sum(dim=-1, keepdim=True)  # softmax over the remaining keys
    maps = AttentionMaps(q, k, SCALE, bias, max_elements=budget)
    pieces = []

    def record(graph: torch.Tensor) -> torch.Tensor:
        pieces.append(graph.shape)
        return graph

    assert torch.allclose(maps.per_map(record, tokens=tokens), expected, atol=1e-6)
    assert torch.allclose(maps.per_map(lambda graph: graph), probs, atol=1e-6)
    one_map = tokens.shape[1] ** 2
    assert all(shape.numel() <= max(budget, one_map) for shape in pieces)
    assert sum(shape[0] * shape[1] for shape in pieces) == BATCH * HEADS  # every map exactly once


def test_chunks_follow_the_budget():
    q, k, bias = inputs()
    shapes = []
    maps = AttentionMaps(q, k, SCALE, bias, max_elements=4 * TOKENS * TOKENS)  # two maps (logits + softmax)
    maps.per_map(lambda graph: shapes.append(graph.shape) or graph.sum(-1))
    assert shapes == [(1, 2, TOKENS, TOKENS), (1, 2, TOKENS, TOKENS)] * BATCH
    shapes.clear()
    maps = AttentionMaps(q, k, SCALE, bias, max_elements=4 * HEADS * TOKENS * TOKENS)  # two samples
    assert maps.per_map(lambda graph: shapes.append(graph.shape) or graph.sum(-1)).shape == (BATCH, HEADS, TOKENS)
    assert shapes == [(2, HEADS, TOKENS, TOKENS), (1, HEADS, TOKENS, TOKENS)]


def test_no_gradient_and_float32_under_autocast():
    q, k, bias = inputs()
    q.requires_grad_(True)
    maps = AttentionMaps(q, k, SCALE, bias, max_elements=TOKENS)
    assert not maps.received().requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = AttentionMaps(q.detach().bfloat16(), k.bfloat16(), SCALE, bias, max_elements=TOKENS)
        received = half.received()
        graph = half.per_map(lambda g: g)
    assert received.dtype == graph.dtype == torch.float32
    assert torch.allclose(received, explicit(q.detach(), k, bias).mean(dim=2), atol=2e-2)
