"""The per-step Guard: statistics, clipping, safe skipping, spike recovery and a free history.

One call per optimizer step replaces ``clip_grad_norm_`` + ``optimizer.step()`` (+
``scaler.step``/``scaler.update`` under AMP, + ``scheduler.step()`` when the Guard is given the
scheduler)::

    loss.backward()
    guard.step(optimizer, scaler=None, loss=loss)   # -> StepOutcome of device tensors
    optimizer.zero_grad()

Per step: ``scaler.unscale_`` once (AMP) -> one pass over the gradients for the global norm, the
per-layer norms and the non-finite flag (:mod:`gradguard.stats`) -> the spike detector -> the
clipping policy -> the optimizer step, skipped if the gradients are non-finite (or the step is a
spike) -> one history row on the device. Every ``flush_every`` steps one host read moves the
rows to :attr:`Guard.history` and the sinks.

Host syncs per step: **zero** with a fused optimizer (``fused=True``: it takes the skip flag as
its ``found_inf`` tensor and skips inside the kernel) once its state exists (its first step takes
the one-sync path, so that a skipped first step leaves ``optimizer.state`` empty) and when nothing
else needs the flag on the host (no scheduler handed to the Guard, no LR back-off); otherwise
**one** (a plain optimizer can be skipped only by not calling ``step()``, and the scheduler only by
not calling ``scheduler.step()``). Plus one per flush.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from gradguard._checks import check_choice, check_int, check_positive
from gradguard._plan import ParamPlan, display_name
from gradguard.distributed import has_dtensor, is_distributed, sharded_update_ratio, step_stats
from gradguard.history import History, HistoryBuffer
from gradguard.policies import ClipPolicy, FixedClip
from gradguard.recovery import Recovery, SpikePolicy
from gradguard.sinks import call_sinks
from gradguard.stats import UnsupportedGradient, use_foreach

__all__ = ["Guard", "GuardError", "StepOutcome"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1


class GuardError(RuntimeError):
    """Raised when the Guard gives up: too many consecutive non-finite steps, or rollbacks."""


class StepOutcome(NamedTuple):
    """What one :meth:`Guard.step` did; every field is a 0-dim device tensor (read it lazily).

    Attributes:
        global_norm: the global gradient norm before clipping (after AMP unscaling).
        clipped: True when the policy scaled the gradients down.
        skipped: True when the optimizer step was not applied (non-finite gradients or a spike).
        threshold: the norm the gradients were clipped to, or would have been above
            (``+inf`` when the policy has no norm threshold).
    """

    global_norm: Tensor
    clipped: Tensor
    skipped: Tensor
    threshold: Tensor


def _group_lr(optimizer: Any, scale: float) -> Tensor | float:
    """The first param group's effective LR (what the step used): the scheduler's times the back-off."""
    lr = optimizer.param_groups[0].get("lr", math.nan)
    return lr * scale if scale != 1.0 else lr


def _param_count(optimizer: Any) -> int:
    return sum(len(g["params"]) for g in optimizer.param_groups)


def _is_scheduler(obj: Any) -> bool:
    return callable(getattr(obj, "step", None)) and callable(getattr(obj, "state_dict", None))


class Guard:
    r"""Guard an optimizer's steps: clip adaptively, skip non-finite steps safely, recover from
    spikes, and record per-layer gradient statistics on every step for free.

    Args:
        model: the module whose parameters the optimizer updates. Its trainable parameters, in
            module order (``named_parameters()``), are planned once, here.
        clip: ``None`` (measure only), a policy (:class:`FixedClip`, :class:`ValueClip`,
            :class:`AGC`, :class:`AutoClip`, :class:`ZClip`), or a float ``max_norm``
            (``FixedClip(max_norm)``).
        skip_nonfinite: skip the optimizer step when any gradient is NaN/Inf (or the norm
            overflows). The optimizer and its state are left bit-identical; the gradients are
            zeroed; the scheduler is not stepped; no policy state changes. The decision is taken
            on the gradients (under AMP, also on the scaler's ``found_inf``); a non-finite
            ``loss`` with finite gradients is recorded and kept out of the spike statistics but
            does not skip the step. Default: True.
        spike: a :class:`SpikePolicy` (skip, LR back-off, rollback on loss/norm spikes; its
            snapshots and restoring live in :mod:`gradguard.recovery`), or None (off, the
            default). ``gg.SpikePolicy(rollback=True)`` is the recommended recovery configuration.
        scheduler: an LR scheduler the Guard steps after every applied optimizer step (and not
            after a skipped one). Leave None to step it yourself.
        sinks: callables given each flushed :class:`History` chunk (:class:`JSONLSink`,
            :class:`CSVSink`, :class:`TensorBoardSink`, any function).
        flush_every: steps between flushes (one host read each). Default: 50.
        max_consecutive: consecutive non-finite steps tolerated; the next one raises
            :class:`GuardError` naming the first layer that went non-finite, or rolls back.
            Default: 3.
        on_nonfinite: ``"raise"`` or ``"rollback"`` (restore the last in-memory snapshot; the
            snapshot settings come from ``spike``, or SpikePolicy's defaults).
        measure_updates: record the per-layer update/weight ratio ``||dw|| / ||w||`` every k
            steps (it costs a copy of the parameters on those steps): an int k (0 = never), or
            ``"auto"`` (once per flush interval). Default: ``"auto"``.
        history_rows: flushed rows kept in :attr:`history` (the oldest are dropped; sinks keep
            everything). Default: 2000.
        foreach: use the foreach kernels (None: where supported, as ``torch.nn.utils``).
        process_group: under ``torch.distributed`` with more than one rank, the group over which
            the statistics and the loss are reduced, in one packed all-reduce per step, so that
            every rank takes the same decisions (:mod:`gradguard.distributed`). None: the default
            group. Single-process runs are unaffected.

    Example:
        >>> import torch, gradguard as gg
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = gg.Guard(model, clip=1.0, flush_every=5)
        >>> for _ in range(5):
        ...     loss = model(torch.randn(16, 4)).pow(2).mean()
        ...     loss.backward()
        ...     out = guard.step(opt, loss=loss)
        ...     opt.zero_grad()
        >>> len(guard.history), bool(out.skipped)
        (5, False)

    References:
        ``specs/remedies.md`` parts B6 (skip non-finite steps) and B7 (spike ladder); optax
        ``apply_if_finite`` (which applies the update after too many errors; the Guard raises or
        rolls back instead).
    """

    def __init__(
        self,
        model: nn.Module,
        clip: ClipPolicy | float | None = None,
        skip_nonfinite: bool = True,
        spike: SpikePolicy | None = None,
        scheduler: Any | None = None,
        sinks: Iterable[Callable[[History], Any]] = (),
        flush_every: int = 50,
        max_consecutive: int = 3,
        on_nonfinite: str = "raise",
        measure_updates: int | str = "auto",
        *,
        history_rows: int = 2_000,
        foreach: bool | None = None,
        process_group: Any = None,
    ) -> None:
        self._plan = ParamPlan.from_module(model)
        self.model = model
        if clip is None or isinstance(clip, ClipPolicy):
            self.clip = clip
        elif isinstance(clip, (int, float)) and not isinstance(clip, bool):
            self.clip = FixedClip(check_positive(
                "clip", clip, "A number means FixedClip(max_norm); pass e.g. clip=1.0."))
        else:
            raise TypeError(
                f"`clip` must be None, a number (max_norm) or a policy such as gg.ZClip(), got "
                f"{type(clip).__name__}: {clip!r:.80}."
            )
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"`skip_nonfinite` must be a bool, got {skip_nonfinite!r}.")
        self.skip_nonfinite = skip_nonfinite
        if spike is not None and not isinstance(spike, SpikePolicy):
            raise TypeError(
                f"`spike` must be a gg.SpikePolicy(...) or None, got {type(spike).__name__}."
            )
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("raise", "rollback"))
        if on_nonfinite == "rollback" and spike is None:
            spike = SpikePolicy(signals=(), rollback=True)
        self.spike = spike
        if scheduler is not None:
            if not _is_scheduler(scheduler):
                raise TypeError(
                    f"`scheduler` must be an LR scheduler (with step() and state_dict()), got "
                    f"{type(scheduler).__name__}."
                )
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise ValueError(
                    "`scheduler` is a ReduceLROnPlateau, whose step() needs a metric; step it "
                    "yourself (scheduler.step(val_loss)) and leave scheduler=None."
                )
        self.scheduler = scheduler
        if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
            raise TypeError(
                f"`sinks` must be an iterable of callables (e.g. [gg.JSONLSink('run.jsonl')]), "
                f"got {type(sinks).__name__}."
            )
        self.sinks = list(sinks)
        for i, s in enumerate(self.sinks):
            if not callable(s):
                raise TypeError(
                    f"`sinks`[{i}] must be callable with a History chunk, got {type(s).__name__}."
                )
        self.flush_every = check_int("flush_every", flush_every, minimum=1, fix="Use e.g. 50.")
        self.max_consecutive = check_int(
            "max_consecutive", max_consecutive, minimum=0,
            fix="0 raises at the first non-finite step; optax's default is 5, gradguard's 3.",
        )
        if measure_updates == "auto":
            self.measure_updates = self.flush_every
        elif isinstance(measure_updates, int) and not isinstance(measure_updates, bool):
            self.measure_updates = check_int("measure_updates", measure_updates, minimum=0,
                                             fix="0 turns it off; k measures every k steps.")
        else:
            raise TypeError(
                f"`measure_updates` must be 'auto' or an int (0 = off), got {measure_updates!r}."
            )
        self.history_rows = check_int("history_rows", history_rows, minimum=1)
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"`foreach` must be None or a bool, got {foreach!r}.")
        self.foreach = foreach
        self.process_group = process_group

        plan = self._plan
        self._watch_trainable_set(model)
        if self.clip is not None:
            self.clip.bind(model, plan)
        if self.spike is not None:
            self.spike.bind(plan.device, plan.norm_dtype)
        self._norm_type = self.clip.norm_type if self.clip is not None else 2.0
        hist_dtype = torch.float64 if plan.norm_dtype == torch.float64 else torch.float32
        # Update ratios are measured on every measure_updates-th step: at most this many a flush.
        every = self.measure_updates
        ratio_rows = 0 if every == 0 else min(self.flush_every, -(-self.flush_every // every) + 1)
        self._buffer = HistoryBuffer(plan.names, self.flush_every, plan.device, hist_dtype, ratio_rows)
        self._observed: list[bool] = []  # per pending row: already fed to the host counters?
        self._history = History(list(plan.names))
        self._false = torch.zeros((), dtype=torch.bool, device=plan.device)
        self._inf = torch.full((), math.inf, dtype=plan.norm_dtype, device=plan.device)
        self._nan = torch.full((), math.nan, dtype=plan.norm_dtype, device=plan.device)
        self._checked_optimizers: set[int] = set()
        self._optimizer_sizes: dict[int, int] = {}
        self._consts: dict[float, Tensor] = {}
        self._found_inf_ok: set[int] = set()
        self._checked_scaler: int | None = None
        self._last_optimizer: Any = None  # what a rollback decided in flush() restores
        self._last_scaler: Any = None
        self._recovery = Recovery(self.spike) if self.spike is not None else None
        # host counters (optax apply_if_finite's, plus a few)
        self._step = 0
        self.consecutive_nonfinite = 0
        self.total_nonfinite = 0
        self.total_skipped = 0
        self.last_finite = True
        self.last_nonfinite_step: int | None = None
        self._run_start: int | None = None

    # -- public read-only views ---------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Guard steps taken (skipped ones included); rewinds on a rollback."""
        return self._step

    @property
    def history(self) -> History:
        """The flushed rows (host, columnar; at most ``history_rows``). :meth:`flush` to update."""
        return self._history

    @property
    def names(self) -> list[str]:
        """Qualified names of the guarded parameters, in module order."""
        return list(self._plan.names)

    @property
    def rollbacks(self) -> int:
        return self.spike.rollbacks if self.spike is not None else 0

    def lr_scale(self) -> float:
        """The LR multiplier the next step will use (1.0 outside a back-off)."""
        return self.spike.lr_scale(self._step) if self.spike is not None else 1.0

    # -- doors: what may change between steps, checked cheaply every step ------------------------
    def _watch_trainable_set(self, model: nn.Module) -> None:
        """Remember the parameters that were frozen when the plan was built.

        A parameter unfrozen later would never be checked, so a NaN in its gradient would reach
        the weights. Each step tests ``requires_grad`` of these (a fully trainable model has none:
        no cost) and the optimizer's parameter count (one ``len`` per param group); there is no
        walk over every parameter.
        """
        planned = {id(p) for p in self._plan.params}
        self._frozen = tuple((display_name(n), p) for n, p in model.named_parameters()
                             if id(p) not in planned)

    def _check_step_inputs(self, optimizer: Any, scaler: Any) -> None:
        for name, p in self._frozen:
            if p.requires_grad:
                raise GuardError(
                    f"parameter {name!r} was frozen when the Guard was built and is trainable "
                    "now; the Guard would not check its gradient, so a NaN there would reach the "
                    "weights. Build a new Guard after changing which parameters train "
                    "(guard = gg.Guard(model, ...)), or build it after unfreezing."
                )
        self._check_optimizer(optimizer)
        if _param_count(optimizer) != self._optimizer_sizes.get(id(optimizer)):
            self._checked_optimizers.discard(id(optimizer))  # a param group was added: re-check
            self._check_optimizer(optimizer)
        if scaler is not None and id(scaler) != self._checked_scaler:
            if not isinstance(scaler, torch.amp.GradScaler):
                raise TypeError(
                    f"`scaler` must be a torch.amp.GradScaler (or None), got "
                    f"{type(scaler).__name__}: {scaler!r:.60}. Pass the GradScaler you call "
                    "scaler.scale(loss).backward() with."
                )
            self._checked_scaler = id(scaler)

    # -- the step -------------------------------------------------------------------------------
    def _check_optimizer(self, optimizer: Any) -> None:
        if id(optimizer) in self._checked_optimizers:
            return
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
            )
        planned = {id(p) for p in self._plan.params}
        stray = [p for g in optimizer.param_groups for p in g["params"]
                 if p.requires_grad and id(p) not in planned]
        if stray:
            names = {id(p): display_name(n) for n, p in self.model.named_parameters()}
            first = (repr(names[id(stray[0])]) if id(stray[0]) in names
                     else f"a parameter of shape {tuple(stray[0].shape)}, outside the model")
            raise ValueError(
                f"the optimizer updates {len(stray)} parameter(s) that the Guard does not check "
                f"(the first: {first}), so a NaN in their gradients would reach the weights. "
                "Build the Guard on the module that owns every parameter the optimizer steps, "
                "after setting which parameters train (build a new Guard after unfreezing)."
            )
        self._checked_optimizers.add(id(optimizer))
        self._optimizer_sizes[id(optimizer)] = _param_count(optimizer)

    def _needs_host_each_step(self, optimizer: Any, fused: bool) -> bool:
        if not fused or self.scheduler is not None or not self._found_inf_safe(optimizer):
            return True
        return self.spike is not None and self.spike.needs_host_each_step()

    def _found_inf_safe(self, optimizer: Any) -> bool:
        """Whether skipping through ``found_inf`` leaves this optimizer's state intact.

        torch 2.13's fused SGD with momentum allocates its momentum buffers with ``empty_like``
        on its first step and, when that step is skipped through ``found_inf``, keeps them
        uninitialised: the next step reads garbage (measured: parameters of -5e34). Until every
        buffer exists, such an optimizer takes the one-sync path, which skips by not calling
        ``step()``. (GradScaler's own path has the same hazard when AMP skips the first step.)
        """
        if id(optimizer) in self._found_inf_ok:
            return True
        if isinstance(optimizer, torch.optim.SGD):
            for group in optimizer.param_groups:
                if group.get("momentum", 0) != 0 and any(
                    optimizer.state.get(p, {}).get("momentum_buffer") is None
                    for p in group["params"] if p.grad is not None
                ):
                    return False
        elif any(not optimizer.state.get(p) for group in optimizer.param_groups
                 for p in group["params"] if p.grad is not None):
            # Fused Adam/AdamW create their state (step 0, zero moments) even on a step
            # skipped through found_inf; a skipped first step must leave opt.state empty, as if
            # it never ran, so the first step of a fresh state takes the one-sync path.
            return False
        self._found_inf_ok.add(id(optimizer))
        return True

    @staticmethod
    def _unscale(optimizer: torch.optim.Optimizer, scaler: Any) -> Tensor | None:
        """``scaler.unscale_`` once (unless already done this step); the scaler's found_inf."""
        if scaler is None or not scaler.is_enabled():
            return None
        try:
            scaler.unscale_(optimizer)
        except RuntimeError as e:
            if "already been called" not in str(e):
                raise
        per_device = getattr(scaler, "_found_inf_per_device", None)
        if per_device is None:  # pragma: no cover - a torch without the helper
            return None
        found = list(per_device(optimizer).values())
        if not found:
            return None
        total = found[0]
        for f in found[1:]:
            total = total + f.to(total.device)
        return total

    def _const(self, value: float) -> Tensor:
        """A cached device scalar: building one from a Python float each step would be a
        host-to-device copy, which CUDA performs synchronously."""
        t = self._consts.get(value)
        if t is None:
            if len(self._consts) > 64:
                self._consts.clear()
            t = self._consts[value] = torch.full((), value, dtype=self._plan.norm_dtype,
                                                 device=self._plan.device)
        return t

    def _loss_tensor(self, loss: Any) -> Tensor | None:
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"`loss` must be a scalar, got a tensor of shape {tuple(loss.shape)}; pass "
                    "loss.mean() (or the value you called backward() on)."
                )
            loss = loss.detach() if loss.requires_grad else loss
            return loss if loss.dim() == 0 else loss.reshape(())
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return torch.tensor(float(loss), device=self._plan.device)
        raise TypeError(f"`loss` must be a Tensor, a number or None, got {type(loss).__name__}.")

    def _zero_grads(self) -> None:
        grads = [g for g in self._plan.grads() if g is not None]
        by: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for g in grads:
            by.setdefault((g.device, g.dtype), []).append(g)
        for (dev, _), group in by.items():
            if use_foreach(group, dev, self.foreach):
                torch._foreach_zero_(group)
            else:
                for g in group:
                    g.zero_()

    def _drop_grads(self) -> None:
        for p in self._plan.params:
            p.grad = None

    def _param_copy(self) -> list[Tensor]:
        return [p.detach().clone() for p in self._plan.params]

    def _update_ratio(self, before: list[Tensor]) -> Tensor:
        """Per-tensor ``||w_after - w_before|| / ||w_after||`` (NaN where the weight norm is 0)."""
        plan = self._plan
        if has_dtensor(plan.params):  # sharded weights: the two norms need one all-reduce
            return sharded_update_ratio(plan.params, before, self.process_group).to(
                plan.device, plan.norm_dtype)
        out: list[Tensor | None] = [None] * len(plan)
        for (dev, dt), idx in plan.groups.items():
            after = [plan.params[i].detach() for i in idx]
            prev = [before[i] for i in idx]
            if use_foreach(after, dev, self.foreach):
                diff = torch._foreach_sub(after, prev)
                dn = torch._foreach_norm(diff)
                wn = torch._foreach_norm(after)
            else:
                dn = [torch.linalg.vector_norm(a - b) for a, b in zip(after, prev)]
                wn = [torch.linalg.vector_norm(a) for a in after]
            for j, i in enumerate(idx):
                out[i] = (dn[j] / wn[j]).to(plan.device, plan.norm_dtype)
        ratio = torch.stack([t for t in out if t is not None])
        return torch.where(torch.isfinite(ratio), ratio, math.nan)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, scaler: Any | None = None,
             loss: Tensor | float | None = None, *, defer_step: bool = False) -> StepOutcome:
        """Check, clip and apply one optimizer step (or skip it); record one history row.

        Call it once per optimizer step, after ``backward()`` (after the last micro-batch under
        gradient accumulation), instead of ``optimizer.step()``. Under AMP pass the GradScaler:
        the Guard calls ``scaler.unscale_(optimizer)`` (unless you already did this step), then
        measures and clips the unscaled gradients, steps the optimizer (or skips) and calls
        ``scaler.update()``; do not call ``scaler.step``/``scaler.update`` yourself.

        Args:
            optimizer: the optimizer to step. Fused optimizers (``fused=True``) are skipped
                through their ``found_inf`` tensor, with no host sync.
            scaler: a ``torch.amp.GradScaler``, or None.
            loss: this step's loss (a scalar tensor or number), recorded in the history and fed
                to the spike detector. Optional. Prefer the tensor: a Python number costs a
                host-to-device copy on a GPU.
            defer_step (keyword-only): for frameworks that call ``optimizer.step()`` themselves
                (Lightning, the Hugging Face Trainer; see :mod:`gradguard.integrations`): measure,
                clip, decide and record, but do not step. A skipped step is cancelled by setting
                every gradient to None, which torch's optimizers treat as "leave this parameter
                and its state alone", so the framework's coming ``step()`` is a no-op. Costs the
                one host read per step; no scheduler, no update ratio, no LR back-off here.

        Returns:
            StepOutcome: ``global_norm``, ``clipped``, ``skipped``, ``threshold`` (device tensors).

        Raises:
            GuardError: more than ``max_consecutive`` consecutive non-finite steps (with
                ``on_nonfinite="raise"``), or more than ``max_rollbacks`` rollbacks.
        """
        self._check_step_inputs(optimizer, scaler)
        self._last_optimizer, self._last_scaler = optimizer, scaler
        if defer_step and (self.scheduler is not None or scaler is not None):
            raise ValueError(
                "`defer_step=True` leaves the optimizer step to the caller, so the Guard cannot "
                "step a scheduler or a GradScaler after it; pass scaler=None (unscale_ first) and "
                "build the Guard with scheduler=None."
            )
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and not defer_step
        per_step_sync = self._needs_host_each_step(optimizer, fused)
        spike_policy = self.spike
        if self._recovery is not None and spike_policy is not None and spike_policy.rollback \
                and self._recovery.latest_step is None:
            self._take_snapshot(optimizer, scaler)

        found_inf = self._unscale(optimizer, scaler)
        plan = self._plan
        step_idx0 = self._step
        grads = plan.grads()
        # One pass; across ranks, one packed all-reduce (norms, flag, mean loss agree everywhere).
        # In one process a policy may hand over the statistics of its own pass (AGC's unit norms).
        stats = None
        try:
            if self.clip is not None and not is_distributed(self.process_group):
                stats = self.clip.measure(plan.params, grads, self.foreach)
            if stats is None:
                stats, loss_t = step_stats(grads, self._norm_type, self._loss_tensor(loss),
                                           self.process_group, self.foreach,
                                           verify_loss=step_idx0 == 0)
            else:
                loss_t = self._loss_tensor(loss)
        except UnsupportedGradient as e:
            raise TypeError(f"parameter {plan.names[e.index]!r} has a {e.what} gradient, which "
                            "gradguard cannot measure or clip; make it dense.") from None
        dev = stats.global_norm.device
        nonfinite = stats.nonfinite
        if found_inf is not None:
            nonfinite = nonfinite | (found_inf.to(dev) > 0)

        spike = self._false
        if spike_policy is not None and spike_policy.detecting:
            spike = spike_policy.detect(stats.global_norm, loss_t, nonfinite)
        # Host-side choices, so that no op runs for a flag that is constant False.
        skip = nonfinite if self.skip_nonfinite else self._false
        if spike_policy is not None and spike_policy.skip and spike is not self._false:
            skip = skip | spike if self.skip_nonfinite else spike

        if self.clip is not None:
            threshold, clipped = self.clip.clip_(plan.params, grads, stats, skip)
        else:
            threshold, clipped = self._inf, self._false

        step_idx = self._step
        lr_scale = self.lr_scale()
        measure = self.measure_updates > 0 and step_idx % self.measure_updates == 0
        ratio: Tensor | None = None

        if per_step_sync:
            # [sync] the one host read per step: a plain optimizer can be skipped only by not
            # calling step(), and the scheduler/back-off only by host code. Flags are packed so
            # the spike ladder's decision rides on the same read.
            skip_h, nonfinite_h, spike_h = (bool(v) for v in torch.stack([skip, nonfinite, spike]).tolist())
            if skip_h:
                self._drop_grads() if defer_step else self._zero_grads()
            elif defer_step:
                pass  # the caller's framework steps next
            else:
                before = self._param_copy() if measure else None
                self._optimizer_step(optimizer, lr_scale)
                if before is not None:
                    ratio = self._update_ratio(before)
                if self.scheduler is not None:
                    self.scheduler.step()
            if scaler is not None and scaler.is_enabled():
                scaler.update()
        else:
            before = self._param_copy() if measure else None
            # Zero syncs: the fused kernel reads the flag on the device and leaves parameters and
            # state untouched when it is set (its step counters are rolled back), as under AMP.
            had = {a: getattr(optimizer, a) for a in ("found_inf", "grad_scale") if hasattr(optimizer, a)}
            optimizer.found_inf = skip.to(torch.float32)  # type: ignore[attr-defined]
            optimizer.grad_scale = None  # type: ignore[attr-defined]
            try:
                self._optimizer_step(optimizer, lr_scale)
            finally:
                del optimizer.found_inf  # type: ignore[attr-defined]
                del optimizer.grad_scale  # type: ignore[attr-defined]
                for a, v in had.items():
                    setattr(optimizer, a, v)
            if before is not None:
                ratio = self._update_ratio(before)
            if scaler is not None and scaler.is_enabled():
                scaler.update()

        self._buffer.record(
            step_idx, global_norm=stats.global_norm, per_tensor_norm=stats.per_tensor_norm,
            loss=loss_t if loss_t is not None else self._nan, threshold=threshold,
            clipped=clipped, skipped=skip, lr_scale=self._const(lr_scale), update_ratio=ratio,
            lr=_group_lr(optimizer, lr_scale),
        )
        self._observed.append(per_step_sync)
        self._step += 1
        outcome = StepOutcome(stats.global_norm, clipped, skip, threshold)

        if per_step_sync:
            self._observe(step_idx, skip_h, nonfinite_h, spike_h, optimizer, scaler)
        if self._buffer.full:
            self._flush(optimizer, scaler)
        if (self._recovery is not None and spike_policy is not None and spike_policy.rollback
                and self._step % spike_policy.snapshot_every == 0
                and self._recovery.latest_step != self._step):
            self._take_snapshot(optimizer, scaler)
        return outcome

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, lr_scale: float) -> None:
        if lr_scale == 1.0:
            optimizer.step()
            return
        # Back-off is a multiplier on top of whatever the scheduler set: scale, step, restore the
        # very same values, so the scheduler keeps owning the base LR.
        saved = [g["lr"] for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr * lr_scale
        try:
            optimizer.step()
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr

    # -- host-side bookkeeping --------------------------------------------------------------------
    def _observe(self, step: int, skipped: bool, nonfinite: bool, spike: bool,
                 optimizer: Any, scaler: Any, layer_norm: list[float] | None = None) -> None:
        """Counters and the ladder, fed one step's flags (per step, or from rows at a flush)."""
        if skipped:
            self.total_skipped += 1
        if nonfinite:
            self.total_nonfinite += 1
            self.consecutive_nonfinite += 1
            self.last_finite = False
            self.last_nonfinite_step = step
            if self.consecutive_nonfinite == 1:
                self._run_start = step
            if self.consecutive_nonfinite > self.max_consecutive:
                self._on_nonfinite_limit(step, optimizer, scaler)
                return
        else:
            self.consecutive_nonfinite = 0
            self.last_finite = True
        sp = self.spike
        if sp is None or not sp.detecting:
            return
        action = sp.observe(step, spike and not nonfinite)
        if action == "backoff":
            log.warning("gradguard: %d spikes within %d steps at step %d: LR x%g for %d steps "
                        "(trouble level %d)", sp.trigger, sp.window, step, sp.backoff_factor,
                        sp.backoff_steps, sp.level)
        elif action == "rollback":
            start = sp.streak_start if sp.streak_start is not None else step
            # the update just before the first spike is suspect too: restore from before it
            self._rollback(sp, f"repeated loss/gradient spikes since step {start}", start - 1,
                           optimizer, scaler)

    def _first_bad_layer(self, step: int) -> tuple[str, float] | None:
        h = self._history
        for i in range(len(h) - 1, -1, -1):
            if h.step[i] == step:
                for name, v in zip(h.names, h.layer_norm[i]):
                    if not math.isfinite(v):
                        return name, v
                return None
        return None

    def _on_nonfinite_limit(self, step: int, optimizer: Any, scaler: Any) -> None:
        start = self._run_start if self._run_start is not None else step
        if self.on_nonfinite == "rollback":
            if self.spike is None:  # __init__ gives rollback a SpikePolicy; only a reassignment drops it
                raise RuntimeError(
                    "on_nonfinite='rollback' needs the Guard's SpikePolicy (it keeps the snapshots), "
                    "but guard.spike is None; leave `spike` as the Guard set it, or construct the "
                    "Guard with spike=gg.SpikePolicy(...)."
                )
            self._rollback(
                self.spike,
                f"{self.consecutive_nonfinite} consecutive non-finite steps (from step {start})",
                start, optimizer, scaler,
            )
            return
        self._flush_rows(process=False)  # the rows name the culprit: one extra read, error path only
        bad = self._first_bad_layer(start)
        where = (f"The first layer (in module order) with a non-finite gradient at step {start} "
                 f"is {bad[0]!r} (gradient norm {bad[1]}). ") if bad else ""
        raise GuardError(
            f"{self.consecutive_nonfinite} consecutive steps had non-finite gradients (steps "
            f"{start}..{step}; max_consecutive={self.max_consecutive}); every one was skipped, so "
            f"the parameters are still finite. {where}Typical causes: a learning rate too high, "
            "log(0) or a division by zero in the loss, fp16 overflow. Lower the learning rate, "
            "check the loss for NaN, raise max_consecutive, or pass on_nonfinite='rollback'."
        )

    # -- snapshots and rollback -------------------------------------------------------------------
    def _core_state(self) -> dict[str, Any]:
        return {
            "step": self._step,
            "policy": self.clip.state_dict() if self.clip is not None else None,
            "detector": self.spike.detector_state() if self.spike is not None else None,
        }

    def _take_snapshot(self, optimizer: Any, scaler: Any) -> None:
        if self._recovery is not None:
            self._recovery.snapshot(self._step, self.model, optimizer, scaler, self.scheduler,
                                    self._core_state())

    def _rollback(self, sp: SpikePolicy, reason: str, trouble_start: int, optimizer: Any,
                  scaler: Any) -> None:
        rec = self._recovery
        if sp.rollbacks >= sp.max_rollbacks:
            raise GuardError(
                f"gave up after {sp.rollbacks} rollback(s) (max_rollbacks={sp.max_rollbacks}): "
                f"{reason} at step {self._step - 1}. Training keeps diverging from the last good "
                "state; lower the learning rate, skip more data in on_rollback, or raise "
                "max_rollbacks."
            )
        snap = rec.choose(trouble_start) if rec is not None else None
        if rec is None or snap is None:
            raise GuardError(f"{reason}, but no snapshot exists to roll back to.")
        from_step = self._step
        core = rec.restore(snap, self.model, optimizer, scaler, self.scheduler)
        self._found_inf_ok.discard(id(optimizer))  # its state may predate lazy initialisation
        self._step = core["step"]
        if self.clip is not None and core["policy"] is not None:
            self.clip.load_state_dict(core["policy"])
        if core["detector"] is not None:
            sp.load_detector_state(core["detector"])
        self.consecutive_nonfinite = 0
        self._run_start = None
        sp.after_rollback(snap.step)
        self._zero_grads()
        log.warning("gradguard: rolled back from step %d to step %d (%s); rollback %d of %d%s",
                    from_step, snap.step, reason, sp.rollbacks, sp.max_rollbacks,
                    f"; LR x{sp.backoff_factor:g} for {sp.backoff_steps} steps"
                    if sp.backoff_until > snap.step else "")
        if sp.on_rollback is not None:
            sp.on_rollback(from_step, snap.step)

    # -- flushing -------------------------------------------------------------------------------
    def _flush_rows(self, process: bool, optimizer: Any = None, scaler: Any = None) -> History:
        chunk = self._buffer.flush()  # [sync] one read per flush
        observed, self._observed = self._observed, []
        if len(chunk) == 0:
            return chunk
        self._history.extend(chunk, max_rows=self.history_rows)
        call_sinks(self.sinks, chunk)
        n_skip = sum(chunk.skipped)
        if n_skip:
            bad = [i for i, g in enumerate(chunk.global_norm) if not math.isfinite(g)]
            culprit = ""
            if bad:  # the per-tensor norms of the same pass name the culprit, in module order
                row = chunk.layer_norm[bad[0]]
                first = next((n for n, v in zip(chunk.names, row) if not math.isfinite(v)), None)
                culprit = f"; first non-finite layer at step {chunk.step[bad[0]]}: {first}"
            log.warning("gradguard: %d of %d steps skipped (%d with non-finite gradients) in steps %d..%d%s",
                        n_skip, len(chunk), len(bad), chunk.step[0], chunk.step[-1], culprit)
        backed = [i for i, v in enumerate(chunk.lr_scale) if v < 1.0]
        if backed:  # the effective LR, which the optimizer's param_groups do not show
            i = backed[-1]
            log.warning("gradguard: LR backed off (x%g) on %d of %d steps in steps %d..%d; "
                        "effective lr %.3g at step %d (param_groups keep the scheduler's value)",
                        chunk.lr_scale[i], len(backed), len(chunk), chunk.step[0], chunk.step[-1],
                        chunk.lr[i], chunk.step[i])
        if process:
            # Rows from the zero-sync path reach the host counters only now.
            for i, seen in enumerate(observed):
                if seen:
                    continue
                nonfinite = not math.isfinite(chunk.global_norm[i])
                skipped = chunk.skipped[i]
                rollbacks = self.rollbacks
                self._observe(chunk.step[i], skipped, nonfinite, skipped and not nonfinite,
                              optimizer, scaler)
                if self.rollbacks != rollbacks:
                    break  # the later rows belong to the abandoned stretch
        return chunk

    def _flush(self, optimizer: Any = None, scaler: Any = None) -> History:
        return self._flush_rows(process=True, optimizer=optimizer, scaler=scaler)

    def flush(self) -> History:
        """Move the pending rows to :attr:`history` and the sinks now (one host read).

        Returns:
            History: the rows just flushed.
        """
        return self._flush_rows(True, self._last_optimizer, self._last_scaler)

    def findings(self) -> list[Any]:
        """What the recorded run went through, from :attr:`history` (flush first for the latest
        rows): incidents with what the Guard did, level shifts, and the per-layer findings, with
        advice that accounts for what the Guard already does (:mod:`gradguard.recorded`). The
        model's structure (embeddings, tied weights) is judged by rules of its own."""
        from gradguard.doctor.probes import structure_summary
        from gradguard.recorded import findings

        return findings(self._history, structure_summary(self.model))

    def close(self) -> None:
        """Flush, then close every sink that has ``close()``."""
        self.flush()
        for s in self.sinks:
            closer = getattr(s, "close", None)
            if callable(closer):
                closer()

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Counters, step, policy and spike state, and the pending (unflushed) history rows.

        In-memory snapshots are not included (they are a copy of the model and optimizer that
        your checkpoint already holds); after a resume the first step takes a new one.
        """
        return {
            "version": _STATE_VERSION,
            "names": list(self._plan.names),
            "step": self._step,
            "counters": {
                "consecutive_nonfinite": self.consecutive_nonfinite,
                "total_nonfinite": self.total_nonfinite,
                "total_skipped": self.total_skipped,
                "last_finite": self.last_finite,
                "last_nonfinite_step": self.last_nonfinite_step,
                "run_start": self._run_start,
            },
            "policy": self.clip.state_dict() if self.clip is not None else None,
            "spike": self.spike.state_dict() if self.spike is not None else None,
            "history": self._buffer.state_dict(),
            "observed": list(self._observed),
        }

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore what :meth:`state_dict` returned, into a Guard built the same way.

        ``strict`` is handed to the clip policy: its settings must equal the checkpoint's (see
        :meth:`ClipPolicy.load_state_dict`)."""
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(
                f"unsupported Guard state version {state_dict.get('version')!r}; this gradguard "
                f"reads version {_STATE_VERSION}."
            )
        if list(state_dict["names"]) != list(self._plan.names):
            raise ValueError(
                "the checkpoint's Guard watched different parameters "
                f"({len(state_dict['names'])} tensors) than this model's ({len(self._plan)}); build "
                "the Guard on the same model architecture."
            )
        if (state_dict["policy"] is None) != (self.clip is None):
            raise ValueError(
                "the checkpoint was saved with clip="
                f"{'None' if state_dict['policy'] is None else state_dict['policy']['policy']} but "
                f"this Guard has clip={self.clip!r}; construct it with the same policy."
            )
        if (state_dict["spike"] is None) != (self.spike is None):
            raise ValueError(
                "the checkpoint's Guard and this one differ in `spike` (one has a SpikePolicy, the "
                "other not); construct it the same way."
            )
        if self.clip is not None:  # first: a mismatching policy raises before anything changes
            self.clip.load_state_dict(state_dict["policy"], strict=strict)
        self._step = int(state_dict["step"])
        c = state_dict["counters"]
        self.consecutive_nonfinite = c["consecutive_nonfinite"]
        self.total_nonfinite = c["total_nonfinite"]
        self.total_skipped = c["total_skipped"]
        self.last_finite = c["last_finite"]
        self.last_nonfinite_step = c["last_nonfinite_step"]
        self._run_start = c["run_start"]
        if self.spike is not None:
            self.spike.load_state_dict(state_dict["spike"])
        self._buffer.load_state_dict(state_dict["history"])
        self._observed = list(state_dict["observed"])
        if self._recovery is not None:
            self._recovery.clear()

    def __repr__(self) -> str:
        return (f"Guard({len(self._plan)} tensors, clip={self.clip!r}, "
                f"skip_nonfinite={self.skip_nonfinite}, spike={self.spike!r}, step={self._step})")
