"""Restore mode: every original token position gets a token back, from the Reduction itself."""
import pytest
import timm
import torch

import tokenreduce
from tokenreduce.reduction import Reduction
from tokenreduce.state import ReductionState

from conftest import input_for, make_vit
from test_vit_adapter import ACTIVE, INACTIVE


def test_restore_of_a_merge_copies_each_output_to_the_tokens_it_covers():
    y = torch.tensor([[[10.0], [20.0]]])
    merge = Reduction.merge(torch.tensor([[0, 1, 1, 0]]), num_out=2)
    assert merge.restore(y, fill=torch.zeros(1, 4, 1)).flatten().tolist() == [10.0, 20.0, 20.0, 10.0]


def test_restore_of_a_selection_fills_the_pruned_positions():
    fill = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    select = Reduction.select(torch.tensor([[3, 1]]))
    restored = select.restore(torch.tensor([[[40.0], [20.0]]]), fill)
    assert restored.flatten().tolist() == [1.0, 20.0, 3.0, 40.0]


def test_restore_of_a_many_to_many_map_reads_its_normalised_columns():
    # input 0 -> output 0; input 1 -> output 1; input 2 spread 0.25 / 0.75 over outputs 0 and 1;
    # input 3 has mass 0 everywhere: it fed nothing and keeps its fill
    soft = Reduction.sparse(torch.tensor([[0, 1, 0, 1, 1]]), 2, in_index=torch.tensor([[0, 1, 2, 2, 3]]),
                            mass=torch.tensor([[1.0, 1.0, 0.25, 0.75, 0.0]]))
    y = torch.tensor([[[4.0], [8.0]]])
    restored = soft.restore(y, fill=torch.full((1, 4, 1), -1.0))
    assert restored.flatten().tolist() == [4.0, 8.0, 0.25 * 4 + 0.75 * 8, -1.0]


def test_restore_uses_an_attached_inverse_instead_of_the_transpose():
    merge = Reduction.merge(torch.tensor([[0, 0, 1]]), num_out=2)
    # each input = 0.5·(output 0) + 0.5·(output 1)
    merge.inverse = Reduction.sparse(torch.tensor([[0, 0, 1, 1, 2, 2]]), 3,
                                     weight=torch.full((1, 6), 0.5), in_index=torch.tensor([[0, 1, 0, 1, 0, 1]]))
    y = torch.tensor([[[2.0], [6.0]]])
    assert merge.restore(y, fill=torch.zeros(1, 3, 1)).flatten().tolist() == [4.0, 4.0, 4.0]


def test_residual_form_adds_each_merged_tokens_gain_to_its_own_value():
    x = torch.tensor([[[1.0], [3.0], [5.0]]])
    merge = Reduction.merge(torch.tensor([[0, 0, 1]]), num_out=2)
    for form, expected in (("residual", [11.0, 13.0, 105.0]), ("copy", [12.0, 12.0, 105.0])):
        state = ReductionState(restore_form=form)
        reduced = state.apply(merge, x)  # [2, 5]
        assert reduced.flatten().tolist() == [2.0, 5.0]
        later = reduced + torch.tensor([[[10.0], [100.0]]])  # what later blocks add
        assert state.restore(later).flatten().tolist() == expected
        assert state.sizes is None and state.frames == []


def test_an_attached_inverse_restores_the_same_in_both_forms():
    x = torch.tensor([[[1.0], [3.0], [5.0]]])
    merge = Reduction.merge(torch.tensor([[0, 0, 1]]), num_out=2)
    merge.inverse = Reduction.sparse(torch.tensor([[0, 1, 2, 2]]), 3, weight=torch.tensor([[1.0, 1.0, 0.5, 0.5]]),
                                     in_index=torch.tensor([[0, 0, 0, 1]]))
    for form in ("residual", "copy"):
        state = ReductionState(restore_form=form)
        reduced = state.apply(merge, x)  # [2, 5]
        restored = state.restore(reduced + torch.tensor([[[10.0], [100.0]]]))
        # inverse·y, not x + inverse·(y - reduced)
        assert restored.flatten().tolist() == [12.0, 12.0, 0.5 * 12 + 0.5 * 105]


def test_stacked_reductions_are_undone_in_reverse_order():
    x = torch.arange(6.0).view(1, 6, 1)
    state = ReductionState(restore_form="copy")
    first = state.apply(Reduction.merge(torch.tensor([[0, 0, 1, 1, 2, 2]]), 3), x)  # [0.5, 2.5, 4.5]
    second = state.apply(Reduction.select(torch.tensor([[0, 2]])), first)  # [0.5, 4.5]
    restored = state.restore(second * 10)
    assert restored.flatten().tolist() == [5.0, 5.0, 2.5, 2.5, 45.0, 45.0]


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_restore_with_nothing_reduced_is_bit_identical(variant, method):
    model = make_vit(variant)
    x = input_for(model)
    features = model.forward_features(x)
    intermediates = model.forward_intermediates(x, indices=[1, 3])
    tokenreduce.apply(model, method, mode="restore", **INACTIVE[method])
    assert torch.equal(model.forward_features(x), features)
    final, taken = model.forward_intermediates(x, indices=[1, 3])
    assert torch.equal(final, intermediates[0])
    assert all(torch.equal(a, b) for a, b in zip(taken, intermediates[1]))


def check_full_grid(model: torch.nn.Module, method: str, restore_at: str) -> None:
    x = input_for(model)
    features = model.forward_features(x)
    tokenreduce.apply(model, method, mode="restore", restore_at=restore_at, **ACTIVE[method])
    restored = model.forward_features(x)
    assert restored.shape == features.shape and torch.isfinite(restored).all()
    assert not torch.equal(restored, features)
    counts = tokenreduce.token_counts(model)
    assert min(counts) < counts[0]  # tokens were reduced inside, whatever comes back
    final, taken = model.forward_intermediates(x, indices=[0, 2, 3], output_fmt="NCHW")
    grid = model.patch_embed.dynamic_feat_size(x.shape[-2:])
    assert [t.shape for t in taken] == [(x.shape[0], model.embed_dim, *grid)] * 3
    assert torch.allclose(final, restored, atol=1e-5)
    assert torch.allclose(model.forward_intermediates(x, indices=[3], norm=True, output_fmt="NLC",
                                                      intermediates_only=True)[0],
                          restored[:, model.num_prefix_tokens:], atol=1e-5)
    logits = model(x)
    assert logits.shape[0] == x.shape[0] and torch.isfinite(logits).all()


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_every_method_restores_the_full_grid(variant, method):
    check_full_grid(make_vit(variant), method, "end")


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_every_method_restores_the_full_grid_at_each_block(method):
    check_full_grid(make_vit("deit_distilled"), method, "block")


def test_restore_at_block_keeps_the_reduced_counts_and_remove_is_exact():
    model = make_vit("avg_pool")
    x = input_for(model)
    expected = model(x)
    tokenreduce.apply(model, "tome", r=4, mode="restore", restore_at="block")
    model(x)
    assert tokenreduce.token_counts(model) == [197, 193, 193, 193, 193]  # each block ends on 193 before restoring
    tokenreduce.remove(model)
    assert torch.equal(model(x), expected)


def test_restore_options_are_validated_and_reduce_mode_has_no_intermediates():
    model = make_vit("qk_norm")
    with pytest.raises(ValueError, match="mode='dense' must be one of"):
        tokenreduce.apply(model, "tome", mode="dense")
    with pytest.raises(ValueError, match="restore_at='middle' must be one of"):
        tokenreduce.apply(model, "tome", mode="restore", restore_at="middle")
    with pytest.raises(ValueError, match="restore_form='mean' must be one of"):
        tokenreduce.apply(model, "tome", mode="restore", restore_form="mean")
    tokenreduce.apply(model, "tome", r=2)
    with pytest.raises(NotImplementedError, match="mode='restore'"):
        model.forward_intermediates(input_for(model))


def test_restore_runs_in_one_compiled_graph():
    model = timm.create_model("vit_tiny_patch16_224", depth=3).eval()
    tokenreduce.apply(model, "tome", r=8, mode="restore")
    x = torch.randn(2, 3, 224, 224)
    explanation = torch._dynamo.explain(model.forward_features)(x)
    assert explanation.graph_break_count == 0
    assert torch.allclose(torch.compile(model.forward_features)(x), model.forward_features(x), atol=1e-4)


def test_chained_reductions_restore_as_nested_undos():
    """The state keeps one offset, not each reduction's input and output: the result
    is still the nested undo, residual: before + spread(y − after); copy: spread(y),
    the input where nothing was fed."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3)
    merge = Reduction.merge(torch.tensor([[0, 0, 1, 2, 3, 3], [0, 1, 1, 2, 3, 2]]), num_out=4)
    select = Reduction.select(torch.tensor([[0, 2, 3], [3, 1, 0]]))
    for form in ("residual", "copy"):
        state = ReductionState(restore_form=form)
        after_merge = state.apply(merge, x)
        after_select = state.apply(select, after_merge)
        y = torch.randn_like(after_select)

        def undo(reduction, out, before, after):
            if form == "copy" or reduction.is_selection:
                return reduction.restore(out, fill=before)
            return before + reduction.restore(out - after, fill=torch.zeros_like(before))

        expected = undo(merge, undo(select, y, after_merge, after_select), x, after_merge)
        torch.testing.assert_close(state.restore(y), expected)
        assert state.frames == [] and state.offset is None


@pytest.mark.parametrize("form", ["residual", "copy"])
@pytest.mark.parametrize("method, options", [("tome", dict(r=100)), ("token_transforming", ACTIVE["token_transforming"]),
                                             ("evit", ACTIVE["evit"])])
def test_restore_mode_does_not_raise_the_forward_peak_memory(method, options, form):
    """Undoing is affine, so restore mode holds one grid of offsets, not every
    reduction's input and output (ToMe residual at 448 px: twice the peak before).
    That grid is the price of restoring: a reduction must save more than it (ToMe
    r=100 of 785 tokens per block here; r=4 saves less and peaks 8 % higher)."""
    import tokenreduce.evaluation as ev

    model = timm.create_model("vit_tiny_patch16_224", global_pool="avg", depth=4, dynamic_img_size=True).eval()
    device, input_size = torch.device("cpu"), (3, 448, 448)
    baseline = ev.peak_forward_memory(model, input_size, 4, device)
    tokenreduce.apply(model, method, mode="restore", restore_form=form, **options)
    assert 0 < ev.peak_forward_memory(model, input_size, 4, device) <= baseline
