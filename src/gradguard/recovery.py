"""Spike recovery: a sync-free detector, an escalation ladder that remembers, snapshots, rollback.

:class:`SpikePolicy` is configuration plus state in two halves:

* the **detector** runs on the device every step: a running mean and variance per signal (loss,
  global gradient norm), an exact running average over the first ``warmup`` values and an
  exponential one after. A step is a spike when a signal sits more than ``z_thresh`` standard
  deviations above its mean. Non-finite values never enter the statistics, nothing is learned
  from a step whose gradients were non-finite, and **nothing is learned from a spike**: a level
  that jumps and stays up keeps spiking, so it escalates instead of being absorbed;
* the **ladder** runs on the host, on the per-step flags the Guard reads: every spike may skip its
  step (rung 1); ``trigger`` spikes within ``window`` steps are one *escalation* (an outlier batch
  is one spike, a blow-up is a run of them); an escalation rolls back to the newest snapshot that
  predates the trouble (rung 3, when ``rollback=True``), or backs the LR off (rung 2) and lets the
  detector learn the new level. The ladder remembers: escalations within ``memory`` steps raise
  the trouble level, so the back-off after a repeated rollback is ``lr_factor ** level`` (none
  after a first one, as PaLM restarted at the same LR), and a snapshot already restored once is
  passed over for an older one. After ``max_rollbacks`` rollbacks the Guard raises.

:class:`Recovery` holds the snapshots and does the restoring; the Guard owns one when rollback is
possible. A snapshot copies the model, the optimizer, the GradScaler, the scheduler and the
Guard's own state to the CPU (or to files in a directory), storing shared (tied) storage once:
with AdamW in fp32 that is 12 bytes per parameter per snapshot (weights, ``exp_avg``,
``exp_avg_sq``), 24 with the default ``keep=2``.

References: PaLM (Chowdhery et al. 2022, section 5.1: restart ~100 steps before a spike and skip
200-500 batches; the same state with the same batches spikes again), OPT (Zhang et al. 2022:
restart with a lower LR), OLMo-core's SkipStep, Megatron's ``grad_norm_skip_threshold``
(``specs/remedies.md`` part B7).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gradguard._checks import check_int, check_positive, check_probability

__all__ = ["Recovery", "Snapshot", "SpikePolicy"]

log = logging.getLogger(__name__)

_SIGNALS = ("loss", "grad_norm")
# settings that change what a saved ladder state means; on_rollback (a callable) is not saved
_CONFIG_KEYS = ("signals", "z_thresh", "alpha", "warmup", "min_rel_std", "skip", "trigger",
                "window", "lr_factor", "backoff_steps", "memory", "rollback", "rollback_after",
                "snapshot_every", "keep", "max_rollbacks", "restore_rng")


class SpikePolicy:
    """Detect loss and gradient-norm spikes without a host sync, and escalate: skip, back off, roll back.

    A step is a spike when a signal exceeds its running mean by more than ``z_thresh`` running
    standard deviations, the deviation floored at ``min_rel_std * |mean|`` so that a nearly
    constant loss does not turn a 0.1% wiggle into a "6-sigma" spike. Spikes are never learned:
    a loss that doubles and stays up keeps spiking and escalates.

    Args:
        signals: which signals feed the detector: ``"loss"`` (needs ``guard.step(..., loss=)``)
            and/or ``"grad_norm"``; ``"auto"`` watches the loss on steps that pass one and the
            gradient norm on steps that do not. ``()`` turns detection off (snapshots and rollback
            on non-finite steps only). Default: ``"auto"``: on the recovery benchmark the loss
            alone escalated only on real damage, while gradient-norm spikes after a short
            LR x10 burst (which plain clipping absorbs) cost a needless rollback and back-off.
        z_thresh: standard deviations above the mean that make a spike. Default: 6.0
            (OLMo-core's SkipStep).
        alpha: decay of the running statistics after the warm-up, in (0, 1). Default: 0.95 (a
            time constant of 20 steps: the mean keeps up with a falling loss, so the deviations
            of a fast early decline do not inflate the variance; spikes are never learned, so a
            short memory cannot absorb a blow-up).
        warmup: values averaged (exactly) before detection starts. Default: 20.
        min_rel_std: floor of the standard deviation relative to the mean. Default: 0.01.
        skip: rung 1, skip every spiking step. Default: True.
        trigger: spikes within ``window`` steps that make one escalation. Default: 3.
        window: steps over which spikes are counted. Default: 3, so an escalation needs three
            spikes in a row: one outlier batch (however large) is skipped and forgotten.
        lr_factor: rung 2, the LR multiplier of a back-off (on top of the scheduler); repeated
            trouble multiplies it again (``lr_factor ** level``). ``None`` disables back-off.
            Default: 0.5.
        backoff_steps: length of a back-off, in steps. Default: 100.
        memory: steps over which escalations are remembered (the trouble level). Default: 1000.
        rollback: rung 3, restore the newest snapshot that predates the trouble. Default: False
            (``SpikePolicy(rollback=True)`` is the recommended recovery configuration).
        rollback_after: the remembered escalation that rolls back instead of backing off; 1 rolls
            back at the first. Default: 1.
        snapshot_every: steps between snapshots. Default: 100.
        keep: snapshots kept. Default: 2.
        max_rollbacks: rollbacks allowed in the whole run before the Guard raises. Default: 3.
        on_rollback: called as ``on_rollback(from_step, to_step)`` after a rollback, so that a
            loop with its own iteration counter or data position can follow (see
            ``docs/guard.md``: rewind the counter, not the data).
        restore_rng: also restore the global RNGs (torch, CUDA, Python, NumPy) on a rollback.
            Default: False, because a loop that samples its batches from the global RNG would
            then replay the very batches that caused the spike (PaLM: the same state with the
            same batches spikes again). True restores them, as gradguard 0.1 did.
        snapshot_to: ``"cpu"`` (memory) or a directory to write snapshot files to (read back with
            ``torch.load(weights_only=True)``). Default: ``"cpu"``.

    Example:
        >>> import gradguard as gg
        >>> policy = gg.SpikePolicy(rollback=True)
        >>> policy.rungs
        ('skip', 'backoff', 'rollback')

    References:
        Chowdhery et al., "PaLM", 2022 (arXiv:2204.02311), section 5.1 (restart before the spike,
        skip 200-500 batches); Zhang et al., "OPT", 2022 (arXiv:2205.01068) (restart with a lower
        LR); Groeneveld et al., "OLMo", 2024 (SkipStep in OLMo-core).
    """

    def __init__(
        self,
        *,
        signals: str | Iterable[str] = "auto",
        z_thresh: float = 6.0,
        alpha: float = 0.95,
        warmup: int = 20,
        min_rel_std: float = 0.01,
        skip: bool = True,
        trigger: int = 3,
        window: int = 3,
        lr_factor: float | None = 0.5,
        backoff_steps: int = 100,
        memory: int = 1000,
        rollback: bool = False,
        rollback_after: int = 1,
        snapshot_every: int = 100,
        keep: int = 2,
        max_rollbacks: int = 3,
        on_rollback: Callable[[int, int], Any] | None = None,
        restore_rng: bool = False,
        snapshot_to: str | Path = "cpu",
    ) -> None:
        if signals == "auto":
            signals = ("auto",)
        elif isinstance(signals, str):
            signals = (signals,)
        sig = tuple(signals)
        bad = [s for s in sig if s not in _SIGNALS] if sig != ("auto",) else []
        if bad:
            raise ValueError(
                f"`signals` must be 'auto' or name 'loss' and/or 'grad_norm', got {bad[0]!r}; use "
                "() to turn detection off."
            )
        self.signals = sig
        self.z_thresh = check_positive("z_thresh", z_thresh, "6.0 is OLMo-core's SkipStep threshold.")
        self.alpha = check_probability("alpha", alpha, open_low=True, open_high=True)
        self.warmup = check_int("warmup", warmup, minimum=1, fix="Use e.g. 20 steps.")
        self.min_rel_std = check_probability("min_rel_std", min_rel_std)
        for name, v in (("skip", skip), ("rollback", rollback), ("restore_rng", restore_rng)):
            if not isinstance(v, bool):
                raise TypeError(f"`{name}` must be a bool, got {v!r}.")
        self.skip = skip
        self.trigger = check_int("trigger", trigger, minimum=1, fix="Use e.g. 3 spikes.")
        self.window = check_int("window", window, minimum=1, fix="Use e.g. 3 steps.")
        if self.trigger > self.window:
            raise ValueError(
                f"`trigger` ({self.trigger}) spikes cannot fit in `window` ({self.window}) steps; "
                f"use window >= trigger (e.g. window={self.trigger})."
            )
        self.lr_factor = None if lr_factor is None else check_probability(
            "lr_factor", lr_factor, open_low=True, open_high=True
        )
        self.backoff_steps = check_int("backoff_steps", backoff_steps, minimum=1, fix="Use e.g. 100 steps.")
        self.memory = check_int("memory", memory, minimum=1, fix="Use e.g. 1000 steps.")
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
        self.restore_rng = restore_rng
        if not isinstance(snapshot_to, (str, Path)):
            raise TypeError(f"`snapshot_to` must be 'cpu' or a directory path, got {snapshot_to!r}.")
        self.snapshot_to = snapshot_to if snapshot_to == "cpu" else str(snapshot_to)
        # device half: rows (mean, var, count) x columns (loss, grad_norm)
        self.state: Tensor | None = None
        self._nan: Tensor | None = None
        # host half: the ladder
        self._spikes: deque[int] = deque()
        self._escalations: deque[int] = deque()  # ticks (never rewound) of remembered escalations
        self._tick = 0
        self.streak_start: int | None = None
        self.backoff_until = 0
        self.backoff_factor = 1.0
        self._pending_level = 0
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

    @property
    def level(self) -> int:
        """Escalations remembered (within ``memory`` steps): the trouble level."""
        return len(self._escalations)

    def needs_host_each_step(self) -> bool:
        """True when a rung acts on the host per step (back-off), or spikes are invisible in history."""
        if not self.signals:
            return False
        return self.lr_factor is not None or (self.rollback and not self.skip)

    # -- device half ------------------------------------------------------------------------------
    def bind(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        """Create the detector state on ``device`` (called once by the Guard, with the norms' dtype)."""
        if self.state is not None:
            raise ValueError(
                "this SpikePolicy is already bound to a Guard; it keeps per-run state, so create "
                "one SpikePolicy per Guard."
            )
        self.state = torch.zeros(3, 2, dtype=dtype, device=device)
        self._nan = torch.full((), math.nan, dtype=dtype, device=device)

    def detect(self, grad_norm: Tensor, loss: Tensor | None, blocked: Tensor) -> Tensor:
        """Update the detector with this step's signals; return a 0-dim bool spike flag (no sync).

        ``blocked`` (0-dim bool) marks a step whose gradients were non-finite: nothing is learned.
        About 25 elementwise ops on 2-element tensors.
        """
        st, nan = self.state, self._nan
        if st is None or nan is None:
            raise RuntimeError(
                "this SpikePolicy is not bound to a device yet; pass it to gg.Guard(model, "
                "spike=...) (or call bind(device) first)."
            )
        dt = st.dtype
        sig = self.signals
        if sig == ("auto",):
            sig = ("loss",) if loss is not None else ("grad_norm",)
        lval = loss.to(dt) if loss is not None and "loss" in sig else nan
        nval = grad_norm.to(dt) if "grad_norm" in sig else nan
        x = torch.stack([lval, nval]).nan_to_num_(math.nan, math.nan, math.nan)
        x.masked_fill_(blocked, math.nan)
        mean, var, count = st.unbind(0)
        c1 = count + 1
        w = c1.reciprocal().clamp_min_(1.0 - self.alpha)  # exact mean over the warm-up, then EMA
        delta = x - mean
        # spike: delta > z * sqrt(var + (min_rel_std * mean)^2), once the warm-up is over
        floor = torch.add(var, mean.square(), alpha=self.min_rel_std ** 2)
        spike = (delta > floor.sqrt_().mul_(self.z_thresh)) & (count >= self.warmup)
        learn = (x == x) > spike  # finite (no inf left) and not a spike
        # Welford's update written as an EMA with weight w: var' = (1 - w)(var + w delta^2)
        wd = w * delta
        new = torch.stack([mean + wd, (var + wd * delta).mul_(1.0 - w), c1])
        self.state = torch.where(learn, new, st)
        return spike.any()

    def rearm(self) -> None:
        """Start the detector over (it learns the current level in ``warmup`` steps)."""
        if self.state is not None:
            self.state = torch.zeros_like(self.state)

    # -- host half --------------------------------------------------------------------------------
    def lr_scale(self, step: int) -> float:
        """The multiplier on every param group's LR at guard step ``step``."""
        return self.backoff_factor if step < self.backoff_until else 1.0

    def observe(self, step: int, spike: bool) -> str:
        """Feed one step's spike flag to the ladder; return ``"none"``, ``"backoff"`` or ``"rollback"``."""
        self._tick += 1
        while self._escalations and self._escalations[0] <= self._tick - self.memory:
            self._escalations.popleft()
        if not spike:
            if self.streak_start is not None and (not self._spikes
                                                  or step - self._spikes[-1] >= self.window):
                self.streak_start = None
            return "none"
        if self.streak_start is None:
            self.streak_start = step
        self._spikes.append(step)
        while self._spikes and self._spikes[0] <= step - self.window:
            self._spikes.popleft()
        if len(self._spikes) < self.trigger:
            return "none"
        self._spikes.clear()
        level = len(self._escalations)  # escalations remembered before this one
        self._escalations.append(self._tick)
        if self.rollback and level + 1 >= self.rollback_after:
            self._pending_level = level
            return "rollback"
        self.rearm()  # no way back: learn the new level, at a lower LR when back-off is on
        self.streak_start = None
        if self.lr_factor is not None:
            self.backoff_factor = self.lr_factor ** (level + 1)
            self.backoff_until = step + 1 + self.backoff_steps
            return "backoff"
        return "none"

    def after_rollback(self, to_step: int) -> None:
        """Reset the streak after a rollback to ``to_step``; back off if the trouble repeats."""
        self.rollbacks += 1
        self._spikes.clear()
        self.streak_start = None
        if self.lr_factor is not None and self._pending_level > 0:
            self.backoff_factor = self.lr_factor ** self._pending_level
            self.backoff_until = to_step + self.backoff_steps
        else:
            self.backoff_until = 0
        self._pending_level = 0

    # -- state ------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        return {k: (list(self.signals) if k == "signals" else getattr(self, k)) for k in _CONFIG_KEYS}

    def detector_state(self) -> dict[str, Any] | None:
        if self.state is None:
            return None
        return {"stats": self.state.detach().clone()}

    def load_detector_state(self, saved: dict[str, Any] | None) -> None:
        if saved is None or self.state is None:
            return
        self.state = saved["stats"].to(device=self.state.device, dtype=self.state.dtype).clone()

    def ladder_state(self) -> dict[str, Any]:
        return {"spikes": list(self._spikes), "escalations": list(self._escalations),
                "tick": self._tick, "streak_start": self.streak_start,
                "backoff_until": self.backoff_until, "backoff_factor": self.backoff_factor,
                "rollbacks": self.rollbacks}

    def load_ladder_state(self, s: dict[str, Any]) -> None:
        self._spikes = deque(s["spikes"])
        self._escalations = deque(s["escalations"])
        self._tick = s["tick"]
        self.streak_start = s["streak_start"]
        self.backoff_until = s["backoff_until"]
        self.backoff_factor = s["backoff_factor"]
        self.rollbacks = s["rollbacks"]

    def state_dict(self) -> dict[str, Any]:
        """Configuration, detector tensors and ladder counters (snapshots are not included)."""
        return {"config": self._config(), "detector": self.detector_state(),
                "ladder": self.ladder_state()}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore :meth:`state_dict`'s output.

        Args:
            state_dict: what :meth:`state_dict` returned (e.g. through ``torch.load(...,
                weights_only=True)``).
            strict: raise ``ValueError`` naming the first setting that differs from this policy's
                (a ladder state means something else under other settings). False loads anyway
                and logs the differences.
        """
        saved = state_dict.get("config", {})
        mine = self._config()
        diff = [k for k in _CONFIG_KEYS if k in saved and _norm(saved[k]) != _norm(mine[k])]
        if diff:
            k = diff[0]
            msg = (f"the checkpoint's SpikePolicy has {k}={saved[k]!r} but this one has "
                   f"{k}={mine[k]!r}" + (f" (and {len(diff) - 1} more settings differ)"
                                         if len(diff) > 1 else ""))
            if strict:
                raise ValueError(
                    msg + "; construct the SpikePolicy with the checkpoint's settings, or pass "
                    "strict=False to load the state anyway."
                )
            log.warning("gradguard: %s; loading anyway (strict=False)", msg)
        det, ladder = state_dict.get("detector"), state_dict["ladder"]
        if (det is not None and "stats" not in det) or "tick" not in ladder:
            msg = ("the checkpoint's SpikePolicy state was saved by gradguard 0.1, whose detector "
                   "kept other statistics")
            if strict:
                raise ValueError(msg + "; pass strict=False to keep its rollback count and start "
                                 "the detector over.")
            log.warning("gradguard: %s; keeping the rollback count, the detector starts over", msg)
            self.rollbacks = int(ladder.get("rollbacks", 0))
            return
        self.load_detector_state(det)
        self.load_ladder_state(ladder)

    def __repr__(self) -> str:
        return "SpikePolicy(" + ", ".join(f"{k}={v!r}" for k, v in self._config().items()) + ")"


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


# -- snapshots ---------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    """One restore point: everything a rollback puts back (CPU tensors, or a file's path)."""

    step: int
    data: dict[str, Any] | None
    path: str | None = None
    restored: int = 0

    def load(self) -> dict[str, Any]:
        if self.data is not None:
            return self.data
        return torch.load(self.path, weights_only=True)  # type: ignore[arg-type]


def _to_cpu(obj: Any, memo: dict[tuple[Any, ...], Tensor]) -> Any:
    """Deep copy with every tensor cloned to the CPU; tensors viewing the same storage (tied
    weights) are copied once and stay shared."""
    if isinstance(obj, Tensor):
        t = obj.detach()
        key = (t.untyped_storage().data_ptr(), t.device, t.dtype, t.storage_offset(),
               tuple(t.shape), t.stride())
        out = memo.get(key)
        if out is None:
            out = memo[key] = t.to("cpu", copy=True)
        return out
    if isinstance(obj, dict):
        return {k: _to_cpu(v, memo) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v, memo) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v, memo) for v in obj)
    return copy.deepcopy(obj)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached)
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def snapshot_bytes(snapshot: dict[str, Any]) -> int:
    """Bytes of tensor storage one snapshot holds (shared storage counted once)."""
    seen: set[int] = set()
    total = 0

    def walk(o: Any) -> None:
        nonlocal total
        if isinstance(o, Tensor):
            ptr = o.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(snapshot)
    return total


class Recovery:
    """The snapshots a :class:`SpikePolicy` rolls back to, and the restoring itself.

    The Guard owns one; it calls :meth:`snapshot` every ``snapshot_every`` steps and
    :meth:`restore` when the ladder (or the non-finite limit) decides to roll back.
    """

    def __init__(self, policy: SpikePolicy) -> None:
        self.policy = policy
        self.snapshots: deque[Snapshot] = deque()

    def snapshot(self, step: int, model: nn.Module, optimizer: Any, scaler: Any, scheduler: Any,
                 guard_state: dict[str, Any]) -> None:
        """Copy everything a rollback restores (a synchronous device-to-host copy)."""
        memo: dict[tuple[Any, ...], Tensor] = {}
        data = {
            "model": _to_cpu(model.state_dict(), memo),
            "optimizer": _to_cpu(optimizer.state_dict(), memo),
            "scaler": _to_cpu(scaler.state_dict(), memo) if scaler is not None else None,
            "scheduler": _to_cpu(scheduler.state_dict(), memo) if scheduler is not None else None,
            "rng": _rng_state() if self.policy.restore_rng else None,
            "guard": _to_cpu(guard_state, memo),
        }
        snap = Snapshot(step, data)
        if self.policy.snapshot_to != "cpu":
            d = Path(self.policy.snapshot_to)
            d.mkdir(parents=True, exist_ok=True)
            path = d / f"gradguard-snapshot-{step}.pt"
            torch.save(data, path)
            snap = Snapshot(step, None, str(path))
        self.snapshots.append(snap)
        while len(self.snapshots) > self.policy.keep:
            self._drop(self.snapshots.popleft())

    @staticmethod
    def _drop(snap: Snapshot) -> None:
        if snap.path is not None:
            Path(snap.path).unlink(missing_ok=True)

    @property
    def latest_step(self) -> int | None:
        return self.snapshots[-1].step if self.snapshots else None

    def choose(self, before: int) -> Snapshot | None:
        """The newest snapshot at or before step ``before`` that was never restored; else the
        oldest at or before it (never the same point over and over while an older one exists)."""
        cands = [s for s in self.snapshots if s.step <= before] or list(self.snapshots)[:1]
        fresh = [s for s in cands if s.restored == 0]
        if fresh:
            return fresh[-1]
        return cands[0] if cands else None

    def restore(self, snap: Snapshot, model: nn.Module, optimizer: Any, scaler: Any,
                scheduler: Any) -> dict[str, Any]:
        """Put ``snap`` back into the live objects; returns the Guard's saved state."""
        data = snap.load()
        model.load_state_dict(data["model"])
        optimizer.load_state_dict(_to_cpu(data["optimizer"], {}))  # a copy: it may alias
        if scaler is not None and data["scaler"] is not None:
            scaler.load_state_dict(_to_cpu(data["scaler"], {}))
        if scheduler is not None and data["scheduler"] is not None:
            scheduler.load_state_dict(_to_cpu(data["scheduler"], {}))
        if data["rng"] is not None:
            _set_rng_state(data["rng"])
        snap.restored += 1
        while self.snapshots and self.snapshots[-1].step > snap.step:
            self._drop(self.snapshots.pop())
        return data["guard"]

    def clear(self) -> None:
        while self.snapshots:
            self._drop(self.snapshots.pop())
