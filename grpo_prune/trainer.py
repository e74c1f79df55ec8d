"""`MamaGRPOTrainer`: TRL's `GRPOTrainer` that prunes while it trains and distils from the frozen dense teacher.

The subclass is thin. The pruning engine (`grpo_prune.pruning`) does the math; this file wires it into TRL's seams:

* gradients complete (`_clip_grad_norm`, or `on_pre_optimizer_step` when clipping is off): accumulate reward-weighted
  movement ``R += -(grad * W)`` and zero the gradients of pruned entries;
* after `optimizer.step()` (`on_optimizer_step`): re-zero the pruned weights, so no optimizer can revive them (with
  masked gradients Adam and SGD keep them at zero anyway; their moments are zeroed once, when entries are pruned);
* after each optimizer step (`on_step_end`): advance the schedule clock (unless the reward guard holds it) and run
  the prune event it calls for;
* `_compute_loss`: add ``distill_coef * L_KD / gradient_accumulation_steps`` to TRL's GRPO loss, with the student's
  logits taken from the hidden states of the very forward pass TRL runs for the policy loss (no second student pass);
* `save_model` (also used for every checkpoint) writes the pruner state and a JSON report; resuming restores it.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import disable_dropout_in_model

from grpo_prune.config import MamaGRPOConfig
from grpo_prune.distill import distillation_loss
from grpo_prune.fileio import relax_private_modes, write_json_atomic, write_text_atomic
from grpo_prune.pruning.pruner import Pruner
from grpo_prune.pruning.reward_guard import RewardGuard
from grpo_prune.tracking import WandbPruningCallback
from grpo_prune.trl_compat import check_metrics_seam, check_trl_seams


# TRL 1.16 reads the deprecated `model.is_gradient_checkpointing` (trl.models.utils, around generation), and peft
# does too; transformers then warns once per call site, three times a run. The replacement,
# `is_activation_checkpointing`, returns the same value; nothing of ours calls the old name. Silence exactly that one.
def silence_trl_deprecations() -> None:
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


silence_trl_deprecations()

TRAINER_STATE_NAME = "mama_trainer_state.json"
REPORT_NAME = "pruning_report.json"
EVENTS_NAME = "pruning_events.jsonl"
SCORE_QUANTILES = (0.1, 0.5, 0.9)


class _PruningCallback(TrainerCallback):
    """Runs the pruner at the optimizer-step seams of `transformers.Trainer`."""

    def __init__(self, trainer: MamaGRPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._pruning_train_begin(state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._process_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._enforce_masks()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._pruning_step_end(state)


class MamaGRPOTrainer(GRPOTrainer):
    """GRPO with MAMA pruning and distillation. Same arguments as [`~trl.GRPOTrainer`]; `args` is a
    [`MamaGRPOConfig`].

    Attributes:
        pruner: the [`~grpo_prune.pruning.pruner.Pruner`] that owns masks and indicators (None when pruning is off).
        teacher: the frozen dense teacher (None when distillation is off); TRL's `ref_model` when `beta > 0`.
        reward_guard: rolling reward around prune events.
        prune_events: one record per prune event (step, target and reached sparsity, per-layer sparsity, rewards).
    """

    _tag_names = ["trl", "grpo", "grpo-prune", "mama-pruning"]

    def __init__(self, model, reward_funcs=None, args: MamaGRPOConfig | None = None, *pargs, **kwargs):
        check_trl_seams()  # a TRL release that re-signed a method overridden below fails here, naming it
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = MamaGRPOConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1]}-MAMA-GRPO")
        if not isinstance(args, MamaGRPOConfig):
            raise TypeError(
                f"`args` must be a MamaGRPOConfig (it extends GRPOConfig with the pruning fields), got "
                f"{type(args).__name__}. Build it with MamaGRPOConfig(**grpo_config.to_dict())."
            )
        if kwargs.get("peft_config") is not None and args.pruning_enabled:
            raise ValueError(
                "`peft_config` (LoRA) cannot be combined with pruning (`prune_target_sparsity` > 0): LoRA freezes the "
                "weights being pruned, so they get no gradient for the movement indicator, and merging the adapter "
                "(W + BA) would write non-zeros into every pruned entry. Train the full model with pruning, or set "
                "`prune_target_sparsity: 0` to use LoRA with distillation only."
            )
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        check_metrics_seam(self)
        if args.pruning_enabled and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            # Masks and indicators are full tensors per layer; sharding them like the parameters is not built yet.
            raise NotImplementedError(
                "Pruning under DeepSpeed or FSDP is not supported yet; use DDP (torchrun / accelerate multi-GPU)."
            )

        self.teacher = self._build_teacher() if args.distillation_enabled else None
        self._student_backbone = self._backbone(self.accelerator.unwrap_model(self.model))
        self._captured_hidden: torch.Tensor | None = None
        self._capture_handle = None

        self.reward_guard = RewardGuard(window=args.reward_window, tolerance=args.reward_guard_tolerance)
        self.prune_events: list[dict[str, Any]] = []
        self.prune_clock = 0  # schedule time: optimizer steps, minus those the reward guard held
        self._grads_processed = False
        self.last_score_sample: torch.Tensor | None = None
        self.pruner: Pruner | None = None
        if args.pruning_enabled:
            self.pruner = Pruner(self.accelerator.unwrap_model(self.model), args.pruning_settings())
            if self.accelerator.num_processes > 1:
                self.pruner.set_reduce_fn(lambda t: self.accelerator.reduce(t, reduction="sum"))
            self.add_callback(_PruningCallback(self))
            if "wandb" in (args.report_to or []):
                self.add_callback(WandbPruningCallback(self))

    # ----------------------------------------------------------------------------------------------------- teacher
    @staticmethod
    def _backbone(model: torch.nn.Module) -> torch.nn.Module:
        """The decoder stack whose `last_hidden_state` feeds the LM head (PEFT-aware)."""
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return model.base_model

    def _build_teacher(self) -> PreTrainedModel:
        """One frozen dense copy. Reuses TRL's reference model when `beta > 0` rather than holding two."""
        args = self.args
        if self.ref_model is not None and args.teacher_model_name_or_path is None:
            return self.ref_model
        if args.teacher_model_name_or_path is not None:
            from grpo_prune.models import load_model

            teacher = load_model(args.teacher_model_name_or_path, **dict(args.model_init_kwargs or {}))
        else:
            # Built from the weights, not with copy.deepcopy: TRL patches the policy's `forward` (an instance
            # attribute bound to the policy), and a deep copy would keep calling the student.
            student = self.accelerator.unwrap_model(self.model)
            if hasattr(student, "get_base_model"):
                student = student.get_base_model()
            teacher = AutoModelForCausalLM.from_config(student.config, dtype=student.dtype)
            teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        teacher.eval()
        disable_dropout_in_model(teacher)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models.utils import prepare_fsdp

            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher.to(self.accelerator.device), evaluation_mode=True)

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Teacher logits ``[B, n_tokens, V]`` predicting the last ``n_tokens`` tokens of ``input_ids``."""
        out = self.teacher(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=n_tokens + 1)
        return out.logits[:, :-1]

    @contextmanager
    def _capture_student_hidden(self):
        """Keep the student's final hidden states from the policy forward that TRL runs inside `_compute_loss`."""

        def hook(module, args, output):
            self._captured_hidden = output.last_hidden_state

        handle = self._student_backbone.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # ---------------------------------------------------------------------------------------------- distillation
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
        if self.teacher is None:
            with self._record_activations():
                return super()._compute_loss(model, inputs)
        self._captured_hidden = None
        with self._capture_student_hidden(), self._record_activations():
            loss = super()._compute_loss(model, inputs)
        hidden, self._captured_hidden = self._captured_hidden, None
        if hidden is None:
            raise RuntimeError("the student's hidden states were not captured; the model forward is not a decoder")

        completion_ids = inputs["completion_ids"]
        n_tokens = completion_ids.size(1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
        # Position t predicts token t + 1: the completion is predicted from the positions just before it.
        student_logits = lm_head(hidden[:, -n_tokens - 1 : -1].to(lm_head.weight.dtype))
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        teacher_logits = self.teacher_logits(input_ids, attention_mask, n_tokens)
        kd = distillation_loss(
            student_logits,
            teacher_logits,
            mask,
            divergence=self.args.distill_loss,
            temperature=self.args.distill_temperature,
            jsd_beta=self.args.distill_jsd_beta,
        )
        mode = "train" if self.model.training else "eval"
        # Scaled for gradient accumulation like TRL's own auxiliary losses (HF's loss scaling is off in GRPO).
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        self._metrics[mode]["distill/loss"].append(self.accelerator.gather(kd.detach()).mean().item())
        return loss + self.args.distill_coef * kd / normalizer

    # --------------------------------------------------------------------------------------------------- rewards
    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.model.training and self._metrics["train"]["reward"]:
            # TRL's "reward" metric is already the mean over every process's batch, so all ranks agree.
            completed = self.reward_guard.update(self._metrics["train"]["reward"][-1])
            for event in completed:
                self._metrics["train"]["prune/reward_after_event"].append(event["reward_after"])
                for record in self.prune_events:
                    if record["step"] == event["step"]:
                        record["reward_after"] = event["reward_after"]
            if completed:
                self._write_events()
        return output

    # --------------------------------------------------------------------------------------------------- pruning
    def _clip_grad_norm(self, model):
        # Gradients are complete here; masking them first keeps pruned entries out of the clipping norm.
        self._process_gradients()
        return super()._clip_grad_norm(model)

    def _process_gradients(self) -> None:
        if self.pruner is None or self._grads_processed:
            return
        self.pruner.accumulate_movement_()
        self.pruner.mask_gradients_()
        self._grads_processed = True

    def _enforce_masks(self) -> None:
        if self.pruner is None:
            return
        self._grads_processed = False
        # Weights only: the optimizer state of pruned entries was zeroed at their prune event (and on resume), and
        # masked gradients keep it zero; re-zeroing it here every step cost as much as the rest of enforcement.
        self.pruner.apply_masks_()

    def _resolve_end_step(self, max_steps: int) -> int:
        end = self.args.prune_end_step
        if end is None:
            end = max(self.args.prune_start_step, max_steps // 2)
        if end > max_steps:
            raise ValueError(
                f"`prune_end_step` ({end}) is after the last training step ({max_steps}): the target sparsity "
                f"{self.args.prune_target_sparsity} would never be reached. Lower it or train longer."
            )
        return end

    def _pruning_train_begin(self, state) -> None:
        self.pruner.settings.end_step = self._resolve_end_step(state.max_steps)
        if state.global_step == 0 and self.pruner.step == 0 and not self.prune_events:
            self._run_prune_event(step=0)

    def _pruning_step_end(self, state) -> None:
        if self.reward_guard.should_hold():
            self.reward_guard.holds += 1
            self._metrics["train"]["prune/guard_hold"].append(1.0)
        else:
            self.prune_clock += 1
            self._run_prune_event(step=state.global_step)
        self._metrics["train"]["prune/sparsity"].append(self.pruner.sparsity())
        self._metrics["train"]["prune/target_sparsity"].append(self.pruner.target_sparsity_at(self.prune_clock))

    def _run_prune_event(self, step: int) -> None:
        start = time.perf_counter()
        event = self.pruner.maybe_prune(self.prune_clock)
        if event is None:
            return
        self.pruner.mask_optimizer_state_(self.optimizer)
        seconds = time.perf_counter() - start
        guard_event = self.reward_guard.record_event(step)
        record = {
            "step": step,
            "schedule_step": self.prune_clock,
            "target_sparsity": event["target"],
            "sparsity": event["reached"],
            "reward_before": guard_event["reward_before"],
            "reward_after": None,  # known `reward_window` generation batches later; the file is rewritten then
            "layer_sparsity": event["layer_sparsity"],
            "seconds": seconds,
        }
        record.update(self._score_quantiles(event.get("score_sample")))
        self.prune_events.append(record)
        metrics = self._metrics["train"]
        if guard_event["reward_before"] is not None:
            metrics["prune/reward_before_event"].append(guard_event["reward_before"])
        for key, value in record.items():
            if key.startswith("score_q"):
                metrics[f"prune/{key}"].append(value)
        self._write_events()

    def _write_events(self) -> None:
        """Rewrite ``pruning_events.jsonl``: one line per prune event, the same records as the report's ``events``.

        Rewritten (atomically) rather than appended, so each event's `reward_after` is filled in once known; the
        file is a few lines long."""
        if self.accelerator.is_main_process:
            text = "".join(json.dumps(record) + "\n" for record in self.prune_events)
            write_text_atomic(os.path.join(self.args.output_dir, EVENTS_NAME), text)

    def _score_quantiles(self, sample: torch.Tensor | None) -> dict[str, float]:
        """Quantiles of the event's scores, from the pruner's strided subsample of them."""
        if sample is None or not sample.numel():
            return {}
        self.last_score_sample = sample
        values = torch.quantile(sample.float(), torch.tensor(SCORE_QUANTILES))
        return {f"score_q{int(q * 100)}": v.item() for q, v in zip(SCORE_QUANTILES, values, strict=True)}

    # ------------------------------------------------------------------------------------------ save and resume
    def pruning_report(self) -> dict[str, Any]:
        """JSON-able summary: settings, per-layer sparsity, events with the reward around them."""
        report: dict[str, Any] = {
            "pruning_enabled": self.pruner is not None,
            "distillation": {
                "enabled": self.teacher is not None,
                "coef": self.args.distill_coef,
                "loss": self.args.distill_loss,
                "temperature": self.args.distill_temperature,
                "teacher": self.args.teacher_model_name_or_path or "initial dense weights of the student",
            },
        }
        if self.pruner is not None:
            report.update(self.pruner.report())
            report.update(
                {
                    "global_sparsity": self.pruner.sparsity(),
                    "layer_sparsity": self.pruner.layer_sparsity(),
                    "params_pruned": self.pruner.num_pruned(),
                    "schedule_step": self.prune_clock,
                    "reward_guard_holds": self.reward_guard.holds,
                }
            )
            if getattr(self.pruner, "added_biases", None):
                # The config of a bias-free model cannot express biases on some projections only; plain
                # from_pretrained would drop them. `grpo-prune export` sets mlp_bias/attention_bias correctly.
                report["note"] = (
                    f"compensation added biases to {len(self.pruner.added_biases)} layers; load this checkpoint "
                    "through `grpo-prune export` (or resume training), not plain from_pretrained."
                )
            events = {e["step"]: e for e in self.reward_guard.public_events()}
            report["events"] = [
                {**e, "reward_after": events.get(e["step"], {}).get("reward_after")} for e in self.prune_events
            ]
        return report

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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save and os.path.isdir(output_dir):
            relax_private_modes(output_dir, recursive=False)  # save_pretrained's model.safetensors is 0600
        if self.pruner is None or not self.args.should_save:
            return
        self.pruner.save(output_dir)
        state = {
            "prune_clock": self.prune_clock,
            "reward_guard": self.reward_guard.state_dict(),
            "prune_events": self.prune_events,
        }
        write_json_atomic(os.path.join(output_dir, TRAINER_STATE_NAME), state)
        write_json_atomic(os.path.join(output_dir, REPORT_NAME), self.pruning_report())

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.pruner is None:
            return
        state_path = os.path.join(checkpoint, TRAINER_STATE_NAME)
        if not os.path.exists(state_path):
            raise FileNotFoundError(
                f"{checkpoint} has no pruner state ({TRAINER_STATE_NAME}); it was not written by MamaGRPOTrainer, "
                "so masks and movement scores cannot be restored."
            )
        self.pruner.load(checkpoint)
        with open(state_path) as f:
            state = json.load(f)
        self.prune_clock = state["prune_clock"]
        self.reward_guard.load_state_dict(state["reward_guard"])
        self.prune_events = state["prune_events"]
        self.pruner.apply_masks_()
        self.pruner.mask_optimizer_state_(self.optimizer)
