"""Per-layer sparsity allocation: ``allocation="reward"`` (the reward statistic's mass per decoder layer decides the
spread) and the density -> sparsity map it shares with OWL (:func:`~grpo_prune.pruning.masks.density_sparsities`)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from grpo_prune.pruning import masks as M
from grpo_prune.pruning.pruner import Pruner, PruningSettings
from grpo_prune.pruning.settings import ALLOCATIONS
from grpo_prune.pruning.sharding import check_supported

SIZES = ((8, 16), (4, 24))  # two targets of different sizes per decoder layer


def _statistic(levels: list[float], signed: bool = False) -> dict[str, torch.Tensor]:
    """A reward statistic of decoder layers with two targets each; layer i's entries are ``levels[i]`` times
    uniform draws in [0.5, 1.5] (with random signs when ``signed``)."""
    gen = torch.Generator().manual_seed(0)
    stat = {}
    for i, level in enumerate(levels):
        for j, shape in enumerate(SIZES):
            t = level * (0.5 + torch.rand(shape, generator=gen))
            if signed:
                t = t * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
            stat[f"model.layers.{i}.proj{j}"] = t
    return stat


def _scores(stat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {n: torch.rand(t.shape, generator=gen) for n, t in stat.items()}


def _per_layer(masks: dict[str, torch.Tensor], layers: int) -> list[float]:
    out = []
    for i in range(layers):
        names = [n for n in masks if n.startswith(f"model.layers.{i}.")]
        out.append(sum(int((~masks[n]).sum()) for n in names) / sum(masks[n].numel() for n in names))
    return out


# ---------------------------------------------------------------------------------------------- the pure function
@pytest.mark.parametrize("sparsity", [0.5, 0.37, 0.8])
@pytest.mark.parametrize("signed", [False, True])
def test_reward_allocation_is_exact_bounded_and_prunes_high_mass_layers_less(sparsity, signed):
    stat = _statistic([0.1, 0.5, 1.0, 4.0], signed=signed)
    lam = 0.08
    layer = M.reward_sparsities(stat, sparsity, lam=lam)
    masks = {n: M.unstructured_mask(sc, layer[n]) for n, sc in _scores(stat).items()}
    total = sum(t.numel() for t in stat.values())
    assert sum(int((~m).sum()) for m in masks.values()) == M.num_to_prune(sparsity, total)
    per_layer = _per_layer(masks, 4)
    # More mass (|R| for the signed form), lower sparsity; every layer within lambda (plus a rounding unit).
    assert per_layer[0] > per_layer[1] > per_layer[2] > per_layer[3]
    assert max(abs(s - sparsity) for s in per_layer) <= lam + 1 / 32
    assert per_layer[0] - per_layer[3] > lam  # the bound is used, not only respected
    # The two targets of one layer share its sparsity (up to rounding).
    assert abs(layer["model.layers.2.proj0"] - layer["model.layers.2.proj1"]) < 1 / 64


def test_reward_density_is_the_mean_absolute_statistic_of_the_layer():
    a, b = torch.tensor([[1.0, -3.0]]), torch.tensor([[-2.0, 0.0, 0.0, 2.0]])
    assert M.statistic_density([a, b]) == pytest.approx(8.0 / 6.0)
    # A layer whose signed statistic cancels out in sum still has mass: it moved.
    stat = {"model.layers.0.p": torch.tensor([[5.0, -5.0]]), "model.layers.1.p": torch.tensor([[0.1, 0.1]])}
    layer = M.reward_sparsities(stat, 0.5, lam=0.5)
    assert layer["model.layers.0.p"] < layer["model.layers.1.p"]


def test_reward_allocation_is_uniform_without_mass_differences():
    for stat in (_statistic([0.0, 0.0, 0.0]), _statistic([1.0, 1.0, 1.0])):
        if any(t.any() for t in stat.values()):  # equal levels but different draws: make the means equal
            stat = {n: torch.ones_like(t) for n, t in stat.items()}
        layer = M.reward_sparsities(stat, 0.5, lam=0.1)
        assert all(abs(s - 0.5) < 1 / 64 for s in layer.values())


def test_reward_allocation_respects_previous_masks():
    stat = _statistic([0.1, 0.5, 1.0, 4.0])
    scores = _scores(stat)
    # Layer 3 (the most mass) was already pruned to 55%: it stays so, the others make room.
    prev = {n: torch.ones_like(t, dtype=torch.bool) for n, t in stat.items()}
    for n in ("model.layers.3.proj0", "model.layers.3.proj1"):
        prev[n].view(-1)[: int(0.55 * prev[n].numel())] = False
    layer = M.reward_sparsities(stat, 0.5, lam=0.08, prev_masks=prev)
    masks = {n: M.unstructured_mask(sc, layer[n], prev[n]) for n, sc in scores.items()}
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * sum(t.numel() for t in stat.values()))
    assert not any(bool((masks[n] & ~prev[n]).any()) for n in stat)  # monotone: pruned stays pruned
    per_layer = _per_layer(masks, 4)
    assert per_layer[3] >= 0.55 - 1 / 64
    assert per_layer[0] > per_layer[1] > per_layer[2]  # the others still differ by their mass


def test_density_sparsities_checks_its_layers():
    with pytest.raises(ValueError, match="one entry per decoder layer"):
        M.density_sparsities({"model.layers.0": 1.0}, {"model.layers.0.a": 4, "model.layers.1.a": 4}, 0.5)
    with pytest.raises(ValueError, match="finite"):
        M.density_sparsities({"model.layers.0": float("nan")}, {"model.layers.0.a": 4}, 0.5)


def _owl_case(case: int) -> dict[str, torch.Tensor]:
    """Deterministic (no RNG) non-negative scores: four decoder layers of one to three targets, heavier tails in
    deeper layers."""
    out = {}
    for i in range(4):
        for j, shape in enumerate([(8, 16), (4, 24), (12, 8)][: 1 + (case + i) % 3]):
            n = shape[0] * shape[1]
            base = ((torch.arange(n, dtype=torch.float32) * (7 + i + 3 * j)) % 97 + 1) / 97
            out[f"model.layers.{i}.p{j}"] = (base ** (1 + 2 * i + case)).reshape(shape)
    return out


# Pruned counts per target computed by owl_sparsities before it shared density_sparsities with "reward"
# (commit 95f4d6e), lam=0.1, m=2: the refactor must leave OWL's results bit-identical (s_t == k_t / numel_t).
OWL_PINNED = {
    (0, 0.37, False): [60, 44, 33, 45, 34, 34, 46],
    (0, 0.37, True): [54, 38, 28, 39, 30, 29, 78],
    (0, 0.5, False): [77, 61, 45, 62, 46, 46, 63],
    (0, 0.5, True): [74, 58, 43, 59, 44, 44, 78],
    (0, 0.8, True): [115, 99, 74, 100, 75, 75, 102],
    (1, 0.37, False): [47, 36, 35, 27, 27, 55, 60, 45],
    (1, 0.37, True): [41, 31, 29, 22, 22, 49, 78, 60],
    (1, 0.5, True): [63, 47, 51, 39, 39, 71, 78, 60],
    (1, 0.8, False): [102, 77, 91, 68, 68, 110, 115, 86],
}


@pytest.mark.parametrize("case, sparsity, with_prev", list(OWL_PINNED))
def test_owl_results_are_unchanged_by_the_shared_map(case, sparsity, with_prev):
    scores = _owl_case(case)
    # Previous masks prune 60% of layer 3 (more than OWL gives it) and 10% elsewhere: the shift binds.
    prev = {n: (torch.arange(t.numel()) % 10 >= (6 if ".3." in n else 1)).reshape(t.shape) for n, t in scores.items()}
    layer = M.owl_sparsities(scores, sparsity, lam=0.1, m=2.0, prev_masks=prev if with_prev else None)
    expected = OWL_PINNED[(case, sparsity, with_prev)]
    assert list(layer) == list(scores)
    assert [layer[n] for n in scores] == [k / scores[n].numel() for k, n in zip(expected, scores, strict=True)]


# ------------------------------------------------------------------------------------------------------ settings
def test_reward_is_an_allocation_and_validates_its_needs():
    assert "reward" in ALLOCATIONS
    PruningSettings(allocation="reward", scorer="movement").validate()
    PruningSettings(allocation="reward", scorer="mama", alpha=0.3).validate()


@pytest.mark.parametrize(
    "kwargs, fields",
    [
        (dict(scorer="mama", alpha=0.0), ("`allocation`='reward'", "`scorer`", "`alpha`")),
        (dict(scorer="wanda"), ("`allocation`='reward'", "`scorer`", "'wanda'")),
        (dict(scorer="movement", granularity="n:m", target_sparsity=0.5), ("`allocation`='reward'", "granularity")),
        (dict(scorer="movement", granularity="structured"), ("`allocation`='reward'", "granularity")),
        (dict(scorer="movement", comparison="row"), ("`allocation`='reward'", "comparison", "'row'")),
        (dict(scorer="movement", comparison="global"), ("`allocation`='reward'", "comparison", "'global'")),
        (dict(scorer="movement", owl_lambda=1.5), ("`owl_lambda`",)),
    ],
)
def test_reward_allocation_refuses_what_it_cannot_do(kwargs, fields):
    with pytest.raises(ValueError) as err:
        PruningSettings(allocation="reward", **kwargs).validate()
    for field in fields:
        assert field in str(err.value)


def test_fsdp2_refuses_non_uniform_allocations_with_the_right_reason():
    with pytest.raises(ValueError, match="`allocation`='reward' is not supported under FSDP2") as err:
        check_supported(PruningSettings(allocation="reward", scorer="movement"))
    assert "outlier" not in str(err.value) and "one-shot" not in str(err.value)
    with pytest.raises(ValueError, match="`allocation`='owl' is not supported under FSDP2.*outlier"):
        check_supported(PruningSettings(allocation="owl", scorer="wanda"))
    check_supported(PruningSettings(scorer="movement"))  # uniform passes


# -------------------------------------------------------------------------------------------------------- pruner
def _pruner(**overrides) -> tuple[Pruner, torch.nn.Module]:
    model = tiny_model()
    settings = dict(
        scorer="mama", alpha=0.5, allocation="reward", owl_lambda=0.1, schedule="oneshot", min_statistic_updates=2
    )
    settings.update(overrides)
    pruner = Pruner(model, PruningSettings(**settings))
    pruner.attach_hooks()  # activations for mama's pretrained (Wanda-like) term
    with torch.no_grad():
        model(torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(0)))
    pruner.remove_hooks()
    return pruner, model


def _set_statistic(pruner: Pruner, level: dict[int, float], updates: int) -> None:
    """Hand-set the reward statistic: every entry of decoder layer i's targets is ``level[i]``."""
    for name, acc in pruner.indicators.statistic.items():
        layer = int(M.decoder_layer_of(name).rsplit(".", 1)[1])
        acc.set_(torch.full(acc.shape, level[layer]))
    pruner.indicators.statistic_updates = updates


def _layer_means(pruner: Pruner) -> dict[int, float]:
    counts, sizes = {}, {}
    for name, mask in pruner.masks.items():
        layer = int(M.decoder_layer_of(name).rsplit(".", 1)[1])
        counts[layer] = counts.get(layer, 0) + int((~mask).sum())
        sizes[layer] = sizes.get(layer, 0) + mask.numel()
    return {i: counts[i] / sizes[i] for i in counts}


def _total(pruner: Pruner) -> int:
    return sum(m.numel() for m in pruner.masks.values())


def test_pruner_spreads_sparsity_by_the_statistic_with_the_exact_global_count():
    pruner, _ = _pruner()
    _set_statistic(pruner, {0: 1.0, 1: 0.1}, updates=2)  # RL moves layer 0 far more than layer 1
    record = pruner.prune_to(0.5)
    assert record["reward_allocation"] is True
    assert record["num_pruned"] == M.num_to_prune(0.5, _total(pruner))
    layers = _layer_means(pruner)
    # Two layers of equal size: the bound is reached on both sides.
    assert layers[0] == pytest.approx(0.4, abs=1e-3) and layers[1] == pytest.approx(0.6, abs=1e-3)
    assert len({round(s, 3) for s in record["layer_sparsity"].values()}) == 2


def test_pruner_masks_stay_monotone_when_the_statistic_moves_between_events():
    pruner, _ = _pruner(scorer="movement", alpha=0.0, min_statistic_updates=1)
    _set_statistic(pruner, {0: 0.1, 1: 1.0}, updates=1)
    pruner.prune_to(0.3)
    first = {n: m.clone() for n, m in pruner.masks.items()}
    assert _layer_means(pruner)[0] > _layer_means(pruner)[1]
    _set_statistic(pruner, {0: 1.0, 1: 0.1}, updates=2)  # now layer 0 moves most
    record = pruner.prune_to(0.5)
    assert record["reward_allocation"] is True
    assert record["num_pruned"] == M.num_to_prune(0.5, _total(pruner))
    assert not any(bool((pruner.masks[n] & ~first[n]).any()) for n in first)  # pruned stays pruned
    layers = _layer_means(pruner)
    assert layers[0] < layers[1]
    assert all(abs(s - 0.5) <= 0.1 + 1e-3 for s in layers.values())


@pytest.mark.parametrize(
    "level, updates, why",
    [({0: 1.0, 1: 0.1}, 1, "fewer than min_statistic_updates"), ({0: 0.0, 1: 0.0}, 5, "all zero")],
)
def test_pruner_falls_back_to_uniform_while_the_statistic_has_no_signal(level, updates, why):
    pruner, _ = _pruner()
    _set_statistic(pruner, level, updates=updates)
    with pytest.warns(UserWarning, match=f"allocation='reward'.*{why}"):
        record = pruner.prune_to(0.5)
    assert record["reward_allocation"] is False
    assert record["statistic_mixed"] is False  # the same signal decides mama's mix
    for name, mask in pruner.masks.items():
        assert int((~mask).sum()) == M.num_to_prune(0.5, mask.numel()), name
