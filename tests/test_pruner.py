"""Behaviour of the stateful pruning engine: targets, structure, masks, enforcement, schedule, state, one-shot.

Tiny random Llama/Qwen2 models built from a config (hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads,
vocab 128); Qwen2 has q/k/v biases, which exercises the bias paths.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from grpo_prune.pruning.oneshot import PruneReport, prune_oneshot
from grpo_prune.pruning.pruner import STATE_FILE, Pruner, PruningSettings
from grpo_prune.pruning.schedule import sparsity_at
from grpo_prune.pruning.structure import resolve_targets

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_model(kind: str = "llama", heads: int = 4, kv_heads: int = 2, seed: int = 0) -> torch.nn.Module:
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    config = config_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives tiny, near-identical norms; spread them so scores are meaningful and tie-free-ish.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.rand(p.shape[1]) * 4 + 0.1)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def calib(seed: int = 1, batch: int = 4, length: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=g)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def feed(pruner: Pruner, model: torch.nn.Module, ids: torch.Tensor, movement: bool = True) -> None:
    """Forward (hooks collect activations) and, with movement, one LM-loss backward into the movement buffers."""
    pruner.attach_hooks()
    out = model(ids, labels=ids)
    if movement:
        out.loss.backward()
        pruner.accumulate_movement_()
        model.zero_grad(set_to_none=True)
    pruner.remove_hooks()


def non_target_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if not any(f"{lin}.weight" in n for lin in LINEARS)  # embeddings, lm_head, norms (and q/k/v biases)
    }


# ------------------------------------------------------------------------------------------------------ targets
def test_default_targets_are_decoder_linears_only():
    model = tiny_model()
    names = list(resolve_targets(model))
    assert len(names) == 2 * len(LINEARS)
    assert all(".layers." in n and n.rsplit(".", 1)[1] in LINEARS for n in names)
    assert not any(k in n for n in names for k in ("embed", "lm_head", "norm"))


def test_target_patterns_select_and_reject():
    model = tiny_model()
    assert list(resolve_targets(model, [r"mlp\.down_proj"])) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    with pytest.raises(ValueError, match="targets"):
        Pruner(model, PruningSettings(targets=["lm_head"], scorer="magnitude"))
    with pytest.raises(ValueError, match="targets"):
        Pruner(model, PruningSettings(targets=["nothing_like_this"], scorer="magnitude"))
    with pytest.raises(ValueError, match="targets"):
        PruningSettings(targets=["(unclosed"]).validate()


@pytest.mark.parametrize("scorer", ["magnitude", "wanda", "movement", "random", "mama"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_unstructured_exact_sparsity_per_layer_and_untouched_rest(scorer, kind):
    model = tiny_model(kind)
    rest = non_target_params(model)
    pruner = Pruner(model, PruningSettings(scorer=scorer, schedule="oneshot"))
    feed(pruner, model, calib())
    record = pruner.prune_to(0.37)
    for name, mod in pruner.targets.items():
        k = round(0.37 * mod.weight.numel())
        mask = pruner.masks[name]
        assert (~mask).sum().item() == k, name
        assert record["layer_sparsity"][name] == pytest.approx(k / mod.weight.numel(), abs=0)
        assert torch.all(mod.weight[~mask] == 0)
    assert record["reached"] == pruner.sparsity()
    for n, p in model.named_parameters():
        if n in rest:
            assert torch.equal(p, rest[n]), f"{n} changed"


def test_row_and_global_comparison_are_exact():
    model = tiny_model()
    pruner = Pruner(model, PruningSettings(scorer="wanda", comparison="row", schedule="oneshot"))
    feed(pruner, model, calib(), movement=False)
    pruner.prune_to(0.5)
    for mask in pruner.masks.values():
        assert torch.all((~mask).sum(dim=1) == round(0.5 * mask.shape[1]))

    model = tiny_model()
    pruner = Pruner(model, PruningSettings(scorer="magnitude", comparison="global", schedule="oneshot"))
    pruner.prune_to(0.6)
    total = sum(m.numel() for m in pruner.masks.values())
    assert pruner.num_pruned() == round(0.6 * total)
    per_layer = set(round(v, 3) for v in pruner.layer_sparsity().values())
    assert len(per_layer) > 1  # a global ranking does not prune every layer equally


@pytest.mark.parametrize("n_m,sparsity", [("2:4", 0.5), ("1:4", 0.75), ("4:8", 0.5)])
def test_n_m_pattern_holds_in_every_group(n_m, sparsity):
    n, m = map(int, n_m.split(":"))
    model = tiny_model()
    report = prune_oneshot(model, sparsity, granularity="n:m", n_m=n_m, scorer="wanda", calibration=calib())
    assert report.global_sparsity == pytest.approx(sparsity, abs=0)
    for name, mask in report.masks.items():
        groups = mask.reshape(-1, m)
        assert torch.all(groups.sum(dim=1) == n), name
        weight = dict(model.named_modules())[name].weight
        assert torch.all(weight[~mask] == 0)


# --------------------------------------------------------------------------------------------------- structured
def test_structured_mlp_removes_whole_neurons():
    model = tiny_model()
    rest = {n: p.detach().clone() for n, p in model.named_parameters() if "mlp" not in n}
    pruner = Pruner(model, PruningSettings(granularity="structured", structured_units="mlp", scorer="mama"))
    feed(pruner, model, calib())
    record = pruner.prune_to(0.25)
    assert set(pruner.targets) == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in LINEARS[4:]}
    for i in range(2):
        gate, up, down = (dict(model.named_modules())[f"model.layers.{i}.mlp.{p}"] for p in LINEARS[4:])
        keep = pruner.unit_masks[f"model.layers.{i}.mlp"]
        assert (~keep).sum().item() == round(0.25 * 128)
        dead = (gate.weight == 0).all(dim=1)
        assert torch.equal(dead, ~keep)
        assert torch.equal((up.weight == 0).all(dim=1), ~keep)
        assert torch.equal((down.weight == 0).all(dim=0), ~keep)
        assert not (gate.weight[keep] == 0).all(dim=1).any()  # kept neurons are intact
    assert record["unit_sparsity"] == {"model.layers.0.mlp": 0.25, "model.layers.1.mlp": 0.25}
    assert record["reached"] == pytest.approx(0.25, abs=0)
    for n, p in model.named_parameters():
        if n in rest:
            assert torch.equal(p, rest[n]), n


@pytest.mark.parametrize("heads,kv,sparsity,per_group", [(4, 2, 0.5, 1), (8, 2, 0.25, 1), (8, 2, 0.5, 2)])
def test_structured_heads_are_gqa_consistent(heads, kv, sparsity, per_group):
    model = tiny_model("qwen2", heads=heads, kv_heads=kv)
    kv_before = {n: p.detach().clone() for n, p in model.named_parameters() if "k_proj" in n or "v_proj" in n}
    pruner = Pruner(model, PruningSettings(granularity="structured", structured_units="heads", scorer="magnitude"))
    feed(pruner, model, calib(), movement=False)
    pruner.prune_to(sparsity)
    d = 64 // heads
    modules = dict(model.named_modules())
    for i in range(2):
        keep = pruner.unit_masks[f"model.layers.{i}.self_attn"]
        assert torch.all((~keep).reshape(kv, heads // kv).sum(dim=1) == per_group)  # equal in every KV group
        q, o = modules[f"model.layers.{i}.self_attn.q_proj"], modules[f"model.layers.{i}.self_attn.o_proj"]
        q_dead = (q.weight.reshape(heads, d, -1) == 0).flatten(1).all(dim=1)
        o_dead = (o.weight.reshape(-1, heads, d) == 0).transpose(0, 1).flatten(1).all(dim=1)
        assert torch.equal(q_dead, ~keep) and torch.equal(o_dead, ~keep)
    for n, p in model.named_parameters():
        if n in kv_before:
            assert torch.equal(p, kv_before[n]), n
    assert pruner.report()["bias_indicator"] == "used"  # Qwen2's q bias enters the head score


def test_structured_scores_are_activation_aware():
    model = tiny_model()
    pruner = Pruner(model, PruningSettings(granularity="structured", scorer="magnitude", structured_units="mlp"))
    feed(pruner, model, calib(), movement=False)
    scores = pruner.score_tensors()["model.layers.0.mlp"]
    mlp = model.model.layers[0].mlp
    norm = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T], dim=1).norm(dim=1)
    stats = pruner.activations["model.layers.0.mlp.down_proj"]
    act = (stats.sumsq / stats.count).sqrt().float()
    # |W0| is snapshotted in 16 bits (half the bytes; the ranking is what matters): within its rounding of fp32.
    torch.testing.assert_close(scores, norm * act, rtol=1e-2, atol=1e-6)


def test_gqa_inconsistent_requests_fail_before_touching_weights():
    model = tiny_model(heads=8, kv_heads=2)
    before = snapshot(model)
    for kwargs in (
        {"target_sparsity": 0.3, "structured_units": "heads"},  # 1.2 heads of 4 per KV group
        {"target_sparsity": 0.5, "structured_units": "heads", "uniform": False},
        {"target_sparsity": 0.1, "structured_units": "mlp+heads"},  # rounds to 0 heads per group
    ):
        with pytest.raises(ValueError, match="GQA|uniform|heads"):
            Pruner(model, PruningSettings(granularity="structured", scorer="magnitude", **kwargs))
    no_gqa_room = tiny_model(heads=4, kv_heads=4)  # one query head per KV group
    with pytest.raises(ValueError, match="query head"):
        Pruner(no_gqa_room, PruningSettings(granularity="structured", structured_units="heads", scorer="magnitude"))
    with pytest.raises(ValueError, match="calibration"):
        prune_oneshot(model, 0.5, granularity="structured", structured_units="heads")
    assert_same_state(model, before)


def test_masks_are_deterministic_across_runs():
    results = []
    for _ in range(2):
        model = tiny_model()
        report = prune_oneshot(model, 0.5, scorer="mama", calibration=calib(), compensate=True)
        results.append((report.masks, snapshot(model)))
    for name, mask in results[0][0].items():
        assert torch.equal(mask, results[1][0][name]), name
    for key, value in results[0][1].items():
        assert torch.equal(value, results[1][1][key]), key


def test_ties_are_broken_by_index():
    model = tiny_model()
    with torch.no_grad():
        for mod in resolve_targets(model).values():
            mod.weight.fill_(0.5)  # every score equal
    pruner = Pruner(model, PruningSettings(scorer="magnitude", schedule="oneshot"))
    pruner.prune_to(0.25)
    for mask in pruner.masks.values():
        flat = mask.reshape(-1)
        k = round(0.25 * flat.numel())
        assert not flat[:k].any() and flat[k:].all()


# -------------------------------------------------------------------------------------------------- enforcement
def _train_steps(model, pruner, opt, steps, enforce, reapply=True):
    """The trainer's per-step enforcement: masked gradients before the step, weights re-zeroed after it (optimizer
    state is zeroed only at prune events)."""
    ids = calib(seed=5)
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        if enforce:
            pruner.accumulate_movement_()
            pruner.mask_gradients_()
        opt.step()
        if enforce and reapply:
            pruner.apply_masks_()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("enforce", [True, False])
def test_pruned_weights_stay_zero_under_adamw_only_with_enforcement(enforce):
    model = tiny_model()
    pruner = Pruner(model, PruningSettings(scorer="magnitude", schedule="oneshot"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train_steps(model, pruner, opt, 2, enforce=True)  # Adam moments are non-zero everywhere before pruning
    pruner.prune_to(0.5)
    pruner.mask_optimizer_state_(opt)
    _train_steps(model, pruner, opt, 4, enforce=enforce)
    revived = 0
    for name, mod in pruner.targets.items():
        pruned = ~pruner.masks[name]
        revived += int((mod.weight[pruned] != 0).sum())
        if enforce:
            for value in opt.state[mod.weight].values():
                if torch.is_tensor(value) and value.shape == mod.weight.shape:
                    assert torch.all(value[pruned] == 0), name
    if enforce:
        assert revived == 0
    else:
        assert revived > 0  # momentum brings pruned weights back: the enforcement above is what prevents it


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True),
        lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
        lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    ],
    ids=["adamw", "adamw-amsgrad", "adam-loop", "sgd-momentum", "rmsprop"],
)
def test_masked_gradients_alone_keep_pruned_weights_and_state_zero(make_opt):
    # Why the trainer zeroes optimizer state only at prune events: once a pruned entry's state is zero and its
    # gradient is masked, these optimizers leave its weight exactly zero with no re-zeroing after the step.
    model = tiny_model()
    pruner = Pruner(model, PruningSettings(scorer="magnitude", schedule="oneshot"))
    opt = make_opt(model.parameters())
    _train_steps(model, pruner, opt, 2, enforce=False)  # state non-zero everywhere before pruning
    pruner.prune_to(0.5)
    pruner.mask_optimizer_state_(opt)
    _train_steps(model, pruner, opt, 4, enforce=True, reapply=False)
    for name, mod in pruner.targets.items():
        pruned = ~pruner.masks[name]
        assert torch.all(mod.weight[pruned] == 0), name
        for value in opt.state[mod.weight].values():
            if torch.is_tensor(value) and value.shape == mod.weight.shape:
                assert torch.all(value[pruned] == 0), name


# ----------------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize(
    "granularity,extra",
    [("unstructured", {}), ("n:m", {"n_m": "2:4"}), ("structured", {"structured_units": "mlp+heads"})],
)
def test_schedule_reaches_target_monotonically(granularity, extra):
    model = tiny_model()
    settings = PruningSettings(
        target_sparsity=0.5,
        granularity=granularity,
        scorer="mama",
        schedule="cubic",
        initial_sparsity=0.1,
        start_step=1,
        end_step=7,
        every=2,
        **extra,
    )
    pruner = Pruner(model, settings)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    pruner.attach_hooks()
    prev = {n: m.clone() for n, m in pruner.masks.items()}
    events = []
    for step in range(1, 11):
        _train_steps(model, pruner, opt, 1, enforce=True)
        record = pruner.maybe_prune(step)
        if record is None:
            continue
        events.append(step)
        assert record["target"] == pytest.approx(sparsity_at(step, initial=0.1, final=0.5, start=1, end=7, every=2))
        for name, mask in pruner.masks.items():
            assert not (mask & ~prev[name]).any(), f"{name} revived a pruned entry at step {step}"
            if granularity == "unstructured":
                assert (~mask).sum().item() == round(record["target"] * mask.numel())
        prev = {n: m.clone() for n, m in pruner.masks.items()}
    pruner.remove_hooks()
    assert events == [1, 3, 5, 7]
    assert pruner.current_sparsity == 0.5
    assert pruner.sparsity() == pytest.approx(0.5, abs=0)  # exact at end_step
    if granularity == "n:m":
        for mask in pruner.masks.values():
            assert torch.all(mask.reshape(-1, 4).sum(dim=1) == 2)


def test_event_without_data_is_deferred():
    model = tiny_model()
    pruner = Pruner(model, PruningSettings(scorer="mama", schedule="oneshot", start_step=0))
    with pytest.warns(UserWarning, match="deferred"):
        assert pruner.maybe_prune(0) is None  # movement all zero: ranking it would prune by index
    feed(pruner, model, calib())
    assert pruner.maybe_prune(1)["reached"] == 0.5


# -------------------------------------------------------------------------------------------------------- state
def test_state_round_trips_bit_exactly(tmp_path):
    model = tiny_model("qwen2")
    settings = PruningSettings(
        granularity="structured",
        structured_units="mlp",
        scorer="mama",
        alpha=0.5,
        compensate=True,
        end_step=4,
        every=2,
    )
    pruner = Pruner(model, settings)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner.attach_hooks()
    for step in range(3):
        _train_steps(model, pruner, opt, 1, enforce=True)
        pruner.maybe_prune(step)
    pruner.remove_hooks()
    assert 0 < pruner.sparsity() < 0.5 and pruner.added_biases
    pruner.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["pruner_state.json", STATE_FILE]  # no temp files left behind

    fresh_model = tiny_model("qwen2", seed=1)  # other weights: everything must come from the state
    fresh = Pruner(fresh_model, copy.deepcopy(settings))
    fresh.load(tmp_path)
    saved, loaded = pruner.state_dict(), fresh.state_dict()
    assert set(saved) == set(loaded)
    assert any(k.startswith("movement/") for k in saved) and any(k.startswith("act_sumsq/") for k in saved)
    for key in saved:
        assert saved[key].dtype == loaded[key].dtype and torch.equal(saved[key].cpu(), loaded[key].cpu()), key
    assert fresh.step == pruner.step == 2 and fresh.current_sparsity == pruner.current_sparsity
    for name in pruner.added_biases:
        assert torch.equal(fresh.targets[name].bias, pruner.targets[name].bias)

    # Resumed and original grow identical masks at the next event.
    fresh_model.load_state_dict(model.state_dict())
    a, b = pruner.maybe_prune(4), fresh.maybe_prune(4)
    assert a["reached"] == b["reached"] == 0.5
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], fresh.masks[name])

    other = Pruner(tiny_model("qwen2"), PruningSettings(scorer="mama"))
    with pytest.raises(ValueError, match="granularity"):
        other.load(tmp_path)


# ------------------------------------------------------------------------------------------------- compensation
@pytest.mark.parametrize("granularity", ["unstructured", "structured"])
def test_compensation_preserves_layer_output_at_mean_input(granularity):
    """Every compensated layer (all targets; structured: the consumers down_proj) keeps W x_mean + b."""
    ids = calib()
    dense = tiny_model()
    compensated = [n for n in resolve_targets(dense) if granularity == "unstructured" or n.endswith("mlp.down_proj")]
    inputs: dict[str, list[torch.Tensor]] = {}
    modules = dict(dense.named_modules())
    hooks = [
        modules[n].register_forward_hook(
            lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))
        )
        for n in compensated
    ]
    with torch.no_grad():
        dense(ids)
    for h in hooks:
        h.remove()
    errors = {}
    for compensate in (False, True):
        model = tiny_model()
        report = prune_oneshot(
            model, 0.5, granularity=granularity, scorer="wanda", calibration=ids, compensate=compensate
        )
        pruned_modules = dict(model.named_modules())
        err = 0.0
        for name in compensated:
            x_mean = torch.cat(inputs[name]).mean(0)
            with torch.no_grad():
                ref = modules[name](x_mean)
                err += ((pruned_modules[name](x_mean) - ref).norm() / ref.norm()).item()
        errors[compensate] = err / len(compensated)
        if compensate:  # Llama has no biases: each compensated layer got one, and the report says so
            assert sorted(report.added_biases) == sorted(compensated)
    assert errors[True] < 1e-5
    assert errors[False] > 0.1


def test_compensation_records_added_biases_only_where_missing():
    model = tiny_model("qwen2")
    report = prune_oneshot(model, 0.5, scorer="wanda", calibration=calib(), compensate=True)
    assert report.added_biases and not any(n.endswith(("q_proj", "k_proj", "v_proj")) for n in report.added_biases)
    assert all(n.endswith(("o_proj", "gate_proj", "up_proj", "down_proj")) for n in report.added_biases)


# ---------------------------------------------------------------------------------------------------- DDP reduce
def test_reduce_fn_sums_statistics_across_ranks():
    batches = [calib(seed=11), calib(seed=12)]
    settings = PruningSettings(scorer="wanda", schedule="oneshot")
    both_model = tiny_model()
    both = Pruner(both_model, settings)
    for ids in batches:
        feed(both, both_model, ids, movement=False)
    both.prune_to(0.5)

    ranks = []
    for ids in batches:
        model = tiny_model()
        pruner = Pruner(model, settings)
        feed(pruner, model, ids, movement=False)
        ranks.append(pruner)
    captured = []
    ranks[1].set_reduce_fn(lambda t: captured.append(t.clone()) or t)
    ranks[1].score_tensors()
    ranks[0].set_reduce_fn(lambda t: t + captured[0])  # what an all-reduce(sum) over 2 ranks returns
    ranks[0].prune_to(0.5)
    for name in both.masks:
        assert torch.equal(ranks[0].masks[name], both.masks[name]), name
    alone = Pruner(tiny_model(), settings)  # rank 0 without the reduction: its own half of the data only
    feed(alone, alone.model, batches[0], movement=False)
    alone.prune_to(0.5)
    assert any(not torch.equal(alone.masks[n], both.masks[n]) for n in both.masks)


# ------------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": "0.5"}, "sparsity"),
        ({"granularity": "n:m", "n_m": "3:2"}, "n_m"),
        ({"granularity": "n:m", "n_m": "a:b"}, "n_m"),
        ({"granularity": "n:m", "n_m": "1:4", "sparsity": 0.5}, "target_sparsity|sparsity"),
        ({"scorer": "taylor"}, "scorer"),
        ({"granularity": "blocks"}, "granularity"),
        ({"scorer": "wanda"}, "calibration"),
        ({"scorer": "mama"}, "calibration"),
        ({"granularity": "structured"}, "calibration"),
        ({"scorer": "wanda", "calibration": torch.rand(2, 8)}, "calibration"),
        ({"scorer": "wanda", "calibration": torch.full((2, 8), 500)}, "calibration"),
        ({"normalization": "minmax"}, "normalization"),
        ({"alpha": 1.5}, "alpha"),
        ({"comparison": "row", "granularity": "n:m"}, "comparison"),
        ({"blocksize": 4}, "blocksize"),
    ],
)
def test_bad_arguments_raise_before_any_change(kwargs, field):
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=field):
        prune_oneshot(model, **kwargs)
    assert_same_state(model, before)


def test_prune_oneshot_report():
    model = tiny_model("qwen2")
    report = prune_oneshot(
        model, 0.5, granularity="structured", structured_units="mlp+heads", scorer="mama", calibration=calib()
    )
    assert isinstance(report, PruneReport)
    assert report.global_sparsity == 0.5 and report.params_zeroed == report.params_total // 2
    assert report.biases_present and set(report.unit_sparsity.values()) == {0.5}
    assert "masks" not in report.to_dict()
    out = model(calib())
    assert torch.isfinite(out.logits).all()


def test_indicator_memory_matches_docstring():
    model = tiny_model()
    pruner = Pruner(model, PruningSettings(scorer="mama", alpha=0.5, compensate=True))
    mem = pruner.memory_bytes()
    weights = [m.weight for m in pruner.targets.values()]
    n_weights = sum(w.numel() for w in weights)
    assert mem["masks"] == n_weights
    assert mem["magnitude"] == n_weights * 2  # 16-bit snapshot of fp32 weights
    rows = sum(w.shape[0] for w in weights)
    assert mem["movement"] == 2 * n_weights + 2 * rows  # float16 data + an int16 exponent per row
    assert mem["activations"] == sum(16 * m.in_features + 8 for m in pruner.targets.values())
    assert Pruner(model, PruningSettings(scorer="random")).memory_bytes()["movement"] == 0
    teacher = copy.deepcopy(model)
    frozen = Pruner(model, PruningSettings(scorer="mama", alpha=0.5), frozen_dense=teacher)
    assert frozen.memory_bytes()["magnitude"] == 0 and "magnitude/" not in " ".join(frozen.state_dict())


def test_magnitude_read_from_a_frozen_dense_copy_gives_the_same_masks():
    ids = calib()
    masks = []
    for use_copy in (False, True):
        model = tiny_model()
        teacher = copy.deepcopy(model) if use_copy else None
        pruner = Pruner(model, PruningSettings(scorer="wanda"), frozen_dense=teacher)
        feed(pruner, model, ids, movement=False)
        pruner.prune_to(0.3)
        pruner.prune_to(0.6)  # the second event still ranks by |W0|, not by the zeroed student
        masks.append({n: m.clone() for n, m in pruner.masks.items()})
        if use_copy:
            assert pruner.indicators.magnitude_source == "frozen dense copy"
    for name in masks[0]:
        # 16-bit snapshot vs exact fp32 copy: the same masks but for rare near-ties
        agree = (masks[0][name] == masks[1][name]).float().mean().item()
        assert agree > 0.99, (name, agree)


# ------------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_oneshot_on_embedded_smollm2():
    from grpo_prune.models import load_model, load_tokenizer

    model = load_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    embed = model.get_input_embeddings().weight.detach().clone()
    report = prune_oneshot(model, 0.5, scorer="magnitude")
    for name, mod in resolve_targets(model).items():
        assert (mod.weight == 0).sum().item() >= round(0.5 * mod.weight.numel())
        assert report.layer_sparsity[name] == round(0.5 * mod.weight.numel()) / mod.weight.numel()
    assert math.isclose(report.global_sparsity, 0.5, abs_tol=1e-9)
    assert torch.equal(model.get_input_embeddings().weight, embed)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]


@pytest.mark.parametrize(
    "granularity, extra", [("unstructured", {}), ("unstructured", {"comparison": "row"}), ("n:m", {"n_m": "2:4"})]
)
def test_mama_without_movement_prunes_exactly_what_wanda_prunes(granularity, extra):
    # alpha 0 skips the rank normalisation (a monotone map within a layer): the masks must not change because of it.
    masks = {}
    for scorer, kw in (("wanda", {}), ("mama", {"alpha": 0.0})):
        model = tiny_model()
        report = prune_oneshot(model, 0.5, granularity=granularity, scorer=scorer, calibration=calib(), **kw, **extra)
        masks[scorer] = report.masks
    assert masks["wanda"].keys() == masks["mama"].keys()
    for name in masks["wanda"]:
        assert torch.equal(masks["wanda"][name], masks["mama"][name]), name


@pytest.mark.parametrize("per_row", [False, True])
def test_rank_normalisation_never_changes_a_layer_mask(per_row):
    # Why alpha 0 may skip the normalisation: on scores with many exact ties (like dequantised 4-bit weights), the
    # masks built from raw scores and from their ranks are identical, per layer, per row, and for N:M.
    from grpo_prune.pruning.masks import n_m_mask, unstructured_mask
    from grpo_prune.pruning.scores import normalize_scores

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 7, (16, 32), generator=g).float() * 0.25
    ranked = normalize_scores(raw, "rank")
    for sparsity in (0.25, 0.5, 0.7):
        assert torch.equal(
            unstructured_mask(raw, sparsity, per_row=per_row), unstructured_mask(ranked, sparsity, per_row=per_row)
        )
    assert torch.equal(n_m_mask(raw, 2, 4), n_m_mask(ranked, 2, 4))


# ------------------------------------------------------------------------------ reward statistic and ties
def _halves_pruned(mask: torch.Tensor) -> tuple[int, int]:
    flat = (~mask).reshape(-1)
    half = flat.numel() // 2
    return int(flat[:half].sum()), int(flat[half:].sum())


@pytest.mark.parametrize("statistic_value", [0.0, 3.0])
def test_zero_or_tied_statistic_creates_no_positional_bias(statistic_value):
    # A constant statistic (all zero: no signal; or all tied) must not rank entries by their position.
    model = tiny_model()
    pruner = Pruner(model, PruningSettings(scorer="mama", alpha=0.5, min_statistic_updates=1))
    feed(pruner, model, calib(), movement=False)
    for acc in pruner.indicators.statistic.values():
        acc.set_(torch.full(acc.shape, statistic_value))
    pruner.indicators.statistic_updates = 10
    event = pruner.prune_to(0.5)
    assert event["statistic_mixed"] is (statistic_value != 0.0)
    for name, mask in pruner.masks.items():
        first, second = _halves_pruned(mask)
        assert abs(first - second) <= 0.1 * (first + second), (name, first, second)


def test_statistic_without_enough_updates_is_not_mixed_in():
    model = tiny_model()
    ids = calib()
    pruner = Pruner(model, PruningSettings(scorer="mama", alpha=0.5, min_statistic_updates=3))
    feed(pruner, model, ids)  # one update with a real gradient
    with pytest.warns(UserWarning, match="not mixed in"):
        event = pruner.prune_to(0.5)
    assert event["statistic_mixed"] is False
    wanda_model = tiny_model()
    wanda = prune_oneshot(wanda_model, 0.5, scorer="wanda", calibration=ids)
    for name, mask in pruner.masks.items():
        assert torch.equal(mask, wanda.masks[name]), name  # the pretrained term alone decided


@pytest.mark.parametrize("form", ["signed", "abs", "squared"])
def test_statistic_forms_follow_their_definition(form):
    model = tiny_model()
    pruner = Pruner(model, PruningSettings(scorer="movement", statistic=form))
    ids = calib()
    model(ids, labels=ids).loss.backward()
    expected = {}
    for name, mod in pruner.targets.items():
        saliency = -(mod.weight.grad * mod.weight.detach())
        expected[name] = {"signed": saliency, "abs": saliency.abs(), "squared": saliency.square()}[form]
    pruner.accumulate_movement_()
    pruner.accumulate_movement_()  # a second step adds the same amount again
    assert pruner.movement_updates == 2
    for name, t in pruner.movement.items():
        # Stored in float16 with a power-of-two scale per row: float16's relative precision.
        torch.testing.assert_close(t, 2 * expected[name], rtol=2e-3, atol=1e-3 * float(expected[name].abs().max()))
        if form != "signed":
            assert (t >= 0).all()


def test_padding_does_not_change_activation_statistics():
    model = tiny_model()
    model.eval()
    ids = calib(batch=2, length=12)
    plain = Pruner(model, PruningSettings(scorer="wanda"))
    plain.attach_hooks()
    with torch.no_grad():
        model(ids[:1, :7])  # sequence 0: 7 real tokens
        model(ids[1:, :12])  # sequence 1: 12 real tokens
    plain.remove_hooks()

    padded = Pruner(model, PruningSettings(scorer="wanda"))
    batch = ids.clone()
    batch[0, 7:] = 0
    mask = torch.ones_like(batch)
    mask[0, 7:] = 0  # right padding: real tokens see exactly what they saw unpadded
    padded.attach_hooks()
    with torch.no_grad():
        model(input_ids=batch, attention_mask=mask)
    padded.remove_hooks()
    for name in plain.activations:
        a, b = plain.activations[name], padded.activations[name]
        assert a.count.item() == b.count.item() == 19
        torch.testing.assert_close(a.sumsq, b.sumsq, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.sum, b.sum, rtol=1e-5, atol=1e-6)


def test_global_mama_normalises_all_layers_together():
    model = tiny_model()
    settings = PruningSettings(scorer="mama", alpha=0.5, comparison="global", min_statistic_updates=1)
    pruner = Pruner(model, settings)
    feed(pruner, model, calib())
    scores = pruner.score_tensors()
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    # One population: the combined score spans [0, 1] across layers, not within every layer alike.
    assert flat.min() >= 0 and flat.max() <= 1
    pruner.prune_to(0.5)
    per_layer = pruner.layer_sparsity()
    assert pruner.sparsity() == pytest.approx(0.5, abs=1e-9)
    assert max(per_layer.values()) - min(per_layer.values()) > 0.05  # layers are not all cut alike


def test_oneshot_mama_mixes_in_its_single_calibration_gradient():
    ids = calib()
    wanda = prune_oneshot(tiny_model(), 0.5, scorer="wanda", calibration=ids)
    mama = prune_oneshot(tiny_model(), 0.5, scorer="mama", alpha=0.5, statistic="abs", calibration=ids)
    assert any(not torch.equal(mama.masks[n], wanda.masks[n]) for n in wanda.masks)


def test_start_from_masks_checks_what_it_is_given():
    model = tiny_model()
    pruner = Pruner(model, PruningSettings(granularity="n:m", n_m="2:4", target_sparsity=0.5, scorer="magnitude"))
    good = {n: torch.ones_like(m) for n, m in pruner.masks.items()}
    name = next(iter(good))
    bad = dict(good)
    bad[name] = good[name].clone()
    bad[name][0, :3] = False  # 1 kept of the first 4 inputs
    with pytest.raises(ValueError, match="does not follow n_m"):
        pruner.start_from_masks(bad)
    with pytest.raises(ValueError, match="missing"):
        pruner.start_from_masks({name: good[name]})
    with pytest.raises(ValueError, match="expected a bool tensor"):
        pruner.start_from_masks({**good, name: good[name].float()})
    w = dict(model.named_modules())[name].weight
    two_of_four = torch.tensor([True, False, True, False]).repeat(w.shape[0], w.shape[1] // 4)
    reached = pruner.start_from_masks({**good, name: two_of_four})
    assert torch.all(w[:, 1::2] == 0) and torch.all(w[:, ::2] != 0)
    assert reached == pytest.approx(0.5 * w.numel() / sum(m.numel() for m in good.values()))
    with pytest.raises(ValueError, match="before any prune event"):
        pruner.start_from_masks(good)
    structured = Pruner(tiny_model(), PruningSettings(granularity="structured", scorer="magnitude"))
    with pytest.raises(ValueError, match="physically smaller export"):
        structured.start_from_masks(dict(structured.masks))


def test_magnitude_read_from_the_checkpoint_file_costs_no_memory_and_gives_exact_masks(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    masks = {}
    for from_checkpoint in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
        # The reference reads exact fp32 |W0| from a frozen copy (a 16-bit snapshot could flip a near tie).
        frozen = None if from_checkpoint else copy.deepcopy(model)
        pruner = Pruner(model, PruningSettings(scorer="wanda"), frozen, magnitude_from_checkpoint=from_checkpoint)
        expected = "checkpoint" if from_checkpoint else "frozen dense copy"
        assert pruner.indicators.magnitude_source == expected
        assert pruner.memory_bytes()["magnitude"] == 0 and "magnitude/" not in " ".join(pruner.state_dict())
        feed(pruner, model, calib(), movement=False)
        pruner.prune_to(0.3)
        with torch.no_grad():  # |W0| stays the file's, whatever training does to the weights
            for mod in pruner.targets.values():
                mod.weight.mul_(-3.0)
        pruner.prune_to(0.6)
        masks[from_checkpoint] = pruner.masks
    assert all(torch.equal(masks[True][n], masks[False][n]) for n in masks[False])


def test_checkpoint_magnitude_is_not_used_when_the_model_changed_after_loading(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] += 1.0  # e.g. a one-shot prune or reconstruction
    pruner = Pruner(model, PruningSettings(scorer="wanda"), magnitude_from_checkpoint=True)
    assert pruner.indicators.magnitude_source == "snapshot"
    assert (
        Pruner(
            tiny_model(), PruningSettings(scorer="wanda"), magnitude_from_checkpoint=True
        ).indicators.magnitude_source
        == "snapshot"
    )  # built from a config: no file
