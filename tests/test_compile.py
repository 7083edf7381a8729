"""torch.compile on patched models: one graph, no breaks, same outputs and state."""
import pytest
import timm
import torch

import tokenreduce

from conftest import assert_compiles_to_one_graph

# 2-block settings that reduce at block 1 (or both blocks for the merging schedules)
SETTINGS = {
    "cluster": dict(location=0, grid=0.5),
    "tome": dict(r=8),
    "evit": dict(keep_rate=0.7, locations=(1,)),
    "mctf": dict(r=8),
    "zero_tprune": dict(locations=(1,)),
    "token_transforming": dict(blocks=(1,)),
    "top_vim": dict(locations=(1,), align=False),  # on a ViT: class attention, no scan to align
}
# Methods whose token count depends on the data (DToP's early exit): a graph break where it is read
DATA_DEPENDENT = {"dtop"}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(SETTINGS))
def test_compiled_patched_model_has_no_graph_breaks(method):
    assert set(SETTINGS) | DATA_DEPENDENT == set(tokenreduce.available_methods())
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=2).eval()
    tokenreduce.apply(model, method, **SETTINGS[method])
    counts = assert_compiles_to_one_graph(model, torch.randn(2, 3, 224, 224))
    assert counts[-1] < counts[0]


@pytest.mark.slow
def test_compiled_early_exit_gives_the_eager_outputs():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", depth=2).eval()
    head = torch.nn.Conv2d(192, 3, 1).requires_grad_(False)
    torch.nn.init.normal_(head.weight, std=0.5)
    tokenreduce.apply(model, "dtop", exit_after=(0,), heads=[head], p0=0.6, mode="restore")
    x = torch.randn(2, 3, 224, 224)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        eager_counts = tokenreduce.token_counts(model)
        compiled = torch.compile(model, backend="eager")(x)
    assert torch.allclose(compiled, expected, atol=1e-5)
    assert tokenreduce.token_counts(model) == eager_counts and eager_counts[-1] < eager_counts[0]
