"""``diagnose``: the untreated run, the detectors, the remedy trials and the report; and
``prescribe`` / ``findings_from_history`` beside it."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradguard._checks import check_int
from gradguard.doctor.detectors import run_detectors
from gradguard.doctor.probes import Probe, ProbeSummary
from gradguard.doctor.ranking import _final_loss, _flow, _score_trial, _time_flow
from gradguard.doctor.remedies import TREATMENTS
from gradguard.doctor.run import (
    EXAM_BATCHES, LANGS, ProgressFn, _check_optimizer, _clone_optimizer, _collect_batches, _run,
    _Run, _summarise, _to, activation_map,
)
from gradguard.findings import Finding, Report, Trial
from gradguard.history import History

log = logging.getLogger(__name__)

def diagnose(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    data: Any,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int = 30,
    try_remedies: bool = False,
    *,
    lang: str | None = None,
    seed: int = 0,
    max_trials: int = 6,
    progress: ProgressFn | None = None,
) -> Report:
    """Name what is wrong with a network's gradients, where, why, and what fixes it.

    Runs a short instrumented session on a deep copy of ``model``: with ``optimizer=None`` it
    examines the network at its current weights (forward and backward on a few batches); with an
    optimizer it also trains the copy for ``steps`` steps with a new optimizer of the same class
    and hyper-parameters. The detectors of :mod:`gradguard.doctor.detectors` then read the per-layer
    gradient norms, losses, update/weight ratios and forward probes.

    With ``try_remedies=True`` each plausible remedy (from the findings, best guess first) is
    applied to a fresh copy and the same steps are run again with the same seed; the report says
    what each changed (first/last gradient ratio, loss after the run, which findings disappear) and
    the remedies are ranked by that measured effect.

    Args:
        model (nn.Module): the network. Never modified.
        loss_fn (callable): ``loss_fn(model(inputs), targets)`` returns a scalar tensor.
        data: one ``(inputs, targets)`` batch (reused every step) or an iterable of such batches
            (a list or a DataLoader; cycled when shorter than ``steps``). A one-shot iterator is
            consumed: pass a list or a DataLoader to keep yours.
        optimizer (torch.optim.Optimizer, optional): the optimizer you train with. Its class and
            hyper-parameters are cloned (fresh state) onto the copy; the original is never
            stepped. Default: None (examine only).
        steps (int, optional): training steps with an optimizer. Default: 30.
        try_remedies (bool, optional): also try the remedies on copies. Default: False.
        lang (str, optional): default language of the report's text, ``"en"`` or ``"ko"``
            (``render()`` and ``to_html()`` can still override it). Default: None (English).
        seed (int, optional): seed of every run inside the doctor (the caller's RNG state is
            saved and restored). Default: 0.
        max_trials (int, optional): at most this many remedies are tried. Default: 6.
        progress (callable, optional): ``progress(stage, done, total)`` after every step, for a
            progress bar (``stage`` is ``"baseline"`` or a remedy code).

    Returns:
        Report: ``report.findings`` (empty when healthy), the run's per-layer history, the trials.

    Raises:
        TypeError, ValueError: for arguments of the wrong kind (each message names the argument
            and the fix), or a ``loss_fn`` that does not return a scalar tensor.

    Example:
        >>> import torch, gradguard as gg
        >>> from torch import nn
        >>> net = nn.Sequential(*[m for _ in range(8) for m in (nn.Linear(32, 32), nn.Sigmoid())],
        ...                     nn.Linear(32, 4))
        >>> x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
        >>> report = gg.diagnose(net, nn.functional.cross_entropy, (x, y))
        >>> report.codes
        ['vanishing_gradients']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise TypeError(
            f"`loss_fn` must be callable as loss_fn(model(inputs), targets), got "
            f"{type(loss_fn).__name__}."
        )
    steps = check_int("steps", steps, minimum=1)
    max_trials = check_int("max_trials", max_trials, minimum=0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if lang is not None and lang not in LANGS:
        raise ValueError(f"`lang` must be one of {LANGS} or None, got {lang!r}.")
    if not isinstance(try_remedies, bool):
        raise TypeError(f"`try_remedies` must be a bool, got {type(try_remedies).__name__}.")
    _check_optimizer(model, optimizer)
    n = steps if optimizer is not None else min(steps, EXAM_BATCHES)
    t0 = time.perf_counter()
    py_state = random.getstate()
    np_state = _numpy_state()
    devices = [p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices):
            # inside the fork: a shuffling DataLoader draws from the global RNG
            batches = _collect_batches(data, n)
            report = _diagnose(model, loss_fn, batches, optimizer, try_remedies, seed, max_trials,
                               progress)
    finally:
        random.setstate(py_state)
        _restore_numpy_state(np_state)
    report.metadata.update({
        "seconds": round(time.perf_counter() - t0, 2),
        "lang": lang or "en",
    })
    return report


def _numpy_state() -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    return np.random.get_state()


def _restore_numpy_state(state: Any) -> None:
    if state is not None:
        import numpy as np

        np.random.set_state(state)


def _diagnose(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor],
              batches: list[tuple[Any, Any]], optimizer: torch.optim.Optimizer | None,
              try_remedies: bool, seed: int, max_trials: int, progress: ProgressFn | None
              ) -> Report:
    n = len(batches)

    def tick(stage: str) -> Callable[[int], None] | None:
        if progress is None:
            return None
        return lambda done: progress(stage, done, n)

    base, _ = _run(model, loss_fn, batches, optimizer, seed, None, None, model, None,
                   tick("baseline"))
    findings = base.findings
    trials: list[Trial] = []
    if try_remedies and findings:
        trials = _try_remedies(model, loss_fn, batches, optimizer, seed, max_trials, base,
                               progress)
    return Report(findings=findings, history=_summarise(base), trials=trials,
                  metadata=_metadata(model, optimizer, base, n))


def _trial_context(base: _Run) -> dict[str, Any]:
    """What the treatments may use from the baseline run: the traced activation map and the
    measured update ratio of a learning-rate finding."""
    follow, follow_site, outputs = activation_map(base.probes)
    ctx: dict[str, Any] = {"follow": follow, "follow_site": follow_site, "output_sites": outputs}
    lr = next((f for f in base.findings if f.code == "learning_rate_too_high"), None)
    if lr is not None:
        ctx["update_ratio"] = float(lr.evidence.get("update_ratio", math.nan))
    return ctx


def _candidates(findings: Sequence[Finding]) -> list[str]:
    out: list[str] = []
    for f in findings:
        for r in f.remedies:
            if r not in out:
                out.append(r)
    return out


def _try_remedies(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor],
                  batches: list[tuple[Any, Any]], optimizer: torch.optim.Optimizer | None,
                  seed: int, max_trials: int, base: _Run, progress: ProgressFn | None
                  ) -> list[Trial]:
    ctx = _trial_context(base)
    clip_norm = base.early_norm if math.isfinite(base.early_norm) and base.early_norm > 0 else 1.0
    time_axis = any(f.evidence.get("axis") == "time" for f in base.findings)
    trials: list[Trial] = []
    tried = 0
    for code in _candidates(base.findings):
        t = TREATMENTS.get(code)
        if t is None:
            continue
        if not t.manual and not (t.needs_optimizer and optimizer is None):
            if tried >= max_trials:
                trials.append(Trial(code, applied=False, note="trial_limit"))
                continue
            tried += 1
        cb = None
        if progress is not None:
            cb = (lambda c: (lambda done: progress(c, done, len(batches))))(code)
        trials.append(_trial(model, loss_fn, batches, optimizer, seed, base, code, ctx, clip_norm,
                             time_axis, cb))
    applied = sorted([t for t in trials if t.applied], key=lambda t: -t.score)
    skipped = [t for t in trials if not t.applied]
    ordered = applied + skipped
    for f in base.findings:
        f.trials = [t for t in ordered if t.remedy in f.remedies]
        measured = [t.remedy for t in applied if t.remedy in f.remedies and t.improved]
        f.remedies = measured + [r for r in f.remedies if r not in measured]
    return ordered


def _trial(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor],
           batches: list[tuple[Any, Any]], optimizer: torch.optim.Optimizer | None, seed: int,
           base: _Run, code: str, ctx: Mapping[str, Any], clip_norm: float, time_axis: bool,
           progress: Callable[[int], None] | None = None) -> Trial:
    """Run one remedy on a fresh copy and measure it against the baseline run."""
    t = TREATMENTS[code]
    if t.manual:
        return Trial(code, applied=False, note="manual")
    if t.needs_optimizer and optimizer is None:
        return Trial(code, applied=False, note="needs_optimizer")
    try:
        run, changed = _run(model, loss_fn, batches, optimizer, seed, t, clip_norm, model, ctx,
                            progress)
    except Exception as e:  # a treatment can break a model's forward; say so, keep going
        log.info("remedy %s could not run on this model: %s", code, e)
        return Trial(code, applied=False, note="failed", changed=[str(e)[:200]])
    if t.model_fn is not None and not changed:
        return Trial(code, applied=False, note="not_applicable")
    base_codes = {f.code for f in base.findings}
    codes = [f.code for f in run.findings]
    trial = Trial(
        code, applied=True, changed=changed, flow_ratio=_flow(run),
        final_loss=_final_loss(run),
        findings=codes, resolved=sorted(base_codes - set(codes)),
        introduced=sorted(set(codes) - base_codes), loss_curve=list(run.history.loss),
        time_ratio=_time_flow(run),
    )
    trial.score, trial.improved = _score_trial(base, trial, time_axis)
    return trial


def _metadata(model: nn.Module, optimizer: torch.optim.Optimizer | None, run: _Run, n: int
              ) -> dict[str, Any]:
    from gradguard import __version__

    md: dict[str, Any] = {
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "mode": "train" if optimizer is not None else "examine",
        "steps": len(run.history),
        "steps_requested": n,
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "gradguard": __version__,
        "torch": torch.__version__,
    }
    md["baseline_loss"] = _final_loss(run)
    if optimizer is not None:
        md["lr"] = [float(g["lr"]) for g in optimizer.param_groups if "lr" in g]
        if math.isfinite(run.early_norm) and run.early_norm > 0:
            md["clip_norm"] = run.early_norm
    md["baseline_flow"] = _flow(run)
    md["baseline_time"] = _time_flow(run)
    return md


def findings_from_history(history: History, probes: ProbeSummary | None = None) -> Report:
    """A :class:`Report` for a recorded run (e.g. a Guard's JSONL), with no trials."""
    findings = run_detectors(history, probes)
    run = _Run(history, probes or ProbeSummary(), findings, math.nan)
    md = {"mode": "history", "steps": len(history), "tensors": len(history.names)}
    return Report(findings=findings, history=_summarise(run), metadata=md)


@dataclass
class Prescription:
    """A remedy applied to a fresh copy: the treated model, its optimizer, and loop settings.

    Attributes:
        remedy: the remedy code.
        model: the treated deep copy (the original is untouched).
        optimizer: a new optimizer on the copy (the original's class and hyper-parameters, with
            the remedy's learning-rate factor or optimizer swap), or None.
        changed: what the treatment changed in the model.
        clip: whether the remedy asks for gradient-norm clipping in the training loop.
        skip_nonfinite: whether it asks to skip steps with non-finite gradients.
    """

    remedy: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    changed: list[str]
    clip: bool = False
    skip_nonfinite: bool = False


def prescribe(model: nn.Module, remedy: str, example: tuple[Any, Any],
              optimizer: torch.optim.Optimizer | None = None) -> Prescription:
    """Apply remedy ``remedy`` to a deep copy of ``model``, as ``diagnose`` tries it.

    Args:
        model: the network (never modified).
        remedy: a remedy code with an automatic treatment (see :data:`gradguard.doctor.remedies.TREATMENTS`).
        example: one ``(inputs, targets)`` batch; one forward pass traces which activation follows
            each layer (for initialisations that depend on it).
        optimizer: the optimizer to clone onto the copy (optional).

    Returns:
        Prescription: the treated copy and what to change in the training loop.
    """
    t = TREATMENTS.get(remedy)
    if t is None or t.manual:
        auto = sorted(k for k, v in TREATMENTS.items() if not v.manual)
        raise ValueError(f"`remedy` {remedy!r} has no automatic treatment; choose one of {auto}.")
    if t.needs_optimizer and optimizer is None:
        raise ValueError(f"remedy {remedy!r} acts through the optimizer: pass `optimizer`.")
    _check_optimizer(model, optimizer)
    m = copy.deepcopy(model)
    x = _to(example[0], next(model.parameters()).device)
    was_training = m.training
    m.eval()  # tracing only: no batch-norm statistics updated, no dropout
    with torch.no_grad(), Probe(m, temporal=False) as probe:
        m(x)
        summary = probe.summary()
    m.train(was_training)
    follow, follow_site, outputs = activation_map(summary)
    changed: list[str] = []
    if t.model_fn is not None:
        changed = t.model_fn(m, {"follow": follow, "follow_site": follow_site,
                                 "output_sites": outputs})
    opt = None
    if optimizer is not None:
        opt = _clone_optimizer(model, m, optimizer, lr_factor=t.lr_factor, adam=t.adam)
    return Prescription(remedy, m, opt, changed, clip=t.clip, skip_nonfinite=t.skip_nonfinite)
