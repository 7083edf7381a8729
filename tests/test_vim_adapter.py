"""The Vision Mamba adapter and ToP-ViM: the adapter contract, the class token
in the middle, scan order, the SSM importance, alignment, refusals, FLOPs."""
import copy
import math

import pytest
import torch

import tokenreduce
from tokenreduce.adapters.vim import alignment_steps, initial_positions
from tokenreduce.flops import flop_analysis
from tokenreduce.methods.base import BlockTensors, Need, get_method_class
from tokenreduce.methods.top_vim import kept_patches
from tokenreduce.ssm import selective_scan

from conftest import assert_remove_restores_exactly, input_for, make_vim

# 4 blocks, 16 patches + the class token (index 8)
ACTIVE = {
    "top_vim": dict(keep_rate=0.7, locations=(0, 2)),
    "top_vim_unaligned": dict(keep_rate=0.7, locations=(0, 2), align=False),
    "tome": dict(r=3, prop_attn=False),
    "evit": dict(keep_rate=0.6, locations=(1, 2)),
}
INACTIVE = {
    "top_vim": dict(keep_rate=1.0, locations=(0, 2)),
    "tome": dict(r=0, prop_attn=False),
    "evit": dict(keep_rate=1.0, locations=(1, 2)),
}


def apply(model, setting, **extra):
    return tokenreduce.apply(model, setting.removesuffix("_unaligned"), **ACTIVE.get(setting, {}), **extra)


@pytest.mark.parametrize("method", sorted(INACTIVE))
def test_no_reduction_is_bit_identical(method):
    model = make_vim()
    x = input_for(model)
    expected = model(x)
    tokenreduce.apply(model, method, **INACTIVE[method])
    assert torch.equal(model(x), expected)
    assert tokenreduce.token_counts(model) == [17] * 5


@pytest.mark.parametrize("setting", sorted(ACTIVE))
def test_remove_restores_the_original_exactly(setting):
    model = make_vim()
    assert_remove_restores_exactly(model, input_for(model), lambda m: apply(m, setting))


@pytest.mark.parametrize("setting", sorted(ACTIVE))
def test_class_token_stays_in_the_middle_and_patches_keep_scan_order(setting):
    model = make_vim()
    x = input_for(model, batch=3)
    apply(model, setting, trace_source=True)
    model(x)
    counts = tokenreduce.token_counts(model)
    assert counts[-1] < counts[0] == 17
    for block, source in tokenreduce.source_maps(model):
        middle = model.class_token_index(source.shape[1])
        assert torch.equal(source[:, middle], torch.eye(17)[8].expand(3, -1))  # the class token alone
        patches = torch.cat([source[:, :middle], source[:, middle + 1:]], 1)
        assert torch.all(patches[..., 8] == 0)
        original = torch.cat([torch.arange(8.0), torch.tensor([0.0]), torch.arange(8.0, 16.0)])
        centre = (patches * original).sum(-1) / patches.sum(-1)
        assert torch.all(centre.diff(dim=1) > 0), (block, centre)  # scan order kept
    state = model._tokenreduce.state
    assert torch.allclose(tokenreduce.source_map(model).sum(-1, keepdim=True), state.sizes)


def test_top_vim_counts_follow_the_official_rule_and_keep_the_most_important():
    model = make_vim()
    tokenreduce.apply(model, "top_vim", keep_rate=0.7, locations=(0, 2))
    model(input_for(model))
    assert (kept_patches(0.7, 16), kept_patches(0.7, 12)) == (12, 8)  # ceil 12 (even): 12; ceil 9 (odd): 8
    assert tokenreduce.token_counts(model) == [17, 13, 13, 9, 9]


def test_kept_patch_count_makes_an_odd_sequence():
    for keep_rate in (0.5, 0.65, 0.7, 0.8, 0.9):
        for patches in (16, 123, 196):
            kept = kept_patches(keep_rate, patches)
            k = math.ceil(keep_rate * patches)
            assert kept == (k if k % 2 == 0 else k - 1) and (kept + 1) % 2 == 1


class Recorder:
    """A method stand-in that records what the adapter hands it."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def reduce(self, inputs: BlockTensors):
        self.seen.append(inputs)
        return self.inner.reduce(inputs)


def test_methods_see_the_class_token_first_and_the_ssm_importance():
    model = make_vim(depth=2)
    x = input_for(model)
    with torch.no_grad():
        hidden, residual = model.embed(x), None
        normed, residual = model.layers[0].add_norm(hidden, residual)
        ssm = model.layers[0].mixer.ssm_output(normed)
        stream = residual + model.layers[0].mixer.out_proj(ssm)
    score = ssm.clamp(min=0).sum(-1)
    order = [8, *range(8), *range(9, 17)]
    tokenreduce.apply(model, "top_vim", keep_rate=0.5, locations=(0,))
    recorder = Recorder(model._tokenreduce.method)
    model._tokenreduce.method = recorder
    with torch.no_grad():
        model(x)
    (seen,) = recorder.seen
    assert seen.num_prefix_tokens == 1 and seen.sizes is None
    torch.testing.assert_close(seen.x, stream[:, order])
    torch.testing.assert_close(seen.importance, (score / score.sum(1, keepdim=True))[:, order])
    kept = score[:, order][:, 1:].topk(8).indices.sort().values + 1  # among patches, class token excluded
    expected = [[order[i] for i in row] for row in kept.tolist()]
    tokenreduce.apply(model, "top_vim", keep_rate=0.5, locations=(0,), trace_source=True)
    model(x)
    source = tokenreduce.source_map(model)
    picked = source.argmax(-1).tolist()
    assert [row[:4] + row[5:] for row in picked] == expected and all(row[4] == 8 for row in picked)


def test_alignment_steps_count_the_original_positions_each_token_stands_for():
    positions = torch.tensor([[0.0, 3.0, 4.0, 5.5, 9.0, 15.0]])  # class token at index 3 (position unused)
    forward, backward = alignment_steps(positions, cls_index=3)
    assert forward.tolist() == [[1.0, 3.0, 1.0, 1.0, 5.0, 6.0]]
    assert backward.tolist() == [[3.0, 1.0, 5.0, 1.0, 6.0, 1.0]]
    unpruned = initial_positions(17, 8, torch.device("cpu"))[None]
    assert all(torch.equal(s, torch.ones(1, 17)) for s in alignment_steps(unpruned, 8))


def test_aligned_scan_equals_the_full_scan_over_silent_gaps():
    """Alignment is exact when the pruned tokens added no input and decayed with
    the kept token's dt: scanning the kept tokens with their step counts gives
    the full scan's outputs at the kept positions."""
    g = torch.Generator().manual_seed(0)
    kept = torch.tensor([0, 1, 4, 5, 9])
    steps = torch.tensor([1.0, 1.0, 3.0, 1.0, 4.0])
    owner = torch.repeat_interleave(torch.arange(5), steps.long())  # the kept token each full position decays with
    channels, state = 6, 4
    u, z = torch.randn(1, channels, 5, generator=g), torch.randn(1, channels, 5, generator=g)
    delta = torch.randn(1, channels, 5, generator=g)
    B, C = torch.randn(1, state, 5, generator=g), torch.randn(1, state, 5, generator=g)
    A, D, bias = -torch.rand(channels, state, generator=g) - 0.1, torch.randn(channels, generator=g), torch.zeros(channels)
    is_kept = torch.zeros(10, dtype=torch.bool).index_fill_(0, kept, True)
    full_u = torch.zeros(1, channels, 10).index_copy_(2, kept, u)
    full = selective_scan(full_u, delta[..., owner], A, B[..., owner], C[..., owner], D, z[..., owner], bias)
    aligned = selective_scan(u, delta, A, B, C, D, z, bias, steps[None])
    torch.testing.assert_close(aligned, full[..., is_kept], atol=1e-6, rtol=1e-6)


def test_alignment_changes_only_what_follows_a_pruning():
    model = make_vim()
    x = input_for(model)
    aligned = apply(copy.deepcopy(model), "top_vim")
    unaligned = apply(copy.deepcopy(model), "top_vim_unaligned")
    assert not torch.equal(aligned(x), unaligned(x))
    steps = aligned._tokenreduce.decay_steps
    assert steps is not None and unaligned._tokenreduce.decay_steps is None
    assert all(s.shape == (2, 9) and s.min() >= 1 and s.max() > 1 for s in steps)
    first = tokenreduce.apply(copy.deepcopy(model), "top_vim", keep_rate=0.7, locations=(3,))
    plain = tokenreduce.apply(copy.deepcopy(model), "top_vim", keep_rate=0.7, locations=(3,), align=False)
    assert torch.equal(first(x), plain(x))  # nothing is scanned after the last block's pruning


@pytest.mark.parametrize("setting", ["top_vim", "tome"])
def test_batched_equals_one_image_at_a_time(setting):
    model = make_vim()
    x = input_for(model, batch=3)
    apply(model, setting)
    batched = model(x)
    single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method, options, message", [
    ("mctf", {}, "'mctf' needs Need.RECEIVED_ATTENTION from attention, but a Vision Mamba block has no attention map"),
    ("zero_tprune", dict(locations=(1,)), "no attention map"),
    ("token_transforming", dict(blocks=(1,)), "needs Need.CLS_ATTENTION"),
    ("tome", dict(r=2), "prop_attn=True weights attention by token size"),
])
def test_methods_that_need_attention_are_refused_naming_those_that_work(method, options, message):
    model = make_vim()
    with pytest.raises(ValueError) as error:
        tokenreduce.apply(model, method, **options)
    assert message in str(error.value)
    assert "methods that work on Vision Mamba: evit, tome (prop_attn=False), top_vim" in str(error.value)
    assert type(model).__name__ == "VisionMamba"


def test_top_vim_on_a_vit_reads_class_attention_and_refuses_alignment():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", depth=2).eval()
    with pytest.raises(ValueError, match="align=True aligns a state-space scan, but a ViT has no scan"):
        tokenreduce.apply(vit, "top_vim", locations=(0,))
    tokenreduce.apply(vit, "top_vim", locations=(0,), align=False)
    vit(torch.randn(1, 3, 224, 224))
    assert tokenreduce.token_counts(vit) == [197, 157, 157]  # ceil(0.8 * 196) = 157 -> odd -> 156 patches + class


def test_state_dict_deepcopy_and_reapply():
    source, target = make_vim(seed=0), make_vim(seed=1)
    x = input_for(source)
    tokenreduce.apply(target, "top_vim", keep_rate=1.0, locations=(0,))
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(x), source(x))
    apply(target, "top_vim")
    assert torch.equal(copy.deepcopy(target)(x), target(x))
    apply(target, "tome")
    target(x)
    assert tokenreduce.token_counts(target) == [17, 14, 11, 8, 5]


def test_flops_count_the_scan_and_drop_with_the_tokens():
    model = make_vim(depth=2)
    with torch.no_grad():
        by_op = flop_analysis(model, torch.zeros(1, 3, 64, 64)).by_operator()
    assert by_op["selective_scan"] == 2 * 2 * 2 * 32 * 17 * 16  # 2 blocks x 2 directions x D·L·N x 2
    base = tokenreduce.count_flops(model, (3, 64, 64))
    reduced = tokenreduce.count_flops(tokenreduce.apply(model, "top_vim", keep_rate=0.7, locations=(0,)), (3, 64, 64))
    assert reduced < base


@pytest.mark.parametrize("name, paper, tolerance", [("vim_tiny_patch16_224", 1.5, 0.1),
                                                     ("vim_small_patch16_224", 5.1, 0.05)])
def test_full_size_flops_against_the_paper(name, paper, tolerance):
    """The 24 blocks are identical, so 24-block GFLOPs = f(1) + 23·(f(2) - f(1)).
    Vim-S gives the paper's 5.1; Vim-T 1.41, under the paper's 1.5 (tokenreduce.flops)."""
    import timm

    one, two = (tokenreduce.count_flops(timm.create_model(name, depth=d).eval()) for d in (1, 2))
    assert one + 23 * (two - one) == pytest.approx(paper, abs=tolerance)


def test_need_flags_the_vim_adapter_gives():
    from tokenreduce.adapters import vim

    assert vim.PROVIDES == Need.KEYS | Need.IMPORTANCE
    assert get_method_class("top_vim").requires_class_token


@pytest.mark.slow
def test_reduced_vim_exports_and_compiles_with_the_eager_outputs():
    model = make_vim(depth=3)
    x = input_for(model)
    tokenreduce.apply(model, "top_vim", keep_rate=0.7, locations=(0, 1))
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x)
        program = torch.export.export(model, (x,))
        explanation = torch._dynamo.explain(model)(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    torch.testing.assert_close(program.module()(x), expected)
    torch.testing.assert_close(compiled, expected)
    assert tokenreduce.token_counts(model) == [17, 13, 9, 9]
