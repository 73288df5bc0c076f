"""The running mean and variance that ZClip and SpikePolicy keep on the device.

The first ``warmup`` accepted values are averaged with Welford's algorithm; the ``warmup``-th one
sets the mean and variance, and every accepted value after it updates them as an exponential
moving average. Everything is tensor arithmetic on the state's device: no host sync.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class RunningState(Protocol):
    """The fields both states share (``ZClipState``, ``DetectorState``)."""

    @property
    def mean(self) -> Tensor: ...  # EMA mean (valid once count == warmup)
    @property
    def var(self) -> Tensor: ...  # EMA of the squared deviation
    @property
    def count(self) -> Tensor: ...  # int64, accepted warm-up values (stops at warmup)
    @property
    def w_mean(self) -> Tensor: ...  # Welford running mean over the warm-up
    @property
    def w_m2(self) -> Tensor: ...  # Welford running sum of squared deviations


def warmup_then_ema(
    st: RunningState, value: Tensor, accept: Tensor, fed: Tensor, do_ema: Tensor, alpha: float,
    warmup: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The next ``(mean, var, count, w_mean, w_m2)``.

    Args:
        st: the state before this step.
        value: this step's value; during the warm-up an accepted one joins the Welford average.
        accept: where ``value`` counts at all (finite, not skipped, a watched signal).
        fed: what the EMA takes after the warm-up (the caller's clipped value on a spike).
        do_ema: where the EMA updates (the caller's rule: accepted and past the warm-up, ...).
        alpha: the EMA's decay: ``mean = alpha * mean + (1 - alpha) * fed``.
        warmup: how many accepted values the warm-up averages.
    """
    warm = st.count < warmup
    k1 = (st.count + 1).to(value.dtype)
    delta = value - st.w_mean
    w_mean = st.w_mean + delta / k1
    w_m2 = st.w_m2 + delta * (value - w_mean)
    do_warm = accept & warm
    starts = do_warm & (st.count + 1 == warmup)

    mean_new = alpha * st.mean + (1 - alpha) * fed
    var_new = alpha * st.var + (1 - alpha) * (fed - mean_new) ** 2
    return (
        torch.where(do_ema, mean_new, torch.where(starts, w_mean, st.mean)),
        torch.where(do_ema, var_new, torch.where(starts, w_m2 / warmup, st.var)),
        st.count + do_warm.to(torch.int64),
        torch.where(do_warm, w_mean, st.w_mean),
        torch.where(do_warm, w_m2, st.w_m2),
    )
