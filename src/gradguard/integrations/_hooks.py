"""What the framework adapters share: running a Guard inside a hook, and turning history into charts.

Frameworks such as Lightning and the Hugging Face Trainer call ``optimizer.step()`` themselves;
a callback only gets a hook just before it. The adapter therefore calls
``guard.step(optimizer, loss=..., defer_step=True)``: the Guard measures, clips, decides and
records, but leaves the step to the framework. When it decides to skip, it *cancels* the coming
step by setting every gradient to ``None``: torch's optimizers leave a parameter whose ``.grad``
is None completely untouched (no update, no weight decay, no momentum decay, no step-counter
increment), so a cancelled step leaves parameters and optimizer state bit-identical. Zeroing the
gradients instead would decay momentum and apply weight decay (``specs/remedies.md`` B6).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from typing import Any

import torch

from gradguard.history import History

__all__ = ["GuardCallbackMixin", "chart_rows", "group_of", "require", "run_guard"]


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise with the exact install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModuleNotFoundError(
            f"this gradguard integration needs `{module.split('.')[0]}`: "
            f'pip install "gradguard[{extra}]"'
        ) from e


class GuardCallbackMixin:
    """What a framework callback keeps until it creates its Guard, and the Guard after.

    The callbacks take the same arguments (their ``log_per_layer`` defaults differ) and call
    :meth:`_init_guard_args` from their ``__init__``.
    """

    _clip: Any
    _guard_kwargs: dict[str, Any]  # for gradguard.Guard, besides the model, clip and sinks
    _sinks: list[Any]
    log_per_layer: bool | str
    guard: Any  # None until the callback creates it
    last_outcome: Any
    _pending_state: dict[str, Any] | None  # a state to load once the Guard exists

    def _init_guard_args(
        self, clip: Any, *, skip_nonfinite: bool, spike: Any, log_per_layer: bool | str,
        sinks: Iterable[Any], flush_every: int, guard_kwargs: dict[str, Any],
    ) -> None:
        if log_per_layer not in (True, False, "auto"):
            raise ValueError(
                f"`log_per_layer` must be True, False or 'auto', got {log_per_layer!r}."
            )
        self._clip = clip
        self._guard_kwargs = dict(
            skip_nonfinite=skip_nonfinite, spike=spike, flush_every=flush_every, **guard_kwargs
        )
        self._sinks = list(sinks)
        self.log_per_layer = log_per_layer
        self.guard = None
        self.last_outcome = None
        self._pending_state = None


def run_guard(guard: Any, optimizer: Any, loss: torch.Tensor | None = None) -> Any:
    """``guard.step`` for a step the framework makes next (cancelled by the Guard if skipped)."""
    return guard.step(optimizer, loss=loss, defer_step=True)


def group_of(name: str) -> str:
    """The chart a tensor's norm is folded into when there are too many tensors for one each.

    Up to the first numeric component (a block of a ModuleList/Sequential:
    ``"transformer.h.3.attn.c_attn.weight"`` -> ``"transformer.h.3"``), else the owning module
    (``"encoder.norm.weight"`` -> ``"encoder.norm"``), else the name itself.
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def chart_rows(
    chunk: History, per_layer: bool | str, prefix: str = "gradguard/", norm_type: float = 2.0,
    max_auto: int = 16,
) -> list[tuple[int, dict[str, float]]]:
    """One ``(step, {chart: value})`` per row of ``chunk``, for a framework's logger.

    Charts: ``global_norm``, ``threshold`` (where finite), ``clipped``, ``skipped``, ``loss``
    (where recorded), plus per-layer norms: ``per_layer=True`` one chart per tensor
    (``grad_norm/<name>``); ``"auto"`` one per tensor up to ``max_auto`` tensors, else one per
    block or module (:func:`group_of`; the ``norm_type``-norm of its tensors' norms); ``False``
    none. Non-finite values are logged as they are: a NaN norm is information.
    """
    names = chunk.names
    grouped = per_layer == "auto" and len(names) > max_auto
    groups: dict[str, list[int]] = {}
    if grouped:
        for j, n in enumerate(names):
            groups.setdefault(group_of(n), []).append(j)
    rows = []
    for i, step in enumerate(chunk.step):
        m: dict[str, float] = {f"{prefix}global_norm": chunk.global_norm[i],
                               f"{prefix}clipped": float(chunk.clipped[i]),
                               f"{prefix}skipped": float(chunk.skipped[i])}
        thr = chunk.threshold[i]
        if not math.isnan(thr) and not math.isinf(thr):
            m[f"{prefix}threshold"] = thr
        if not math.isnan(chunk.loss[i]):
            m[f"{prefix}loss"] = chunk.loss[i]
        layer = chunk.layer_norm[i]
        if grouped:
            for g, idx in groups.items():
                m[f"{prefix}grad_norm/{g}"] = _combine((layer[j] for j in idx), norm_type)
        elif per_layer:
            for n, v in zip(names, layer):
                m[f"{prefix}grad_norm/{n}"] = v
        rows.append((step, m))
    return rows


def _combine(norms: Iterable[float], p: float) -> float:
    vals = list(norms)
    if p == math.inf:
        return max(vals)
    return math.fsum(v ** p for v in vals) ** (1.0 / p)
