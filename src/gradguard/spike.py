"""Spike recovery: a sync-free detector on the loss and the gradient norm, and an escalation ladder.

:class:`SpikePolicy` is configuration plus state in two halves:

* the **detector** runs on the device every step: an EMA z-score per signal (loss, global
  gradient norm), started by a Welford warm-up, exactly as :class:`gradguard.ZClip` tracks norms.
  Non-finite values never enter the statistics, and nothing is learned from a step whose
  gradients were non-finite. A spike feeds the EMA with its clamped value
  ``mean + z_thresh * std`` (ZClip's rule), so a genuine, lasting level shift is absorbed within
  a few dozen steps instead of being skipped forever;
* the **ladder** runs on the host, on the per-step flags the Guard reads: every spike may skip
  its step (rung 1); ``trigger`` spikes within ``window`` steps are one *escalation*; an
  escalation multiplies every parameter group's learning rate by ``lr_factor`` for
  ``backoff_steps`` steps (rung 2, a multiplier on top of the scheduler); the
  ``rollback_after``-th escalation of one streak restores the last good in-memory snapshot
  (rung 3) and calls ``on_rollback(from_step, to_step)``; after ``max_rollbacks`` rollbacks the
  Guard raises. A streak ends when ``window`` steps pass with no spike and no back-off active.

References: OLMo-core's SkipStep (rolling z-score, skip), Megatron's ``grad_norm_skip_threshold``,
OPT's and PaLM's manual rollback with a lower LR and skipped batches (``specs/remedies.md``
section 1.14-1.16 and part B7).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gradguard._checks import check_int, check_positive, check_probability
from gradguard._ema import warmup_then_ema

__all__ = ["SpikePolicy"]

_SIGNALS = ("loss", "grad_norm")


class DetectorState(NamedTuple):
    """EMA z-score state, one entry per signal (``loss``, ``grad_norm``)."""

    mean: Tensor  # (2,) float64
    var: Tensor  # (2,) float64
    count: Tensor  # (2,) int64 accepted warm-up values (stops at warmup)
    w_mean: Tensor  # (2,) Welford running mean
    w_m2: Tensor  # (2,) Welford running sum of squared deviations


class SpikePolicy:
    """Detect loss and gradient-norm spikes without a host sync, and escalate: skip, back off, roll back.

    A step is a spike when a signal's z-score against its EMA exceeds ``z_thresh``:
    ``z = (x - mean) / max(std, min_rel_std * |mean|)``. The floor ``min_rel_std`` keeps a nearly
    constant loss from turning a 0.1% wiggle into a "6-sigma" spike.

    Args:
        signals: which signals feed the detector: ``"loss"`` (needs ``guard.step(..., loss=)``)
            and/or ``"grad_norm"``. ``()`` turns detection off (snapshots and rollback on
            non-finite steps only). Default: both.
        z_thresh: z-score above which a value is a spike. Default: 6.0 (OLMo-core's SkipStep).
        alpha: EMA smoothing factor in (0, 1). Default: 0.98.
        warmup: values collected (Welford) before detection starts. Default: 20.
        min_rel_std: floor of the standard deviation relative to the mean. Default: 0.01.
        skip: rung 1, skip every spiking step. Default: True.
        trigger: spikes within ``window`` steps that make one escalation. Default: 2.
        window: steps over which spikes are counted; also how long a streak lasts without
            spikes. Default: 50.
        lr_factor: rung 2, multiply every param group's LR by this for ``backoff_steps`` steps
            after an escalation; ``None`` disables back-off. Default: 0.5.
        backoff_steps: length of a back-off, in steps. Default: 100.
        rollback: rung 3, restore the last good in-memory snapshot. Default: False.
        rollback_after: the escalation (within one streak) that rolls back instead of backing
            off; 1 rolls back at the first escalation. Default: 2.
        snapshot_every: steps between in-memory snapshots (model, optimizer, scaler, scheduler,
            RNG, the Guard's state; the last ``keep`` are kept on the CPU). Default: 100.
        keep: snapshots kept. Default: 2.
        max_rollbacks: rollbacks allowed in the whole run before the Guard raises. Default: 3.
        on_rollback: called as ``on_rollback(from_step, to_step)`` after a rollback, so the data
            pipeline can skip the batches that led to the spike (PaLM skipped 200-500).

    Example:
        >>> import gradguard as gg
        >>> policy = gg.SpikePolicy(z_thresh=6.0, lr_factor=0.5, backoff_steps=100)
        >>> policy.rungs
        ('skip', 'backoff')

    References:
        Chowdhery et al., "PaLM", 2022 (arXiv:2204.02311), section 5.1 (restart before the spike,
        skip 200-500 batches); Zhang et al., "OPT", 2022 (arXiv:2205.01068) (restart with a lower
        LR); Groeneveld et al., "OLMo", 2024 (SkipStep in OLMo-core).
    """

    def __init__(
        self,
        *,
        signals: Iterable[str] = _SIGNALS,
        z_thresh: float = 6.0,
        alpha: float = 0.98,
        warmup: int = 20,
        min_rel_std: float = 0.01,
        skip: bool = True,
        trigger: int = 2,
        window: int = 50,
        lr_factor: float | None = 0.5,
        backoff_steps: int = 100,
        rollback: bool = False,
        rollback_after: int = 2,
        snapshot_every: int = 100,
        keep: int = 2,
        max_rollbacks: int = 3,
        on_rollback: Callable[[int, int], Any] | None = None,
    ) -> None:
        if isinstance(signals, str):
            signals = (signals,)
        sig = tuple(signals)
        bad = [s for s in sig if s not in _SIGNALS]
        if bad:
            raise ValueError(
                f"`signals` must name 'loss' and/or 'grad_norm', got {bad[0]!r}; use () to turn "
                "detection off."
            )
        self.signals = sig
        self.z_thresh = check_positive("z_thresh", z_thresh, "6.0 is OLMo-core's SkipStep threshold.")
        self.alpha = check_probability("alpha", alpha, open_low=True, open_high=True)
        self.warmup = check_int("warmup", warmup, minimum=1, fix="Use e.g. 20 steps.")
        self.min_rel_std = check_probability("min_rel_std", min_rel_std)
        for name, v in (("skip", skip), ("rollback", rollback)):
            if not isinstance(v, bool):
                raise TypeError(f"`{name}` must be a bool, got {v!r}.")
        self.skip = skip
        self.trigger = check_int("trigger", trigger, minimum=1, fix="Use e.g. 2 spikes.")
        self.window = check_int("window", window, minimum=1, fix="Use e.g. 50 steps.")
        self.lr_factor = None if lr_factor is None else check_probability(
            "lr_factor", lr_factor, open_low=True, open_high=True
        )
        self.backoff_steps = check_int("backoff_steps", backoff_steps, minimum=1, fix="Use e.g. 100 steps.")
        self.rollback = rollback
        self.rollback_after = check_int("rollback_after", rollback_after, minimum=1,
                                        fix="1 rolls back at the first escalation.")
        self.snapshot_every = check_int("snapshot_every", snapshot_every, minimum=1,
                                        fix="Use e.g. 100 steps (more than the Guard's flush_every).")
        self.keep = check_int("keep", keep, minimum=1, fix="2 keeps a snapshot that predates a spike window.")
        self.max_rollbacks = check_int("max_rollbacks", max_rollbacks, minimum=0,
                                       fix="Ultralytics allows 3.")
        if on_rollback is not None and not callable(on_rollback):
            raise TypeError(
                f"`on_rollback` must be callable as on_rollback(from_step, to_step), got "
                f"{type(on_rollback).__name__}."
            )
        self.on_rollback = on_rollback
        self.state: DetectorState | None = None
        self._mask: Tensor | None = None
        # host-side ladder state
        self._spikes: deque[int] = deque()
        self.escalations = 0
        self.streak_start: int | None = None
        self._last_event: int | None = None
        self.backoff_until = 0
        self.rollbacks = 0

    @property
    def rungs(self) -> tuple[str, ...]:
        """The enabled rungs, in escalation order."""
        out = []
        if self.signals and self.skip:
            out.append("skip")
        if self.signals and self.lr_factor is not None:
            out.append("backoff")
        if self.rollback:
            out.append("rollback")
        return tuple(out)

    @property
    def detecting(self) -> bool:
        return bool(self.signals)

    def needs_host_each_step(self) -> bool:
        """True when a rung acts on the host per step (back-off), or spikes are invisible in history."""
        if not self.signals:
            return False
        return self.lr_factor is not None or (self.rollback and not self.skip)

    # -- device half ------------------------------------------------------------------------------
    def bind(self, device: torch.device) -> None:
        """Create the detector state on ``device`` (called once by the Guard)."""
        if self.state is not None:
            raise ValueError(
                "this SpikePolicy is already bound to a Guard; it keeps per-run state, so create "
                "one SpikePolicy per Guard."
            )
        dt = torch.float32 if device.type == "mps" else torch.float64
        z = torch.zeros(2, dtype=dt, device=device)
        self.state = DetectorState(z, z.clone(), torch.zeros(2, dtype=torch.int64, device=device),
                                   z.clone(), z.clone())
        self._mask = torch.tensor([s in self.signals for s in _SIGNALS], device=device)

    def detect(self, grad_norm: Tensor, loss: Tensor | None, blocked: Tensor) -> Tensor:
        """Update the detector with this step's signals; return a 0-dim bool spike flag (no sync).

        ``blocked`` (0-dim bool) marks a step whose gradients were non-finite: nothing is learned.
        """
        st = self.state
        if st is None or self._mask is None:
            raise RuntimeError(
                "this SpikePolicy is not bound to a device yet; pass it to gg.Guard(model, "
                "spike=...) (or call bind(device) first)."
            )
        dev = st.mean.device
        norm = grad_norm.detach().reshape(()).to(device=dev, dtype=st.mean.dtype)
        if loss is None:
            lval = torch.full_like(norm, math.nan)
        else:
            lval = loss.detach().reshape(()).to(device=dev, dtype=st.mean.dtype)
        x = torch.stack([lval, norm])
        present = self._mask & torch.isfinite(x) & ~blocked.to(dev)
        warm = st.count < self.warmup

        std = torch.maximum(torch.sqrt(st.var), self.min_rel_std * st.mean.abs())
        std = torch.clamp(std, min=torch.finfo(x.dtype).tiny)
        z = (x - st.mean) / std
        spikes = present & ~warm & (z > self.z_thresh)
        fed = torch.where(spikes, st.mean + self.z_thresh * std, x)
        do_ema = present & ~warm
        self.state = DetectorState(*warmup_then_ema(st, x, present, fed, do_ema, self.alpha,
                                                    self.warmup))
        return spikes.any()

    # -- host half --------------------------------------------------------------------------------
    def lr_scale(self, step: int) -> float:
        """The multiplier on every param group's LR at guard step ``step``."""
        if self.lr_factor is not None and step < self.backoff_until:
            return self.lr_factor
        return 1.0

    def observe(self, step: int, spike: bool) -> str:
        """Feed one step's spike flag to the ladder; return ``"none"``, ``"backoff"`` or ``"rollback"``."""
        if self.streak_start is not None and not spike:
            quiet_since = self._last_event if self._last_event is not None else step
            if step - quiet_since >= self.window and step >= self.backoff_until:
                self.escalations = 0
                self.streak_start = None
        if not spike:
            return "none"
        if self.streak_start is None:
            self.streak_start = step
        self._last_event = step
        self._spikes.append(step)
        while self._spikes and self._spikes[0] <= step - self.window:
            self._spikes.popleft()
        if len(self._spikes) < self.trigger:
            return "none"
        self._spikes.clear()
        self.escalations += 1
        if self.rollback and (self.lr_factor is None or self.escalations >= self.rollback_after):
            return "rollback"
        if self.lr_factor is not None:
            self.backoff_until = step + 1 + self.backoff_steps
            return "backoff"
        return "none"

    def after_rollback(self, to_step: int) -> None:
        """Reset the streak after a rollback to ``to_step``; start a back-off if that rung is on."""
        self.rollbacks += 1
        self._spikes.clear()
        self.escalations = 0
        self.streak_start = None
        self._last_event = None
        self.backoff_until = to_step + self.backoff_steps if self.lr_factor is not None else 0

    # -- state ------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {"signals": self.signals, "z_thresh": self.z_thresh, "alpha": self.alpha,
                "warmup": self.warmup, "min_rel_std": self.min_rel_std, "skip": self.skip,
                "trigger": self.trigger, "window": self.window, "lr_factor": self.lr_factor,
                "backoff_steps": self.backoff_steps, "rollback": self.rollback,
                "rollback_after": self.rollback_after, "snapshot_every": self.snapshot_every,
                "keep": self.keep, "max_rollbacks": self.max_rollbacks}

    def detector_state(self) -> dict[str, Tensor] | None:
        if self.state is None:
            return None
        return {k: v.detach().clone() for k, v in self.state._asdict().items()}

    def load_detector_state(self, saved: dict[str, Tensor] | None) -> None:
        if saved is None or self.state is None:
            return
        cur = self.state._asdict()
        self.state = DetectorState(
            **{k: saved[k].to(device=cur[k].device, dtype=cur[k].dtype).clone() for k in cur}
        )

    def ladder_state(self) -> dict[str, Any]:
        return {"spikes": list(self._spikes), "escalations": self.escalations,
                "streak_start": self.streak_start, "last_event": self._last_event,
                "backoff_until": self.backoff_until, "rollbacks": self.rollbacks}

    def load_ladder_state(self, s: dict[str, Any]) -> None:
        self._spikes = deque(s["spikes"])
        self.escalations = s["escalations"]
        self.streak_start = s["streak_start"]
        self._last_event = s["last_event"]
        self.backoff_until = s["backoff_until"]
        self.rollbacks = s["rollbacks"]

    def state_dict(self) -> dict[str, Any]:
        """Configuration, detector tensors and ladder counters (snapshots are not included)."""
        return {"config": self._config(), "detector": self.detector_state(),
                "ladder": self.ladder_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_detector_state(state_dict.get("detector"))
        self.load_ladder_state(state_dict["ladder"])

    def __repr__(self) -> str:
        return "SpikePolicy(" + ", ".join(f"{k}={v!r}" for k, v in self._config().items()) + ")"
