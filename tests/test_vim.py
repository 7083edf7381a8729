"""Vision Mamba (models/vim.py): the three sizes, forward / backward, the middle
class token, the mixer against the reference scan, official-layout checkpoints."""
import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import models
from models.vim import load_checkpoint
from tokenreduce.ssm import selective_scan_reference

from conftest import input_for, make_vim


@pytest.mark.parametrize("name, width, params_m", [("vim_tiny_patch16_224", 192, 7), ("vim_small_patch16_224", 384, 26),
                                                   ("vim_base_patch16_224", 768, 98)])
def test_sizes_match_the_official_models(name, width, params_m):
    model = timm.create_model(name)
    assert len(model.layers) == 24 and model.embed_dim == width and model.patch_embed.num_patches == 196
    mixer = model.layers[0].mixer
    assert (mixer.d_inner, mixer.d_state, mixer.dt_rank) == (2 * width, 16, math.ceil(width / 16))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == params_m  # the paper's 7M / 26M / 98M


def test_forward_and_backward_reach_every_parameter():
    model = make_vim(depth=2).train()
    x = input_for(model)
    model(x).logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_class_token_sits_in_the_middle_and_is_read_there():
    model = make_vim(depth=1)
    x = input_for(model)
    tokens = model.embed(x)
    patches = model.patch_embed(x) + torch.cat([model.pos_embed[:, :8], model.pos_embed[:, 9:]], 1)
    assert model.class_token_index(17) == 8
    assert torch.equal(tokens[:, 8], (model.cls_token[0] + model.pos_embed[:, 8]).expand(2, -1))
    assert torch.equal(torch.cat([tokens[:, :8], tokens[:, 9:]], 1), patches)
    features = model.forward_features(x)
    assert torch.equal(model.forward_head(features, pre_logits=True), features[:, 8])


def reference_mixer(mixer, hidden, steps=(None, None)):
    """The bimamba v2 mixer written out from the official code, with the sequential
    reference scan; decay ``steps`` (forward, backward) are in sequence order."""
    x, z = mixer.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    outputs = []
    for suffix, flip, step in (("", False, steps[0]), ("_b", True, steps[1])):
        xs, zs = (x.flip(-1), z.flip(-1)) if flip else (x, z)
        conv = getattr(mixer, "conv1d" + suffix)
        xs = F.silu(F.conv1d(xs, conv.weight, conv.bias, padding=3, groups=xs.shape[1])[..., :xs.shape[-1]])
        dbl = getattr(mixer, "x_proj" + suffix)(xs.transpose(1, 2))
        dt, B, C = dbl.split([mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        dt_proj = getattr(mixer, "dt_proj" + suffix)
        y = selective_scan_reference(xs, (dt @ dt_proj.weight.T).transpose(1, 2),
                                     -torch.exp(getattr(mixer, "A" + suffix + "_log")), B.transpose(1, 2),
                                     C.transpose(1, 2), getattr(mixer, "D" + suffix), zs, dt_proj.bias,
                                     None if step is None else (step.flip(-1) if flip else step))
        outputs.append(y.flip(-1) if flip else y)
    return mixer.out_proj(((outputs[0] + outputs[1]) / 2).transpose(1, 2))


def test_mixer_is_the_bidirectional_scan_of_the_official_code():
    model = make_vim(depth=1)
    hidden = torch.randn(2, 17, 16)
    steps = (torch.randint(1, 4, (2, 17)).float(), torch.randint(1, 4, (2, 17)).float())
    mixer = model.layers[0].mixer
    with torch.no_grad():
        torch.testing.assert_close(mixer(hidden), reference_mixer(mixer, hidden), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mixer(hidden, steps), reference_mixer(mixer, hidden, steps), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(mixer(hidden, steps), mixer(hidden, steps[::-1]), atol=2e-5, rtol=0)


def official_layout(depth: int, width: int, num_patches: int, num_classes: int = 1000) -> dict[str, tuple]:
    """Keys and shapes of an official Vim checkpoint["model"] (hustvl/Vim models_mamba.py, midclstok)."""
    inner, rank = 2 * width, math.ceil(width / 16)
    layout = {"cls_token": (1, 1, width), "pos_embed": (1, num_patches + 1, width),
              "patch_embed.proj.weight": (width, 3, 16, 16), "patch_embed.proj.bias": (width,),
              "head.weight": (num_classes, width), "head.bias": (num_classes,), "norm_f.weight": (width,)}
    for i in range(depth):
        layer = f"layers.{i}."
        layout.update({layer + "norm.weight": (width,), layer + "mixer.in_proj.weight": (2 * inner, width),
                       layer + "mixer.out_proj.weight": (width, inner)})
        for suffix in ("", "_b"):
            mixer = layer + "mixer."
            layout.update({mixer + f"A{suffix}_log": (inner, 16), mixer + f"D{suffix}": (inner,),
                           mixer + f"conv1d{suffix}.weight": (inner, 1, 4), mixer + f"conv1d{suffix}.bias": (inner,),
                           mixer + f"x_proj{suffix}.weight": (rank + 32, inner),
                           mixer + f"dt_proj{suffix}.weight": (inner, rank), mixer + f"dt_proj{suffix}.bias": (inner,)})
    return layout


def test_loads_an_official_layout_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(3)
    state = {k: torch.randn(shape, generator=generator) for k, shape in official_layout(2, 16, 16).items()}
    ema = {k: torch.zeros_like(v) for k, v in state.items()}
    path = tmp_path / "vim_t_midclstok.pth"
    torch.save({"model": state, "model_ema": ema, "epoch": 299, "args": argparse.Namespace(model="vim")}, path)
    model = load_checkpoint(make_vim(depth=2, seed=7), path)
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)  # the "model" entry, not the EMA copy
    torch.save(state, tmp_path / "bare.pth")
    assert torch.equal(load_checkpoint(make_vim(depth=2, seed=8), tmp_path / "bare.pth").pos_embed, state["pos_embed"])
    with pytest.raises(RuntimeError, match="Missing key"):
        load_checkpoint(make_vim(depth=3), path)


def test_no_downloadable_weights_is_an_error():
    with pytest.raises(ValueError, match="no Vim weights are downloadable"):
        timm.create_model("vim_tiny_patch16_224", pretrained=True)
    assert "vim_small_patch16_224" in timm.list_models("vim_*") and models.vim.VisionMamba
