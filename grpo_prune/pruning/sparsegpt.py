"""SparseGPT: one-shot pruning with OBS weight reconstruction (Frantar & Alistarh 2023), pure torch.

Removing weights from a linear layer ``y = x W^T`` changes its output; SparseGPT minimises that change over
calibration inputs, ``min ||X W^T - X W_s^T||^2`` with ``W_s`` following the sparsity pattern. The objective is a
quadratic in each row of ``W`` with the same Hessian for every row, ``H = X^T X`` (``[in, in]``): the *Gram matrix*
of the layer's inputs. The Optimal Brain Surgeon (OBS) step fixes the columns one at a time, left to right; with
``U`` the upper Cholesky factor of ``H^-1`` (``U^T U = H^-1``), row ``j`` of ``U`` holds what OBS needs once the
columns before ``j`` are fixed (``U_jj^2`` is ``[H_F^-1]_jj`` over the remaining columns ``F``):

- the saliency (output error) of removing ``w_ij`` is ``w_ij^2 / U_jj^2``;
- the optimal compensation of the row's not-yet-fixed weights is ``w_i,j: -= (w_ij / U_jj) * U_j,j:``.

This module has three pieces:

- :class:`GramAccumulator`: ``H = sum x x^T`` over real (non-padding) tokens of each layer's input, collected by
  forward hooks. Layers that read the *same* input tensor (``q/k/v_proj``, ``gate/up_proj``) share one matrix.
  Memory: ``4 * in^2`` bytes (fp32) per *distinct* input, e.g. SmolLM2-135M: two 576-wide inputs shared by
  q/k/v and gate/up, ``o_proj``'s 576 and ``down_proj``'s 1536: 3 x 1.3 MB + 9.4 MB = 13.4 MB per decoder layer.
- :func:`sparsegpt_prune_`: prunes one weight in place from its Gram matrix and returns the keep-mask.
- :func:`obs_prune_inputs_`: removes whole groups of input features (columns) of one weight, greedily by their OBS
  cost, and reconstructs the others: structured pruning of MLP neurons (``down_proj``'s inputs, one column each)
  and attention heads (``o_proj``'s inputs, ``head_dim`` columns each).

:func:`sparsegpt_oneshot_` prunes a whole model *sequentially*: decoder layer ``i`` is pruned from the inputs
produced by the already pruned layers ``< i`` (the paper's procedure; later layers then correct what earlier ones
lost). Cost: one pass through the embeddings to record each decoder layer's call arguments, then per decoder layer
two passes of that layer over the calibration batches (one to collect its Gram matrices, one with the pruned
weights to produce the next layer's inputs), i.e. about two forward passes of the decoder stack, plus the OBS work
(per layer ``O(in^3)`` for the inverse and ``O(out * in^2)`` for the updates). Calibration hidden states of all
batches are held at once: ``4 * tokens * hidden_size`` bytes (8 x 256 tokens of SmolLM2: 4.7 MB). Within a
decoder layer every linear is pruned from the layer's dense inputs (the attention output projection does not
see the pruned q/k/v), as in the paper's reference procedure. :func:`sparsegpt_structured_oneshot_` runs the
same sequence for whole units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from grpo_prune.pruning import masks as M
from grpo_prune.pruning.structure import HeadGroup, MLPGroup, decoder_layers

__all__ = [
    "GramAccumulator",
    "obs_prune_inputs_",
    "sparsegpt_oneshot_",
    "sparsegpt_prune_",
    "sparsegpt_structured_oneshot_",
]

SPARSEGPT_COMPARISONS = ("layer", "row")


class GramAccumulator:
    """Gram matrices ``H = sum_t x_t x_t^T`` of the inputs of some linear layers, over real tokens.

    Forward pre-hooks on the layers add every input row (token) to its layer's matrix. Padding is excluded through
    :attr:`token_mask` (``[batch, seq]`` bool, True = real token): linear hooks cannot see the model's attention
    mask, so the caller sets it before each forward, or :meth:`watch_attention_mask` installs a pre-forward hook on
    the model that copies the ``attention_mask`` argument of every call there.

    Sharing: the first forward pass after :meth:`attach` records which layers receive the very same input tensor
    object as the layer called just before them (``q/k/v_proj`` read one normalised hidden state, ``gate/up_proj``
    another). Such layers share one matrix, so memory is ``bytes = itemsize * in^2`` per *distinct* input
    (``4 * in^2`` in fp32). Later passes check that the sharing still holds.

    Args:
        modules: layer name -> ``nn.Linear``; hooks fire in the model's call order.
        dtype: accumulation dtype, ``torch.float32`` (default) or ``torch.float64``.
    """

    def __init__(self, modules: Mapping[str, nn.Linear], dtype: torch.dtype = torch.float32):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}.")
        for name, mod in modules.items():
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"GramAccumulator needs nn.Linear modules; {name} is {type(mod).__name__}.")
        self.modules = dict(modules)
        self.dtype = dtype
        self.token_mask: Tensor | None = None
        self._key: dict[str, str] = {}  # layer -> name of the layer whose matrix it uses (itself or a sharer)
        self._gram: dict[str, Tensor] = {}  # key -> [in, in] sum of x x^T
        self._count: dict[str, int] = {}  # key -> tokens added
        self._last: tuple[Tensor, str] | None = None  # the previous hooked input and its key, for sharing
        self._handles: list[Any] = []  # linear hooks
        self._model_handles: list[Any] = []  # attention-mask watchers

    # ------------------------------------------------------------------------------------------------ hooks
    def attach(self) -> GramAccumulator:
        """Register the forward pre-hooks (idempotent). Returns ``self`` (usable as a context manager)."""
        if not self._handles:
            for name, mod in self.modules.items():
                self._handles.append(mod.register_forward_pre_hook(self._make_hook(name)))
        return self

    def watch_attention_mask(self, model: nn.Module) -> None:
        """Set :attr:`token_mask` from the ``attention_mask`` of every ``model(...)`` call (2-D masks only; a call
        without one, or with a 4-D additive mask, counts every position). Removed by :meth:`remove`."""

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mask = kwargs.get("attention_mask")
            self.token_mask = mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None

        self._model_handles.append(model.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def remove(self) -> None:
        """Remove every hook; the accumulated matrices stay."""
        for handle in self._handles + self._model_handles:
            handle.remove()
        self._handles.clear()
        self._model_handles.clear()
        self._last = None

    def __enter__(self) -> GramAccumulator:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            last = self._last
            shares = last is not None and last[0] is x
            if name not in self._key:
                self._key[name] = last[1] if shares else name
            elif (self._key[name] != name) != shares or (shares and last[1] != self._key[name]):
                raise RuntimeError(
                    f"GramAccumulator: {name} shared its input with {self._key[name]} in the first pass but not "
                    "now; use one accumulator per call pattern."
                )
            self._last = (x, self._key[name])
            if self._key[name] == name:
                self._add(name, x)

        return hook

    @torch.no_grad()
    def _add(self, key: str, x: Tensor) -> None:
        x = x.detach()
        if self.token_mask is not None:
            if x.dim() != 3 or tuple(x.shape[:2]) != tuple(self.token_mask.shape):
                raise RuntimeError(
                    f"GramAccumulator: token_mask {tuple(self.token_mask.shape)} does not match the input "
                    f"{tuple(x.shape)} of {key} ([batch, seq, features] expected)."
                )
            x = x[self.token_mask.to(x.device)]
        rows = x.reshape(-1, x.shape[-1]).to(self.dtype)
        if key not in self._gram:
            self._gram[key] = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype, device=rows.device)
            self._count[key] = 0
        self._gram[key].addmm_(rows.T, rows)
        self._count[key] += rows.shape[0]

    # ---------------------------------------------------------------------------------------------- results
    def key_of(self, name: str) -> str:
        """Name of the layer whose matrix ``name`` uses (itself unless it shares)."""
        if name not in self._key:
            raise KeyError(f"{name} has not been seen by a forward pass of this GramAccumulator.")
        return self._key[name]

    def tokens(self, name: str) -> int:
        """Number of (real) tokens accumulated for ``name``'s input."""
        return self._count.get(self.key_of(name), 0)

    def gram(self, name: str) -> Tensor:
        """The raw sum ``sum_t x_t x_t^T``, ``[in, in]`` (the stored tensor, not a copy)."""
        key = self.key_of(name)
        if key not in self._gram:
            raise KeyError(f"no tokens were accumulated for {name}.")
        return self._gram[key]

    def hessian(self, name: str) -> Tensor:
        """Mean ``H = (1 / tokens) sum_t x_t x_t^T``, fp32 ``[in, in]`` (OBS is invariant to its scale; the mean
        keeps figures comparable across token counts)."""
        return (self.gram(name) / max(self.tokens(name), 1)).to(torch.float32)

    def free(self, name: str) -> None:
        """Drop the matrix used by ``name`` (and by the layers sharing it)."""
        key = self.key_of(name)
        self._gram.pop(key, None)

    def memory_bytes(self) -> int:
        """Bytes held by the matrices: ``itemsize * in^2`` per distinct input."""
        return int(sum(g.numel() * g.element_size() for g in self._gram.values()))


# ----------------------------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------------------------


def _prune_lowest_per_row(scores: Tensor, k: Tensor, forced: Tensor | None) -> Tensor:
    """Pruned-set (True = prune) with ``k[r]`` entries of every row ``r`` of ``scores`` ``[rows, cols]``.

    ``forced`` entries (already pruned) go first and count towards ``k`` (the caller makes ``k >= forced``); the
    rest are the lowest scores, ties broken by column index (stable sort), as in :mod:`~grpo_prune.pruning.masks`.
    """
    order = torch.sort(scores, dim=1, stable=True).indices
    if forced is not None:
        # Second stable sort on "not forced": forced entries first, score order kept inside both parts.
        not_forced = (~forced).gather(1, order).to(torch.uint8)
        order = order.gather(1, torch.sort(not_forced, dim=1, stable=True).indices)
    take = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0) < k.unsqueeze(1)
    pruned = torch.zeros_like(take)
    pruned.scatter_(1, order, take)
    return pruned


def _inverse_cholesky_upper(hessian: Tensor, damp: float, dead: Tensor | None = None) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U = H^-1``), fp32.

    ``dead`` (bool ``[in]``): features whose diagonal is taken as 1 (their rows and columns of ``H`` are zero). ``H``
    itself is not modified. Factorised in fp64 (cheap next to the updates, and robust for near-singular Gram
    matrices). If ``H`` is still not positive definite (collinear inputs beyond what ``damp`` covers), the damping
    is raised tenfold, up to three times, before giving up.

    Memory: at most two fp64 ``[in, in]`` matrices are alive at once (the damped ``H`` and its factor, then the
    factor and the inverse, then the inverse and ``U``), plus the fp32 result: ``16 * in^2 + 4 * in^2`` bytes,
    3.3 + 0.8 GB at ``in`` = 14336. The damping is added to the diagonal in place (no identity matrix).
    """
    diag = torch.diagonal(hessian).to(torch.float64)
    if dead is not None:
        diag = torch.where(dead, torch.ones_like(diag), diag)
    mean_diag = diag.mean()
    for attempt in range(4):
        damped = hessian.to(torch.float64, copy=True)
        torch.diagonal(damped).copy_(diag + (damp * 10**attempt) * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) != 0:
            continue
        inverse = torch.cholesky_inverse(lower)
        del lower
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        if int(info) == 0:
            return upper.to(torch.float32)
    raise ValueError(
        f"the Gram matrix is not positive definite even with damping {damp * 1000:g} x mean(diag); "
        "check the calibration inputs (NaN/inf?) or raise `damp`."
    )


def _row_targets(rows: int, cols: int, sparsity: float, comparison: str, device: torch.device) -> Tensor:
    """Entries to prune per row, ``[rows]`` int64: ``round(s * cols)`` each (``"row"``), or ``round(s * rows *
    cols)`` in the matrix spread as evenly as possible, the lowest-index rows taking one more (``"layer"``)."""
    if comparison == "row":
        return torch.full((rows,), M.num_to_prune(sparsity, cols), dtype=torch.long, device=device)
    total = M.num_to_prune(sparsity, rows * cols)
    base, extra = divmod(total, rows)
    k = torch.full((rows,), base, dtype=torch.long, device=device)
    k[:extra] += 1
    return k


@torch.no_grad()
def sparsegpt_prune_(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    n_m: str | tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    prev_keep: Tensor | None = None,
    comparison: str = "row",
) -> Tensor:
    """Prune ``weight`` in place with OBS reconstruction and return its keep-mask.

    Columns (input features) are processed left to right in blocks of ``block_size``. At the start of a block its
    mask is chosen from the OBS saliency ``w_ij^2 / U_jj^2`` of the *current* (already compensated) weights, row by
    row (rows are independent problems sharing ``H``). Then each column ``j`` of the block is fixed: its pruned
    entries are set to zero and the error ``(w_j - q_j) / U_jj`` is spread over the later columns of the row
    (``-err * U_j,j+1:``), inside the block at once and to the columns after the block in one matrix product.

    Patterns:

    - unstructured: each row prunes its target (:func:`_row_targets`), split over the blocks by cumulative rounding
      (``round(k * end / cols) - round(k * start / cols)`` in a block), and inside a block the lowest saliencies
      of the row go (the paper's adaptive mask selection, per row);
    - N:M (``n_m``): in every group of ``M`` consecutive columns, the ``M - N`` lowest saliencies of each row go,
      selected when the group's first column is reached (so with the updates from the earlier groups).

    Dead input features (``H_jj == 0``: never active in the calibration data) have no curvature: their diagonal is
    set to 1 and their weights to 0, as in the paper (they cannot affect the calibration outputs).

    Args:
        weight: ``[out, in]`` float tensor or Parameter, modified in place (fp32 math, written back in its dtype).
        hessian: ``[in, in]`` Gram matrix of the layer's inputs (any positive scale, e.g.
            :meth:`GramAccumulator.hessian`); not modified.
        sparsity: fraction of each row (``"row"``) or of the matrix (``"layer"``) to prune, in ``[0, 1)``; for
            N:M it must equal ``1 - N/M``.
        n_m: ``"2:4"`` or ``(2, 4)`` for N:M; None for unstructured.
        block_size: columns per block (lazy batch updates; a multiple of ``M`` for N:M). Results depend on it only
            through the unstructured mask selection.
        damp: relative dampening: ``damp * mean(diag H)`` is added to the diagonal before inversion.
        prev_keep: ``[out, in]`` bool, a previous keep-mask: its pruned entries stay pruned and count towards the
            target (a row that already prunes more keeps exactly those pruned). For N:M it must be compatible with
            the pattern (at most ``M - N`` pruned per group).
        comparison: unstructured only: ``"row"`` (exactly ``round(s * in)`` per row, SparseGPT's row-parallel
            selection) or ``"layer"`` (exactly ``round(s * out * in)`` in the matrix, every row within one of
            ``s * in``).

    Returns:
        bool keep-mask ``[out, in]`` (True = kept); every pruned entry of ``weight`` is exactly zero.

    Raises:
        ValueError: naming the argument, for bad shapes, values or an incompatible ``prev_keep``.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"`weight` must be a float [out, in] matrix; got {weight.dtype} {tuple(weight.shape)}.")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"`hessian` must be [in, in] = [{cols}, {cols}]; got {tuple(hessian.shape)}.")
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be a number in [0, 1), got {sparsity!r}.")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"`block_size` must be a positive int, got {block_size!r}.")
    if not isinstance(damp, (int, float)) or isinstance(damp, bool) or not damp > 0:
        raise ValueError(f"`damp` must be a positive number, got {damp!r}.")
    if comparison not in SPARSEGPT_COMPARISONS:
        raise ValueError(f"`comparison` must be one of {SPARSEGPT_COMPARISONS}, got {comparison!r}.")
    if prev_keep is not None and (prev_keep.dtype != torch.bool or prev_keep.shape != weight.shape):
        raise ValueError(
            f"`prev_keep` must be a bool tensor of the weight's shape {tuple(weight.shape)}; got "
            f"{prev_keep.dtype} {tuple(prev_keep.shape)}."
        )
    if n_m is not None:
        n, m = M.parse_n_m(n_m) if isinstance(n_m, str) else n_m
        if not (isinstance(n, int) and isinstance(m, int) and 1 <= n < m):
            raise ValueError(f"`n_m` must be 'N:M' or (N, M) with integers 1 <= N < M, got {n_m!r}.")
        if abs(sparsity - (1 - n / m)) > 1e-6:
            raise ValueError(f"`sparsity` must equal 1 - N/M = {1 - n / m:g} for n_m={n}:{m}, got {sparsity}.")
        if cols % m:
            raise ValueError(f"N:M pruning needs in_features ({cols}) divisible by M={m}.")
        if block_size % m:
            raise ValueError(f"`block_size` ({block_size}) must be a multiple of M={m} for N:M pruning.")
        if prev_keep is not None:
            worst = int((~prev_keep).reshape(-1, m).sum(1).max())
            if worst > m - n:
                raise ValueError(
                    f"`prev_keep` prunes {worst} entries in some group of {m}, more than the {m - n} of {n}:{m}."
                )

    device = weight.device
    w = weight.detach().to(torch.float32, copy=True)
    hessian = hessian.detach().to(device)  # no copy: the fp64 work copies are made (one at a time) inside
    dead = torch.diagonal(hessian) == 0
    w[:, dead] = 0.0
    u = _inverse_cholesky_upper(hessian, float(damp), dead)

    forced = None if prev_keep is None else ~prev_keep.to(device)
    pruned = torch.zeros((rows, cols), dtype=torch.bool, device=device)
    if n_m is None:
        k_row = _row_targets(rows, cols, float(sparsity), comparison, device)
        if forced is not None:
            k_row = torch.maximum(k_row, forced.sum(1))
            forced_after = forced.sum(1)  # forced entries in this block and the ones after it
        done = torch.zeros(rows, dtype=torch.long, device=device)  # pruned so far, per row

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_blk = w[:, start:end].clone()
        u_blk = u[start:end, start:end]
        d = torch.diagonal(u_blk)
        err_t = torch.zeros(end - start, rows, dtype=w.dtype, device=device)  # errors, row j = column j

        if n_m is None:
            # Cumulative rounding: exactly k_row[r] over the whole row, spread evenly over the blocks.
            goal = torch.div(k_row * end * 2 + cols, 2 * cols, rounding_mode="floor")  # round(k * end / cols)
            need = goal - done
            if forced is not None:
                f_blk = forced[:, start:end]
                forced_after -= f_blk.sum(1)
                # at least the forced ones here; never so many that later forced ones would overshoot k_row
                need = torch.minimum(need, k_row - done - forced_after).clamp(min=0)
                need = torch.maximum(need, f_blk.sum(1))
            else:
                f_blk = None
            need = need.clamp(max=end - start)
            saliency = w_blk.square() / d.square()
            pruned[:, start:end] = _prune_lowest_per_row(saliency, need, f_blk)
            done += need

        # err_j = w_j * pruned_j / U_jj: the whole scaled indicator is known once the mask is, so the column loop
        # is two tensor ops (the loop is the slow part on CPU).
        scale = pruned[:, start:end] / d if n_m is None else torch.zeros_like(w_blk)
        for j in range(end - start):
            col = start + j
            if n_m is not None and j % m == 0:
                saliency = w_blk[:, j : j + m].square() / d[j : j + m].square()
                prev = None if prev_keep is None else prev_keep[:, col : col + m].to(device)
                pruned[:, col : col + m] = ~M.n_m_mask(saliency, n, m, None, prev)
                scale[:, j : j + m] = pruned[:, col : col + m] / d[j : j + m]
            err = torch.mul(w_blk[:, j], scale[:, j], out=err_t[j])
            # Compensate the not-yet-fixed columns of the block. Column j's kept entries are unchanged (err = 0
            # there) and its pruned ones become ~0, set to exactly 0 at the end.
            w_blk[:, j:].addr_(err, u_blk[j, j:], alpha=-1.0)
        w[:, start:end] = w_blk
        if end < cols:
            w[:, end:].addmm_(err_t.T, u[start:end, end:], alpha=-1.0)

    keep = ~pruned
    w.mul_(keep)  # exact zeros at the pruned entries (the updates leave rounding residue there)
    weight.data.copy_(w.to(weight.dtype))
    return keep


# ----------------------------------------------------------------------------------------------------------------
# A whole model, sequentially
# ----------------------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised after the last decoder layer: the final norm and the LM head are not needed for calibration."""


def _layer_inputs(
    model: nn.Module, layers: list[nn.Module], batches: list[dict[str, Tensor]]
) -> tuple[list[Tensor], list[list[tuple[tuple, dict]]]]:
    """One pass of the model per batch with every decoder layer's computation skipped, recording the first layer's
    hidden states and every layer's other call arguments (masks and position embeddings can differ per layer, e.g.
    sliding-window layers of Qwen2). Those arguments are made before the decoder loop from the input alone, so each
    layer stands in as the identity here: the pass costs the embeddings, not a dense forward of the stack (which
    was a quarter of a SmolLM2 start).

    Returns:
        (hidden states of each batch ``[B, T, hidden]``, per layer per batch ``(args after hidden, kwargs)``).
    """
    hidden: list[Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def recorder(index: int) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Tensor:
            if args:
                h, rest = args[0], tuple(args[1:])
            else:
                h, rest = kwargs.pop("hidden_states"), ()
            if index == 0:
                hidden.append(h.detach())
            calls[index].append((rest, kwargs))
            if index == len(layers) - 1:
                raise _StopForward
            return h  # the next layer's arguments do not depend on it

        return forward

    # An instance attribute, which nn.Module.__call__ runs (hooks included) in place of the class's forward; one set
    # before (e.g. by accelerate's device hooks) is put back.
    previous = [layer.__dict__.get("forward") for layer in layers]
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer, forward in zip(layers, previous, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    if len(hidden) != len(batches) or any(len(c) != len(batches) for c in calls):
        raise RuntimeError("sparsegpt: the decoder layers were not each called once per calibration batch.")
    return hidden, calls


def _run_layer(layer: nn.Module, h: Tensor, call: tuple[tuple, dict]) -> Tensor:
    rest, kwargs = call
    out = layer(h, *rest, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _layer_by_layer_(
    model: nn.Module,
    modules: Mapping[str, nn.Linear],
    batches: list[dict[str, Tensor]],
    prune_layer: Callable[[dict[str, nn.Linear], GramAccumulator], None],
) -> None:
    """The sequential procedure shared by unstructured and structured SparseGPT: for each decoder layer that holds
    some of ``modules``, collect the Gram matrices of their inputs from the outputs of the already pruned layers
    before it, call ``prune_layer(its modules, grams)``, then run the pruned layer to make the next one's inputs."""
    layer_list = decoder_layers(model)
    by_layer: list[dict[str, nn.Linear]] = [{} for _ in layer_list]
    for name, mod in modules.items():
        hits = [i for i, (prefix, _) in enumerate(layer_list) if name.startswith(prefix + ".")]
        if not hits:
            raise ValueError(f"sparsegpt: target {name} is not inside a decoder layer.")
        by_layer[hits[0]][name] = mod
    layers = [layer for _, layer in layer_list]

    was_training = model.training
    model.eval()
    try:
        hidden, calls = _layer_inputs(model, layers, batches)
        token_masks = [b["attention_mask"].bool() if "attention_mask" in b else None for b in batches]
        for i, layer in enumerate(layers):
            if by_layer[i]:
                with GramAccumulator(by_layer[i]) as grams:
                    for b, h in enumerate(hidden):
                        grams.token_mask = token_masks[b]
                        _run_layer(layer, h, calls[i][b])
                prune_layer(by_layer[i], grams)
                del grams
            if i + 1 < len(layers):  # the next layer's inputs, from this (now pruned) layer
                hidden = [_run_layer(layer, h, calls[i][b]) for b, h in enumerate(hidden)]
    finally:
        model.train(was_training)


@torch.no_grad()
def sparsegpt_oneshot_(
    model: nn.Module,
    targets: Mapping[str, nn.Linear],
    sparsity: float,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    n_m: str | None = None,
    comparison: str = "layer",
    block_size: int = 128,
    damp: float = 0.01,
    prev_keep: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Prune ``targets`` of ``model`` with SparseGPT, decoder layer by decoder layer (see the module docstring).

    Args:
        model: a causal LM whose targets all live in its decoder layers (:func:`decoder_layers`).
        targets: module name -> ``nn.Linear`` to prune (e.g. :func:`~grpo_prune.pruning.structure.resolve_targets`).
        sparsity: per target: fraction pruned (``1 - N/M`` for N:M).
        batches: ``model(**batch)`` kwargs with ``input_ids`` ``[B, T]`` and optionally ``attention_mask``
            ``[B, T]`` (padding is left out of the Gram matrices), already on the model's device.
        n_m, comparison, block_size, damp: as in :func:`sparsegpt_prune_`.
        prev_keep: name -> previous keep-mask (monotone pruning).

    Returns:
        name -> bool keep-mask, for every target. The weights are pruned and reconstructed in place.
    """
    keep: dict[str, Tensor] = {}

    def prune_layer(modules: dict[str, nn.Linear], grams: GramAccumulator) -> None:
        for name, mod in modules.items():
            keep[name] = sparsegpt_prune_(
                mod.weight,
                grams.hessian(name),
                sparsity,
                n_m=n_m,
                block_size=block_size,
                damp=damp,
                prev_keep=None if prev_keep is None else prev_keep.get(name),
                comparison=comparison,
            )

    _layer_by_layer_(model, targets, [dict(b) for b in batches], prune_layer)
    return {name: keep[name] for name in targets}


# ----------------------------------------------------------------------------------------------------------------
# Whole units (structured): MLP neurons and attention heads
# ----------------------------------------------------------------------------------------------------------------


def _group_obs_costs(w: Tensor, h_inv: Tensor, group_size: int) -> Tensor:
    """OBS cost ``tr(W_S [H^-1]_SS^-1 W_S^T)`` of removing each group of ``group_size`` consecutive columns."""
    if group_size == 1:  # the scalar form: no block inverses
        return w.square().sum(0) / torch.diagonal(h_inv)
    out, cols = w.shape
    units = cols // group_size
    blocks = torch.diagonal(h_inv.view(units, group_size, units, group_size), dim1=0, dim2=2).permute(2, 0, 1)
    w_blocks = w.view(out, units, group_size)
    return torch.einsum("oug,ugh,ouh->u", w_blocks, torch.linalg.inv(blocks), w_blocks)


@torch.no_grad()
def obs_prune_inputs_(
    weight: Tensor,
    hessian: Tensor,
    num_prune: int,
    *,
    group_size: int = 1,
    buckets: int = 1,
    damp: float = 0.01,
) -> Tensor:
    """Remove whole groups of input features (columns) of ``weight`` with OBS and reconstruct the rest in place;
    return the keep-mask over the groups ``[in // group_size]``.

    A group ``S`` is ``group_size`` consecutive columns (one MLP neuron: 1; one attention head: ``head_dim``).
    Removing it from every row at once costs ``tr(W_S [H^-1]_SS^-1 W_S^T)`` of output error (the rows share ``H``,
    so their OBS terms add up), and the optimal change of the other columns is
    ``W -= W_S [H^-1]_SS^-1 [H^-1]_S,:``. Groups are removed greedily, cheapest first, with ``H^-1`` downdated after
    each removal to the inverse over the remaining inputs, so every choice and every reconstruction accounts for
    the groups already gone. After one removal the result equals the best single group to drop with a
    least-squares refit of the other columns on the (damped) ``H``.

    ``buckets`` splits the groups into that many equal runs of consecutive groups, and ``num_prune`` groups are
    removed from each (GQA: the query heads of one KV head form a bucket, and every KV head loses as many).

    Used for MLP neurons (neuron ``j`` is column ``j`` of ``down_proj``; the caller zeroes rows ``j`` of
    ``gate_proj`` and ``up_proj``) and attention heads (head ``h`` is columns ``h*d:(h+1)*d`` of ``o_proj``; the
    caller zeroes the same rows of ``q_proj``); ``H`` is the Gram matrix of the layer's inputs. Cost: one rank-
    ``group_size`` update of ``[out, in]`` and ``[in, in]`` per removal (in place, fp32 after an fp64 inverse).

    Args:
        weight: ``[out, in]`` float tensor or Parameter, modified in place.
        hessian: ``[in, in]`` Gram matrix of the inputs (any positive scale); not modified.
        num_prune: groups to remove from each bucket, ``0 <= num_prune < groups per bucket``.
        group_size: columns per group; must divide ``in``.
        buckets: runs of groups that each lose ``num_prune``; must divide the number of groups.
        damp: relative dampening added to the diagonal before inversion (as :func:`sparsegpt_prune_`).
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"`weight` must be a float [out, in] matrix; got {weight.dtype} {tuple(weight.shape)}.")
    out, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"`hessian` must be [in, in] = [{cols}, {cols}]; got {tuple(hessian.shape)}.")
    if group_size < 1 or cols % group_size:
        raise ValueError(f"`group_size` must be a positive divisor of the {cols} inputs, got {group_size}.")
    units = cols // group_size
    if buckets < 1 or units % buckets:
        raise ValueError(f"`buckets` must be a positive divisor of the {units} groups, got {buckets}.")
    per_bucket = units // buckets
    if not isinstance(num_prune, int) or isinstance(num_prune, bool) or not 0 <= num_prune < per_bucket:
        raise ValueError(f"`num_prune` must be an int in [0, {per_bucket}), got {num_prune!r}.")
    device = weight.device
    w = weight.detach().to(torch.float32, copy=True)
    hessian = hessian.detach().to(device)
    dead = torch.diagonal(hessian) == 0
    w[:, dead] = 0.0  # never active in the calibration data: no effect on its outputs
    upper = _inverse_cholesky_upper(hessian, float(damp), dead)
    h_inv = upper.T @ upper  # H^-1 (fp32), downdated in place below
    del upper
    g = group_size
    bucket_of = torch.arange(units, device=device) // per_bucket
    left = torch.full((buckets,), num_prune, device=device)  # removals still owed by each bucket
    keep = torch.ones(units, dtype=torch.bool, device=device)
    for _ in range(num_prune * buckets):
        cost = _group_obs_costs(w, h_inv, g)
        cost = torch.where(keep & (left[bucket_of] > 0), cost, torch.full_like(cost, float("inf")))
        j = int(torch.argmin(cost))
        cols_j = slice(j * g, (j + 1) * g)
        inv_block = torch.linalg.inv(h_inv[cols_j, cols_j])
        rows_j = h_inv[cols_j].clone()  # [H^-1]_S,: before the downdate, read by both in-place updates
        w.addmm_(w[:, cols_j] @ inv_block, rows_j, alpha=-1.0)
        h_inv.addmm_(h_inv[:, cols_j] @ inv_block, rows_j, alpha=-1.0)
        keep[j] = False
        left[bucket_of[j]] -= 1
        w[:, cols_j] = 0.0
        h_inv[cols_j, cols_j] = torch.eye(g, device=device)  # keeps the block invertible (its cost is inf anyway)
    w.view(out, units, g)[:, ~keep] = 0.0
    weight.data.copy_(w.to(weight.dtype))
    return keep


@torch.no_grad()
def sparsegpt_structured_oneshot_(
    model: nn.Module,
    groups: Sequence[MLPGroup | HeadGroup],
    sparsity: float,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    damp: float = 0.01,
) -> dict[str, Tensor]:
    """Remove whole units of every group with OBS reconstruction of the group's consumer
    (:func:`obs_prune_inputs_`), decoder layer by decoder layer as the unstructured procedure: each layer's
    consumer inputs come from the already pruned layers before it.

    MLP groups lose ``round(sparsity * intermediate)`` neurons (``down_proj`` reconstructed, the neurons' rows of
    ``gate_proj`` and ``up_proj`` zeroed); head groups lose ``sparsity * heads_per_kv`` query heads of every KV
    head (``o_proj`` reconstructed, the heads' rows of ``q_proj`` zeroed). Each removed unit contributes exactly
    nothing.

    Returns:
        group prefix -> bool unit keep-mask ``[num_units]``.
    """
    by_consumer = {g.consumer: g for g in groups}
    modules = {name: model.get_submodule(name) for name in by_consumer}
    units: dict[str, Tensor] = {}

    def prune_layer(layer_modules: dict[str, nn.Linear], grams: GramAccumulator) -> None:
        for name, consumer in layer_modules.items():
            g = by_consumer[name]
            if isinstance(g, HeadGroup):
                num_prune, size, buckets = g.heads_to_prune_per_kv(sparsity), g.head_dim, g.num_kv_heads
            else:
                num_prune, size, buckets = M.num_to_prune(sparsity, g.num_units), 1, 1
            keep = obs_prune_inputs_(
                consumer.weight, grams.hessian(name), num_prune, group_size=size, buckets=buckets, damp=damp
            )
            for producer in g.producers:
                model.get_submodule(producer).weight.data[~keep.repeat_interleave(size)] = 0.0
            units[g.prefix] = keep

    _layer_by_layer_(model, modules, [dict(b) for b in batches], prune_layer)
    return {g.prefix: units[g.prefix] for g in groups}
