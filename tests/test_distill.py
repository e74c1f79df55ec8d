import math

import pytest
import torch
import torch.nn.functional as F

from grpo_prune.distill import DIVERGENCES, distillation_loss


def _manual_kl(p_logits, q_logits):
    p = F.softmax(p_logits, -1)
    return (p * (F.log_softmax(p_logits, -1) - F.log_softmax(q_logits, -1))).sum(-1)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g)


def test_forward_kl_is_kl_teacher_to_student(logits):
    student, teacher = logits
    mask = torch.ones(2, 3)
    expected = _manual_kl(teacher, student).mean()
    got = distillation_loss(student, teacher, mask, "forward_kl")
    torch.testing.assert_close(got, expected)
    reverse = distillation_loss(student, teacher, mask, "reverse_kl")
    torch.testing.assert_close(reverse, _manual_kl(student, teacher).mean())
    assert not torch.isclose(got, reverse)  # the two directions really differ on these logits


def test_only_completion_tokens_count(logits):
    student, teacher = logits
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    expected = torch.stack(
        [
            _manual_kl(teacher[0, 0], student[0, 0]),
            _manual_kl(teacher[0, 1], student[0, 1]),
            _manual_kl(teacher[1, 1], student[1, 1]),
        ]
    ).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, mask), expected)
    # Changing a masked-out position changes nothing.
    student2 = student.clone()
    student2[1, 2] += 100.0
    torch.testing.assert_close(distillation_loss(student2, teacher, mask), expected)


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_zero_at_teacher_and_positive_elsewhere(divergence, logits):
    student, teacher = logits
    mask = torch.ones(2, 3)
    assert distillation_loss(teacher, teacher, mask, divergence).abs().item() < 1e-6
    assert distillation_loss(student, teacher, mask, divergence).item() > 1e-3


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_gradient_moves_student_toward_teacher(divergence, logits):
    student, teacher = logits
    student = student.clone().requires_grad_(True)
    mask = torch.ones(2, 3)
    before = distillation_loss(student, teacher, mask, divergence)
    before.backward()
    with torch.no_grad():
        stepped = student - 0.5 * student.grad
    assert torch.dist(F.softmax(stepped, -1), F.softmax(teacher, -1)) < torch.dist(
        F.softmax(student.detach(), -1), F.softmax(teacher, -1)
    )
    assert distillation_loss(stepped, teacher, mask, divergence) < before.detach()


def test_temperature_scaling(logits):
    student, teacher = logits
    mask = torch.ones(2, 3)
    tau = 2.0
    expected = _manual_kl(teacher / tau, student / tau).mean() * tau**2
    torch.testing.assert_close(distillation_loss(student, teacher, mask, temperature=tau), expected)


def test_jsd_matches_definition(logits):
    student, teacher = logits
    beta = 0.3
    p_t, p_s = F.softmax(teacher, -1), F.softmax(student, -1)
    m = beta * p_t + (1 - beta) * p_s
    expected = beta * (p_t * (p_t.log() - m.log())).sum(-1) + (1 - beta) * (p_s * (p_s.log() - m.log())).sum(-1)
    got = distillation_loss(student, teacher, torch.ones(2, 3), "jsd", jsd_beta=beta)
    torch.testing.assert_close(got, expected.mean())
    assert got.item() <= math.log(2) + 1e-6  # the JSD is bounded


def test_bad_arguments(logits):
    student, teacher = logits
    with pytest.raises(ValueError, match="divergence"):
        distillation_loss(student, teacher, torch.ones(2, 3), "kl")
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, torch.ones(2, 3), temperature=0)
    with pytest.raises(ValueError, match="beta"):
        distillation_loss(student, teacher, torch.ones(2, 3), "jsd", jsd_beta=1.0)


def test_empty_mask_is_zero_with_gradient(logits):
    student, teacher = logits
    student.requires_grad_(True)
    loss = distillation_loss(student, teacher, torch.zeros(2, 3))
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None
