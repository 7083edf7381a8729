"""Per-stage source maps (tokenreduce.source_maps) and the tools/visualize.py picture."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokenreduce

from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample" / "n01440764_tench.JPEG"


vis = load_tool("visualize")

# (method, options, blocks where it reduces on a 4-block model, merges: every patch stays covered)
SETTINGS = {
    "tome": ("tome", dict(r=4), [0, 1, 2, 3], True),
    "evit_fuse": ("evit", dict(keep_rate=0.5, locations=(1, 2)), [1, 2], True),
    "evit_prune": ("evit", dict(keep_rate=0.5, locations=(1, 2), fuse=False), [1, 2], False),
}


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4).eval()


def sample_batch(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- source_maps


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_per_stage_source_maps_are_consistent(setting):
    method, options, blocks, merges = SETTINGS[setting]
    model = tiny_vit()
    tokenreduce.apply(model, method, trace_source=True, **options)
    state = model._tokenreduce.state
    sizes_after = []
    apply_reduction = state.apply

    def spy(reduction, x):  # the sizes the adapter carries after each reduction
        out = apply_reduction(reduction, x)
        sizes_after.append(state.sizes.clone())
        return out

    state.apply = spy
    x = sample_batch()
    model(x)
    maps = tokenreduce.source_maps(model)
    counts = tokenreduce.token_counts(model)
    num_inputs = counts[0]
    assert [block for block, _ in maps] == blocks
    assert torch.equal(maps[-1][1], tokenreduce.source_map(model))
    previous = torch.eye(num_inputs).expand(2, -1, -1)
    for (block, source), sizes in zip(maps, sizes_after):
        assert source.shape == (2, counts[block + 1], num_inputs)
        assert torch.all((source == 0) | (source == 1))
        covered = source.sum(1)  # how many outputs hold each input token
        assert torch.all(covered <= 1)
        assert torch.all(covered == 1) if merges else torch.any(covered == 0)
        assert torch.equal(source[:, :1, :1], torch.ones(2, 1, 1))  # the class token stays first, alone
        assert torch.allclose(source.sum(-1, keepdim=True), sizes)  # rows sum to the token sizes
        # Each stage's tokens are unions of the previous stage's (or dropped).
        link = (source @ previous.transpose(1, 2) > 0).float()  # [B, M_now, M_before]
        assert torch.all(link.sum(1) <= 1)
        assert torch.equal(link @ previous, source)
        previous = source


def test_source_maps_reset_each_forward_and_need_tracing():
    model = tiny_vit()
    tokenreduce.apply(model, "tome", trace_source=True, r=4)
    model(sample_batch())
    model(sample_batch(1))
    maps = tokenreduce.source_maps(model)
    assert len(maps) == 4 and all(source.shape[0] == 1 for _, source in maps)
    tokenreduce.apply(model, "tome", trace_source=True, r=0)
    model(sample_batch(1))
    assert tokenreduce.source_maps(model) == [] and tokenreduce.source_map(model) is None
    tokenreduce.apply(model, "tome", r=4)
    with pytest.raises(ValueError, match="trace_source=True"):
        tokenreduce.source_maps(model)
    tokenreduce.remove(model)
    with pytest.raises(ValueError, match="no token reduction applied"):
        tokenreduce.source_maps(model)


# --------------------------------------------------------------------------- colouring

# A 2×2 patch grid after a class token. Outputs: 0 = class token, 1 = patches 0 and 3
# (diagonal: one token in two places), 2 = patch 1; patch 2 is covered by nobody.
HARD = torch.tensor([
    [1.0, 0, 0, 0, 0],
    [0, 1, 0, 0, 1],
    [0, 0, 1, 0, 0],
])


def test_patch_groups_on_a_hand_made_2x2_map():
    assert vis.patch_groups(HARD, 1, (2, 2)).tolist() == [[1, 2], [-1, 1]]
    soft = torch.tensor([
        [1.0, 0, 0, 0, 0],
        [0, 0.7, 0.5, 0, 0.2],   # patch 0 mostly here; patch 1 split evenly: the first holder wins
        [0, 0.3, 0.5, 0, 0.8],   # patch 3 mostly here; patch 2 nowhere
    ])
    assert vis.patch_groups(soft, 1, (2, 2)).tolist() == [[1, 1], [-1, 2]]
    assert vis.is_soft([soft]) and not vis.is_soft([HARD])
    with pytest.raises(ValueError, match="3x3 patch grid"):
        vis.patch_groups(HARD, 1, (3, 3))


def test_scattered_groups_use_4_connectivity():
    groups = np.array([
        [0, 0, 1],
        [2, 0, 1],
        [0, 2, 2],
    ])
    assert vis.scattered_groups(groups).tolist() == [0, 2]
    assert vis.scattered_groups(np.array([[0, -1], [-1, 0]])).tolist() == [0]
    assert vis.scattered_groups(np.array([[0, 1], [-1, -1]])).tolist() == []


def test_render_groups_paints_mean_colours_dark_pruned_and_borders():
    colours = np.array([[200, 0, 0], [0, 200, 0], [0, 0, 200], [100, 100, 100]], dtype=np.uint8)
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)  # 2×2 patches of 2×2 pixels, one colour each
    for patch, colour in enumerate(colours):
        row, col = divmod(patch, 2)
        pixels[2 * row:2 * row + 2, 2 * col:2 * col + 2] = colour
    groups = vis.patch_groups(HARD, 1, (2, 2)).numpy()
    np.testing.assert_allclose(vis.group_colours(pixels, groups)[1:], [[150, 50, 50], [0, 200, 0]])

    scale = 4  # 16×16 panel, 8×8 pixels per patch; hatch stripes where (r + c) // 5 % 3 == 0
    out = vis.render_groups(pixels, groups, scale).astype(int)
    assert out.shape == (16, 16, 3)
    assert out[3, 3].tolist() == [150, 50, 50] and out[11, 11].tolist() == [150, 50, 50]  # group 1
    hatched = np.round(np.array([150, 50, 50]) * (1 - vis.HATCH_DARKEN))
    assert out[0, 0].tolist() == hatched.tolist()  # group 1 lies in two places: hatched
    assert out[3, 11].tolist() == [0, 200, 0]  # patch 1, its own token, not hatched anywhere
    assert out[0, 8].tolist() == [0, 200, 0]
    grey = out[8:15, 0:7]  # patch 2: pruned, dark grey
    assert np.all(grey[..., 0] == grey[..., 1]) and grey.max() <= 255 * vis.PRUNED_BRIGHTNESS + 1
    edge = np.round(0.25 * np.array([150, 50, 50]) + 0.75 * 255)
    assert out[3, 7].tolist() == edge.tolist()  # white border between tokens 1 and 2
    assert vis.render_input(pixels, (2, 2), scale).shape == (16, 16, 3)


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    if SAMPLE.is_file():
        return SAMPLE
    path = tmp_path_factory.mktemp("img") / "random.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 260, 3), dtype=np.uint8)).save(path)
    return path


def test_load_image_matches_the_model_input(image_path):
    model = tiny_vit()
    config = vis.ev.data_config(model)
    x, pixels = vis.load_image(image_path, config)
    assert x.shape == (1, 3, 224, 224) and pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
    mean, std = torch.tensor(config["mean"]).view(3, 1, 1), torch.tensor(config["std"]).view(3, 1, 1)
    restored = (torch.from_numpy(pixels).permute(2, 0, 1) / 255 - mean) / std
    assert torch.allclose(restored, x[0].clamp(-mean / std, (1 - mean) / std), atol=0.6 / 255 / float(std.min()))


@pytest.fixture
def tiny_loader(monkeypatch):
    """The CLI's model loader, answering with the 4-block tiny ViT (fast)."""
    monkeypatch.setattr(vis.ev, "load_model", lambda name, pretrained=False, img_size=None: (tiny_vit(), name))


def test_cli_writes_a_png_of_the_expected_size(tmp_path, image_path, capsys):
    out = tmp_path / "tome.png"
    argv = ["--model", "vit_tiny_patch16_224", "--image", str(image_path), "--scale", "1",
            "--method", "tome", "--opt", "r=8", "--out", str(out)]
    assert vis.main(argv) == 0
    assert "block 11: 101" in capsys.readouterr().out
    # The input and 12 stages: 2 rows of 7 panels of 224 px.
    assert Image.open(out).size == (7 * 224 + 8 * vis.GAP, vis.HEADER_H + 2 * (vis.TITLE_H + 224 + vis.GAP))


def test_cli_stages_and_pruned_patches(tmp_path, image_path, tiny_loader):
    out = tmp_path / "sub" / "evit.png"
    argv = ["--image", str(image_path), "--method", "evit", "--opt", "fuse=False", "--opt", "locations=(1, 2)",
            "--stages", "input,2", "--scale", "2", "--out", str(out)]
    assert vis.main(argv) == 0
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[1:] == (2 * 448 + 3 * vis.GAP, 3)
    # One row of two 448-px panels; the header wraps onto more lines in a figure this narrow.
    assert image.shape[0] > vis.HEADER_H + vis.TITLE_H + 448 + vis.GAP
    top, left = image.shape[0] - vis.GAP - 448, 2 * vis.GAP + 448
    panel = image[top:top + 448, left:left + 448]
    dark = (panel.max(-1) <= 255 * vis.PRUNED_BRIGHTNESS + 1) & (panel.min(-1) == panel.max(-1))
    assert 0.4 < dark.mean() < 0.51  # EViT keeps 138 then 97 of 196 patches: 50.5% pruned, less the borders


@pytest.mark.parametrize("argv, message", [
    (["--opt", "r"], "must look like name=value"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--opt", "r=-1"], "r=-1"),
    (["--opt", "r=0"], "reduced no tokens"),
    (["--stages", "input,x"], "'input' or a block index"),
    (["--stages", "input,20"], r"no reduction at block\(s\) \[20\]"),
    (["--image", "/nonexistent.png"], "is not a file"),
    (["--scale", "0"], "positive"),
])
def test_cli_bad_arguments_name_the_problem(argv, message, tmp_path, image_path, tiny_loader, capsys):
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit) as exit_info:
        vis.main(["--image", str(image_path), "--out", str(out), *argv])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_cli_unknown_model(tmp_path, image_path, capsys):
    with pytest.raises(SystemExit):
        vis.main(["--model", "vit_no_such_model", "--image", str(image_path), "--out", str(tmp_path / "x.png")])
    assert "unknown model 'vit_no_such_model'" in capsys.readouterr().err
