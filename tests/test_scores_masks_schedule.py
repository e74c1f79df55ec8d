"""Pure pruning math: scores, masks and schedules (grpo_prune.pruning.{scores,masks,schedule})."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_prune.pruning.masks import (
    expand_group_mask,
    global_unstructured_masks,
    group_mask,
    n_m_mask,
    num_to_prune,
    parse_n_m,
    unstructured_mask,
)
from grpo_prune.pruning.schedule import SCHEDULES, is_prune_event, prune_event_steps, sparsity_at
from grpo_prune.pruning.scores import (
    NORMALIZATIONS,
    SCORERS,
    group_l2,
    group_sum,
    magnitude_scores,
    mama_scores,
    movement_update_,
    normalize_scores,
    random_scores,
    rank_correlation,
    wanda_scores,
)


def quantised(shape, levels: int = 4, seed: int = 0) -> torch.Tensor:
    """Scores with many exact ties, like |W| of dequantised 4-bit weights."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, shape, generator=g).float() / levels


def reference_pruned(scores: list[float], k: int, prev_keep: list[bool] | None = None) -> set[int]:
    """Independent pure-Python selection: previously pruned first, then by (score, flat index)."""
    prev = prev_keep or [True] * len(scores)
    k = max(k, prev.count(False))
    order = sorted(range(len(scores)), key=lambda i: (prev[i], scores[i], i))
    return set(order[:k])


def pruned_set(keep: torch.Tensor) -> set[int]:
    return set(torch.nonzero(~keep.reshape(-1)).squeeze(1).tolist())


# --------------------------------------------------------------------------------------------------- scores


def test_scorer_names():
    assert SCORERS == ("magnitude", "wanda", "movement", "random", "mama")
    assert NORMALIZATIONS == ("rank", "zscore")


def test_magnitude_scores_is_fp32_abs_copy():
    w = torch.tensor([[-1.5, 0.25], [0.0, 2.0]], dtype=torch.bfloat16)
    s = magnitude_scores(w)
    assert s.dtype == torch.float32
    assert torch.equal(s, torch.tensor([[1.5, 0.25], [0.0, 2.0]]))
    w.zero_()  # the snapshot must not alias the weight that pruning later zeroes in place
    assert s.abs().sum() > 0


def test_wanda_scores_scales_columns_by_activation_norm():
    w = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    act = torch.tensor([1.0, 0.5, 0.0])
    assert torch.equal(wanda_scores(w, act), torch.tensor([[1.0, 1.0, 0.0], [4.0, 2.5, 0.0]]))
    with pytest.raises(ValueError, match="act_norm"):
        wanda_scores(w, torch.ones(2))


def test_movement_update_accumulates_minus_grad_times_weight_in_fp32():
    weight = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=torch.bfloat16))
    grad = torch.tensor([[0.5, 0.5], [-1.0, 2.0]], dtype=torch.bfloat16)
    movement = torch.zeros(2, 2)
    movement_update_(movement, weight, grad)
    movement_update_(movement, weight, grad)
    assert movement.dtype == torch.float32 and not movement.requires_grad
    assert torch.equal(movement, torch.tensor([[-1.0, 2.0], [6.0, -2.0]]))
    with pytest.raises(ValueError, match="float32"):
        movement_update_(torch.zeros(2, 2, dtype=torch.bfloat16), weight, grad)
    with pytest.raises(ValueError, match="shape"):
        movement_update_(torch.zeros(2, 3), weight, grad)


def test_random_scores_reproducible_per_seed_and_salt():
    a = random_scores((8, 16), seed=3, salt="model.layers.0.mlp.up_proj")
    assert a.shape == (8, 16) and a.dtype == torch.float32
    assert bool((a >= 0).all() and (a < 1).all())
    assert torch.equal(a, random_scores([8, 16], seed=3, salt="model.layers.0.mlp.up_proj"))
    assert not torch.equal(a, random_scores((8, 16), seed=4, salt="model.layers.0.mlp.up_proj"))
    assert not torch.equal(a, random_scores((8, 16), seed=3, salt="model.layers.1.mlp.up_proj"))
    assert random_scores(5, seed=0, salt="x").shape == (5,)


def test_rank_is_percentile_with_average_ranks_for_ties():
    x = torch.tensor([[0.3, -1.0, 0.3], [2.0, 0.3, -1.0]])
    r = normalize_scores(x, "rank")
    # ascending: -1.0 x2 (ranks 0, 1 -> 0.5), 0.3 x3 (ranks 2, 3, 4 -> 3), 2.0 (rank 5); no order among equals
    expected = torch.tensor([[3.0, 0.5, 3.0], [5.0, 3.0, 0.5]]) / 5
    assert r.dtype == torch.float32 and r.shape == x.shape
    assert torch.equal(r, expected)
    assert torch.equal(r, normalize_scores(x, "rank"))
    assert torch.equal(normalize_scores(torch.ones(7), "rank"), torch.full((7,), 0.5))  # constant: no position bias
    assert torch.equal(normalize_scores(torch.tensor([4.0]), "rank"), torch.tensor([0.0]))


def test_rank_is_order_preserving_on_random_input():
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    r = normalize_scores(x, "rank").reshape(-1)
    assert r.min() == 0 and r.max() == 1
    assert torch.unique(r).numel() == r.numel()
    order = torch.sort(x.reshape(-1), stable=True).indices
    assert bool((r[order].diff() > 0).all())


def test_zscore_standardises_and_constant_gives_zeros():
    x = torch.randn(32, 40, generator=torch.Generator().manual_seed(1)) * 7 + 3
    z = normalize_scores(x, "zscore")
    assert z.dtype == torch.float32
    assert abs(z.mean().item()) < 1e-5
    assert abs(z.double().pow(2).mean().sqrt().item() - 1) < 1e-5
    torch.testing.assert_close(z, (x - x.mean()) / x.std(correction=0))
    # a constant whose float mean is not exactly representable must still give zeros, not +-1 or NaN
    for value in (0.0, 0.1, 1e6 + 0.3):
        c = normalize_scores(torch.full((3, 1000), value), "zscore")
        assert torch.equal(c, torch.zeros(3, 1000))


def test_normalize_rejects_unknown_method_and_nan():
    with pytest.raises(ValueError, match=r"normalization.*rank.*zscore"):
        normalize_scores(torch.ones(3), "minmax")
    with pytest.raises(ValueError, match="NaN"):
        normalize_scores(torch.tensor([1.0, float("nan")]), "rank")


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_mama_alpha_zero_is_magnitude_order_and_one_is_movement_order(normalization):
    g = torch.Generator().manual_seed(2)
    magnitude = quantised((24, 32), levels=8, seed=3)
    movement = torch.randn(24, 32, generator=g)
    for alpha, indicator in ((0.0, magnitude), (1.0, movement)):
        scores = mama_scores(magnitude, movement, alpha, normalization)
        assert scores.dtype == torch.float32 and scores.shape == magnitude.shape
        same_order = torch.sort(scores.reshape(-1), stable=True).indices
        assert torch.equal(same_order, torch.sort(indicator.reshape(-1), stable=True).indices)
        for sparsity in (0.2, 0.5, 0.8):
            assert torch.equal(unstructured_mask(scores, sparsity), unstructured_mask(indicator, sparsity))


def test_mama_mixes_normalised_indicators():
    magnitude = torch.tensor([1.0, 2.0, 3.0, 4.0])
    movement = torch.tensor([4.0, 3.0, 2.0, 1.0])
    # ranks (0, 1/3, 2/3, 1) and (1, 2/3, 1/3, 0): the 0.25 mix favours magnitude
    expected = 0.75 * torch.arange(4.0) / 3 + 0.25 * torch.arange(3.0, -1.0, -1.0) / 3
    torch.testing.assert_close(mama_scores(magnitude, movement, 0.25, "rank"), expected)
    zm, zv = normalize_scores(magnitude, "zscore"), normalize_scores(movement, "zscore")
    torch.testing.assert_close(mama_scores(magnitude, movement, 0.5, "zscore"), 0.5 * zm + 0.5 * zv)


def test_mama_bias_adds_to_magnitude_per_unit():
    magnitude = torch.tensor([1.0, 2.0, 3.0])
    movement = torch.zeros(3)
    bias = torch.tensor([-5.0, 0.0, 0.0])  # |b| lifts unit 0 above the others
    assert mama_scores(magnitude, movement, 0.0, "rank", bias=bias).argmax() == 0
    w_mag = torch.ones(2, 3)
    per_row = mama_scores(w_mag, torch.zeros(2, 3), 0.0, "zscore", bias=torch.tensor([0.0, 1.0]))
    assert bool((per_row[1] > per_row[0]).all())
    with pytest.raises(ValueError, match="bias"):
        mama_scores(magnitude, movement, 0.5, "rank", bias=torch.ones(4))


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_mama_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        mama_scores(torch.ones(3), torch.ones(3), alpha, "rank")


def test_mama_rejects_bad_normalization_and_shapes():
    with pytest.raises(ValueError, match="normalization"):
        mama_scores(torch.ones(3), torch.ones(3), 0.5, "l2")
    with pytest.raises(ValueError, match="movement"):
        mama_scores(torch.ones(3), torch.ones(4), 0.5, "rank")


def test_group_l2_and_sum_over_mlp_neurons_and_heads():
    g = torch.Generator().manual_seed(4)
    gate, up, down = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(4, 6, generator=g)
    l2 = group_l2([(gate, 0), (up, 0), (down, 1)])
    expected = (gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(l2, expected)
    torch.testing.assert_close(group_sum([(gate, 0), (down, -1)]), gate.sum(1) + down.sum(0))
    # heads: 3 heads of head_dim 2 -> rows 2h, 2h+1 of q and the same columns of o
    q, o = torch.randn(6, 4, generator=g), torch.randn(4, 6, generator=g)
    heads = group_l2([(q, 0, 2), (o, 1, 2)])
    expected_heads = torch.stack(
        [(q[2 * h : 2 * h + 2].pow(2).sum() + o[:, 2 * h : 2 * h + 2].pow(2).sum()).sqrt() for h in range(3)]
    )
    torch.testing.assert_close(heads, expected_heads)
    with pytest.raises(ValueError, match="same number of groups"):
        group_l2([(gate, 0), (down, 0)])
    with pytest.raises(ValueError, match="group_size"):
        group_l2([(q, 0, 4)])


# ---------------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("shape", [(7, 13), (64, 96), (3, 5, 8)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.73, 1.0])
def test_unstructured_mask_prunes_exactly_k_lowest(shape, sparsity):
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    keep = unstructured_mask(scores, sparsity)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    k = round(sparsity * scores.numel())
    assert int((~keep).sum()) == k == num_to_prune(sparsity, scores.numel())
    if 0 < k < scores.numel():
        assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.9])
def test_per_row_mask_prunes_exactly_k_in_every_row(sparsity):
    scores = quantised((33, 40), levels=5, seed=6)
    keep = unstructured_mask(scores, sparsity, per_row=True)
    assert ((~keep).sum(dim=1) == round(sparsity * 40)).all()
    for row in range(33):
        assert pruned_set(keep[row]) == reference_pruned(scores[row].tolist(), round(sparsity * 40))


def test_all_equal_scores_prune_the_lowest_flat_indices_deterministically():
    scores = torch.full((6, 10), 0.5)
    keep = unstructured_mask(scores, 0.35)
    assert pruned_set(keep) == set(range(21))
    assert torch.equal(keep, unstructured_mask(scores.clone(), 0.35))
    rows = unstructured_mask(scores, 0.3, per_row=True)
    assert bool((~rows[:, :3]).all() and rows[:, 3:].all())
    glob = global_unstructured_masks({"a": torch.ones(2, 4), "b": torch.ones(3, 4)}, 0.5)
    assert pruned_set(glob["a"]) == set(range(8)) and pruned_set(glob["b"]) == {0, 1}
    nm = n_m_mask(torch.zeros(2, 8), 2, 4)
    assert torch.equal(nm, torch.tensor([[False, False, True, True] * 2] * 2))


def test_quantised_ties_match_reference_selection():
    scores = quantised((20, 24), levels=4, seed=7)
    for sparsity in (0.15, 0.5, 0.85):
        k = round(sparsity * scores.numel())
        assert pruned_set(unstructured_mask(scores, sparsity)) == reference_pruned(scores.reshape(-1).tolist(), k)


@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_masks_are_monotone_under_changing_scores(per_row):
    g = torch.Generator().manual_seed(8)
    keep = None
    for sparsity in (0.1, 0.3, 0.5, 0.7, 0.9):
        scores = torch.randn(16, 20, generator=g)  # scores move between events (movement)
        new = unstructured_mask(scores, sparsity, prev_mask=keep, per_row=per_row)
        if keep is not None:
            assert not bool((new & ~keep).any()), "a pruned entry came back"
        if per_row:
            assert ((~new).sum(dim=1) == round(sparsity * 20)).all()
        else:
            assert int((~new).sum()) == round(sparsity * 320)
        keep = new


def test_prev_mask_pruning_more_than_k_keeps_it():
    prev = torch.ones(4, 5, dtype=torch.bool)
    prev[0] = False
    keep = unstructured_mask(torch.randn(4, 5), 0.1, prev_mask=prev)
    assert torch.equal(keep, prev)
    rows = unstructured_mask(torch.randn(4, 5), 0.2, prev_mask=prev, per_row=True)
    assert (~rows[0]).all() and ((~rows[1:]).sum(dim=1) == 1).all()


def test_prev_pruned_entries_stay_pruned_even_with_minus_inf_scores_elsewhere():
    scores = torch.tensor([float("-inf"), float("-inf"), 1.0, 2.0, 3.0, 4.0])
    prev = torch.tensor([True, True, True, True, False, False])
    keep = unstructured_mask(scores, 3 / 6, prev_mask=prev)
    assert pruned_set(keep) == {0, 4, 5}


@pytest.mark.parametrize("sparsity", [-0.1, 1.01, float("nan")])
def test_mask_builders_reject_bad_sparsity(sparsity):
    for build in (
        lambda: unstructured_mask(torch.ones(4, 4), sparsity),
        lambda: global_unstructured_masks({"a": torch.ones(4)}, sparsity),
        lambda: n_m_mask(torch.ones(4, 4), 2, 4, sparsity=sparsity),
    ):
        with pytest.raises(ValueError, match="sparsity"):
            build()


def test_mask_builders_reject_bad_prev_mask_and_nan_scores():
    with pytest.raises(ValueError, match="prev_mask"):
        unstructured_mask(torch.ones(4, 4), 0.5, prev_mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="prev_mask"):
        unstructured_mask(torch.ones(4, 4), 0.5, prev_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        unstructured_mask(torch.tensor([1.0, float("nan")]), 0.5)
    with pytest.raises(ValueError, match="prev_masks"):
        global_unstructured_masks({"a": torch.ones(4)}, 0.5, prev_masks={"b": torch.ones(4, dtype=torch.bool)})


def test_global_masks_rank_across_layers_with_exact_total():
    g = torch.Generator().manual_seed(9)
    scores = {"small": torch.rand(8, 16, generator=g), "large": torch.rand(16, 8, generator=g) + 0.5}
    masks = global_unstructured_masks(scores, 0.4)
    total = sum(s.numel() for s in scores.values())
    assert list(masks) == ["small", "large"]
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.4 * total)
    # the low-scored layer loses more than its share
    assert (~masks["small"]).float().mean() > 0.4 > (~masks["large"]).float().mean()
    flat = torch.cat([s.reshape(-1) for s in scores.values()]).tolist()
    got = pruned_set(torch.cat([m.reshape(-1) for m in masks.values()]))
    assert got == reference_pruned(flat, round(0.4 * total))


def test_global_masks_are_monotone_with_prev_masks():
    g = torch.Generator().manual_seed(10)
    prev = None
    for sparsity in (0.2, 0.45, 0.7):
        scores = {"a": torch.randn(6, 8, generator=g), "b": torch.randn(10, 4, generator=g)}
        masks = global_unstructured_masks(scores, sparsity, prev)
        assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * 88)
        if prev is not None:
            assert all(not bool((masks[n] & ~prev[n]).any()) for n in masks)
        prev = masks


@pytest.mark.parametrize("spec, expected", [("2:4", (2, 4)), ("4:8", (4, 8)), ("1:4", (1, 4)), (" 2 : 4 ", (2, 4))])
def test_parse_n_m_accepts_n_colon_m(spec, expected):
    assert parse_n_m(spec) == expected


@pytest.mark.parametrize("spec", ["3:2", "2:0", "0:4", "4:4", "a:b", "24", "2:4:8", "", "-1:4", "2.0:4", 24, None])
def test_parse_n_m_rejects_malformed_naming_n_m(spec):
    with pytest.raises(ValueError, match=r"n_m.*N:M.*1 <= N < M"):
        parse_n_m(spec)


def assert_n_m(keep: torch.Tensor, n: int, m: int) -> None:
    kept_per_group = keep.reshape(-1, m).sum(dim=1)
    assert bool((kept_per_group == n).all()), f"not every group of {m} keeps {n}"


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (1, 2)])
def test_n_m_mask_keeps_top_n_of_every_group(n, m):
    scores = quantised((12, 32), levels=6, seed=11)
    keep = n_m_mask(scores, n, m)
    assert keep.shape == scores.shape
    assert_n_m(keep, n, m)
    groups, kept = scores.reshape(-1, m), keep.reshape(-1, m)
    for group, group_keep in zip(groups, kept, strict=True):
        assert pruned_set(group_keep) == reference_pruned(group.tolist(), m - n)
    assert torch.equal(keep, n_m_mask(scores, n, m, sparsity=1 - n / m))


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_gradual_n_m_is_monotone_subset_of_final_pattern(n, m):
    scores = quantised((16, 32), levels=5, seed=12)
    final = n_m_mask(scores, n, m)
    keep = None
    for sparsity in (0.05, 0.15, 0.3, 0.42, 1 - n / m):
        new = n_m_mask(scores, n, m, sparsity=sparsity, prev_mask=keep)
        assert int((~new).sum()) == round(sparsity * scores.numel())
        assert not bool((~new & final).any()), "pruned an entry the final N:M pattern keeps"
        if keep is not None:
            assert not bool((new & ~keep).any()), "a pruned entry came back"
        keep = new
    assert torch.equal(keep, final)
    assert_n_m(keep, n, m)


def test_gradual_n_m_with_moving_scores_ends_in_a_valid_pattern():
    g = torch.Generator().manual_seed(13)
    keep = None
    for sparsity in (0.1, 0.2, 0.35, None):
        scores = torch.randn(8, 16, generator=g)
        new = n_m_mask(scores, 2, 4, sparsity=sparsity, prev_mask=keep)
        assert bool(((~new).reshape(-1, 4).sum(dim=1) <= 2).all())
        if keep is not None:
            assert not bool((new & ~keep).any())
        keep = new
    assert_n_m(keep, 2, 4)


def test_n_m_mask_rejects_bad_inputs():
    with pytest.raises(ValueError, match="divisible by m"):
        n_m_mask(torch.ones(4, 6), 2, 4)
    with pytest.raises(ValueError, match="sparsity"):
        n_m_mask(torch.ones(4, 8), 2, 4, sparsity=0.6)
    with pytest.raises(ValueError, match="1 <= n < m"):
        n_m_mask(torch.ones(4, 8), 4, 4)
    prev = torch.ones(4, 8, dtype=torch.bool)
    prev[0, :3] = False
    with pytest.raises(ValueError, match="prev_mask"):
        n_m_mask(torch.ones(4, 8), 2, 4, prev_mask=prev)


def test_group_mask_prunes_lowest_groups_monotonically():
    scores = torch.tensor([0.5, 0.1, 0.5, 0.9, 0.1, 0.3])
    keep = group_mask(scores, 3)
    assert pruned_set(keep) == {1, 4, 5}
    assert pruned_set(group_mask(torch.zeros(6), 2)) == {0, 1}
    grown = group_mask(torch.tensor([0.0, 9.0, 9.0, 9.0, 9.0, 8.0]), 4, prev_keep=keep)
    assert pruned_set(grown) == {0, 1, 4, 5}
    with pytest.raises(ValueError, match="n_prune"):
        group_mask(scores, 7)


def test_expand_group_mask_onto_mlp_and_head_weights():
    neurons = torch.tensor([True, False, True])
    down = expand_group_mask(neurons, (4, 3), dim=1)
    assert torch.equal(down, neurons.expand(4, 3))
    gate = expand_group_mask(neurons, torch.Size([3, 4]), dim=0)
    assert torch.equal(gate, neurons[:, None].expand(3, 4))
    heads = torch.tensor([True, False])
    q = expand_group_mask(heads, (6, 5), dim=-2, group_size=3)
    assert bool(q[:3].all() and not q[3:].any())
    q[0, 0] = False  # a real tensor, not an aliasing expand
    assert int((~q).sum()) == 16
    with pytest.raises(ValueError, match="group_size"):
        expand_group_mask(heads, (5, 5), dim=0, group_size=3)


@settings(max_examples=60, deadline=None, database=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 17),
    sparsity=st.floats(0.0, 1.0),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    per_row=st.booleans(),
)
def test_property_unstructured_exact_count_and_reference_selection(rows, cols, sparsity, levels, seed, per_row):
    scores = quantised((rows, cols), levels=levels, seed=seed)
    prev = unstructured_mask(torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)), sparsity / 2)
    keep = unstructured_mask(scores, sparsity, prev_mask=prev, per_row=per_row)
    assert not bool((keep & ~prev).any())
    if per_row:
        k = round(sparsity * cols)
        for r in range(rows):
            expected = reference_pruned(scores[r].tolist(), k, prev[r].tolist())
            assert pruned_set(keep[r]) == expected
            assert len(expected) == max(k, int((~prev[r]).sum()))
    else:
        k = round(sparsity * rows * cols)
        expected = reference_pruned(scores.reshape(-1).tolist(), k, prev.reshape(-1).tolist())
        assert pruned_set(keep) == expected
        assert int((~keep).sum()) == max(k, int((~prev).sum()))


@settings(max_examples=40, deadline=None, database=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    sparsity=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_global_exact_count(sizes, sparsity, seed):
    scores = {f"layer{i}": quantised((size,), levels=3, seed=seed + i) for i, size in enumerate(sizes)}
    masks = global_unstructured_masks(scores, sparsity)
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * sum(sizes))
    assert all(masks[name].shape == scores[name].shape for name in scores)


def test_full_size_layer_is_fast_enough_and_exact():
    # SmolLM2's largest prunable matrix, with 4-bit-like ties; runs at every prune event
    scores = quantised((576, 1536), levels=16, seed=14)
    numel = scores.numel()
    assert int((~unstructured_mask(scores, 0.5)).sum()) == numel // 2
    assert ((~unstructured_mask(scores, 0.5, per_row=True)).sum(dim=1) == 768).all()
    assert_n_m(n_m_mask(scores, 2, 4), 2, 4)
    assert int((~n_m_mask(scores, 2, 4, sparsity=0.3)).sum()) == round(0.3 * numel)
    ranked = normalize_scores(scores, "rank")
    assert torch.unique(ranked).numel() == torch.unique(scores).numel() == 16  # ties stay ties
    assert torch.equal(unstructured_mask(ranked, 0.5), unstructured_mask(scores, 0.5))


# ------------------------------------------------------------------------------------------------- schedule


def reference_events(start: int, end: int, every: int) -> list[int]:
    events, t = [], start
    while t < end:
        events.append(t)
        t += every
    return [*events, end]


def reference_sparsity(step, schedule, initial, final, start, end, every) -> float:
    if step < start:
        return 0.0
    if schedule == "oneshot":
        return final
    last = max(e for e in reference_events(start, end, every) if e <= step)
    p = 1.0 if end == start else (last - start) / (end - start)
    if schedule == "cubic":
        return final + (initial - final) * (1 - p) ** 3
    return initial + (final - initial) * p


GRID = [
    # (initial, final, start, end, every)
    (0.0, 0.5, 0, 10, 1),
    (0.0, 0.5, 3, 20, 4),
    (0.1, 0.9, 5, 17, 3),
    (0.2, 0.2, 0, 8, 2),
    (0.0, 0.75, 4, 4, 1),
    (0.3, 0.6, 1, 100, 7),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("initial, final, start, end, every", GRID)
def test_sparsity_at_matches_closed_form_on_every_step(schedule, initial, final, start, end, every):
    values = []
    for step in range(end + 15):
        got = sparsity_at(step, schedule=schedule, initial=initial, final=final, start=start, end=end, every=every)
        want = reference_sparsity(step, schedule, initial, final, start, end, every)
        assert math.isclose(got, want, rel_tol=0, abs_tol=1e-12), (step, got, want)
        values.append(got)
    assert all(b >= a for a, b in zip(values, values[1:], strict=False)), "sparsity must never decrease"
    assert values[end:] == [final] * len(values[end:]), "final sparsity is reached at end and held"


def test_cubic_is_the_default_and_front_loaded():
    kwargs = {"initial": 0.0, "final": 0.8, "start": 0, "end": 10}
    assert sparsity_at(5, **kwargs) == sparsity_at(5, schedule="cubic", **kwargs) == pytest.approx(0.8 * 0.875)
    assert sparsity_at(5, schedule="linear", **kwargs) == pytest.approx(0.4)
    assert sparsity_at(0, schedule="oneshot", **kwargs) == 0.8
    assert sparsity_at(2, initial=0.1, final=0.5, start=2, end=10) == pytest.approx(0.1)
    assert sparsity_at(1, initial=0.1, final=0.5, start=2, end=10) == 0.0


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("start, end, every", [(0, 10, 1), (3, 20, 4), (5, 5, 2), (2, 9, 20)])
def test_prune_events_are_consistent(schedule, start, end, every):
    events = prune_event_steps(schedule=schedule, start=start, end=end, every=every)
    expected = [start] if schedule == "oneshot" else reference_events(start, end, every)
    assert events == expected
    for step in range(end + 5):
        assert is_prune_event(step, schedule=schedule, start=start, end=end, every=every) == (step in events)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"initial": -0.1}, "initial"),
        ({"initial": 1.0, "final": 1.0}, "initial"),
        ({"final": 1.0}, "final"),
        ({"final": float("nan")}, "final"),
        ({"initial": 0.6, "final": 0.5}, "final"),
        ({"start": -1}, "start"),
        ({"start": 5, "end": 4}, "end"),
        ({"every": 0}, "every"),
        ({"every": 1.5}, "every"),
        ({"schedule": "exponential"}, r"schedule.*cubic.*linear.*oneshot"),
    ],
)
def test_schedule_rejects_bad_arguments_naming_them(kwargs, name):
    args = {"schedule": "cubic", "initial": 0.0, "final": 0.5, "start": 0, "end": 10, "every": 1, **kwargs}
    with pytest.raises(ValueError, match=name):
        sparsity_at(3, **args)
    if not {"initial", "final"} & set(kwargs):
        step_args = {k: args[k] for k in ("schedule", "start", "end", "every")}
        with pytest.raises(ValueError, match=name):
            prune_event_steps(**step_args)
        with pytest.raises(ValueError, match=name):
            is_prune_event(3, **step_args)


def test_rank_correlation_is_spearman_with_averaged_ties():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert rank_correlation(a, a * 10 + 5) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    # Ranks 1, 2.5, 2.5, 4 against 1..4: Pearson of the ranks = 4.5 / sqrt(5 * 4.5).
    assert rank_correlation(a, torch.tensor([0.0, 1.0, 1.0, 2.0])) == pytest.approx(4.5 / (5 * 4.5) ** 0.5)
    assert math.isnan(rank_correlation(a, torch.zeros(4)))  # a constant ranks nothing
    big = torch.arange(1000.0)
    assert rank_correlation(big, big.flip(0), max_entries=100) == pytest.approx(-1.0)
