"""GradGuard for PyTorch Lightning
================================

``GradGuardCallback`` puts a :class:`gradguard.Guard` into ``lightning.pytorch.Trainer``'s loop::

    trainer = L.Trainer(callbacks=[GradGuardCallback(clip=gg.ZClip())])

Where it acts (Lightning 2.x, ``plugins/precision/precision.py`` and ``amp.py``):

* ``on_before_backward(loss)`` — the loss of each micro-batch, already divided by
  ``accumulate_grad_batches`` (so the sum over an accumulation window is its mean) and, under
  ``precision="16-mixed"``, multiplied by the GradScaler's scale, which the callback divides out.
* ``on_before_optimizer_step(optimizer)`` — runs once per optimizer step, after the closure
  (forward + backward of every accumulated micro-batch), after ``scaler.unscale_`` and before
  Lightning's own ``configure_gradient_clipping``. The gradients are accumulated and unscaled, so
  the Guard measures, clips through its policy and decides to skip there. With a fused optimizer
  under 16-mixed Lightning does not unscale (the optimizer would); the callback then calls
  ``scaler.unscale_`` itself, so its numbers are never the scaled ones, and the scaler's own
  ``step`` knows the gradients are already unscaled.

How a step is skipped: the hook runs *inside* Lightning's ``optimizer.step(closure)`` call, so the
step cannot be withheld. The callback cancels it instead: every gradient of the optimizer is set
to ``None``, which torch's optimizers treat as "no update for this parameter" (parameters,
momentum, Adam moments and step counts stay bit-identical; weight decay is not applied). Under
16-mixed the GradScaler still runs its ``step``/``update`` as usual (a no-op step; its
scale backs off only if it found an Inf itself).

**Your own hook sees the gradients.** Lightning calls the LightningModule's
``on_before_optimizer_step`` after every callback's. On a cancelled step the callback gives the
gradients back after deciding and drops them only right before the update, from a step pre-hook
on the optimizer (wrapping ``step``'s closure, which runs every hook inside ``step``): the
module's hook reads them as they were, and ``callback.last_outcome.skipped`` tells it the step
will be cancelled.

What it cannot do, and why:

* Lightning still counts a skipped step in ``trainer.global_step`` and still steps the LR
  scheduler (Lightning owns both, and no hook can veto them). The skip is recorded in the Guard's
  history and in the ``gradguard/skipped`` chart.
* One optimizer only: the Guard watches the whole LightningModule, so a second optimizer stepping
  a subset of parameters would be measured against every gradient.
* ``Trainer(gradient_clip_val=...)`` together with a clipping policy would clip twice (Lightning
  clips right after this hook): the callback raises and tells you which one to keep. With
  ``clip=None`` the callback only measures and skips, and Lightning's clipping is allowed.
* Custom optimizers that treat a ``None`` gradient as zero would still decay their state on a
  skipped step; torch's built-in optimizers do not.

Logging goes through the Trainer's loggers (``trainer.loggers``), at the Guard's flush (every
``flush_every`` steps: one host sync per flush, none per step): ``gradguard/global_norm``,
``/threshold``, ``/clipped``, ``/skipped``, ``/loss`` and, with ``log_per_layer``, per-layer
norms. The callback's state (the Guard's policy state, counters and unflushed history) is saved
in checkpoints under :attr:`GradGuardCallback.state_key` and restored on resume.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from gradguard.integrations._hooks import GuardCallbackMixin, chart_rows, require, run_guard

_L = require("lightning.pytorch", "lightning")
Callback = _L.Callback

__all__ = ["GradGuardCallback"]



class _TrainerLoggers:
    """A Guard sink that writes each flushed chunk to the Trainer's loggers."""

    def __init__(self, trainer: Any, per_layer: bool | str, norm_type: float) -> None:
        self.trainer = trainer
        self.per_layer = per_layer
        self.norm_type = norm_type

    def __call__(self, chunk: Any) -> None:
        loggers = getattr(self.trainer, "loggers", None) or []
        if not loggers:
            return
        for step, metrics in chart_rows(chunk, self.per_layer, norm_type=self.norm_type):
            for lg in loggers:
                lg.log_metrics(metrics, step=step)


class GradGuardCallback(Callback, GuardCallbackMixin):
    """A :class:`gradguard.Guard` inside Lightning's training loop.

    Args:
        clip: the Guard's clipping policy: ``gg.ZClip()``, ``gg.FixedClip(1.0)``,
            ``gg.ValueClip(...)``, ``gg.AGC()``, ``gg.AutoClip()``, a float (fixed max norm), or
            ``None`` (the default, as for :class:`gradguard.Guard`) to measure and skip only.
        skip_nonfinite: cancel steps whose gradients hold NaN/Inf (on every rank together).
        spike: the Guard's spike handling (see :class:`gradguard.Guard`); None disables it.
        log_per_layer: per-layer gradient-norm charts in the Trainer's logger: ``False`` (only
            the global charts), ``True`` (one chart per parameter tensor) or ``"auto"`` (one per
            tensor up to 16 tensors, else one per block or module, e.g.
            ``transformer.h.3``).
        sinks: extra Guard sinks (e.g. ``gg.JSONLSink("run.jsonl")``; under DDP add file sinks
            on rank 0 only).
        flush_every: steps between history flushes (and logger writes).
        **guard_kwargs: passed on to :class:`gradguard.Guard` unchanged.

    Attributes:
        guard: the :class:`gradguard.Guard`, created at ``on_fit_start`` (None before).
        last_outcome: the ``StepOutcome`` of the latest optimizer step (device tensors).

    Raises:
        ValueError: at ``setup``, when the Trainer also clips (``gradient_clip_val``) and ``clip``
            is not None; at ``on_fit_start``, with more than one optimizer.
    """

    def __init__(
        self,
        clip: Any = None,
        *,
        skip_nonfinite: bool = True,
        spike: Any = None,
        log_per_layer: bool | str = "auto",
        sinks: Iterable[Any] = (),
        flush_every: int = 50,
        **guard_kwargs: Any,
    ) -> None:
        self._init_guard_args(clip, skip_nonfinite=skip_nonfinite, spike=spike,
                              log_per_layer=log_per_layer, sinks=sinks, flush_every=flush_every,
                              guard_kwargs=guard_kwargs)
        self._loss_sum: torch.Tensor | None = None
        self._params: list[torch.nn.Parameter] = []
        self._cancel: list[torch.nn.Parameter] | None = None  # a decided, not yet applied, cancel
        self._hooked: dict[int, Any] = {}  # optimizer id -> its step pre-hook handle

    @property
    def state_key(self) -> str:
        """Key of this callback's state in ``checkpoint["callbacks"]``."""
        return "GradGuardCallback"

    def _clips(self) -> bool:
        return self._clip is not None

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if stage == "fit" and self._clips() and clip_val is not None and float(clip_val) > 0:
            algo = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
            raise ValueError(
                f"Trainer(gradient_clip_val={clip_val!r}, gradient_clip_algorithm={str(algo)!r}) "
                "would clip the gradients a second time, right after GradGuardCallback(clip=...) "
                "has clipped them. Keep one: remove gradient_clip_val from the Trainer and pass "
                f"clip=gg.{'ValueClip' if 'value' in str(algo).lower() else 'FixedClip'}"
                f"({clip_val!r}) to the callback, or pass clip=None to the callback to keep "
                "Lightning's clipping (the callback then only measures and skips)."
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(getattr(trainer, "optimizers", []) or [])
        if len(optimizers) > 1:
            raise ValueError(
                f"GradGuardCallback supports one optimizer; this Trainer has {len(optimizers)}. "
                "The Guard measures every gradient of the LightningModule at each optimizer step."
            )
        if self.guard is None:
            import gradguard as gg

            norm_type = float(getattr(self._clip, "norm_type", 2.0))
            sinks = [*self._sinks, _TrainerLoggers(trainer, self.log_per_layer, norm_type)]
            self.guard = gg.Guard(pl_module, clip=self._clip, sinks=sinks, **self._guard_kwargs)
            self._params = [p for p in pl_module.parameters() if p.requires_grad]
        if self._pending_state is not None:
            self.guard.load_state_dict(self._pending_state)
            self._pending_state = None

    # -- per step -------------------------------------------------------------------------------
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        loss = loss.detach()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and hasattr(scaler, "_get_scale_async"):
            # 16-mixed hands this hook the scaled loss; divide on the device (no sync).
            scale = scaler._get_scale_async()
            if scale is not None:
                loss = loss.float() / scale.to(loss.device)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self.guard is None:  # e.g. a test harness that skipped on_fit_start
            self.on_fit_start(trainer, pl_module)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            # Lightning leaves fused optimizers scaled (they unscale inside step); unscale here
            # so the Guard sees true gradients. scaler.step then passes grad_scale=None.
            scaler.unscale_(optimizer)
        loss, self._loss_sum = self._loss_sum, None
        kept = [p.grad for p in self._params]
        self.last_outcome = run_guard(self.guard, optimizer, loss)
        if all(p.grad is None for p in self._params) and any(g is not None for g in kept):
            # Cancelled. The LightningModule's own on_before_optimizer_step runs after this hook
            # and may read the gradients: give them back, and drop them only right before the
            # update (the step pre-hook below), which is what cancels it.
            for p, g in zip(self._params, kept):
                p.grad = g
            self._cancel = self._params
        self._hook(optimizer)

    # -- the cancellation, applied right before the update ---------------------------------------
    def _hook(self, optimizer: Any) -> None:
        if id(optimizer) not in self._hooked and hasattr(optimizer, "register_step_pre_hook"):
            self._hooked[id(optimizer)] = optimizer.register_step_pre_hook(self._before_step)

    def _drop_cancelled(self) -> None:
        if self._cancel is not None:
            for p in self._cancel:
                p.grad = None
            self._cancel = None

    def _before_step(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``optimizer.step`` pre-hook. Under 16-mixed the closure has run (the scaler calls
        ``step()`` without one): drop now. Otherwise ``step(closure)`` runs the closure, and with
        it every hook, inside: wrap it so that the drop follows the closure and precedes the
        update."""
        closure = kwargs.get("closure")
        if closure is None and args and callable(args[0]):
            closure = args[0]
        if closure is None:
            self._drop_cancelled()
            return None

        def closure_then_cancel() -> Any:
            out = closure()
            self._drop_cancelled()
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_cancel}
        return (closure_then_cancel, *args[1:]), kwargs

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._cancel = None  # e.g. the GradScaler skipped the step itself

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.guard is not None:
            self.guard.flush()
        for handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.guard is None:
            return {"guard": self._pending_state} if self._pending_state is not None else {}
        return {"guard": self.guard.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("guard") if state_dict else None
        if state is None:
            return
        if self.guard is None:
            self._pending_state = state
        else:
            self.guard.load_state_dict(state)
