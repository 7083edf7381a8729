"""Token Transforming: the many-to-many W by hand, its limits, sizes, options and FLOPs."""
import math

import pytest
import timm
import torch

import tokenreduce
from tokenreduce.flops import flop_analysis
from tokenreduce.methods.base import Need
from tokenreduce.methods.token_transforming import tokens_to_transform, transform_reduction
from tokenreduce.reduction import Reduction

from conftest import input_for, make_vit


def _hand_case():
    """1 prefix + 5 patch tokens. Class attention ranks tokens 2 > 4 > 5 > 1 > 3,
    so with r=2 the anchors are 2, 4, 5 and tokens 1, 3 are transformed away.
    The patch keys sum to zero, so centring leaves them as they are."""
    metric = torch.tensor([[[1.0, 1.0],  # prefix (not part of the centring)
                            [0.6, -0.5],  # 1: cos to anchors 2, 4, 5 = 0.6/n, -0.5/n, -0.6/n (n = |(0.6, 0.5)|)
                            [1.0, 0.0],  # 2 (anchor)
                            [-0.6, -0.5],  # 3: cos = -0.6/n, -0.5/n, 0.6/n
                            [0.0, 1.0],  # 4 (anchor)
                            [-1.0, 0.0]]])  # 5 (anchor)
    importance = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.2]])
    # Both transformed tokens have a cos gap of 1.1/n between their two best
    # anchors; exp(gap / T) = 3 gives weights 3/4 and 1/4.
    temperature = 1.1 / math.sqrt(0.61) / math.log(3.0)
    return metric, importance, temperature


def test_hand_computed_weights_outputs_and_sizes():
    metric, importance, temperature = _hand_case()
    reduction = transform_reduction(metric, importance, r=2, k=2, temperature=temperature, num_prefix_tokens=1)
    assert reduction.num_out == 4
    # entries: prefix, anchors 2, 4, 5 (spatial order), then token 1 -> (2, 4), token 3 -> (5, 4)
    assert reduction.in_index.tolist() == [[0, 2, 4, 5, 1, 1, 3, 3]]
    assert reduction.out_index.tolist() == [[0, 1, 2, 3, 1, 2, 3, 2]]
    assert torch.allclose(reduction.mass, torch.tensor([[1.0, 1, 1, 1, 0.75, 0.25, 0.75, 0.25]]))

    x = torch.randn(1, 6, 3)
    sizes = torch.tensor([[[1.0], [2.0], [1.0], [1.0], [3.0], [1.0]]])
    out, sizes_out = reduction.apply(x, sizes)
    x0, x1, x2, x3, x4, x5 = x[0]
    expected = torch.stack([
        x0,
        (1 * x2 + 0.75 * 2 * x1) / 2.5,
        (3 * x4 + 0.25 * 2 * x1 + 0.25 * 1 * x3) / 3.75,
        (1 * x5 + 0.75 * 1 * x3) / 1.75,
    ])
    assert torch.allclose(out[0], expected, atol=1e-6)
    assert torch.equal(out[0, 0], x0)  # the prefix token passes bit-exactly
    assert torch.allclose(sizes_out.flatten(), torch.tensor([1.0, 2.5, 3.75, 1.75]))
    assert sizes_out.sum() == pytest.approx(sizes.sum().item())  # 9 patches in, 9 out

    # Each input's patches are shared out in full: the source map's columns sum to 1.
    source = reduction.carry(torch.eye(6).unsqueeze(0))
    assert torch.allclose(source.sum(1), torch.ones(1, 6))


def test_k_one_is_a_plain_merge_into_the_nearest_anchor():
    torch.manual_seed(0)
    batch, prefix, patches, r = 3, 2, 12, 5
    metric = torch.randn(batch, prefix + patches, 8)
    importance = torch.rand(batch, patches)
    x = torch.randn(batch, prefix + patches, 16)
    sizes = torch.randint(1, 5, (batch, prefix + patches, 1)).float()
    sizes[:, :prefix] = 1

    # The same assignment built independently: anchors = top importance, kept in
    # spatial order; every other patch token goes to its most similar anchor.
    anchors = importance.topk(patches - r, dim=1).indices.sort(dim=1).values + prefix
    centred = metric - metric[:, prefix:].mean(dim=1, keepdim=True)
    unit = centred / centred.norm(dim=-1, keepdim=True)
    out_index = torch.empty(batch, prefix + patches, dtype=torch.long)
    for b in range(batch):
        cos = unit[b] @ unit[b, anchors[b]].T
        out_index[b] = prefix + cos.argmax(dim=1)
        out_index[b, anchors[b]] = torch.arange(prefix, patches - r + prefix)
        out_index[b, :prefix] = torch.arange(prefix)
    expected = Reduction.merge(out_index, prefix + patches - r).apply(x, sizes)

    got = transform_reduction(metric, importance, r, k=1, temperature=0.1, num_prefix_tokens=prefix).apply(x, sizes)
    assert torch.allclose(got[0], expected[0], atol=1e-6)
    assert torch.equal(got[1], expected[1])


def test_identical_tokens_are_unchanged_and_sizes_conserved():
    token = torch.randn(5)
    x = token.expand(2, 10, 5).clone()
    x[:, 0] = torch.randn(5)  # the class token differs
    metric = torch.randn(8).expand(2, 10, 8).clone()
    sizes = torch.rand(2, 10, 1) + 0.5
    importance = torch.rand(2, 9)
    out, sizes_out = transform_reduction(metric, importance, r=4, k=3, temperature=0.1,
                                         num_prefix_tokens=1).apply(x, sizes)
    assert out.shape == (2, 6, 5)
    assert torch.equal(out[:, 0], x[:, 0])
    assert torch.allclose(out[:, 1:], token.expand(2, 5, 5), atol=1e-6)
    assert torch.allclose(sizes_out.sum(1), sizes.sum(1))


def test_k_larger_than_the_anchors_and_token_count_rule():
    metric, importance, temperature = _hand_case()
    reduction = transform_reduction(metric, importance, r=4, k=3, temperature=temperature, num_prefix_tokens=1)
    assert reduction.num_out == 2  # one anchor: every patch token goes to it
    _, sizes = reduction.apply(torch.randn(1, 6, 3), None)
    assert sizes.flatten().tolist() == [1.0, 5.0]
    assert tokens_to_transform(7, 196) == 7
    assert tokens_to_transform(0.25, 147) == 36  # floor
    assert tokens_to_transform(500, 10) == 9  # at least one anchor stays


def test_needs_keys_and_class_row_only_at_active_blocks():
    model = tokenreduce.apply(timm.create_model("deit_tiny_patch16_224", depth=6), "token_transforming",
                              blocks=(1, 4))
    method = tokenreduce.applied_method(model)
    active = Need.KEYS | Need.CLS_ATTENTION  # never Need.ATTENTION: no N×N map is formed
    assert [method.needs(i) for i in range(6)] == [Need.NOTHING, active, Need.NOTHING, Need.NOTHING, active,
                                                   Need.NOTHING]
    tokenreduce.apply(model, "token_transforming")  # blocks=None: from depth // 4 on
    assert [tokenreduce.applied_method(model).needs(i) for i in range(6)] == [Need.NOTHING] + [active] * 5
    tokenreduce.apply(model, "token_transforming", r=0)
    assert all(tokenreduce.applied_method(model).needs(i) == Need.NOTHING for i in range(6))


def test_sizes_conserved_and_token_counts_on_a_real_model():
    model = timm.create_model("deit_tiny_patch16_224").eval()
    tokenreduce.apply(model, "token_transforming", trace_source=True)
    model(torch.randn(2, 3, 224, 224))
    counts = tokenreduce.token_counts(model)
    expected = [197] * 4  # blocks 3..11 each transform floor(0.18 · patches) away
    for _ in range(3, 12):
        expected.append(expected[-1] - math.floor(0.18 * (expected[-1] - 1)))
    assert counts == expected == [197, 197, 197, 197, 162, 134, 111, 92, 76, 63, 52, 43, 36]
    state = model._tokenreduce.state
    assert torch.allclose(state.sizes.sum(1), torch.full((2, 1), 197.0))
    source = tokenreduce.source_map(model)
    assert torch.allclose(source.sum(1), torch.ones(2, 197), atol=1e-5)  # every input patch fully shared out
    assert torch.allclose(source.sum(-1, keepdim=True), state.sizes, atol=1e-4)
    assert (source[:, 1:] > 0).sum(-1).max() > 1  # outputs really combine several inputs
    assert torch.equal(source[:, 0, 0], torch.ones(2))


def test_sizes_conserved_on_every_variant(variant):
    """The adapter matrix's size check, to float rounding: soft weights make sizes
    fractional, so their sum is 54 ± 1e-5 rather than exactly 54."""
    model = make_vit(variant)
    x = input_for(model)
    tokenreduce.apply(model, "token_transforming", trace_source=True, r=0.3, blocks=(1, 2), k=3)
    model(x)
    counts = tokenreduce.token_counts(model)
    sizes = model._tokenreduce.state.sizes
    assert counts[-1] < counts[0]
    assert torch.allclose(sizes.sum(1), torch.full((x.shape[0], 1), float(counts[0])), rtol=1e-6)
    assert torch.allclose(tokenreduce.source_map(model).sum(1), torch.ones(x.shape[0], counts[0]), atol=1e-6)


def test_transform_runs_on_every_prefix_layout():
    for variant in ("deit_distilled", "registers"):
        model = make_vit(variant)
        tokenreduce.apply(model, "token_transforming", r=3, blocks=(0, 2), k=2)
        assert model(torch.randn(1, 3, *model.patch_embed.img_size)).isfinite().all()
        counts = tokenreduce.token_counts(model)
        assert counts[1] == counts[0] - 3 and counts[3] == counts[0] - 6


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(r=-1), "r=-1 is out of range"),
        (dict(r=1.0), "r=1.0 is out of range: allowed [0.0, 1.0)"),
        (dict(r="half"), "r='half' must be an int (tokens) or a float (fraction)"),
        (dict(k=0), "k=0 is out of range"),
        (dict(k=2.0), "k=2.0 must be an int"),
        (dict(temperature=0.0), "temperature=0.0 is out of range: allowed (0.0, inf]"),
        (dict(blocks=[3, 12]), "block indices [12] out of range 0..11"),
        (dict(prop_attn="yes"), "prop_attn='yes' must be True or False"),
        (dict(keep_rate=0.5), "unknown option(s) ['keep_rate'] for method 'token_transforming'"),
    ],
)
def test_bad_options_name_the_value_and_what_is_allowed(options, message):
    model = timm.create_model("deit_tiny_patch16_224")
    with pytest.raises(ValueError) as error:
        tokenreduce.apply(model, "token_transforming", **options)
    assert message in str(error.value)


def test_needs_a_class_token():
    model = timm.create_model("vit_tiny_patch16_224", depth=2, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="needs a class token"):
        tokenreduce.apply(model, "token_transforming")


def test_defaults_listed():
    assert tokenreduce.available_methods()["token_transforming"] == {
        "r": 0.18, "blocks": None, "k": 4, "temperature": 0.01, "prop_attn": True}


def test_flops_forty_percent_lower_on_deit_small_and_transform_cost_counted():
    model = timm.create_model("deit_small_patch16_224").eval()
    unreduced = tokenreduce.count_flops(model)
    tokenreduce.apply(model, "token_transforming")
    reduced = tokenreduce.count_flops(model)
    assert unreduced == pytest.approx(4.608, abs=0.001)
    assert reduced == pytest.approx(2.747, abs=0.001)
    assert 1 - reduced / unreduced == pytest.approx(0.40, abs=0.01)  # the paper's -40 %

    # The transform's own work, exactly: index_add over prefix + M + r·k entries
    # for the features (C=384) and the sizes (1); the class-token row q·Kᵀ
    # (6 heads × 64 × N) and the r×M key cosines (× 64) as matmuls.
    by_op = flop_analysis(model, torch.zeros(1, 3, 224, 224)).by_operator()
    tokens_in = [197, 162, 134, 111, 92, 76, 63, 52, 43]  # entering blocks 3..11
    removed = [tokens_to_transform(0.18, n - 1) for n in tokens_in]
    assert [n - r for n, r in zip(tokens_in, removed)] == tokens_in[1:] + [36]
    entries = sum(n + r * 3 for n, r in zip(tokens_in, removed))
    assert by_op["index_add_"] == entries * (384 + 1)
    cosines = sum(r * (n - 1 - r) * 64 for n, r in zip(tokens_in, removed))
    assert by_op["matmul"] == sum(6 * 64 * n for n in tokens_in) + cosines
