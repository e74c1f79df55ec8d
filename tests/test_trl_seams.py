"""The private TRL methods MamaGRPOTrainer overrides still have the signatures it was written against."""

import pytest

from grpo_prune.trl_compat import SEAMS, TrlSeamError, check_metrics_seam, check_trl_seams


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


class _ExtraRequired(_Renamed):
    def _compute_loss(self, model, inputs):
        pass

    def _generate_and_score_completions(self, inputs, mode):  # a new required argument
        pass


class _Missing(_ExtraRequired):
    _load_optimizer_and_scheduler = None

    def _generate_and_score_completions(self, inputs, mode="train"):  # a new optional argument is fine
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
        (_NoMetrics, "_metrics"),
    ],
)
def test_changed_seam_is_named(cls, seam):
    with pytest.raises(TrlSeamError, match=rf"`GRPOTrainer\.{seam}`.*trl>=1\.16\.0,<1\.17"):
        check_trl_seams(cls)


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
