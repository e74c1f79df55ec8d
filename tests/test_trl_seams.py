"""The private TRL methods MamaGRPOTrainer overrides still have the signatures it was written against."""

import pytest

from grpo_prune.trl_compat import (
    INTENDED_OVERRIDES,
    SEAMS,
    TrlSeamError,
    check_metrics_seam,
    check_overrides,
    check_trl_seams,
)


def test_installed_trl_matches_every_seam():
    from trl import GRPOTrainer

    check_trl_seams()  # raises TrlSeamError naming the seam
    for seam, (_, required) in SEAMS.items():
        assert not required or hasattr(GRPOTrainer, seam), seam
    # The overrides are not dead: each seam the trainer overrides is one TRL's class really has.
    from grpo_prune.trainer import MamaGRPOTrainer

    for seam in SEAMS:
        if hasattr(GRPOTrainer, seam):
            assert seam in MamaGRPOTrainer.__dict__, seam


class _Renamed:
    def __init__(self):
        self._metrics = {"train": {}, "eval": {}}

    def _compute_loss(self, model, batch):  # renamed parameter
        pass

    def _generate_and_score_completions(self, inputs):
        pass

    def _load_optimizer_and_scheduler(self, checkpoint):
        pass

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        pass

    def _save_checkpoint(self, model, trial):
        pass


class _ExtraRequired(_Renamed):
    def _compute_loss(self, model, inputs):
        pass

    def _generate_and_score_completions(self, inputs, mode):  # a new required argument
        pass


class _Missing(_ExtraRequired):
    _load_optimizer_and_scheduler = None

    def _generate_and_score_completions(self, inputs, mode="train"):  # a new optional argument is fine
        pass


class _NewCheckpointArgument(_ExtraRequired):
    def _generate_and_score_completions(self, inputs):
        pass

    def _save_checkpoint(self, model, trial, metrics):  # transformers added a required argument
        pass


class _NoMetrics(_ExtraRequired):
    def __init__(self):
        self.metrics = {}

    def _generate_and_score_completions(self, inputs):
        pass


@pytest.mark.parametrize(
    "cls, seam",
    [
        (_Renamed, "_compute_loss"),
        (_ExtraRequired, "_generate_and_score_completions"),
        (_Missing, "_load_optimizer_and_scheduler"),
        (_NewCheckpointArgument, "_save_checkpoint"),
        (_NoMetrics, "_metrics"),
    ],
)
def test_changed_seam_is_named(cls, seam):
    with pytest.raises(TrlSeamError, match=rf"`GRPOTrainer\.{seam}`.*trl>=1\.16\.0,<1\.17.*transformers>=5\.24"):
        check_trl_seams(cls)


def test_transformers_seams_are_checked():
    assert {"_prepare_for_training", "_save_checkpoint"} <= SEAMS.keys()


# ---------------------------------------------------------------------------------------------- shadowing
def test_no_method_of_ours_shadows_trl_or_transformers_by_accident():
    from grpo_prune.trainer import MamaGRPOTrainer

    check_overrides(MamaGRPOTrainer)
    assert "_log_metric" not in vars(MamaGRPOTrainer)  # TRL hands its own to reward functions as `log_metric`


def test_accidental_shadowing_is_named():
    from trl import GRPOTrainer

    from grpo_prune.trainer import MamaGRPOTrainer

    class Shadowing(MamaGRPOTrainer):
        def _log_metric(self, mode, key, value):  # TRL's is (name, value)
            pass

        def log(self, logs, start_time=None):  # transformers.Trainer's
            pass

    with pytest.raises(
        TrlSeamError, match=r"GRPOTrainer\._log_metric.*GRPOTrainer\.log\b|GRPOTrainer\.log.*_log_metric"
    ):
        check_overrides(Shadowing, GRPOTrainer, INTENDED_OVERRIDES)
    check_overrides(Shadowing, GRPOTrainer, INTENDED_OVERRIDES | {"_log_metric", "log"})  # declared: fine


def test_reward_function_logging_a_metric_trains(tmp_path):
    """TRL passes `log_metric=trainer._log_metric` to reward functions; ours must not replace it."""
    from tiny import tiny_trainer, varied_reward

    def logging_reward(completions, log_metric, **kwargs):
        rewards = varied_reward(completions)
        log_metric("acc", sum(r > 0.2 for r in rewards) / len(rewards))
        return rewards

    trainer = tiny_trainer(tmp_path, reward=logging_reward, max_steps=2, prune_end_step=1, distill_coef=1.0)
    trainer.train()
    acc = [entry["acc"] for entry in trainer.state.log_history if "acc" in entry]
    assert len(acc) == 2 and all(0.0 <= a <= 1.0 for a in acc)
    assert [entry for entry in trainer.state.log_history if "distill/loss" in entry]  # ours still logged


def test_metrics_instance_check():
    check_metrics_seam(_Renamed())
    with pytest.raises(TrlSeamError, match="_metrics"):
        check_metrics_seam(_NoMetrics())


def test_trl_gradient_checkpointing_deprecation_is_silenced_narrowly():
    import warnings

    from tiny import tiny_model

    from grpo_prune.trainer import silence_trl_deprecations

    model = tiny_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # replaces pytest's own ignore filters for this block
        silence_trl_deprecations()  # what importing grpo_prune.trainer does
        assert model.is_gradient_checkpointing is False  # what TRL reads
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another deprecation"]
