"""Zero-TPrune: WPR, head combination with the variance filter, the S-stage, the
whole I′ → S → I layer, options and FLOPs, on hand-computed cases."""
import math

import pytest
import timm
import torch

import tokenreduce
from tokenreduce.attention import AttentionMaps
from tokenreduce.methods.base import Need
from tokenreduce.methods.zero_tprune import (
    combine_heads,
    default_iterations,
    head_variance,
    similarity_prune,
    start_scores,
    weighted_page_rank,
    zero_tprune_reduction,
)

# A birth-death chain: detailed balance gives the stationary distribution by hand,
# pi1/pi0 = 0.5/0.25, pi2/pi1 = 0.5/0.25, pi3/pi2 = 0.5/0.5  ->  pi = [1, 2, 4, 4] / 11.
CHAIN = torch.tensor([
    [0.50, 0.50, 0.00, 0.00],
    [0.25, 0.25, 0.50, 0.00],
    [0.00, 0.25, 0.25, 0.50],
    [0.00, 0.00, 0.50, 0.50],
])
STATIONARY = torch.tensor([1.0, 2.0, 4.0, 4.0]) / 11


def test_start_scores_cls_at_sqrt_n_or_uniform():
    assert torch.allclose(start_scores(4, 1, True, torch.device("cpu")), torch.tensor([0.4, 0.2, 0.2, 0.2]))
    assert torch.allclose(start_scores(9, 2, True, torch.device("cpu")), torch.tensor([3.0, 3, 1, 1, 1, 1, 1, 1, 1]) / 13)
    assert torch.allclose(start_scores(4, 1, False, torch.device("cpu")), torch.full((4,), 0.25))


def test_one_wpr_iteration_is_a_transpose_times_s():
    start = torch.tensor([0.4, 0.2, 0.2, 0.2])  # class token at sqrt(4) = 2 times the others
    # s'_j = sum_i s_i A_ij, by hand:
    expected = torch.tensor([0.4 * 0.5 + 0.2 * 0.25, 0.4 * 0.5 + 0.2 * 0.25 + 0.2 * 0.25,
                             0.2 * 0.5 + 0.2 * 0.25 + 0.2 * 0.5, 0.2 * 0.5 + 0.2 * 0.5])
    assert torch.allclose(expected, torch.tensor([0.25, 0.30, 0.25, 0.20]))
    other = CHAIN.flip(0, 1)  # a second head (still row-stochastic)
    attention = torch.stack([torch.stack([CHAIN, other]), torch.stack([other, CHAIN])])  # [B=2, H=2, 4, 4]
    scores = weighted_page_rank(attention, start, 1)
    assert scores.shape == (2, 2, 4)
    assert torch.allclose(scores[0, 0], expected) and torch.allclose(scores[1, 1], expected)
    assert torch.allclose(scores[0, 1], other.T @ start) and torch.allclose(scores[1, 0], other.T @ start)
    assert torch.allclose(weighted_page_rank(attention, start, 2)[0, 0], CHAIN.T @ (CHAIN.T @ start))


@pytest.mark.parametrize("cls_start", [True, False])
def test_wpr_converges_to_the_stationary_distribution(cls_start):
    start = start_scores(4, 1, cls_start, torch.device("cpu"))
    scores = weighted_page_rank(CHAIN[None, None], start, 200)[0, 0]
    assert torch.allclose(scores, STATIONARY, atol=1e-6)
    assert torch.allclose(STATIONARY @ CHAIN, STATIONARY)  # the left eigenvector for eigenvalue 1


# Three heads over four tokens: uniform (variance 0), spread (0.2), peaked (3).
HEADS = torch.tensor([[[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.0, 1.0]]])


def test_head_variance_of_mean_normalised_scores():
    # head 1 / mean: [0.4, 0.8, 1.2, 1.6] -> variance (0.36 + 0.04 + 0.04 + 0.36) / 4 = 0.2
    # head 2 / mean: [0, 0, 0, 4]         -> variance (1 + 1 + 1 + 9) / 4 = 3
    assert torch.allclose(head_variance(HEADS), torch.tensor([[0.0, 0.2, 3.0]]), atol=1e-6)
    assert torch.allclose(head_variance(HEADS * 7), head_variance(HEADS), atol=1e-6)  # scale-free


def test_heads_combine_by_root_mean_square_over_the_heads_the_filter_keeps():
    h0, h1, h2 = HEADS[0]
    all_heads = ((h0**2 + h1**2 + h2**2) / 3).sqrt()
    assert torch.allclose(all_heads[3], torch.tensor(math.sqrt((0.0625 + 0.16 + 1.0) / 3)))
    assert torch.allclose(combine_heads(HEADS, None)[0], all_heads)
    assert torch.allclose(combine_heads(HEADS, (0.01, 0.7))[0], h1)  # uniform and peaked heads left out
    assert torch.allclose(combine_heads(HEADS, (0.0, 0.7))[0], ((h0**2 + h1**2) / 2).sqrt())
    assert torch.allclose(combine_heads(HEADS, (0.1, 5.0))[0], ((h1**2 + h2**2) / 2).sqrt())
    # every head filtered out: all heads are used rather than nothing
    assert torch.allclose(combine_heads(HEADS, (5.0, 6.0))[0], all_heads)
    # per sample: the second sample keeps all heads, the first only head 1
    batch = torch.cat([HEADS, HEADS.flip(1)[:, [0, 0, 0]]])
    combined = combine_heads(batch, (0.01, 0.7))
    assert torch.allclose(combined[0], h1) and torch.allclose(combined[1], h2)


def test_similarity_stage_drops_the_a_token_closest_to_b():
    # importance ranks: A (less important half) = tokens 0, 2, 4; B = tokens 5, 1, 3
    importance = torch.tensor([[0.1, 0.5, 0.2, 0.6, 0.3, 0.4]])
    keys = torch.tensor([[[1.0, 0.1],    # A: almost token 1 (cos 0.995)
                          [1.0, 0.0],    # B
                          [1.0, 1.0],    # A: cos 0.707 to tokens 1 and 3
                          [0.0, 1.0],    # B
                          [0.2, -1.0],   # A: far from all of B
                          [0.0, 1.0]]])  # B: a duplicate of token 3, but B is never pruned
    assert similarity_prune(keys, importance, 1).tolist() == [[1, 2, 3, 4, 5]]
    assert similarity_prune(keys, importance, 2).tolist() == [[1, 3, 4, 5]]
    assert similarity_prune(keys, importance, 0).tolist() == [[0, 1, 2, 3, 4, 5]]
    # cosine, not dot product: scaling a key changes nothing
    assert similarity_prune(keys * torch.tensor([[[5.0], [1], [0.1], [1], [9], [1]]]), importance, 1).tolist() == [[1, 2, 3, 4, 5]]


def maps_of(attention: torch.Tensor, max_elements: int = 1) -> AttentionMaps:
    """AttentionMaps whose probabilities are the row-stochastic ``attention`` [B, H, N, N]:
    queries log A (zeros as -1e4: exp gives 0), one-hot keys, scale 1; by default
    one map at a time."""
    keys = torch.eye(attention.shape[-1]).expand(attention.shape)
    return AttentionMaps(attention.log().clamp_min(-1e4), keys, 1.0, None, max_elements)


def test_attention_maps_give_the_wpr_step_and_the_restricted_graph():
    attention = torch.stack([CHAIN, CHAIN.flip(0, 1)])[None]
    start = torch.tensor([0.4, 0.2, 0.2, 0.2])
    assert torch.allclose(maps_of(attention).received(start), weighted_page_rank(attention, start, 1), atol=1e-6)
    sub = maps_of(CHAIN[None, None]).per_map(lambda graph: graph, tokens=torch.tensor([[0, 1, 3]]))[0, 0]
    assert torch.allclose(sub, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))  # renormalised


def _layer_inputs(received: list[float] = (0.0, 3.0, 2.0, 0.5, 4.0, 3.0)):
    """CLS + 5 patch tokens, 2 heads. Nobody attends to the CLS token (it would rank last);
    token 3 gets the least attention; tokens 1 and 5 have the same key."""
    received = torch.tensor(received)
    attention = (received / received.sum()).expand(1, 2, 6, 6)
    keys = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 0], [0, 1, 0]])
    return maps_of(attention), keys.expand(1, 2, 6, 3)


def test_i_stage_drops_the_least_attended_tokens_and_never_the_prefix():
    attention, keys = _layer_inputs()
    reduction = zero_tprune_reduction(attention, keys, num_prefix_tokens=1, prune_s=0, prune_i=1, iterations=3)
    assert reduction.is_selection and reduction.in_index.tolist() == [[0, 1, 2, 4, 5]]
    reduction = zero_tprune_reduction(attention, keys, 1, prune_s=0, prune_i=4, iterations=3)
    assert reduction.in_index.tolist() == [[0, 4]]
    # two prefix tokens: token 1 is never a candidate however unimportant
    attention, keys = _layer_inputs([0.0, 0.0, 2.0, 0.5, 4.0, 3.0])
    reduction = zero_tprune_reduction(attention, keys, 2, prune_s=0, prune_i=2, iterations=3)
    assert reduction.in_index.tolist() == [[0, 1, 4, 5]]


def test_layer_runs_s_then_i_and_keeps_original_order():
    attention, keys = _layer_inputs()
    # I' ranks patch tokens 3 < 2 < 1 = 5 < 4 (A = {3, 2}, B = {1, 5, 4}); token 2's key is
    # orthogonal to B's, token 3's key (1, 1, 0) has cos 0.707 to every B key:
    # S drops token 3; I then drops the least important survivor, token 2.
    reduction = zero_tprune_reduction(attention, keys, 1, prune_s=1, prune_i=1, iterations=5)
    assert reduction.in_index.tolist() == [[0, 1, 4, 5]]
    s_only = zero_tprune_reduction(attention, keys, 1, prune_s=1, prune_i=0, iterations=5)
    assert s_only.in_index.tolist() == [[0, 1, 2, 4, 5]]
    x = torch.randn(1, 6, 4)
    out, sizes = reduction.apply(x, None)
    assert torch.equal(out, x[:, [0, 1, 4, 5]]) and torch.equal(sizes, torch.ones(1, 4, 1))


def test_default_iterations_follow_the_paper_ranges():
    assert default_iterations(12) == [50, 50, 50, 10, 10, 10, 10, 10, 10, 1, 1, 1]
    assert default_iterations(4) == [50, 50, 50, 1]


@pytest.fixture(scope="module")
def deit_tiny():
    return timm.create_model("deit_tiny_patch16_224").eval()


def test_token_counts_and_needs_at_defaults(deit_tiny):
    model = tokenreduce.apply(deit_tiny, "zero_tprune")
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    # 196 -> -29 -29 = 138 -> -21 -21 = 96 -> -14 -14 = 68 patch tokens (+ CLS)
    assert tokenreduce.token_counts(model) == [197] * 4 + [139] * 3 + [97] * 3 + [69] * 3
    method = model._tokenreduce.method
    assert [method.needs(b) for b in (0, 3, 6, 9)] == [Need.NOTHING] + [Need.ATTENTION_MAPS | Need.KEYS] * 3
    tokenreduce.apply(model, "zero_tprune", prune_s=0, locations=[2])
    assert model._tokenreduce.method.needs(2) == Need.ATTENTION_MAPS
    tokenreduce.remove(model)


def test_integer_budgets_are_capped_and_per_location():
    model = timm.create_model("deit_tiny_patch16_224", depth=4).eval()
    tokenreduce.apply(model, "zero_tprune", locations=(0, 2), prune_s=[500, 10], prune_i=[50, 5])
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    # block 0: S capped at |A| = 98, then I drops 50 -> 48; block 2: 48 - 10 - 5 = 33
    assert tokenreduce.token_counts(model) == [197, 49, 49, 34, 34]


def test_available_methods_lists_defaults():
    assert tokenreduce.available_methods()["zero_tprune"] == {
        "locations": (3, 6, 9), "prune_s": 0.15, "prune_i": 0.15, "wpr_iterations": None,
        "cls_start": True, "head_variance": (0.01, 0.7),
    }


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(locations=[3, 12]), "block indices [12] out of range 0..11"),
        (dict(prune_s=0.6), "prune_s=0.6 is out of range: allowed [0.0, 0.5]"),
        (dict(prune_i=1.0), "prune_i=1.0 is out of range: allowed [0.0, 1.0)"),
        (dict(prune_s=-3), "prune_s=-3 is out of range"),
        (dict(prune_i="10%"), "prune_i='10%' must be an int or a float"),
        (dict(prune_s=0.5, prune_i=0.5), "prune_s + prune_i = 0.5 + 0.5 must be below 1"),
        (dict(prune_s=[0.1, 0.1]), "prune_s=[0.1, 0.1] has 2 entries but there are 3 locations"),
        (dict(wpr_iterations=0), "wpr_iterations=0 is out of range"),
        (dict(wpr_iterations=[5] * 4), "has 4 entries but the model has 12 blocks"),
        (dict(wpr_iterations=2.5), "wpr_iterations=2.5 must be an int"),
        (dict(cls_start="yes"), "cls_start='yes' must be True or False"),
        (dict(head_variance=0.7), "head_variance=0.7 must be (low, high) or None"),
        (dict(head_variance=(0.7, 0.1)), "head_variance high=0.1 is out of range"),
        (dict(r=3), "unknown option(s) ['r'] for method 'zero_tprune'"),
    ],
)
def test_bad_options_name_the_value_and_what_is_allowed(deit_tiny, options, message):
    with pytest.raises(ValueError) as error:
        tokenreduce.apply(deit_tiny, "zero_tprune", **options)
    assert message in str(error.value)
    assert type(deit_tiny).__name__ == "VisionTransformer"


@pytest.fixture(scope="module")
def deit_small():
    return timm.create_model("deit_small_patch16_224").eval()


def test_flops_at_defaults_near_minus_35_percent(deit_small):
    unreduced = tokenreduce.count_flops(deit_small)
    tokenreduce.apply(deit_small, "zero_tprune")
    try:
        reduced = tokenreduce.count_flops(deit_small)
    finally:
        tokenreduce.remove(deit_small)
    assert unreduced == pytest.approx(4.61, abs=0.005)
    # The token schedule costs 3.00 GFLOPs (-34.9 %; the paper: -34.7 %) with each pruning
    # block's attention map formed once. The maps are recomputed in pieces instead: one more
    # q·kᵀ over the N tokens entering (I′) and one over the M survivors of the S-stage (I),
    # H·D = 384 multiply-adds per pair: N = 197, 139, 97 and M = 168, 118, 83.
    recomputed = 384 * (197**2 + 139**2 + 97**2 + 168**2 + 118**2 + 83**2) / 1e9
    assert reduced - recomputed == pytest.approx(3.00, abs=0.005)
    assert 1 - reduced / unreduced == pytest.approx(0.339, abs=0.003)


def test_flops_include_the_wpr_products(deit_small):
    """Each WPR iteration is H·N² multiply-adds (DeiT-S: 6 heads), counted by fvcore."""
    counts = {}
    for iterations in (1, 11):
        tokenreduce.apply(deit_small, "zero_tprune", locations=(5,), prune_s=20, prune_i=30, wpr_iterations=iterations)
        counts[iterations] = tokenreduce.count_flops(deit_small) * 1e9
    tokenreduce.remove(deit_small)
    assert counts[11] - counts[1] == pytest.approx(10 * 6 * 177**2, abs=1)  # I-stage on the 177 S-stage survivors
