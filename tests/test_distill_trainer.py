"""Distillation inside MamaGRPOTrainer: the hidden-state term, text distillation, the LoRA teacher, the refusals."""

import pytest
import torch
from tiny import (
    TINY_DIMS,
    char_tokenizer,
    grouped_prompts,
    kl_to_teacher,
    prompt_dataset,
    tiny_args,
    tiny_model,
    tiny_trainer,
    varied_reward,
)

from grpo_prune import MamaGRPOTrainer


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def constant_reward(completions, **kwargs):
    return [1.0] * len(completions)


def text_file(tmp_path):
    """Lower-case text the character tokenizer reads without unknown tokens."""
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"the number {i} is {i % 7} more than {i - i % 7}." for i in range(200)))
    return path


def peaked_teacher(path):
    teacher = tiny_model(seed=1)
    with torch.no_grad():  # a peaked teacher, far from the near-uniform random student
        teacher.model.embed_tokens.weight.mul_(8.0)
    teacher.save_pretrained(path)
    return teacher


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(distill_hidden_coef=-1.0), "distill_hidden_coef"),
        (dict(distill_text_coef=-1.0), "distill_text_coef"),
        (dict(distill_chunk_size=0), "distill_chunk_size"),
        (dict(distill_dataset="no/such/file.txt"), "distill_dataset"),
        (dict(distill_dataset="python_docs", distill_text_batch_size=0), "distill_text_batch_size"),
        (dict(distill_dataset="python_docs", distill_text_length=1), "distill_text_length"),
        (dict(distill_coef=1.0, beta=0.1, sync_ref_model=True), "sync_ref_model.*teacher.*drift"),
        (dict(fp16=True), "fp16.*cannot be combined with pruning.*bf16"),
    ],
)
def test_config_refuses(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(tmp_path, **overrides)


def test_config_accepts_sync_ref_model_with_a_separate_teacher(tmp_path):
    args = tiny_args(tmp_path, distill_coef=1.0, beta=0.1, sync_ref_model=True, teacher_model_name_or_path="t")
    assert args.sync_ref_model and args.distillation_enabled
    # Without distillation there is no teacher to protect.
    assert tiny_args(tmp_path, distill_coef=0.0, beta=0.1, sync_ref_model=True).sync_ref_model


def test_text_or_hidden_term_alone_enables_the_teacher(tmp_path):
    assert tiny_args(tmp_path, distill_coef=0.0, distill_hidden_coef=1.0).distillation_enabled
    assert tiny_args(tmp_path, distill_coef=0.0, distill_dataset="python_docs").distillation_enabled
    assert not tiny_args(
        tmp_path, distill_coef=0.0, distill_dataset="python_docs", distill_text_coef=0.0
    ).distillation_enabled


# ------------------------------------------------------------------------------------------ hidden states
def test_hidden_term_is_zero_at_start_and_grows_with_pruning(tmp_path):
    trainer = tiny_trainer(tmp_path / "out", distill_coef=1.0, distill_hidden_coef=1.0, prune_start_step=1)
    trainer.train()
    hidden = logged(trainer, "distill/hidden_loss")
    assert len(hidden) == 4
    assert hidden[0] == 0.0  # step 1: nothing pruned yet, student == teacher
    assert hidden[-1] > 1e-3  # pruned and trained away from the dense teacher
    assert logged(trainer, "distill/loss")[0] == 0.0


def test_hidden_term_carries_gradient_to_the_student(tmp_path):
    trainer = tiny_trainer(tmp_path / "out", distill_coef=0.0, distill_hidden_coef=1.0, prune_target_sparsity=0.0)
    student = trainer.model
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # the student differs from the teacher
    ids = torch.randint(3, 40, (2, 6), device=student.device)
    mask = torch.ones(2, 5, device=student.device)
    with trainer.distiller.capture_student(layers=True) as captured:
        student(input_ids=ids)
    layers = captured.layer_list()
    kd, hidden = trainer.distiller.terms(
        ids, torch.ones_like(ids), mask, slice(-6, -1), captured.hidden, layers, logits_term=False
    )
    assert kd is None and len(layers) == 2 and hidden.item() > 0
    hidden.backward()
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert trainer.teacher.model.layers[0].mlp.down_proj.weight.grad is None  # the teacher stays frozen


# ----------------------------------------------------------------------------------------- text distillation
def test_text_batch_drawn_every_step_and_zero_when_student_is_teacher(tmp_path):
    trainer = tiny_trainer(
        tmp_path / "out",
        prune_target_sparsity=0.0,
        learning_rate=0.0,  # the student stays equal to its dense teacher
        distill_coef=0.0,
        distill_dataset=str(text_file(tmp_path)),
        distill_text_batch_size=2,
        distill_text_length=16,
    )
    trainer.train()
    text = logged(trainer, "distill/text_loss")
    assert len(text) == 4 and all(v == 0.0 for v in text)
    assert trainer.text_sampler.position == 4 * 2  # one batch of two windows per step
    assert not logged(trainer, "distill/loss")  # rollout KD is off (distill_coef 0)


def test_text_distillation_moves_student_toward_teacher(tmp_path):
    teacher_dir = tmp_path / "teacher"
    peaked_teacher(teacher_dir)
    trainer = MamaGRPOTrainer(
        model=tiny_model(),
        reward_funcs=[constant_reward],  # all advantages zero: only distillation trains
        args=tiny_args(
            tmp_path / "out",
            prune_target_sparsity=0.0,
            distill_coef=0.0,
            teacher_model_name_or_path=str(teacher_dir),
            distill_dataset=str(text_file(tmp_path)),
            distill_text_batch_size=2,
            distill_text_length=32,
            max_steps=6,
            learning_rate=3e-2,
        ),
        train_dataset=prompt_dataset(),
        processing_class=char_tokenizer(),
    )
    ids = trainer.text_sampler.windows[:4]

    before = kl_to_teacher(trainer, ids)
    trainer.train()
    assert kl_to_teacher(trainer, ids) < 0.8 * before
    text = logged(trainer, "distill/text_loss")
    assert len(text) == 6 and text[-1] < text[0]


# ----------------------------------------------------------------------------------------------------- LoRA
def test_lora_teacher_is_the_base_model_with_adapters_disabled(tmp_path):
    import copy

    from peft import LoraConfig

    base = tiny_model()
    reference = copy.deepcopy(base).eval()
    trainer = MamaGRPOTrainer(
        model=base,
        reward_funcs=[varied_reward],
        args=tiny_args(tmp_path / "out", prune_target_sparsity=0.0, distill_coef=1.0, max_steps=3, learning_rate=5e-2),
        train_dataset=prompt_dataset(),
        processing_class=char_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    )
    assert trainer.distiller.teacher_is_disabled_adapters and trainer.teacher is trainer.accelerator.unwrap_model(
        trainer.model
    )
    params = sum(p.numel() for p in trainer.model.parameters())
    trainer.train()
    assert sum(p.numel() for p in trainer.model.parameters()) == params  # no second copy of the weights
    assert logged(trainer, "distill/loss")

    ids = torch.randint(3, 40, (2, 10), device=trainer.model.device)
    mask = torch.ones_like(ids)
    reference.to(ids.device)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits[:, -6:-1]
        student = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -6:-1]
    teacher = trainer.teacher_logits(ids, mask, n_tokens=5)
    torch.testing.assert_close(teacher, expected)
    assert not torch.allclose(student, expected, atol=1e-4)  # the adapters trained, and are back on afterwards
    assert trainer.model.training  # train mode restored after the teacher's eval-mode forward


def test_peft_model_with_pruning_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carries PEFT adapters"):
        MamaGRPOTrainer(
            model=model,
            reward_funcs=[varied_reward],
            args=tiny_args(tmp_path),
            train_dataset=prompt_dataset(),
            processing_class=char_tokenizer(),
        )


def test_kd_and_hidden_term_are_exactly_zero_on_a_softcapped_gemma2_student_equal_to_its_teacher(tmp_path):
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(
        **TINY_DIMS,
        head_dim=8,
        max_position_embeddings=128,
        final_logit_softcapping=1.0,  # strong: raw logits of this size would give very different distributions
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    model = AutoModelForCausalLM.from_config(config)
    trainer = tiny_trainer(
        tmp_path / "out",
        model=model,
        prune_target_sparsity=0.0,
        learning_rate=0.0,
        max_steps=2,
        distill_coef=1.0,
        distill_hidden_coef=1.0,
        distill_dataset=str(text_file(tmp_path)),
        distill_text_length=16,
    )
    trainer.train()
    for key in ("distill/loss", "distill/hidden_loss", "distill/text_loss", "distill/text_hidden_loss"):
        assert logged(trainer, key) == [0.0, 0.0], key
    ids = torch.randint(3, 40, (2, 8), device=trainer.model.device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = trainer.model(input_ids=ids, attention_mask=mask).logits[:, -5:-1]
    torch.testing.assert_close(trainer.teacher_logits(ids, mask, n_tokens=4), expected)


# ------------------------------------------------------------------------------------------ teacher dtype
def test_named_teacher_loads_in_the_students_dtype(tmp_path):
    # The teacher is saved in float32; a bfloat16 student gets a bfloat16 teacher (it used to load in float32,
    # twice the memory, whatever the student's dtype).
    teacher_dir = tmp_path / "teacher"
    peaked_teacher(teacher_dir)
    trainer = MamaGRPOTrainer(
        model=tiny_model().to(torch.bfloat16),
        reward_funcs=[varied_reward],
        args=tiny_args(
            tmp_path / "out", prune_target_sparsity=0.0, distill_coef=1.0, teacher_model_name_or_path=str(teacher_dir)
        ),
        train_dataset=prompt_dataset(),
        processing_class=char_tokenizer(),
    )
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 40, (2, 6), device=trainer.model.device)
    assert trainer.teacher_logits(ids, torch.ones_like(ids), n_tokens=3).shape == (2, 3, TINY_DIMS["vocab_size"])
    # `model_init_kwargs` naming a dtype still wins.
    args = tiny_args(
        tmp_path / "out2",
        prune_target_sparsity=0.0,
        teacher_model_name_or_path=str(teacher_dir),
        distill_coef=1.0,
        model_init_kwargs={"dtype": "float32"},
    )
    trainer = MamaGRPOTrainer(
        model=tiny_model().to(torch.bfloat16),
        reward_funcs=[varied_reward],
        args=args,
        train_dataset=prompt_dataset(),
        processing_class=char_tokenizer(),
    )
    assert {p.dtype for p in trainer.teacher.parameters()} == {torch.float32}


def test_distill_dataset_self_distils_the_teachers_own_samples(tmp_path, monkeypatch):
    from grpo_prune import data

    monkeypatch.setattr(data, "self_generated_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(data, "SELF_MAX_NEW_TOKENS", {"task": 6, "open": 10})
    monkeypatch.setattr(data, "SELF_DISTILL_TOKENS", 300)
    trainer = tiny_trainer(
        tmp_path / "out",
        prune_target_sparsity=0.0,
        distill_coef=0.0,
        distill_dataset="self:open",
        distill_text_batch_size=2,
        distill_text_length=16,
    )
    # The stream is the frozen teacher's samples, as the data module makes them from that model and caches them.
    expected = data.text_token_stream(trainer.processing_class, "self:open", model=trainer.teacher, num_tokens=300)
    assert len(expected) >= 300
    windows = torch.tensor(expected[: trainer.text_sampler.num_windows * 16]).view(-1, 16)
    assert torch.equal(trainer.text_sampler.windows, windows)
    trainer.train()
    assert len(logged(trainer, "distill/text_loss")) == 4


# ------------------------------------------------------------------------------------------------ shared prompts
def _group_batch(prompts: list[list[int]], group: int, completion: int):
    """`grouped_prompts` followed by random completions whose later rows end early (completion mask zeros)."""
    prompt_ids, prompt_mask = grouped_prompts(prompts, group)
    rows, width = prompt_ids.shape
    torch.manual_seed(0)
    completion_ids = torch.randint(3, 64, (rows, completion))
    completion_mask = torch.ones_like(completion_ids)
    for r in range(rows):
        completion_mask[r, completion - r % 3 :] = 0
    return torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), width


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_teacher_runs_each_prompt_once_with_the_full_pass_result(tmp_path, kind):
    """The teacher's hidden states at the completion-predicting positions are those of the whole sequence in one
    pass, though each distinct prompt ran once and its keys and values were copied to its rows (left padding, ragged
    completions, and Gemma 3's 4-token sliding window over a longer prompt included)."""
    trainer = tiny_trainer(tmp_path, model=tiny_model(kind), prune_target_sparsity=0.0, distill_coef=1.0)
    distiller = trainer.distiller
    ids, mask, prompt_length = _group_batch([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16]], group=3, completion=6)
    seen = []
    embed = distiller.teacher.get_input_embeddings()
    handle = embed.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        shared = distiller.teacher_prediction_hidden(ids, mask, prompt_length)
        full = distiller.teacher_hidden(ids, mask, layers=False)[0][:, -7:-1]
    finally:
        handle.remove()
    assert seen == [(2, 7), (6, 5), (6, 13)]  # two prompts once, six completions over the cache; then the full pass
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)

    # Prompts that all differ: one pass over the whole sequence, as before.
    distinct, distinct_mask, width = _group_batch([[5, 6, 7], [8, 9], [10, 11, 12], [13]], group=1, completion=4)
    seen.clear()
    handle = embed.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        alone = distiller.teacher_prediction_hidden(distinct, distinct_mask, width)
    finally:
        handle.remove()
    assert seen == [(4, 7)]
    torch.testing.assert_close(alone, distiller.teacher_hidden(distinct, distinct_mask, layers=False)[0][:, -5:-1])
