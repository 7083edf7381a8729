"""Expedit clustering + reconstruction: exact cases, the window, the weights, the ViT, FLOPs."""
import pytest
import timm
import torch

import tokenreduce
from tokenreduce import evaluation as ev
from tokenreduce.flops import flop_analysis
from tokenreduce.methods.cluster import (Cluster, ClusterOptions, axis_labels, centroid_grid, cluster_reduction,
                                        cluster_tokens, reconstruction_weights)

from conftest import input_for, make_vit

COLOURS = torch.tensor([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [0.0, 100.0, 0.0], [0.0, 0.0, 100.0]])


def four_blocks() -> torch.Tensor:
    """An 8×8 grid of four constant colour blocks split at row 3 and column 3, so
    the 4×4 average-pool bins of a 2×2 centroid grid mix colours."""
    rows = (torch.arange(8) >= 3).long()
    label = rows[:, None] * 2 + rows[None, :]
    return COLOURS[label].unsqueeze(0)  # [1, 8, 8, 3]


def test_four_colour_blocks_cluster_to_four_centroids_and_reconstruct_exactly():
    grid = four_blocks()
    pooled = torch.nn.functional.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), (2, 2)).flatten(2).transpose(1, 2)
    assert not torch.equal(pooled[0], COLOURS)  # the iterations have to move the centroids
    clustering = cluster_tokens(grid, (2, 2), window_size=3, n_iters=5, tau=0.02)
    assert torch.equal(clustering.centroids[0], COLOURS)

    cls = torch.full((1, 1, 3), 7.0)
    x = torch.cat([cls, grid.reshape(1, 64, 3)], dim=1)
    reduction = cluster_reduction(x, 1, (8, 8), (2, 2), window_size=3, n_iters=5, tau=0.02, k=20, normalise="l2")
    clustered, sizes = reduction.apply(x, None)
    centroids = torch.cat([cls[0], COLOURS])
    assert torch.allclose(clustered[0], centroids, atol=1e-4)  # means of 9, 15, 15, 25 equal tokens
    assert sizes.flatten().tolist() == [1.0, 9.0, 15.0, 15.0, 25.0]  # patches per block
    assert torch.equal(reduction.restore(centroids.unsqueeze(0), fill=torch.zeros_like(x)), x)
    assert reduction.inverse.in_index.shape == (1, 1 + 64 * 4)  # k=20 capped at the 4 centroids


def test_a_token_never_joins_a_centroid_outside_its_window():
    torch.manual_seed(0)
    rows, cols, grid = 12, 10, (6, 5)
    x = torch.randn(2, 1 + rows * cols, 8)
    # tau tiny: the affinity is nearly uniform, so every centroid in a window gets weight
    reduction = cluster_reduction(x, 1, (rows, cols), grid, window_size=3, n_iters=2, tau=1e-6, k=4, normalise="l2")
    share = reduction.carry(torch.eye(1 + rows * cols).expand(2, -1, -1))[:, 1:, 1:]  # [B, M, N]: A_ij
    token_row, token_col = torch.arange(rows).repeat_interleave(cols) // 2, torch.arange(cols).repeat(rows) // 2
    centroid_row, centroid_col = torch.arange(6).repeat_interleave(5), torch.arange(5).repeat(6)
    inside = ((centroid_row[:, None] - token_row).abs() <= 1) & ((centroid_col[:, None] - token_col).abs() <= 1)
    assert torch.all(share[:, ~inside] == 0)
    assert torch.all(share[:, inside] > 0)
    assert (~inside).any(dim=0).all()  # every token has centroids it may not join
    assert torch.allclose(share.sum(1), torch.ones(2, rows * cols))  # each token is shared out in full


def dense_masked_clustering(tokens, grid, window_size, n_iters, tau):
    """The official formulation: all N×M distances, the windows as a mask, means by matmul."""
    batch, rows, cols, channels = tokens.shape
    x = tokens.reshape(batch, rows * cols, channels)
    labels = torch.arange(grid[0] * grid[1], dtype=torch.float32).view(1, 1, *grid)
    labels = torch.nn.functional.interpolate(labels, size=(rows, cols), mode="nearest").view(-1).long()
    centroid = torch.arange(grid[0] * grid[1])
    radius = window_size // 2
    allowed = (((labels[:, None] // grid[1] - centroid // grid[1]).abs() <= radius)
               & ((labels[:, None] % grid[1] - centroid % grid[1]).abs() <= radius))
    centroids = torch.nn.functional.adaptive_avg_pool2d(tokens.permute(0, 3, 1, 2), grid).flatten(2).transpose(1, 2)
    for _ in range(n_iters):
        distances = torch.cdist(x, centroids) ** 2
        affinity = (-tau * distances).masked_fill(~allowed, float("-inf")).softmax(-1)
        centroids = affinity.transpose(1, 2) @ x / affinity.sum(1).unsqueeze(-1).clamp_min(1e-16)
    return centroids, affinity


@pytest.mark.parametrize("token_grid, grid, window_size", [
    ((16, 16), (11, 11), 5), ((28, 28), (20, 20), 5), ((10, 16), (7, 11), 3), ((13, 9), (4, 9), 7), ((7, 7), (5, 5), 5),
    ((12, 12), (3, 2), 1)])
def test_tiled_clustering_equals_the_dense_masked_one(token_grid, grid, window_size):
    """Only the window's distances are computed, in tiles; the result is the official all-pairs one."""
    torch.manual_seed(0)
    tokens = torch.randn(2, *token_grid, 8)
    centroids, affinity = dense_masked_clustering(tokens, grid, window_size, n_iters=5, tau=0.3)
    clustering = cluster_tokens(tokens, grid, window_size, n_iters=5, tau=0.3)
    assert torch.allclose(clustering.centroids, centroids, atol=1e-5)
    index = clustering.windows.index.expand(2, -1, -1)
    assert torch.allclose(clustering.affinity, affinity.gather(2, index) * clustering.windows.valid, atol=1e-6)
    assert torch.allclose(clustering.affinity.sum(-1), torch.ones(2, token_grid[0] * token_grid[1]))


def test_initial_centroids_are_torch_nearest_upsampling():
    """The windows are computed from the sizes alone; they must be F.interpolate's (float32) labels."""
    for tokens in range(1, 90):
        for centroids in range(1, tokens + 1):
            labels = torch.arange(centroids, dtype=torch.float32).view(1, 1, 1, centroids)
            expected = torch.nn.functional.interpolate(labels, size=(1, tokens), mode="nearest").view(-1).long()
            assert axis_labels(tokens, centroids) == expected.tolist(), (tokens, centroids)


@pytest.mark.parametrize("normalise", ["l2", "sum"])
def test_reconstruction_weights_are_the_nearest_centroids_normalised(normalise):
    torch.manual_seed(0)
    tokens, centroids, tau = torch.randn(2, 30, 6), torch.randn(2, 9, 6), 0.3
    weight, index = reconstruction_weights(tokens, centroids, k=4, tau=tau, normalise=normalise)
    distances = torch.cdist(tokens, centroids) ** 2
    assert torch.equal(index.sort(-1).values, distances.topk(4, largest=False).indices.sort(-1).values)
    raw = torch.exp(-tau * distances.gather(2, index))
    expected = raw / (raw.norm(dim=-1, keepdim=True) if normalise == "l2" else raw.sum(-1, keepdim=True))
    assert torch.allclose(weight, expected, atol=1e-5)
    norm = weight.norm(dim=-1) if normalise == "l2" else weight.sum(-1)
    assert torch.allclose(norm, torch.ones(2, 30))


def test_a_token_far_from_every_centroid_is_still_reconstructed():
    """exp(-τ·D) underflows to 0 for all k centroids (the official code then returns a zero token)."""
    tokens, centroids = torch.full((1, 1, 4), 100.0), torch.zeros(1, 3, 4)
    centroids[0, 1], centroids[0, 2] = 1.0, -1.0  # distances 40000, 39204, 40804: τ·D > 700
    weight, index = reconstruction_weights(tokens, centroids, k=2, tau=0.02, normalise="l2")
    assert index.tolist() == [[[1, 0]]] and torch.allclose(weight.norm(dim=-1), torch.ones(1, 1))


def test_clustering_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    x = torch.randn(2, 1 + 64, 16)
    expected = cluster_reduction(x, 1, (8, 8), (4, 4), 3, 5, 0.02, 20, "l2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reduction = cluster_reduction(x, 1, (8, 8), (4, 4), 3, 5, 0.02, 20, "l2")
    for name in ("weight", "mass"):
        assert torch.equal(getattr(reduction, name), getattr(expected, name))
    assert torch.equal(reduction.inverse.weight, expected.inverse.weight)


def test_grid_from_a_fraction_keeps_the_aspect_ratio():
    assert centroid_grid(0.49, (40, 40)) == (28, 28)  # the official Segmenter ViT-L setting
    assert centroid_grid(0.5, (10, 16)) == (7, 11)
    assert centroid_grid(1.0, (10, 16)) == (10, 16)
    assert centroid_grid((5, 3), (10, 16)) == (5, 3)
    with pytest.raises(ValueError, match=r"grid=\(12, 3\) is larger than the 10×16 token grid"):
        centroid_grid((12, 3), (10, 16))


def test_default_location_scales_the_official_placement_with_depth():
    for depth, location in ((24, 9), (12, 4), (4, 1)):
        method = Cluster(ClusterOptions(), num_blocks=depth, num_prefix_tokens=1)
        assert method.location == location
        assert [b for b in range(depth) if method.needs(b)] == [location + 1]


def test_dynamic_non_square_images_and_a_grid_as_large_as_the_tokens():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=3, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 160, 256)  # 10×16 patches
    features = model.forward_features(x)
    tokenreduce.apply(model, "cluster", mode="restore", location=0, grid=0.5)
    restored = model.forward_features(x)
    assert tokenreduce.token_counts(model) == [161, 161, 1 + 7 * 11, 1 + 7 * 11]
    assert restored.shape == features.shape and torch.isfinite(restored).all()
    _, maps = model.forward_intermediates(x, indices=[2])
    assert maps[0].shape == (2, 192, 10, 16)
    model(torch.randn(1, 3, 96, 64))
    assert tokenreduce.token_counts(model)[-1] == 1 + 4 * 3  # 6×4 patches → round(√0.5·6)×round(√0.5·4)
    tokenreduce.apply(model, "cluster", mode="restore", location=0, grid=(10, 16))  # nothing to cluster
    assert torch.equal(model.forward_features(x), features)
    tokenreduce.apply(model, "cluster", location=0, grid=(12, 12))
    with pytest.raises(ValueError, match="larger than the 10×16 token grid"):
        model(x)


def test_restore_reconstructs_with_the_inverse_on_a_vit():
    """Blocks after the clustering that change nothing: the restored features are W·s."""
    model = make_vit("deit_distilled")
    x = input_for(model)
    tokenreduce.apply(model, "cluster", mode="restore", location=2, grid=(7, 7), k=3)
    for block in model.blocks[3:]:
        for layer in (block.attn.proj, block.mlp.fc2):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    tokens = model.blocks[:3](model.norm_pre(model._pos_embed(model.patch_embed(x))))
    reduction = cluster_reduction(tokens, 2, (14, 14), (7, 7), 5, 5, 0.02, 3, "l2")
    expected = reduction.restore(reduction.apply(tokens, None)[0], fill=tokens)
    assert torch.allclose(model.forward_features(x), model.norm(expected), atol=1e-5)


def test_restore_mode_does_not_raise_the_forward_peak_memory():
    """The clustering map (25 entries per token) and the reconstruction (k=20) are
    applied in parts; the iterations hold one tile's distances at a time."""
    model = make_vit("avg_pool")
    device = torch.device("cpu")
    baseline = ev.peak_forward_memory(model, (3, 224, 224), 4, device)
    tokenreduce.apply(model, "cluster", mode="restore", location=1, grid=0.5)
    assert 0 < ev.peak_forward_memory(model, (3, 224, 224), 4, device) <= baseline


def test_flops_fall_by_the_blocks_on_fewer_tokens_plus_the_clustering():
    model = timm.create_model("vit_small_patch14_dinov2", img_size=224).eval()
    unreduced = tokenreduce.count_flops(model)
    block_flops = [flop_analysis(model.blocks[0], torch.zeros(1, n, 384)).total() for n in (257, 145)]
    saved = block_flops[0] - block_flops[1]
    tokenreduce.apply(model, "cluster", mode="restore", location=3, grid=(12, 12))
    reduced = flop_analysis(model, torch.zeros(1, 3, 224, 224))
    tokens, centroids, channels = 256, 144, 384
    # 16 token rows start in centroid rows floor(0.75·i): 7 of them in tile rows 0-4 (which
    # reach rows 0-6 with window 5), 7 in rows 5-9 (reach 3-11), 2 in rows 10-11 (reach 8-11):
    # 7·7 + 7·9 + 2·4 = 120 token-centroid pairs per axis, 120² in the grid (not 256·144).
    pairs = 120 ** 2
    clustering = {
        # 5 rounds of distances and means in the tiles, then W's distances to all centroids
        "matmul": 5 * 2 * pairs * channels + tokens * centroids * channels,
        "index_add_": (1 + tokens * 25 + 1 + tokens * 20) * channels,  # the map (window 5²) and W (k=20)
        "adaptive_avg_pool2d": tokens * channels,
    }
    # blocks 4-11 run on 1 + 144 tokens instead of 257; nothing else changes
    assert reduced.total() == round(unreduced * 1e9) - 8 * saved + sum(clustering.values())
    assert 1 - reduced.total() / 1e9 / unreduced == pytest.approx(0.292, abs=0.001)  # 0.278 with all N·M distances


@pytest.mark.slow
def test_restore_mode_compiles_to_one_graph():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=3).eval()
    tokenreduce.apply(model, "cluster", mode="restore", location=0, grid=0.5)
    x = torch.randn(2, 3, 224, 224)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model.forward_features)(x)
        compiled = torch.compile(model.forward_features, backend="eager", fullgraph=True)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert torch.allclose(compiled, model.forward_features(x), atol=1e-4)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(location=11), "location=11 must be a block index 0..10"),
        (dict(location=True), "location=True must be a block index"),
        (dict(grid=(7,)), "grid=(7,) must be (rows, cols) of positive ints or a float fraction"),
        (dict(grid=(7, 0)), "grid=(7, 0) must be (rows, cols)"),
        (dict(grid=7), "grid=7 must be (rows, cols)"),
        (dict(grid=0.0), "grid=0.0 is out of range: allowed (0.0, 1.0]"),
        (dict(window_size=4), "window_size=4 must be odd"),
        (dict(window_size=0), "window_size=0 is out of range"),
        (dict(n_iters=0), "n_iters=0 is out of range"),
        (dict(tau=0.0), "tau=0.0 is out of range: allowed (0.0, inf]"),
        (dict(k=0), "k=0 is out of range"),
        (dict(normalise="softmax"), "normalise='softmax' must be one of ('l2', 'sum')"),
    ],
)
def test_bad_options_name_the_value_and_what_is_allowed(options, message):
    model = timm.create_model("vit_tiny_patch16_224")
    with pytest.raises(ValueError) as error:
        tokenreduce.apply(model, "cluster", **options)
    assert message in str(error.value)


def test_defaults_listed():
    assert tokenreduce.available_methods()["cluster"] == {
        "location": None, "grid": 0.49, "window_size": 5, "n_iters": 5, "tau": 0.02, "k": 20, "normalise": "l2"}
