"""SparseGPT (OBS reconstruction): the per-layer pruner, the Gram accumulator and the prune_oneshot scorer."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model
from torch import nn

from grpo_prune.pruning import masks as M
from grpo_prune.pruning import scores as S
from grpo_prune.pruning.oneshot import prune_oneshot
from grpo_prune.pruning.sparsegpt import GramAccumulator, obs_prune_inputs_, sparsegpt_prune_
from grpo_prune.pruning.structure import resolve_targets


def correlated_layer(seed: int = 0, tokens: int = 1024, d_in: int = 64, d_out: int = 48):
    """Inputs ``X [tokens, d_in]`` with strongly correlated features (rank d_in / 2 plus noise) of unequal
    scales, as in LM hidden states; a weight ``[d_out, d_in]``; ``H = X^T X / tokens``."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, d_in // 2, generator=g) @ torch.randn(d_in // 2, d_in, generator=g)
    x = (latent + 0.5 * torch.randn(tokens, d_in, generator=g)) * (0.2 + 3 * torch.rand(d_in, generator=g))
    w = torch.randn(d_out, d_in, generator=g)
    return x, w, x.T @ x / tokens


def output_error(x, w, w_pruned) -> float:
    return float((x @ w.T - x @ w_pruned.T).norm())


def calib_ids(seed: int = 0, batch: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- one layer


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_output_error_below_wanda(pattern, seed):
    x, w, h = correlated_layer(seed)
    pruned = w.clone()
    n_m = None if pattern == "unstructured" else pattern
    keep = sparsegpt_prune_(pruned, h, 0.5, n_m=n_m, block_size=32)
    wanda = S.wanda_scores(w, x.norm(dim=0))
    wanda_keep = M.unstructured_mask(wanda, 0.5, per_row=True) if n_m is None else M.n_m_mask(wanda, 2, 4)
    err, err_wanda = output_error(x, w, pruned), output_error(x, w, w * wanda_keep)
    assert err < 0.85 * err_wanda, (err, err_wanda)
    assert torch.equal(pruned[~keep], torch.zeros(int((~keep).sum())))
    # The kept weights really were reconstructed, not just masked.
    assert not torch.equal(pruned[keep], w[keep])


def test_unstructured_row_and_layer_counts_exact():
    x, w, h = correlated_layer(d_in=60, d_out=7)
    for sparsity in (0.3, 0.5, 0.77):
        row_keep = sparsegpt_prune_(w.clone(), h, sparsity, block_size=16, comparison="row")
        assert ((~row_keep).sum(1) == round(sparsity * 60)).all()
        layer_keep = sparsegpt_prune_(w.clone(), h, sparsity, block_size=16, comparison="layer")
        per_row = (~layer_keep).sum(1)
        assert int(per_row.sum()) == round(sparsity * 7 * 60)
        assert int(per_row.max() - per_row.min()) <= 1


@pytest.mark.parametrize("n_m", ["2:4", "1:4", "4:8"])
def test_n_m_pattern_exact(n_m):
    n, m = M.parse_n_m(n_m)
    _, w, h = correlated_layer(d_in=64)
    pruned = w.clone()
    keep = sparsegpt_prune_(pruned, h, 1 - n / m, n_m=n_m, block_size=32)
    assert (keep.reshape(-1, m).sum(1) == n).all()
    assert (pruned.reshape(-1, m) != 0).sum(1).le(n).all()
    assert torch.equal(pruned * keep, pruned)


def test_deterministic():
    _, w, h = correlated_layer()
    a, b = w.clone(), w.clone()
    keep_a = sparsegpt_prune_(a, h, 0.5)
    keep_b = sparsegpt_prune_(b, h, 0.5)
    assert torch.equal(keep_a, keep_b) and torch.equal(a, b)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prev_keep_stays_pruned_and_counts(pattern):
    _, w, h = correlated_layer(d_in=64, d_out=16)
    g = torch.Generator().manual_seed(3)
    if pattern == "2:4":
        # One pruned entry in every other group: compatible with 2:4.
        prev = torch.ones(16, 16, 4, dtype=torch.bool)
        prev[:, ::2, 0] = False
        prev = prev.reshape(16, 64)
        keep = sparsegpt_prune_(w.clone(), h, 0.5, n_m="2:4", prev_keep=prev, block_size=16)
        assert (keep.reshape(-1, 4).sum(1) == 2).all()
    else:
        prev = torch.rand(16, 64, generator=g) > 0.3
        prev[0] = torch.rand(64, generator=g) > 0.8  # a row that already prunes more than the target
        keep = sparsegpt_prune_(w.clone(), h, 0.5, prev_keep=prev, block_size=16)
        expected = torch.clamp((~prev).sum(1), min=32)
        assert torch.equal((~keep).sum(1), expected)
    assert not (keep & ~prev).any(), "a previously pruned entry came back"


def test_dead_inputs_are_zeroed_without_nan():
    x, w, _ = correlated_layer(d_in=32, d_out=8)
    x[:, [3, 17]] = 0.0
    h = x.T @ x
    pruned = w.clone()
    keep = sparsegpt_prune_(pruned, h, 0.25)
    assert torch.isfinite(pruned).all()
    assert (pruned[:, [3, 17]] == 0).all()
    assert ((~keep).sum(1) == 8).all()


def test_bad_arguments_name_the_field():
    _, w, h = correlated_layer(d_in=64, d_out=8)
    with pytest.raises(ValueError, match="`hessian`"):
        sparsegpt_prune_(w.clone(), h[:10, :10], 0.5)
    with pytest.raises(ValueError, match="`sparsity`"):
        sparsegpt_prune_(w.clone(), h, 0.3, n_m="2:4")
    with pytest.raises(ValueError, match="`block_size`"):
        sparsegpt_prune_(w.clone(), h, 0.5, n_m="2:4", block_size=6)
    with pytest.raises(ValueError, match="`comparison`"):
        sparsegpt_prune_(w.clone(), h, 0.5, comparison="global")
    with pytest.raises(ValueError, match="`prev_keep`"):
        prev = torch.ones_like(w, dtype=torch.bool)
        prev[:, :3] = False
        sparsegpt_prune_(w.clone(), h, 0.5, n_m="2:4", prev_keep=prev)


# ---------------------------------------------------------------------------------------------- Gram matrices


def test_gram_of_a_linear_excludes_masked_rows():
    lin = nn.Linear(6, 3)
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with GramAccumulator({"lin": lin}) as acc:
        acc.token_mask = mask
        lin(x)
    real = x[mask]
    torch.testing.assert_close(acc.gram("lin"), real.T @ real)
    assert acc.tokens("lin") == 8
    torch.testing.assert_close(acc.hessian("lin"), real.T @ real / 8)


def test_gram_padded_batch_equals_unpadded_and_is_shared():
    model = tiny_model().eval()
    targets = resolve_targets(model)
    seqs = [calib_ids(1, 1, 20)[0], calib_ids(2, 1, 13)[0]]

    with GramAccumulator(targets) as solo:
        for s in seqs:
            model(input_ids=s[None])

    # Right padding: the real tokens keep their positions and never attend to the padding after them.
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    padded = GramAccumulator(targets)
    padded.watch_attention_mask(model)
    with padded:
        model(input_ids=ids, attention_mask=mask)

    for name in targets:
        assert padded.tokens(name) == 33 == solo.tokens(name)
        torch.testing.assert_close(padded.gram(name), solo.gram(name), rtol=1e-4, atol=1e-4)
    layer = "model.layers.0"
    assert padded.key_of(f"{layer}.self_attn.k_proj") == padded.key_of(f"{layer}.self_attn.v_proj")
    assert padded.key_of(f"{layer}.self_attn.q_proj") == f"{layer}.self_attn.q_proj"
    assert padded.key_of(f"{layer}.mlp.up_proj") == f"{layer}.mlp.gate_proj"
    assert padded.key_of(f"{layer}.self_attn.o_proj") == f"{layer}.self_attn.o_proj"
    # Per decoder layer: q/k/v input (32), o input (32), gate/up input (32), down input (64): 4 * in^2 bytes each.
    assert padded.memory_bytes() == 2 * 4 * (3 * 32**2 + 64**2)


# --------------------------------------------------------------------------------------------- prune_oneshot


def pattern_ids(seed: int, batch: int = 16, length: int = 32) -> torch.Tensor:
    """Arithmetic progressions of token ids (start and step per row): a language a tiny model learns quickly."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 61, (batch, 1), generator=g)
    step = torch.randint(1, 6, (batch, 1), generator=g)
    return (start + step * torch.arange(length)) % 61 + 3


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny Llama trained for 100 AdamW steps on :func:`pattern_ids` (~10 s): a random model's perplexity is
    flat (every output near uniform), so pruning error would be lost in noise."""
    torch.manual_seed(0)
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(100):
        ids = pattern_ids(1000 + i)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _perplexity(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss.exp())


@pytest.mark.parametrize("granularity", ["unstructured", "n:m"])
def test_prune_oneshot_exact_and_better_than_wanda(trained_tiny, granularity):
    ids = pattern_ids(0)
    dense = _perplexity(trained_tiny, ids)
    assert dense < 3.0, "the fixture did not learn its patterns"
    ratios = {}
    for scorer in ("wanda", "sparsegpt"):
        model = copy.deepcopy(trained_tiny)
        report = prune_oneshot(model, 0.5, granularity=granularity, scorer=scorer, calibration=ids)
        assert report.scorer == scorer and report.global_sparsity == 0.5
        assert report.params_zeroed == report.params_total // 2
        assert set(report.layer_sparsity.values()) == {0.5}
        targets = resolve_targets(model)
        assert set(report.masks) == set(targets)
        for name, keep in report.masks.items():
            weight = targets[name].weight
            assert torch.equal(weight[~keep], torch.zeros(int((~keep).sum())))
            if granularity == "n:m":
                assert (keep.reshape(-1, 4).sum(1) == 2).all()
        ratios[scorer] = _perplexity(model, ids) / dense
    # Measured (seed 0): unstructured wanda 1.12x vs sparsegpt 1.07x dense; 2:4 2.08x vs 1.12x.
    assert ratios["sparsegpt"] - 1 < 0.8 * (ratios["wanda"] - 1), ratios


@pytest.mark.parametrize("kind", ["llama", "gemma3"])  # gemma3: a sliding-window layer (window 4) and a full one
def test_prune_oneshot_is_sequential(kind):
    """Each decoder layer is pruned from the outputs of the already pruned layers before it: the same result as
    collecting Gram matrices with full forward passes of the model, one decoder layer at a time. The recording pass
    that skips the layers hands each one the masks and position embeddings of its own attention type."""
    ids = calib_ids(4, 6, 24)
    mask = torch.ones_like(ids)
    mask[:2, 18:] = 0  # right padding in two rows
    batch = {"input_ids": ids, "attention_mask": mask}
    model = tiny_model(kind, seed=5).eval()
    reference = copy.deepcopy(model)
    report = prune_oneshot(model, 0.5, scorer="sparsegpt", calibration=[batch], comparison="row")

    targets = resolve_targets(reference)
    for layer in range(2):
        layer_targets = {n: m for n, m in targets.items() if n.startswith(f"model.layers.{layer}.")}
        acc = GramAccumulator(layer_targets)
        acc.watch_attention_mask(reference)
        with acc, torch.no_grad():
            reference(**batch)
        for name, mod in layer_targets.items():
            keep = sparsegpt_prune_(mod.weight, acc.hessian(name), 0.5)
            assert torch.equal(keep, report.masks[name]), name
    for name, mod in resolve_targets(model).items():
        torch.testing.assert_close(mod.weight, targets[name].weight, rtol=1e-4, atol=1e-5)


def test_layer_arguments_are_recorded_without_running_the_layers():
    from grpo_prune.pruning.sparsegpt import _layer_inputs
    from grpo_prune.pruning.structure import decoder_layers

    model = tiny_model(seed=5).eval()
    layers = [layer for _, layer in decoder_layers(model)]
    batches = [{"input_ids": calib_ids(1, 2, 8)}, {"input_ids": calib_ids(2, 3, 8)}]
    ran = []
    handles = [layer.mlp.register_forward_hook(lambda *a: ran.append(1)) for layer in layers]
    own = layers[1].forward = lambda *a, **k: None  # set by someone else (e.g. accelerate): put back afterwards
    hidden, calls = _layer_inputs(model, layers, batches)
    for h in handles:
        h.remove()
    assert ran == []  # no layer computed anything
    assert [h.shape for h in hidden] == [(2, 8, 32), (3, 8, 32)]
    torch.testing.assert_close(hidden[1], model.model.embed_tokens(batches[1]["input_ids"]))
    assert [len(c) for c in calls] == [2, 2]
    assert "forward" not in vars(layers[0]) and layers[1].forward is own


def test_prune_oneshot_sparsegpt_refusals():
    model = tiny_model()
    ids = calib_ids()
    before = {n: p.clone() for n, p in model.named_parameters()}
    for units in ("mlp", "mlp+heads"):
        with pytest.raises(ValueError, match="the same number of units in every layer"):
            prune_oneshot(
                model, 0.5, "structured", scorer="sparsegpt", calibration=ids, structured_units=units, uniform=False
            )
    with pytest.raises(ValueError, match="`calibration`"):
        prune_oneshot(model, 0.5, scorer="sparsegpt")
    with pytest.raises(ValueError, match="`comparison`"):
        prune_oneshot(model, 0.5, scorer="sparsegpt", calibration=ids, comparison="global")
    with pytest.raises(ValueError, match="`compensate`"):
        prune_oneshot(model, 0.5, scorer="sparsegpt", calibration=ids, compensate=True)
    with pytest.raises(ValueError, match="`sparsity`"):
        prune_oneshot(model, 0.3, granularity="n:m", scorer="sparsegpt", calibration=ids)
    with pytest.raises(ValueError, match="sparsegpt"):
        prune_oneshot(model, 0.5, scorer="obs", calibration=ids)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed by a refused call"


# ------------------------------------------------------------------------------ whole MLP neurons (structured)


def _least_squares_refit(w, h, keep, damp=0.01):
    """The best ``W'`` on the kept inputs for the damped ``H``: ``W' H_kk = W H_:k`` (the OBS objective)."""
    hd = h + damp * torch.diagonal(h).mean() * torch.eye(len(h))
    k = keep.nonzero().squeeze(1)
    refit = torch.zeros_like(w)
    refit[:, k] = torch.linalg.solve(hd[k][:, k].double(), (w.double() @ hd[:, k].double()).T).T.float()
    return refit


def _refit_error(w, h, refit, damp=0.01):
    hd = h + damp * torch.diagonal(h).mean() * torch.eye(len(h))
    delta = (refit - w).double()
    return float(torch.einsum("oi,ij,oj->", delta, hd.double(), delta))


def test_obs_input_removal_is_the_best_single_removal_with_its_least_squares_refit():
    x, w, h = correlated_layer(3, d_in=24, d_out=10)
    pruned = w.clone()
    keep = obs_prune_inputs_(pruned, h, 1)
    assert int((~keep).sum()) == 1
    errors = []
    for j in range(24):
        candidate = torch.ones(24, dtype=torch.bool)
        candidate[j] = False
        errors.append(_refit_error(w, h, _least_squares_refit(w, h, candidate)))
    assert int((~keep).nonzero()) == min(range(24), key=errors.__getitem__)
    torch.testing.assert_close(pruned, _least_squares_refit(w, h, keep), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_obs_input_removal_exact_count_zero_columns_and_below_wanda(seed):
    x, w, h = correlated_layer(seed, d_in=64, d_out=48)
    pruned = w.clone()
    keep = obs_prune_inputs_(pruned, h, 16)
    assert keep.shape == (64,) and int((~keep).sum()) == 16
    assert torch.equal(pruned[:, ~keep], torch.zeros(48, 16))
    # The greedy choice reconstructed stays close to the least-squares refit of its own kept set ...
    assert _refit_error(w, h, pruned) < 1.01 * _refit_error(w, h, _least_squares_refit(w, h, keep))
    # ... and beats Wanda's structured choice (column norm x input norm), without or with that same refit.
    wanda_keep = torch.ones(64, dtype=torch.bool)
    wanda_keep[(w.norm(dim=0) * x.norm(dim=0)).argsort()[:16]] = False
    err = output_error(x, w, pruned)
    assert err < 0.7 * output_error(x, w, w * wanda_keep)
    assert err <= output_error(x, w, _least_squares_refit(w, h, wanda_keep)) * 1.001


def test_obs_group_removal_is_the_best_single_group_with_its_least_squares_refit():
    """Groups of 4 columns (heads of head_dim 4): the one removed is the brute-force best, refit exactly."""
    x, w, h = correlated_layer(4, d_in=24, d_out=10)
    pruned = w.clone()
    keep = obs_prune_inputs_(pruned, h, 1, group_size=4)
    assert keep.shape == (6,) and int((~keep).sum()) == 1
    errors = []
    for j in range(6):
        candidate = torch.ones(24, dtype=torch.bool)
        candidate[4 * j : 4 * (j + 1)] = False
        errors.append(_refit_error(w, h, _least_squares_refit(w, h, candidate)))
    assert int((~keep).nonzero()) == min(range(6), key=errors.__getitem__)
    torch.testing.assert_close(pruned, _least_squares_refit(w, h, keep.repeat_interleave(4)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_obs_group_removal_takes_as_many_from_every_bucket_and_beats_the_refit_of_wanda(seed):
    x, w, h = correlated_layer(seed, d_in=48, d_out=32)
    pruned = w.clone()
    keep = obs_prune_inputs_(pruned, h, 2, group_size=4, buckets=3)  # 12 groups: 3 buckets of 4, 2 from each
    assert keep.shape == (12,) and keep.reshape(3, 4).sum(dim=1).tolist() == [2, 2, 2]
    columns = keep.repeat_interleave(4)
    assert torch.count_nonzero(pruned[:, ~columns]) == 0
    wanda_keep = torch.ones(12, dtype=torch.bool)  # Wanda's structured head score: group L2 of |W| x input norm
    score = (w.abs() * x.norm(dim=0)).reshape(32, 12, 4).square().sum(dim=(0, 2)).reshape(3, 4)
    for b in range(3):
        wanda_keep[4 * b + score[b].argsort()[:2]] = False
    wanda_refit = _least_squares_refit(w, h, wanda_keep.repeat_interleave(4))
    assert output_error(x, w, pruned) <= output_error(x, w, wanda_refit) * 1.001


def test_obs_input_removal_bad_arguments():
    _, w, h = correlated_layer(d_in=16, d_out=4)
    with pytest.raises(ValueError, match="`num_prune`"):
        obs_prune_inputs_(w.clone(), h, 16)
    with pytest.raises(ValueError, match="`num_prune`"):
        obs_prune_inputs_(w.clone(), h, 2, group_size=4, buckets=2)  # 2 groups per bucket: at most 1
    with pytest.raises(ValueError, match="`hessian`"):
        obs_prune_inputs_(w.clone(), h[:8, :8], 2)
    with pytest.raises(ValueError, match="`group_size`"):
        obs_prune_inputs_(w.clone(), h, 1, group_size=3)
    with pytest.raises(ValueError, match="`buckets`"):
        obs_prune_inputs_(w.clone(), h, 1, group_size=4, buckets=3)


def _sparsegpt_and_wanda_units(kind, sparsity, units):
    """Calibration ids, a tiny model pruned to ``sparsity`` of its ``units`` by sparsegpt, its dense copy, the same
    model pruned by wanda, and sparsegpt's report."""
    ids = calib_ids(0, 8, 32)
    model = tiny_model(kind, seed=5).eval()
    dense, wanda = copy.deepcopy(model), copy.deepcopy(model)
    report = prune_oneshot(model, sparsity, "structured", scorer="sparsegpt", calibration=ids, structured_units=units)
    prune_oneshot(wanda, sparsity, "structured", scorer="wanda", calibration=ids, structured_units=units)
    return ids, model, dense, wanda, report


def _first_layer_errors(ids, dense, pruned, path):
    """Output error of module ``path`` of each pruned model against the dense one, on the inputs the dense module
    saw in the calibration pass (what the first layer was reconstructed for)."""
    seen = []
    module = dense.get_submodule(path)
    hook = module.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        dense(input_ids=ids)
        hook.remove()
        target = module(seen[0])
        return [float((m.get_submodule(path)(seen[0]) - target).norm()) for m in pruned]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_prune_oneshot_sparsegpt_mlp_neurons(kind):
    """Whole neurons: the same number in every layer, their gate/up rows and down columns exactly zero, masks and
    report like the other structured scorers', the kept down_proj columns reconstructed; the MLP outputs of the
    first layer (same inputs for both) closer to dense than Wanda's structured choice."""
    ids, model, dense, wanda, report = _sparsegpt_and_wanda_units(kind, 0.25, "mlp")
    intermediate = model.config.intermediate_size
    assert report.scorer == "sparsegpt" and report.granularity == "structured"
    assert set(report.unit_sparsity.values()) == {round(0.25 * intermediate) / intermediate}
    layer_names = [f"model.layers.{i}.mlp" for i in range(model.config.num_hidden_layers)]
    assert sorted(report.unit_sparsity) == layer_names
    for prefix in layer_names:
        mlp = model.get_submodule(prefix)
        gone = ~report.masks[f"{prefix}.down_proj"].all(dim=0)
        assert int(gone.sum()) == round(0.25 * intermediate)
        assert torch.equal(
            report.masks[f"{prefix}.gate_proj"], ~gone.unsqueeze(1).expand(-1, mlp.gate_proj.in_features)
        )
        for weight in (mlp.gate_proj.weight[gone], mlp.up_proj.weight[gone], mlp.down_proj.weight[:, gone]):
            assert torch.count_nonzero(weight) == 0
        assert not torch.equal(mlp.down_proj.weight[:, ~gone], dense.get_submodule(prefix).down_proj.weight[:, ~gone])
    assert set(report.masks) == {f"{p}.{n}" for p in layer_names for n in ("gate_proj", "up_proj", "down_proj")}

    err, err_wanda = _first_layer_errors(ids, dense, [model, wanda], "model.layers.0.mlp")
    assert err < err_wanda, (err, err_wanda)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_prune_oneshot_sparsegpt_attention_heads(kind):
    """Whole query heads: as many from every KV head, their q_proj rows and o_proj columns exactly zero, the kept
    o_proj columns reconstructed; the first attention block's output (same inputs for both) closer to dense than
    Wanda's structured choice."""
    ids, model, dense, wanda, report = _sparsegpt_and_wanda_units(kind, 0.5, "heads")
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    r = cfg.num_attention_heads // cfg.num_key_value_heads
    layer_names = [f"model.layers.{i}.self_attn" for i in range(cfg.num_hidden_layers)]
    assert report.unit_sparsity == {p: 0.5 for p in layer_names}
    assert set(report.masks) == {f"{p}.{n}" for p in layer_names for n in ("q_proj", "o_proj")}
    for prefix in layer_names:
        attn = model.get_submodule(prefix)
        gone = ~report.masks[f"{prefix}.o_proj"].all(dim=0).reshape(cfg.num_attention_heads, d).all(dim=1)
        assert gone.reshape(cfg.num_key_value_heads, r).sum(dim=1).tolist() == [r // 2] * cfg.num_key_value_heads
        columns = gone.repeat_interleave(d)
        assert torch.count_nonzero(attn.q_proj.weight[columns]) == 0
        assert torch.count_nonzero(attn.o_proj.weight[:, columns]) == 0
        assert not torch.equal(attn.o_proj.weight[:, ~columns], dense.get_submodule(prefix).o_proj.weight[:, ~columns])

    err, err_wanda = _first_layer_errors(ids, dense, [model, wanda], "model.layers.0.self_attn.o_proj")
    assert err < err_wanda, (err, err_wanda)


# ------------------------------------------------------------------------ Gram matrices end at the target sparsity


def _count_gram_adds(monkeypatch) -> list[int]:
    """Patch GramAccumulator._add to record each call (one per distinct input per forward); returns the log."""
    calls: list[int] = []
    original = GramAccumulator._add

    def counting(self, key, x):
        calls.append(1)
        return original(self, key, x)

    monkeypatch.setattr(GramAccumulator, "_add", counting)
    return calls


def _forward(model, seed: int = 0) -> None:
    with torch.no_grad():
        model(input_ids=calib_ids(seed, 2, 12))


def test_gram_freed_and_unhooked_once_the_target_is_reached(monkeypatch):
    from grpo_prune.pruning.pruner import Pruner, PruningSettings

    calls = _count_gram_adds(monkeypatch)
    model = tiny_model()
    settings = PruningSettings(scorer="sparsegpt", schedule="linear", target_sparsity=0.5, start_step=0, end_step=2)
    pruner = Pruner(model, settings)
    for step in (1, 2):
        pruner.attach_hooks()
        _forward(model, step)
        pruner.remove_hooks()
        assert pruner.maybe_prune(step) is not None
        if step == 1:  # below the target: the matrices stay and keep growing
            assert pruner.memory_bytes()["gram"] > 0 and any(k.startswith("gram/") for k in pruner.state_dict())
    assert pruner.reached_target and pruner.sparsity() == pytest.approx(0.5)
    assert pruner.memory_bytes()["gram"] == 0 and pruner.indicators.gram is None
    assert not any(k.startswith("gram") for k in pruner.state_dict())
    masks = {n: m.clone() for n, m in pruner.masks.items()}
    fired = len(calls)
    pruner.attach_hooks()
    _forward(model, 3)
    pruner.remove_hooks()
    assert len(calls) == fired  # no Gram hook after the final event
    assert pruner.maybe_prune(3) is None
    assert all(torch.equal(masks[n], m) for n, m in pruner.masks.items())
    # A one-shot request beyond the target has nothing to reconstruct from and says why.
    with pytest.raises(ValueError, match="freed when the masks reached the target"):
        pruner.prune_to(0.6)


def test_gram_not_recreated_on_resume_after_the_target(monkeypatch, tmp_path):
    from grpo_prune.pruning.pruner import Pruner, PruningSettings

    settings = PruningSettings(scorer="sparsegpt", schedule="oneshot", target_sparsity=0.5, start_step=1, end_step=1)
    model = tiny_model()
    pruner = Pruner(model, settings)
    pruner.attach_hooks()
    _forward(model)
    pruner.remove_hooks()
    before_target = pruner.state_dict()  # what a version that kept the matrices wrote after the target, below
    assert pruner.maybe_prune(1) is not None and pruner.reached_target
    pruner.save(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "pruner_state.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if k.startswith("gram")]

    calls = _count_gram_adds(monkeypatch)
    resumed = Pruner(tiny_model(), settings)
    resumed.load(tmp_path)
    resumed.attach_hooks()
    _forward(resumed.model)
    resumed.remove_hooks()
    assert calls == [] and resumed.memory_bytes()["gram"] == 0
    assert all(torch.equal(pruner.masks[n], m) for n, m in resumed.masks.items())

    # An older checkpoint that still carried the matrices after the target loads, and they are dropped.
    old = {k: v.clone() for k, v in pruner.state_dict().items()}
    old.update({k: v.clone() for k, v in before_target.items() if k.startswith("gram")})
    again = Pruner(tiny_model(), settings)
    again.load_state_dict(old)
    assert again.memory_bytes()["gram"] == 0 and not any(k.startswith("gram") for k in again.state_dict())

    # A resume with a higher target accumulates again (from an empty matrix) and reconstructs at its events.
    raised = Pruner(tiny_model(), PruningSettings(**{**settings.__dict__, "target_sparsity": 0.6}))
    raised.load_state_dict(pruner.state_dict())
    raised.attach_hooks()
    _forward(raised.model)
    raised.remove_hooks()
    assert calls and raised.memory_bytes()["gram"] > 0
    raised.prune_to(0.6)
    assert raised.sparsity() == pytest.approx(0.6, abs=0.01) and raised.memory_bytes()["gram"] == 0


def test_training_stops_gram_at_the_final_event_and_resumes_without_it(monkeypatch, tmp_path):
    """Through the trainer: Gram hooks fire only before the last event, checkpoints after it carry no matrices, and
    a resume from such a checkpoint neither recreates them nor changes the masks."""
    from safetensors import safe_open
    from tiny import tiny_trainer
    from transformers import TrainerCallback

    steps_seen: list[int] = []
    original = GramAccumulator._add

    def counting(self, key, x):
        steps_seen.append(trainer.state.global_step)  # forwards of step k run at global_step k - 1
        return original(self, key, x)

    monkeypatch.setattr(GramAccumulator, "_add", counting)
    overrides = dict(prune_scorer="sparsegpt", max_steps=6, prune_end_step=3, save_strategy="steps", save_steps=2)
    trainer = tiny_trainer(tmp_path / "out", **overrides)
    masks_at_target: dict[str, torch.Tensor] = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                masks_at_target.update({n: m.clone() for n, m in trainer.pruner.masks.items()})

    trainer.add_callback(Snapshot())
    trainer.train()
    final_event = max(e["step"] for e in trainer.prune_events)
    assert final_event == 3 and trainer.pruner.sparsity() == pytest.approx(0.5)
    assert steps_seen and max(steps_seen) < final_event
    assert trainer.pruner.memory_bytes()["gram"] == 0
    for step, carries in ((2, True), (4, False), (6, False)):
        with safe_open(str(tmp_path / "out" / f"checkpoint-{step}" / "pruner_state.safetensors"), "pt") as f:
            assert any(k.startswith("gram/") for k in f.keys()) == carries, step
    assert all(torch.equal(masks_at_target[n], m) for n, m in trainer.pruner.masks.items())

    steps_seen.clear()
    trainer = tiny_trainer(tmp_path / "out", **overrides)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert steps_seen == [] and trainer.pruner.memory_bytes()["gram"] == 0
    assert all(torch.equal(masks_at_target[n], m) for n, m in trainer.pruner.masks.items())


# ----------------------------------------------------------------------------- OBS inverse: bounded temporaries


def _old_inverse_cholesky_upper(hessian, damp):
    """The factorisation as it was before its temporaries were bounded (a reference for bit-equality)."""
    h = hessian.to(torch.float64)
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(4):
        lower, info = torch.linalg.cholesky_ex(h + (damp * 10**attempt) * mean_diag * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0:
                return upper.to(torch.float32)
    raise AssertionError


def _peak_allocated_bytes(fn) -> int:
    """Peak bytes held by torch's CPU allocator while ``fn()`` runs (profiler memory events)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        prof.export_chrome_trace(f"{folder}/trace.json")
        with open(f"{folder}/trace.json") as f:
            events = json.load(f)["traceEvents"]
    return max([e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"] + [0])


def test_obs_inverse_is_unchanged_and_holds_at_most_two_fp64_matrices():
    from grpo_prune.pruning.sparsegpt import _inverse_cholesky_upper

    x, _, h = correlated_layer(d_in=256, tokens=2048)
    h[:, 7] = h[7, :] = 0.0  # a dead input
    dead = torch.diagonal(h) == 0
    reference = h.clone()
    reference[dead, dead] = 1.0
    torch.testing.assert_close(_inverse_cholesky_upper(h, 0.01, dead), _old_inverse_cholesky_upper(reference, 0.01))
    singular = torch.ones(64, 64)  # rank 1: positive definite only with more damping (the retry path)
    torch.testing.assert_close(_inverse_cholesky_upper(singular, 1e-6), _old_inverse_cholesky_upper(singular, 1e-6))

    fp64 = 256 * 256 * 8
    peak = _peak_allocated_bytes(lambda: _inverse_cholesky_upper(h, 0.01, dead))
    old_peak = _peak_allocated_bytes(lambda: _old_inverse_cholesky_upper(reference, 0.01))
    assert peak <= 2 * fp64 + 256 * 256 * 4 + 64 * 1024, (peak / fp64, old_peak / fp64)
    print(f"peak: {peak / fp64:.2f} fp64 [in, in] matrices, before: {old_peak / fp64:.2f}")
    assert old_peak >= 4 * fp64  # what it was: h, eye, the damped sum, the factor, the inverse...


# --------------------------------------------------------------------------------------- on a GPU (device check)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparsegpt_on_cuda_matches_cpu_and_bounds_its_fp64_memory():
    from grpo_prune.pruning.sparsegpt import _inverse_cholesky_upper

    x, w, h = correlated_layer(d_in=512, d_out=64, tokens=4096)
    cpu = w.clone()
    keep_cpu = sparsegpt_prune_(cpu, h, 0.5)
    gpu = w.clone().cuda()
    keep_gpu = sparsegpt_prune_(gpu, h.cuda(), 0.5)
    assert (keep_cpu == keep_gpu.cpu()).float().mean() > 0.99  # TF32/cuSOLVER rounding may flip near-ties
    assert output_error(x, w, gpu.cpu()) < 1.05 * output_error(x, w, cpu)

    h_gpu = h.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _inverse_cholesky_upper(h_gpu, 0.01)
    torch.cuda.synchronize()
    fp64 = 512 * 512 * 8
    # two fp64 matrices, the fp32 result, and cuSOLVER's workspace (a fraction of one matrix)
    assert torch.cuda.max_memory_allocated() - base <= 3 * fp64, (torch.cuda.max_memory_allocated() - base) / fp64


def test_sparsegpt_event_keeps_the_adam_moments_of_reconstructed_weights():
    """The measured choice (results/sparsegpt_moments): a sparsegpt event zeroes the optimizer state of pruned
    entries only; the moments of the kept, reconstructed weights stay as they were."""
    from grpo_prune.pruning.pruner import Pruner, PruningSettings

    model = tiny_model()
    pruner = Pruner(model, PruningSettings(scorer="sparsegpt", schedule="oneshot", target_sparsity=0.5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = calib_ids(0, 4, 16)
    pruner.attach_hooks()
    model(input_ids=ids, labels=ids).loss.backward()
    pruner.remove_hooks()
    opt.step()
    before = {n: {k: v.clone() for k, v in opt.state[m.weight].items()} for n, m in pruner.targets.items()}
    dense = {n: m.weight.detach().clone() for n, m in pruner.targets.items()}
    pruner.prune_to(0.5)
    pruner.mask_optimizer_state_(opt)
    for name, mod in pruner.targets.items():
        keep = pruner.masks[name]
        assert not torch.equal(mod.weight[keep], dense[name][keep]), name  # reconstructed
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[mod.weight][key]
            assert torch.equal(state[keep], before[name][key][keep]), (name, key)
            assert not state[~keep].any(), (name, key)
