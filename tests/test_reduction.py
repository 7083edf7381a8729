"""Properties of the reduction core and of the shared merging helpers."""
import torch

from tokenreduce.merging import alternating_split_order, bipartite_soft_matching, merge_by_destination
from tokenreduce.reduction import Reduction


def test_merge_is_size_weighted_mean_and_conserves_sizes():
    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    sizes = torch.tensor([[[1.0], [3.0], [1.0], [2.0]]])
    reduction = Reduction.merge(torch.tensor([[0, 1, 1, 0]]), num_out=2)
    out, out_sizes = reduction.apply(x, sizes)
    assert out_sizes.flatten().tolist() == [3.0, 4.0]
    assert torch.allclose(out.flatten(), torch.tensor([(1 * 1 + 8 * 2) / 3, (2 * 3 + 4 * 1) / 4]))


def test_merging_identical_tokens_changes_nothing():
    token = torch.randn(1, 1, 8)
    x = torch.cat([token, token, torch.zeros(1, 1, 8)], dim=1)
    out, sizes = Reduction.merge(torch.tensor([[0, 0, 1]]), num_out=2).apply(x, None)
    assert torch.equal(out[:, 0], token[:, 0]) and torch.equal(out[:, 1], x[:, 2])
    assert sizes.flatten().tolist() == [2.0, 1.0]


def test_selection_is_a_gather_and_sparse_map_weights_features_and_carries_mass():
    x = torch.arange(12.0).view(1, 4, 3)
    selected, sizes = Reduction.select(torch.tensor([[3, 1]])).apply(x, None)
    assert torch.equal(selected[0], x[0, [3, 1]]) and sizes.flatten().tolist() == [1.0, 1.0]
    fuse = Reduction.sparse(torch.tensor([[0, 1, 1, 1]]), 2, weight=torch.tensor([[1.0, 0.5, 0.25, 0.0]]))
    out, sizes = fuse.apply(x, None)
    assert torch.equal(out[0, 1], 0.5 * x[0, 1] + 0.25 * x[0, 2])
    assert sizes.flatten().tolist() == [1.0, 3.0]
    soft = Reduction.sparse(torch.tensor([[0, 1, 0, 1]]), 2, weight=torch.ones(1, 4),
                            in_index=torch.tensor([[0, 0, 1, 1]]), mass=torch.tensor([[0.25, 0.75, 1.0, 0.0]]))
    assert soft.carry(torch.ones(1, 2, 1)).flatten().tolist() == [1.25, 0.75]


def test_a_map_with_many_entries_per_token_equals_its_dense_matrix():
    """7 entries per input: applied max(N, M) entries at a time, the sums are the dense products."""
    torch.manual_seed(0)
    batch, num_in, num_out, per_input = 2, 5, 3, 7
    in_index = torch.arange(num_in).repeat_interleave(per_input).expand(batch, -1)
    out_index = torch.randint(num_out, (batch, num_in * per_input))
    weight, mass = torch.rand(batch, num_in * per_input), torch.rand(batch, num_in * per_input)
    x, sizes = torch.randn(batch, num_in, 4), torch.rand(batch, num_in, 1) + 0.5
    dense_weight = torch.zeros(batch, num_out, num_in).index_put_(
        (torch.arange(batch)[:, None], out_index, in_index), weight, accumulate=True)
    dense_mass = torch.zeros(batch, num_out, num_in).index_put_(
        (torch.arange(batch)[:, None], out_index, in_index), mass, accumulate=True)
    weighted = Reduction.sparse(out_index, num_out, weight=weight, in_index=in_index, mass=mass)
    out, sizes_out = weighted.apply(x, sizes)
    assert torch.allclose(out, dense_weight @ x, atol=1e-5)
    assert torch.allclose(sizes_out, dense_mass @ sizes, atol=1e-5)
    mean = Reduction.sparse(out_index, num_out, in_index=in_index, mass=mass).apply(x, sizes)[0]
    assert torch.allclose(mean, (dense_mass @ (sizes * x)) / (dense_mass @ sizes), atol=1e-5)


def test_split_order_keeps_prefix_first_then_a_then_b():
    assert alternating_split_order(7, 1, torch.device("cpu")).tolist() == [0, 2, 4, 6, 1, 3, 5]
    assert alternating_split_order(7, 2, torch.device("cpu")).tolist() == [0, 1, 2, 4, 6, 3, 5]


def test_merge_by_destination_ranks_survivors_in_order():
    # tokens 0..4, token 2 merges into 3; order: 0, 2, 4, 1, 3 (prefix 0, A, B)
    order = alternating_split_order(5, 1, torch.device("cpu"))
    merged = torch.tensor([[False, False, True, False, False]])
    reduction = merge_by_destination(torch.tensor([[0, 1, 3, 3, 4]]), merged, order, num_out=4)
    # survivors in output order: 0, 4, 1, 3  ->  positions 0:0, 1:2, 3:3, 4:1
    assert reduction.out_index.tolist() == [[0, 2, 3, 3, 1]]


def naive_tome(metric: torch.Tensor, x: torch.Tensor, r: int, protected: int) -> torch.Tensor:
    """Loop-by-loop restatement of ToMe's merge for one sample (reference)."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a_idx, b_idx = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    best = []
    for i in a_idx:
        scores = [(-float("inf") if (i < protected or j < protected) else float(metric[i] @ metric[j]), j)
                  for j in b_idx]
        score, j = max(scores, key=lambda s: s[0])
        best.append((score, i, j))
    ranked = sorted(best, key=lambda s: -s[0])
    merged = {i: j for _, i, j in ranked[:r]}
    groups = {j: [j] for j in b_idx}
    for i, j in merged.items():
        groups[j].append(i)
    prefix = [t for t in range(protected)]
    keep_a = [i for i in a_idx if i not in merged and i >= protected]
    rest_b = [j for j in b_idx if j >= protected]
    rows = [x[t] for t in prefix] + [x[i] for i in keep_a] + [x[groups[j]].mean(0) for j in rest_b]
    return torch.stack(rows)


def test_bipartite_matching_matches_a_loop_reference():
    generator = torch.Generator().manual_seed(0)
    for protected in (1, 2, 5):
        metric = torch.randn(3, 21, 6, generator=generator)
        x = torch.randn(3, 21, 4, generator=generator)
        reduction = bipartite_soft_matching(metric, 7, protected)
        out, sizes = reduction.apply(x, None)
        assert out.shape == (3, 14, 4) and torch.all(sizes.sum(1) == 21)
        for b in range(3):
            assert torch.allclose(out[b], naive_tome(metric[b], x[b], 7, protected), atol=1e-6)


def test_bipartite_matching_merges_the_duplicate_pair():
    # cls + 4 tokens; token 2 (in A) equals token 3 (in B), nothing else is close
    metric = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0.01, 1], [-1, -1, 0]]])
    reduction = bipartite_soft_matching(metric, 1, 1)
    assert reduction.out_index.tolist() == [[0, 2, 3, 3, 1]]


def test_reorder_composes_input_and_output_permutations_into_one_map():
    """reorder(inputs, outputs) == permute the inputs, reduce, permute the outputs, for every kind of map."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3)
    sizes = torch.rand(2, 6, 1) + 0.5
    inputs = torch.stack([torch.randperm(6) for _ in range(2)])
    gather = lambda t, index: t.gather(1, index[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    reductions = [
        Reduction.select(torch.tensor([[4, 0, 2], [1, 5, 3]])),
        Reduction.merge(torch.tensor([[0, 1, 2, 1, 0, 2], [2, 2, 1, 0, 0, 1]]), num_out=3),
        Reduction.sparse(torch.tensor([[0, 1, 1, 2, 2, 2], [0, 0, 1, 1, 2, 2]]), 3, weight=torch.rand(2, 6)),
        Reduction.sparse(torch.tensor([[0, 1, 2, 2], [2, 1, 0, 0]]), 3, in_index=torch.tensor([[5, 1, 0, 3], [2, 2, 4, 0]]),
                         mass=torch.rand(2, 4)),
    ]
    for reduction in reductions:
        outputs = torch.stack([torch.randperm(3) for _ in range(2)])
        expected, expected_sizes = reduction.apply(gather(x, inputs), gather(sizes, inputs))
        out, out_sizes = reduction.reorder(inputs, outputs).apply(x, sizes)
        assert torch.allclose(out, gather(expected, outputs), atol=1e-6)
        assert torch.allclose(out_sizes, gather(expected_sizes, outputs), atol=1e-6)
        only_outputs = reduction.reorder(outputs=outputs).apply(x, sizes)[0]
        assert torch.allclose(only_outputs, gather(reduction.apply(x, sizes)[0], outputs), atol=1e-6)


def test_grouped_matching_stays_in_groups_and_sets_aside_the_unmatched():
    # A = 0, 2, 4; B = 1, 3, 5. Token 4 is alone in its group: with r=3 every A token
    # must go, so it is set aside (mass 0, out_index 0) rather than merged across groups.
    metric = torch.tensor([[[1.0, 0], [1.0, 0.1], [0, 1.0], [0.1, 1.0], [1.0, 0], [1.0, 0]]])
    groups = torch.tensor([[0, 0, 1, 1, 2, 3]])
    free = bipartite_soft_matching(metric, 3, 0)
    assert free.out_index[0, 4] == free.out_index[0, 5]  # unconstrained, 4 joins its duplicate 5
    grouped = bipartite_soft_matching(metric, 3, 0, groups)
    assert grouped.out_index.tolist() == [[0, 0, 1, 1, 0, 2]]
    assert grouped.mass.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.0, 1.0]]
    x = torch.arange(6.0).view(1, 6, 1)
    out, sizes = grouped.apply(x, None)
    assert out.flatten().tolist() == [0.5, 2.5, 5.0] and sizes.flatten().tolist() == [2.0, 2.0, 1.0]
    restored = grouped.restore(out, fill=x)
    assert restored.flatten().tolist() == [0.5, 0.5, 2.5, 2.5, 4.0, 5.0]  # token 4 keeps its own value


def test_grouped_matching_without_a_shortage_equals_the_plain_merge():
    generator = torch.Generator().manual_seed(3)
    metric = torch.randn(2, 12, 5, generator=generator)
    plain = bipartite_soft_matching(metric, 4, 0)
    one_group = bipartite_soft_matching(metric, 4, 0, torch.zeros(2, 12, dtype=torch.long))
    assert torch.equal(plain.out_index, one_group.out_index) and not one_group.mass.lt(1).any()
