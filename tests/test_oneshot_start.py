"""The one-shot start inside `grpo-prune train` (`prune_init_scorer`): the dense student is pruned one-shot at the
start of `train()` by the code `grpo-prune oneshot` runs, the pruner starts from those masks, the teacher and |W0|
stay dense, and a resume does not prune again."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import tiny_args, tiny_model, tiny_trainer
from transformers import TrainerCallback

from grpo_prune import data

REPO = Path(__file__).resolve().parents[1]

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Built-in text: no sampling, so the start costs well under a second on the tiny model.
FAST = dict(prune_calibration="python_docs", prune_calibration_windows=4, prune_calibration_length=32)
# The dense student's own samples, as few as the tiny model needs: one optimizer step after the start.
SELF_START = dict(
    prune_init_scorer="wanda",
    prune_calibration="self",
    prune_calibration_windows=2,
    prune_calibration_length=16,
    max_steps=1,
    prune_end_step=1,
)


def target_weights(model):
    return {n: m.weight for n, m in model.named_modules() if n.endswith(LINEAR_SUFFIXES)}


class FirstStep(TrainerCallback):
    """Records the pruner's sparsity, masks and target weights just before the first optimizer step runs."""

    def __init__(self, trainer):
        self.trainer, self.sparsity, self.masks, self.weights = trainer, None, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.sparsity = self.trainer.pruner.sparsity()
            self.masks = {n: m.clone() for n, m in self.trainer.pruner.masks.items()}
            self.weights = {n: w.detach().clone() for n, w in target_weights(self.trainer.model).items()}


def start_trainer(output_dir, **overrides):
    trainer = tiny_trainer(output_dir, **{**FAST, **overrides})
    first = FirstStep(trainer)
    trainer.add_callback(first)
    return trainer, first


# ------------------------------------------------------------------------------------------------- the start
@pytest.mark.parametrize(
    "scorer, granularity",
    [("sparsegpt", "unstructured"), ("wanda", "unstructured"), ("magnitude", "unstructured"), ("sparsegpt", "n:m")],
)
def test_start_reaches_the_requested_sparsity_before_step_one_and_is_held(tmp_path, scorer, granularity):
    trainer, first = start_trainer(tmp_path / "out", prune_init_scorer=scorer, prune_granularity=granularity)
    assert trainer.pruner.sparsity() == 0.0 and trainer.oneshot_start is None  # made by train(), not __init__
    trainer.train()
    assert first.sparsity == pytest.approx(0.5, abs=1e-9)  # reached before the first step
    assert trainer.pruner.sparsity() == pytest.approx(0.5, abs=1e-9)  # the target, at the end
    assert trainer.prune_events == []  # start == target: the events hold the masks
    weights = target_weights(trainer.model)
    for name, mask in first.masks.items():
        assert torch.equal(trainer.pruner.masks[name], mask), name
        assert torch.all(first.weights[name][~mask] == 0), f"{name}: not zeroed by the start"
        assert torch.all(weights[name][~mask] == 0), f"{name}: a pruned weight moved after optimizer steps"
        assert not torch.equal(weights[name][mask], first.weights[name][mask]), f"{name}: kept weights not trained"
    if granularity == "n:m":
        for name, mask in trainer.pruner.masks.items():
            assert torch.all(mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2), name
    record = trainer.pruning_report()["oneshot_start"]
    assert record["scorer"] == scorer and record["sparsity"] == 0.5
    assert record["sparsity_reached"] == pytest.approx(0.5) and record["cpu_seconds"] > 0
    assert record["calibration"] == "python_docs" and record["calibration_windows"] == 4
    starts = [e["prune/start_sparsity"] for e in trainer.state.log_history if "prune/start_sparsity" in e]
    assert starts == [pytest.approx(0.5)]


def test_start_below_the_target_is_grown_by_the_events(tmp_path):
    # A sparsegpt start at 25%, then mama events to 50%: the events prune further from the start, never back.
    trainer, first = start_trainer(
        tmp_path / "out", prune_init_scorer="sparsegpt", prune_init_sparsity=0.25, prune_end_step=3, max_steps=4
    )
    trainer.train()
    assert first.sparsity == pytest.approx(0.25, abs=1e-9)
    assert trainer.pruner.sparsity() == pytest.approx(0.5, abs=1e-9)
    assert max(e["sparsity"] for e in trainer.prune_events) == pytest.approx(0.5)
    weights = target_weights(trainer.model)
    for name, start in first.masks.items():
        final = trainer.pruner.masks[name]
        assert not torch.any(final & ~start), f"{name}: a weight pruned by the start came back"
        assert torch.all(weights[name][~final] == 0), name
    assert trainer.oneshot_start["sparsity"] == 0.25


def test_start_at_the_target_trains_with_a_schedule_ending_after_the_run(tmp_path):
    # The quickstart's config with a shorter run (`--max_steps 8` against its `prune_end_step: 10`): the start
    # reaches the target, so the schedule's end does not matter and the run trains.
    trainer, first = start_trainer(tmp_path / "out", prune_init_scorer="magnitude", prune_end_step=10, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.prune_events == []
    assert first.sparsity == pytest.approx(0.5, abs=1e-9) and trainer.pruner.sparsity() == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("teacher", ["copy", "reference"])
def test_teacher_and_magnitude_are_the_dense_model(tmp_path, teacher):
    dense = tiny_model()
    if teacher == "copy":  # built by the distiller from the student's own weights
        trainer = tiny_trainer(tmp_path / "out", **FAST, prune_init_scorer="sparsegpt", distill_coef=1.0)
    else:  # TRL's reference model (beta > 0), loaded from the policy's folder
        dense.save_pretrained(tmp_path / "policy")
        trainer = tiny_trainer(
            tmp_path / "out",
            model=str(tmp_path / "policy"),
            **FAST,
            prune_init_scorer="sparsegpt",
            distill_coef=1.0,
            beta=0.1,
        )
        assert trainer.teacher is trainer.ref_model
    trainer.train()
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(input_ids=ids).logits[:, -6:]
        student = trainer.model(input_ids=ids.to(trainer.model.device)).logits[:, -6:].cpu()
    got = trainer.teacher_logits(ids, torch.ones_like(ids), 5).cpu()
    torch.testing.assert_close(got, expected[:, :5], rtol=0, atol=1e-6)  # the dense model's logits
    assert (student[:, :5] - expected[:, :5]).abs().max() > 1e-3  # and not the pruned student's
    # |W0| of later events (mama's pretrained term) is the dense weights, not the reconstructed ones.
    dense_weights = target_weights(dense)
    for name, magnitude in trainer.pruner.magnitude.items():
        torch.testing.assert_close(magnitude.float().cpu(), dense_weights[name].detach().abs(), rtol=1e-3, atol=1e-6)
    assert trainer.pruner.indicators.magnitude_source == "frozen dense copy"


def test_magnitude_is_dense_without_a_teacher(tmp_path):
    dense = target_weights(tiny_model())
    trainer = tiny_trainer(tmp_path / "out", **FAST, prune_init_scorer="sparsegpt", max_steps=1, prune_end_step=1)
    trainer.train()
    assert trainer.teacher is None
    for name, magnitude in trainer.pruner.magnitude.items():
        torch.testing.assert_close(magnitude.float().cpu(), dense[name].detach().abs(), rtol=1e-3, atol=1e-6)
        assert bool((magnitude[~trainer.pruner.masks[name]] > 0).any()), name  # not the pruned model's zeros


def test_self_calibration_samples_the_dense_student(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_PRUNE_CACHE", str(tmp_path / "cache"))
    seen = []
    original = data.calibration_windows

    def spy(tokenizer, source, windows, length, *, model=None, **kwargs):
        seen.append(sum(int(w.count_nonzero()) for w in target_weights(model).values()))
        return original(tokenizer, source, windows, length, model=model, **kwargs)

    monkeypatch.setattr(data, "calibration_windows", spy)
    dense_nonzero = sum(int(w.count_nonzero()) for w in target_weights(tiny_model()).values())
    trainer = tiny_trainer(tmp_path / "out", **SELF_START)
    trainer.train()
    assert seen == [dense_nonzero]  # sampled once, from the student before it was pruned
    assert list((tmp_path / "cache" / "self_generated").iterdir())  # and cached
    assert trainer.oneshot_start["calibration"] == "self"
    assert trainer.pruner.sparsity() == pytest.approx(0.5)


def record_calibrations(monkeypatch, tmp_path) -> list[dict]:
    """Samples cached under ``tmp_path``; returns the list that receives the keyword arguments of every
    `data.calibration_windows` call."""
    monkeypatch.setenv("GRPO_PRUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    original = data.calibration_windows

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "calibration_windows", spy)
    return calls


def test_calibration_seed_gives_runs_of_other_seeds_the_same_start(tmp_path, monkeypatch):
    """A fixed `prune_calibration_seed` makes the start independent of the run's seed (so the runs can be souped);
    left unset, the run's seed draws the samples."""
    calls = record_calibrations(monkeypatch, tmp_path)
    masks = []
    for name, seed, calibration_seed in (("a", 0, 7), ("b", 1, 7), ("c", 1, None)):
        trainer = tiny_trainer(tmp_path / name, seed=seed, prune_calibration_seed=calibration_seed, **SELF_START)
        trainer.train()
        assert trainer.oneshot_start["calibration_seed"] == (seed if calibration_seed is None else calibration_seed)
        masks.append({n: m.clone() for n, m in trainer.pruner.masks.items()})
    assert [call["seed"] for call in calls] == [7, 7, 1]
    for name, mask in masks[0].items():
        assert torch.equal(mask, masks[1][name]), name


def test_task_share_reaches_the_calibration_and_the_record(tmp_path, monkeypatch):
    """`prune_calibration_task_share` is what the start's calibration samples with, and the start records it."""
    calls = record_calibrations(monkeypatch, tmp_path)
    trainer = tiny_trainer(tmp_path / "out", prune_calibration_task_share=0.875, **SELF_START)
    trainer.train()
    assert [call["task_share"] for call in calls] == [0.875]
    assert trainer.oneshot_start["calibration_task_share"] == 0.875
    assert trainer.pruner.sparsity() == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ resume
def test_resume_does_not_redo_the_start_and_gives_the_same_masks(tmp_path, monkeypatch):
    overrides = dict(
        prune_init_scorer="sparsegpt",
        prune_init_sparsity=0.25,
        max_steps=4,
        prune_end_step=3,
        save_strategy="steps",
        save_steps=2,
    )
    full, _ = start_trainer(tmp_path / "full", **overrides)
    full.train()
    part, _ = start_trainer(tmp_path / "part", **overrides)
    part.train()
    checkpoint = tmp_path / "part" / "checkpoint-2"
    state = json.loads((checkpoint / "mama_trainer_state.json").read_text())
    assert state["oneshot_start"] == part.oneshot_start  # the checkpoint records that the start was made

    import grpo_prune.oneshot_start

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run pruned one-shot again")

    monkeypatch.setattr(grpo_prune.oneshot_start, "prune_on_calibration", refuse)
    resumed, first = start_trainer(tmp_path / "part", **overrides)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert first.sparsity is None  # no step 0 in a resumed run: the masks came from the checkpoint
    assert resumed.oneshot_start == part.oneshot_start
    assert resumed.pruning_report()["oneshot_start"] == part.oneshot_start
    for name, mask in full.pruner.masks.items():
        assert torch.equal(mask, resumed.pruner.masks[name]), name
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(prune_init_scorer="obs"), "`prune_init_scorer` must be one of"),
        (dict(prune_init_sparsity=0.3), "set `prune_init_scorer`"),
        (dict(prune_init_scorer="wanda", prune_init_masks="somewhere"), "`prune_init_masks` both choose"),
        (dict(prune_init_scorer="wanda", prune_target_sparsity=0.0), "needs pruning on"),
        (dict(prune_init_scorer="wanda", prune_granularity="structured"), "'unstructured' or 'n:m'"),
        (dict(prune_init_scorer="wanda", prune_init_sparsity=0.6), r"`prune_init_sparsity` must be in \(0"),
        (dict(prune_init_scorer="wanda", prune_init_sparsity=0.0), r"`prune_init_sparsity` must be in \(0"),
        (dict(prune_init_scorer="wanda", prune_calibration="nowhere.txt"), "`prune_calibration`"),
        (dict(prune_init_scorer="wanda", prune_calibration_windows=0), "`prune_calibration_windows`"),
        (dict(prune_init_scorer="wanda", prune_calibration_length=1), "`prune_calibration_length`"),
        (dict(prune_init_scorer="wanda", prune_calibration_seed=-1), "`prune_calibration_seed`"),
        (dict(prune_init_scorer="wanda", prune_calibration_task_share=1.5), "`prune_calibration_task_share`.*0, 1"),
        (
            dict(prune_init_scorer="wanda", prune_calibration="python_docs", prune_calibration_task_share=0.75),
            "`prune_calibration_task_share`.*needs the calibration 'self'",
        ),
        (dict(prune_init_scorer="wanda", prune_compensate=True), "`prune_compensate: true`"),
        (
            dict(prune_init_scorer="sparsegpt", prune_granularity="n:m", prune_init_sparsity=0.25),
            "`prune_init_sparsity` .* must equal 1 - N/M",
        ),
        (
            dict(prune_init_scorer="sparsegpt", prune_comparison="global", prune_scorer="wanda"),
            "one-shot start.*`prune_comparison` must be 'layer' or 'row'",
        ),
        (
            dict(prune_init_scorer="sparsegpt", prune_allocation="owl", prune_scorer="wanda"),
            "one-shot start.*`prune_allocation`='owl'",
        ),
        (dict(prune_allocation="spread"), "`prune_allocation` must be one of"),
        (  # a start below the target leaves the events sparsity to add: their schedule must end in the run
            dict(prune_init_scorer="wanda", prune_init_sparsity=0.25, prune_end_step=10),
            r"`prune_end_step` \(10\) is after the last training step \(4\)",
        ),
    ],
)
def test_config_errors_are_raised_before_any_model_loads(tmp_path, monkeypatch, overrides, match):
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match=match):
        tiny_args(tmp_path, **overrides)


def test_defaults_and_allocation_reach_the_settings(tmp_path):
    args = tiny_args(tmp_path, prune_init_scorer="sparsegpt")
    assert args.prune_init_sparsity == args.prune_target_sparsity == 0.5  # default: the target
    assert (args.prune_calibration, args.prune_calibration_windows, args.prune_calibration_length) == (
        "self",
        128,
        256,
    )
    owl = tiny_args(tmp_path, prune_scorer="wanda", prune_allocation="owl")
    assert owl.pruning_settings().allocation == "owl"
    start = tiny_args(tmp_path, prune_init_scorer="wanda", prune_scorer="wanda", prune_allocation="owl")
    assert start.oneshot_start_settings()["allocation"] == "owl"  # the start allocates as the events do


def test_multi_process_runs_are_refused_naming_the_two_step_route(tmp_path, monkeypatch):
    from accelerate import Accelerator

    trainer = tiny_trainer(tmp_path / "out", **FAST, prune_init_scorer="sparsegpt")
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(ValueError, match="one process only.*grpo-prune oneshot.*prune_init_masks"):
        trainer._check_oneshot_start_supported()
    with pytest.raises(ValueError, match="one process only"):
        tiny_trainer(tmp_path / "again", **FAST, prune_init_scorer="sparsegpt")


# ------------------------------------------------------------------------------ one code path with the CLI


def test_the_start_and_grpo_prune_oneshot_make_the_same_masks(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    from grpo_prune.cli import main

    out = tmp_path / "oneshot"
    argv = ["oneshot", str(tiny_model_dir), str(out), "--scorer", "sparsegpt", "--sparsity", "0.5"]
    argv += ["--calibration", "python_docs", "--calibration-windows", "4", "--calibration-length", "32"]
    assert main(argv) == 0
    assert "CPU-s" in capsys.readouterr().out
    exported = load_file(out / "pruning_masks.safetensors")

    trainer = tiny_trainer(tmp_path / "out", **FAST, prune_init_scorer="sparsegpt", max_steps=1, prune_end_step=1)
    starts = FirstStep(trainer)
    trainer.add_callback(starts)
    trainer.train()
    assert exported.keys() == starts.masks.keys()
    for name, mask in starts.masks.items():
        assert torch.equal(exported[name].bool(), mask.cpu()), name


def test_oneshot_command_allocation_flag(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    from grpo_prune.cli import main

    base = ["--calibration", "python_docs", "--calibration-windows", "4", "--calibration-length", "32"]
    out = tmp_path / "owl"
    assert main(["oneshot", str(tiny_model_dir), str(out), "--scorer", "wanda", "--allocation", "owl", *base]) == 0
    masks = load_file(out / "pruning_masks.safetensors")
    pruned = {n: 1 - m.float().mean().item() for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m.bool()).sum()) for m in masks.values()) == total // 2  # the global count exact
    assert max(pruned.values()) - min(pruned.values()) > 1e-3  # but not every layer at 50%
    code = main(["oneshot", str(tiny_model_dir), str(tmp_path / "no"), "--scorer", "sparsegpt", "--allocation", "owl"])
    assert code == 2 and "`--allocation`='owl'" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def test_train_command_reports_the_start(tmp_path, tiny_model_dir, monkeypatch):
    from grpo_prune.cli import main

    (tmp_path / "start_rewards.py").write_text(
        "def distinct_chars(prompts, completions, **kwargs):\n"
        "    return [len(set(c if isinstance(c, str) else c[-1]['content'])) / 10 for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": "arithmetic",
        "reward_funcs": ["start_rewards:distinct_chars"],
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 8,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "activation_checkpointing": False,
        "prune_target_sparsity": 0.5,
        "prune_end_step": 1,
        "prune_init_scorer": "sparsegpt",
        **FAST,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 0
    report = json.loads((tmp_path / "run" / "pruning_report.json").read_text())
    assert report["oneshot_start"]["scorer"] == "sparsegpt"
    assert report["oneshot_start"]["sparsity_reached"] == pytest.approx(0.5)
    assert report["global_sparsity"] == pytest.approx(0.5)
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["sparsity_reached"] == pytest.approx(0.5)


def test_a_flag_unsets_the_start_that_the_quickstart_config_sets(tmp_path):
    """The README's two-command route trains configs/quickstart.yaml (which sets `prune_init_scorer`) from a
    `grpo-prune oneshot` export: `--prune_init_scorer none` unsets the start so `prune_init_masks` may be given."""
    from grpo_prune.cli import parse_train_args

    masks = tmp_path / "oneshot"
    masks.mkdir()
    quickstart = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--prune_init_masks", str(masks)]
    with pytest.raises(ValueError, match="add `--prune_init_scorer none`"):
        parse_train_args(quickstart)
    assert parse_train_args(["--config", str(REPO / "configs" / "quickstart.yaml")]).training.prune_init_scorer == (
        "sparsegpt"
    )
    with pytest.raises((ValueError, FileNotFoundError), match="pruning_masks"):  # unset: the masks are read
        parse_train_args([*quickstart, "--prune_init_scorer", "none"])
