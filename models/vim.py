"""Vision Mamba (Vim; Zhu et al., "Vision Mamba: Efficient Visual Representation
Learning with Bidirectional State Space Model", ICML 2024, arXiv 2401.09417),
registered with timm as ``vim_tiny_patch16_224``, ``vim_small_patch16_224``,
``vim_base_patch16_224``.

Facts kept from the official code (hustvl/Vim: ``vim/models_mamba.py`` and its
``mamba_ssm/modules/mamba_simple.py``, the released "midclstok" models):

- Mixer ("bimamba v2"): one ``in_proj`` gives x and z; the forward branch runs a
  causal depthwise conv1d (kernel 4) + SiLU, ``x_proj`` → (dt, B, C),
  ``dt_proj`` and the selective scan with A = -exp(A_log), D and SiLU(z)
  gating; the backward branch does the same with its own ``conv1d_b``,
  ``x_proj_b``, ``dt_proj_b``, ``A_b_log``, ``D_b`` on the flipped sequence
  (x and z flipped); output ``out_proj((y_f + flip(y_b)) / 2)``.
- Block: add → RMSNorm → mixer, returning (mixer output, residual), the
  residual kept in fp32; after the last block add → RMSNorm (``norm_f``).
  Drop path: block i gets rate i-1 of the linear schedule (block 0 none), the
  final add the full rate.
- 24 blocks, d_state 16, expand 2, dt_rank ceil(width / 16), width 192 / 384 /
  768, patch 16, RMSNorm eps 1e-5, absolute position embedding, the class token
  in the **middle** of the sequence (index M // 2 of M patches), which the head
  reads. Checkpoint keys as the official ``checkpoint["model"]``.
- Initialisation (for random weights): dt bias the inverse softplus of
  exp(U(log 1e-3, log 1e-1)), dt_proj weight U(±dt_rank^-0.5), A_log = log(1..16),
  D = 1, Linear biases zero, ``out_proj`` weight scaled by 1/sqrt(depth),
  patch embedding LeCun normal, head / position embedding / class token
  truncated normal (std 0.02).
- Reported ImageNet-1k top-1 76.1 / 80.5 / 81.9 with 7M / 26M / 98M parameters.

timm interface: ``forward_features`` returns the normalised tokens [B, N, C]
(class token in the middle: ``class_token_index(N)``), ``forward_head`` reads
the class token. No weights are downloaded; ``load_checkpoint`` loads an
official ``.pth`` (its ``"model"`` entry, not the EMA copy).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, RmsNorm, lecun_normal_, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from tokenreduce.ssm import selective_scan

DecaySteps = Optional[tuple[Tensor, Tensor]]  # per token, forward and backward scan, in sequence order


class BiMambaMixer(nn.Module):
    """The bidirectional Mamba token mixer ("bimamba v2"), official parameter names."""

    def __init__(self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, dt_init_floor: float = 1e-4) -> None:
        super().__init__()
        self.d_inner = expand * dim
        self.dt_rank = math.ceil(dim / 16)
        self.d_state = d_state
        self.in_proj = nn.Linear(dim, 2 * self.d_inner, bias=False)
        for suffix in ("", "_b"):
            setattr(self, "conv1d" + suffix, nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                                       padding=d_conv - 1))
            setattr(self, "x_proj" + suffix, nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False))
            dt_proj = nn.Linear(self.dt_rank, self.d_inner)
            nn.init.uniform_(dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
            dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            with torch.no_grad():
                dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            setattr(self, "dt_proj" + suffix, dt_proj)
        A_log = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(A_log)
        self.A_b_log = nn.Parameter(A_log.clone())
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D_b = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, dim, bias=False)

    def _branch(self, x: Tensor, z: Tensor, suffix: str, decay_steps: Optional[Tensor]) -> Tensor:
        """One direction: conv, projections, scan; x, z [B, d_inner, L] → [B, d_inner, L]."""
        conv, x_proj, dt_proj = (getattr(self, name + suffix) for name in ("conv1d", "x_proj", "dt_proj"))
        A_log, D = getattr(self, "A" + suffix + "_log"), getattr(self, "D" + suffix)
        x = F.silu(conv(x)[..., :x.shape[-1]])
        dt, B, C = x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)
        return selective_scan(x, delta, -torch.exp(A_log.float()), B.transpose(1, 2), C.transpose(1, 2), D, z,
                              dt_proj.bias, decay_steps)

    def ssm_output(self, hidden: Tensor, decay_steps: DecaySteps = None) -> Tensor:
        """What enters ``out_proj``: (y_f + flip(y_b)) / 2, [B, L, d_inner].

        ``decay_steps`` (forward, backward) [B, L] scale each token's state decay
        (token reduction's alignment); None is Mamba's scan."""
        x, z = self.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
        forward_steps, backward_steps = decay_steps if decay_steps is not None else (None, None)
        y = self._branch(x, z, "", forward_steps)
        y_b = self._branch(x.flip(-1), z.flip(-1), "_b", None if backward_steps is None else backward_steps.flip(-1))
        return ((y + y_b.flip(-1)) / 2).transpose(1, 2)

    def forward(self, hidden: Tensor, decay_steps: DecaySteps = None) -> Tensor:
        return self.out_proj(self.ssm_output(hidden, decay_steps))


class VimBlock(nn.Module):
    """Add → RMSNorm → mixer; carries (mixer output, fp32 residual) between blocks."""

    def __init__(self, dim: int, d_state: int = 16, drop_path: float = 0.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.mixer = BiMambaMixer(dim, d_state)
        self.norm = RmsNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def add_norm(self, hidden: Tensor, residual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """The block's input: (normalised tokens for the mixer, new fp32 residual)."""
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        return self.norm(residual.to(self.norm.weight.dtype)), residual.float()

    def forward(self, hidden: Tensor, residual: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        normed, residual = self.add_norm(hidden, residual)
        return self.mixer(normed), residual


class VisionMamba(nn.Module):
    """Vim with the class token in the middle of the token sequence."""

    def __init__(self, img_size: Union[int, tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 192, depth: int = 24, d_state: int = 16,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1  # the class token (in the middle, not in front: see class_token_index)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [0.0] + torch.linspace(0, drop_path_rate, depth).tolist()
        self.layers = nn.ModuleList([VimBlock(embed_dim, d_state, rates[i], norm_eps) for i in range(depth)])
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.norm_f = RmsNorm(embed_dim, eps=norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for param in (self.pos_embed, self.cls_token):
            trunc_normal_(param, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(depth)

    @staticmethod
    def class_token_index(num_tokens: int) -> int:
        """Where the class token sits among ``num_tokens`` tokens: the middle (M // 2 of M patches)."""
        return (num_tokens - 1) // 2

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def embed(self, x: Tensor) -> Tensor:
        """Patches, the class token inserted in the middle, position embedding."""
        x = self.patch_embed(x)
        middle = x.shape[1] // 2
        x = torch.cat([x[:, :middle], self.cls_token.expand(x.shape[0], -1, -1), x[:, middle:]], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def final_norm(self, hidden: Tensor, residual: Tensor) -> Tensor:
        residual = residual + self.drop_path(hidden)
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def forward_features(self, x: Tensor) -> Tensor:
        hidden, residual = self.embed(x), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.final_norm(hidden, residual)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, self.class_token_index(x.shape[1])]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def load_checkpoint(model: VisionMamba, path: Union[str, Path], weights_only: bool = True) -> VisionMamba:
    """Load an official Vim checkpoint (``{"model": state_dict, "model_ema": ..., "args": ...}``,
    as ``vim/main.py`` saves it) or a bare state dict, strictly; returns the model.

    The ``"model"`` entry is what the official evaluation loads (``--resume``),
    so the EMA copy is ignored. ``weights_only=False`` unpickles anything: only
    for files you trust.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path}: expected a state dict or a dict with a 'model' state dict, got {type(checkpoint)}")
    model.load_state_dict(state_dict)
    return model


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj", "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "vim_tiny_patch16_224": _cfg(),
    "vim_small_patch16_224": _cfg(),
    "vim_base_patch16_224": _cfg(),
})


def _create(variant: str, pretrained: bool, **kwargs) -> VisionMamba:
    if pretrained:
        raise ValueError(f"{variant}: no Vim weights are downloadable; build it with pretrained=False and call "
                         "models.vim.load_checkpoint(model, path) with an official .pth")
    return build_model_with_cfg(VisionMamba, variant, pretrained=False, **kwargs)


@register_model
def vim_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-T (official vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2)."""
    return _create("vim_tiny_patch16_224", pretrained, **{"embed_dim": 192, **kwargs})


@register_model
def vim_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-S (official vim_small_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2)."""
    return _create("vim_small_patch16_224", pretrained, **{"embed_dim": 384, **kwargs})


@register_model
def vim_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionMamba:
    """Vim-B (official vim_base_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_middle_cls_token_div2)."""
    return _create("vim_base_patch16_224", pretrained, **{"embed_dim": 768, **kwargs})
