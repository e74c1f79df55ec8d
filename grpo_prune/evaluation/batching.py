"""What every scorer needs from a model and a tokenizer: its device, eval mode without autograd, token ids without
special tokens, and left-padded batches (so that every row's last token sits at the last position)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedTokenizerBase


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a model without any)."""
    import torch

    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels are asynchronous: time the work, not its launch)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and no autograd inside; the model's previous train/eval mode is restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def progress_bar(iterable: Any, progress: bool, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress, dynamic_ncols=True, **kwargs)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (running text and lm-eval-style requests carry none)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes a keyword ``name`` (or any keyword)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def pad_id(tokenizer: PreTrainedTokenizerBase, fallback: int | None) -> int | None:
    """The tokenizer's pad id, else ``fallback``."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def longest_first_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices into ``lengths`` in batches of ``batch_size``, longest first, so a batch holds similar lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``[len(rows), longest]`` long tensors on the CPU, rows padded on the
    left with ``pad`` (mask 0 there)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask
