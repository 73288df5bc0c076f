"""Gradient clipping: a drop-in for ``torch.nn.utils`` plus adaptive (unit-wise) clipping.

``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and ``clip_grads_with_norm_`` take
torch's names, argument order, defaults and return values. Deliberate deviations, each tested:

* **Validation.** ``max_norm`` and ``clip_value`` must be > 0 and ``norm_type`` > 0 or +/-inf;
  torch accepts ``max_norm=-1`` and silently flips the gradients' sign (pytorch/pytorch#31367).
* **Accumulation dtype.** Norms of fp16/bf16 gradients are accumulated and returned in float32, so
  a total above 65504 is the true value, not torch's fp16 ``inf`` that then zeroes the gradients.
  (On CPU, bf16 per-tensor norms come from torch's own bf16 kernel, which accumulates in float32
  but rounds each tensor's norm to bf16, and bf16 gradients are multiplied by the coefficient
  rounded to bf16, as torch does: its float32-output and mixed-dtype paths are slower there; see
  ``stats._norm_out_dtype`` and ``_multiplier_dtype``.) float32 and float64
  gradients use torch's exact kernels, in torch's grouping order, and give bit-identical
  results, mixed float32/float64 lists included.
* **eps.** Keyword-only ``eps`` (default ``1e-6``, torch's) sets the coefficient
  ``max_norm / (norm + eps)``; ``eps=0`` selects the optax/TensorFlow convention: gradients
  below ``max_norm`` are left alone and larger ones are scaled by exactly ``max_norm / norm``
  (then clipping twice equals clipping once up to a few ulps, not bit for bit: the norm after
  one clip is ``max_norm`` only up to rounding).
* **No gradients.** ``clip_grad_value_`` on parameters without gradients does nothing (torch
  2.13 raises a RuntimeError from its grouping).

A non-finite total with ``error_if_nonfinite=False`` corrupts the gradients as torch does
(NaN stays NaN; an Inf total multiplies by 0, so Inf becomes NaN and finite entries 0; TensorFlow
makes every entry NaN instead). :class:`gradguard.Guard` skips such steps.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from gradguard._checks import (
    _EMPTY_GENERATOR,
    _as_float,
    as_tensor_list,
    check_iterable,
    check_norm_type,
    check_positive,
)
from gradguard.stats import (
    _GRAD,
    Group,
    _norm_out_dtype,
    _widen,
    acc_dtype,
    check_dense,
    group_norms,
    group_tensors,
    reduce_groups,
    use_foreach,
)

__all__ = [
    "adaptive_clip_grad_",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
]

_MAX_NORM_FIX = "Pass the largest allowed gradient norm, e.g. max_norm=1.0 (inf measures without clipping)."


def _check_max_norm(max_norm: float | Tensor) -> float | Tensor:
    """A number > 0 (or inf), or, as torch accepts, a one-element real tensor.

    A tensor is used as it is, on its device: checking its value would be a host sync on every
    call, so (as in torch) a non-positive tensor is not refused.
    """
    if isinstance(max_norm, Tensor):
        if max_norm.numel() != 1 or max_norm.is_complex() or not max_norm.is_floating_point():
            raise TypeError(
                f"`max_norm` must be a number or a one-element floating-point tensor, got a "
                f"{max_norm.dtype} tensor of shape {tuple(max_norm.shape)}. {_MAX_NORM_FIX}"
            )
        return max_norm.detach().reshape(())
    return check_positive("max_norm", max_norm, _MAX_NORM_FIX, allow_inf=True)


def _check_eps(eps: float) -> float:
    v = _as_float("eps", eps)
    if not (0 <= v < math.inf):
        raise ValueError(
            f"`eps` must be a finite number >= 0, got {eps!r}. Use 1e-6 for torch's convention "
            "or 0 for optax/TensorFlow's."
        )
    return v


def raise_if_nonfinite(total_norm: Tensor, norm_type: float) -> None:
    """Torch's ``error_if_nonfinite`` check: one host sync, by the caller's request."""
    if bool(torch.logical_or(total_norm.isnan(), total_norm.isinf())):  # [sync] asked for
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )


def clip_coef(total_norm: Tensor, max_norm: float | Tensor, eps: float = 1e-6) -> Tensor:
    """The multiplier that brings ``total_norm`` down to ``max_norm``; never above 1, never a sync.

    ``eps > 0``: ``min(1, max_norm / (total_norm + eps))`` (torch). ``eps == 0``: 1 while
    ``total_norm < max_norm``, else ``max_norm / total_norm`` (optax, TensorFlow).
    """
    if eps > 0:
        return torch.clamp(max_norm / (total_norm + eps), max=1.0)
    return torch.where(total_norm < max_norm, 1.0, max_norm / total_norm).to(total_norm.dtype)


def scale_(tensors: Sequence[Tensor], coef: Tensor, foreach: bool | None = None) -> None:
    """Multiply every tensor in place by the 0-dim ``coef``, one foreach call per group.

    The multiply happens even when ``coef == 1``: testing ``coef < 1`` first would be a host sync.
    """
    present = [t for t in tensors if t is not None]
    if present:
        _scale_groups_(group_tensors(present, foreach), coef)


def _multiplier_dtype(device: torch.device, dtype: torch.dtype, acc: torch.dtype) -> torch.dtype:
    """The dtype to multiply gradients of ``dtype`` by: ``acc`` (float32 or better), except for
    bf16 on CPU, where a float32 multiplier takes the CPU's mixed-dtype path, measured 2x slower
    per call for 2000 small tensors and 26x for a broadcast (per-unit) multiply. bf16 shares
    float32's range, so rounding the multiplier to bf16 cannot underflow it (float16 could: it
    keeps float32); its relative error, <= 2**-9, is that of torch's own bf16 coefficient."""
    return torch.bfloat16 if dtype == torch.bfloat16 and device.type == "cpu" else acc


def _scale_groups_(groups: Sequence[Group], coef: Tensor) -> None:
    coefs: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for group in groups:
        key = (group.device, _multiplier_dtype(group.device, group.dtype, coef.dtype))
        c = coefs.get(key)
        if c is None:
            c = coefs[key] = coef.to(*key)
        if group.foreach:
            torch._foreach_mul_(group.tensors, c)
        else:
            for g in group.tensors:
                g.mul_(c)


def _total_norm(grads: list[Tensor], p: float, foreach: bool | None) -> tuple[Tensor, list[Group]]:
    """The global norm of ``grads`` (non-empty, no None) and the groups, for a scale pass."""
    groups = group_tensors(grads, foreach)
    try:
        norms = [group_norms(g, p) for g in groups]
    except (NotImplementedError, RuntimeError):
        check_dense(grads)  # names a sparse or meta gradient, when that is the reason
        raise
    total, _ = reduce_groups(groups, norms, len(grads), p, grads[0].device)
    return total, groups


@torch.no_grad()
def get_total_norm(
    tensors: Tensor | Iterable[Tensor],
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """The norm of ``tensors`` viewed as a single vector (drop-in for ``torch.nn.utils.get_total_norm``).

    Args:
        tensors (Tensor or iterable of Tensors): usually gradients, ``[p.grad for p in params]``.
        norm_type (float or str, optional): order of the norm, > 0 or ``'inf'``. Default: 2.0.
        error_if_nonfinite (bool, optional): raise if the norm is NaN or Inf (one host sync).
            Default: False.
        foreach (bool, optional): use the foreach kernels; ``None`` picks them where supported.

    Returns:
        Tensor: the total norm, in ``max(float32, dtype)``; ``tensor(0.)`` for no tensors.
    """
    p = check_norm_type(norm_type)
    ts = as_tensor_list(tensors, "tensors", warning=None)  # torch warns only in clip_grad_norm_
    if not ts:
        return torch.tensor(0.0)
    total, _ = _total_norm(ts, p, foreach)
    if error_if_nonfinite:
        raise_if_nonfinite(total, p)
    return total


@torch.no_grad()
def clip_grads_with_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    total_norm: Tensor,
    foreach: bool | None = None,
    *,
    eps: float = 1e-6,
) -> None:
    r"""Scale the gradients given a pre-computed total norm (drop-in for torch's).

    .. math::
        g \leftarrow g \cdot \min\left(1, \frac{\text{max\_norm}}{\text{total\_norm} + \epsilon}\right)

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose gradients are scaled.
        max_norm (float or Tensor): the largest allowed norm; must be > 0 (a one-element
            tensor is used unchecked, as in torch).
        total_norm (Tensor): the norm to scale from, e.g. from :func:`get_total_norm`.
        foreach (bool, optional): use the foreach kernels; ``None`` picks them where supported.
        eps (float, keyword-only): 1e-6 (torch) or 0 (optax/TensorFlow: strict threshold).
    """
    max_norm = _check_max_norm(max_norm)
    eps = _check_eps(eps)
    if not isinstance(total_norm, Tensor):
        raise TypeError(
            f"`total_norm` must be a Tensor (e.g. from get_total_norm), got {type(total_norm).__name__}."
        )
    grads = [g for t in as_tensor_list(parameters, warning=None) if (g := t.grad) is not None]
    if grads:
        scale_(grads, clip_coef(total_norm, max_norm, eps), foreach)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    eps: float = 1e-6,
) -> Tensor:
    """Clip the gradients' total norm in place (drop-in for ``torch.nn.utils.clip_grad_norm_``).

    The norm is computed over all gradients together, as if concatenated into one vector. The
    per-tensor norms come out of the same pass (see :func:`gradguard.grad_stats`); no host sync.

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose gradients are clipped.
        max_norm (float or Tensor): the largest allowed norm; must be > 0 (``inf`` measures
            only). Unlike torch, a negative or zero number raises instead of flipping or zeroing
            the grads. A one-element tensor is used as torch uses it (no host sync, so its value
            is not checked).
        norm_type (float or str, optional): order of the norm, > 0 or ``'inf'``. Default: 2.0.
        error_if_nonfinite (bool, optional): raise torch's ``RuntimeError`` if the total norm is
            NaN or Inf, leaving the gradients untouched (one host sync). Default: False, which,
            as in torch, scales by the non-finite norm (the gradients become NaN/0). Use
            :class:`gradguard.Guard` to skip such steps safely instead.
        foreach (bool, optional): use the foreach kernels; ``None`` picks them where supported.
        eps (float, keyword-only): 1e-6 (torch, default) or 0 (optax/TensorFlow convention).

    Returns:
        Tensor: the total norm before clipping, in ``max(float32, grad dtype)``.

    Example:
        >>> import torch, gradguard as gg
        >>> w = torch.nn.Parameter(torch.ones(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> gg.clip_grad_norm_([w], max_norm=1.0, eps=0.0)
        tensor(5.)
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    max_norm = _check_max_norm(max_norm)
    p = check_norm_type(norm_type)
    eps = _check_eps(eps)
    grads = [g for g in map(_GRAD, as_tensor_list(parameters, stacklevel=4)) if g is not None]
    if not grads:
        return torch.tensor(0.0)
    # One grouping serves both passes (torch groups twice); the norm pass is grad_stats'.
    total, groups = _total_norm(grads, p, foreach)
    if error_if_nonfinite:
        raise_if_nonfinite(total, p)
    _scale_groups_(groups, clip_coef(total, max_norm, eps))
    return total


@torch.no_grad()
def clip_grad_value_(
    parameters: Tensor | Iterable[Tensor], clip_value: float, foreach: bool | None = None
) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (drop-in for torch's).

    NaN stays NaN and +/-Inf becomes +/-clip_value, which hides an overflow: check for
    non-finite gradients first (``grad_stats(...).nonfinite``; :class:`gradguard.Guard` does).

    Args:
        parameters (Tensor or iterable of Tensors): parameters whose gradients are clamped.
        clip_value (float or Tensor): the largest allowed magnitude; must be > 0 (torch accepts
            a negative value and sets every gradient to it). A one-element tensor is read with
            ``float()``, as torch reads it.
        foreach (bool, optional): use the foreach kernels; ``None`` picks them where supported.
    """
    if isinstance(clip_value, Tensor) and clip_value.numel() == 1 and not clip_value.is_complex():
        clip_value = float(clip_value)  # torch does the same (a host read)
    v = check_positive(
        "clip_value", clip_value, "Pass the largest allowed absolute gradient value, e.g. clip_value=1.0."
    )
    grads = [g for t in as_tensor_list(parameters, warning=None) if (g := t.grad) is not None]
    if not grads:
        return
    for group in group_tensors(grads, foreach):
        if group.foreach:
            torch._foreach_clamp_min_(group.tensors, -v)
            torch._foreach_clamp_max_(group.tensors, v)
        else:
            for g in group.tensors:
                g.clamp_(-v, v)


@torch.no_grad()
def adaptive_clip_grad_(
    parameters: Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    clipping: float = 0.01,
    eps: float = 1e-3,
    *,
    exclude: Iterable[Tensor | str] = (),
) -> None:
    r"""Adaptive gradient clipping, unit-wise (AGC; Brock et al., 2021, "High-Performance
    Large-Scale Image Recognition Without Normalization", arXiv:2102.06171).

    For every output unit ``u`` (a row of a Linear/Conv/Embedding weight in torch's (out, in, ...)
    layout; the whole tensor for biases and gains), with norms accumulated in float32 or better:

    .. math::
        m_u = \lambda \max(\lVert W_u \rVert_2, \epsilon), \qquad
        G_u \leftarrow G_u \cdot \frac{m_u}{\max(\lVert G_u \rVert_2, 10^{-6})}
        \quad \text{if } \lVert G_u \rVert_2 \ge m_u

    This is timm's ``adaptive_clip_grad`` formula and optax's test (a unit is kept while
    ``|G_u| < m_u``), so a unit whose norm is NaN becomes NaN, as in both; float32/float64
    results equal timm's bit for bit on the CPU. Per (device, dtype) it costs one row-norm call
    per matrix for each of W and G (torch has no per-row foreach norm), one ``_foreach_norm`` for
    all whole-tensor units (biases, gains), the factors of every unit at once, and two
    ``_foreach_mul_``. On CPU, bf16 gradients are multiplied by their factors rounded to bf16 (a
    float32 broadcast multiply is ~26x slower there). The paper advises leaving the classifier
    head out: pass its parameters (or names, with ``named_parameters()``) in ``exclude``;
    :class:`gradguard.AGC` finds it from the model's output.

    Args:
        parameters: parameters, or ``(name, parameter)`` pairs from ``named_parameters()``.
        clipping (float): lambda, the largest allowed ratio of gradient to weight norm. Default: 0.01.
        eps (float): floor for the weight norm, so zero-initialised units can move. Default: 1e-3.
        exclude (iterable, keyword-only): parameters, or names when ``parameters`` are named
            pairs, to leave unclipped.
    """
    clipping = check_positive("clipping", clipping, "AGC's lambda is typically 0.01 to 0.16.")
    eps = check_positive("eps", eps, "AGC's weight-norm floor is typically 1e-3.")
    if isinstance(parameters, Tensor):
        items: list = [parameters]
    else:
        check_iterable(parameters)
        is_generator = isinstance(parameters, types.GeneratorType)
        items = list(parameters)
        if is_generator and not items:
            warnings.warn(_EMPTY_GENERATOR, stacklevel=3)
    named = bool(items) and all(
        isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str) for it in items
    )
    if named:
        names = [n for n, _ in items]
        params = as_tensor_list([p for _, p in items])
    else:
        names = None
        params = as_tensor_list(items)
    skip_ids: set[int] = set()
    for e in exclude:
        if isinstance(e, str):
            if names is None:
                raise ValueError(
                    f"`exclude` names a parameter ({e!r}) but `parameters` carries no names; pass "
                    "model.named_parameters(), or exclude the parameter tensors themselves."
                )
            if e not in names:
                raise ValueError(
                    f"`exclude` names {e!r}, which is not among the parameters; known names "
                    f"include {names[:5]}."
                )
            skip_ids.add(id(params[names.index(e)]))
        elif isinstance(e, Tensor):
            skip_ids.add(id(e))
        else:
            raise TypeError(f"`exclude` entries must be Tensors or names, got {type(e).__name__}.")
    groups: dict[tuple[torch.device, torch.dtype, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    for p in params:
        g = p.grad
        if g is None or id(p) in skip_ids:
            continue
        ws, gs = groups.setdefault((g.device, g.dtype, p.dtype), ([], []))
        ws.append(p)  # read under no_grad
        gs.append(g)
    for (device, _, _), (ws, gs) in groups.items():
        foreach = use_foreach(gs, device, None) and use_foreach(ws, device, None)
        units = AGCUnits.split(gs, ws)
        w_norm, g_norm = units.norms(foreach)
        units.scale_(_agc_factor(w_norm, g_norm, clipping, eps), foreach)


class AGCUnits(NamedTuple):
    """The (gradient, weight) pairs of one (device, dtype) group, split by unit: matrices (every
    tensor of >= 2 dims: a unit per row, in torch's (out, in, ...) layout) first, then the
    tensors that are one unit (biases, gains, scalars, empty tensors).

    Unit norms take one dim-reduction per matrix (torch has no per-row foreach norm) and one
    ``_foreach_norm`` for all the one-unit tensors; the factors are computed for every unit at
    once and applied with one ``_foreach_mul_`` per kind. Each reduction is the one timm's
    ``unitwise_norm`` runs, so float32/float64 results are timm's bit for bit on the CPU.
    """

    mats: list[Tensor]  # gradients with one unit per row
    w_mats: list[Tensor]
    vecs: list[Tensor]  # gradients that are one unit
    w_vecs: list[Tensor]
    rows: list[int]  # units per matrix

    @classmethod
    def split(cls, gs: Sequence[Tensor], ws: Sequence[Tensor]) -> AGCUnits:
        mats, w_mats, vecs, w_vecs = [], [], [], []
        for g, w in zip(gs, ws):
            if g.ndim >= 2 and g.numel() > 0:
                mats.append(g)
                w_mats.append(w)
            else:
                vecs.append(g)
                w_vecs.append(w)
        return cls(mats, w_mats, vecs, w_vecs, [g.shape[0] for g in mats])

    def norms(self, foreach: bool, buf: AGCBuffers | None = None) -> tuple[Tensor, Tensor]:
        """(weight unit norms, gradient unit norms), 1-D, in ``acc_dtype`` (written into
        ``buf``'s tensors when given: no allocation, no concatenation)."""
        if buf is None:
            return _unit_norms(self.w_mats, self.w_vecs, foreach), _unit_norms(self.mats, self.vecs, foreach)
        _unit_norms_into(self.w_mats, self.w_vecs, buf.dims, buf.w_rows, buf.w_vec)
        _unit_norms_into(self.mats, self.vecs, buf.dims, buf.g_rows, buf.g_vec)
        return buf.w, buf.g

    def scale_(self, factor: Tensor, foreach: bool, buf: AGCBuffers | None = None) -> None:
        """Multiply every unit by its entry of ``factor`` (in the order of :meth:`norms`;
        ``buf``: ``factor`` is ``buf.factor``, whose per-tensor views are ready)."""
        if buf is not None:
            per, per_vec = buf.f_mats, buf.f_vecs
        else:
            g0 = (self.mats or self.vecs)[0]
            factor = factor.to(_multiplier_dtype(g0.device, g0.dtype, factor.dtype))
            per, per_vec = _factor_views(factor, self.rows, [g.ndim for g in self.mats], len(self.vecs))
        if self.mats:
            _mul_lists_(self.mats, per, foreach)
        if self.vecs:
            _mul_lists_(self.vecs, per_vec, foreach)


def _factor_views(factor: Tensor, rows: list[int], ndims: list[int], n_vecs: int
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """Per-tensor views of the unit factors: (rows, 1) broadcasts over a matrix, (rows, 1, 1, 1)
    over a conv kernel; one 0-dim factor per one-unit tensor."""
    n_rows = sum(rows)
    per = list(factor[:n_rows].unsqueeze(1).split(rows)) if rows else []
    per = [f if nd == 2 else f.view((-1,) + (1,) * (nd - 1)) for f, nd in zip(per, ndims)]
    return per, list(factor[n_rows:n_rows + n_vecs].unbind(0)) if n_vecs else []


class AGCBuffers:
    """Preallocated unit-norm and factor tensors for a fixed split of float32/float64
    gradients (what :class:`gradguard.AGC` reuses every step), with their per-tensor views."""

    def __init__(self, rows: list[int], ndims: list[int], n_vecs: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        n_rows = sum(rows)
        n = n_rows + n_vecs
        self.w, self.g, self.factor = (torch.empty(n, dtype=dtype, device=device) for _ in range(3))
        self.one = torch.ones((), dtype=dtype, device=device)
        self.w_rows = list(self.w[:n_rows].split(rows)) if rows else []
        self.g_rows = list(self.g[:n_rows].split(rows)) if rows else []
        self.w_vec, self.g_vec = self.w[n_rows:], self.g[n_rows:]
        self.dims = [tuple(range(1, nd)) for nd in ndims]
        self.f_mats, self.f_vecs = _factor_views(self.factor, rows, ndims, n_vecs)


def _mul_lists_(ts: list[Tensor], fs: list[Tensor], foreach: bool) -> None:
    if foreach:
        torch._foreach_mul_(ts, fs)
    else:
        for t, f in zip(ts, fs):
            t.mul_(f)


def _unit_norms_into(mats: list[Tensor], vecs: list[Tensor], dims: list[tuple[int, ...]],
                     rows_out: list[Tensor], vec_out: Tensor) -> None:
    norm = torch.linalg.vector_norm
    for t, d, o in zip(mats, dims, rows_out):  # the one Python loop: a call per matrix
        norm(t, 2, d, out=o)
    if vecs:
        torch.stack(torch._foreach_norm(vecs, 2), out=vec_out)


def _unit_norms(mats: list[Tensor], vecs: list[Tensor], foreach: bool) -> Tensor:
    parts = []
    if mats:
        out = _norm_out_dtype(mats[0].device, mats[0].dtype)
        parts.append(torch.cat([
            torch.linalg.vector_norm(t, 2, dim=tuple(range(1, t.ndim)), dtype=out) for t in mats]))
    if vecs:
        out = _norm_out_dtype(vecs[0].device, vecs[0].dtype)
        if foreach:
            norms = torch._foreach_norm(vecs, 2, dtype=out)
        else:
            norms = [torch.linalg.vector_norm(v, 2, dtype=out) for v in vecs]
        parts.append(torch.stack(list(norms)))
    return _widen(parts[0] if len(parts) == 1 else torch.cat(parts))


def _agc_factor(w_norm: Tensor, g_norm: Tensor, clipping: float, eps: float) -> Tensor:
    """Per-unit multiplier: 1 where |G_u| < m_u = clipping * max(|W_u|, eps), else m_u / |G_u|.

    timm's and optax's test (``g < m`` keeps), so a NaN unit norm scales: the unit becomes NaN.
    """
    max_norm = w_norm.clamp_min(eps).mul_(clipping)
    return torch.where(g_norm < max_norm, 1.0, max_norm / g_norm.clamp_min(1e-6))
