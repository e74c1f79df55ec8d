"""`MamaGRPOConfig`: TRL's `GRPOConfig` plus every pruning and distillation field of MAMA pruning."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from trl import GRPOConfig

from grpo_prune.distill import DIVERGENCES
from grpo_prune.pruning.oneshot import ONESHOT_SCORERS
from grpo_prune.pruning.pruner import PruningSettings
from grpo_prune.pruning.settings import ALLOCATIONS

#: `PruningSettings` field -> the `MamaGRPOConfig` (YAML / flag) field a user writes (as `pruning_settings` maps
#: them). The engine's ValueErrors name the internal field; `MamaGRPOConfig` rewrites them with
#: :func:`config_field_names` so users see their own names. A new setting needs its entry here.
SETTINGS_TO_CONFIG: dict[str, str] = {
    "target_sparsity": "prune_target_sparsity",
    "granularity": "prune_granularity",
    "n_m": "prune_n_m",
    "scorer": "prune_scorer",
    "alpha": "mama_alpha",
    "statistic": "mama_statistic",  # settings of the split pruner (main), harmless before it
    "min_statistic_updates": "mama_min_updates",
    "normalization": "mama_normalization",
    "schedule": "prune_schedule",
    "initial_sparsity": "prune_initial_sparsity",
    "start_step": "prune_start_step",
    "end_step": "prune_end_step",
    "every": "prune_every",
    "targets": "prune_targets",
    "comparison": "prune_comparison",
    "allocation": "prune_allocation",
    "structured_units": "prune_structured_units",
    "compensate": "prune_compensate",
    "seed": "seed",
}
# An internal name as the engine writes it: in backticks (`n_m`), before "=" (n_m='2:4'), or opening the message
# ("n_m must be ...").
_INTERNAL_NAME = re.compile(
    r"(?<![\w.])(" + "|".join(sorted(SETTINGS_TO_CONFIG, key=len, reverse=True)) + r")(?=`|=)"
    r"|^(" + "|".join(SETTINGS_TO_CONFIG) + r")(?= must\b)"
)


#: Prompt dataset whose train prompts the dense student answers for a self-generated `prune_calibration` (as for
#: `distill_dataset: self`, and `grpo-prune oneshot --calibration-task`'s default).
ONESHOT_START_TASK = "arithmetic"

#: How the one-shot start's settings (`MamaGRPOConfig.oneshot_start_settings`) name their own fields.
ONESHOT_START_TO_CONFIG: dict[str, str] = {
    **SETTINGS_TO_CONFIG,
    "target_sparsity": "prune_init_sparsity",
    "scorer": "prune_init_scorer",
}


def config_field_names(message: str, names: dict[str, str] = SETTINGS_TO_CONFIG) -> str:
    """Rewrite the `PruningSettings` field names in an engine error message as the config fields users write
    (``names``: internal -> config field; by default the training pruner's, `SETTINGS_TO_CONFIG`)."""
    return _INTERNAL_NAME.sub(lambda m: names[m.group(1) or m.group(2)], message)


@dataclass
class MamaGRPOConfig(GRPOConfig):
    r"""
    Configuration of [`MamaGRPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the fields below. All of them are
    validated in `__post_init__`, so a bad YAML fails before any model is loaded.

    Unlike TRL, `bf16` left unset means bf16 only where the device supports it (fp32 on a CPU-only machine), and a
    machine with no accelerator sets `use_cpu`, so that `torchrun` processes on CPUs form a real DDP group (gloo).

    Parameters:
        > Parameters that control what is pruned

        prune_target_sparsity (`float`, defaults to `0.5`):
            Fraction of the targeted weights (or structural units) pruned at the end of the schedule, in `[0, 1)`.
            `0` disables pruning.
        prune_granularity (`str`, defaults to `"unstructured"`):
            `"unstructured"`, `"n:m"` (see `prune_n_m`) or `"structured"` (see `prune_structured_units`).
        prune_n_m (`str`, defaults to `"2:4"`):
            N:M pattern for `prune_granularity="n:m"`: N weights kept in every M consecutive inputs.
        prune_structured_units (`str`, defaults to `"mlp"`):
            Units removed by structured pruning: `"mlp"` (MLP intermediate neurons), `"heads"` (attention heads,
            GQA-aware) or `"mlp+heads"`.
        prune_targets (`list[str]`, *optional*):
            Regular expressions (searched in module names) selecting the `nn.Linear` layers to prune. Default: every
            linear layer inside the decoder layers; embeddings, `lm_head` and norms are never pruned.
        prune_comparison (`str`, defaults to `"layer"`):
            Where scores compete: `"layer"` (exact sparsity in every matrix), `"row"` (every output row, as Wanda)
            or `"global"` (one ranking over all targeted layers).
        prune_allocation (`str`, defaults to `"uniform"`):
            How the sparsity spreads over the decoder layers (unstructured, `prune_comparison="layer"`), one of
            `grpo_prune.pruning.settings.ALLOCATIONS`: `"uniform"` (every matrix at the target), `"owl"`
            (outlier-weighted, Yin et al. 2023: layers with more score outliers are pruned less; `prune_scorer`
            `wanda` or `magnitude`) or `"reward"` (layers where the reward statistic has more mass are pruned less;
            `prune_scorer` `movement`, or `mama` with `mama_alpha` > 0); each layer within a bound of the target,
            the global count exact. The one-shot start (`prune_init_scorer`) allocates alike, except under
            `"reward"` (no reward statistic exists before training): it starts uniform, the events allocate.

        > Parameters that control the MAMA score

        prune_scorer (`str`, defaults to `"mama"`):
            `"mama"`, or a baseline sharing the same machinery: `"magnitude"`, `"wanda"`, `"movement"`, `"random"`;
            or `"sparsegpt"`: at each event, OBS reconstruction of the kept weights from the Gram matrices of the
            layers' inputs seen in training (unstructured, or N:M with the whole pattern at the first event; `4 * in_features^2` bytes per distinct layer input,
            e.g. 402 MB on SmolLM2-135M; not under FSDP2). Its one-shot form followed by `prune_init_masks` is the
            cheaper route.
        mama_alpha (`float`, defaults to `0.0`):
            Weight of reward-weighted movement in the MAMA score (`0`: pretrained term only, `1`: movement only).
            `0` by measurement on SmolLM2-135M: at 25% sparsity one-shot, alpha 0.1 gives 2.37x the dense perplexity
            against 1.09x at alpha 0; in a GRPO run, alpha 0.1 took the distillation loss from 0.006 to 5.5 nats per
            token at the first prune event (24%), alpha 0 to 0.35 at 50%. Pruned during training (3 seeds, 16 GRPO
            steps to 50% unstructured, results/frontier), alpha 0.2 with `abs` gave 1.99x the dense held-out
            perplexity against 2.11x at 0, lower on every seed, with the task within noise and about 45% more CPU
            per step: the shipped configs that prune unstructured during training set 0.2; the default stays 0 (no
            statistic to track, and FSDP2 with distillation needs 0). The statistic is accumulated only when
            alpha > 0.
        mama_statistic (`str`, defaults to `"abs"`):
            Form of the reward-driven statistic, accumulated from the gradient `g` of TRL's GRPO loss alone (never
            the distillation term; steps whose advantages are all zero add nothing): `"signed"` sums `-(g * W)`
            (movement, the paper's indicator), `"abs"` sums `|g * W|` (PLATON-like), `"squared"` sums `(g * W)^2`
            (empirical Fisher). `"abs"` by measurement (`scripts/measure_movement_signal.py`, 12 GRPO steps of 8
            completions on SmolLM2-135M): the per-layer split-half Spearman of two disjoint halves of the rollouts
            is 0.83 (abs), 0.82 (squared), 0.01 (signed) on the dense model and 0.49, 0.49, 0.05 at 50% sparsity.
            Used by `mama` when `mama_alpha > 0` and by `movement`.
        mama_min_updates (`int`, defaults to `4`):
            Optimizer steps with a reward signal needed before the statistic is mixed in. Below it, or while the
            statistic is all zero, the pretrained term decides alone; the event records `statistic_mixed: false`
            and logs `prune/statistic_mixed`.
        mama_normalization (`str`, defaults to `"rank"`):
            How indicators are made comparable within a layer: `"rank"` (percentile) or `"zscore"`.
        prune_compensate (`bool`, defaults to `False`):
            Fold the expected contribution of pruned inputs into the output bias ("move").

        > Parameters that control the schedule

        prune_schedule (`str`, defaults to `"cubic"`):
            `"cubic"`, `"linear"` or `"oneshot"`.
        prune_initial_sparsity (`float`, defaults to `0.0`):
            Sparsity of the first prune event.
        prune_start_step (`int`, defaults to `0`):
            Optimizer step of the first prune event.
        prune_end_step (`int`, *optional*):
            Optimizer step of the last prune event; the sparsity is held afterwards while training recovers. Default:
            half of the run's `max_steps`.
        prune_every (`int`, defaults to `1`):
            Optimizer steps between prune events.
        prune_init_masks (`str`, *optional*):
            Start from these masks instead of dense: a masked export (a folder holding `pruning_masks.safetensors`,
            as `grpo-prune oneshot` or `export_pruned` write it) or that file. When the model is that export itself
            (e.g. sparsegpt's reconstructed weights), name the dense model in `teacher_model_name_or_path`. The weights are zeroed where the masks
            say so before the first step; schedule events only prune further, so with `prune_target_sparsity` equal
            to the masks' sparsity they are held while training recovers (the one-shot-then-recover recipe, e.g.
            from `sparsegpt`). `unstructured` and `n:m` only: a structured one-shot model is trained as its
            physically smaller export, with no masks.
        prune_init_scorer (`str`, *optional*):
            Start from a one-shot prune made inside this run instead of dense: at the start of `train()` the
            student is pruned to `prune_init_sparsity` with this scorer (one of `grpo-prune oneshot`'s: `sparsegpt`,
            `wanda`, `magnitude`, `mama`, `movement`, `random`) on `prune_calibration`, then the pruner starts from
            those masks as with `prune_init_masks` (exclusive with it). The same code as `grpo-prune oneshot`
            (`grpo_prune.oneshot_start.prune_on_calibration`); the dense model stays the teacher and `|W0|` (the
            teacher built from the student's weights is built before the prune) and the self-generated calibration
            samples come from the dense student. One process only (multi-process runs: `grpo-prune oneshot`, then
            `prune_init_masks`); a resumed run takes the masks from its checkpoint and does not prune again. The CPU
            time and the sparsity reached are recorded under `oneshot_start` in `pruning_report.json`. `unstructured`
            and `n:m` only. `None` starts dense.
        prune_init_sparsity (`float`, *optional*):
            Sparsity of the one-shot start, in `(0, prune_target_sparsity]`. Default: `prune_target_sparsity` (the
            schedule's events then hold the masks). Below the target, the events prune further from there with
            `prune_scorer` (e.g. a `sparsegpt` start at 35%, then `mama` events to 50%). Under `n:m` it must equal the
            target.
        prune_calibration (`str`, defaults to `"self"`):
            Calibration text of the one-shot start, as `grpo-prune oneshot --calibration`: the dense student's own
            samples (`"self"`: half its answers to the `arithmetic` train prompts, half its continuations of neutral
            sentence openings; `"self:task"`, `"self:open"`; sampled with the run's `seed` before pruning and cached
            on disk),
            `"python_docs"` (built in), `"mix"` (half each), or a `.txt` / `.jsonl` (`"text"` field) file.
        prune_calibration_windows (`int`, defaults to `128`):
            Windows of calibration tokens of the one-shot start.
        prune_calibration_length (`int`, defaults to `256`):
            Tokens per calibration window of the one-shot start.
        prune_calibration_seed (`int`, *optional*):
            Seed of the self-generated calibration samples. Default: the run's `seed`. Fix it to give runs with
            different seeds the same start and masks, so that their models can be averaged (`grpo-prune soup`).
        prune_calibration_task_share (`float`, defaults to `0.5`):
            Share of a `"self"` calibration's tokens that are the student's answers to the task's train prompts (the
            rest continue neutral openings); `"mix"` applies it to its self-generated half, other sources refuse a
            value other than 0.5. More of the task keeps more of it and costs held-out perplexity: at 50%, 0.875
            then 32 GRPO steps kept 78 / 101 / 77% of dense arithmetic (mean of 4 seeds; averaged with
            `grpo-prune soup`, 3 seeds kept 102 / 125 / 104%) at 1.78x perplexity, 0.5 73 / 81 / 144% at 1.58x
            (results/frontier, `recipe-taskcal-cool@32` against `recipe-cool@32`).
        reward_window (`int`, defaults to `4`):
            Number of generation batches in the rolling mean reward recorded before and after each prune event.
        reward_guard_tolerance (`float`, *optional*):
            If set, hold the schedule while the rolling reward is below its pre-event level by more than this
            fraction of that level's magnitude. `None` disables the guard (rewards are still recorded).

        > Parameters that control distillation from the dense teacher

        distill_coef (`float`, defaults to `1.0`):
            Weight of the logit divergence on the rollouts' completion tokens, added to the GRPO loss. `0` disables it
            (and the teacher, unless the hidden-state or text term needs it).
        distill_loss (`str`, defaults to `"forward_kl"`):
            Per-token divergence: `"forward_kl"` (KL(teacher || student)), `"reverse_kl"` (KL(student || teacher)) or
            `"jsd"` (generalised Jensen-Shannon with `distill_jsd_beta`).
        distill_temperature (`float`, defaults to `1.0`):
            Softmax temperature of both distributions; the loss is multiplied by its square.
        distill_jsd_beta (`float`, defaults to `0.5`):
            Mixing weight of the generalised JSD.
        teacher_model_name_or_path (`str`, *optional*):
            Teacher model. Default: the student's own dense weights at the start of training (TRL's reference model
            is reused when `beta > 0`; under LoRA, the base model with the adapters disabled, which costs no memory).
            `sync_ref_model` cannot be combined with a reference-model teacher (it would drift toward the student):
            name a teacher here, or leave `sync_ref_model` off.
        distill_hidden_coef (`float`, defaults to `0.0`):
            Weight of the hidden-state term (SquareHead, Kurtic et al. 2023): per decoder layer, the MSE between
            student and teacher layer outputs divided by the teacher's mean square, averaged over layers, on the same
            tokens as the logit divergence (rollout completions, and the text windows when `distill_dataset` is
            set). `0` disables it.
        distill_chunk_size (`int`, defaults to `128`):
            Tokens per chunk of the logit divergence: only one chunk's `[tokens, vocabulary]` logits exist at a time.
        distill_dataset (`str`, *optional*):
            Plain text distilled beside the rollouts, so general ability is kept while GRPO trains the task: a local
            `.txt` file, a `.jsonl` file with a `"text"` field, a built-in offline text (`"python_docs"`: the
            stdlib's Python documentation; not an evaluation set), or the frozen teacher's own samples: `"self"`
            (half its answers to the task's train prompts, half its continuations of neutral sentence openings),
            `"self:task"` or `"self:open"`, 32k tokens made once before training and cached on disk
            (`grpo_prune.data.self_generated_stream`; about 4 CPU-minutes on SmolLM2-135M, one thread). `None`
            disables text distillation.
        distill_text_coef (`float`, defaults to `1.0`):
            Weight of the text distillation term (logit divergence on every position of the windows).
        distill_text_batch_size (`int`, defaults to `2`):
            Text windows distilled per loss computation (per micro-batch, scaled by gradient accumulation).
        distill_text_length (`int`, defaults to `128`):
            Tokens per text window.
    """

    prune_target_sparsity: float = field(
        default=0.5,
        metadata={"help": "Fraction of the targeted weights (or units) pruned at the end of the schedule, in [0, 1)."},
    )
    prune_granularity: str = field(
        default="unstructured",
        metadata={"help": "What a unit is.", "choices": ["unstructured", "n:m", "structured"]},
    )
    prune_n_m: str = field(
        default="2:4", metadata={"help": "N:M pattern: N weights kept in every M consecutive inputs, e.g. '2:4'."}
    )
    prune_structured_units: str = field(
        default="mlp",
        metadata={
            "help": "Structured units: MLP neurons, attention heads, or both.",
            "choices": ["mlp", "heads", "mlp+heads"],
        },
    )
    prune_targets: list[str] | None = field(
        default=None,
        metadata={
            "help": "Regexes selecting the linear layers to prune. Default: every linear in the decoder layers."
        },
    )
    prune_comparison: str = field(
        default="layer",
        metadata={"help": "Where scores compete.", "choices": ["layer", "row", "global"]},
    )
    prune_allocation: str = field(
        default="uniform",
        metadata={"help": "How the sparsity spreads over decoder layers.", "choices": list(ALLOCATIONS)},
    )
    prune_scorer: str = field(
        default="mama",
        metadata={"help": "Scorer.", "choices": ["mama", "magnitude", "wanda", "movement", "random", "sparsegpt"]},
    )
    mama_alpha: float = field(
        default=0.0, metadata={"help": "Weight of reward-weighted movement in the MAMA score, in [0, 1]."}
    )
    mama_statistic: str = field(
        default="abs",
        metadata={
            "help": "Reward-driven statistic, from the gradient g of the GRPO (reward) term only: 'signed' sums "
            "-(g*W) (movement), 'abs' sums |g*W| (PLATON-like), 'squared' sums (g*W)^2 (empirical Fisher).",
            "choices": ["signed", "abs", "squared"],
        },
    )
    mama_min_updates: int = field(
        default=4,
        metadata={
            "help": "Optimizer steps with a reward signal (a non-zero advantage) before the statistic is mixed into "
            "the MAMA score; until then the pretrained term decides alone."
        },
    )
    mama_normalization: str = field(
        default="rank",
        metadata={"help": "Per-layer normalisation of the indicators.", "choices": ["rank", "zscore"]},
    )
    prune_compensate: bool = field(
        default=False, metadata={"help": "Fold the pruned inputs' mean contribution into the output bias."}
    )
    prune_schedule: str = field(
        default="cubic", metadata={"help": "Sparsity schedule.", "choices": ["cubic", "linear", "oneshot"]}
    )
    prune_initial_sparsity: float = field(default=0.0, metadata={"help": "Sparsity of the first prune event."})
    prune_start_step: int = field(default=0, metadata={"help": "Optimizer step of the first prune event."})
    prune_end_step: int | None = field(
        default=None,
        metadata={"help": "Optimizer step of the last prune event. Default: half of max_steps."},
    )
    prune_every: int = field(default=1, metadata={"help": "Optimizer steps between prune events."})
    prune_init_masks: str | None = field(
        default=None,
        metadata={
            "help": "Masks to start from (a masked export folder, or its pruning_masks.safetensors), e.g. a one-shot "
            "prune's; later events only prune further. None: start dense."
        },
    )
    prune_init_scorer: str | None = field(
        default=None,
        metadata={
            "help": "Start from a one-shot prune made at the start of training with this scorer (as grpo-prune "
            "oneshot), on prune_calibration; the dense model stays the teacher. None (or 'none' on the command "
            "line, to unset a config's): start dense.",
            "choices": [*ONESHOT_SCORERS, "none"],
        },
    )
    prune_init_sparsity: float | None = field(
        default=None,
        metadata={
            "help": "Sparsity of the one-shot start, in (0, prune_target_sparsity]; events prune further from "
            "there. Default: prune_target_sparsity."
        },
    )
    prune_calibration: str = field(
        default="self",
        metadata={
            "help": "Calibration text of the one-shot start: 'self' (the dense student's own samples, cached), "
            "'self:task', 'self:open', 'python_docs', 'mix', or a .txt / .jsonl file."
        },
    )
    prune_calibration_windows: int = field(
        default=128, metadata={"help": "Calibration windows of the one-shot start."}
    )
    prune_calibration_length: int = field(
        default=256, metadata={"help": "Tokens per calibration window of the one-shot start."}
    )
    prune_calibration_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the self-generated calibration samples. Default: the run's seed; fix it to give runs "
            "with different seeds the same start and masks (their models can then be averaged: grpo-prune soup)."
        },
    )
    prune_calibration_task_share: float = field(
        default=0.5,
        metadata={
            "help": "Share of a 'self' calibration's tokens that answer the task's train prompts (the rest continue "
            "neutral openings). More keeps more of the task at some held-out perplexity: 0.875 is the 50% recipe "
            "that keeps the task (results/frontier)."
        },
    )
    reward_window: int = field(
        default=4, metadata={"help": "Generation batches in the rolling reward recorded around prune events."}
    )
    reward_guard_tolerance: float | None = field(
        default=None,
        metadata={"help": "Hold the schedule while the reward is this fraction below its pre-event level. None: off."},
    )
    distill_coef: float = field(
        default=1.0, metadata={"help": "Weight of the logit distillation loss on the rollouts. 0 disables it."}
    )
    distill_loss: str = field(
        default="forward_kl",
        metadata={"help": "Per-token divergence teacher/student.", "choices": list(DIVERGENCES)},
    )
    distill_temperature: float = field(default=1.0, metadata={"help": "Distillation softmax temperature."})
    distill_jsd_beta: float = field(default=0.5, metadata={"help": "Mixing weight of the generalised JSD."})
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher model. Default: the student's dense weights at the start."}
    )
    distill_hidden_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the per-layer hidden-state term (SquareHead, normalised MSE). 0 disables it."},
    )
    distill_chunk_size: int = field(
        default=128, metadata={"help": "Tokens per chunk of the logit divergence (bounds the logits' memory)."}
    )
    distill_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Plain text distilled each step: a .txt file, a .jsonl file with a 'text' field, "
            "'python_docs' (built in), or the teacher's own samples ('self', 'self:task', 'self:open'; made once "
            "and cached). None: off."
        },
    )
    distill_text_coef: float = field(default=1.0, metadata={"help": "Weight of the text distillation term."})
    distill_text_batch_size: int = field(default=2, metadata={"help": "Text windows distilled per step."})
    distill_text_length: int = field(default=128, metadata={"help": "Tokens per text window."})

    def __post_init__(self):
        # Cheap checks first, so a bad config never waits for TrainingArguments' device set-up.
        if self.prune_end_step is not None and self.prune_end_step < self.prune_start_step:
            raise ValueError(
                f"`prune_end_step` ({self.prune_end_step}) must be >= `prune_start_step` ({self.prune_start_step})."
            )
        if self.reward_window < 1:
            raise ValueError(f"`reward_window` must be >= 1, got {self.reward_window}.")
        if self.reward_guard_tolerance is not None and not 0.0 <= self.reward_guard_tolerance < 1.0:
            raise ValueError(f"`reward_guard_tolerance` must be in [0, 1) or None, got {self.reward_guard_tolerance}.")
        if self.distill_coef < 0:
            raise ValueError(f"`distill_coef` must be >= 0, got {self.distill_coef}.")
        if self.distill_loss not in DIVERGENCES:
            raise ValueError(f"`distill_loss` must be one of {sorted(DIVERGENCES)}, got {self.distill_loss!r}.")
        if self.distill_temperature <= 0:
            raise ValueError(f"`distill_temperature` must be > 0, got {self.distill_temperature}.")
        if not 0.0 < self.distill_jsd_beta < 1.0:
            raise ValueError(f"`distill_jsd_beta` must be in (0, 1), got {self.distill_jsd_beta}.")
        for name in ("distill_hidden_coef", "distill_text_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.distill_chunk_size < 1:
            raise ValueError(f"`distill_chunk_size` must be >= 1, got {self.distill_chunk_size}.")
        if self.distill_dataset is not None:
            from grpo_prune.data import validate_text_source

            validate_text_source(self.distill_dataset)
            if self.distill_text_batch_size < 1:
                raise ValueError(f"`distill_text_batch_size` must be >= 1, got {self.distill_text_batch_size}.")
            if self.distill_text_length < 2:
                raise ValueError(f"`distill_text_length` must be >= 2 tokens, got {self.distill_text_length}.")
        if self.sync_ref_model and self.distillation_enabled and self.beta > 0 and not self.teacher_model_name_or_path:
            # The teacher is TRL's reference model here, and syncing would pull it toward the pruned student.
            raise ValueError(
                "`sync_ref_model: true` with distillation and `beta` > 0 would make the teacher (TRL's reference "
                "model, reused as teacher) drift toward the pruned student. Set `teacher_model_name_or_path` (e.g. to "
                "the starting model) for a separate frozen teacher, or set `sync_ref_model: false`."
            )
        if self.fp16 and self.prune_target_sparsity > 0:
            # The pruner reads gradients before accelerate unscales them (inside clipping): loss-scaled and inf
            # values would enter its statistics.
            raise ValueError(
                "`fp16: true` cannot be combined with pruning (`prune_target_sparsity` > 0): the pruner reads the "
                "gradients before the fp16 loss scale is removed. Use `bf16: true` (no loss scaling) or fp32."
            )
        if self.prune_target_sparsity > 0:
            _refuse_deepspeed(self.deepspeed)
        if isinstance(self.prune_targets, str):  # a single pattern from the command line
            self.prune_targets = [self.prune_targets]
        if not 0.0 <= self.prune_target_sparsity < 1.0:  # first: the start's and the masks' checks compare with it
            raise ValueError(f"`prune_target_sparsity` must be a number in [0, 1), got {self.prune_target_sparsity}.")
        self._check_oneshot_start()  # before `prune_init_masks` is read: the two are exclusive
        if self.prune_init_masks is not None:
            from grpo_prune.export import masks_sidecar_granularity

            if self.prune_target_sparsity <= 0:
                raise ValueError("`prune_init_masks` needs pruning on (`prune_target_sparsity` > 0).")
            granularity = masks_sidecar_granularity(self.prune_init_masks)  # ValueError: missing / unreadable
            if granularity != self.prune_granularity or granularity == "structured":
                raise ValueError(
                    f"`prune_init_masks` {self.prune_init_masks!r} holds {granularity} masks, but "
                    f"`prune_granularity` is {self.prune_granularity!r}: starting from masks needs the same "
                    "granularity, 'unstructured' or 'n:m' (a structured one-shot model is trained as its sliced "
                    "export, without masks)."
                )
        if self.prune_target_sparsity > 0 and self.max_steps > 0:  # epochs-only runs are checked when training starts
            start_at_target = (
                self.prune_init_masks is not None or self.prune_init_sparsity == self.prune_target_sparsity
            )
            self.resolve_end_step(self.max_steps, at_target=start_at_target)
        if not self.use_cpu and not _accelerator_available():
            # Without this, accelerate treats `torchrun` CPU processes as independent runs (no gradient sync).
            self.use_cpu = True
        if self.bf16 is None and not self.fp16 and not _bf16_device_available(self.use_cpu):
            # TRL turns bf16 on by default, which transformers rejects on a CPU-only machine; plain fp32 there.
            self.bf16 = False
        if self.prune_target_sparsity > 0:
            # An end step is resolved from max_steps at train time; validate with a placeholder meanwhile.
            try:
                self.pruning_settings().validate()
            except ValueError as err:
                raise ValueError(config_field_names(str(err))) from err
        super().__post_init__()

    def resolve_end_step(self, max_steps: int, *, at_target: bool) -> int:
        """`prune_end_step`, or half of ``max_steps`` when unset. Refused when after the last step while the events
        still have sparsity to add; a start at the target (``at_target``: `prune_init_masks`, or a one-shot start at
        `prune_target_sparsity`) leaves them nothing to do, so there the schedule's end does not matter."""
        end = self.prune_end_step
        if end is None:
            end = max(self.prune_start_step, max_steps // 2)
        if end > max_steps and not at_target:
            raise ValueError(
                f"`prune_end_step` ({end}) is after the last training step ({max_steps}): the target sparsity "
                f"{self.prune_target_sparsity} would never be reached. Lower it or train longer."
            )
        return end

    def _check_oneshot_start(self) -> None:
        """Validate the one-shot start's fields (`prune_init_scorer` and the fields it reads) and resolve
        `prune_init_sparsity`; nothing is loaded."""
        if self.prune_init_scorer == "none":  # a flag can unset what the YAML sets: --prune_init_scorer none
            self.prune_init_scorer = None
        if self.prune_init_scorer is None:
            if self.prune_init_sparsity is not None:
                raise ValueError(
                    f"`prune_init_sparsity` ({self.prune_init_sparsity}) is the sparsity of the one-shot start: set "
                    f"`prune_init_scorer` (one of {', '.join(ONESHOT_SCORERS)}) too, or leave it unset."
                )
            return
        if self.prune_init_scorer not in ONESHOT_SCORERS:
            raise ValueError(
                f"`prune_init_scorer` must be one of {', '.join(ONESHOT_SCORERS)} (or unset), got "
                f"{self.prune_init_scorer!r}."
            )
        if self.prune_init_masks is not None:
            raise ValueError(
                "`prune_init_scorer` and `prune_init_masks` both choose the starting masks: set one of them (the "
                "one-shot start is made in this run; `prune_init_masks` reads a `grpo-prune oneshot` export). With "
                "a config that sets `prune_init_scorer` (e.g. configs/quickstart.yaml), add `--prune_init_scorer none`."
            )
        if self.prune_target_sparsity <= 0:
            raise ValueError("`prune_init_scorer` needs pruning on (`prune_target_sparsity` > 0).")
        if self.prune_granularity == "structured":
            raise ValueError(
                "`prune_init_scorer` needs `prune_granularity` 'unstructured' or 'n:m': a structured one-shot model "
                "is trained as its physically smaller export (`grpo-prune oneshot --granularity structured`), "
                "without masks."
            )
        if self.prune_compensate:
            raise ValueError(
                "`prune_init_scorer` cannot be combined with `prune_compensate: true`: the one-shot start does not "
                "fold its pruned weights into biases. Set `prune_compensate: false`."
            )
        if self.prune_init_sparsity is None:
            self.prune_init_sparsity = self.prune_target_sparsity
        sparsity = self.prune_init_sparsity
        if (
            not isinstance(sparsity, (int, float))
            or isinstance(sparsity, bool)
            or not 0.0 < sparsity <= self.prune_target_sparsity
        ):
            raise ValueError(
                f"`prune_init_sparsity` must be in (0, prune_target_sparsity={self.prune_target_sparsity}], got "
                f"{sparsity!r}: the schedule's events only prune further from the start."
            )
        from grpo_prune.data import validate_calibration_source, validate_dataset_name, validate_task_share

        try:
            kind = validate_calibration_source(self.prune_calibration)
        except ValueError as err:
            raise ValueError(f"`prune_calibration`: {err}") from None
        if kind != "text":
            validate_dataset_name(ONESHOT_START_TASK)
        for name, least in (("prune_calibration_windows", 1), ("prune_calibration_length", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}.")
        seed = self.prune_calibration_seed
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"`prune_calibration_seed` must be None or an int >= 0, got {seed!r}.")
        try:
            validate_task_share(self.prune_calibration_task_share, self.prune_calibration)
        except ValueError as err:
            raise ValueError(f"`prune_calibration_task_share`: {err}") from None
        try:  # the start's own settings (scorer against granularity, comparison, allocation; N:M sparsity)
            PruningSettings(
                **{k: v for k, v in self.oneshot_start_settings().items() if k not in ("sparsity", "scorer")},
                target_sparsity=sparsity,
                scorer=self.prune_init_scorer,
                schedule="oneshot",
            ).validate()
        except ValueError as err:
            raise ValueError(
                f"The one-shot start (`prune_init_scorer`={self.prune_init_scorer!r}, `prune_init_sparsity`="
                f"{sparsity}): {config_field_names(str(err), ONESHOT_START_TO_CONFIG)}"
            ) from err

    def oneshot_start_settings(self) -> dict[str, object]:
        """Keyword arguments of `prune_oneshot` (through `grpo_prune.oneshot_start.prune_on_calibration`) for the
        one-shot start: its scorer and sparsity, and the run's granularity, targets, comparison and allocation
        (`reward` excepted: uniform), so that its masks fit the training pruner's. `mama` weighs its indicators as
        the run does (`mama_alpha`, `mama_normalization`)."""
        settings: dict[str, object] = {
            "scorer": self.prune_init_scorer,
            "sparsity": self.prune_init_sparsity,
            "granularity": self.prune_granularity,
            "n_m": self.prune_n_m,
            "targets": list(self.prune_targets) if self.prune_targets else None,
            "comparison": self.prune_comparison,
            # No reward statistic exists before training: a `reward` allocation is the events' (the start is uniform).
            "allocation": "uniform" if self.prune_allocation == "reward" else self.prune_allocation,
            "seed": self.seed,
        }
        if self.prune_init_scorer == "mama":
            settings.update(alpha=self.mama_alpha, normalization=self.mama_normalization)
        return settings

    @property
    def pruning_enabled(self) -> bool:
        return self.prune_target_sparsity > 0

    @property
    def distillation_enabled(self) -> bool:
        """A teacher is needed: rollout KD, the hidden-state term or text distillation is on."""
        return self.distill_coef > 0 or self.distill_hidden_coef > 0 or self.text_distillation_enabled

    @property
    def text_distillation_enabled(self) -> bool:
        return self.distill_dataset is not None and self.distill_text_coef > 0

    def pruning_settings(self, end_step: int | None = None) -> PruningSettings:
        """The engine's settings for this run; `end_step` overrides `prune_end_step` (resolved from max_steps)."""
        return PruningSettings(
            target_sparsity=self.prune_target_sparsity,
            granularity=self.prune_granularity,
            n_m=self.prune_n_m,
            scorer=self.prune_scorer,
            alpha=self.mama_alpha,
            statistic=self.mama_statistic,
            min_statistic_updates=self.mama_min_updates,
            normalization=self.mama_normalization,
            schedule=self.prune_schedule,
            initial_sparsity=self.prune_initial_sparsity,
            start_step=self.prune_start_step,
            # Unset: a placeholder until the pruning callback resolves it from max_steps when training begins.
            end_step=(self.prune_start_step if self.prune_end_step is None else self.prune_end_step)
            if end_step is None
            else end_step,
            every=self.prune_every,
            targets=list(self.prune_targets) if self.prune_targets else None,
            comparison=self.prune_comparison,
            allocation=self.prune_allocation,
            structured_units=self.prune_structured_units,
            compensate=self.prune_compensate,
            seed=self.seed,
        )


def _refuse_deepspeed(deepspeed: str | dict | None) -> None:
    """Refuse pruning under DeepSpeed (any ZeRO stage) here, before TrainingArguments imports DeepSpeed and long
    before a model is loaded.

    ZeRO-3 partitions every parameter, so the masks (full ``[out, in]`` per layer) would not line up with the local
    partitions; ZeRO-1/2 keep full parameters but shard the optimizer state the masks must zero, and neither could
    be tested here (DeepSpeed does not run on this CPU-only machine), so every stage is refused alike.
    """
    env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")
    if deepspeed is None and not env:
        return
    stage = None
    if isinstance(deepspeed, dict):
        stage = deepspeed.get("zero_optimization", {}).get("stage")
    elif isinstance(deepspeed, str) and os.path.isfile(deepspeed):
        try:
            with open(deepspeed) as f:
                stage = json.load(f).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError, AttributeError):
            stage = None
    where = f"`deepspeed` ({deepspeed!r})" if deepspeed is not None else "ACCELERATE_USE_DEEPSPEED (accelerate config)"
    zero = f"ZeRO-{stage}" if stage is not None else "any ZeRO stage"
    raise ValueError(
        f"Pruning (`prune_target_sparsity` > 0) does not run under DeepSpeed ({zero}, set by {where}): masks and "
        "indicators are not partitioned like DeepSpeed's parameters and optimizer state. For sharded training use "
        "PyTorch FSDP2 (accelerate's FSDP plugin with `fsdp_version: 2`); for unsharded multi-GPU training use "
        "DDP (`torchrun` or `accelerate launch` without a DeepSpeed config)."
    )


def _accelerator_available() -> bool:
    import torch

    return bool(
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    )


def _bf16_device_available(use_cpu: bool) -> bool:
    import torch

    if use_cpu:
        return False
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return hasattr(torch, "xpu") and torch.xpu.is_available()
