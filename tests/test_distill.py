import math

import pytest
import torch
import torch.nn.functional as F

from grpo_prune.data import TextWindowSampler
from grpo_prune.distill import (
    DIVERGENCES,
    chunked_distillation_loss,
    distillation_loss,
    hidden_state_loss,
    postprocess_logits,
)


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


# ------------------------------------------------------------------------------------- logit post-processing
def _tiny_config(kind: str):
    from tiny import TINY_DIMS
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

    common = dict(**TINY_DIMS, max_position_embeddings=64)
    if kind == "gemma2":
        return Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0)
    if kind == "cohere":
        return CohereConfig(**common, logit_scale=0.25)
    if kind == "granite":
        return GraniteConfig(**common, logits_scaling=4.0)
    return LlamaConfig(**common)


@pytest.mark.parametrize("kind", ["gemma2", "cohere", "granite", "llama"])
def test_postprocess_logits_reproduces_the_model_forward(kind):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # large logits, so the soft-cap really bends them
        ids = torch.randint(0, 64, (2, 7))
        expected = model(input_ids=ids).logits
        raw = model.get_output_embeddings()(model.model(input_ids=ids).last_hidden_state)
        got = postprocess_logits(model.config, raw)
    torch.testing.assert_close(got, expected)
    if kind != "llama":
        assert not torch.allclose(raw, expected, atol=1e-3)  # the post-processing is not a no-op here
    else:
        assert got is raw


def test_postprocess_softcap_bounds_the_logits():
    from transformers import Gemma2Config

    config = Gemma2Config(final_logit_softcapping=30.0)
    logits = torch.tensor([[-1e4, 0.0, 5.0, 1e4]])
    out = postprocess_logits(config, logits)
    assert out.abs().max() <= 30.0
    torch.testing.assert_close(out, 30.0 * torch.tanh(logits / 30.0))


# --------------------------------------------------------------------------------------------- chunked KD
def _heads(seed=0, hidden=6, vocab=13, cap=None):
    g = torch.Generator().manual_seed(seed)
    ws = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    wt = torch.randn(vocab, hidden, generator=g)

    def post(x):
        return x if cap is None else cap * torch.tanh(x / cap)

    return ws, wt, (lambda h: post(h @ ws.T)), (lambda h: post(h @ wt.T))


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_size", [1, 3, 128])
def test_chunked_equals_unchunked_value_and_gradient(divergence, chunk_size):
    ws, wt, student_head, teacher_head = _heads(cap=3.0)
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(2, 5, 6, generator=g, requires_grad=True)
    ht = torch.randn(2, 5, 6, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])

    full = distillation_loss(student_head(hs), teacher_head(ht), mask, divergence, temperature=1.5)
    full_grads = torch.autograd.grad(full, [hs, ws])
    chunked = chunked_distillation_loss(
        hs, ht, student_head, teacher_head, mask, divergence, temperature=1.5, chunk_size=chunk_size
    )
    chunked_grads = torch.autograd.grad(chunked, [hs, ws])
    torch.testing.assert_close(chunked, full)
    for a, b in zip(chunked_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b)
    assert full_grads[0][0, 2].abs().sum() == 0  # a masked position gets no gradient


def test_chunked_empty_mask_and_bad_arguments():
    _, _, student_head, teacher_head = _heads()
    hs = torch.randn(1, 3, 6, requires_grad=True)
    loss = chunked_distillation_loss(hs, hs.detach(), student_head, teacher_head, torch.zeros(1, 3))
    loss.backward()
    assert loss.item() == 0.0 and hs.grad is not None
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distillation_loss(hs, hs, student_head, teacher_head, torch.ones(1, 3), chunk_size=0)
    with pytest.raises(ValueError, match="mask"):
        chunked_distillation_loss(hs, hs, student_head, teacher_head, torch.ones(1, 4))


def test_kd_is_exactly_zero_when_student_is_teacher_with_softcapping():
    """Student and teacher are the same soft-capped Gemma 2: KD from hidden states is zero to the last bit."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config("gemma2")).eval()
    ids = torch.randint(0, 64, (2, 9))
    hidden = model.model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        teacher_hidden = model.model(input_ids=ids).last_hidden_state

    def head(h):
        return postprocess_logits(model.config, model.lm_head(h))

    for divergence in sorted(DIVERGENCES):
        kd = chunked_distillation_loss(hidden, teacher_hidden, head, head, torch.ones(2, 9), divergence, chunk_size=4)
        assert kd.item() == pytest.approx(0.0, abs=1e-7), divergence
    # The same distributions as the model's own forward, so zero KD means zero KD against model(...).logits.
    torch.testing.assert_close(head(teacher_hidden), model(input_ids=ids).logits)


# ------------------------------------------------------------------------------------------ hidden states
def test_hidden_state_loss_is_squarehead():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 4, 8, generator=g) * scale for scale in (1.0, 100.0)]  # very different layer norms
    student = [(t + 0.1 * torch.randn(2, 4, 8, generator=g) * t.std()).requires_grad_(True) for t in teacher]
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]])

    assert hidden_state_loss(teacher, teacher, mask).item() == 0.0
    loss = hidden_state_loss(student, teacher, mask)
    keep = mask.bool()
    expected = torch.stack(
        [((s[keep] - t[keep]) ** 2).mean() / (t[keep] ** 2).mean() for s, t in zip(student, teacher, strict=True)]
    ).mean()
    torch.testing.assert_close(loss, expected)
    assert loss.item() > 0
    loss.backward()
    for s in student:
        assert s.grad[keep].abs().sum() > 0  # kept tokens carry gradient ...
        assert s.grad[~keep].abs().sum() == 0  # ... masked ones none
    # Normalised per layer: both layers weigh about the same despite a 100x difference in scale.
    per_layer = [hidden_state_loss([s], [t], mask).item() for s, t in zip(student, teacher, strict=True)]
    assert 0.2 < per_layer[0] / per_layer[1] < 5


def test_hidden_state_loss_masked_positions_do_not_count():
    teacher = [torch.ones(1, 3, 4)]
    student = [torch.ones(1, 3, 4)]
    student[0][0, 2] = 1000.0
    assert hidden_state_loss(student, teacher, torch.tensor([[1, 1, 0]])).item() == 0.0
    assert hidden_state_loss(student, teacher, torch.zeros(1, 3)).item() == 0.0
    with pytest.raises(ValueError, match="layers"):
        hidden_state_loss(student, [], torch.ones(1, 3))


# --------------------------------------------------------------------------------------------- text windows
def test_text_window_sampler_is_seeded_and_cycles():
    stream = list(range(100))
    a = TextWindowSampler(stream, length=10, batch_size=3, seed=0)
    b = TextWindowSampler(stream, length=10, batch_size=3, seed=0)
    batches = [a.next_batch() for _ in range(4)]  # 12 windows drawn from 10: wraps around
    assert all(torch.equal(x, b.next_batch()) for x in batches)
    assert batches[0].shape == (3, 10)
    first_epoch = torch.cat(batches)[:10]
    assert sorted(first_epoch[:, 0].tolist()) == list(range(0, 100, 10))  # every window once per epoch
    assert torch.equal(torch.cat(batches)[10:], first_epoch[:2])  # then the same order again
    c = TextWindowSampler(stream, length=10, batch_size=3, seed=1)
    assert not torch.equal(c.next_batch(), batches[0])
    with pytest.raises(ValueError, match="fewer than one window"):
        TextWindowSampler(list(range(5)), length=10, batch_size=1)


def test_text_sources(tmp_path):
    import pydoc_data.topics

    from grpo_prune.data import load_text_documents, python_docs_text, validate_text_source

    topics = pydoc_data.topics.topics
    # The same text bench_quality calibrated on before it moved here.
    assert python_docs_text() == "\n\n".join(topics[k] for k in sorted(topics))
    assert validate_text_source("python_docs") == "builtin"
    (tmp_path / "a.txt").write_text("hello world")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "c.jsonl").write_text('{"body": "one"}\n')
    assert load_text_documents(tmp_path / "a.txt") == ["hello world"]
    assert load_text_documents(str(tmp_path / "b.jsonl")) == ["one", "two"]
    with pytest.raises(ValueError, match="'text'"):
        load_text_documents(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="built-in"):
        validate_text_source(tmp_path / "missing.txt")
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(ValueError, match=".txt"):
        validate_text_source(tmp_path / "d.csv")
