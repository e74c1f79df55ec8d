"""`MamaGRPOTrainer`: TRL's `GRPOTrainer` that prunes while it trains and distils from the frozen dense teacher.

The subclass is thin. The pruning engine (`grpo_prune.pruning`) does the math; this file wires it into TRL's seams:

* `_compute_loss`: when other loss terms (distillation) share the backward pass, take the gradient of TRL's GRPO
  loss alone w.r.t. the target weights for the reward-driven statistic (one extra backward, only on micro-batches
  with a non-zero advantage and only when the scorer uses the statistic);
* gradients complete (`_clip_grad_norm`, or `on_pre_optimizer_step` when clipping is off): when the GRPO loss is the
  whole loss, feed the statistic from the gradients themselves (no extra cost); zero the gradients of pruned entries;
* after `optimizer.step()` (`on_optimizer_step`): re-zero the pruned weights, so no optimizer can revive them (with
  masked gradients Adam and SGD keep them at zero anyway; their moments are zeroed once, when entries are pruned);
* after each optimizer step: the pruning callback (`grpo_prune.pruning_callback`) advances the schedule clock
  (unless the reward guard holds it) and runs the prune event it calls for;
* `_compute_loss`: add the distillation terms that the `Distiller` (`grpo_prune.distiller`, the owner of the frozen
  teacher) computes from the student's captured forward, divided by `gradient_accumulation_steps`, to TRL's GRPO loss;
* `_prepare_for_training` (with `prune_init_scorer`): the one-shot start, once, before the optimizer exists: the dense
  student (the teacher and `|W0|` were taken from it in `__init__`) is pruned on calibration text as
  `grpo-prune oneshot` prunes, and the pruner starts from those masks; a resumed run takes them from its checkpoint;
* construction: TRL's fused LM head, which scores the policy's completions, skips the prompt positions on CPU as it
  does on GPUs (`grpo_prune.trl_compat.compact_fused_lm_head_on_cpu`); the policy's `generate` prefills each distinct
  prompt of a batch once instead of once per completion (`grpo_prune.prefix.share_prompt_prefill`);
* `_save_checkpoint` / `save_model`: checkpoints carry the pruner's training state (resuming restores it exactly);
  the final `output_dir` gets only what a user ships (model with zeros, tokenizer, masks sidecar, report).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from typing import Any

import torch
from trl import GRPOTrainer

from grpo_prune.config import MamaGRPOConfig
from grpo_prune.data import TextWindowSampler
from grpo_prune.distiller import Distiller
from grpo_prune.fileio import relax_private_modes, write_json_atomic, write_text_atomic
from grpo_prune.models import has_adapters
from grpo_prune.prefix import share_prompt_prefill
from grpo_prune.pruning.pruner import Pruner
from grpo_prune.pruning.reward_guard import RewardGuard
from grpo_prune.pruning_callback import EVENTS_NAME, PruningCallback
from grpo_prune.tracking import WandbPruningCallback
from grpo_prune.trl_compat import (
    check_metrics_seam,
    check_overrides,
    check_trl_seams,
    compact_fused_lm_head_on_cpu,
)


# TRL 1.16 reads the deprecated `model.is_gradient_checkpointing` (trl.models.utils, around generation), and peft
# does too; transformers then warns once per call site, three times a run. The replacement,
# `is_activation_checkpointing`, returns the same value; nothing of ours calls the old name. Silence exactly that one.
def silence_trl_deprecations() -> None:
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


silence_trl_deprecations()

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "mama_trainer_state.json"
REPORT_NAME = "pruning_report.json"
__all__ = ["EVENTS_NAME", "REPORT_NAME", "TRAINER_STATE_NAME", "MamaGRPOTrainer"]


class MamaGRPOTrainer(GRPOTrainer):
    """GRPO with MAMA pruning and distillation. Same arguments as [`~trl.GRPOTrainer`]; `args` is a
    [`MamaGRPOConfig`].

    Attributes:
        pruner: the [`~grpo_prune.pruning.pruner.Pruner`] that owns masks and indicators (None when pruning is off).
        teacher: the frozen dense teacher (None when distillation is off); TRL's `ref_model` when `beta > 0`; under
            LoRA with no `teacher_model_name_or_path`, the policy itself, run with its adapters disabled (use
            `teacher_logits`, which disables them). Owned by `distiller`.
        distiller: the [`~grpo_prune.distiller.Distiller`] that owns the teacher and computes the distillation terms
            (None when distillation is off).
        pruning_callback: the [`~grpo_prune.pruning_callback.PruningCallback`] that runs the schedule (None when
            pruning is off); `reward_guard`, `prune_events`, `prune_clock` and `last_score_sample` are its.
        oneshot_start: the record of the one-shot start (`prune_init_scorer`) once made, or restored from the
            checkpoint a run resumes (scorer, requested and reached sparsity, calibration, CPU and wall seconds);
            None before `train()` and without `prune_init_scorer`.
    """

    _tag_names = ["trl", "grpo", "grpo-prune", "mama-pruning"]

    def __init__(self, model, reward_funcs=None, args: MamaGRPOConfig | None = None, *pargs, **kwargs):
        check_trl_seams()  # a TRL release that re-signed a method overridden below fails here, naming it
        check_overrides(MamaGRPOTrainer)  # and a method of ours that shadows one of TRL's by accident
        compact_fused_lm_head_on_cpu()  # the policy's log-probs: project only the completion through the LM head
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = MamaGRPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-MAMA-GRPO")
        if not isinstance(args, MamaGRPOConfig):
            raise TypeError(
                f"`args` must be a MamaGRPOConfig (it extends GRPOConfig with the pruning fields), got "
                f"{type(args).__name__}. Build it with MamaGRPOConfig(**grpo_config.to_dict())."
            )
        if args.pruning_enabled and (kwargs.get("peft_config") is not None or has_adapters(model)):
            # A model that already carries adapters would otherwise slip through: the pruner would mask the frozen
            # base weights and the lora_A / lora_B matrices alike.
            raise ValueError(
                "LoRA (`peft_config`, or a `model` that already carries PEFT adapters) cannot be combined with pruning "
                "(`prune_target_sparsity` > 0): LoRA freezes the weights being pruned, so they get no gradient for "
                "the movement indicator, and merging the adapter (W + BA) would write non-zeros into every pruned "
                "entry. Train the full model with pruning, or set `prune_target_sparsity: 0` to use LoRA with "
                "distillation only."
            )
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        check_metrics_seam(self)
        share_prompt_prefill(self.accelerator.unwrap_model(self.model))  # each group's prompt prefilled once
        if args.pruning_enabled and self.is_deepspeed_enabled:
            # Masks and indicators are full tensors per layer; sharding them like ZeRO partitions is not built.
            raise NotImplementedError(
                "Pruning under DeepSpeed is not supported; use FSDP2 (configs/accelerate/fsdp2.yaml) or DDP."
            )
        self._sharded_pruner = bool(args.pruning_enabled and self.is_fsdp_enabled)
        if self._sharded_pruner:
            self._check_fsdp2(args)

        self.distiller: Distiller | None = None
        if args.distillation_enabled:
            self.distiller = Distiller(
                args,
                self.accelerator,
                self.model,
                ref_model=self.ref_model,
                processing_class=self.processing_class,
                deepspeed=self.is_deepspeed_enabled,
                fsdp=self.is_fsdp_enabled,
            )

        self.oneshot_start: dict[str, Any] | None = None
        if args.prune_init_scorer is not None:
            self._check_oneshot_start_supported()

        self._grads_processed = False
        self._step_has_reward_signal = False
        self._train_max_steps: int | None = None
        self.pruner: Pruner | None = None
        self.pruning_callback: PruningCallback | None = None
        if args.pruning_enabled:
            if not self._sharded_pruner:
                self._build_pruner()
            # Under FSDP2 the parameters become DTensor shards only when `train()` prepares the model: the pruner
            # is built then (`_prepare_for_training`), before a checkpoint's pruner state is loaded.
            self.pruning_callback = PruningCallback(self)
            self.add_callback(self.pruning_callback)
            if "wandb" in (args.report_to or []):
                self.add_callback(WandbPruningCallback(self))

    def _build_pruner(self) -> None:
        # |W0| is read from the teacher when it is this model's own dense copy (built from the same weights, or
        # TRL's reference model), instead of being stored again.
        frozen_dense = None
        if self.distiller is not None and self.distiller.is_student_copy:
            frozen_dense = self.accelerator.unwrap_model(self.teacher)
        # Otherwise from the checkpoint file the model was loaded from, when it still holds the model's weights.
        self.pruner = Pruner(
            self.accelerator.unwrap_model(self.model),
            self.args.pruning_settings(),
            frozen_dense=frozen_dense,
            magnitude_from_checkpoint=True,
        )
        if self.args.prune_init_masks is not None:
            from grpo_prune.export import load_masks_sidecar

            masks = load_masks_sidecar(self.args.prune_init_masks)
            teacher_is_self = self.teacher is not None and self.args.teacher_model_name_or_path is None
            if teacher_is_self and self.pruner.layout is None:
                targets = self.pruner.targets
                if masks.keys() == targets.keys() and all(
                    m.shape == targets[n].weight.shape
                    and not bool(targets[n].weight[~m.to(targets[n].weight.device)].any())
                    for n, m in masks.items()
                ):
                    raise ValueError(
                        "`prune_init_masks`: the model already holds zeros at every masked weight (it is the pruned "
                        "export itself), so the teacher built from its weights would be the pruned model. Set "
                        "`teacher_model_name_or_path` to the dense model the masks were made from."
                    )
            self.pruner.start_from_masks(masks)
        if self.accelerator.num_processes > 1 and self.pruner.layout is None:
            # DDP: per-rank sums (activations, Gram matrices, the reward-term gradient of a step) are summed across
            # processes where they are used, and every decision at a prune event is or-ed across them.
            self.pruner.set_reduce_fn(lambda t: self.accelerator.reduce(t, reduction="sum"))
            self.pruner.indicators.any_fn = self._any_process

    def _check_oneshot_start_supported(self) -> None:
        """`prune_init_scorer` runs in one process: every rank would sample its own calibration text (and sparsegpt
        reconstruct its own weights), so ranks could start from different masks."""
        if self.accelerator.num_processes > 1 or self._sharded_pruner:
            raise ValueError(
                f"`prune_init_scorer` runs on one process only, this run has {self.accelerator.num_processes} "
                "processes (their calibration samples, and so their masks, could differ). Prune first, once: "
                f"`grpo-prune oneshot MODEL DIR --scorer {self.args.prune_init_scorer} --sparsity "
                f"{self.args.prune_init_sparsity} --calibration {self.args.prune_calibration}`, then train with "
                "`model_name_or_path: DIR`, `prune_init_masks: DIR` and `teacher_model_name_or_path: MODEL` (the "
                "dense model), without `prune_init_scorer`."
            )

    def _start_oneshot(self) -> None:
        """The one-shot start: prune the dense student as `grpo-prune oneshot` does (same function,
        `grpo_prune.oneshot_start.prune_on_calibration`), then start the pruner from its masks as
        `prune_init_masks` does. Runs before the optimizer is created, so no optimizer state needs masking.

        The teacher built from the student's weights and the pruner's ``|W0|`` (a snapshot, the checkpoint file, or
        that teacher) were taken from the dense weights in `__init__`; the self-generated calibration samples are
        drawn here, before the prune changes anything."""
        from grpo_prune.config import ONESHOT_START_TASK
        from grpo_prune.oneshot_start import prune_on_calibration

        args = self.args
        model = self.accelerator.unwrap_model(self.model)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        result = prune_on_calibration(
            model,
            tokenizer,
            calibration=args.prune_calibration,
            windows=args.prune_calibration_windows,
            length=args.prune_calibration_length,
            calibration_seed=args.seed if args.prune_calibration_seed is None else args.prune_calibration_seed,
            task=ONESHOT_START_TASK,
            task_share=args.prune_calibration_task_share,
            **args.oneshot_start_settings(),
        )
        reached = self.pruner.start_from_masks(result.report.masks)
        self.oneshot_start = {**result.summary(), "sparsity_reached": reached}
        self._metrics["train"]["prune/start_sparsity"].append(reached)
        self._metrics["train"]["prune/start_cpu_seconds"].append(result.cpu_seconds)
        logger.info(
            "One-shot start: %s pruned %.2f%% of the targeted weights (requested %.2f%%) on %d x %d tokens of %s "
            "in %.1f CPU-s (%.1f s)",
            args.prune_init_scorer,
            100 * reached,
            100 * args.prune_init_sparsity,
            args.prune_calibration_windows,
            args.prune_calibration_length,
            args.prune_calibration,
            result.cpu_seconds,
            result.wall_seconds,
        )

    def _any_process(self, flag: bool) -> bool:
        """``flag`` or-ed over every process (a collective)."""
        total = self.accelerator.reduce(torch.tensor([float(flag)], device=self.accelerator.device), reduction="sum")
        return bool(total.item() > 0)

    def _check_fsdp2(self, args: MamaGRPOConfig) -> None:
        """Refuse what the sharded pruner cannot do, before training starts (the model is loaded by now)."""
        version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise NotImplementedError(
                f"Pruning under FSDP needs FSDP2 (`fsdp_version: 2` in the accelerate config), got fsdp_version="
                f"{version}: FSDP1 flattens parameters, so masks cannot follow them. See configs/accelerate/fsdp2.yaml."
            )
        from grpo_prune.pruning.sharding import check_supported

        settings = args.pruning_settings()
        check_supported(settings)  # ValueError naming the field (structured, compensate, zscore)
        if args.distillation_enabled and settings.needs_movement:
            raise ValueError(
                "Under FSDP2 the reward statistic (`mama_alpha` > 0 with mama, or `prune_scorer: movement`) is read "
                "from the sharded gradients of the GRPO loss, which must then be the whole loss: set "
                "`distill_coef: 0`, or `mama_alpha: 0` (the measured default)."
            )

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # On resume the parent loads the checkpoint after sharding the model: `_load_optimizer_and_scheduler`
        # builds the pruner first. Otherwise it is built here, once the parameters are DTensor shards.
        self._train_max_steps = max_steps  # a resume resolves the default `prune_end_step` from it before loading
        if self.args.prune_init_scorer is not None and self.oneshot_start is None and resume_from_checkpoint is None:
            # A resumed run never prunes again: its weights were loaded from the checkpoint already (sparsegpt would
            # reconstruct them a second time) and its masks and `oneshot_start` record come with the pruner state.
            self._start_oneshot()
        out = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self._sharded_pruner and self.pruner is None:
            self._build_pruner()
        return out

    # ------------------------------------------------------------------------------- the pruning callback's state
    @property
    def reward_guard(self) -> RewardGuard | None:
        return self.pruning_callback.reward_guard if self.pruning_callback else None

    @property
    def prune_events(self) -> list[dict[str, Any]]:
        return self.pruning_callback.prune_events if self.pruning_callback else []

    @property
    def prune_clock(self) -> int:
        return self.pruning_callback.prune_clock if self.pruning_callback else 0

    @property
    def last_score_sample(self) -> torch.Tensor | None:
        return self.pruning_callback.last_score_sample if self.pruning_callback else None

    # ---------------------------------------------------------------------------------------------- distillation
    @property
    def teacher(self) -> torch.nn.Module | None:
        """The frozen dense teacher (`Distiller.teacher`), None when distillation is off."""
        return self.distiller.teacher if self.distiller is not None else None

    @property
    def text_sampler(self) -> TextWindowSampler | None:
        """The text windows of text distillation (`Distiller.text_sampler`), None when off."""
        return self.distiller.text_sampler if self.distiller is not None else None

    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Teacher logits ``[B, n_tokens, V]`` predicting the last ``n_tokens`` tokens of ``input_ids`` (see
        `Distiller.teacher_logits`; under LoRA the adapters are disabled)."""
        return self.distiller.teacher_logits(input_ids, attention_mask, n_tokens)

    @contextmanager
    def _record_activations(self):
        """Activation statistics come from the training forward over whole rollouts (prompt + completion), one
        pass per micro-batch: hooking generation instead would run the hooks once per generated token, for the
        same tokens, at several times the cost."""
        if self.pruner is None or not self.model.training:
            yield
            return
        self.pruner.attach_hooks()
        try:
            yield
        finally:
            self.pruner.remove_hooks()

    def _compute_loss(self, model, inputs):
        if self.distiller is None:
            with self._record_activations():
                loss = super()._compute_loss(model, inputs)
            self._reward_statistic_seam(inputs, loss)
            return loss
        with (
            self.distiller.capture_student(layers=self.args.distill_hidden_coef > 0) as captured,
            self._record_activations(),
        ):
            loss = super()._compute_loss(model, inputs)
        self._reward_statistic_seam(inputs, loss)
        mode = "train" if self.model.training else "eval"
        extra, metrics = self.distiller.loss(inputs, captured, train=mode == "train")
        for key, value in metrics.items():
            self._log_gathered_metric(mode, key, value)
        # Scaled for gradient accumulation like TRL's own auxiliary losses (HF's loss scaling is off in GRPO).
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss + extra / normalizer

    def _log_gathered_metric(self, mode: str, key: str, value: torch.Tensor) -> None:
        """Append ``value``'s mean over every process to ``self._metrics[mode][key]`` (a collective). Not TRL's
        ``_log_metric(name, value)``, which reward functions receive as ``log_metric``."""
        self._metrics[mode][key].append(self.accelerator.gather(value.detach()).mean().item())

    # ------------------------------------------------------------------------------------ reward-driven statistic
    @property
    def _statistic_tracked(self) -> bool:
        """The reward statistic is fed while a later prune event can still use it: once the masks reach the target
        sparsity (after the last event, or from `prune_init_masks`), nothing more is computed for it."""
        pruner = self.pruner
        return pruner is not None and pruner.indicators.tracks_statistic and not pruner.reached_target

    @property
    def _statistic_from_separate_grad(self) -> bool:
        """Whether other terms (distillation) share the backward pass, so that the GRPO loss's own gradient must be
        taken apart for the reward statistic."""
        return self.distiller is not None

    def _reward_statistic_seam(self, inputs: dict[str, Any], grpo_loss: torch.Tensor) -> None:
        """Note whether this micro-batch carries a reward signal (a non-zero advantage) and, when distillation
        shares the backward pass, add the GRPO loss's own gradient w.r.t. the target weights to the step's buffer
        (the statistic's ``f`` is applied once per optimizer step, to the mean over micro-batches and ranks).

        With every advantage zero the GRPO policy-gradient term has no gradient: nothing is computed. TRL's GRPO
        loss includes its KL penalty when `beta > 0`; that term is counted as part of it.
        """
        if not (self.model.training and self._statistic_tracked):
            return
        if not bool((inputs["advantages"] != 0).any()):
            return
        self._step_has_reward_signal = True
        if not self._statistic_from_separate_grad:
            return  # the gradients at the optimizer step are the GRPO loss's own: read them there, for free
        names = list(self.pruner.targets)
        weights = [self.pruner.targets[n].weight for n in names]
        grads = torch.autograd.grad(grpo_loss, weights, retain_graph=True, allow_unused=True)
        self.pruner.indicators.add_reward_gradient_(dict(zip(names, grads, strict=True)))

    def _count_reward_signal_step(self) -> None:
        """At the optimizer step, if any process saw a reward signal: one step of the statistic, ``f`` of the step's
        reward-term gradient (the buffered one averaged over ranks, or the accumulated, all-reduced
        ``weight.grad``). The flag is reduced first, so that every rank takes the same path and collectives."""
        signal = self.pruner.indicators.any_rank(self._step_has_reward_signal)
        self._step_has_reward_signal = False
        if not signal:
            self.pruner.indicators.step_gradient.clear()
            return
        if self._statistic_from_separate_grad:
            self.pruner.indicators.apply_step_gradient_(world_size=self.accelerator.num_processes)
        else:
            self.pruner.accumulate_movement_()

    # --------------------------------------------------------------------------------------------------- rewards
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.pruning_callback and self.model.training and self._metrics["train"]["reward"]:
            # TRL's "reward" metric is already the mean over every process's batch, so all ranks agree.
            self.pruning_callback.observe_reward(self._metrics["train"]["reward"][-1])
        return output

    # --------------------------------------------------------------------------------------------------- pruning
    def _clip_grad_norm(self, model):
        # Gradients are complete here; masking them first keeps pruned entries out of the clipping norm.
        self.process_pruning_gradients()
        return super()._clip_grad_norm(model)

    # The `PruningHost` interface of the pruning callback: the two gradient seams and the training metrics.
    @property
    def train_metrics(self) -> dict[str, list[float]]:
        return self._metrics["train"]

    def process_pruning_gradients(self) -> None:
        """Gradients are complete (after accumulation and the DDP all-reduce): count the step for the reward
        statistic, then zero the gradients of pruned entries. Once per optimizer step (clipping, or the callback's
        `on_pre_optimizer_step` when clipping is off)."""
        if self.pruner is None or self._grads_processed:
            return
        if self._statistic_tracked:
            self._count_reward_signal_step()
        self.pruner.mask_gradients_()
        self._grads_processed = True

    def enforce_pruning_masks(self) -> None:
        """After the optimizer step: re-zero the pruned weights."""
        if self.pruner is None:
            return
        self._grads_processed = False
        # Weights only: the optimizer state of pruned entries was zeroed at their prune event (and on resume), and
        # masked gradients keep it zero; re-zeroing it here every step cost as much as the rest of enforcement.
        self.pruner.apply_masks_()

    # ------------------------------------------------------------------------------------------ save and resume
    def pruning_report(self) -> dict[str, Any]:
        """JSON-able summary: settings, per-layer sparsity, events with the reward around them."""
        report: dict[str, Any] = {
            "pruning_enabled": self.pruner is not None,
            "distillation": {
                "enabled": self.distiller is not None,
                "coef": self.args.distill_coef,
                "loss": self.args.distill_loss,
                "temperature": self.args.distill_temperature,
                "hidden_coef": self.args.distill_hidden_coef,
                "text_dataset": self.args.distill_dataset,
                "text_coef": self.args.distill_text_coef if self.args.distill_dataset else 0.0,
                "teacher": self.args.teacher_model_name_or_path
                or (
                    "the base model (LoRA adapters disabled)"
                    if self.distiller is not None and self.distiller.teacher_is_disabled_adapters
                    else "initial dense weights of the student"
                ),
            },
        }
        if self.oneshot_start is not None:
            report["oneshot_start"] = dict(self.oneshot_start)
        if self.pruner is not None:
            report.update(self.pruner.report())
            report.update(
                {
                    "global_sparsity": self.pruner.sparsity(),
                    "layer_sparsity": self.pruner.layer_sparsity(),
                    "params_pruned": self.pruner.num_pruned(),
                    "schedule_step": self.prune_clock,
                    "reward_guard_holds": self.reward_guard.holds,
                    "statistic": self._statistic_report(),
                }
            )
            if getattr(self.pruner, "added_biases", None):
                # The config of a bias-free model cannot express biases on some projections only; plain
                # from_pretrained would drop them. `grpo-prune export` sets mlp_bias/attention_bias correctly.
                report["note"] = (
                    f"compensation added biases to {len(self.pruner.added_biases)} layers; load this checkpoint "
                    "through `grpo-prune export` (or resume training), not plain from_pretrained."
                )
            report["events"] = [dict(e) for e in self.prune_events]  # reward_after filled in as it becomes known
        return report

    def _statistic_report(self) -> dict[str, Any]:
        indicators = self.pruner.indicators
        if not indicators.tracks_statistic:
            return {"tracked": False}
        # Not reduced under DDP (a report is written by one rank): the statistic is the same on every rank there.
        usable, why = indicators.statistic_signal(reduce=self.pruner.layout is not None)
        return {
            "tracked": True,
            "form": self.pruner.settings.statistic,
            "source": "separate GRPO-loss gradient" if self._statistic_from_separate_grad else "GRPO gradient",
            "reward_signal_steps": indicators.statistic_updates,
            "usable": usable,
            "why_not": why or None,
        }

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, with the base model and the usage example named even when TRL cannot name them.

        TRL names the base model by `config._name_or_path` unless that is a local folder (then "[None](...)"), and
        its example loads `hub_model_id`, None unless the run pushes to the hub (then `model="None"`). `load_model`
        sets `_name_or_path` to the name the user gave; a local folder is named as such, and the example loads the
        output folder.
        """
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.isfile(path):
            return
        base = getattr(self.accelerator.unwrap_model(self.model).config, "_name_or_path", "") or "the dense model"
        with open(path, encoding="utf-8") as f:
            card = f.read()
        fixed = card.replace("[None](https://huggingface.co/None)", f"`{base}` (local folder)")
        if self.hub_model_id is None:
            fixed = fixed.replace('model="None"', f"model={os.path.abspath(self.args.output_dir)!r}")
        if fixed != card:
            write_text_atomic(path, fixed)

    def _save_checkpoint(self, model, trial) -> None:
        # transformers saves the model of a checkpoint through save_model(checkpoint-N, _internal_call=True); the flag
        # tells that call apart from the final save, so that only checkpoints carry the pruner's training state.
        self._saving_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._saving_checkpoint = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Inside a checkpoint (`checkpoint-N`): the model as transformers saves it plus the pruner's training state
        (`pruner_state.safetensors` / `.json`: masks, indicators, schedule position; `mama_trainer_state.json`), so
        that `resume_from_checkpoint` continues exactly. Anywhere else (the final save): only what a user ships,
        written by `grpo_prune.export.write_final_model`: the model with exact zeros, tokenizer,
        `pruning_masks.safetensors` and `pruning_report.json`."""
        output_dir = output_dir or self.args.output_dir
        if self.pruner is not None and self.pruner.layout is not None:
            # FSDP2: transformers gathers the model; every rank writes its pruner shards, and the report's figures
            # are collectives. The final folder keeps the training state too (the lean export needs full masks:
            # `Pruner.gathered_masks()` with `grpo_prune.export.export_pruned`).
            super().save_model(output_dir, _internal_call)
            self.pruner.save(output_dir)
            report = self.pruning_report()
            if self.args.should_save:
                write_json_atomic(os.path.join(output_dir, TRAINER_STATE_NAME), self._mama_state())
                write_json_atomic(os.path.join(output_dir, REPORT_NAME), report)
            return
        if self.pruner is None or getattr(self, "_saving_checkpoint", False):
            super().save_model(output_dir, _internal_call)
            if self.args.should_save and os.path.isdir(output_dir):
                relax_private_modes(output_dir, recursive=False)  # save_pretrained's model.safetensors is 0600
            if self.pruner is not None:
                self._save_pruner_state(output_dir)  # on every rank: DDP sums are reduced into the one file
            elif self.text_sampler is not None and self.args.should_save:
                write_json_atomic(os.path.join(output_dir, TRAINER_STATE_NAME), self._mama_state())
            return
        if self.args.should_save:
            from grpo_prune.export import write_final_model

            write_final_model(
                self.accelerator.unwrap_model(self.model),
                output_dir,
                pruner=self.pruner,
                tokenizer=self.processing_class,
                # The export writes compensation's biases into the config (mlp_bias / attention_bias), so the
                # checkpoint note "load through grpo-prune export" does not apply to this folder.
                run_report={k: v for k, v in self.pruning_report().items() if k != "note"},
            )
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_pruner_state(self, output_dir: str) -> None:
        """The pruner's training state and report, for `resume_from_checkpoint` (checkpoint folders only). Called
        on every rank: under DDP the per-rank sums (activations, Gram matrices) are summed over the ranks into the
        one file rank 0 writes (`Pruner.save`), and loaded back on one rank only (`_load_optimizer_and_scheduler`),
        so a resume neither multiplies rank 0's sums nor loses the others'."""
        self.pruner.save(output_dir, write=self.args.should_save)
        if self.args.should_save:
            write_json_atomic(os.path.join(output_dir, TRAINER_STATE_NAME), self._mama_state())
            write_json_atomic(os.path.join(output_dir, REPORT_NAME), self.pruning_report())

    def _mama_state(self) -> dict[str, Any]:
        """``mama_trainer_state.json``: the pruning callback's state (schedule clock, reward guard, events), the
        one-shot start's record, and the text-distillation sampler's position (the same on every rank: each draws
        one batch per micro-batch)."""
        state = self.pruning_callback.state_dict() if self.pruning_callback is not None else {}
        if self.oneshot_start is not None:
            state["oneshot_start"] = dict(self.oneshot_start)  # a resume knows the start was made (and how)
        if self.text_sampler is not None:
            state["text_sampler_position"] = self.text_sampler.position
        return state

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self._sharded_pruner and self.pruner is None:
            self._build_pruner()  # FSDP2: the model was sharded just before this call
        if checkpoint is None:
            return
        state_path = os.path.join(checkpoint, TRAINER_STATE_NAME)
        state = None
        if os.path.exists(state_path):
            with open(state_path) as f:
                state = json.load(f)
        if self.text_sampler is not None and state is not None and "text_sampler_position" in state:
            self.text_sampler.position = int(state["text_sampler_position"])  # the text stream continues
        if self.pruner is None:
            return
        if state is None:
            raise FileNotFoundError(
                f"{checkpoint} has no pruner state ({TRAINER_STATE_NAME}); it was not written by MamaGRPOTrainer, "
                "so masks and movement scores cannot be restored."
            )
        # Resolved as `on_train_begin` will resolve it, so that an unset `prune_end_step` (saved resolved) does not
        # read as a changed setting.
        max_steps = self._train_max_steps or self.state.max_steps
        self.pruner.settings.end_step = self.pruning_callback.resolve_end_step(max_steps)
        # DDP: the file holds sums over every rank; one rank keeps them (FSDP2: each rank reads its own file).
        self.pruner.load(checkpoint, holds_sums=self.pruner.layout is not None or self.accelerator.is_main_process)
        self.pruning_callback.load_state_dict(state)
        if "oneshot_start" in state:
            self.oneshot_start = dict(state["oneshot_start"])
        elif self.args.prune_init_scorer is not None:
            warnings.warn(
                f"{checkpoint} records no one-shot start (it was written by a run without `prune_init_scorer`): "
                "training continues from its masks, and no one-shot prune is made.",
                stacklevel=2,
            )
        self.pruner.apply_masks_()
        self.pruner.mask_optimizer_state_(self.optimizer)
