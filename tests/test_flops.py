"""fvcore FLOPs of unreduced and reduced models against the papers' numbers."""
import pytest
import timm
from fvcore.nn import FlopCountAnalysis
import torch

import tokenreduce


@pytest.fixture(scope="module")
def deit_small():
    return timm.create_model("deit_small_patch16_224").eval()


def test_unreduced_counts_include_fused_attention(deit_small):
    assert tokenreduce.count_flops(deit_small) == pytest.approx(4.6, abs=0.05)
    dinov2 = timm.create_model("vit_small_patch14_dinov2", img_size=224).eval()
    assert tokenreduce.count_flops(dinov2) == pytest.approx(6.14, abs=0.01)
    plain = FlopCountAnalysis(dinov2, torch.zeros(1, 3, 224, 224))
    plain.unsupported_ops_warnings(False)
    assert plain.total() / 1e9 == pytest.approx(5.53, abs=0.01)  # what fvcore alone misses


@pytest.mark.parametrize("method, options, paper", [("tome", dict(r=13), 2.7), ("evit", dict(keep_rate=0.7), 3.0)])
def test_reduced_counts_match_papers(deit_small, method, options, paper):
    tokenreduce.apply(deit_small, method, **options)
    try:
        assert tokenreduce.count_flops(deit_small) == pytest.approx(paper, abs=0.05)
    finally:
        tokenreduce.remove(deit_small)


def test_bad_input_size(deit_small):
    with pytest.raises(ValueError, match=r"input_size=\(224, 224\) must be"):
        tokenreduce.count_flops(deit_small, input_size=(224, 224))
