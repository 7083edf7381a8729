"""The timm ViT adapter over several model variants, for every method."""
import copy

import pytest
import timm
import torch

import tokenreduce
from tokenreduce import evaluation as ev
from tokenreduce.adapters.vit import attention_with_extras
from tokenreduce.methods.base import Need

from conftest import assert_remove_restores_exactly, input_for, make_vit

# Per method: an active setting for a 4-block model, and a setting that reduces nothing.
ACTIVE = {
    "cluster": dict(location=1, grid=0.5),  # clustered at the input of block 2
    "tome": dict(r=4),
    "evit": dict(keep_rate=0.5, locations=(1, 2)),
    "mctf": dict(r=4),  # blocks 1-3, reduced at the start of the block
    "token_transforming": dict(r=0.3, blocks=(1, 2), k=3),
    "zero_tprune": dict(locations=(1, 2), prune_s=0.2, prune_i=0.2),
}
INACTIVE = {
    "cluster": dict(location=1, grid=1.0),
    "tome": dict(r=0),
    "evit": dict(keep_rate=1.0, locations=(1, 2)),
    "mctf": dict(r=0),
    "token_transforming": dict(r=0, blocks=(1, 2)),
    "zero_tprune": dict(locations=(1, 2), prune_s=0, prune_i=0),
}
# Methods whose sizes sum to the input token count (pruning drops patches).
MERGING = ("tome", "evit", "mctf", "token_transforming", "cluster")


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_no_reduction_is_bit_identical(variant, method):
    model = make_vit(variant)
    x = input_for(model)
    expected = model(x)
    tokenreduce.apply(model, method, **INACTIVE[method])
    assert torch.equal(model(x), expected)


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_remove_restores_the_original_exactly(variant, method):
    model = make_vit(variant)
    assert_remove_restores_exactly(model, input_for(model), lambda m: tokenreduce.apply(m, method, **ACTIVE[method]))


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_prefix_tokens_stay_and_sizes_add_up(variant, method):
    model = make_vit(variant)
    x = input_for(model)
    tokenreduce.apply(model, method, trace_source=True, **ACTIVE[method])
    model(x)
    counts = tokenreduce.token_counts(model)
    assert counts[-1] < counts[0]
    source = tokenreduce.source_map(model)
    prefix = model.num_prefix_tokens
    assert source.shape == (x.shape[0], counts[-1], counts[0])
    assert torch.equal(source[:, :prefix, :prefix], torch.eye(prefix).expand(x.shape[0], -1, -1))
    assert torch.all(source[:, prefix:, :prefix] == 0)
    state = model._tokenreduce.state
    assert torch.allclose(source.sum(-1, keepdim=True), state.sizes)
    if method in MERGING:
        # soft (many-to-many) weights conserve sizes up to float rounding
        assert torch.allclose(state.sizes.sum(1), torch.full_like(state.sizes.sum(1), counts[0]))


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_batched_equals_one_image_at_a_time(variant, method):
    model = make_vit(variant)
    x = input_for(model, batch=3)
    tokenreduce.apply(model, method, **ACTIVE[method])
    batched = model(x)
    single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5, rtol=1e-4)


def test_state_dict_loads_across_patching():
    source, target = make_vit("dinov2_layerscale", seed=0), make_vit("dinov2_layerscale", seed=1)
    x = input_for(source)
    tokenreduce.apply(target, "tome", r=0)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(x), source(x))


def test_proportional_attention_equals_attention_over_duplicated_tokens():
    """A token of size s must weigh like s copies of itself (ToMe's proportional attention)."""
    torch.manual_seed(0)
    attn = timm.layers.Attention(16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(1, 4, 16)
    sizes = torch.tensor([1.0, 3.0, 1.0, 2.0])
    bias = sizes.log()[None, None, None, :]
    duplicated = x[:, [0, 1, 1, 1, 2, 3, 3]]
    expected = attn(duplicated)[:, [0, 1, 4, 5]]
    for need in (Need.NOTHING, *Need):
        out, extras = attention_with_extras(attn, x, bias, need)
        assert torch.allclose(out, expected, atol=1e-5)
    full = attention_with_extras(attn, x, bias, Need.ATTENTION | Need.CLS_ATTENTION)[1]
    row = attention_with_extras(attn, x, bias, Need.CLS_ATTENTION)[1]["cls_attention"]
    assert torch.allclose(full["cls_attention"], row, atol=1e-6)
    assert torch.allclose(full["attention"].sum(-1), torch.ones(1, 2, 4))
    # without the map: the column means of the same probabilities, and the maps themselves on demand
    lazy = attention_with_extras(attn, x, bias, Need.RECEIVED_ATTENTION | Need.ATTENTION_MAPS)[1]
    assert "attention" not in lazy
    assert torch.allclose(lazy["received_attention"], full["attention"].mean(dim=2), atol=1e-6)
    assert torch.allclose(lazy["attention_maps"].per_map(lambda graph: graph), full["attention"], atol=1e-6)


def test_avg_pool_weights_tokens_by_size():
    model = make_vit("avg_pool")
    tokenreduce.apply(model, "tome", r=4)
    x = torch.randn(1, 3, 8)
    model._tokenreduce.state.sizes = torch.tensor([[[1.0], [1.0], [3.0]]])
    expected = (x[0, 1] + 3 * x[0, 2]) / 4
    assert torch.allclose(model.pool(x)[0], expected)


def test_unsupported_models_and_calls_get_clear_errors():
    with pytest.raises(ValueError, match="ResNet is not supported"):
        tokenreduce.apply(timm.create_model("resnet18"), "tome")
    with pytest.raises(ValueError, match="block 0 is ResPostBlock"):
        tokenreduce.apply(timm.create_model("vit_tiny_patch16_224", depth=2,
                                            block_fn=timm.models.vision_transformer.ResPostBlock), "tome")
    no_cls = timm.create_model("vit_tiny_patch16_224", depth=2, class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="needs a class token"):
        tokenreduce.apply(no_cls, "evit", locations=(0,))
    with pytest.raises(ValueError, match="attention pooling"):
        tokenreduce.apply(timm.create_model("vit_tiny_patch16_224", depth=2, global_pool="map"), "tome")
    model = tokenreduce.apply(make_vit("deit_distilled"), "tome", r=2)
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 3, 224, 224), attn_mask=torch.zeros(198, 198))
    with pytest.raises(NotImplementedError, match="forward_intermediates"):
        model.forward_intermediates(torch.randn(1, 3, 224, 224))
    with pytest.raises(ValueError, match="no token reduction applied"):
        tokenreduce.token_counts(make_vit("qk_norm"))
    with pytest.raises(ValueError, match="trace_source=True"):
        tokenreduce.source_map(model)


def test_tome_without_class_token_and_reapply_replaces():
    model = timm.create_model("vit_tiny_patch16_224", depth=3, class_token=False, global_pool="avg").eval()
    x = torch.randn(2, 3, 224, 224)
    tokenreduce.apply(model, "tome", r=10)
    model(x)
    assert tokenreduce.token_counts(model) == [196, 186, 176, 166]
    tokenreduce.apply(model, "tome", r=20)
    model(x)
    assert tokenreduce.token_counts(model) == [196, 176, 156, 136]


def test_dynamic_img_size_and_deepcopy():
    model = timm.create_model("vit_tiny_patch16_224", depth=2, dynamic_img_size=True).eval()
    tokenreduce.apply(model, "tome", r=8)
    copy_ = copy.deepcopy(model)
    x = torch.randn(1, 3, 160, 256)
    assert torch.equal(copy_(x), model(x))
    assert tokenreduce.token_counts(model) == [161, 153, 145]


@pytest.mark.parametrize("img_size", [224, 448])
@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_reduction_does_not_raise_the_forward_peak_memory(method, img_size):
    """Keys and attention maps a method read are freed before the MLP (the
    forward's peak), a map with many entries per token (cluster: 25) is applied
    in parts, and no method holds a B·H·N² map (at 448 px it would be
    three times the MLP's activations), so reducing tokens never costs memory
    over timm's forward."""
    model = timm.create_model("vit_tiny_patch16_224", global_pool="avg", depth=4, dynamic_img_size=True).eval()
    device, input_size = torch.device("cpu"), (3, img_size, img_size)
    baseline = ev.peak_forward_memory(model, input_size, 4, device)
    reduced = ev.peak_forward_memory(tokenreduce.apply(model, method, **ACTIVE[method]), input_size, 4, device)
    assert 0 < reduced <= baseline


@pytest.mark.parametrize("model_name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_apply_with_img_size_runs_at_that_size_and_remove_restores_the_original(model_name):
    """img_size: the resolution lever the planner picks, set by apply and undone by remove."""
    torch.manual_seed(0)
    kwargs = dict(depth=2) if model_name.startswith("vit") else dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2))
    model = timm.create_model(model_name, **kwargs).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x224 = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x224)
    options = dict(r=4) if model_name.startswith("vit") else dict(ratio=0.25)
    tokenreduce.apply(model, "tome", img_size=160, **options)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 160, 160)).shape == expected.shape
    if model_name.startswith("vit"):  # (timm's Swin picks other windows when built at 160 than when resized)
        reference = timm.create_model(model_name, img_size=160, **kwargs).eval()
        tokenreduce.apply(reference, "tome", **options)
        assert tokenreduce.count_flops(model, (3, 160, 160)) == pytest.approx(
            tokenreduce.count_flops(reference, (3, 160, 160)))
    tokenreduce.remove(model)
    assert tuple(model.patch_embed.img_size) == (224, 224)
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x224), expected)


@pytest.mark.parametrize("img_size, message", [(0, "positive int"), ((160,), "positive int"), (150, "multiple of the patch size")])
def test_apply_rejects_bad_img_size(img_size, message):
    model = timm.create_model("vit_tiny_patch16_224", depth=2).eval()
    with pytest.raises(ValueError, match=message):
        tokenreduce.apply(model, "tome", r=4, img_size=img_size)
    assert tuple(model.patch_embed.img_size) == (224, 224) and tokenreduce.applied_method(model) is None
