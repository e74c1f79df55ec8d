"""Tiny random models, a character tokenizer and a varying reward, for fast trainer tests (no hub, no files)."""

from __future__ import annotations

import string

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

CHARS = string.ascii_lowercase + string.digits + " +-=?.#"
SPECIALS = ["<pad>", "<eos>", "<bos>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<bos>assistant: {% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with pad/eos/bos and a chat template; vocabulary below 64 ids."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS) + [":", "<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


#: Gemma 3 in miniature: like the 270M model, ONE KV head shared by every query head, head_dim independent of
#: hidden_size / heads, q_norm/k_norm, scaled embeddings, tied embeddings, and one sliding-window layer (window 4,
#: shorter than the test sequences, so the mask matters) followed by one full-attention layer.
GEMMA3_TINY = dict(
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
)


#: The dimensions every tiny decoder here shares (configs of other families add their own fields).
TINY_DIMS = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def tiny_model(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer random decoder (hidden 32, MLP 64) with a 64-token vocabulary.

    ``kind``: ``"llama"`` and ``"qwen2"`` (q/k/v biases) have 4 heads in 2 KV groups; ``"gemma3"``
    (``Gemma3ForCausalLM``) has 2 query heads on 1 KV head, head_dim 16 and one sliding + one full layer
    (:data:`GEMMA3_TINY`).
    """
    torch.manual_seed(seed)
    cfg = dict(
        **TINY_DIMS,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        tie_word_embeddings=True,
    )
    if kind == "gemma3":
        cfg.update(GEMMA3_TINY)
    cfg.update(overrides)
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma3": Gemma3TextConfig}.get(kind)
    if config_cls is None:
        raise ValueError(f"kind must be 'llama', 'qwen2' or 'gemma3', got {kind!r}")
    config = config_cls(**cfg)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def prompt_dataset(n: int = 16) -> Dataset:
    return Dataset.from_dict(
        {"prompt": [f"{i} + {i % 5} = ?" for i in range(n)], "answer": [str(i + i % 5) for i in range(n)]}
    )


def grouped_prompts(prompts: list[list[int]], group: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` left-padded to one width, each repeated ``group`` times as TRL lays out a GRPO batch: ids and
    attention mask ``[len(prompts) * group, width]``."""
    width = max(map(len, prompts))
    rows = [p for p in prompts for _ in range(group)]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    return ids, mask


def varied_reward(completions, **kwargs) -> list[float]:
    """Reward that varies across a group (distinct characters), so GRPO advantages are not all zero."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(set(t)) / 10.0 for t in texts]


def tiny_args(output_dir, **overrides):
    """A `MamaGRPOConfig` for 4 short CPU steps: 4 prompts x 4 completions of 8 tokens per step, logged every step."""
    from grpo_prune import MamaGRPOConfig

    kwargs = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        prune_target_sparsity=0.5,
        prune_start_step=0,
        prune_end_step=2,
        prune_every=1,
        distill_coef=0.0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return MamaGRPOConfig(**kwargs)


def tiny_trainer(output_dir, *, model=None, reward=varied_reward, **overrides):
    """A `MamaGRPOTrainer` on a tiny model, the prompt dataset and a reward, with `tiny_args(output_dir, **overrides)`."""
    from grpo_prune import MamaGRPOTrainer

    return MamaGRPOTrainer(
        model=model if model is not None else tiny_model(),
        reward_funcs=[reward],
        args=tiny_args(output_dir, **overrides),
        train_dataset=prompt_dataset(),
        processing_class=char_tokenizer(),
    )


def kl_to_teacher(trainer, ids: torch.Tensor) -> float:
    """Mean per-token KL(teacher || student) of a trainer's two models on ``ids`` ``[B, T]``."""
    ids = ids.to(trainer.model.device)  # the trainer put the models on the accelerator, when there is one
    with torch.no_grad():
        t = torch.log_softmax(trainer.teacher(input_ids=ids).logits, -1)
        s = torch.log_softmax(trainer.model(input_ids=ids).logits, -1)
    return (t.exp() * (t - s)).sum(-1).mean().item()


def end_process_group() -> None:
    """The last call of a torchrun script: wait for every rank, then destroy the process group.

    Left to interpreter exit, gloo's threads can be torn down while still joinable, and the process aborts with
    "terminate called without an active exception" after its work is done (seen once in CI, 1 run in many).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
