"""Backbone adapters: each knows where a method runs inside one model family."""
from . import swin, vim, vit

ADAPTERS = (vit, swin, vim)


def adapter_for(model) -> object:
    """The adapter module for ``model``, or a ValueError naming what is supported."""
    for adapter in ADAPTERS:
        if adapter.is_supported(model):
            return adapter
    raise ValueError(
        f"{type(model).__name__} is not supported; supported model families: timm VisionTransformer "
        "(ViT, DeiT, DINOv2, register-token ViTs), timm SwinTransformer v1 (also features_only), "
        "Vision Mamba (models/vim.py)"
    )
