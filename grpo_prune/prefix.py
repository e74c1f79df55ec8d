"""Shared prompts: run each distinct prompt of a GRPO batch once and hand its key/value cache to every row of it.

TRL lays a GRPO batch out as each prompt repeated ``num_generations`` times. Two forward passes over it need the
prompt only as context: sampling the completions (the prefill) and the frozen teacher's pass for distillation. Both
read the same prompt once per completion; the quickstart's 8 completions after an 87-token prompt make 696 prompt
tokens of which 87 differ. :func:`prefill_distinct` runs the distinct prompts once and copies their cache to the
rows, and :func:`share_prompt_prefill` makes a model's ``generate`` start from that cache. Positions are absolute,
as in a forward pass over the whole left-padded batch, so every row's result is the same up to float rounding.

Not used (everything runs as before) when all rows differ, under FSDP2 (a submodule called directly would skip the
root's parameter gathering), for PEFT models, and with a static or other non-default generation cache.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from grpo_prune.models import backbone_of, has_adapters, is_fsdp2_module

__all__ = ["prefill_distinct", "share_prompt_prefill"]


def prefill_distinct(
    backbone: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int
) -> tuple[Any, torch.Tensor] | None:
    """The decoder stack's output over the distinct rows of ``input_ids[:, :length]`` (with their attention mask),
    its cache copied to every row, and each row's index among the distinct ones; None when every row differs, or
    when the backbone returns no cache.

    Call it without gradient. The returned output's ``cache`` then continues ``input_ids[:, length:]`` for the whole
    batch; ``last_hidden_state[rows]`` is each row's hidden states over the prefix.
    """
    prefixes = torch.cat([input_ids[:, :length], attention_mask[:, :length]], dim=1)
    distinct, rows = torch.unique(prefixes, dim=0, return_inverse=True)
    if distinct.size(0) == input_ids.size(0):
        return None
    out = backbone(input_ids=distinct[:, :length], attention_mask=distinct[:, length:], use_cache=True)
    if getattr(out, "cache", None) is None:  # no cache came back (activation checkpointing in training mode)
        return None
    out.cache.reorder_cache(rows)  # each row gets its prompt's keys and values
    return out, rows


def share_prompt_prefill(model: torch.nn.Module) -> None:
    """Make ``model.generate`` prefill each distinct prompt of a batch once (:func:`prefill_distinct` over all but
    the last prompt token; ``generate`` then reads the last one, and samples as before, from the copied cache).

    Applies only to a plain ``input_ids`` / ``attention_mask`` call with the default dynamic cache and no cache
    given; any other call, a PEFT model and an FSDP2-sharded one are left to ``generate`` unchanged. Idempotent.
    """
    original = model.generate
    if getattr(original, "_grpo_prune_shares_prefill", False) or has_adapters(model):
        return

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        config = kwargs.get("generation_config") or model.generation_config
        plain = set(kwargs) <= {"input_ids", "attention_mask", "generation_config"} and not args
        if (
            not plain
            or is_fsdp2_module(model)  # sharded when training starts, after this was installed
            or input_ids is None
            or attention_mask is None
            or input_ids.size(1) < 2
            or getattr(config, "cache_implementation", None) is not None
            or getattr(config, "use_cache", True) is False
        ):
            return original(*args, **kwargs)
        with torch.no_grad():
            shared = prefill_distinct(backbone_of(model), input_ids, attention_mask, input_ids.size(1) - 1)
        if shared is None:
            return original(*args, **kwargs)
        return original(**kwargs, cache=shared[0].cache)

    generate._grpo_prune_shares_prefill = True  # type: ignore[attr-defined]
    model.generate = generate
