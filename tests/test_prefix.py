"""Shared prompts: each distinct prompt of a GRPO batch is prefilled once, and sampling comes out as before."""

import pytest
import torch
from tiny import grouped_prompts as grouped
from tiny import tiny_model, tiny_trainer
from transformers import GenerationConfig

from grpo_prune.prefix import prefill_distinct, share_prompt_prefill

SAMPLING = GenerationConfig(
    max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=1, disable_compile=True
)


def embedded_shapes(model):
    shapes = []
    handle = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    return shapes, handle


def sample(model, ids, mask, seed=0, **extra):
    torch.manual_seed(seed)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=SAMPLING, **extra)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_generate_prefills_each_prompt_once_and_samples_the_same(kind):
    """Two prompts (one left-padded; Gemma 3's sliding window of 4 shorter than both) three times each: the prompts
    minus their last token run once, generation starts from the last token over the copied cache, and the sampled
    tokens are those of plain `generate` under the same seed."""
    model = tiny_model(kind).eval()
    ids, mask = grouped([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16]], group=3)
    expected = sample(model, ids, mask)
    share_prompt_prefill(model)
    share_prompt_prefill(model)  # idempotent
    shapes, handle = embedded_shapes(model)
    try:
        shared = sample(model, ids, mask)
    finally:
        handle.remove()
    assert shapes[:3] == [(2, 6), (6, 1), (6, 1)]  # distinct prefixes once; then one token per row and step
    assert torch.equal(shared, expected)


def test_generate_is_left_alone_when_nothing_is_shared():
    model = tiny_model().eval()
    share_prompt_prefill(model)
    ids, mask = grouped([[5, 6, 7], [8, 9], [10, 11, 12, 13]], group=1)
    shapes, handle = embedded_shapes(model)
    try:
        sample(model, ids, mask)  # every prompt differs
        repeated, repeated_mask = grouped([[5, 6, 7]], group=4)
        shapes.clear()
        sample(model, repeated, repeated_mask, max_new_tokens=3)  # a call with other arguments
        assert shapes[0] == (4, 3)
        shapes.clear()
        torch.manual_seed(0)
        model.generate(repeated, attention_mask=repeated_mask, generation_config=SAMPLING)  # positional ids
        assert shapes[0] == (4, 3)
    finally:
        handle.remove()


def test_prefill_distinct_copies_each_prompts_cache_to_its_rows():
    model = tiny_model().eval()
    ids, mask = grouped([[5, 6, 7, 8], [9, 10, 11]], group=2)
    with torch.no_grad():
        out, rows = prefill_distinct(model.model, ids, mask, 4)
        full = model.model(input_ids=ids, attention_mask=mask)
    assert rows.tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
    torch.testing.assert_close(out.last_hidden_state[rows], full.last_hidden_state)
    assert out.cache.get_seq_length() == 4 and out.cache.layers[0].keys.size(0) == 4
    with torch.no_grad():
        assert prefill_distinct(model.model, ids[::2], mask[::2], 4) is None  # two different prompts: nothing shared


def test_peft_model_is_not_wrapped_and_the_trainer_wraps_its_policy(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj"]))
    generate = peft_model.generate
    share_prompt_prefill(peft_model)
    assert peft_model.generate == generate
    trainer = tiny_trainer(tmp_path, prune_target_sparsity=0.0)
    assert getattr(trainer.accelerator.unwrap_model(trainer.model).generate, "_grpo_prune_shares_prefill", False)


def test_generate_under_activation_checkpointing_in_training_mode_still_samples():
    """A model left in training mode with activation checkpointing returns no cache from a plain forward; the shared
    prefill then steps aside and `generate` samples as it would without it."""
    model = tiny_model()
    model.gradient_checkpointing_enable()
    model.train()
    ids, mask = grouped([[5, 6, 7, 8]], group=3)
    expected = sample(model, ids, mask)
    share_prompt_prefill(model)
    assert torch.equal(sample(model, ids, mask), expected)
