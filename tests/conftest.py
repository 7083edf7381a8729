import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch

REPO = Path(__file__).resolve().parents[1]

# Small members of each timm ViT variant the adapter must cover (depth cut for speed).
VIT_VARIANTS = {
    "deit_distilled": dict(name="deit_tiny_distilled_patch16_224", depth=4),
    "dinov2_layerscale": dict(name="vit_small_patch14_dinov2", img_size=98, depth=4),
    "registers": dict(name="vit_small_patch14_reg4_dinov2", img_size=98, depth=4),
    "avg_pool": dict(name="vit_tiny_patch16_224", global_pool="avg", depth=4),
    "qk_norm": dict(name="vit_tiny_patch16_224", qk_norm=True, depth=4),
}


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a fresh module (tools/ is no package), registered as ``tools_<name>``
    because dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_vit(variant: str, seed: int = 0) -> torch.nn.Module:
    """Random-weight, eval-mode timm ViT of the given variant (deterministic)."""
    kwargs = dict(VIT_VARIANTS[variant])
    torch.manual_seed(seed)
    return timm.create_model(kwargs.pop("name"), pretrained=False, **kwargs).eval()


def make_vim(depth: int = 4, embed_dim: int = 16, img_size: int = 64, seed: int = 0) -> torch.nn.Module:
    """Random-weight, eval-mode Vision Mamba built by the Vim-T code at a tiny size
    (16 patches + the middle class token)."""
    import models  # noqa: F401  (registers vim_*)

    torch.manual_seed(seed)
    return timm.create_model("vim_tiny_patch16_224", depth=depth, embed_dim=embed_dim, img_size=img_size).eval()


def input_for(model: torch.nn.Module, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=generator)


def assert_remove_restores_exactly(model: torch.nn.Module, x: torch.Tensor, apply) -> None:
    """``apply(model)`` changes the outputs but no state-dict key; ``tokenreduce.remove``
    gives back the classes, attributes and outputs bit for bit."""
    import tokenreduce

    expected = model(x)
    classes = [type(m) for m in model.modules()]
    attributes = [sorted(vars(m)) for m in model.modules()]
    keys = list(model.state_dict())
    apply(model)
    assert list(model.state_dict()) == keys
    reduced = model(x)
    assert reduced.shape == expected.shape and not torch.equal(reduced, expected)
    tokenreduce.remove(model)
    assert [type(m) for m in model.modules()] == classes
    assert [sorted(vars(m)) for m in model.modules()] == attributes
    assert torch.equal(model(x), expected)


def assert_compiles_to_one_graph(model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    """torch.compile(fullgraph=True) traces the patched ``model`` as one graph, without breaks, and
    gives its eager outputs and token counts; returns those counts for the caller's checks."""
    import tokenreduce

    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        counts = tokenreduce.token_counts(model)
        explanation = torch._dynamo.explain(model)(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    assert torch.allclose(compiled, expected, atol=1e-5)
    assert tokenreduce.token_counts(model) == counts
    return counts


@pytest.fixture(params=sorted(VIT_VARIANTS))
def variant(request) -> str:
    return request.param
