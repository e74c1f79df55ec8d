"""A float32-valued running sum stored in about 2 bytes per entry (for the reward statistic, issue 12).

:class:`RowScaledHalf` holds ``value = data * 2**exponent[row]``: ``data`` in float16 (11 significant bits) and one
power-of-two exponent per row (int16). Every :meth:`~RowScaledHalf.add_` dequantizes the layer, adds the increment
in float32 and requantizes, choosing each row's exponent so that its largest magnitude lands just below ``2**15``
(float16 tops out at 65504). So:

- each entry keeps float16's relative precision (about 5e-4) whatever the scale of the statistic (|g * W| of an LLM
  is often 1e-10, far below float16's smallest normal number, which is why a plain float16 sum is useless);
- entries more than ``2**29`` times smaller than their row's largest are flushed towards zero (they rank at the
  bottom either way);
- an increment smaller than about ``2**-11`` of the entry it is added to is lost: a run of equal increments stops
  growing after about 2,000 of them (a bfloat16 sum after about 250). Ranking is what the scorers read, and the
  relative order of entries that grow alike is kept.

Rows are the first dimension, which is also how FSDP2 shards a weight (``Shard(0)``): a rank holds the exponents of
its own rows, and its values are the values the one-process accumulator would hold for them, to the last bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RowScaledHalf"]

#: Requantized rows have their largest magnitude in ``[2**14, 2**15)``.
_TOP_EXPONENT = 15


class RowScaledHalf:
    """A float32-valued accumulator of shape ``[rows, ...]`` in float16 data plus an int16 exponent per row.

    Args:
        shape: shape of the accumulated tensor (at least 1-D; rows are ``shape[0]``).
        device: where it lives.
    """

    def __init__(self, shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None):
        if len(shape) < 1:
            raise ValueError("RowScaledHalf needs at least one dimension (rows)")
        self.data = torch.zeros(tuple(shape), dtype=torch.float16, device=device)
        self.exponent = torch.zeros(shape[0], dtype=torch.int16, device=device)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def _row_view(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], -1)

    def value(self) -> Tensor:
        """The accumulated values in float32 (a new tensor)."""
        data = self._row_view(self.data).float()
        return torch.ldexp(data, self.exponent.to(torch.int32)[:, None]).reshape(self.data.shape)

    @torch.no_grad()
    def add_(self, increment: Tensor) -> None:
        """``value += increment`` (same shape, any float dtype), requantized row by row."""
        if increment.shape != self.data.shape:
            raise ValueError(f"increment shape {tuple(increment.shape)} != accumulator {tuple(self.data.shape)}")
        self.set_(self.value() + increment.to(torch.float32))

    @torch.no_grad()
    def set_(self, value: Tensor) -> None:
        """Store ``value`` (float32, same shape), choosing each row's exponent afresh."""
        rows = self._row_view(value.to(device=self.data.device, dtype=torch.float32))
        peak = rows.abs().amax(dim=1)
        _, top = torch.frexp(peak)  # peak = m * 2**top with m in [0.5, 1); 0 for an all-zero row
        exponent = torch.where((peak > 0) & peak.isfinite(), top - _TOP_EXPONENT, torch.zeros_like(top))
        if bool((exponent.abs() > torch.iinfo(torch.int16).max).any()):  # unreachable for finite fp32 values
            raise OverflowError("row exponent out of int16 range")
        self.data.copy_(torch.ldexp(rows, -exponent[:, None]).to(torch.float16).reshape(self.data.shape))
        self.exponent.copy_(exponent.to(torch.int16))

    def any(self) -> bool:
        """Whether any entry is non-zero."""
        return bool(self.data.any())

    def zero_(self) -> None:
        self.data.zero_()
        self.exponent.zero_()

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.exponent.numel() * self.exponent.element_size()
