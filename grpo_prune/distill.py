"""Per-token divergences between a frozen teacher and the student, over completion tokens only.

Pure functions on logits: the trainer decides where the logits come from. Distributions are
``p = softmax(logits / tau)``; every divergence is summed over the vocabulary, averaged over the completion tokens that
``mask`` keeps, and multiplied by ``tau**2`` so its gradient scale does not shrink with the temperature (Hinton et al.).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
