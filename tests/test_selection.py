"""Visual-token selectors (tokenreduce.selection): behaviour, per-image references, select() on timm ViTs."""
import json
import math
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import tokenreduce
from tokenreduce import evaluation as ev
from tokenreduce import selection

from conftest import input_for, make_vit


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


@pytest.mark.parametrize("options", [{"important_ratio": 0.0}, {"important_ratio": 1.0},
                                     {"important_ratio": 0.25, "step": 3}, {"important_ratio": 0.8, "step": 1}])
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


def _no_class_token_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, depth=4, img_size=64, class_token=False,
                             global_pool="avg", reg_tokens=1).eval()


@pytest.mark.parametrize("variant", ["registers", "deit_distilled", "qk_norm", "no_class_token"])
def test_read_vit_gives_block_outputs_and_attention_scores(variant):
    model = _no_class_token_vit() if variant == "no_class_token" else make_vit(variant)
    images = input_for(model)
    inputs = []
    hooks = [_attention_input_hook(block, inputs) for block in model.blocks]
    with torch.no_grad():
        expected_features = model.forward_intermediates(images, indices=[2], norm=False, output_fmt="NLC",
                                                        intermediates_only=True)[0]
        maps = [_head_mean_attention(block.attn, x) for block, x in zip(model.blocks, inputs)]
    for hook in hooks:
        hook.remove()
    prefix, num_patches = model.num_prefix_tokens, model.patch_embed.num_patches
    features, scores = selection.read_vit(model, images, layer=-2, first_layer=1)
    assert torch.allclose(features, expected_features, atol=1e-5)
    assert scores.shape == (2, 2, num_patches)
    for position, block in enumerate((1, 2)):
        # class-token row; without a class token, the mean attention received over all queries
        expected = maps[block][:, 0, prefix:] if model.cls_token is not None else maps[block].mean(dim=1)[:, prefix:]
        assert torch.allclose(scores[:, position], expected, atol=1e-5)
    assert not hasattr(model, "_tokenreduce") and not type(model).__name__.startswith("Reducing")
    with torch.no_grad():  # the model is left as it was
        assert torch.equal(model.forward_features(images), model.forward_features(images))


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
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['r'\] for selector 'divprune'; allowed: \[\]"):
        selection.choose("divprune", torch.randn(1, 8, 4), torch.rand(1, 1, 8), 4, r=2)
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


def test_token_coverage_and_mass_covered():
    features = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    assert ev.token_coverage(features, torch.tensor([[0]])).item() == pytest.approx((1 + 0 + 0.5 ** 0.5) / 3)
    assert ev.token_coverage(features, torch.tensor([[0, 1, 2]])).item() == pytest.approx(1.0)
    mass = torch.tensor([[1.0, 3.0, 0.0, 4.0]])
    assert ev.mass_covered(mass, torch.tensor([[1, 3]])).item() == pytest.approx(7 / 8)


def test_attention_probe_learns_which_token_is_present():
    """Class k: one token among noise points along direction k; the pooled query must find it."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(40)
    tokens = 0.3 * torch.randn(160, 12, 8, generator=generator)
    where = torch.randint(0, 12, (160,), generator=generator)
    tokens[torch.arange(160), where, labels] += 3.0
    probe = ev.fit_attention_probe(tokens, labels, epochs=30, batch_size=16, lr=3e-2)
    with torch.no_grad():
        accuracy = (probe(tokens).argmax(dim=1) == labels).float().mean().item()
        fewer = (probe(tokens[:, :1]).argmax(dim=1) == labels).float().mean().item()  # any token count goes in
    assert accuracy > 0.85 and fewer < 0.5  # chance: 0.25
    with pytest.raises(ValueError, match="epochs=0"):
        ev.fit_attention_probe(tokens, labels, epochs=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ev.fit_attention_probe(tokens, labels, num_classes=3)


def test_benchmark_selectors_tool_times_every_selector(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import benchmark_selectors

    out = tmp_path / "bench.json"
    assert benchmark_selectors.main(["--batch-size", "2", "--tokens", "36", "--channels", "8", "--keep", "6",
                                     "--layers", "3", "--repeats", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [row["selector"] for row in report["rows"]] == list(selection.SELECTORS)
    assert all(len(row["ms_runs"]) == 2 and row["ms_per_batch"] > 0 for row in report["rows"])
    table = tmp_path / "speed.md"
    assert benchmark_selectors.main(["--batch-size", "1", "--tokens", "16", "--channels", "4", "--keep", "4",
                                     "--layers", "1", "--repeats", "1", "--selector", "divprune",
                                     "--out", str(table)]) == 0
    assert "| divprune |" in table.read_text() and "| vispruner |" not in table.read_text()
    with pytest.raises(ValueError, match="keep=37"):
        benchmark_selectors.main(["--tokens", "36", "--keep", "37"])


IMAGENETTE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette"


@pytest.mark.slow
@pytest.mark.skipif(not (IMAGENETTE / "val").is_dir(), reason=f"{IMAGENETTE} absent")
def test_eval_selectors_tool_end_to_end(tmp_path):
    """The proxy on a handful of real images: every row present, the references exact."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import eval_selectors

    out, readme = tmp_path / "selectors.json", tmp_path / "README.md"
    readme.write_text("before\n<!-- selectors:start -->\nold table\n<!-- selectors:end -->\nafter\n")
    argv = ["--limit", "6", "--train-limit", "10", "--epochs", "1", "--keep", "16", "--selector", "vispruner",
            "--selector", "random", "--workers", "0", "--cache-dir", str(tmp_path), "--out", str(out),
            "--out", str(readme)]
    assert eval_selectors.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["num_images"] == 6 and report["num_train_images"] == 10
    assert [(row["selector"], row["keep"]) for row in report["rows"]] == [("all", 256), ("vispruner", 16),
                                                                         ("random", 16)]
    everything = report["rows"][0]
    assert everything["coverage"] == pytest.approx(1.0) and everything["saliency_share"] == pytest.approx(1.0)
    assert all(0 < row["coverage"] < 1 and 0 < row["saliency_share"] < 1 for row in report["rows"][1:])
    text = readme.read_text()
    assert "| vispruner | 16 |" in text and "old table" not in text
    assert text.startswith("before\n<!-- selectors:start -->\n") and text.endswith("<!-- selectors:end -->\nafter\n")
    assert eval_selectors.main(argv) == 0  # the second run reads the cached features
    assert json.loads(out.read_text())["rows"][1] == report["rows"][1]
