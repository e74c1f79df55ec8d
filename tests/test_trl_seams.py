"""The private TRL methods MamaGRPOTrainer overrides still have the signatures it was written against."""

import pytest
import torch

from grpo_prune.trl_compat import (
    INTENDED_OVERRIDES,
    SEAMS,
    TrlSeamError,
    check_metrics_seam,
    check_overrides,
    check_trl_seams,
    compact_fused_lm_head_on_cpu,
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
    from trl.trainer import utils as trl_utils

    assert trl_utils._use_triton(torch.device("cpu"))  # the trainer turned on the fused head's compaction
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


def _fused_policy_outputs(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)
    (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.log_probs.detach(), out.entropy.detach(), grads


def test_fused_lm_head_scores_only_the_completion_on_cpu(monkeypatch):
    """With the switch, TRL's fused LM head projects only the labelled positions on CPU: the same log-probs,
    entropies and gradients up to float rounding, and the head sees the completion rows alone."""
    from tiny import tiny_model
    from trl.kernels.chunked_logprob import _use_triton as original
    from trl.trainer import utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", original)  # TRL's own, whatever ran before; restored afterwards
    model = tiny_model()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    torch.manual_seed(0)
    ids = torch.randint(3, 64, (3, 12))
    labels = ids.clone()
    labels[:, :-4] = -100  # a 4-token completion after an 8-token prompt
    labels[1, -1] = -100  # and one row that ended early (padding)

    rows = []
    apply = trl_utils._ChunkedLogProbFunction.apply

    def counting(hidden, *args):
        rows.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counting)
    every = _fused_policy_outputs(model, ids, labels)
    compact_fused_lm_head_on_cpu()
    compact_fused_lm_head_on_cpu()  # idempotent: wraps once
    assert trl_utils._use_triton.__wrapped__ is original
    compacted = _fused_policy_outputs(model, ids, labels)
    assert rows == [3 * 11, 3 * 4 - 1]  # every shifted position, then the labelled ones only
    torch.testing.assert_close(compacted[0], every[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compacted[1], every[1], rtol=1e-5, atol=1e-6)
    assert compacted[0][1, -1] == 0 and compacted[0][:, :7].abs().sum() == 0  # unlabelled positions read zero
    for name, grad in every[2].items():
        torch.testing.assert_close(compacted[2][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert trl_utils._use_triton(torch.device("cpu")) is True
    assert trl_utils._use_triton(torch.device("meta")) == original(torch.device("meta"))  # other devices: TRL's


def test_fused_lm_head_switch_missing_is_named(monkeypatch):
    from trl.trainer import utils as trl_utils

    monkeypatch.delattr(trl_utils, "_use_triton")
    with pytest.raises(TrlSeamError, match=r"trl\.trainer\.utils\._use_triton.*does not exist"):
        compact_fused_lm_head_on_cpu()
