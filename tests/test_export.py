"""Export of pruned models: vanilla loading, logits equality, sizes, sidecars, trainer round trips, LoRA, errors.

Tiny random Llama/Qwen2 models (tests/tiny.py: hidden 32, MLP 64, 4 heads in 2 KV groups, 2 layers); Qwen2 has
q/k/v biases, which exercises the bias slicing. Weights are spread (as in test_pruner.py) so that logits are far
from zero and an export that computed the wrong thing could not pass the tolerance by accident.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model, tiny_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_prune import export_pruned, prune_oneshot
from grpo_prune.compress import SPARSE_WEIGHTS_NAME
from grpo_prune.export import EXPORT_FORMAT, MASKS_FILE, REPORT_FILE, UNIT_MASKS_FILE

ATOL = 1e-5
LORA_TARGETS = ("q_proj", "up_proj", "down_proj")


def spread_(model: torch.nn.Module) -> torch.nn.Module:
    """Scale weights so that activations and logits are O(1) (default init gives near-zero logits)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(torch.rand(p.shape[1]) * 20 + 2)
            elif p.dim() == 1 and "norm" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_model(kind: str = "llama", **overrides) -> torch.nn.Module:
    return spread_(tiny_model(kind, **overrides)).eval()


def ids(batch: int = 3, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=x).logits


def load(path) -> torch.nn.Module:
    # The plain transformers entry point, nothing from grpo_prune: what a user of the export does.
    return AutoModelForCausalLM.from_pretrained(path).eval()


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() counts tied embeddings once


# ------------------------------------------------------------------------------------------------------ structured
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("units, sparsity", [("mlp", 0.25), ("heads", 0.5), ("mlp+heads", 0.5)])
def test_structured_export_is_smaller_and_computes_the_same(tmp_path, kind, units, sparsity):
    model = make_model(kind)
    dense = logits(model, ids())
    n_dense = num_params(model)
    report = prune_oneshot(
        model, sparsity, "structured", scorer="wanda", calibration=ids(8, 16, 1), structured_units=units
    )
    masked = logits(model, ids())
    assert (masked - dense).abs().max() > 100 * ATOL  # pruning changed the model: equality below means something

    out = export_pruned(model, tmp_path / "out", pruner=report)
    exported = load(tmp_path / "out")
    torch.testing.assert_close(logits(exported, ids()), masked, atol=ATOL, rtol=0)

    # Sizes: exactly the pruned weight entries go, plus the q_proj bias entries of removed heads (Qwen2).
    removed_heads = sum(len(r.get("heads", [])) for r in out["removed"].values())
    bias_entries = removed_heads * 8 if kind == "qwen2" else 0
    assert n_dense - num_params(exported) == report.params_zeroed + bias_entries
    assert out["params_before"] - out["params_after"] == report.params_zeroed + bias_entries
    assert out["bytes_after"] == 4 * out["params_after"] < out["bytes_before"] == 4 * n_dense
    assert all(p.detach().abs().sum() > 0 for p in exported.parameters())  # nothing dead left behind

    cfg = exported.config
    assert type(exported).__name__ == f"{'Llama' if kind == 'llama' else 'Qwen2'}ForCausalLM"
    assert cfg.intermediate_size == (round(64 * (1 - sparsity)) if "mlp" in units else 64)
    assert cfg.num_attention_heads == (2 if "heads" in units else 4)
    assert cfg.num_key_value_heads == 2  # one query head removed per KV group: GQA stays valid
    assert json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == 8
    layer = exported.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (cfg.num_attention_heads * 8, 32)
    assert layer.mlp.down_proj.weight.shape == (32, cfg.intermediate_size)

    unit_masks = load_file(tmp_path / "out" / UNIT_MASKS_FILE)
    for prefix, fraction in report.unit_sparsity.items():
        assert unit_masks[prefix].dtype == torch.bool
        assert (~unit_masks[prefix]).float().mean().item() == pytest.approx(fraction)
    assert out["mode"] == "structured" and out["format"] == EXPORT_FORMAT
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["params_after"] == out["params_after"]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("units, sparsity, intermediate, heads", [("mlp", 0.25, 48, 4), ("mlp+heads", 0.5, 32, 2)])
def test_structured_sparsegpt_export_is_smaller_and_computes_the_same(
    tmp_path, kind, units, sparsity, intermediate, heads
):
    """MLP neurons and query heads removed with OBS reconstruction (the kept down_proj / o_proj columns changed)
    slice like any other structured result: the smaller model computes what the masked one does."""
    model = make_model(kind)
    report = prune_oneshot(
        model, sparsity, "structured", scorer="sparsegpt", calibration=ids(8, 16, 1), structured_units=units
    )
    masked = logits(model, ids())
    out = export_pruned(model, tmp_path / "out", pruner=report)
    exported = load(tmp_path / "out")
    torch.testing.assert_close(logits(exported, ids()), masked, atol=ATOL, rtol=0)
    assert out["mode"] == "structured" and exported.config.intermediate_size == intermediate
    assert (exported.config.num_attention_heads, exported.config.num_key_value_heads) == (heads, 2)
    q_biases = 2 * 2 * 8 if kind == "qwen2" and "heads" in units else 0  # 2 heads of 8 in each of 2 layers
    assert out["params_before"] - out["params_after"] == report.params_zeroed + q_biases


def test_a_kv_group_without_query_heads_loses_its_keys_and_values(tmp_path):
    model = make_model("qwen2")  # q/k/v biases: the k/v bias slicing is exercised too
    report = prune_oneshot(
        model, 0.5, "structured", scorer="wanda", calibration=ids(8, 16, 1), structured_units="heads"
    )
    # The engine keeps every KV group alive; by hand, drop group 0's last query head in every layer.
    for layer in range(2):
        q, o = (f"model.layers.{layer}.self_attn.{p}" for p in ("q_proj", "o_proj"))
        head = int(report.masks[q].reshape(4, -1).any(dim=1)[:2].nonzero()[0])
        report.masks[q][head * 8 : (head + 1) * 8] = False
        report.masks[o][:, head * 8 : (head + 1) * 8] = False
        with torch.no_grad():
            for name in (q, o):
                model.get_submodule(name).weight.masked_fill_(~report.masks[name], 0)
    masked = logits(model, ids())

    out = export_pruned(model, tmp_path / "out", pruner=report)
    exported = load(tmp_path / "out")
    torch.testing.assert_close(logits(exported, ids()), masked, atol=ATOL, rtol=0)
    assert (exported.config.num_attention_heads, exported.config.num_key_value_heads) == (1, 1)
    attn = exported.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (8, 32) and attn.v_proj.bias.shape == (8,)
    assert out["removed"]["model.layers.0"]["kv_heads"] == [0]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_structured_compensation_biases_are_exported(tmp_path, kind):
    model = make_model(kind)
    report = prune_oneshot(
        model,
        0.5,
        "structured",
        scorer="wanda",
        calibration=ids(8, 16, 1),
        structured_units="mlp+heads",
        compensate=True,
    )
    assert report.added_biases  # down_proj and o_proj had no bias: compensation created them
    masked = logits(model, ids())
    out = export_pruned(model, tmp_path / "out", pruner=report)
    exported = load(tmp_path / "out")
    torch.testing.assert_close(logits(exported, ids()), masked, atol=ATOL, rtol=0)
    assert exported.config.mlp_bias and exported.config.attention_bias
    down = exported.model.layers[0].mlp.down_proj.bias
    assert down.detach().abs().sum() > 0  # the compensation itself survived
    assert exported.model.layers[0].mlp.gate_proj.bias.detach().abs().sum() == 0  # zero where the layer had none
    if kind == "qwen2":  # vanilla Qwen2 cannot hold o_proj/MLP biases: the equivalent Llama is written
        assert type(exported).__name__ == "LlamaForCausalLM"
        assert any("Qwen2ForCausalLM -> LlamaForCausalLM" in c for c in out["bias_changes"])


# ---------------------------------------------------------------------------------------------------------- masked
@pytest.mark.parametrize("granularity, extra", [("unstructured", {}), ("n:m", {"n_m": "2:4"})])
def test_masked_export_has_exact_zeros_and_the_mask_sidecar(tmp_path, granularity, extra):
    model = make_model("qwen2")
    report = prune_oneshot(model, 0.5, granularity, scorer="wanda", calibration=ids(8, 16, 1), **extra)
    masked = logits(model, ids())
    out = export_pruned(model, tmp_path / "out", pruner=report)
    exported = load(tmp_path / "out")
    torch.testing.assert_close(logits(exported, ids()), masked, atol=0, rtol=0)

    sidecar = load_file(tmp_path / "out" / MASKS_FILE)
    assert set(sidecar) == set(report.masks)
    weights = dict(exported.named_parameters())
    for name, mask in report.masks.items():
        assert sidecar[name].dtype == torch.bool and torch.equal(sidecar[name], mask)
        w = weights[f"{name}.weight"]
        assert torch.all(w[~mask] == 0) and torch.all(w[mask] != 0)
        if granularity == "n:m":
            assert torch.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2)
    assert out["mode"] == "masked" and out["params_after"] == out["params_before"]
    assert out["nonzero_params_before"] - out["nonzero_params_after"] == 0  # the source already held the zeros
    assert out["global_sparsity"] == pytest.approx(0.5)
    assert set(out["layer_sparsity"]) == set(report.masks)


def test_structured_false_writes_zeros_at_full_size(tmp_path):
    model = make_model()
    report = prune_oneshot(model, 0.5, "structured", scorer="wanda", calibration=ids(8, 16, 1))
    out = export_pruned(model, tmp_path / "out", pruner=report, structured=False)
    assert out["mode"] == "masked" and out["params_after"] == out["params_before"]
    assert load(tmp_path / "out").config.intermediate_size == 64
    assert set(load_file(tmp_path / "out" / MASKS_FILE)) == set(report.masks)


# ----------------------------------------------------------------------------------------------------- compressed
@pytest.mark.parametrize(
    "granularity, extra, fmt, dtype",
    [
        ("unstructured", {}, "sparse-bitmask", torch.float32),
        ("unstructured", {}, "sparse-bitmask", torch.bfloat16),
        ("n:m", {"n_m": "2:4"}, "sparse-24-bitmask", torch.float32),
    ],
    ids=["unstructured-fp32", "unstructured-bf16", "2:4-fp32"],
)
def test_compressed_export_loads_back_to_exactly_the_masked_weights(tmp_path, granularity, extra, fmt, dtype):
    from compressed_tensors.config import SparsityCompressionConfig

    from grpo_prune.compress import load_compressed

    # Rows as wide as a small real model's (SmolLM2: 576 / 1536 inputs), so that the 8-byte row offset of each row
    # weighs about as much as it does there (8 / 64 bytes per bf16 weight would add 6% of the dense bytes alone).
    model = make_model("qwen2", hidden_size=256, intermediate_size=512).to(dtype)
    report = prune_oneshot(model, 0.5, granularity, scorer="wanda", calibration=ids(8, 16, 1), **extra)
    dense = export_pruned(model, tmp_path / "dense", pruner=report)
    out = export_pruned(model, tmp_path / "out", pruner=report, compressed=True)

    restored = load_compressed(tmp_path / "out")
    reference = load(tmp_path / "dense")  # the dense export as plain transformers loads it
    expected = reference.state_dict()
    got = restored.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == dtype and torch.equal(got[key], value), key  # bit-exact, pruned entries zero
    torch.testing.assert_close(logits(restored, ids()), logits(reference, ids()), atol=0, rtol=0)

    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and out["weights_format"] == fmt
    sparsity = SparsityCompressionConfig.load_from_registry(fmt, **config["sparsity_config"])  # the library's schema
    assert sparsity.format == fmt and sparsity.sparsity_structure == (
        "2:4" if fmt == "sparse-24-bitmask" else "unstructured"
    )
    assert sparsity.targets == ["Linear"] and not set(sparsity.ignore) & set(report.masks)
    assert not (tmp_path / "out" / MASKS_FILE).exists()  # the bitmask is the mask

    # compressed-tensors' layout (what its sparse compressors, llm-compressor and vLLM read): tensors named after
    # the module, {m}.compressed / .bitmask / .shape (/ .row_offsets), never {m}.weight.compressed.
    stored_keys = set(load_file(tmp_path / "out" / SPARSE_WEIGHTS_NAME))
    for name in report.masks:
        assert {f"{name}.compressed", f"{name}.bitmask", f"{name}.shape"} <= stored_keys, name
        assert f"{name}.weight" not in stored_keys and f"{name}.weight.bitmask" not in stored_keys

    # Sizes: the pruned layers take at most 0.6x of their dense bytes; the whole file shrinks too.
    stored = load_file(tmp_path / "out" / SPARSE_WEIGHTS_NAME)
    dense_stored = load_file(tmp_path / "dense" / "model.safetensors")
    pruned_bytes = sum(
        t.numel() * t.element_size()
        for k, t in stored.items()
        if any(k.startswith(f"{n}.") for n in report.masks) and not k.endswith(".bias")
    )
    dense_bytes = sum(
        dense_stored[f"{n}.weight"].numel() * dense_stored[f"{n}.weight"].element_size() for n in report.masks
    )
    assert pruned_bytes <= 0.6 * dense_bytes, pruned_bytes / dense_bytes
    assert out["file_bytes"] < dense["file_bytes"] and out["compressed_ratio"] == pytest.approx(
        out["file_bytes"] / dense["file_bytes"], rel=1e-6
    )


def test_compressed_export_from_the_cli_and_refusals(tmp_path, capsys):
    from grpo_prune.cli import main
    from grpo_prune.pruning.pruner import Pruner, PruningSettings

    model = make_model()
    pruner = Pruner(model, PruningSettings(0.5, granularity="unstructured", scorer="magnitude"))
    pruner.prune_to(0.5)
    model.save_pretrained(tmp_path / "ckpt")
    pruner.save(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--format", "compressed"]) == 0
    assert "sparse-bitmask format" in capsys.readouterr().out
    # A compressed export is not re-exported (nor loaded by plain from_pretrained): load_compressed is the way.
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "again")]) == 2
    assert "load_compressed" in capsys.readouterr().err

    structured = make_model()
    s_report = prune_oneshot(structured, 0.5, "structured", scorer="wanda", calibration=ids(8, 16, 1))
    with pytest.raises(ValueError, match="already physically smaller"):
        export_pruned(structured, tmp_path / "s", pruner=s_report, compressed=True)
    out = export_pruned(structured, tmp_path / "s", pruner=s_report, compressed=True, structured=False)
    assert out["weights_format"] == "sparse-bitmask"


# --------------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("granularity", ["unstructured", "structured"])
def test_lora_merge_keeps_sparsity(tmp_path, granularity):
    from peft import LoraConfig, get_peft_model

    model = make_model()
    report = prune_oneshot(model, 0.5, granularity, scorer="wanda", calibration=ids(8, 16, 1))
    # init_lora_weights=False: B is random, not zero, so the merge really writes into the pruned entries.
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=list(LORA_TARGETS), init_lora_weights=False))
    base_before = {k: v.clone() for k, v in lora.state_dict().items()}

    out = export_pruned(lora, tmp_path / "out", pruner=report)

    for k, v in lora.state_dict().items():  # the caller's PEFT model is untouched (merged on a copy)
        assert torch.equal(v, base_before[k]), k
    reference = lora.merge_and_unload()  # merged by hand, then re-masked: what the export must equal
    with torch.no_grad():
        for name, mask in report.masks.items():
            w = reference.get_submodule(name).weight
            if name.endswith(LORA_TARGETS):
                assert torch.any(w[~mask] != 0), name  # the merge did refill pruned entries
            w.masked_fill_(~mask, 0)
    exported = load(tmp_path / "out")
    torch.testing.assert_close(logits(exported, ids()), logits(reference, ids()), atol=ATOL, rtol=0)
    if granularity == "unstructured":
        weights = dict(exported.named_parameters())
        for name, mask in report.masks.items():
            assert torch.all(weights[f"{name}.weight"][~mask] == 0), name
    else:
        assert exported.config.intermediate_size == 32
    assert len(out["lora_merged"]) == 2 * len(LORA_TARGETS)  # 2 layers
    assert any("re-applied" in note for note in out["notes"])


# -------------------------------------------------------------------------------------------- trainer round trip
@pytest.mark.parametrize(
    "overrides",
    [
        dict(prune_granularity="unstructured"),
        dict(prune_granularity="structured", prune_structured_units="mlp+heads", prune_compensate=True),
    ],
    ids=["unstructured", "structured-compensated"],
)
def test_round_trip_from_a_trainer_checkpoint(tmp_path, overrides):
    trainer = tiny_trainer(tmp_path / "run", max_steps=2, prune_end_step=1, **overrides)
    trainer.train()
    assert trainer.pruner.sparsity() == pytest.approx(0.5)
    checkpoint = tmp_path / "checkpoint"
    trainer.save_model(str(checkpoint))
    trained = logits(trainer.model, ids())

    out = export_pruned(checkpoint, tmp_path / "out")
    exported = load(tmp_path / "out")
    torch.testing.assert_close(logits(exported, ids()), trained, atol=ATOL, rtol=0)
    assert out["source"] == str(checkpoint)
    assert out["source_report"]["events"]  # the training report travels with the export
    assert out["pruning"]["settings"]["granularity"] == overrides["prune_granularity"]
    # The in-memory route (the trainer's model and Pruner) writes the same tensors as the checkpoint route.
    export_pruned(trainer.model, tmp_path / "from_memory", pruner=trainer.pruner)
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("out", "from_memory"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.decode(tokenizer("12 + 3")["input_ids"]) == "12 + 3"
    if overrides["prune_granularity"] == "unstructured":
        weights = dict(exported.named_parameters())
        for name, mask in trainer.pruner.masks.items():
            assert torch.equal(load_file(tmp_path / "out" / MASKS_FILE)[name], mask.cpu())
            assert torch.all(weights[f"{name}.weight"][~mask] == 0)
    else:
        assert (exported.config.intermediate_size, exported.config.num_attention_heads) == (32, 2)
        assert exported.config.mlp_bias and exported.config.attention_bias  # compensation's biases kept
        assert out["params_after"] < out["params_before"]


def test_cli_exports_a_save_pretrained_plus_pruner_save_folder(tmp_path, capsys):
    from grpo_prune.cli import main
    from grpo_prune.pruning.pruner import Pruner, PruningSettings

    model = make_model()
    pruner = Pruner(model, PruningSettings(0.5, granularity="structured", scorer="wanda"))
    pruner.attach_hooks()
    logits(model, ids(8, 16, 1))  # calibration: the forward hooks record activations
    pruner.remove_hooks()
    pruner.prune_to(0.5)
    model.save_pretrained(tmp_path / "ckpt")
    pruner.save(tmp_path / "ckpt")

    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 0
    assert "intermediate_size: 64 -> 32" in capsys.readouterr().out
    torch.testing.assert_close(logits(load(tmp_path / "out"), ids()), logits(model, ids()), atol=ATOL, rtol=0)
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "again")]) == 2  # the units are already gone
    assert "already sliced" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ bad inputs
def test_folder_without_pruner_state_is_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no pruner state"):
        export_pruned(tmp_path / "plain", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        export_pruned(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_uniform_structured_is_refused_with_a_way_out(tmp_path):
    model = make_model()
    report = prune_oneshot(model, 0.25, "structured", scorer="wanda", calibration=ids(8, 16, 1))
    # One more neuron of layer 1 goes: the layers now keep 48 and 47 neurons, which no vanilla config can say.
    gate = "model.layers.1.mlp.gate_proj"
    neuron = int(report.masks[gate].any(dim=1).nonzero()[0])
    for suffix, index in (("gate_proj", (neuron,)), ("up_proj", (neuron,)), ("down_proj", (slice(None), neuron))):
        report.masks[f"model.layers.1.mlp.{suffix}"][index] = False
    with pytest.raises(ValueError, match="same number of units kept in every decoder layer"):
        export_pruned(model, tmp_path / "out", pruner=report)
    assert not (tmp_path / "out").exists()
    out = export_pruned(model, tmp_path / "out", pruner=report, structured=False)  # the way out the error names
    assert out["mode"] == "masked"


def test_other_bad_inputs(tmp_path):
    model = make_model()
    report = prune_oneshot(model, 0.5, "unstructured", scorer="magnitude")
    with pytest.raises(ValueError, match="pruner="):
        export_pruned(model, tmp_path / "out")
    with pytest.raises(ValueError, match="structured=True"):
        export_pruned(model, tmp_path / "out", pruner=report, structured=True)
    with pytest.raises(ValueError, match="`structured`"):
        export_pruned(model, tmp_path / "out", pruner=report, structured="yes")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an earlier export"):
        export_pruned(model, tmp_path / "busy", pruner=report)

    structured = make_model()
    s_report = prune_oneshot(structured, 0.5, "structured", scorer="wanda", calibration=ids(8, 16, 1))
    down = s_report.masks["model.layers.0.mlp.down_proj"]
    down[0, 0] = ~down[0, 0]  # one entry of a neuron flipped: no longer a whole structural unit
    with pytest.raises(ValueError, match="not whole structural units"):
        export_pruned(structured, tmp_path / "out", pruner=s_report)


def test_writing_is_atomic_and_replaces_an_earlier_export(tmp_path, monkeypatch):
    import grpo_prune.export as export

    model = make_model()
    report = prune_oneshot(model, 0.5, "unstructured", scorer="magnitude")
    export_pruned(model, tmp_path / "out", pruner=report)
    first = (tmp_path / "out" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        export_pruned(model, tmp_path / "out", pruner=report)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == first  # the old export is intact
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left behind
    monkeypatch.undo()

    with torch.no_grad():
        model.model.norm.weight.mul_(2)
    export_pruned(model, tmp_path / "out", pruner=report)  # an earlier export is replaced
    assert (tmp_path / "out" / "model.safetensors").read_bytes() != first
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_compressed_exports_of_the_earlier_layout_still_load(tmp_path):
    from safetensors.torch import save_file

    from grpo_prune.compress import load_compressed

    model = make_model("qwen2")
    report = prune_oneshot(model, 0.5, "unstructured", scorer="magnitude")
    export_pruned(model, tmp_path / "out", pruner=report, compressed=True)
    path = tmp_path / "out" / "model.safetensors"  # the earlier name too
    (tmp_path / "out" / SPARSE_WEIGHTS_NAME).rename(path)
    stored = load_file(path)
    suffixes = (".compressed", ".bitmask", ".shape", ".row_offsets")
    renamed = {}
    for key, value in stored.items():  # the earlier layout: {m}.weight.compressed, ...
        suffix = next((x for x in suffixes if key.endswith(x)), None)
        renamed[key.removesuffix(suffix) + ".weight" + suffix if suffix else key] = value
    save_file(renamed, str(path), metadata={"format": "pt"})
    restored = load_compressed(tmp_path / "out").state_dict()
    for name, module in model.named_modules():
        if name in report.masks:
            assert torch.equal(restored[f"{name}.weight"], module.weight.detach()), name


# ------------------------------------------------------------------------------ no silent corruption (issue 20)
PLAIN_LOAD = r"""
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
try:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as err:
    print(json.dumps({"raised": type(err).__name__, "message": str(err), "grpo_prune": "grpo_prune" in sys.modules}))
else:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[2])
    print(json.dumps({"raised": None, "grpo_prune": "grpo_prune" in sys.modules}))
"""


@pytest.mark.parametrize("granularity, extra", [("unstructured", {}), ("n:m", {"n_m": "2:4"})], ids=["unstr", "2:4"])
def test_plain_from_pretrained_on_a_compressed_export_gives_the_weights_or_raises(tmp_path, granularity, extra):
    """What a user does first with the folder: plain transformers, in a process that never imported grpo_prune (a
    registration done by our import could not help there). Exactly the exported weights, or an exception that
    says how to load it; never freshly initialised matrices (the old export loaded 2/3 of them that way)."""
    import subprocess
    import sys

    model = make_model()
    report = prune_oneshot(model, 0.5, granularity, scorer="magnitude", **extra)
    export_pruned(model, tmp_path / "out", pruner=report, compressed=True)
    export_pruned(model, tmp_path / "dense", pruner=report)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "out"), str(tmp_path / "loaded.safetensors")],
        capture_output=True, text=True, env=env, check=True, cwd=tmp_path,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["grpo_prune"] is False
    if result["raised"] is None:
        loaded, expected = (
            load_file(tmp_path / "loaded.safetensors"),
            load_file(tmp_path / "dense" / "model.safetensors"),
        )
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    else:
        assert "load_compressed" in result["message"], result


def _compressed_export(tmp_path):
    model = make_model()
    report = prune_oneshot(model, 0.5, "unstructured", scorer="magnitude")
    export_pruned(model, tmp_path / "out", pruner=report, compressed=True)
    return tmp_path / "out"


def test_load_compressed_refuses_what_it_cannot_load_exactly(tmp_path):
    from grpo_prune.compress import load_compressed

    folder = _compressed_export(tmp_path)
    # A dense export, and a folder that is not a model at all.
    model = make_model()
    export_pruned(model, tmp_path / "dense", pruner=prune_oneshot(model, 0.5, "unstructured", scorer="magnitude"))
    with pytest.raises(ValueError, match="not a compressed export.*from_pretrained"):
        load_compressed(tmp_path / "dense")
    with pytest.raises(ValueError, match="no config.json"):
        load_compressed(tmp_path)

    # A config that describes another model (a copy mixed up with another export's config).
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="do not match"):
        load_compressed(folder)
    (folder / "config.json").write_text(json.dumps(config))
    load_compressed(folder)  # intact again

    # grpo_prune's own loader (grpo-prune eval --model, train's model_name_or_path) routes it to load_compressed.
    from grpo_prune.models import load_model

    via_models = load_model(folder).state_dict()
    assert all(torch.equal(via_models[k], v) for k, v in load_compressed(folder).state_dict().items())
    with pytest.raises(ValueError, match="compressed export"):
        load_model(folder, device_map="cpu")

    # A weight file cut short (an interrupted copy), then gone.
    weights = folder / SPARSE_WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_compressed(folder)
    weights.unlink()
    with pytest.raises(ValueError, match="no weights"):
        load_compressed(folder)


def test_a_mask_sidecar_that_does_not_fit_the_model_is_refused(tmp_path):
    from safetensors.torch import save_file

    from grpo_prune.export import load_masks_sidecar

    model = make_model()
    export_pruned(model, tmp_path / "out", pruner=prune_oneshot(model, 0.5, "unstructured", scorer="magnitude"))
    sidecar = tmp_path / "out" / MASKS_FILE
    good = sidecar.read_bytes()
    # The sidecar of a wider model of the same family: same names, other shapes.
    other = make_model(intermediate_size=96)
    export_pruned(other, tmp_path / "other", pruner=prune_oneshot(other, 0.5, "unstructured", scorer="magnitude"))
    sidecar.write_bytes((tmp_path / "other" / MASKS_FILE).read_bytes())
    with pytest.raises(ValueError, match="do not match"):
        export_pruned(tmp_path / "out", tmp_path / "again")
    # Masks for modules the model does not have.
    masks = load_masks_sidecar(tmp_path / "other")
    save_file({f"{k}.extra": v for k, v in masks.items()}, str(sidecar), metadata={"granularity": "unstructured"})
    with pytest.raises(ValueError, match="not nn.Linear"):
        export_pruned(tmp_path / "out", tmp_path / "again")
    # Cut short.
    sidecar.write_bytes(good[: len(good) - 100])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        load_masks_sidecar(tmp_path / "out")
    sidecar.write_bytes(good)
    export_pruned(tmp_path / "out", tmp_path / "again")  # intact again
