"""The 2-byte reward statistic accumulator (float16 data, a power-of-two exponent per row)."""

from __future__ import annotations

import pytest
import torch

from grpo_prune.pruning.compact import RowScaledHalf
from grpo_prune.pruning.scores import rank_correlation as _spearman


def test_tiny_saliencies_keep_their_relative_precision():
    # |g * W| of an LLM is often ~1e-10: below float16's smallest normal number, so a plain float16 sum is zero.
    g = torch.Generator().manual_seed(0)
    steps = [torch.rand(16, 32, generator=g) * 1e-10 * torch.logspace(0, 3, 16)[:, None] for _ in range(50)]
    acc, ref = RowScaledHalf((16, 32)), torch.zeros(16, 32)
    for step in steps:
        acc.add_(step)
        ref += step
    assert not steps[0][0].half().any()  # what float16 alone does to the 1e-10 row
    rel = (acc.value() - ref).abs() / ref
    assert rel.max() < 1e-2 and rel.median() < 1e-3, rel  # 50 requantizations, each within float16's 2**-11
    assert acc.data.dtype == torch.float16 and acc.exponent.dtype == torch.int16
    assert acc.nbytes == 16 * 32 * 2 + 16 * 2


def test_ranking_agrees_with_float32_over_a_long_noisy_run():
    g = torch.Generator().manual_seed(1)
    signal = torch.rand(64, 64, generator=g)
    acc, ref, bf16 = RowScaledHalf((64, 64)), torch.zeros(64, 64), torch.zeros(64, 64, dtype=torch.bfloat16)
    for _ in range(1000):
        step = (signal + torch.randn(64, 64, generator=g)).abs() * 1e-7
        acc.add_(step)
        ref += step
        bf16 += step.bfloat16()
    # Measured: 0.9991 here (0.99996 after 100 steps); a bfloat16 sum stagnates (0.949, entries 28% short).
    assert _spearman(acc.value(), ref) > 0.998
    assert _spearman(bf16.float(), ref) < 0.98


def test_signed_values_zero_rows_and_set_round_trip_exactly():
    acc = RowScaledHalf((3, 4))
    value = torch.tensor([[1e-8, -3e-8, 0.0, 2e-9], [0.0, 0.0, 0.0, 0.0], [5.0, -7.0, 1e4, -1e-3]])
    acc.set_(value)
    torch.testing.assert_close(acc.value(), value, rtol=1e-3, atol=0)
    assert acc.exponent[1] == 0 and not acc.data[1].any() and acc.any()
    # What a checkpoint holds (data, exponent) restores bit-exactly, and requantizing a stored value is a no-op.
    again = RowScaledHalf((3, 4))
    again.set_(acc.value())
    assert torch.equal(again.data, acc.data) and torch.equal(again.exponent, acc.exponent)
    with pytest.raises(ValueError, match="increment shape"):
        acc.add_(torch.zeros(4, 3))


def test_old_float32_statistic_checkpoints_still_load():
    from tiny import tiny_model

    from grpo_prune.pruning.pruner import Pruner, PruningSettings

    pruner = Pruner(tiny_model(), PruningSettings(scorer="mama", alpha=0.5))
    state = {k: v.clone() for k, v in pruner.state_dict().items()}
    name = next(iter(pruner.indicators.statistic))
    old_value = torch.rand(pruner.indicators.statistic[name].shape) * 1e-6
    legacy = {k: v for k, v in state.items() if not k.startswith("movement_exponent/")}
    legacy.update({k: torch.zeros(v.shape) for k, v in legacy.items() if k.startswith("movement/")})
    legacy[f"movement/{name}"] = old_value
    pruner.load_state_dict(legacy)
    torch.testing.assert_close(pruner.movement[name], old_value, rtol=1e-3, atol=0)
