"""The running mean and variance that ZClip and the spike detector keep on the device.

The first ``warmup`` accepted values are averaged exactly (Welford's algorithm, written as an
update of the mean and of the population variance); every accepted value after them updates the
same two numbers as an exponential moving average. Both phases are one recurrence with a rate
``r`` (``1/k`` for the k-th warm-up value, ``1 - alpha`` after), so a step costs ~18 tensor ops
whatever the phase, and everything stays on the state's device: no host sync.

    mean' = mean + (x - mean) * r
    var'  = var + ((x - mean') * e - var) * r,   e = x - mean (warm-up) or x - mean' (EMA)

After ``k`` warm-up values ``mean``/``var`` are their mean and population variance (Welford); after
it, ``mean' = alpha*mean + (1-alpha)*x`` and ``var' = alpha*var + (1-alpha)*(x - mean')**2`` (ZClip's
EMA), up to rounding (the forms differ in the last bit, and the EMA forgets it).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class RunningState(Protocol):
    """The fields a running state has (``ZClipState``, the spike detector's state)."""

    @property
    def mean(self) -> Tensor: ...  # running mean (warm-up average, then EMA)
    @property
    def var(self) -> Tensor: ...  # running population variance (then EMA of squared deviations)
    @property
    def count(self) -> Tensor: ...  # int64, accepted warm-up values (stops at warmup)


_CONSTS: dict[tuple[float, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}


def _consts(rate: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """Device scalars ``1`` and ``rate``, made once: a new one each step would be an op (and,
    from a Python float on a GPU, a host-to-device copy)."""
    key = (rate, like.dtype, like.device)
    c = _CONSTS.get(key)
    if c is None:
        if len(_CONSTS) > 64:
            _CONSTS.clear()
        c = _CONSTS[key] = (torch.ones((), dtype=like.dtype, device=like.device),
                            torch.full((), rate, dtype=like.dtype, device=like.device))
    return c


def running_update(
    st: RunningState, fed: Tensor, accept: Tensor, do_ema: Tensor, alpha: float, warmup: int,
    warm: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The next ``(mean, var, count)``.

    Args:
        st: the state before this step.
        fed: this step's value (after the warm-up, the caller's clipped value on a spike).
        accept: where a warm-up value counts (finite, not skipped, a watched signal).
        do_ema: where the EMA updates (the caller's rule: accepted and past the warm-up, ...).
        alpha: the EMA's decay.
        warmup: how many accepted values the warm-up averages.
        warm: ``st.count < warmup``, if the caller has it already.
    """
    if warm is None:
        warm = st.count < warmup
    one, rate = _consts(1.0 - alpha, st.mean)
    r = torch.where(warm, one / (st.count + 1), rate)  # 1/k in the warm-up, then 1 - alpha
    d = fed - st.mean
    mean = st.mean + d * r
    e = fed - mean
    var = st.var + (e * torch.where(warm, d, e) - st.var) * r
    do_warm = accept & warm
    upd = do_warm | do_ema
    return (torch.where(upd, mean, st.mean), torch.where(upd, var, st.var),
            st.count + do_warm)
