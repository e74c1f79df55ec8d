"""Training arguments shared by the scripts' short GRPO runs on the embedded model (`bench_overhead.py`,
`bench_quality.py`, `measure_movement_signal.py`): one prompt group per step, constant learning rate, no weight
decay or KL term, no checkpoints, no trackers, fp32, seed 0 unless given. Spread into a `GRPOConfig` or `MamaGRPOConfig`."""

from __future__ import annotations

from typing import Any


def short_run_fields(
    output_dir: str,
    steps: int,
    completions: int,
    tokens: int,
    learning_rate: float = 1e-5,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=completions,
        num_generations=completions,
        max_completion_length=tokens,
        learning_rate=learning_rate,
        temperature=temperature,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        activation_checkpointing=False,  # TRL defaults it on; `gradient_checkpointing` is its deprecated alias
        bf16=False,
        seed=seed,
        disable_tqdm=True,
    )
