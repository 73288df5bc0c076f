"""What the framework adapters share: running a Guard inside a hook, and turning history into charts.

Frameworks such as Lightning and the Hugging Face Trainer call ``optimizer.step()`` themselves;
a callback only gets a hook just before it. So the adapter runs ``Guard.step`` against
:class:`DeferredStep`, a stand-in optimizer whose ``step()`` only records that the Guard decided
to step, and lets the framework make the real call. When the Guard decides to skip, the adapter
*cancels* the framework's coming step with :func:`cancel_step`: every gradient of the optimizer
is set to ``None``. Torch's optimizers leave a parameter whose ``.grad`` is None completely
untouched (no update, no weight decay, no momentum decay, no step-counter increment), so a
cancelled step leaves parameters and optimizer state bit-identical. Zeroing the gradients instead
would decay momentum and apply weight decay (see ``specs/remedies.md`` B6).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable
from typing import Any

import torch

from gradguard.history import History

__all__ = ["DeferredStep", "cancel_step", "chart_rows", "require", "run_guard"]


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise with the exact install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModuleNotFoundError(
            f"this gradguard integration needs `{module.split('.')[0]}`: "
            f'pip install "gradguard[{extra}]"'
        ) from e


class DeferredStep:
    """Stands in for ``optimizer`` inside ``Guard.step``: ``step()`` records, it does not step.

    Every other attribute (``param_groups``, ``zero_grad``, ``state``) is the real optimizer's, so
    a Guard that backs off the learning rate or zeroes gradients acts on the real one. The fused
    ``found_inf`` path is hidden (``_step_supports_amp_scaling`` is False): the framework makes
    the real call later, so the Guard must decide on the host, with its one sync per step.
    """

    _step_supports_amp_scaling = False

    def __init__(self, optimizer: Any) -> None:
        object.__setattr__(self, "_optimizer", optimizer)
        object.__setattr__(self, "stepped", False)

    def step(self, closure: Any = None) -> None:
        object.__setattr__(self, "stepped", True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._optimizer, name, value)


def cancel_step(optimizer: Any) -> None:
    """Make the framework's coming ``optimizer.step()`` a no-op: every gradient becomes None."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def run_guard(guard: Any, optimizer: Any, loss: torch.Tensor | None = None) -> tuple[Any, bool]:
    """``guard.step`` for a step the framework will make; cancels it when the Guard skips.

    Returns:
        ``(outcome, skipped)``: the Guard's ``StepOutcome`` and whether the step was cancelled.
    """
    proxy = DeferredStep(optimizer)
    outcome = guard.step(proxy, loss=loss)
    skipped = not proxy.stepped
    if skipped:
        cancel_step(optimizer)
    return outcome, skipped


def _module_of(name: str) -> str:
    return name.split(".", 1)[0] if "." in name else name


def chart_rows(
    chunk: History, per_layer: bool | str, prefix: str = "gradguard/", norm_type: float = 2.0,
    max_auto: int = 32,
) -> list[tuple[int, dict[str, float]]]:
    """One ``(step, {chart: value})`` per row of ``chunk``, for a framework's logger.

    Charts: ``global_norm``, ``threshold`` (where finite), ``clipped``, ``skipped``, ``loss``
    (where recorded), plus per-layer norms: ``per_layer=True`` one chart per tensor
    (``grad_norm/<name>``); ``"auto"`` one per tensor up to ``max_auto`` tensors, else one per
    top-level module (``grad_norm/<module>``, the ``norm_type``-norm of its tensors' norms);
    ``False`` none. Non-finite values are logged as they are: a NaN norm is information.
    """
    names = chunk.names
    mode = per_layer
    if per_layer == "auto":
        mode = True if len(names) <= max_auto else "module"
    modules: dict[str, list[int]] = {}
    if mode == "module":
        for j, n in enumerate(names):
            modules.setdefault(_module_of(n), []).append(j)
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
        if mode is True:
            for n, v in zip(names, layer):
                m[f"{prefix}grad_norm/{n}"] = v
        elif mode == "module":
            for mod, idx in modules.items():
                m[f"{prefix}grad_norm/{mod}"] = _combine((layer[j] for j in idx), norm_type)
        rows.append((step, m))
    return rows


def _combine(norms: Iterable[float], p: float) -> float:
    vals = list(norms)
    if p == math.inf:
        return max(vals)
    return math.fsum(v ** p for v in vals) ** (1.0 / p)
