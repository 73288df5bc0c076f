"""GradGuard for the Hugging Face Trainer
=======================================

``GradGuardCallback`` puts a :class:`gradguard.Guard` into ``transformers.Trainer``::

    args = TrainingArguments(..., max_grad_norm=0.0)      # the callback clips instead
    trainer = Trainer(model, args, callbacks=[GradGuardCallback(clip=gg.ZClip())], ...)

What the Trainer's hooks see (transformers 5.x, ``Trainer._inner_training_loop``), once per
optimizer step, after the last micro-batch of a gradient-accumulation window:

1. ``_clip_grad_norm`` (only if ``max_grad_norm > 0``) then ``_get_grad_norm``: both go through
   ``accelerator.clip_grad_norm_``, which first **unscales** fp16 gradients. The value the Trainer
   logs as ``grad_norm`` is this **pre-clip** global norm.
2. ``on_pre_optimizer_step`` — the gradients are accumulated and unscaled; they are **post-clip**
   when ``max_grad_norm > 0`` and untouched when ``max_grad_norm == 0``. The callback measures,
   clips through its policy and decides here.
3. ``optimizer.step()`` (``AcceleratedOptimizer``: ``scaler.step`` + ``update`` under fp16).
4. ``on_optimizer_step``, then ``lr_scheduler.step()`` unless
   ``accelerator.optimizer_step_was_skipped``, then ``model.zero_grad()``, then ``on_step_end``.
5. At logging steps, ``on_log`` with the Trainer's ``logs``.

Hence the rules:

* **max_grad_norm** defaults to 1.0, so the Trainer clips before the callback sees anything. With
  a clipping policy the callback refuses that (two clippers, and the callback would measure
  post-clip norms): set ``max_grad_norm=0``. The Trainer still computes and logs its pre-clip
  ``grad_norm``, which then equals the callback's ``gradguard/grad_norm``. With ``clip=None`` the
  callback only measures and skips and the Trainer may keep clipping (its norms are then
  post-clip; a log line says so once).
* **Skipping**: the hook runs right before ``optimizer.step()``, which the callback cannot
  withhold; the Guard cancels it instead by setting every gradient to None (torch's optimizers
  then leave parameters and state bit-identical; no weight decay). The callback also marks the
  step as skipped for Accelerate, so the Trainer **does not step the LR scheduler** on it (the
  same path a GradScaler overflow takes; it sets ``AcceleratedOptimizer._is_overflow``, a
  private attribute, and only if present). ``state.global_step`` still advances.
* **fp16**: if the gradients were not unscaled yet (older transformers), the callback unscales
  them with the optimizer's own scaler, so its numbers are never the scaled ones.

What it cannot do, and why:

* No loss-spike detection: no hook receives the per-step loss (``spike`` may still watch the
  gradient norm). The Trainer's own ``loss`` log is a window average.
* DeepSpeed clips and steps inside its engine (``max_grad_norm`` goes to its config); the hook
  order above does not hold there, so the callback refuses DeepSpeed runs.
* Checkpoints: the Trainer's ``stateful_callbacks`` mechanism stores JSON, but the Guard's state
  holds tensors. The callback writes ``gradguard.pt`` into each ``checkpoint-<step>`` folder
  (process 0) and reads it back at ``on_train_begin`` when resuming from
  ``output_dir/checkpoint-<global_step>``; for a checkpoint elsewhere call
  :meth:`GradGuardCallback.load_checkpoint` before ``train``.

Logging: at each logging step the callback flushes the Guard (one host read) and adds to the
Trainer's ``logs`` and ``state.log_history``: ``gradguard/grad_norm`` (the last step's pre-clip
norm), ``gradguard/grad_norm_max``, ``gradguard/clipped`` and ``gradguard/skipped`` (counts since
the previous log), ``gradguard/threshold``, and, with ``log_per_layer``, per-layer norms.
``report_to`` integrations (TensorBoard, W&B, MLflow, ...) are registered before user callbacks
and would log before these keys exist, so at ``on_train_begin`` the callback puts a small
log-only companion at the front of the Trainer's callback list (it finds the ``CallbackHandler``
that calls it): the reporters then log gradguard's keys with their own, while the callback itself
keeps its place for the gradient hooks (a user callback listed before it still runs first).
Registering the callback twice (or two GradGuardCallbacks on one Trainer) would step two Guards,
or one Guard twice, per optimizer step and double every statistic: the callback refuses it with
a ``ValueError``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gradguard.integrations._hooks import GuardCallbackMixin, chart_rows, require, run_guard

_T = require("transformers", "transformers")
TrainerCallback = _T.TrainerCallback

__all__ = ["CHECKPOINT_FILE", "GradGuardCallback"]

log = logging.getLogger(__name__)

#: The file the callback writes into each ``checkpoint-<step>`` folder.
CHECKPOINT_FILE = "gradguard.pt"


def _unscale_if_needed(optimizer: Any) -> None:
    """Unscale fp16 gradients with the AcceleratedOptimizer's scaler unless already done."""
    scaler = getattr(optimizer, "scaler", None)
    inner = getattr(optimizer, "optimizer", None)
    if scaler is None or inner is None or not scaler.is_enabled():
        return
    try:
        scaler.unscale_(inner)
    except RuntimeError as e:  # the Trainer's clip_grad_norm_ already unscaled: the usual case
        if "already been called" not in str(e):
            raise


class GradGuardCallback(TrainerCallback, GuardCallbackMixin):
    """A :class:`gradguard.Guard` inside the Hugging Face ``Trainer``.

    Args:
        clip: the Guard's clipping policy (``gg.ZClip()``, ``gg.FixedClip(1.0)``, ``gg.AGC()``,
            ..., a float for a fixed max norm) or ``None`` (the default) to measure and skip only.
        skip_nonfinite: cancel steps whose gradients hold NaN/Inf (on every rank together).
        spike: a :class:`gradguard.SpikePolicy` on the gradient norm, or None.
        log_per_layer: per-layer norms in the logs: ``False`` (default: few keys), ``True`` (one
            key per parameter tensor) or ``"auto"`` (per tensor up to 16, else per block or
            module, e.g. ``transformer.h.3``).
        sinks: extra Guard sinks (``gg.JSONLSink(...)``); under DDP add file sinks on process 0.
        flush_every: steps between the Guard's own flushes (logging steps flush too).
        **guard_kwargs: passed on to :class:`gradguard.Guard`.

    Attributes:
        guard: the Guard, created at ``on_train_begin``.
        last_outcome: the ``StepOutcome`` of the latest optimizer step (device tensors).

    Raises:
        ValueError: at ``on_train_begin``, when ``clip`` is set and ``max_grad_norm > 0``, or
            under DeepSpeed.
    """

    def __init__(
        self,
        clip: Any = None,
        *,
        skip_nonfinite: bool = True,
        spike: Any = None,
        log_per_layer: bool | str = False,
        sinks: Iterable[Any] = (),
        flush_every: int = 50,
        **guard_kwargs: Any,
    ) -> None:
        self._init_guard_args(clip, skip_nonfinite=skip_nonfinite, spike=spike,
                              log_per_layer=log_per_layer, sinks=sinks, flush_every=flush_every,
                              guard_kwargs=guard_kwargs)
        self._last_logged = -1
        self._marked_skip: Any = None
        self._warned_post_clip = False
        self._params: list[torch.nn.Parameter] = []
        self._norm_type = 2.0

    # -- set-up ---------------------------------------------------------------------------------
    def _take_the_front(self) -> None:
        """Refuse a double registration; put a log companion at the front of the handler's list.

        The ``CallbackHandler`` is found on the call stack (the frame of ``call_event`` that
        calls ``on_train_begin``). The list is replaced, not mutated, so the loop over the old
        list that is running now is not disturbed.
        """
        handler_type = getattr(_T.trainer_callback, "CallbackHandler", None)
        frame = sys._getframe(1)
        handler = None
        for _ in range(6):
            if frame is None:
                break
            cand = frame.f_locals.get("self")
            if handler_type is not None and isinstance(cand, handler_type):
                handler = cand
                break
            frame = frame.f_back
        if handler is None:
            log.info("gradguard: no CallbackHandler on the stack; report_to loggers registered "
                     "before the callback will not see gradguard's keys")
            return
        ours = [c for c in handler.callbacks if isinstance(c, GradGuardCallback)]
        if len(ours) > 1:
            same = all(c is self for c in ours)
            raise ValueError(
                (f"this GradGuardCallback is registered {len(ours)} times"
                 if same else f"{len(ours)} GradGuardCallbacks are registered")
                + " on one Trainer (e.g. callbacks=[cb] and callback_handler.callbacks.insert(0, "
                "cb)); each would guard every optimizer step again and every statistic would be "
                "doubled. Register one GradGuardCallback once: callbacks=[cb] is enough (its "
                "keys reach the report_to loggers by themselves)."
            )
        if not any(isinstance(c, _LogFirst) and c.owner is self for c in handler.callbacks):
            handler.callbacks = [_LogFirst(self), *handler.callbacks]  # a new list: see above

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._take_the_front()
        if getattr(args, "deepspeed", None):
            raise ValueError(
                "GradGuardCallback does not support DeepSpeed: the engine clips and steps "
                "internally, so on_pre_optimizer_step does not see the gradients it updates with."
            )
        max_grad_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        if self._clip is not None and max_grad_norm > 0:
            raise ValueError(
                f"TrainingArguments(max_grad_norm={max_grad_norm!r}) clips the gradients before "
                "GradGuardCallback(clip=...) sees them, so they would be clipped twice and the "
                "callback would measure post-clip norms. Set max_grad_norm=0 (the Trainer still "
                "logs its pre-clip grad_norm), or pass clip=None to keep the Trainer's clipping."
            )
        if max_grad_norm > 0 and not self._warned_post_clip:
            log.info("gradguard: max_grad_norm=%s clips before on_pre_optimizer_step; the "
                     "callback records post-clip gradient norms.", max_grad_norm)
            self._warned_post_clip = True
        if self.guard is None:
            import gradguard as gg

            if model is None:
                raise ValueError("on_train_begin received no `model`; pass the Trainer's model.")
            norm_type = float(getattr(self._clip, "norm_type", 2.0))
            self._norm_type = norm_type
            self.guard = gg.Guard(model, clip=self._clip, sinks=self._sinks, **self._guard_kwargs)
            self._params = [p for p in model.parameters() if p.requires_grad]
        if self._pending_state is None and state.global_step > 0:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / CHECKPOINT_FILE
            if path.exists():
                self._pending_state = torch.load(path, map_location="cpu", weights_only=True)
            else:
                log.warning("gradguard: resuming at step %d but %s does not exist; the Guard "
                            "starts fresh (call load_checkpoint(dir) before train() for a "
                            "checkpoint outside output_dir).", state.global_step, path)
        if self._pending_state is not None:
            self.guard.load_state_dict(self._pending_state)
            self._pending_state = None
        self._last_logged = self.guard.step_count - 1

    # -- per step -------------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        _unscale_if_needed(optimizer)
        self.last_outcome = run_guard(self.guard, optimizer)
        # The Guard cancels a skipped step by dropping every gradient: a host-free test.
        skipped = all(p.grad is None for p in self._params)
        self._marked_skip = optimizer if skipped else None

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Tell Accelerate the step was skipped, so the Trainer leaves the LR scheduler alone.
        opt = self._marked_skip
        if opt is not None and hasattr(opt, "_is_overflow"):
            opt._is_overflow = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        opt, self._marked_skip = self._marked_skip, None
        if opt is not None and hasattr(opt, "_is_overflow") and getattr(opt, "scaler", None) is None:
            opt._is_overflow = False  # without a scaler Accelerate never resets it

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        self._add_logs(state, logs)

    def _add_logs(self, state: Any, logs: dict[str, Any] | None) -> None:
        """gradguard's keys into ``logs`` once per logging step (the companion comes first)."""
        if self.guard is None or logs is None:
            return
        self.guard.flush()  # [sync] one read per logging step
        hist = self.guard.history
        new = [i for i, s in enumerate(hist.step) if s > self._last_logged]
        if not new:
            return
        self._last_logged = hist.step[new[-1]]
        last = new[-1]
        norms = [hist.global_norm[i] for i in new]
        extra: dict[str, float] = {
            "gradguard/grad_norm": hist.global_norm[last],
            "gradguard/grad_norm_max": max(norms, key=lambda v: (math.isnan(v), v)),
            "gradguard/clipped": float(sum(hist.clipped[i] for i in new)),
            "gradguard/skipped": float(sum(hist.skipped[i] for i in new)),
        }
        thr = hist.threshold[last]
        if math.isfinite(thr):
            extra["gradguard/threshold"] = thr
        if self.log_per_layer:
            rows = chart_rows(hist.tail(1), self.log_per_layer, norm_type=self._norm_type)
            extra.update({k: v for k, v in rows[0][1].items() if "/grad_norm/" in k})
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.guard is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            torch.save(self.guard.state_dict(), folder / CHECKPOINT_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.guard is not None:
            self.guard.flush()

    # -- checkpoints ----------------------------------------------------------------------------
    def load_checkpoint(self, checkpoint_dir: str | os.PathLike[str]) -> None:
        """Read ``gradguard.pt`` from a ``checkpoint-<step>`` folder; applied at ``on_train_begin``."""
        path = Path(checkpoint_dir) / CHECKPOINT_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{str(path)!r} does not exist: `checkpoint_dir` must be a checkpoint folder that "
                "a Trainer with GradGuardCallback saved (it holds gradguard.pt)."
            )
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def state_dict(self) -> dict[str, Any]:
        """The Guard's state (or the state waiting to be applied)."""
        if self.guard is None:
            return dict(self._pending_state or {})
        return self.guard.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.guard is None:
            self._pending_state = state_dict
        else:
            self.guard.load_state_dict(state_dict)


class _LogFirst(TrainerCallback):
    """Runs first in ``on_log`` so that the ``report_to`` loggers after it see gradguard's keys.

    The keys are added once per logging step: the owner's own ``on_log`` then finds nothing new.
    """

    def __init__(self, owner: GradGuardCallback) -> None:
        self.owner = owner

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        self.owner._add_logs(state, logs)
