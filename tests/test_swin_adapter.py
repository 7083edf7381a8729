"""The timm Swin adapter: windows reduce by the same amount, every block hands the
full grid back, the bias / mask rule for merged tokens, remove(), features_only."""
import copy

import pytest
import timm
import torch

import tokenreduce
from tokenreduce.adapters.swin import _ATTR, Windows, _blocks, centroid_cells, clustered_block, merged_bias, resized_bias
from tokenreduce.methods.cluster import cluster_reduction
from tokenreduce.reduction import Reduction

from conftest import assert_compiles_to_one_graph

# Tiny Swin v1 models (random weights) covering the geometries the adapter must get right.
SWIN_VARIANTS = {
    "shifted": dict(img_size=112),  # 28x28 then 14x14 cells: windows tile the grid
    "padded": dict(img_size=100),  # 25x25 then 13x13: padding at the bottom / right
    "window4_lone": dict(img_size=36, window_size=4),  # 9x9: even windows, a corner region of one cell
    "dynamic": dict(img_size=112, strict_img_size=False),  # masks built per forward; fed 92x124
}
ACTIVE = {
    "cluster": dict(location=0, grid=0.5),  # windows 7x7 -> 5x5 (4x4 -> 3x3) at block 1, back before PatchMerging
    "tome": dict(ratio=0.5),
    "mctf": dict(r=0.3),  # blocks 1-3, before attention, one-step-ahead
    "zero_tprune": dict(locations=(1, 2), prune_s=0.2, prune_i=0.2),
}
INACTIVE = {
    "cluster": dict(location=0, grid=1.0),
    "tome": dict(ratio=0.0),
    "mctf": dict(r=0),
    "zero_tprune": dict(locations=(1, 2), prune_s=0, prune_i=0),
}
# Settings that act in every block but resolve to no reduction (a fraction of a token):
# the windowed path runs whole, and must then compute what timm computes.
NO_OP = {
    "tome": dict(ratio=0.01),
    "mctf": dict(r=0.01, locations=(0, 1, 2, 3)),
    "mctf_precise": dict(r=0.01, locations=(0, 1, 2, 3), one_step_ahead=False),
    "zero_tprune": dict(locations=(0, 1, 2, 3), prune_s=0.01, prune_i=0.01),
}


def make_swin(variant: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """Random weights, LayerNorm shifts included (timm starts them at zero), so that
    LayerNorm(0) ≠ 0 and padding cells must be zeroed after the norm, as timm does."""
    torch.manual_seed(seed)
    args = {"embed_dim": 16, "depths": (2, 2), "num_heads": (1, 2), **SWIN_VARIANTS[variant], **kwargs}
    model = timm.create_model("swin_tiny_patch4_window7_224", **args).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.bias, std=0.5)
    return model


def swin_input(variant: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = (92, 124) if variant == "dynamic" else (SWIN_VARIANTS[variant]["img_size"],) * 2
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(SWIN_VARIANTS))
def swin_variant(request) -> str:
    return request.param


def outputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    final, maps = model.forward_intermediates(x)
    return [model(x), model.forward_features(x), final, *maps]


@pytest.mark.parametrize("method", sorted(INACTIVE))
def test_nothing_reduced_is_bit_identical_in_both_modes(swin_variant, method):
    model, x = make_swin(swin_variant), swin_input(swin_variant)
    expected = outputs(model, x)
    for mode in ("reduce", "restore"):
        tokenreduce.apply(model, method, mode=mode, **INACTIVE[method])
        assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), expected))


@pytest.mark.parametrize("setting", sorted(NO_OP))
def test_the_windowed_path_without_a_reduction_computes_what_timm_computes(swin_variant, setting):
    """Shift, padding, partition, mask, relative bias, window reverse: all as timm's block."""
    model, x = make_swin(swin_variant), swin_input(swin_variant)
    expected = model.forward_features(x)
    options = dict(NO_OP[setting])
    tokenreduce.apply(model, setting.split("_precise")[0], **options)
    assert torch.allclose(model.forward_features(x), expected, atol=1e-5)
    if swin_variant == "shifted":  # no padding: every window cell is an image cell
        assert tokenreduce.token_counts(model) == [784, 784, 784, 196, 196]


@pytest.mark.parametrize("method", ["mctf", "mctf_precise"])
def test_permuting_every_window_changes_nothing(swin_variant, method):
    """A reduction that keeps every token in another order: attention recomputed on the
    reordered tokens (bias and mask by the centroid rule) and one-step-ahead attention
    must both give timm's output, padding cells included (they stay zero after the norm)."""
    model, x = make_swin(swin_variant), swin_input(swin_variant)
    expected = model.forward_features(x)
    options = dict(r=0.3, locations=(0, 1, 2, 3), one_step_ahead=method == "mctf")
    tokenreduce.apply(model, "mctf", **options)
    generator = torch.Generator().manual_seed(0)

    def shuffle(inputs):
        windows, tokens = inputs.x.shape[:2]
        order = torch.stack([torch.randperm(tokens, generator=generator) for _ in range(windows)])
        return Reduction.select(order)

    tokenreduce.applied_method(model).reduce = shuffle
    assert torch.allclose(model.forward_features(x), expected, atol=1e-5)


def test_a_set_aside_token_leaves_the_keys_in_both_attention_modes():
    """Setting aside the last cell of every window (no merge): one-step-ahead attention
    (the whole-window map, renormalised over the remaining keys) and attention recomputed
    on the remaining tokens must agree, as both are attention over those tokens."""
    model, x = make_swin("padded"), swin_input("padded")

    def set_aside_last(inputs):
        windows, tokens = inputs.x.shape[:2]
        out_index = torch.arange(tokens).clamp_max(tokens - 2).expand(windows, -1).clone()
        out_index[:, -1] = 0
        mass = torch.ones(windows, tokens)
        mass[:, -1] = 0
        return Reduction.sparse(out_index, tokens - 1, mass=mass)

    features = []
    for one_step_ahead in (True, False):
        tokenreduce.apply(model, "mctf", r=0.3, one_step_ahead=one_step_ahead)
        tokenreduce.applied_method(model).reduce = set_aside_last
        features.append(model.forward_features(x))
    assert torch.allclose(*features, atol=1e-5)


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_reduced_model_keeps_every_shape_and_remove_is_exact(swin_variant, method):
    model, x = make_swin(swin_variant), swin_input(swin_variant)
    expected = outputs(model, x)
    classes = [type(m) for m in model.modules()]
    attributes = [sorted(vars(m)) for m in model.modules()]
    keys = list(model.state_dict())
    tokenreduce.apply(model, method, mode="restore", **ACTIVE[method])
    assert list(model.state_dict()) == keys
    reduced = outputs(model, x)
    assert [r.shape for r in reduced] == [e.shape for e in expected]
    assert all(torch.isfinite(r).all() for r in reduced) and not torch.equal(reduced[1], expected[1])
    counts = tokenreduce.token_counts(model)
    assert len(counts) == 5 and min(counts[1:4]) < counts[0]
    tokenreduce.remove(model)
    assert [type(m) for m in model.modules()] == classes
    assert [sorted(vars(m)) for m in model.modules()] == attributes
    assert all(torch.equal(a, b) for a, b in zip(outputs(model, x), expected))


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_features_only_pyramid_keeps_its_shapes(method):
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", features_only=True, embed_dim=16,
                              depths=(2, 2), num_heads=(1, 2), img_size=100).eval()
    x = swin_input("padded")
    expected = model(x)
    tokenreduce.apply(model, method, mode="restore", **INACTIVE[method])
    assert all(torch.equal(a, b) for a, b in zip(model(x), expected))
    tokenreduce.apply(model, method, mode="restore", **ACTIVE[method])
    pyramid = model(x)
    assert [p.shape for p in pyramid] == [e.shape for e in expected] == [(2, 25, 25, 16), (2, 13, 13, 32)]
    assert not torch.equal(pyramid[1], expected[1])
    tokenreduce.remove(model)
    assert type(model).__name__ == "FeatureListNet"
    assert all(torch.equal(a, b) for a, b in zip(model(x), expected))


def cell_is_padding(block, height: int, width: int) -> torch.Tensor:
    """[nW, N]: which window cells of ``block`` are padding, from the geometry alone."""
    (wh, ww), padded_h, padded_w = block.window_size, -(-height // block.window_size[0]), -(-width // block.window_size[1])
    rows = torch.arange(padded_h * wh).view(padded_h, 1, wh, 1).expand(-1, padded_w, -1, ww)
    cols = torch.arange(padded_w * ww).view(1, padded_w, 1, ww).expand(padded_h, -1, wh, -1)
    return ((rows >= height) | (cols >= width)).reshape(padded_h * padded_w, wh * ww)


@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_merges_stay_inside_shift_mask_regions_and_apart_from_padding(swin_variant, method):
    if swin_variant == "dynamic":
        pytest.skip("the static attn_mask of each block is the reference here")
    model, x = make_swin(swin_variant), swin_input(swin_variant, batch=1)
    tokenreduce.apply(model, method, trace_source=True, **ACTIVE[method])
    model(x)
    blocks = _blocks(model)
    maps = tokenreduce.source_maps(model)
    assert [index for index, _ in maps] == ([0, 1, 2, 3] if method == "tome" else [1, 2, 3])
    set_aside = 0
    for index, source in maps:
        block = blocks[index]
        padding = cell_is_padding(block, *block.input_resolution)
        windows, tokens = padding.shape
        same_region = (torch.ones(windows, tokens, tokens, dtype=torch.bool) if block.attn_mask is None
                       else block.attn_mask == 0)
        for w in range(windows):
            for row in source[w]:
                members = row.nonzero().flatten()
                assert same_region[w][members][:, members].all()
                assert padding[w, members].unique().numel() == 1
        set_aside += int(tokens * windows - source.sum())
    # the corner region of one image cell in the 9x9 grid leaves a token without a partner
    assert (set_aside > 0) == (swin_variant == "window4_lone" and method == "tome")


def test_merged_window_attends_like_the_window_with_each_member_holding_its_token():
    """The rule: a merged token's bias and mask are those of the cell nearest its centroid,
    its key adds log(size). Reference: timm's own WindowAttention over the duplicated window,
    with each member's relative-position index moved to its token's centroid cell and the
    unchanged shift mask (exact, since merges stay inside a region)."""
    torch.manual_seed(0)
    attn = timm.models.swin_transformer.WindowAttention(16, num_heads=2, window_size=4).eval()
    torch.nn.init.normal_(attn.relative_position_bias_table, std=1.0)
    region = (torch.arange(16) % 4 >= 2).long()  # columns 0-1 | 2-3, as a shift splits a window
    mask = torch.where(region[:, None] == region[None, :], 0.0, -100.0)[None]
    x = torch.randn(1, 16, 16)
    # merges: cells {0, 8} (centroid: cell 4, not a member), {2, 3, 6} (cell 2), {7, 15} (cell 11)
    groups = {0: 0, 8: 0, 2: 1, 3: 1, 6: 1, 7: 2, 15: 2}
    out_index, rest = [], 3
    for cell in range(16):
        if cell in groups:
            out_index.append(groups[cell])
        else:
            out_index.append(rest)
            rest += 1
    reduction = Reduction.merge(torch.tensor([out_index]), num_out=rest)
    merged, sizes = reduction.apply(x, None)
    cells = centroid_cells(reduction, None, Windows(4, 4, (4, 4), (0, 0)), merged)
    assert cells[0, :3].tolist() == [4, 2, 11]
    bias = merged_bias(attn, mask, cells, 1, sizes)
    q, k, v = attn.qkv(merged).reshape(1, rest, 3, 2, 8).permute(2, 0, 3, 1, 4)
    reduced = attn.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                        .transpose(1, 2).reshape(1, rest, 16))
    token_cell = cells[0, reduction.out_index[0]]  # each cell's token's centroid cell
    reference = copy.deepcopy(attn)
    reference.relative_position_index.copy_(attn.relative_position_index[token_cell[:, None], token_cell[None, :]])
    duplicated = reference(merged[:, reduction.out_index[0]], mask=mask)
    assert torch.allclose(duplicated, reduced[:, reduction.out_index[0]], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["cluster", "tome", "mctf", "mctf_precise", "zero_tprune"])
def test_compiled_reduced_swin_is_one_graph_with_the_eager_outputs(setting):
    model, x = make_swin("padded"), swin_input("padded")
    options = dict(ACTIVE[setting.split("_precise")[0]], **({"one_step_ahead": False} if "precise" in setting else {}))
    tokenreduce.apply(model, setting.split("_precise")[0], **options)
    counts = assert_compiles_to_one_graph(model, x)
    assert min(counts) < counts[0]


def test_batched_equals_one_image_at_a_time():
    model, x = make_swin("padded"), swin_input("padded", batch=3)
    tokenreduce.apply(model, "tome", ratio=0.4)
    batched = model.forward_features(x)
    single = torch.cat([model.forward_features(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_ratio_counts_per_window_and_copy_form():
    model, x = make_swin("shifted"), swin_input("shifted")
    tokenreduce.apply(model, "tome", ratio=[0.5, 0.25, 0.0, 0.1])
    residual = model.forward_features(x)
    # 16 windows of 49 then 4 windows of 49; r = 24, 12, 0, 4 per window
    assert tokenreduce.token_counts(model) == [784, 16 * 25, 16 * 37, 196, 4 * 45]
    tokenreduce.apply(model, "tome", ratio=[0.5, 0.25, 0.0, 0.1], mode="restore", restore_form="copy")
    copied = model.forward_features(x)
    assert copied.shape == residual.shape and not torch.allclose(copied, residual, atol=1e-3)


@pytest.mark.parametrize("options, message", [
    (dict(ratio=0.6), "ratio=0.6 is out of range: allowed [0.0, 0.5]"),
    (dict(ratio=-0.1), "ratio=-0.1 is out of range"),
    (dict(ratio="half"), "ratio='half' must be an int or a float"),
    (dict(ratio=[0.5] * 5), "has 5 entries but the model has 4 blocks"),
    (dict(ratio=[0.5, 0.7]), "ratio (list entry)=0.7 is out of range"),
    (dict(r=8, ratio=0.5), "r=8 and ratio=0.5: pass one of them"),
])
def test_ratio_is_validated(options, message):
    model = make_swin("shifted")
    with pytest.raises(ValueError) as error:
        tokenreduce.apply(model, "tome", **options)
    assert message in str(error.value)


def test_methods_that_cannot_work_per_window_are_refused():
    model = make_swin("shifted")
    for method, options in (("evit", dict(locations=(1,))), ("token_transforming", dict(blocks=(1,)))):
        with pytest.raises(ValueError, match=rf"method '{method}' needs a class token, which Swin has not; "
                                             r"methods that work on Swin: \['cluster', 'mctf', 'tome', 'zero_tprune'\]"):
            tokenreduce.apply(model, method, **options)
    with pytest.raises(ValueError, match="SwinTransformerV2 is not supported"):
        tokenreduce.apply(timm.create_model("swinv2_tiny_window8_256", embed_dim=16, depths=(1, 1),
                                            num_heads=(1, 1), img_size=64), "tome")


def test_training_mode_with_stochastic_depth_backpropagates():
    model = make_swin("padded", drop_path_rate=0.3).train()
    tokenreduce.apply(model, "mctf", r=0.3)
    model(swin_input("padded")).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_unreduced_swin_t_flops_match_the_paper_and_tome_saves_mlp_flops():
    """Swin-T: 4.5 GFLOPs published (Liu et al. 2021, Table 1); fvcore reads 4.51 with
    timm's explicit attention and with SDPA (our handle). ToMe merges after attention, so
    its saving is the MLP (8·C² multiply-adds per merged token) plus LayerNorm-2, minus the
    matching and merging."""
    model = timm.create_model("swin_tiny_patch4_window7_224").eval()
    baseline = tokenreduce.count_flops(model)
    assert baseline == pytest.approx(4.509, abs=0.001)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = True
    assert tokenreduce.count_flops(model) == pytest.approx(baseline, abs=1e-6)
    tokenreduce.apply(model, "tome", ratio=0.5)
    dims, cells = (96, 192, 384, 768), (56 ** 2, 28 ** 2, 14 ** 2, 7 ** 2)
    saved = sum(depth * (cell // 49) * 24 * 8 * dim ** 2
                for depth, dim, cell in zip((2, 2, 6, 2), dims, cells)) / 1e9
    assert tokenreduce.count_flops(model) == pytest.approx(baseline - saved, abs=0.005)  # 3.152 GFLOPs


def test_padding_costs_no_mlp_flops():
    """timm crops padding before its MLP: the windowed path skips padding-only tokens too,
    so with nothing merged it counts timm's FLOPs plus only its first LayerNorm on the
    padding cells (fvcore: 5 per element): 28²−25² cells of 16 channels, 14²−13² of 32, 2 blocks each."""
    model = make_swin("padded")
    baseline = tokenreduce.count_flops(model, (3, 100, 100))
    tokenreduce.apply(model, "tome", ratio=0.01)  # acts in every block, merges nothing
    norm_on_padding = 2 * 5 * ((28 ** 2 - 25 ** 2) * 16 + (14 ** 2 - 13 ** 2) * 32)
    assert tokenreduce.count_flops(model, (3, 100, 100)) == pytest.approx(baseline + norm_on_padding / 1e9, abs=1e-9)


# --------------------------------------------------------------------------- clustering (Expedit)


def test_clustering_runs_the_rest_of_the_stage_on_the_clusters_and_reconstructs_each_window(swin_variant):
    """Blocks on the clusters that change nothing (attention and MLP outputs zeroed): the
    stage output is each window's reconstruction W·s of its clusters, on the full grid."""
    model, x = make_swin(swin_variant, depths=(2, 3), num_heads=(1, 2)), swin_input(swin_variant)
    blocks = _blocks(model)
    with torch.no_grad():  # block 2 runs whole; the clustering is at the input of block 3
        tokens = blocks[2](model.layers[1].downsample(model.layers[0](model.patch_embed(x))))
    tokenreduce.apply(model, "cluster", mode="restore", location=2, grid=0.5, k=4)
    for block in blocks[3:]:
        for layer in (block.attn.proj, block.mlp.fc2):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    _, maps = model.forward_intermediates(x)
    windows = Windows(tokens.shape[1], tokens.shape[2], tuple(blocks[3].window_size), (0, 0))
    side = 3 if swin_variant == "window4_lone" else 5
    reduction = cluster_reduction(windows.partition(tokens), 0, windows.size, (side, side), 5, 5, 0.02, 4, "l2")
    expected = windows.reverse(reduction.restore(reduction.apply(windows.partition(tokens), None)[0], fill=None))
    assert torch.allclose(maps[1].permute(0, 2, 3, 1), expected, atol=1e-5)
    counts = tokenreduce.token_counts(model)
    clustered = windows.count * side ** 2
    assert counts[1:] == [counts[0]] * 2 + [tokens.shape[1] * tokens.shape[2]] + [clustered] * 2


def test_a_block_on_the_clusters_is_timms_block_with_the_smaller_window():
    """Window 5 on the 10x10 clustered grid, shifted by 2 where the block shifts, mask rebuilt
    for that grid: timm's own block resized to that window (set_input_size), given the same
    bilinearly resized bias table (timm resizes bicubically; the official Expedit bilinearly)."""
    model = make_swin("shifted", depths=(2, 4), num_heads=(1, 2))
    blocks = _blocks(model)
    references = [copy.deepcopy(blocks[i]) for i in (2, 3)]
    tokenreduce.apply(model, "cluster", location=1, grid=(5, 5))
    clusters = torch.randn(2, 10, 10, 32)
    for reference, block in zip(references, (blocks[2], blocks[3])):
        table = resized_bias(reference.attn, (5, 5))  # computed from the 7x7 table before resizing
        reference.set_input_size((10, 10), (5, 5))
        resized = reference.attn.relative_position_bias_table
        index = reference.attn.relative_position_index.view(-1)
        with torch.no_grad():  # write the bilinear table through the new index (every offset occurs)
            resized[index] = table[0].permute(1, 2, 0).reshape(-1, resized.shape[1])
        assert reference.shift_size == ((2, 2) if block.shift_size[0] else (0, 0))
        out = clustered_block(block, clusters, getattr(block, _ATTR), block._tokenreduce_index)
        assert torch.allclose(out, reference(clusters), atol=1e-5)


def test_a_cluster_grid_as_large_as_the_window_is_timm_and_too_large_is_refused():
    model, x = make_swin("padded"), swin_input("padded")
    expected = model.forward_features(x)
    tokenreduce.apply(model, "cluster", mode="restore", location=0, grid=(7, 7))
    assert torch.equal(model.forward_features(x), expected)
    tokenreduce.apply(model, "cluster", mode="restore", location=0, grid=(8, 8))
    with pytest.raises(ValueError, match=r"grid=\(8, 8\) is larger than the 7×7 token grid"):
        model(x)


@pytest.mark.slow
def test_swin_t_cluster_flops():
    """Swin-T at 224 px, each 7x7 window of stage 3 clustered to 5x5 at the input of block 7:
    blocks 7-9 run on 100 cells instead of 196 (linear layers 12·C² per cell, window attention
    2·area·C per cell, two LayerNorms 5·C each), plus the clustering: avg-pool, 5 rounds of
    distances and means (all 5x5 centroids are in reach of every token: window 5 spans them),
    the reconstruction distances, the two sparse maps (25 and k=20 entries per cell) and
    the bilinear bias resize per block."""
    model = timm.create_model("swin_tiny_patch4_window7_224").eval()
    baseline = tokenreduce.count_flops(model)
    tokenreduce.apply(model, "cluster", location=6, grid=(5, 5), mode="restore")
    reduced = tokenreduce.count_flops(model)
    channels, heads, windows, cells, clusters = 384, 12, 4, 196, 100
    blocks = 3 * ((cells - clusters) * (12 * channels ** 2 + 2 * 5 * channels)
                  + (cells * 49 - clusters * 25) * 2 * channels)
    clustering = (cells * channels  # adaptive_avg_pool2d
                  + 5 * 2 * windows * 49 * 25 * channels  # iterations: distances and means
                  + windows * 49 * 25 * channels  # reconstruction distances
                  + cells * (25 + 20) * channels  # the clustering map and the reconstruction map
                  + 3 * 4 * 9 * 9 * heads)  # bilinear resize of the bias table (4 per output)
    assert reduced == pytest.approx(baseline - (blocks - clustering) / 1e9, abs=1e-9)
    assert reduced == pytest.approx(4.006, abs=0.001)
