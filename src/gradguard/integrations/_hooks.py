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

from collections.abc import Iterable
from typing import Any

import torch

from gradguard._checks import require
from gradguard.sinks import chart_rows, group_of

__all__ = ["GuardCallbackMixin", "chart_rows", "group_of", "require", "run_guard"]


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
