"""`Distiller`: the frozen dense teacher and the distillation terms of `MamaGRPOTrainer`'s loss.

The trainer is glue between TRL's GRPO loss, the pruner and this object. The distiller owns the teacher:

* building it: TRL's reference model when `beta > 0` (one frozen copy, not two; not under FSDP, see
  `Distiller._prepare_fsdp`); under LoRA the policy itself with its adapters disabled (no copy at all); otherwise a
  copy built from the student's weights, or the model named by `teacher_model_name_or_path`, loaded in the
  student's dtype;
* its wrapping for the run (DeepSpeed, FSDP2, or a plain device move), and how it is called: under FSDP2 always
  through its root module, so that FSDP2's pre-forward hooks gather its shards;
* the logits head of either model (LM head, then the model's own logit post-processing), the capture of hidden
  states, and the plain-text stream (`TextWindowSampler`) of text distillation.

It computes the terms, ``distill_coef * L_KD + distill_hidden_coef * L_hidden`` on the completions (from the hidden
states of the very forward pass TRL runs for the policy loss: no second student pass) and, with `distill_dataset`,
``distill_text_coef * L_KD + distill_hidden_coef * L_hidden`` on a batch of text windows (one more student forward).
The divergences themselves are `grpo_prune.distill`'s pure functions.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel
from trl.trainer.utils import disable_dropout_in_model

from grpo_prune.config import MamaGRPOConfig
from grpo_prune.data import SELF_SOURCES, TextWindowSampler, text_token_stream
from grpo_prune.distill import chunked_distillation_loss, hidden_state_loss, postprocess_logits
from grpo_prune.models import backbone_of, has_adapters, is_fsdp2_module
from grpo_prune.prefix import prefill_distinct

__all__ = ["Distiller", "StudentCapture", "has_adapters"]


def decoder_layers(backbone: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder stack's list of layers (``layers`` in Llama-like models, ``h`` in GPT-2-like ones)."""
    n_layers = getattr(backbone.config, "num_hidden_layers", None)
    for module in backbone.children():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise RuntimeError(
        f"no list of {n_layers} decoder layers found in {type(backbone).__name__}; the hidden-state distillation "
        "term (`distill_hidden_coef`) needs one"
    )


@contextmanager
def capture_layer_outputs(backbone: torch.nn.Module, into: dict[int, torch.Tensor]):
    """Store each decoder layer's output hidden states ``[B, L, H]`` in ``into[layer_index]`` during the forwards
    run inside the context (forward hooks; a later forward overwrites an earlier one)."""

    def hook_for(index: int):
        def hook(module, args, output):
            into[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(decoder_layers(backbone))]
    try:
        yield into
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class StudentCapture:
    """What `Distiller.capture_student` keeps of the policy forward TRL runs: the final hidden states ``[B, L, H]``
    and, when asked, every decoder layer's output."""

    hidden: torch.Tensor | None = None
    layers: dict[int, torch.Tensor] = field(default_factory=dict)

    def layer_list(self) -> list[torch.Tensor]:
        return [self.layers[i] for i in sorted(self.layers)]


class Distiller:
    """The frozen teacher of one run and the distillation terms against it (see the module docstring).

    Args:
        args: the run's `MamaGRPOConfig` (distillation fields).
        accelerator: the trainer's `Accelerator` (device, wrapping, process index, unwrapping).
        model: the trainer's (prepared) student.
        ref_model: TRL's reference model (None when `beta == 0`).
        processing_class: the tokenizer (for the text stream).
        deepspeed, fsdp: whether the trainer runs under DeepSpeed / FSDP (the teacher is wrapped alike).

    Attributes:
        teacher: the frozen dense teacher (TRL's `ref_model` when `beta > 0`, except under FSDP, where TRL's
            wrapping of it does not suit the chunked KD and the teacher is a copy sharded per layer; under LoRA with
            no `teacher_model_name_or_path`, the policy itself, run with its adapters disabled).
        teacher_is_disabled_adapters: whether `teacher` is the LoRA policy with adapters disabled.
        text_sampler: the text windows of text distillation (None when off).
    """

    def __init__(
        self,
        args: MamaGRPOConfig,
        accelerator: Any,
        model: torch.nn.Module,
        ref_model: torch.nn.Module | None = None,
        processing_class: Any = None,
        deepspeed: bool = False,
        fsdp: bool = False,
    ):
        self.args = args
        self.accelerator = accelerator
        self.model = model
        self.teacher_is_disabled_adapters = False
        self.teacher = self._build_teacher(ref_model, deepspeed, fsdp)
        self._student_backbone = backbone_of(accelerator.unwrap_model(model))
        self.text_sampler: TextWindowSampler | None = None
        if args.text_distillation_enabled:
            stream = self._text_stream(processing_class)
            # One seed per process, so that data-parallel ranks distil different windows.
            self.text_sampler = TextWindowSampler(
                stream,
                args.distill_text_length,
                args.distill_text_batch_size,
                seed=args.seed + accelerator.process_index,
            )

    # ------------------------------------------------------------------------------------------------ the teacher
    @property
    def is_student_copy(self) -> bool:
        """Whether the teacher holds the student's own starting weights in a separate frozen module (a copy built
        from them, or TRL's reference model), so that ``|W0|`` can be read from it."""
        if self.args.teacher_model_name_or_path is not None or self.teacher_is_disabled_adapters:
            return False
        return self.accelerator.unwrap_model(self.teacher) is not self.accelerator.unwrap_model(self.model)

    def _text_stream(self, tokenizer: Any) -> list[int]:
        """Token ids of `distill_dataset`. The self-generated sources are the frozen teacher's own samples (under
        LoRA the base with adapters disabled), made before the first step and cached on disk, so that a resume or a
        second run reads them back instead of sampling again."""
        if self.args.distill_dataset not in SELF_SOURCES:
            return text_token_stream(tokenizer, self.args.distill_dataset)
        with self._teacher_module() as teacher:
            return text_token_stream(tokenizer, self.args.distill_dataset, model=teacher, seed=self.args.seed)

    def _build_teacher(self, ref_model: torch.nn.Module | None, deepspeed: bool, fsdp: bool) -> PreTrainedModel:
        """One frozen dense copy. Reuses TRL's reference model when `beta > 0` rather than holding two; under LoRA,
        the policy with its adapters disabled is the base model, so no copy at all."""
        args = self.args
        student = self.accelerator.unwrap_model(self.model)
        if args.teacher_model_name_or_path is None and has_adapters(student):
            # Pruning is refused with adapters, so the frozen base weights are exactly the dense start.
            self.teacher_is_disabled_adapters = True
            return student
        if ref_model is not None and args.teacher_model_name_or_path is None and not fsdp:
            # Under FSDP TRL wraps the reference model in one root group, resharded after each forward, so its LM
            # head is sharded when the chunked KD calls it: the teacher is its own copy, sharded per layer instead.
            return ref_model
        if hasattr(student, "get_base_model"):
            student = student.get_base_model()
        if args.teacher_model_name_or_path is not None:
            from grpo_prune.models import load_model

            # In the student's dtype (a bf16 student gets a bf16 teacher, not float32 at twice the memory), unless
            # `model_init_kwargs` names one.
            kwargs = dict(args.model_init_kwargs or {})
            if "torch_dtype" in kwargs:
                kwargs["dtype"] = kwargs.pop("torch_dtype")
            kwargs.setdefault("dtype", student.dtype)
            teacher = load_model(args.teacher_model_name_or_path, **kwargs)
        else:
            # Built from the weights, not with copy.deepcopy: TRL patches the policy's `forward` (an instance
            # attribute bound to the policy), and a deep copy would keep calling the student.
            teacher = AutoModelForCausalLM.from_config(student.config, dtype=student.dtype)
            teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        teacher.eval()
        disable_dropout_in_model(teacher)
        if deepspeed:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        if fsdp:
            return self._prepare_fsdp(teacher)
        return self.accelerator.prepare_model(teacher.to(self.accelerator.device), evaluation_mode=True)

    def _prepare_fsdp(self, teacher: PreTrainedModel) -> torch.nn.Module:
        """Shard the teacher under FSDP2 as accelerate shards a model: each decoder layer is a group (gathered for
        its own forward only), the final norm and LM head (with the embeddings when tied) one group that stays
        gathered after a forward (``reshard_after_forward=False``: the LM head runs again in the backward of the
        chunked KD, after the teacher's forward is over), the root last. TRL's `prepare_fsdp` (one root group,
        resharded after every forward) would leave the head sharded when the KD needs it. FSDP1: TRL's wrapping."""
        from trl.models.utils import prepare_fsdp

        plugin = self.accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) != 2:
            return prepare_fsdp(teacher, self.accelerator)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {
            "reshard_after_forward": plugin.reshard_after_forward,
            "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        }
        if plugin.cpu_offload is not None:
            kwargs["offload_policy"] = plugin.cpu_offload
        mesh = getattr(self.accelerator, "torch_device_mesh", None)
        if mesh is not None:
            kwargs["mesh"] = mesh[tuple(self.accelerator.parallelism_config.fsdp_dim_names)]
        backbone = backbone_of(teacher)
        for layer in decoder_layers(backbone):
            fully_shard(layer, **kwargs)
        embed, head = teacher.get_input_embeddings(), teacher.get_output_embeddings()
        tied = embed is not None and head is not None and embed.weight is head.weight
        if embed is not None and not tied:
            fully_shard(embed, **kwargs)
        norm = next((getattr(backbone, n) for n in ("norm", "final_layernorm", "ln_f") if hasattr(backbone, n)), None)
        tail = [m for m in (norm, embed if tied else None, head) if m is not None]
        if tail:
            fully_shard(tail, **{**kwargs, "reshard_after_forward": False})
        fully_shard(teacher, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
        teacher.eval()
        return teacher

    @contextmanager
    def _teacher_module(self):
        """The teacher, ready for a no-grad forward: under LoRA, the policy with adapters disabled and in eval mode
        (no dropout, no gradient checkpointing), restored afterwards. An FSDP2 teacher is yielded as the sharded
        root (not unwrapped): it must be called through its root."""
        if not self.teacher_is_disabled_adapters:
            yield self.teacher if is_fsdp2_module(self.teacher) else self.accelerator.unwrap_model(self.teacher)
            return
        model = self.teacher
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                yield model
        finally:
            model.train(was_training)

    def logits_head(self, teacher: bool = False):
        """``[n, H] -> [n, V]``: the LM head of the student (or teacher) then that model's own logit post-processing
        (soft-capping, scaling). The teacher's head under LoRA is the head's frozen base layer, so it stays
        adapter-free outside `_teacher_module` too (the head runs again in backward, under activation
        checkpointing)."""
        model = self.accelerator.unwrap_model(self.teacher if teacher else self.model)
        head = model.get_output_embeddings()
        if teacher and self.teacher_is_disabled_adapters and hasattr(head, "get_base_layer"):
            head = head.get_base_layer()
        config = model.config

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            return postprocess_logits(config, head(hidden.to(head.weight.dtype)))

        return logits

    @torch.no_grad()
    def teacher_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The teacher's final hidden states ``[B, L, H]`` and, if ``layers``, every decoder layer's output.

        An FSDP2 teacher runs through its root module (whose pre-forward hook gathers the shards) with
        ``logits_to_keep=1``, the backbone's output taken by a hook: calling the backbone directly would skip the
        root's gathering. Otherwise the backbone alone runs (no logits at all)."""
        with self._teacher_module() as teacher:
            backbone = backbone_of(teacher)
            captured: dict[int, torch.Tensor] = {}
            with capture_layer_outputs(backbone, captured) if layers else nullcontext():
                if is_fsdp2_module(teacher):
                    out: dict[str, Any] = {}

                    def keep(module, args, output):
                        out["hidden"] = output.last_hidden_state

                    handle = backbone.register_forward_hook(keep)
                    try:
                        teacher(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
                    finally:
                        handle.remove()
                    hidden = out["hidden"]
                else:
                    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                    hidden = hidden.last_hidden_state
        return hidden, [captured[i] for i in sorted(captured)] if layers else None

    @torch.no_grad()
    def teacher_prediction_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int
    ) -> torch.Tensor:
        """The teacher's final hidden states ``[B, C, H]`` at the positions that predict the completion
        ``input_ids[:, prompt_length:]`` (``C`` tokens): the last prompt position and every completion position but
        the last.

        A GRPO micro-batch holds each prompt ``num_generations`` times. Each distinct prompt runs through the
        teacher once (`grpo_prune.prefix.prefill_distinct`), and its key/value cache serves the completions of its
        rows: the quickstart's 8 completions of 32 tokens after an 87-token prompt cost the teacher 87 + 8 x 31
        tokens instead of 8 x 119. A batch whose prompts all differ, and an FSDP2 teacher (called through its root,
        see `teacher_hidden`), take the whole sequence in one pass.
        """
        n_tokens = input_ids.size(1) - prompt_length
        shared = None
        if not is_fsdp2_module(self.teacher):
            with self._teacher_module() as teacher:
                backbone = backbone_of(teacher)
                shared = prefill_distinct(backbone, input_ids, attention_mask, prompt_length)
                if shared is not None and n_tokens > 1:
                    tail = backbone(
                        input_ids=input_ids[:, prompt_length:-1],
                        attention_mask=attention_mask[:, :-1],
                        cache=shared[0].cache,
                        use_cache=True,
                    )
        if shared is None:
            hidden, _ = self.teacher_hidden(input_ids, attention_mask, layers=False)
            return hidden[:, -n_tokens - 1 : -1]
        head, rows = shared
        last_prompt = head.last_hidden_state[rows, -1:]
        return last_prompt if n_tokens == 1 else torch.cat([last_prompt, tail.last_hidden_state], dim=1)

    @torch.no_grad()
    def teacher_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Teacher logits ``[B, n_tokens, V]`` predicting the last ``n_tokens`` tokens of ``input_ids`` (post-processed
        as the teacher's forward does). Materialises the logits: for inspection; the loss uses chunks."""
        hidden, _ = self.teacher_hidden(input_ids, attention_mask, layers=False)
        return self.logits_head(teacher=True)(hidden[:, -n_tokens - 1 : -1])

    # ------------------------------------------------------------------------------------------------ the student
    @contextmanager
    def capture_student(self, layers: bool = False):
        """Keep the student's final hidden states (and, if ``layers``, each decoder layer's output) from the policy
        forward that TRL runs inside `_compute_loss`; yields the `StudentCapture` they land in."""
        captured = StudentCapture()

        def hook(module, args, output):
            captured.hidden = output.last_hidden_state

        handle = self._student_backbone.register_forward_hook(hook)
        try:
            with capture_layer_outputs(self._student_backbone, captured.layers) if layers else nullcontext():
                yield captured
        finally:
            handle.remove()

    # ---------------------------------------------------------------------------------------------------- terms
    def loss(self, inputs: dict[str, Any], captured: StudentCapture, train: bool) -> tuple[Any, dict[str, Any]]:
        """The distillation part of one micro-batch's loss, before division by the accumulation steps.

        Args:
            inputs: TRL's micro-batch (prompt/completion ids and masks, optional tool mask).
            captured: the student's forward over it (`capture_student`).
            train: training mode (text distillation runs in training only).

        Returns:
            ``(loss, metrics)``: the weighted sum of the terms that are on (a tensor, or 0.0 when none is), and each
            term's unweighted value under its metric name (``distill/loss``, ``distill/hidden_loss``,
            ``distill/text_loss``, ``distill/text_hidden_loss``).
        """
        args = self.args
        if captured.hidden is None:
            raise RuntimeError("the student's hidden states were not captured; the model forward is not a decoder")
        total: Any = 0.0
        metrics: dict[str, torch.Tensor] = {}
        if args.distill_coef > 0 or args.distill_hidden_coef > 0:
            completion_ids = inputs["completion_ids"]
            n_tokens = completion_ids.size(1)
            mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"]
            input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            # Position t predicts token t + 1: the completion is predicted from the positions just before it, and
            # the hidden-state term is taken at the same positions.
            positions = slice(-n_tokens - 1, -1)
            kd, hidden_term = self.terms(
                input_ids,
                attention_mask,
                mask,
                positions,
                captured.hidden,
                captured.layer_list(),
                args.distill_coef > 0,
                prompt_length=inputs["prompt_ids"].size(1),
            )
            if kd is not None:
                metrics["distill/loss"] = kd
                total = total + args.distill_coef * kd
            if hidden_term is not None:
                metrics["distill/hidden_loss"] = hidden_term
                total = total + args.distill_hidden_coef * hidden_term
        if self.text_sampler is not None and train:
            kd, hidden_term = self.text_terms()
            metrics["distill/text_loss"] = kd
            total = total + args.distill_text_coef * kd
            if hidden_term is not None:
                metrics["distill/text_hidden_loss"] = hidden_term
                total = total + args.distill_hidden_coef * hidden_term
        return total, metrics

    def terms(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor,
        positions: slice,
        student_hidden: torch.Tensor,
        student_layers: list[torch.Tensor],
        logits_term: bool,
        prompt_length: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logit KD and the hidden-state term (each None when off) between the student's captured forward over
        ``input_ids`` ``[B, L]`` and the teacher's, at ``positions`` of the sequence, over the tokens ``mask``
        (``[B, len(positions)]``) keeps. With ``prompt_length`` (``positions`` then predict the completion after
        it) and the hidden-state term off, the teacher runs each distinct prompt once
        (`teacher_prediction_hidden`)."""
        args = self.args
        want_layers = args.distill_hidden_coef > 0
        if prompt_length is not None and not want_layers:
            teacher_at, teacher_layers = self.teacher_prediction_hidden(input_ids, attention_mask, prompt_length), []
        else:
            teacher_hidden, teacher_layers = self.teacher_hidden(input_ids, attention_mask, layers=want_layers)
            teacher_at = teacher_hidden[:, positions]
        kd = None
        if logits_term:
            kd = chunked_distillation_loss(
                student_hidden[:, positions],
                teacher_at,
                self.logits_head(),
                self.logits_head(teacher=True),
                mask,
                divergence=args.distill_loss,
                temperature=args.distill_temperature,
                jsd_beta=args.distill_jsd_beta,
                chunk_size=args.distill_chunk_size,
            )
        hidden_term = None
        if want_layers:
            if len(student_layers) != len(teacher_layers):
                raise RuntimeError(
                    f"the hidden-state term needs the student's and teacher's decoder layers paired; captured "
                    f"{len(student_layers)} and {len(teacher_layers)}"
                )
            hidden_term = hidden_state_loss(
                [h[:, positions] for h in student_layers], [h[:, positions] for h in teacher_layers], mask
            )
        return kd, hidden_term

    def text_terms(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(KD, L_hidden or None)`` on the next batch of text windows, every position scored. One extra student
        forward (with gradient) and one teacher forward."""
        input_ids = self.text_sampler.next_batch().to(self.accelerator.device)
        attention_mask = torch.ones_like(input_ids)
        want_layers = self.args.distill_hidden_coef > 0
        captured: dict[int, torch.Tensor] = {}
        # The backbone only: the student's full [B, T, V] logits are never needed, only chunks of them.
        with capture_layer_outputs(self._student_backbone, captured) if want_layers else nullcontext():
            out = self._student_backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        student_layers = [captured[i] for i in sorted(captured)]
        kd, hidden_term = self.terms(
            input_ids, attention_mask, attention_mask, slice(None), out.last_hidden_state, student_layers, True
        )
        return kd, hidden_term
