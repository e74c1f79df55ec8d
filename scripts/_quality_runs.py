"""bench_quality's runs: one condition measured (the dense model; one-shot; pruned during training; one-shot then
recovered), with its calibration batches, its training run and its in-memory evaluation, as a record to cache.

A sibling module of ``scripts/bench_quality.py`` (the entry point, which re-exports these names); see its docstring.
"""

from __future__ import annotations

import gc
import re
import statistics
import tempfile
import time
from datetime import datetime, timezone
from typing import Any

from _quality_plan import EVAL_TASKS, MODEL, Budget, Calibration, Condition, Plan, Scorer, Setting
from _short_run import short_run_fields

# --------------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------------


def _windows(stream: list[int], n: int, length: int, what: str) -> list[list[int]]:
    """``n`` windows of ``length`` tokens spread evenly over ``stream``."""
    if len(stream) < n * length:
        raise ValueError(f"{what} gives {len(stream)} tokens, fewer than {n} windows x {length}")
    stride = len(stream) // n
    return [stream[i * stride : i * stride + length] for i in range(n)]


def _text_stream(tokenizer: Any) -> list[int]:
    from grpo_prune.data import text_token_stream

    return text_token_stream(tokenizer, "python_docs")


_QUESTION = re.compile(r"What is (.+?)\?\s*$")


def _arithmetic_stream(tokenizer: Any, tokens_needed: int) -> list[int]:
    """Train conversations (prompt + gold answer as the system prompt asks for it), rendered with the chat template."""
    from grpo_prune.data import load_prompt_dataset

    train = load_prompt_dataset("arithmetic", "train")
    stream: list[int] = []
    for row in train:
        if len(stream) >= tokens_needed:
            break
        match = _QUESTION.search(row["prompt"][-1]["content"])
        answer = row["answer"]
        reply = f"{match.group(1)} = {answer}. The answer is {answer}." if match else f"The answer is {answer}."
        text = tokenizer.apply_chat_template(
            list(row["prompt"]) + [{"role": "assistant", "content": reply}], tokenize=False
        )
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
    return stream


def calibration_batches(tokenizer: Any, calibration: Calibration, model: Any = None) -> list[Any]:
    """Input-id batches ``[n, length]`` (one per source) for ``prune_oneshot``. ``self`` and ``mix`` are
    :func:`grpo_prune.data.calibration_windows`' sources (the dense ``model``'s own samples, cached; ``mix`` half
    ``python_docs``), taken before pruning, in batches of 8 windows."""
    import torch

    n, length = calibration.windows, calibration.length
    if calibration.source in ("self", "mix"):
        from grpo_prune.data import calibration_windows

        if model is None:
            raise ValueError(f"calibration {calibration.source!r} samples the dense model: pass model=")
        return list(calibration_windows(tokenizer, calibration.source, n, length, model=model).split(8))
    if calibration.source == "mixed":
        counts = {"text": n - n // 2, "arithmetic": n // 2}
    else:
        counts = {calibration.source: n}
    batches = []
    for source, count in counts.items():
        if source == "text":
            windows = _windows(_text_stream(tokenizer), count, length, "pydoc_data.topics")
        else:
            # Consecutive windows: the first conversations of the seeded order, enough to fill them.
            stream = _arithmetic_stream(tokenizer, count * length)
            windows = [stream[i * length : (i + 1) * length] for i in range(count)]
            if len(windows[-1]) < length:
                raise ValueError(f"the arithmetic train split gives fewer than {count} windows x {length} tokens")
        batches.append(torch.tensor(windows, dtype=torch.long))
    return batches


# --------------------------------------------------------------------------------------------------------------------
# Running one condition
# --------------------------------------------------------------------------------------------------------------------


def _evaluate(model: Any, tokenizer: Any, plan: Plan) -> dict[str, Any]:
    from grpo_prune.evaluate import evaluate_model

    return evaluate_model(
        model, tasks=list(EVAL_TASKS), tokenizer=tokenizer, limits=plan.limits, seed=plan.eval_seed, progress=False
    )


def _load(plan: Plan) -> tuple[Any, Any]:
    import torch

    from grpo_prune.models import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_model(MODEL).to(plan.device), load_tokenizer(MODEL)


def run_dense(plan: Plan) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, tokenizer = _load(plan)
    t_load = time.perf_counter() - t0
    evaluation = _evaluate(model, tokenizer, plan)
    return {"sparsity": 0.0, "eval": evaluation, "seconds": {"load": t_load, "eval": evaluation["seconds"]}}


def _prune_oneshot(model: Any, batches: list[Any], setting: Setting, scorer: Scorer) -> Any:
    """``prune_oneshot`` of ``model`` in place for (setting, scorer); returns its ``PruneReport``."""
    from grpo_prune import prune_oneshot

    overrides: dict[str, Any] = {"alpha": scorer.alpha, "statistic": scorer.statistic} if scorer.name == "mama" else {}
    if scorer.compensate:
        overrides["compensate"] = True
    if setting.granularity == "structured":
        overrides["structured_units"] = setting.structured_units
    return prune_oneshot(
        model,
        sparsity=setting.sparsity,
        granularity=setting.granularity,
        n_m=setting.n_m,
        scorer=scorer.name,
        calibration=batches,
        **overrides,
    )


def run_oneshot(plan: Plan, setting: Setting, scorer: Scorer) -> dict[str, Any]:

    t0 = time.perf_counter()
    model, tokenizer = _load(plan)
    batches = calibration_batches(tokenizer, plan.calibration, model)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = _prune_oneshot(model, batches, setting, scorer)
    t_prune = time.perf_counter() - t0
    evaluation = _evaluate(model, tokenizer, plan)
    del model
    gc.collect()
    return {
        "sparsity": report.global_sparsity,
        "prune_notes": report.notes,
        "eval": evaluation,
        "seconds": {"load": t_load, "prune": t_prune, "eval": evaluation["seconds"]},
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _prompt_tokens(tokenizer: Any, dataset: Any, steps: int) -> int:
    """Prompt tokens of ``steps`` prompt groups as the chat template renders them: the dataset's mean prompt length
    times ``steps`` (the trainer draws the prompts in a seeded random order)."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in dataset["prompt"]]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return round(sum(lengths) / max(1, len(lengths)) * steps)


def _train(
    plan: Plan,
    b: Budget,
    model: Any,
    tokenizer: Any,
    pruning: dict[str, Any],
    teacher: str | None = None,
    init_masks: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One training run of budget ``b`` on ``model`` (in place); returns its record (``train``, ``seconds``)
    and, under ``"trainer_pruner"``, the pruner's sparsity (None without pruning)."""
    from transformers import PrinterCallback, TrainerCallback

    import reward_fns
    from grpo_prune import MamaGRPOConfig, MamaGRPOTrainer
    from grpo_prune.data import load_prompt_dataset

    t0 = time.perf_counter()
    dataset = load_prompt_dataset(b.task, "train", num_samples=b.train_prompts)
    text = {}
    if b.text_windows > 0 and b.text_coef > 0:
        text = dict(
            distill_dataset="python_docs",
            distill_text_coef=b.text_coef,
            distill_text_batch_size=b.text_windows,
            distill_text_length=b.text_length,
        )
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as output_dir:
        args = MamaGRPOConfig(
            **short_run_fields(
                output_dir, b.steps, b.completions, b.tokens, b.learning_rate, b.temperature, seed=b.seed
            ),
            **pruning,
            **text,
            teacher_model_name_or_path=teacher,
            distill_coef=b.distill_coef,
            distill_hidden_coef=b.hidden_coef,
            distill_loss="forward_kl",
            use_cpu=plan.device == "cpu",
            reward_weights=[1.0, 0.0],
        )
        trainer = MamaGRPOTrainer(
            model=model,
            # Partial credit keeps groups informative; exact accuracy is logged beside it (weight 0).
            reward_funcs=[reward_fns.get("math_answer_partial"), reward_fns.get("math_answer")],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)  # one line per condition is printed instead of every log dict
        if init_masks is not None:
            trainer.pruner.start_from_masks(init_masks)
        t_setup = time.perf_counter() - t0

        step_times: list[float] = []

        class StepTimer(TrainerCallback):
            # Added after the pruning callback, so a step's time includes its prune event.
            def on_step_begin(self, args, state, control, **kwargs):
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                step_times.append(time.perf_counter() - self.t0)

        trainer.add_callback(StepTimer())
        t0, cpu0 = time.perf_counter(), time.process_time()
        trainer.train()
        t_train, cpu_train = time.perf_counter() - t0, time.process_time() - cpu0

        history = [e for e in trainer.state.log_history if "reward" in e]
        keys = (
            "step",
            "reward",
            "rewards/math_answer/mean",
            "distill/loss",
            "distill/text_loss",
            "prune/sparsity",
            "frac_reward_zero_std",
            "completions/clipped_ratio",
            "completions/mean_length",
        )
        log = [{k: e[k] for k in keys if k in e} for e in history]
        events = [{k: v for k, v in e.items() if k != "layer_sparsity"} for e in trainer.prune_events]
        sparsity = trainer.pruner.sparsity() if trainer.pruner is not None else None
        # Tokens the student was trained on: prompts + completions of every rollout, and the text windows.
        prompt_tokens = _prompt_tokens(tokenizer, dataset, b.steps) * b.completions
        completion_tokens = sum(e.get("completions/mean_length", 0.0) for e in history) * b.completions
        text_tokens = b.steps * b.text_windows * b.text_length if text else 0
        trained = trainer.accelerator.unwrap_model(trainer.model)
    del trainer
    gc.collect()
    rewards = [e["reward"] for e in log]
    return {
        "model": trained,
        "sparsity": sparsity,
        "train": {
            "step_seconds": step_times,
            "prune_event_seconds": [e["seconds"] for e in events],  # timed by the pruning callback
            "events": events,
            "log": log,
            "tokens": {
                "rollout_prompt": int(prompt_tokens),
                "rollout_completion": int(round(completion_tokens)),
                "text": int(text_tokens),
                "total": int(prompt_tokens + round(completion_tokens) + text_tokens),
            },
            "cpu_seconds": cpu_train,
            "frac_reward_zero_std_median": _median(
                [e["frac_reward_zero_std"] for e in log if "frac_reward_zero_std" in e]
            ),
            "clipped_ratio_median": _median(
                [e["completions/clipped_ratio"] for e in log if "completions/clipped_ratio" in e]
            ),
            "mean_reward_last_quarter": statistics.fmean(rewards[-max(1, len(rewards) // 4) :]) if rewards else None,
        },
        "seconds": {"setup": t_setup, "train": t_train},
    }


def run_trained(plan: Plan, setting: Setting, scorer: Scorer) -> dict[str, Any]:
    b = plan.budget_of("trained")
    t0 = time.perf_counter()
    model, tokenizer = _load(plan)
    t_load = time.perf_counter() - t0
    pruning = dict(
        prune_target_sparsity=setting.sparsity,
        prune_granularity=setting.granularity,
        prune_n_m=setting.n_m,
        prune_structured_units=setting.structured_units,
        prune_scorer=scorer.name,
        mama_alpha=scorer.alpha,
        mama_statistic=scorer.statistic,
        prune_compensate=scorer.compensate,
        prune_schedule="cubic",
        prune_start_step=b.prune_start,
        prune_end_step=b.prune_end,
        prune_every=b.prune_every,
    )
    out = _train(plan, b, model, tokenizer, pruning)
    student = out.pop("model")
    evaluation = _evaluate(student, tokenizer, plan)
    del student, model
    gc.collect()
    out["eval"] = evaluation
    out["seconds"].update(load=t_load, eval=evaluation["seconds"])
    return out


def run_recovered(plan: Plan, setting: Setting, scorer: Scorer) -> dict[str, Any]:
    """The one-shot model of (setting, scorer), trained with its masks held; a structured one as its sliced export
    (physically smaller, no masks). The teacher is the dense model."""

    t0 = time.perf_counter()
    model, tokenizer = _load(plan)
    batches = calibration_batches(tokenizer, plan.calibration, model)
    report = _prune_oneshot(model, batches, setting, scorer)
    t_prune = time.perf_counter() - t0
    sliced_params = None
    with tempfile.TemporaryDirectory(prefix="bench-quality-sliced-") as folder:
        if setting.granularity == "structured":
            from transformers import AutoModelForCausalLM

            from grpo_prune.export import export_pruned

            dense_params = sum(p.numel() for p in model.parameters())
            export_pruned(model, folder, pruner=report, tokenizer=tokenizer, structured=True)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").to(plan.device)
            sliced_params = sum(p.numel() for p in model.parameters()) / dense_params
            pruning: dict[str, Any] = {"prune_target_sparsity": 0.0}
            init_masks = None
        else:
            pruning = dict(
                prune_target_sparsity=setting.sparsity,
                prune_granularity=setting.granularity,
                prune_n_m=setting.n_m,
                prune_scorer="magnitude",  # never asked: the masks already reach the target
            )
            init_masks = report.masks
        out = _train(
            plan, plan.budget_of("recovered"), model, tokenizer, pruning, teacher=MODEL, init_masks=init_masks
        )
    student = out.pop("model")
    evaluation = _evaluate(student, tokenizer, plan)
    del student, model
    gc.collect()
    out["eval"] = evaluation
    if sliced_params is not None:
        out["sparsity"] = report.global_sparsity
        out["sliced_params_fraction"] = sliced_params
    out["seconds"].update(prune=t_prune, eval=evaluation["seconds"])
    return out


def condition_record(plan: Plan, condition: Condition, result: dict[str, Any]) -> dict[str, Any]:
    """The cached record of one condition: what it is (key, mode, setting, scorer, the plan's fingerprint) and
    ``result`` (``sparsity``, ``eval``, ``seconds``, ...)."""
    setting, scorer = condition.setting, condition.scorer
    return {
        "key": condition.key,
        "mode": condition.mode,
        "setting": setting.name if setting else None,
        "family": setting.family if setting else None,
        "target_sparsity": setting.sparsity if setting else 0.0,
        "scorer": scorer.label if scorer else None,
        "fingerprint": plan.fingerprint(condition),
        "device": plan.device,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **result,
    }


def run_condition(plan: Plan, condition: Condition) -> dict[str, Any]:
    """Measure one condition and return its result record (not yet cached)."""
    start = time.perf_counter()
    if condition.mode == "dense":
        result = run_dense(plan)
    elif condition.mode == "oneshot":
        result = run_oneshot(plan, condition.setting, condition.scorer)
    elif condition.mode == "recovered":
        result = run_recovered(plan, condition.setting, condition.scorer)
    else:
        result = run_trained(plan, condition.setting, condition.scorer)
    result["seconds"]["total"] = time.perf_counter() - start
    return condition_record(plan, condition, result)
