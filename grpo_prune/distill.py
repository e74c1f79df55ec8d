"""Distillation terms between a frozen teacher and the student, over the tokens a mask keeps.

Pure functions: the trainer decides where the logits and hidden states come from. Distributions are
``p = softmax(logits / tau)``; every divergence is summed over the vocabulary, averaged over the tokens that ``mask``
keeps, and multiplied by ``tau**2`` so its gradient scale does not shrink with the temperature (Hinton et al.).

* `distillation_loss`: the divergence from ``[B, T, V]`` logits of both models.
* `chunked_distillation_loss`: the same value from hidden states and the two LM heads, a chunk of tokens at a time,
  so that ``[tokens, V]`` logits exist for one chunk only (the vocabulary makes them the memory peak of KD).
* `postprocess_logits`: the logit soft-capping / scaling a model's own forward applies after its LM head, so that
  logits computed from hidden states are the model's logits (and KD is exactly zero when student equals teacher).
* `hidden_state_loss`: SquareHead (Kurtic et al. 2023), per-layer hidden-state MSE normalised by the teacher's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities of shape ``[N, V]``; returns ``[N]``."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(teacher || student): mode-covering; the student is pushed to cover everything the teacher predicts."""
    return _kl(teacher_logp, student_logp)


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """KL(student || teacher): mode-seeking; the student is penalised where it puts mass the teacher does not."""
    return _kl(student_logp, teacher_logp)


def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """beta * KL(teacher || m) + (1 - beta) * KL(student || m), with m = beta * teacher + (1 - beta) * student."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"the generalised JSD needs `beta` in (0, 1), got {beta}")
    log_m = torch.logsumexp(
        torch.stack([teacher_logp + torch.log(torch.tensor(beta)), student_logp + torch.log(torch.tensor(1 - beta))]),
        dim=0,
    )
    return beta * _kl(teacher_logp, log_m) + (1 - beta) * _kl(student_logp, log_m)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": generalized_jsd}


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Mean per-token divergence over the tokens where ``mask`` is non-zero, times ``temperature**2``.

    Args:
        student_logits: ``[B, T, V]`` logits of the student at the completion positions (gradient flows here).
        teacher_logits: ``[B, T, V]`` logits of the frozen teacher at the same positions (no gradient).
        mask: ``[B, T]`` completion mask (1 for completion tokens to score, 0 for padding).
        divergence: a key of `DIVERGENCES`.
        temperature: softmax temperature tau > 0.
        jsd_beta: mixing weight of the generalised JSD.

    Returns:
        A scalar in nats per token. Zero (with a gradient path) when the mask is empty.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    keep = mask.bool()
    if not keep.any():
        return student_logits.sum() * 0.0
    # Select the scored tokens first: padding never reaches the [N, V] softmax, which is the memory peak.
    student_logp = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits[keep].float().detach() / temperature, dim=-1)
    per_token = DIVERGENCES[divergence](student_logp, teacher_logp, jsd_beta)
    return per_token.mean() * temperature**2


def postprocess_logits(config: Any, logits: torch.Tensor) -> torch.Tensor:
    """Apply what a causal LM's forward does to ``lm_head(hidden)`` before returning its logits.

    From the forwards of transformers 5.24 (``*ForCausalLM.forward``), in their order:

    * ``logit_scale`` (Cohere, Cohere2): ``logits * logit_scale``;
    * ``logits_scaling``: ``logits / logits_scaling`` (Granite family), but ``logits * logits_scaling`` for
      HyperCLOVA X, whose forward multiplies (muP);
    * ``output_multiplier`` (models that pre-scale before the soft-cap): ``logits * output_multiplier``;
    * ``final_logit_softcapping`` (Gemma 2/3, VaultGemma, ...) or ``logits_soft_cap`` (RecurrentGemma):
      ``cap * tanh(logits / cap)``, computed in float32 as those forwards recommend.

    A field set to ``None`` is skipped; a config without any of them (Llama, Qwen, Mistral) returns ``logits``
    unchanged (the same tensor). Multimodal configs are read through their text config.

    Args:
        config: the model's ``PretrainedConfig``.
        logits: ``[..., V]`` output of the LM head.

    Returns:
        ``[..., V]`` logits as the model's forward returns them (float32 where soft-capping applied).
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    model_type = str(getattr(config, "model_type", "") or "")
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits * scaling if model_type.startswith("hyperclovax") else logits / scaling
    multiplier = getattr(config, "output_multiplier", None)
    if isinstance(multiplier, (int, float)) and multiplier != 1:
        logits = logits * multiplier
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        cap = getattr(config, "logits_soft_cap", None)
    if cap:
        logits = torch.tanh(logits.float() / cap) * cap
    return logits


def _chunk_divergence_sum(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    divergence: str,
    temperature: float,
    jsd_beta: float,
) -> torch.Tensor:
    """Sum over one chunk ``[n, H]`` of the per-token divergence; the teacher's logits carry no gradient."""
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_head(teacher_hidden).float() / temperature, dim=-1)
    student_logp = F.log_softmax(student_head(student_hidden).float() / temperature, dim=-1)
    return DIVERGENCES[divergence](student_logp, teacher_logp, jsd_beta).sum()


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor,
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    jsd_beta: float = 0.5,
    chunk_size: int = 128,
) -> torch.Tensor:
    """`distillation_loss` of ``student_head(student_hidden)`` against ``teacher_head(teacher_hidden)``, by chunks.

    The kept tokens are gathered first, then processed ``chunk_size`` at a time. Each chunk runs under activation
    checkpointing: its ``[chunk_size, V]`` logits (student and teacher) are freed as soon as the chunk's divergence
    is summed, and recomputed from the ``[chunk_size, H]`` hidden states during backward. Peak memory is
    one chunk's logits instead of ``[B, T, V]`` for both models; the price is one more pass of both heads in backward.

    Args:
        student_hidden: ``[B, T, H]`` final hidden states of the student (gradient flows here and into its head).
        teacher_hidden: ``[B, T, H_t]`` final hidden states of the teacher at the same positions (no gradient).
        student_head: maps ``[n, H]`` to ``[n, V]`` logits as the student's forward returns them (LM head, then
            `postprocess_logits`).
        teacher_head: the same for the teacher (its own head and post-processing).
        mask: ``[B, T]``; non-zero marks the positions scored.
        divergence, temperature, jsd_beta: as in `distillation_loss`.
        chunk_size: tokens per chunk (> 0).

    Returns:
        A scalar in nats per token, equal to `distillation_loss` on the full logits. Zero (with a gradient path)
        when the mask is empty.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {sorted(DIVERGENCES)}, got {divergence!r}")
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size}")
    if student_hidden.shape[:2] != teacher_hidden.shape[:2] or student_hidden.shape[:2] != mask.shape:
        raise ValueError(
            f"student {tuple(student_hidden.shape)}, teacher {tuple(teacher_hidden.shape)} and mask "
            f"{tuple(mask.shape)} must agree on [batch, tokens]"
        )
    keep = mask.bool()
    n_tokens = int(keep.sum())
    if n_tokens == 0:
        return student_hidden.sum() * 0.0
    student_rows = student_hidden[keep]
    teacher_rows = teacher_hidden[keep].detach()
    total = student_rows.new_zeros((), dtype=torch.float32)
    for start in range(0, n_tokens, chunk_size):
        rows = slice(start, start + chunk_size)
        args = (student_rows[rows], teacher_rows[rows], student_head, teacher_head, divergence, temperature, jsd_beta)
        if torch.is_grad_enabled() and student_rows.requires_grad:
            total = total + checkpoint(_chunk_divergence_sum, *args, use_reentrant=False)
        else:
            total = total + _chunk_divergence_sum(*args)
    return total / n_tokens * temperature**2


def hidden_state_loss(
    student_layers: Sequence[torch.Tensor],
    teacher_layers: Sequence[torch.Tensor],
    mask: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """SquareHead (Kurtic et al. 2023): per-layer MSE of hidden states normalised by the teacher's mean square.

    For each layer l, over the tokens ``mask`` keeps and every hidden dimension::

        L_l = sum (h_s - h_t)^2 / sum h_t^2  ( = MSE(h_s, h_t) / mean(h_t^2) )

    and the loss is the mean of ``L_l`` over layers. The per-layer normalisation is what makes layers comparable:
    residual-stream norms grow with depth, and a few "massive activation" dimensions (values 100-1000x the rest,
    Sun et al. 2024) dominate a plain mean square; dividing by the teacher's mean square of the same layer turns each
    term into a relative error, so no layer and no such dimension owns the loss by scale alone. (Inside a layer
    those dimensions still weigh by their square, as in SquareHead.)

    Args:
        student_layers: ``L`` tensors ``[B, T, H]``, the student's decoder-layer outputs (gradient flows here).
        teacher_layers: ``L`` tensors ``[B, T, H]``, the teacher's at the same positions (no gradient).
        mask: ``[B, T]``; non-zero marks the tokens scored.
        eps: guards a layer whose teacher output is all zero on the kept tokens.

    Returns:
        A dimensionless scalar (0: identical hidden states). Zero (with a gradient path) when the mask is empty.
    """
    if len(student_layers) != len(teacher_layers) or not student_layers:
        raise ValueError(
            f"need the same non-zero number of student and teacher layers, got {len(student_layers)} and "
            f"{len(teacher_layers)}"
        )
    keep = mask.bool()
    if not keep.any():
        return sum(h.sum() for h in student_layers) * 0.0
    terms = []
    for student, teacher in zip(student_layers, teacher_layers, strict=True):
        if student.shape != teacher.shape:
            raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} layers differ")
        s = student[keep].float()
        t = teacher[keep].detach().float()
        terms.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(eps))
    return torch.stack(terms).mean()
