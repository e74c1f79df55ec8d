"""Indicators: what the scorers read, gathered over training (pure torch, no TRL).

:class:`Indicators` owns, for every target ``nn.Linear``:

========================  ====================================================  =========================================
state                     what                                                  memory
========================  ====================================================  =========================================
``magnitude``             ``|W0|`` (magnitude, wanda, mama with alpha < 1):     0 B when read from a frozen dense copy
                          read from the frozen dense copy of the model when     (the distillation teacher) or from the
                          there is one, else (if asked) from the checkpoint     checkpoint; else one copy, 2 B/weight
                          file it was loaded from, else a snapshot at           (fp16, or the weight's dtype if
                          construction                                          narrower)
``bias_magnitude``        ``|b0|`` of the unit producers' biases (structured,   one bias copy; absent on bias-free
                          where biases exist)                                   models (Llama, SmolLM2)
``statistic``             reward-driven statistic ``R`` (movement, mama with    2 bytes per target weight
                          alpha > 0), in the form ``settings.statistic``:       (+ 2 bytes per row)
                          float32 values held as float16 times a power of two
                          per row (:class:`~.compact.RowScaledHalf`)
``activations``           per input feature: sum of squares, sum (fp64) and a   3 vectors per target layer input:
                          token count over real (non-padding) tokens            ``16 * in_features + 8`` bytes per layer
``gram``                  ``sparsegpt`` only: Gram matrix ``sum x x^T`` of      ``4 * in_features^2`` bytes per distinct
                          each distinct target input over real tokens, until    input (q/k/v and gate/up share one);
                          the masks reach the target (:meth:`release_gram`)     0 B once released
========================  ====================================================  =========================================

Nothing is allocated for an indicator the scorer does not use.

The reward-driven statistic is fed the gradient of the policy-gradient (reward) term only, with one definition
whatever the batching: at each optimizer step, ``f(g * W)`` with ``g`` the step's reward-term gradient as the
optimizer would apply it (the mean over micro-batches and ranks) and ``f`` the form (signed, abs, squared). When the
GRPO loss is the whole loss, ``g`` is ``weight.grad`` itself (after accumulation and the DDP all-reduce:
:meth:`Indicators.accumulate_statistic_`). When other loss terms (distillation) share the backward pass, the
trainer adds each micro-batch's reward-term gradient to a step buffer (:meth:`Indicators.add_reward_gradient_`,
4 bytes per target weight while the statistic is tracked) and :meth:`Indicators.apply_step_gradient_` averages it
over ranks and applies ``f`` once, at the optimizer step. A step whose advantages are all zero on every rank carries
no reward signal and is not counted.

Every decision that picks a code path at a prune event (mix the statistic in or not, defer the event or not) is
taken from values reduced across processes (``any_fn``), never from one rank's own, so that the ranks run the same
collectives and build the same masks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from grpo_prune.pruning import scores as S
from grpo_prune.pruning.compact import RowScaledHalf
from grpo_prune.pruning.settings import PruningSettings
from grpo_prune.pruning.sharding import local
from grpo_prune.pruning.sparsegpt import GramAccumulator

__all__ = ["ActivationStats", "Indicators", "ReducedActivations"]


@dataclass
class ActivationStats:
    """Running statistics of one layer's input over real tokens: fp64 so long runs do not lose small increments."""

    sumsq: Tensor  # [in_features]
    sum: Tensor  # [in_features]
    count: Tensor  # [1], tokens seen


@dataclass
class ReducedActivations:
    """Activation statistics summed across processes, as used by one scoring pass."""

    rms: dict[str, Tensor] = field(default_factory=dict)  # fp32 [in_features]
    mean: dict[str, Tensor] = field(default_factory=dict)  # fp32 [in_features]


class _TokenMask:
    """The attention mask of the forward pass in flight, so that linear-layer hooks can drop padded positions.

    A pre-forward hook on the model stores ``attention_mask`` (``[batch, seq]``, 1 = real token); a linear hook
    whose input is ``[batch, t, features]`` keeps the rows whose mask is set, aligning the last ``t`` mask columns
    with its ``t`` positions (left- or right-padded prompts, and a KV-cached step, which sees only the newest ones).
    """

    def __init__(self) -> None:
        self.mask: Tensor | None = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and torch.is_tensor(args[1]):
            mask = args[1]  # model(input_ids, attention_mask) positionally
        self.mask = mask.detach() if torch.is_tensor(mask) and mask.dim() == 2 else None

    def real_rows(self, x: Tensor) -> Tensor:
        """``x`` ``[..., features]`` flattened to ``[tokens, features]`` with padded positions removed."""
        mask = self.mask
        if mask is not None and x.dim() == 3 and mask.shape[0] == x.shape[0] and mask.shape[1] >= x.shape[1]:
            keep = mask[:, mask.shape[1] - x.shape[1] :].to(device=x.device).bool()
            return x[keep]
        return x.reshape(-1, x.shape[-1])


class _FrozenMagnitude(Mapping):
    """``|W0|`` read on demand from a frozen dense copy's modules of the same names: no memory of its own."""

    def __init__(self, modules: Mapping[str, nn.Linear]):
        self._modules = dict(modules)

    def __getitem__(self, name: str) -> Tensor:
        return local(self._modules[name].weight).detach().abs()  # under FSDP2: this rank's shard, like the student's

    def __iter__(self):
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


class _CheckpointMagnitude(Mapping):
    """``|W0|`` read on demand from the pretrained checkpoint's safetensors files (memory-mapped, one layer at a
    time): no memory of its own. Under FSDP2 only this rank's rows are read."""

    def __init__(self, files: Mapping[str, str], rows: Mapping[str, tuple[int, int]], devices: Mapping[str, Any]):
        self._files, self._rows, self._devices = dict(files), dict(rows), dict(devices)

    def __getitem__(self, name: str) -> Tensor:
        from safetensors import safe_open

        start, stop = self._rows[name]
        with safe_open(self._files[name], framework="pt") as f:
            rows = f.get_slice(f"{name}.weight")[start:stop]
        return rows.to(self._devices[name]).abs()

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def checkpoint_magnitude(
    model: nn.Module, targets: Mapping[str, nn.Linear], row_offset: Callable[[str], int] | None = None
) -> _CheckpointMagnitude | None:
    """A ``|W0|`` reader over the local safetensors checkpoint ``model`` was loaded from, or None when there is none
    or it does not hold these weights (``model.name_or_path`` is not a local folder of safetensors files, a target
    is missing or shaped differently, or the first local row of some target differs from the model's: the model
    was changed after loading, so the file is not its starting point).

    Args:
        model: the bare model (``name_or_path`` as ``from_pretrained`` sets it).
        targets: module name -> target ``nn.Linear`` (checkpoint key ``<name>.weight``).
        row_offset: under FSDP2, the first global row of this rank's shard of a target.
    """
    from safetensors import safe_open

    folder = Path(os.fspath(getattr(model, "name_or_path", "") or ""))
    if not folder.is_dir():
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = {n: str(folder / weight_map[f"{n}.weight"]) for n in targets if f"{n}.weight" in weight_map}
    elif (folder / "model.safetensors").is_file():
        files = {n: str(folder / "model.safetensors") for n in targets}
    else:
        return None
    if len(files) != len(targets):
        return None
    rows, devices = {}, {}
    for name, mod in targets.items():
        shard = local(mod.weight)
        start = row_offset(name) if row_offset is not None else 0
        rows[name], devices[name] = (start, start + shard.shape[0]), shard.device
        try:
            with safe_open(files[name], framework="pt") as f:
                sl = f.get_slice(f"{name}.weight")
                if tuple(sl.get_shape()) != tuple(mod.weight.shape) or shard.shape[0] == 0:
                    return None
                first = sl[start : start + 1]
        except Exception:  # a key the file lacks, or an unreadable file: not this model's checkpoint
            return None
        if not torch.equal(first.to(shard.dtype).to(shard.device), shard[:1].detach()):
            return None
    return _CheckpointMagnitude(files, rows, devices)


#: Storage dtype of a ``|W0|`` snapshot, half the bytes of fp32. Measured (``scripts/measure_indicator_precision.py``,
#: SmolLM2-135M, Wanda masks against fp32 |W0|): fp16 changes 0.005% of the keep/prune decisions at 50% unstructured
#: and 0.004% at 2:4, bf16 0.058% and 0.041% (3 mantissa bits fewer), fp8-e4m3 0.93% and 0.73%. |W0| of an LLM lies
#: well inside fp16's range. A weight already in a 16-bit dtype is snapshotted as it is.
MAGNITUDE_DTYPE = torch.float16


class Indicators:
    """The indicators of one model's target layers (see the module docstring).

    Args:
        model: the unwrapped causal LM; its forward is hooked (pre-hook) to see the attention mask.
        targets: module name -> target ``nn.Linear``.
        settings: validated :class:`PruningSettings`.
        bias_producers: names of the targets whose ``|b0|`` is a bias indicator (structured unit producers).
        frozen_dense: a frozen, unpruned copy of the model (the distillation teacher built from the same weights),
            from whose modules of the same names ``|W0|`` is read instead of being copied. It must stay frozen.
        magnitude_from_checkpoint: without ``frozen_dense``, read ``|W0|`` from the safetensors checkpoint the model
            was loaded from when it still holds the model's weights (:func:`checkpoint_magnitude`), instead of a
            2-byte snapshot; the file must not change during the run.
        row_offset: under FSDP2, the first global row of this rank's shard of a target.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Mapping[str, nn.Linear],
        settings: PruningSettings,
        bias_producers: list[str] | tuple[str, ...] = (),
        frozen_dense: nn.Module | None = None,
        magnitude_from_checkpoint: bool = False,
        row_offset: Callable[[str], int] | None = None,
    ):
        self.model = model
        self.targets = dict(targets)
        self.settings = settings
        self.magnitude_source = "none"
        with torch.no_grad():
            self.magnitude: Mapping[str, Tensor] = {}
            if settings.needs_magnitude and frozen_dense is not None:
                frozen = {n: frozen_dense.get_submodule(n) for n in self.targets}
                for n, mod in frozen.items():
                    if tuple(local(mod.weight).shape) != tuple(local(self.targets[n].weight).shape):
                        raise ValueError(
                            f"the frozen dense copy's {n} has shape {tuple(mod.weight.shape)}, the model's "
                            f"{tuple(self.targets[n].weight.shape)}: it is not a copy of this model"
                        )
                self.magnitude = _FrozenMagnitude(frozen)
                self.magnitude_source = "frozen dense copy"
            elif (
                settings.needs_magnitude
                and magnitude_from_checkpoint
                and (reader := checkpoint_magnitude(model, self.targets, row_offset))
            ):
                self.magnitude = reader
                self.magnitude_source = "checkpoint"
            elif settings.needs_magnitude:
                # local(): under FSDP2 the snapshot is of this rank's row shard, like the parameter.
                self.magnitude = {n: _snapshot_abs(local(mod.weight)) for n, mod in self.targets.items()}
                self.magnitude_source = "snapshot"
            self.bias_magnitude: dict[str, Tensor] = {}
            if settings.needs_magnitude:
                for n in bias_producers:
                    if self.targets[n].bias is not None:
                        self.bias_magnitude[n] = self.targets[n].bias.detach().abs()
        # 2 bytes per weight instead of fp32's 4: the scorers rank it, and its ranking is kept (measured in
        # scripts/measure_indicator_precision.py).
        self.statistic: dict[str, RowScaledHalf] = (
            {n: RowScaledHalf(local(mod.weight).shape, device=mod.weight.device) for n, mod in self.targets.items()}
            if settings.needs_movement
            else {}
        )
        self.statistic_updates = 0  # optimizer steps whose reward-term gradients reached the statistic
        # True when the statistic is accumulated from each process's own gradients (not DDP-averaged ones): it is
        # then summed across processes before scoring. The trainer no longer does this (it averages the step's
        # gradient across ranks before f, `apply_step_gradient_`); kept for callers that feed per-rank statistics.
        self.statistic_is_local = False
        # The reward-term gradient of the optimizer step in progress, summed over its micro-batches (fp32, local
        # shard), when it is given explicitly (`add_reward_gradient_`); emptied at each `apply_step_gradient_`.
        self.step_gradient: dict[str, Tensor] = {}
        self.activations: dict[str, ActivationStats] = {}
        if settings.tracks_activations:
            for n, mod in self.targets.items():
                kw = {"dtype": torch.float64, "device": mod.weight.device}
                self.activations[n] = ActivationStats(
                    torch.zeros(mod.in_features, **kw), torch.zeros(mod.in_features, **kw), torch.zeros(1, **kw)
                )
        self.gram: GramAccumulator | None = GramAccumulator(self.targets) if settings.needs_gram else None
        # True once the Gram matrices were freed because no later event reads them (see :meth:`release_gram`).
        self.gram_released = False
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._tokens = _TokenMask()
        self._reduce_fn: Callable[[Tensor], Tensor] | None = None
        # Sharded (FSDP2): ``fn(flag) -> flag`` true on every rank when true on some rank, so that the decision
        # "the statistic has a signal" is taken from the whole layer, not from this rank's shard.
        self.any_fn: Callable[[bool], bool] | None = None

    # ------------------------------------------------------------------------------------------ reward statistic
    @property
    def tracks_statistic(self) -> bool:
        return bool(self.statistic)

    @torch.no_grad()
    def add_statistic_(self, grads: Mapping[str, Tensor] | None = None) -> bool:
        """Add ``f(g * W)`` of the reward-term gradient ``g`` to the statistic (no step is counted).

        Args:
            grads: target name -> gradient of the policy-gradient term alone. None: read each target's
                ``weight.grad`` (right only when the GRPO loss is the whole loss: after accumulation and the DDP
                all-reduce, before masking and clipping).

        Returns:
            whether any target received a gradient.
        """
        if not self.statistic:
            return False
        seen = False
        for name, mod in self.targets.items():
            g = mod.weight.grad if grads is None else grads.get(name)
            if g is None:
                continue
            self.statistic[name].add_(
                S.statistic_increment(local(mod.weight).detach(), local(g), self.settings.statistic)
            )
            seen = True
        return seen

    def count_statistic_step(self) -> None:
        """Count one optimizer step with a reward signal (see ``min_statistic_updates``)."""
        if self.statistic:
            self.statistic_updates += 1

    def accumulate_statistic_(self, grads: Mapping[str, Tensor] | None = None) -> None:
        """One optimizer step: :meth:`add_statistic_`, counted when a gradient was seen."""
        if self.add_statistic_(grads):
            self.count_statistic_step()

    @torch.no_grad()
    def add_reward_gradient_(self, grads: Mapping[str, Tensor]) -> None:
        """Add one micro-batch's reward-term gradient (already divided by the accumulation steps, as the loss is) to
        the step buffer; ``f`` is applied once per optimizer step, to the buffer's cross-rank mean
        (:meth:`apply_step_gradient_`), so that the statistic does not depend on the accumulation steps."""
        for name, g in grads.items():
            if g is None or name not in self.statistic:
                continue
            g = local(g).detach()
            buffer = self.step_gradient.get(name)
            if buffer is None:
                self.step_gradient[name] = g.to(torch.float32, copy=True)
            else:
                buffer.add_(g)

    @torch.no_grad()
    def apply_step_gradient_(self, world_size: int = 1) -> None:
        """One optimizer step of the statistic from the buffered reward-term gradient: the buffer (zeros where this
        rank saw no reward signal) is summed over processes and divided by ``world_size`` (the mean DDP would
        apply), then ``f(g * W)`` is added and the step counted. A collective when ``world_size > 1``: call it on
        every rank at the same steps (the trainer decides from a flag reduced across ranks)."""
        if not self.statistic:
            self.step_gradient.clear()
            return
        names = list(self.statistic)
        parts = []
        for name in names:
            buffer = self.step_gradient.get(name)
            parts.append(buffer if buffer is not None else torch.zeros(local(self.targets[name].weight).shape))
        if world_size > 1 and self._reduce_fn is not None:  # one collective for every target
            device = self.targets[names[0]].weight.device
            flat = self._reduce_fn(torch.cat([p.to(device).flatten() for p in parts])) / world_size
            parts = list(torch.split(flat, [p.numel() for p in parts]))
        for name, g in zip(names, parts, strict=True):
            weight = local(self.targets[name].weight).detach()
            g = g.reshape(weight.shape).to(weight.device)
            self.statistic[name].add_(S.statistic_increment(weight, g, self.settings.statistic))
        self.step_gradient.clear()
        self.statistic_updates += 1

    def any_rank(self, flag: bool) -> bool:
        """``flag`` or-ed over processes (``any_fn``, set under DDP and FSDP2; ``flag`` itself in one process)."""
        return self.any_fn(flag) if self.any_fn is not None else flag

    def statistic_signal(self, reduce: bool = True) -> tuple[bool, str]:
        """``(usable, why not)``: the statistic carries a signal only with enough updates and a non-zero entry on
        some rank (reduced, so that every rank decides alike; ``reduce=False``: this rank's own view, no
        collective, for a report written by one rank)."""
        if not self.statistic:
            return False, "not tracked"
        need = self.settings.min_statistic_updates
        if self.statistic_updates < need:
            return False, f"{self.statistic_updates} reward-signal steps, fewer than min_statistic_updates={need}"
        nonzero = any(bool(acc.any()) for acc in self.statistic.values())
        if reduce:
            nonzero = self.any_rank(nonzero)
        if not nonzero:
            return False, "all zero (every advantage was zero)"
        return True, ""

    def reduced_statistic(self, name: str) -> Tensor:
        """The statistic of ``name`` as the scorers must see it (summed across processes when accumulated
        locally)."""
        t = self.statistic[name].value()
        if self.statistic_is_local and self._reduce_fn is not None:
            return self._reduce_fn(t)
        return t

    # ----------------------------------------------------------------------------------------------- activations
    def attach_hooks(self) -> None:
        """Register forward hooks that accumulate per-input-feature statistics over real tokens (no-op if not
        tracked or already attached). Padded positions are left out using the forward's ``attention_mask``."""
        if self.gram is not None and not self.gram._handles:
            self.gram.watch_attention_mask(self.model)
            self.gram.attach()
        if self._hooks or not self.activations:
            return
        self._hooks.append(self.model.register_forward_pre_hook(self._tokens.capture, with_kwargs=True))
        for name, mod in self.targets.items():
            self._hooks.append(mod.register_forward_hook(self._make_hook(self.activations[name])))

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._tokens.mask = None
        if self.gram is not None:
            self.gram.remove()
            self.gram.token_mask = None

    # ------------------------------------------------------------------------------------------ gram (sparsegpt)
    def release_gram(self) -> None:
        """Stop accumulating the Gram matrices and free them: the masks have reached the target, so no later event
        reads them. Saves one ``[in, tokens] @ [tokens, in]`` product per distinct input at every training forward
        (about one extra linear forward per token) and ``4 * in^2`` bytes per distinct input in memory and in every
        checkpoint. Idempotent; :meth:`restore_gram` undoes it (a resumed run with a higher target)."""
        if self.gram is not None:
            self.gram.remove()
            self.gram = None
        self.gram_released = self.settings.needs_gram

    def restore_gram(self) -> None:
        """A fresh, empty Gram accumulator after :meth:`release_gram` (the target was raised): accumulation starts
        again from the next forward pass."""
        if self.gram_released:
            self.gram = GramAccumulator(self.targets)
            self.gram_released = False

    def has_gram(self) -> bool:
        """Whether every target's input has been seen on some rank (sparsegpt can reconstruct every layer); token
        counts are summed over processes first, so that every rank decides alike."""
        if self.gram is None:
            return False

        def tokens(name: str) -> int:
            try:
                return int(self.gram.tokens(name))
            except KeyError:
                return 0

        counts = torch.tensor([float(tokens(n)) for n in self.targets])
        if self._reduce_fn is not None:
            device = next(iter(self.targets.values())).weight.device
            counts = self._reduce_fn(counts.to(device))
        return bool((counts > 0).all())

    def reduced_hessian(self, name: str) -> Tensor:
        """``H = sum x x^T / tokens`` of ``name``'s input, summed over processes first (DDP ranks see their own
        data), fp32 ``[in, in]``."""
        gram, tokens = self.gram.gram(name).clone(), torch.tensor([float(self.gram.tokens(name))])
        if self._reduce_fn is not None:
            gram = self._reduce_fn(gram)
            tokens = self._reduce_fn(tokens.to(gram.device))
        # In place: one [in, in] copy, not two (this runs at every event, for every target).
        return gram.div_(tokens.clamp_min(1).to(device=gram.device, dtype=gram.dtype)).to(torch.float32)

    def _gram_state(self) -> dict[str, Tensor]:
        if self.gram is None:
            return {}
        names = list(self.targets)
        sd: dict[str, Tensor] = {}
        for name in names:
            if name not in self.gram._key:
                continue
            owner = self.gram.key_of(name)
            sd[f"gram_owner/{name}"] = torch.tensor([names.index(owner)], dtype=torch.int64)
            if owner == name and name in self.gram._gram:
                sd[f"gram/{name}"] = self.gram._gram[name]
                sd[f"gram_tokens/{name}"] = torch.tensor([self.gram._count[name]], dtype=torch.int64)
        return sd

    def prepare_state(self, state_dict: Mapping[str, Tensor]) -> None:
        """Before loading ``state_dict``: recreate the Gram matrices it holds (they exist only once inputs were
        seen), with its values and token counts, so that its keys are this object's keys. After
        :meth:`release_gram` they are not recreated (:meth:`drop_released_state` removes them from the state)."""
        if self.gram is None:
            return
        names = list(self.targets)
        owners = {
            k.split("/", 1)[1]: names[int(v.item())] for k, v in state_dict.items() if k.startswith("gram_owner/")
        }
        if not owners:
            return
        self.gram._key = dict(owners)
        for owner in set(owners.values()):
            if f"gram/{owner}" in state_dict:
                device = self.targets[owner].weight.device
                self.gram._gram[owner] = state_dict[f"gram/{owner}"].to(device=device, dtype=self.gram.dtype).clone()
                self.gram._count[owner] = int(state_dict[f"gram_tokens/{owner}"].item())

    def drop_released_state(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``state_dict`` without Gram entries when they were released here (a checkpoint written after the target
        by a version that still saved them): they are not loaded back."""
        if not self.gram_released:
            return dict(state_dict)
        return {k: v for k, v in state_dict.items() if not k.startswith(("gram/", "gram_owner/", "gram_tokens/"))}

    def _make_hook(self, stats: ActivationStats) -> Callable:
        tokens = self._tokens

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            with torch.no_grad():
                x = tokens.real_rows(args[0].detach()).float()
                # Per batch in fp32 (fast), accumulated in fp64 (exact enough over a whole run).
                stats.sumsq += x.square().sum(0).to(stats.sumsq.device)
                stats.sum += x.sum(0).to(stats.sum.device)
                stats.count += x.shape[0]

        return hook

    def reset_activation_stats(self) -> None:
        for stats in self.activations.values():
            stats.sumsq.zero_()
            stats.sum.zero_()
            stats.count.zero_()

    def has_activations(self) -> bool:
        """Whether some rank recorded activations (reduced: every rank decides alike)."""
        return self.any_rank(any(st.count.item() > 0 for st in self.activations.values()))

    def set_reduce_fn(self, fn: Callable[[Tensor], Tensor] | None) -> None:
        """``fn(t) -> t`` summing ``t`` over processes; applied to activation statistics (and to a locally
        accumulated statistic) before scoring, so every rank builds the same masks."""
        self._reduce_fn = fn

    def reduced_activations(self) -> ReducedActivations:
        out = ReducedActivations()
        if not self.activations:
            return out
        names = list(self.activations)
        parts = [t for n in names for t in (self.activations[n].sumsq, self.activations[n].sum)]
        parts += [self.activations[n].count for n in names]
        flat = torch.cat([p.to(parts[0].device) for p in parts])
        if self._reduce_fn is not None:  # one collective for everything
            flat = self._reduce_fn(flat.clone())
        counts = flat[-len(names) :]
        offset = 0
        for i, name in enumerate(names):
            size = self.activations[name].sumsq.numel()
            sumsq, total = flat[offset : offset + size], flat[offset + size : offset + 2 * size]
            offset += 2 * size
            count = counts[i]
            if count <= 0:
                raise RuntimeError(
                    f"No activations recorded for {name}: call attach_hooks() and run forward passes (calibration "
                    "batches or rollouts) before scoring."
                )
            device = self.targets[name].weight.device
            out.rms[name] = (sumsq / count).sqrt().float().to(device)
            out.mean[name] = (total / count).float().to(device)
        return out

    # ---------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Tensor]:
        """Live tensors under the checkpoint keys of the pruner (``magnitude/``, ``bias_magnitude/``,
        ``movement/`` for the statistic, ``act_*/``) plus ``movement_updates``."""
        sd: dict[str, Tensor] = {"movement_updates": torch.tensor([self.statistic_updates], dtype=torch.int64)}
        stored_magnitude = self.magnitude if isinstance(self.magnitude, dict) else {}
        for prefix, store in (
            ("magnitude", stored_magnitude),
            ("bias_magnitude", self.bias_magnitude),
            ("movement", {n: acc.data for n, acc in self.statistic.items()}),
            ("movement_exponent", {n: acc.exponent for n, acc in self.statistic.items()}),
        ):
            sd.update({f"{prefix}/{n}": t for n, t in store.items()})
        for n, st in self.activations.items():
            sd.update({f"act_sumsq/{n}": st.sumsq, f"act_sum/{n}": st.sum, f"act_count/{n}": st.count})
        sd.update(self._gram_state())
        return sd

    #: State keys that hold this process's own sums over the data it saw (summed over processes where they are used).
    RANK_SUM_PREFIXES = ("act_sumsq/", "act_sum/", "act_count/", "gram/", "gram_tokens/")

    def reduced_state_dict(self) -> dict[str, Tensor]:
        """:meth:`state_dict` with the per-process sums (activation statistics, Gram matrices and their token
        counts) summed over processes: what one file must hold for a data-parallel run to resume. A collective
        when a reduce function is set (call it on every rank); the live tensors otherwise."""
        sd = self.state_dict()
        if self._reduce_fn is None:
            return sd
        device = next(iter(self.targets.values())).weight.device
        by_dtype: dict[torch.dtype, list[str]] = {}
        for key in sd:
            if key.startswith(self.RANK_SUM_PREFIXES):
                by_dtype.setdefault(sd[key].dtype, []).append(key)
        for keys in by_dtype.values():  # one collective per dtype, each sum in its own dtype (no fp64 Gram copy)
            parts = [sd[k].to(device).flatten() for k in keys]
            flat = self._reduce_fn(torch.cat(parts))
            for key, part in zip(keys, torch.split(flat, [p.numel() for p in parts]), strict=True):
                sd[key] = part.reshape(sd[key].shape)
        return sd

    @torch.no_grad()
    def clear_rank_sums_(self) -> None:
        """Zero this process's sums (activation statistics, Gram matrices and token counts): after loading a state
        whose sums were reduced over processes (:meth:`reduced_state_dict`) on every rank, all ranks but one call
        this, so that the next reduction counts the saved data once."""
        self.reset_activation_stats()
        if self.gram is not None:
            for key in list(self.gram._gram):
                self.gram._gram[key].zero_()
            for key in list(self.gram._count):
                self.gram._count[key] = 0

    def upgrade_state(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state_dict`` with a statistic saved in float32 (checkpoints before the 2-byte accumulator) converted to
        this class's ``movement/`` + ``movement_exponent/`` tensors; anything else is returned unchanged."""
        old = {k: v for k, v in state_dict.items() if k.startswith("movement/") and v.dtype == torch.float32}
        if not old or any(k.startswith("movement_exponent/") for k in state_dict):
            return state_dict
        out = dict(state_dict)
        for key, value in old.items():
            acc = RowScaledHalf(value.shape)
            acc.set_(value)
            out[key], out["movement_exponent/" + key.split("/", 1)[1]] = acc.data, acc.exponent
        return out

    def load_scalars(self, state_dict: Mapping[str, Tensor]) -> None:
        self.statistic_updates = int(state_dict["movement_updates"].item())

    def memory_bytes(self) -> dict[str, int]:
        def size(tensors: Any) -> int:
            return int(sum(t.numel() * t.element_size() for t in tensors))

        acts = [t for st in self.activations.values() for t in (st.sumsq, st.sum, st.count)]
        stored_magnitude = self.magnitude.values() if isinstance(self.magnitude, dict) else ()
        return {
            "magnitude": size(stored_magnitude),
            "bias_magnitude": size(self.bias_magnitude.values()),
            "movement": sum(acc.nbytes for acc in self.statistic.values()),
            "activations": size(acts),
            "gram": self.gram.memory_bytes() if self.gram is not None else 0,
        }


def _snapshot_abs(weight: Tensor) -> Tensor:
    """``|W|`` detached, in :data:`MAGNITUDE_DTYPE` unless the weight is already narrower."""
    w = weight.detach()
    dtype = w.dtype if w.element_size() <= 2 else MAGNITUDE_DTYPE
    return w.abs().to(dtype)
