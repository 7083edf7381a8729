"""Hand-computed cases for each method's rule and its option validation."""
import math

import pytest
import torch

import tokenreduce
from tokenreduce.methods.evit import evit_reduction
from tokenreduce.methods.tome import r_schedule


def test_r_schedule_forms():
    assert r_schedule(13, 4) == [13, 13, 13, 13]
    assert r_schedule([1, 2], 4) == [1, 2, 0, 0]
    assert r_schedule((10, 0.5), 3) == [5, 10, 15]
    assert r_schedule((10, -0.5), 3) == [15, 10, 5]


def test_evit_keeps_top_attention_in_spatial_order_and_fuses_the_rest():
    # cls + 5 patch tokens; patch attention 0.1, 0.3, 0.05, 0.25, 0.2 -> keep 2: tokens 2 and 4
    attention = torch.tensor([[0.1, 0.1, 0.3, 0.05, 0.25, 0.2]])
    x = torch.randn(1, 6, 3)
    reduction = evit_reduction(attention, keep=2, num_prefix_tokens=1, fuse=True)
    out, sizes = reduction.apply(x, None)
    assert out.shape == (1, 4, 3)
    assert torch.equal(out[0, :3], x[0, [0, 2, 4]])
    fused = 0.1 * x[0, 1] + 0.05 * x[0, 3] + 0.2 * x[0, 5]  # raw weights, not renormalised
    assert torch.allclose(out[0, 3], fused)
    assert sizes.flatten().tolist() == [1.0, 1.0, 1.0, 3.0]
    pruned, _ = evit_reduction(attention, 2, 1, fuse=False).apply(x, None)
    assert torch.equal(pruned[0], x[0, [0, 2, 4]])


def test_evit_token_counts_follow_ceil_of_keep_rate():
    import timm
    model = timm.create_model("deit_tiny_patch16_224").eval()
    tokenreduce.apply(model, "evit", keep_rate=0.7)
    model(torch.randn(1, 3, 224, 224))
    counts = tokenreduce.token_counts(model)
    first = 1 + math.ceil(0.7 * 196) + 1
    second = 1 + math.ceil(0.7 * (first - 1)) + 1
    assert counts[:5] == [197, 197, 197, 197, first] and counts[7] == second


def test_tome_ratio_merges_a_fraction_of_each_blocks_tokens():
    import timm
    model = timm.create_model("deit_tiny_patch16_224", depth=3).eval()
    tokenreduce.apply(model, "tome", ratio=[0.1, 0.1])
    model(torch.randn(1, 3, 224, 224))
    assert tokenreduce.token_counts(model) == [197, 197 - 19, 178 - 17, 161]  # int(0.1 * patch tokens)
    tokenreduce.apply(model, "tome")
    model(torch.randn(1, 3, 224, 224))
    assert tokenreduce.token_counts(model) == [197, 184, 171, 158]  # r None: the default 13


def test_available_methods_lists_defaults():
    methods = tokenreduce.available_methods()
    assert methods["tome"] == {"r": None, "ratio": None, "prop_attn": True}  # r None: 13 unless ratio
    assert methods["evit"] == {"keep_rate": 0.7, "locations": (3, 6, 9), "fuse": True, "prop_attn": False}


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("tome", dict(r=-1), "r=-1 is out of range"),
        ("tome", dict(r=2.5), "r=2.5 must be an int"),
        ("tome", dict(r=[1] * 20), "has 20 entries but the model has 12 blocks"),
        ("tome", dict(r=(8, 3.0)), "inflection=3.0 is out of range"),
        ("tome", dict(k=3), "unknown option(s) ['k'] for method 'tome'"),
        ("evit", dict(keep_rate=0.0), "keep_rate=0.0 is out of range: allowed (0.0, 1.0]"),
        ("evit", dict(keep_rate=1.5), "keep_rate=1.5 is out of range"),
        ("evit", dict(locations=[3, 12]), "block indices [12] out of range 0..11"),
        ("evit", dict(fuse="yes"), "fuse='yes' must be True or False"),
        ("nope", {}, "unknown method 'nope'; available: ["),
    ],
)
def test_bad_options_name_the_value_and_what_is_allowed(method, options, message):
    import timm
    model = timm.create_model("deit_tiny_patch16_224")
    with pytest.raises(ValueError) as error:
        tokenreduce.apply(model, method, **options)
    assert message in str(error.value)
    assert type(model).__name__ == "VisionTransformer"
