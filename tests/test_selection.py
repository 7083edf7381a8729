"""Visual-token selectors (tokenreduce.selection): behaviour, per-image references, select() on timm ViTs."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce import selection


def _scores_and_features(batch=3, tokens=40, channels=16, layers=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, tokens, channels, generator=generator, dtype=torch.float64)
    layer_importance = torch.rand(batch, layers, tokens, generator=generator, dtype=torch.float64)
    return features, layer_importance


def _reference_top(scores, keep):
    return sorted(sorted(range(len(scores)), key=lambda j: -float(scores[j]))[:keep])


def _reference_vispruner(features, importance, keep, important_ratio=0.5, step=8):
    """One image, plain lists: the algorithm as the issue states it."""
    order = sorted(range(len(importance)), key=lambda j: -float(importance[j]))
    num_important = int(keep * important_ratio)
    num_diverse = keep - num_important
    important, residual = order[:num_important], order[num_important:]
    unit = F.normalize(features, dim=-1)
    while num_diverse and len(residual) > num_diverse:
        a, b = residual[0::2], residual[1::2]
        drop = min(step, len(residual) - num_diverse, len(a))
        redundancy = [max(float(unit[i] @ unit[j]) for j in b) for i in a]
        by_redundancy = sorted(range(len(a)), key=lambda p: -redundancy[p])
        residual = [a[p] for p in by_redundancy[drop:]] + b
    return sorted(important + (residual if num_diverse else []))


def _reference_divprune(features, keep):
    unit = F.normalize(features, dim=-1)
    distance = 1 - unit @ unit.T
    count = len(features)
    picks = []
    for _ in range(keep):
        best, best_score = None, -math.inf
        for j in range(count):
            if j in picks:
                continue
            score = (min(float(distance[j, i]) for i in range(count) if i != j) if not picks
                     else min(float(distance[j, i]) for i in picks))
            if score > best_score:
                best, best_score = j, score
        picks.append(best)
    return sorted(picks)


def _run(name, features, layer_importance, keep, **options):
    if name == "fastervlm":
        return selection.fastervlm(layer_importance[:, -1], keep)
    if name == "vtc_cls":
        return selection.vtc_cls(layer_importance, keep)
    if name == "vispruner":
        return selection.vispruner(features, layer_importance[:, -1], keep, **options)
    return selection.divprune(features, keep)


@pytest.mark.parametrize("keep", [1, 7, 16, 33])
def test_each_selector_matches_its_per_image_reference(keep):
    features, layer_importance = _scores_and_features()
    for b in range(features.shape[0]):
        expected = {
            "fastervlm": _reference_top(layer_importance[b, -1], keep),
            "vtc_cls": _reference_top(layer_importance[b].sum(0), keep),
            "vispruner": _reference_vispruner(features[b], layer_importance[b, -1], keep),
            "divprune": _reference_divprune(features[b], keep),
        }
        for name in selection.SELECTORS:
            assert _run(name, features, layer_importance, keep)[b].tolist() == expected[name], name


@pytest.mark.parametrize("options", [{"important_ratio": 0.0}, {"important_ratio": 1.0}, {"important_ratio": 0.25, "step": 3},
                                     {"important_ratio": 0.8, "step": 1}])
def test_vispruner_options_match_the_reference(options):
    features, layer_importance = _scores_and_features(tokens=37, seed=1)  # odd count: a has one more than b
    for keep in (5, 18):
        got = selection.vispruner(features, layer_importance[:, -1], keep, **options)
        for b in range(features.shape[0]):
            assert got[b].tolist() == _reference_vispruner(features[b], layer_importance[b, -1], keep, **options)


def test_order_is_preserved_and_keep_all_returns_every_token():
    features, layer_importance = _scores_and_features()
    tokens = features.shape[1]
    for name in selection.SELECTORS:
        indices = _run(name, features, layer_importance, 12)
        assert indices.shape == (3, 12)
        assert (indices[:, 1:] > indices[:, :-1]).all(), name  # ascending, distinct
        assert _run(name, features, layer_importance, tokens).tolist() == [list(range(tokens))] * 3, name
        kept = selection.gather_tokens(features, indices)
        assert torch.equal(kept[1], features[1, indices[1]])


def test_divprune_picks_the_ends_of_a_line_first():
    t = torch.tensor([-4.0, -1.0, -0.5, 0.0, 0.5, 1.0, 4.0])  # points (1, t): the ends are the most isolated
    points = torch.stack([torch.ones_like(t), t], dim=1)[None]
    assert selection.divprune(points, 2).tolist() == [[0, 6]]
    assert selection.divprune(points, 3).tolist() == [[0, 3, 6]]


def test_divprune_never_picks_a_duplicate_while_a_distinct_token_is_left():
    base = torch.eye(4)
    points = torch.cat([base, base, base[:1]])[None]  # 9 tokens, 4 directions
    picked = selection.divprune(points, 4)[0]
    assert sorted(int(i) % 4 for i in picked) == [0, 1, 2, 3]


def _shuffled_tokens(layout):
    """Unit tokens with the directions ``layout`` names, given importance decreasing along ``layout``
    but placed at shuffled positions (so importance order is not index order)."""
    positions = torch.randperm(len(layout), generator=torch.Generator().manual_seed(0))
    features = torch.empty(len(layout), 12)
    features[positions] = torch.eye(12)[layout]
    importance = torch.empty(len(layout))
    importance[positions] = torch.linspace(1, 0, len(layout))
    return features, importance


@pytest.mark.parametrize("important_ratio, layout", [
    (0.0, [0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11]),
    (0.25, [4, 5, 6, 0, 0, 1, 1, 2, 2, 3, 3, 7, 8, 9, 10, 11]),  # the 3 important tokens are distinct
])
def test_vispruner_drops_exact_duplicates_before_distinct_tokens(important_ratio, layout):
    features, importance = _shuffled_tokens(layout)  # 4 directions twice, 8 once: 16 tokens, 12 directions
    kept = selection.vispruner(features[None], importance[None], 12, important_ratio=important_ratio)[0]
    assert sorted(features[kept].argmax(dim=1).tolist()) == list(range(12))  # each direction once


@pytest.mark.parametrize("keep", [0, -1, 41, 2.0, True])
def test_bad_keep_is_refused(keep):
    features, layer_importance = _scores_and_features()
    for name in selection.SELECTORS:
        with pytest.raises(ValueError, match="keep=.*must be an int from 1 to the 40 tokens"):
            _run(name, features, layer_importance, keep)


def test_bad_vispruner_options_are_refused():
    features, layer_importance = _scores_and_features()
    with pytest.raises(ValueError, match="important_ratio=1.5"):
        selection.vispruner(features, layer_importance[:, -1], 8, important_ratio=1.5)
    with pytest.raises(ValueError, match="step=0"):
        selection.vispruner(features, layer_importance[:, -1], 8, step=0)


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=4, img_size=64).eval()


def _attention_input_hook(block, store):
    return block.attn.register_forward_hook(lambda module, args, output: store.append(args[0]))


def _head_mean_attention(attn, x):
    """The straightforward reading: softmax(q·kᵀ·scale) from timm's qkv, averaged over heads."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)  # [B, N, N]


@pytest.mark.parametrize("class_token", [True, False])
def test_read_vit_gives_block_outputs_and_attention_scores(class_token):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=4, img_size=64, class_token=class_token,
                              global_pool="token" if class_token else "avg", reg_tokens=1).eval()
    images = torch.randn(2, 3, 64, 64)
    inputs = []
    hooks = [_attention_input_hook(block, inputs) for block in model.blocks]
    with torch.no_grad():
        expected_features = model.forward_intermediates(images, indices=[2], norm=False, output_fmt="NLC",
                                                        intermediates_only=True)[0]
        maps = [_head_mean_attention(block.attn, x) for block, x in zip(model.blocks, inputs)]
    for hook in hooks:
        hook.remove()
    prefix = model.num_prefix_tokens
    features, scores = selection.read_vit(model, images, layer=-2, first_layer=1)
    assert torch.allclose(features, expected_features, atol=1e-5)
    assert scores.shape == (2, 2, 16)
    for position, block in enumerate((1, 2)):
        expected = maps[block][:, 0, prefix:] if class_token else maps[block].mean(dim=1)[:, prefix:]
        assert torch.allclose(scores[:, position], expected, atol=1e-5)
    assert type(model).__name__ == "VisionTransformer" and not hasattr(model, "_tokenreduce")


def test_select_applies_the_selector_to_what_read_vit_reads(tiny_vit):
    images = torch.randn(2, 3, 64, 64)
    features, scores = selection.read_vit(tiny_vit, images, layer=-2, first_layer=0)
    expected = {
        "fastervlm": selection.fastervlm(scores[:, -1], 5),
        "vtc_cls": selection.vtc_cls(scores, 5),
        "vispruner": selection.vispruner(features, scores[:, -1], 5, important_ratio=0.4),
        "divprune": selection.divprune(features, 5),
    }
    options = {"vispruner": {"important_ratio": 0.4}, "vtc_cls": {"start_layer": 0}}
    for name in selection.SELECTORS:
        kept, indices = tokenreduce.select(tiny_vit, images, method=name, keep=5, layer=-2, **options.get(name, {}))
        assert torch.equal(indices, expected[name]), name
        assert torch.allclose(kept, selection.gather_tokens(features, indices)), name
    kept, indices = tokenreduce.select(tiny_vit, images, method="fastervlm", keep=16)
    assert torch.allclose(kept, features) and indices.tolist() == [list(range(16))] * 2


def test_select_refuses_bad_arguments(tiny_vit):
    images = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="keep=17 must be an int from 1 to the 16 tokens"):
        tokenreduce.select(tiny_vit, images, keep=17)
    with pytest.raises(ValueError, match="keep=0"):
        tokenreduce.select(tiny_vit, images, keep=0)
    with pytest.raises(ValueError, match="unknown selector 'tome'"):
        tokenreduce.select(tiny_vit, images, method="tome", keep=4)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['start_layer'\] for selector 'vispruner'"):
        tokenreduce.select(tiny_vit, images, method="vispruner", keep=4, start_layer=1)
    with pytest.raises(ValueError, match="layer=4 must be a block index from -4 to 3"):
        tokenreduce.select(tiny_vit, images, keep=4, layer=4)
    with pytest.raises(ValueError, match="start_layer=3 .* must not come after layer=-2"):
        tokenreduce.select(tiny_vit, images, method="vtc_cls", keep=4, start_layer=3)
    reduced = tokenreduce.apply(timm.create_model("vit_tiny_patch16_224", depth=2, img_size=64), "tome", r=2)
    with pytest.raises(ValueError, match="call tokenreduce.remove"):
        tokenreduce.select(reduced, images, keep=4)
    swin = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), embed_dim=24, num_heads=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="SwinTransformer is not supported"):
        tokenreduce.select(swin, torch.randn(1, 3, 224, 224), keep=4)
