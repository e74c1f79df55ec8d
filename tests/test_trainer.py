"""MamaGRPOTrainer on tiny random models: pruning inside GRPO, distillation, save and resume."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import char_tokenizer, kl_to_teacher, prompt_dataset, tiny_args, tiny_model, tiny_trainer, varied_reward
from trl import GRPOConfig, GRPOTrainer

from grpo_prune import MamaGRPOConfig, MamaGRPOTrainer

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_trainer(tmp_path, model=None, **overrides):
    return tiny_trainer(tmp_path / "out", model=model, **overrides)


def target_weights(model):
    return {n: m.weight for n, m in model.named_modules() if n.endswith(LINEAR_SUFFIXES)}


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


# --------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "field, value, match",
    [
        ("prune_target_sparsity", 1.0, "sparsity"),
        ("prune_granularity", "blocks", "granularity"),
        ("prune_n_m", "3:2", "n_m"),
        ("prune_scorer", "taylor", "scorer"),
        ("prune_schedule", "exp", "schedule"),
        ("mama_alpha", 1.5, "alpha"),
        ("distill_loss", "kl", "distill_loss"),
        ("distill_temperature", 0.0, "distill_temperature"),
        ("reward_guard_tolerance", 1.0, "reward_guard_tolerance"),
        ("prune_end_step", -1, "prune_end_step"),
    ],
)
def test_config_rejects_bad_fields(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_args(tmp_path, **{field: value})


def test_config_is_a_grpo_config(tmp_path):
    args = tiny_args(tmp_path)
    assert isinstance(args, GRPOConfig)
    settings = args.pruning_settings()
    assert settings.target_sparsity == 0.5 and settings.scorer == "mama"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_is_refused_at_config_time_naming_fsdp2(tmp_path, stage, monkeypatch):
    ds = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"}
    # At config construction, before TrainingArguments would import DeepSpeed and before any model exists.
    with pytest.raises(ValueError, match=rf"DeepSpeed \(ZeRO-{stage}.*FSDP2.*DDP"):
        tiny_args(tmp_path, deepspeed=ds)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ValueError, match=rf"ZeRO-{stage}.*FSDP2"):
        tiny_args(tmp_path, deepspeed=str(path))
    # `accelerate launch` with a DeepSpeed accelerate config says so only through the environment.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="any ZeRO stage.*ACCELERATE_USE_DEEPSPEED.*FSDP2"):
        tiny_args(tmp_path)


def test_trainer_requires_mama_config(tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False)
    with pytest.raises(TypeError, match="MamaGRPOConfig"):
        MamaGRPOTrainer(model=tiny_model(), reward_funcs=[varied_reward], args=args, train_dataset=prompt_dataset())


# ---------------------------------------------------------------------------------------------- equivalence
def test_off_switches_train_exactly_like_grpo(tmp_path):
    common = dict(
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=3,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        bf16=False,
    )
    plain = GRPOTrainer(
        model=tiny_model(),
        reward_funcs=[varied_reward],
        args=GRPOConfig(output_dir=str(tmp_path / "a"), **common),
        train_dataset=prompt_dataset(),
        processing_class=char_tokenizer(),
    )
    plain.train()
    mama = MamaGRPOTrainer(
        model=tiny_model(),
        reward_funcs=[varied_reward],
        args=MamaGRPOConfig(output_dir=str(tmp_path / "b"), prune_target_sparsity=0.0, distill_coef=0.0, **common),
        train_dataset=prompt_dataset(),
        processing_class=char_tokenizer(),
    )
    mama.train()
    assert mama.pruner is None and mama.teacher is None
    assert logged(mama, "loss") == logged(plain, "loss")
    assert logged(mama, "reward") == logged(plain, "reward")
    for (name, a), (_, b) in zip(plain.model.named_parameters(), mama.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name


# -------------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (dict(prune_granularity="unstructured"), 0.5),
        (dict(prune_granularity="unstructured", prune_scorer="magnitude"), 0.5),
        (dict(prune_granularity="n:m", prune_n_m="2:4", prune_target_sparsity=0.5), 0.5),
        (dict(prune_granularity="unstructured", prune_schedule="linear", prune_target_sparsity=0.75), 0.75),
    ],
)
def test_pruning_reaches_exact_target_and_stays_zero(tmp_path, overrides, expected):
    trainer = make_trainer(tmp_path, **overrides)
    initial = {n: w.detach().clone() for n, w in target_weights(trainer.model).items()}
    trainer.train()
    weights = target_weights(trainer.model)
    for name, w in weights.items():
        zeros = (w == 0).sum().item()
        assert zeros == round(expected * w.numel()), name
        mask = trainer.pruner.masks[name]
        assert torch.all(w[~mask] == 0) and torch.all(w[mask] != 0), name
        assert not torch.equal(w[mask], initial[name][mask]), f"{name}: kept weights did not train"
        # Adam moments are zero at pruned entries, so momentum cannot revive them.
        for value in trainer.optimizer.state[w].values():
            if torch.is_tensor(value) and value.shape == w.shape:
                assert torch.all(value[~mask] == 0), name
    # Embeddings and norms are never pruned.
    assert (trainer.model.model.embed_tokens.weight == 0).sum() == 0
    sparsity = logged(trainer, "prune/sparsity")
    assert sparsity[-1] == pytest.approx(expected)
    assert all(a <= b + 1e-9 for a, b in zip(sparsity, sparsity[1:], strict=False))  # monotone
    assert logged(trainer, "prune/target_sparsity")[-1] == pytest.approx(expected)
    assert len(trainer.prune_events) >= 2 and "layer_sparsity" in trainer.prune_events[-1]
    assert all(e["seconds"] > 0 for e in trainer.prune_events)
    assert logged(trainer, "prune/score_q50")


def test_nm_pattern_holds_after_training(tmp_path):
    trainer = make_trainer(tmp_path, prune_granularity="n:m", prune_n_m="2:4")
    trainer.train()
    for name, w in target_weights(trainer.model).items():
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert torch.all(groups == 2), name


def test_structured_pruning_removes_whole_neurons(tmp_path):
    trainer = make_trainer(tmp_path, prune_granularity="structured", prune_structured_units="mlp")
    trainer.train()
    for layer in trainer.model.model.layers:
        mlp = layer.mlp
        dead = (mlp.gate_proj.weight == 0).all(dim=1)
        assert dead.sum().item() == 32  # half of 64 intermediate neurons
        assert torch.equal(dead, (mlp.up_proj.weight == 0).all(dim=1))
        assert torch.equal(dead, (mlp.down_proj.weight == 0).all(dim=0))


def test_prune_end_after_training_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=r"`prune_end_step` \(10\) is after the last training step \(4\)"):
        tiny_args(tmp_path, prune_end_step=10)


def test_prune_end_after_an_epoch_run_is_refused_when_training_starts(tmp_path):
    # No max_steps: the run's length (16 prompts, one group of 4 completions a step: 16 steps) is known only once
    # the data is.
    trainer = make_trainer(tmp_path, prune_end_step=20, max_steps=-1, num_train_epochs=1)
    with pytest.raises(ValueError, match=r"`prune_end_step` \(20\) is after the last training step \(16\)"):
        trainer.train()


def test_unset_prune_end_step_trains_and_reaches_the_target(tmp_path):
    trainer = make_trainer(tmp_path, prune_end_step=None, max_steps=4)
    trainer.train()
    assert trainer.pruner.settings.end_step == 2  # half of max_steps, as documented
    assert trainer.pruner.sparsity() == pytest.approx(0.5)


def constant_reward(completions, **kwargs) -> list[float]:
    return [1.0] * len(completions)


@pytest.mark.parametrize("distill_coef", [0.0, 1.0])
def test_reward_statistic_is_zero_when_every_advantage_is_zero(tmp_path, distill_coef):
    # Distillation shares the backward pass; its gradient must never reach the reward statistic.
    trainer = make_trainer(
        tmp_path,
        reward=constant_reward,
        distill_coef=distill_coef,
        mama_alpha=0.5,
        prune_start_step=3,
        prune_end_step=3,
        max_steps=3,
    )
    trainer.train()
    assert logged(trainer, "frac_reward_zero_std") and all(v == 1.0 for v in logged(trainer, "frac_reward_zero_std"))
    assert trainer.pruner.movement_updates == 0
    assert all(not t.any() for t in trainer.pruner.movement.values())


@pytest.mark.parametrize("form", ["signed", "abs", "squared"])
@pytest.mark.parametrize("distill_coef", [0.0, 1.0])
def test_reward_statistic_accumulates_with_a_varying_reward(tmp_path, form, distill_coef):
    trainer = make_trainer(
        tmp_path,
        distill_coef=distill_coef,
        mama_alpha=0.5,
        mama_statistic=form,
        mama_min_updates=1,
        prune_start_step=2,
        prune_end_step=3,
        max_steps=4,
    )
    trainer.train()
    assert trainer.pruner.movement_updates >= 2
    assert any(t.any() for t in trainer.pruner.movement.values())
    if form != "signed":
        assert all((t >= 0).all() for t in trainer.pruner.movement.values())
    assert trainer.pruner.sparsity() == pytest.approx(0.5)
    mixed = [e["statistic_mixed"] for e in trainer.prune_events]
    assert mixed and all(mixed)
    report = trainer.pruning_report()["statistic"]
    assert report["form"] == form and report["usable"]
    assert report["source"] == ("separate GRPO-loss gradient" if distill_coef else "GRPO gradient")


@pytest.mark.parametrize("form", ["abs", "squared"])
@pytest.mark.parametrize("distill_coef", [0.0, 1.0])
def test_reward_statistic_does_not_depend_on_gradient_accumulation(tmp_path, form, distill_coef):
    # One definition (DESIGN.md): f applied to the step's reward-term gradient, the mean over micro-batches. With
    # distillation it used to sum f over micro-batches (sum |g_i W| instead of |mean g_i W|), which changes with
    # the accumulation steps.
    common = dict(
        distill_coef=distill_coef,
        mama_alpha=0.5,
        mama_statistic=form,
        mama_min_updates=1,
        prune_start_step=1,
        prune_end_step=1,
        max_steps=1,
    )
    # Each trainer trains right after it is built (construction seeds the RNG): the same rollouts in both.
    one = make_trainer(tmp_path / "1x8", per_device_train_batch_size=8, gradient_accumulation_steps=1, **common)
    one.train()
    two = make_trainer(tmp_path / "2x4", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common)
    two.train()
    assert logged(one, "reward") == logged(two, "reward")
    assert one.pruner.movement_updates == two.pruner.movement_updates == 1
    assert logged(one, "frac_reward_zero_std")[0] < 1.0  # a reward signal in this step
    for name, expected in one.pruner.movement.items():
        assert expected.abs().sum() > 0, name
        torch.testing.assert_close(two.pruner.movement[name], expected, rtol=1e-2, atol=1e-3 * expected.abs().max())
    for name, mask in one.pruner.masks.items():
        assert torch.equal(two.pruner.masks[name], mask), name
    assert not one.pruner.indicators.step_gradient and not two.pruner.indicators.step_gradient  # freed each step


@pytest.mark.parametrize("distill_coef", [0.0, 1.0])
def test_reward_statistic_stops_once_the_target_is_reached(tmp_path, distill_coef):
    # Events at steps 0-2 (end 2): steps 3-8 cannot use the statistic, so it is not computed for them.
    trainer = make_trainer(
        tmp_path, distill_coef=distill_coef, mama_alpha=0.5, mama_min_updates=1, prune_end_step=2, max_steps=8
    )
    trainer.train()
    assert trainer.pruner.sparsity() == pytest.approx(0.5)
    assert [e["step"] for e in trainer.prune_events] == [1, 2]  # step 0's event waits for activations
    # Steps 1 and 2 fed the events; without the stop all 8 steps would count (measured: 8 with prune_end_step=8).
    assert trainer.pruner.movement_updates == 2
    assert sum(v < 1.0 for v in logged(trainer, "frac_reward_zero_std")) >= 6  # later steps had a signal too


def test_lora_with_pruning_is_refused(tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="LoRA"):
        make_trainer(tmp_path, model=tiny_model()).__class__(
            model=tiny_model(),
            reward_funcs=[varied_reward],
            args=tiny_args(tmp_path),
            train_dataset=prompt_dataset(),
            processing_class=char_tokenizer(),
            peft_config=LoraConfig(r=4, target_modules=["q_proj"]),
        )


def test_reward_recorded_around_events(tmp_path):
    trainer = make_trainer(tmp_path, reward_window=1, max_steps=4, prune_end_step=2)
    trainer.train()
    before = logged(trainer, "prune/reward_before_event")
    after = logged(trainer, "prune/reward_after_event")
    assert before and after
    report = trainer.pruning_report()
    assert any(e["reward_after"] is not None for e in report["events"])


def test_reward_guard_holds_schedule(tmp_path):
    # tolerance 0 and a reward that only falls: the guard holds after the first event, so the target is not reached.
    calls = {"n": 0}

    def falling_reward(completions, **kwargs):
        calls["n"] += 1
        return [-float(calls["n"]) + 0.01 * i for i in range(len(completions))]

    trainer = tiny_trainer(
        tmp_path,
        reward=falling_reward,
        reward_guard_tolerance=0.0,
        reward_window=1,
        prune_start_step=1,
        prune_end_step=3,
    )
    trainer.train()
    assert trainer.reward_guard.holds > 0
    assert trainer.pruner.sparsity() < 0.5


# --------------------------------------------------------------------------------------------- distillation
def test_distillation_loss_logged_and_teacher_frozen(tmp_path):
    trainer = make_trainer(tmp_path, distill_coef=1.0)
    teacher_before = {n: p.detach().clone() for n, p in trainer.teacher.named_parameters()}
    trainer.train()
    kd = logged(trainer, "distill/loss")
    # KL >= 0, up to rounding: the teacher runs each prompt once (its cache then serves the group's completions), so
    # at step 0, where the student is still the teacher, the two agree to float rounding, not bit for bit.
    assert kd and all(v == v and v >= -1e-6 for v in kd)
    assert abs(kd[0]) < 1e-6 and kd[-1] > 1e-3  # the student was pruned away from the dense teacher
    for name, p in trainer.teacher.named_parameters():
        assert torch.equal(p, teacher_before[name]), name
    # The teacher really is a separate dense model: its logits differ from the pruned student's.
    ids = torch.tensor([[5, 6, 7, 8]], device=trainer.model.device)
    with torch.no_grad():
        t = trainer.teacher(input_ids=ids).logits
        s = trainer.model(input_ids=ids).logits
    assert not torch.allclose(t, s)
    assert all((p == 0).sum() < p.numel() * 0.01 for n, p in trainer.teacher.named_parameters() if "proj" in n)


def test_distillation_pulls_student_toward_teacher(tmp_path):
    # A different teacher and a constant reward (all advantages zero): only the distillation term trains.
    teacher_dir = tmp_path / "teacher"
    teacher = tiny_model(seed=1)
    with torch.no_grad():  # a peaked teacher, far from the near-uniform random student
        teacher.model.embed_tokens.weight.mul_(8.0)
    teacher.save_pretrained(teacher_dir)

    def constant_reward(completions, **kwargs):
        return [1.0] * len(completions)

    trainer = MamaGRPOTrainer(
        model=tiny_model(seed=0),
        reward_funcs=[constant_reward],
        args=tiny_args(
            tmp_path / "out",
            prune_target_sparsity=0.0,
            distill_coef=1.0,
            teacher_model_name_or_path=str(teacher_dir),
            max_steps=8,
            learning_rate=1e-2,
            weight_decay=0.0,
        ),
        train_dataset=prompt_dataset(),
        processing_class=char_tokenizer(),
    )
    ids = torch.randint(3, 40, (4, 12), generator=torch.Generator().manual_seed(0))

    before = kl_to_teacher(trainer, ids)
    trainer.train()
    assert kl_to_teacher(trainer, ids) < 0.9 * before
    kd = logged(trainer, "distill/loss")
    assert kd[-1] < kd[0]


def test_reference_model_is_reused_as_teacher(tmp_path):
    # TRL builds its reference model from the policy's path, so the policy is given as a folder here.
    tiny_model().save_pretrained(tmp_path / "policy")
    trainer = make_trainer(
        tmp_path, model=str(tmp_path / "policy"), distill_coef=1.0, beta=0.1, max_steps=2, prune_end_step=1
    )
    assert trainer.teacher is trainer.ref_model
    trainer.train()
    assert logged(trainer, "distill/loss") and logged(trainer, "kl")


# ------------------------------------------------------------------------------------- start from given masks
def _oneshot_export(tmp_path, granularity="unstructured", **kw):
    """A one-shot magnitude prune of the tiny model, exported with its mask sidecar; returns (folder, masks)."""
    from grpo_prune import prune_oneshot
    from grpo_prune.export import export_pruned

    model = tiny_model()
    report = prune_oneshot(model, sparsity=0.5, granularity=granularity, scorer="magnitude", **kw)
    folder = tmp_path / "oneshot"
    export_pruned(model, folder, pruner=report, structured=False, tokenizer=char_tokenizer())
    return folder, report.masks


@pytest.mark.parametrize("granularity", ["unstructured", "n:m"])
def test_training_from_init_masks_holds_them_exactly(tmp_path, granularity):
    folder, masks = _oneshot_export(tmp_path, granularity)
    trainer = make_trainer(tmp_path, prune_granularity=granularity, prune_init_masks=str(folder))
    assert trainer.pruner.sparsity() == pytest.approx(0.5)
    weights = target_weights(trainer.model)
    assert all(torch.all(weights[n][~m] == 0) for n, m in masks.items())  # zeroed before the first step
    before = {n: w.detach().clone() for n, w in weights.items()}
    trainer.train()
    for name, mask in masks.items():
        mask = mask.to(trainer.pruner.masks[name].device)
        assert torch.equal(trainer.pruner.masks[name], mask), name  # held: the target is already reached
        w = target_weights(trainer.model)[name]
        assert torch.all(w[~mask] == 0) and not torch.equal(w[mask], before[name][mask]), name
    assert trainer.prune_events == []


def test_init_masks_at_the_target_train_with_a_schedule_ending_after_the_run(tmp_path):
    # The events have nothing to add, so a `prune_end_step` past the last step (a config written for a longer
    # run) does not matter; masks below the target still need the schedule to end in time.
    folder, masks = _oneshot_export(tmp_path)
    trainer = make_trainer(tmp_path, prune_init_masks=str(folder), prune_end_step=10, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.prune_events == []
    assert all(torch.equal(trainer.pruner.masks[n].cpu(), m) for n, m in masks.items())
    below = make_trainer(
        tmp_path, prune_init_masks=str(folder), prune_target_sparsity=0.75, prune_end_step=10, max_steps=2
    )
    with pytest.raises(ValueError, match=r"`prune_end_step` \(10\) is after the last training step \(2\)"):
        below.train()


def test_init_masks_are_grown_further_by_the_schedule(tmp_path):
    folder, masks = _oneshot_export(tmp_path)
    trainer = make_trainer(
        tmp_path, prune_init_masks=str(folder / "pruning_masks.safetensors"), prune_target_sparsity=0.75
    )
    trainer.train()
    assert trainer.pruner.sparsity() == pytest.approx(0.75)
    for name, mask in masks.items():
        grown = trainer.pruner.masks[name].cpu()
        assert not torch.any(grown & ~mask), f"{name}: a pruned weight came back"


def test_init_masks_are_checked_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match="No masks at"):
        tiny_args(tmp_path, prune_init_masks=str(tmp_path / "nowhere"))
    folder, _ = _oneshot_export(tmp_path, "n:m")
    with pytest.raises(ValueError, match="holds n:m masks, but `prune_granularity` is 'unstructured'"):
        tiny_args(tmp_path, prune_init_masks=str(folder))
    with pytest.raises(ValueError, match="needs pruning on"):
        tiny_args(tmp_path, prune_init_masks=str(folder), prune_target_sparsity=0.0)


# -------------------------------------------------------------------------------------------- save / resume
def test_save_model_writes_zeros_masks_and_report(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    weights = load_file(out / "model.safetensors")
    for name, mask in trainer.pruner.masks.items():
        w = weights[f"{name}.weight"]
        assert torch.all(w[~mask.cpu()] == 0)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["global_sparsity"] == pytest.approx(0.5)
    assert set(report["layer_sparsity"]) == set(trainer.pruner.masks)
    assert report["events"] and "reward_before" in report["events"][0]
    masks = load_file(out / "pruning_masks.safetensors")
    assert masks.keys() == trainer.pruner.masks.keys()
    assert all(torch.equal(masks[n], m.cpu()) for n, m in trainer.pruner.masks.items())
    # The final save is what a user ships: no pruner training state (that lives in checkpoint-* only).
    assert not any(f.startswith(("pruner_state", "mama_trainer_state")) for f in os.listdir(out))


def test_output_dir_is_lean_and_checkpoints_carry_the_pruner_state(tmp_path):
    from grpo_prune.export import export_pruned

    trainer = make_trainer(tmp_path, max_steps=2, prune_end_step=1, save_strategy="steps", save_steps=2)
    trainer.train()
    out = tmp_path / "out"
    trainer.save_model()  # the final save, into output_dir beside checkpoint-2
    shipped = {"config.json", "generation_config.json", "model.safetensors", "pruning_masks.safetensors"}
    shipped |= {"pruning_report.json", "tokenizer.json", "tokenizer_config.json"}
    files = {f for f in os.listdir(out) if not f.startswith("checkpoint-")}
    assert shipped <= files, files
    assert not files & {"pruner_state.json", "pruner_state.safetensors", "mama_trainer_state.json"}, files
    assert not [f for f in files if f.startswith(".final-")]  # no temporary folder left behind
    checkpoint = set(os.listdir(out / "checkpoint-2"))
    assert {"pruner_state.json", "pruner_state.safetensors", "mama_trainer_state.json", "optimizer.pt"} <= checkpoint
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["global_sparsity"] == pytest.approx(0.5) and report["events"]
    assert report["mode"] == "masked" and "pruning_masks.safetensors" in report["files"]
    # The lean folder is itself exportable (its masks come from the sidecar): compressed here.
    exported = export_pruned(out, tmp_path / "compressed", compressed=True)
    assert exported["source_report"]["events"] == report["events"]
    assert exported["weights_format"] == "sparse-bitmask"


def test_resume_gives_the_same_masks(tmp_path):
    overrides = dict(max_steps=4, prune_end_step=3, save_strategy="steps", save_steps=2)
    full = make_trainer(tmp_path / "full", **overrides)
    full.train()

    first = make_trainer(tmp_path / "part", **overrides)
    first.train()
    checkpoint = tmp_path / "part" / "out" / "checkpoint-2"
    assert (checkpoint / "mama_trainer_state.json").exists()

    resumed = make_trainer(tmp_path / "part", **overrides)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, mask in full.pruner.masks.items():
        assert torch.equal(mask, resumed.pruner.masks[name]), name
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert [e["step"] for e in resumed.prune_events] == [e["step"] for e in full.prune_events]


# -------------------------------------------------------------------------------------------------------- DDP
def test_two_process_ddp_masks_identical(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "ddp_train.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            script,
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    masks = [load_file(tmp_path / f"masks_rank{r}.safetensors") for r in (0, 1)]
    assert masks[0].keys() == masks[1].keys() and masks[0]
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name]), name
        assert (~masks[0][name]).sum().item() == round(0.5 * masks[0][name].numel()), name
    info = json.loads((tmp_path / "ddp_rank0.json").read_text())
    assert info["world_size"] == 2


def run_ddp_checks(tmp_path, mode: str) -> list[dict]:
    """Run `ddp_checks.py <mode>` on two gloo ranks; a hang fails (timeout) instead of hanging CI."""
    script = os.path.join(os.path.dirname(__file__), "ddp_checks.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script]
    try:
        proc = subprocess.run([*cmd, mode, str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the two ranks did not finish (a collective one rank skipped?): {str(err.stderr)[-2000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    infos = [json.loads((tmp_path / f"{mode}_rank{r}.json").read_text()) for r in (0, 1)]
    masks = [load_file(tmp_path / f"{mode}_masks_rank{r}.safetensors") for r in (0, 1)]
    assert masks[0].keys() == masks[1].keys() and masks[0]
    for name in masks[0]:
        assert torch.equal(masks[0][name], masks[1][name]), name
    assert infos[0]["world_size"] == 2
    return infos


def test_ddp_ranks_decide_alike_when_one_rank_has_no_reward_signal(tmp_path):
    # Rank 0's rewards are constant, rank 1's vary: rank 0 alone would find the statistic empty and skip it while
    # rank 1 entered its all-reduce (a hang). Decisions are reduced, so both mix it in and build the same masks.
    infos = run_ddp_checks(tmp_path, "mixed_signal")
    for info in infos:
        assert info["zero_std"] and all(v == 0.5 for v in info["zero_std"])  # one of the two groups has no signal
        assert info["mixed"] == [True] and info["updates"] == 3 and info["sparsity"] == pytest.approx(0.5)
    assert infos[0]["events"] == infos[1]["events"] == [3]


def test_ddp_resume_equals_the_uninterrupted_run(tmp_path):
    # Activation sums are per rank; the checkpoint holds them summed over the ranks and one rank loads them, so the
    # resumed run's reduced statistics, reward statistic and masks equal the uninterrupted run's (they were
    # world_size x rank 0's before).
    infos = run_ddp_checks(tmp_path, "resume")
    for info in infos:
        assert info["equal"] == {"masks": True, "movement": True, "rms": True}
        assert info["events_resumed"] == info["events"] == [2, 3, 4]
        assert info["updates_resumed"] == info["updates"]
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("pruner_state*")) == [
        "pruner_state.json",
        "pruner_state.safetensors",
    ]


# ----------------------------------------------------------------------------------------- real embedded model
@pytest.mark.slow
def test_end_to_end_on_embedded_smollm2(tmp_path):
    """Two GRPO steps on the real SmolLM2-135M-Instruct with pruning and distillation on."""
    import reward_fns
    from grpo_prune.data import load_prompt_dataset
    from grpo_prune.models import load_model, load_tokenizer

    model = load_model("smollm2-135m-instruct")
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
        prune_target_sparsity=0.5,
        prune_end_step=1,
        prune_every=1,
        distill_coef=1.0,
    )
    trainer = MamaGRPOTrainer(
        model=model,
        reward_funcs=[reward_fns.get("math_answer")],
        args=args,
        train_dataset=load_prompt_dataset("arithmetic", "train", num_samples=8),
        processing_class=load_tokenizer("smollm2-135m-instruct"),
    )
    trainer.train()
    assert trainer.pruner.sparsity() == pytest.approx(0.5)
    for name, w in target_weights(trainer.model).items():
        assert (w == 0).sum().item() == round(0.5 * w.numel()), name
    kd = logged(trainer, "distill/loss")
    assert kd and kd[-1] > 0  # the pruned student differs from its dense teacher
    assert all(v == v for v in logged(trainer, "loss"))


# ------------------------------------------------------------------------------------ sparsegpt during training
@pytest.mark.parametrize("granularity", ["unstructured", "n:m"])
def test_sparsegpt_at_training_events_reaches_the_target_and_reconstructs(tmp_path, granularity):
    trainer = make_trainer(tmp_path, prune_scorer="sparsegpt", prune_granularity=granularity)
    trainer.train()
    assert trainer.pruner.sparsity() == pytest.approx(0.5)
    assert all(e.get("sparsity") for e in trainer.prune_events)
    for name, w in target_weights(trainer.model).items():
        mask = trainer.pruner.masks[name]
        assert torch.all(w[~mask] == 0) and torch.all(w[mask] != 0), name
        if granularity == "n:m":
            assert torch.all(mask.reshape(w.shape[0], -1, 4).sum(-1) == 2), name
    assert trainer.pruner.memory_bytes()["gram"] == 0  # freed at the target (tests/test_sparsegpt.py)
    assert trainer.pruner.indicators.magnitude == {}  # no |W0|: OBS reads the Gram matrices


def test_sparsegpt_reconstruction_lowers_the_layer_error_against_plain_masking():
    from grpo_prune.pruning.pruner import Pruner, PruningSettings

    ids = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    errors = {}
    for scorer in ("magnitude", "sparsegpt"):
        model = tiny_model()
        dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("down_proj")}
        pruner = Pruner(model, PruningSettings(scorer=scorer, schedule="oneshot", target_sparsity=0.5))
        pruner.attach_hooks()
        inputs: dict[str, torch.Tensor] = {}
        handle = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
            lambda mod, args, store=inputs: store.setdefault("x", args[0].detach())
        )
        with torch.no_grad():
            model(input_ids=ids)
        handle.remove()
        pruner.remove_hooks()
        pruner.prune_to(0.5)
        name = "model.layers.0.mlp.down_proj"
        w = dict(model.named_modules())[name].weight.detach()
        errors[scorer] = float((inputs["x"] @ (w - dense[name]).T).square().mean())
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_sparsegpt_resume_gives_the_same_masks(tmp_path):
    overrides = dict(prune_scorer="sparsegpt", max_steps=4, prune_end_step=3, save_strategy="steps", save_steps=2)
    full = make_trainer(tmp_path / "full", **overrides)
    full.train()
    first = make_trainer(tmp_path / "part", **overrides)
    first.train()
    resumed = make_trainer(tmp_path / "part", **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "out" / "checkpoint-2"))
    for name, mask in full.pruner.masks.items():
        assert torch.equal(mask, resumed.pruner.masks[name]), name
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_init_masks_on_the_pruned_export_itself_need_a_named_teacher(tmp_path):
    from transformers import AutoModelForCausalLM

    folder, _ = _oneshot_export(tmp_path)
    pruned = AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match="teacher built from its weights would be the pruned model"):
        make_trainer(tmp_path, model=pruned, prune_init_masks=str(folder), distill_coef=1.0)
    # Without distillation there is no teacher to get wrong.
    trainer = make_trainer(tmp_path, model=AutoModelForCausalLM.from_pretrained(folder), prune_init_masks=str(folder))
    assert trainer.pruner.sparsity() == pytest.approx(0.5)


def test_resume_continues_the_text_stream_without_a_settings_warning(tmp_path):
    # The text-distillation sampler's position is checkpointed (the stream continues where it was), and an unset
    # prune_end_step, saved resolved, does not read as a changed setting on resume.
    import warnings

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"the number {i} is {i % 7} more than {i - i % 7}." for i in range(100)))
    overrides = dict(
        max_steps=4,
        prune_end_step=None,
        save_strategy="steps",
        save_steps=2,
        distill_coef=0.0,
        distill_dataset=str(text),
        distill_text_length=16,
        distill_text_batch_size=2,
    )
    full = make_trainer(tmp_path / "full", **overrides)
    full.train()
    assert full.text_sampler.position == 4 * 2
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    assert json.loads((checkpoint / "mama_trainer_state.json").read_text())["text_sampler_position"] == 2 * 2
    resumed = make_trainer(tmp_path / "resumed", **overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not [w for w in caught if "changed settings" in str(w.message)]
    assert resumed.text_sampler.position == full.text_sampler.position
    # (the resumed log history starts with the checkpoint's: steps 1-2, then this run's 3-4)
    assert logged(resumed, "distill/text_loss")[-2:] == pytest.approx(logged(full, "distill/text_loss")[-2:], rel=1e-5)


def test_pruning_callback_and_distiller_do_not_import_the_trainer():
    # The callback talks to the pruner and a PruningHost protocol; the distiller to the accelerator and the models.
    # Neither imports the trainer (no import circle), statically or lazily.
    import ast

    import grpo_prune.distiller
    import grpo_prune.pruning_callback

    for module in (grpo_prune.pruning_callback, grpo_prune.distiller):
        tree = ast.parse(open(module.__file__, encoding="utf-8").read())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "grpo_prune.trainer" not in imported, module.__name__
