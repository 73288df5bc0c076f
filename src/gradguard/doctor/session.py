"""``diagnose``: the untreated run, the detectors, the remedy trials ranked by the loss, and the
report; ``prescribe`` and ``findings_from_history`` beside it."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from gradguard._checks import check_int
from gradguard._plan import unwrap_compiled
from gradguard.doctor.detectors import run_detectors
from gradguard.doctor.probes import Probe, ProbeSummary
from gradguard.doctor.ranking import (
    examine_verdict, final_loss, flow, rank, score, time_flow, verdict,
)
from gradguard.doctor.remedies import TREATMENTS, Treatment, fit_remedies, model_facts
from gradguard.doctor.run import (
    EXAM_BATCHES, LANGS, ProgressFn, Recipe, _Run, _to, activation_map, check_optimizer,
    check_scheduler, clone_optimizer, collect_batches, loss_batch_ratio, lr_factor, run,
    summarise, target_elements,
)
from gradguard.findings import Finding, Report, Trial
from gradguard.history import History

log = logging.getLogger(__name__)

#: inputs count as unscaled when a feature's scale is this far from 1 (either way) ...
UNSCALED_FEATURE = 30.0
#: ... or when feature scales spread over this factor; regression targets past UNSCALED_FEATURE too
UNSCALED_SPREAD = 100.0


def diagnose(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor] | None,
    data: Any,
    optimizer: torch.optim.Optimizer | None = None,
    steps: int = 30,
    try_remedies: bool = False,
    *,
    step_fn: Callable[[nn.Module, Any], Any] | None = None,
    scheduler: Any = None,
    clip: float | None = None,
    lang: str | None = None,
    seed: int = 0,
    max_trials: int = 6,
    max_seconds: float | None = None,
    progress: ProgressFn | None = None,
) -> Report:
    """Name what is wrong with a network's gradients, where, why, and what fixes it.

    Runs a short instrumented session on a deep copy of ``model``: with ``optimizer=None`` it
    examines the network at its current weights (forward and backward on a few batches); with an
    optimizer it also trains the copy for ``steps`` steps with your recipe (a new optimizer of the
    same class and hyper-parameters, your scheduler and clipping). The detectors of
    :mod:`gradguard.doctor.detectors` then read the per-layer gradient norms, losses,
    update/weight ratios and forward probes.

    With ``try_remedies=True`` each remedy the findings propose (fitted to the model: nothing you
    already do, normalisation that suits the architecture) is applied to a fresh copy and the same
    steps are run again with the same seed and batches, one change at a time. A trial *helps* when
    its loss over the last quarter of the steps is at least 10 % and two standard errors below the
    untreated run's; the trials are ranked by that across all findings, and
    ``report.prescription`` is the one that helped most.

    Args:
        model (nn.Module): the network. Never modified.
        loss_fn (callable or None): ``loss_fn(model(inputs), targets)`` returns a scalar tensor.
            None when ``step_fn`` is given.
        data: one batch (reused every step) or an iterable of batches (a list or a DataLoader;
            cycled when shorter than ``steps``). With ``loss_fn`` a batch is ``(inputs,
            targets)``; with ``step_fn`` it is whatever ``step_fn`` takes. A one-shot iterator is
            consumed: pass a list or a DataLoader to keep yours.
        optimizer (torch.optim.Optimizer, optional): the optimizer you train with. Its class and
            hyper-parameters are cloned (fresh state) onto the copy; the original is never
            stepped. Default: None (examine only).
        steps (int, optional): training steps with an optimizer. Default: 30.
        try_remedies (bool, optional): also try the remedies on copies. Default: False.
        step_fn (callable, optional): ``step_fn(model, batch) -> loss`` for models whose forward
            takes more than ``inputs`` (a hidden state, a mask) or returns the loss: it may return
            the loss, a tuple ending with it (``(logits, loss)``) or an object with ``.loss``.
            Keep state that spans batches (a carried hidden state) on the model: every run works
            on its own copy.
        scheduler (optional): your LR scheduler on ``optimizer`` (warm-up, cosine, ...); each
            run drives a copy of it, so the baseline is your recipe. Default: None.
        clip (float, optional): the gradient-norm threshold your loop clips at. Default: None.
        lang (str, optional): default language of the report's text, ``"en"`` or ``"ko"``
            (``render()`` and ``to_html()`` can still override it). Default: None (English).
        seed (int, optional): seed of every run inside the doctor (the caller's RNG state is
            saved and restored). Default: 0.
        max_trials (int, optional): at most this many remedies are tried. Default: 6.
        max_seconds (float, optional): a time budget; remedies not started before it runs out
            are listed as not tried (``time_budget``). Default: None (no limit).
        progress (callable, optional): ``progress(stage, done, total)`` after every step, for a
            progress bar (``stage`` is ``"baseline"`` or a remedy code).

    Returns:
        Report: ``report.findings`` (empty when healthy), the run's per-layer history, the trials
        (best first) and ``report.prescription``.

    Raises:
        TypeError, ValueError: for arguments of the wrong kind (each message names the argument
            and the fix), or a loss that is not a scalar tensor.

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
    if step_fn is not None and not callable(step_fn):
        raise TypeError(f"`step_fn` must be callable as step_fn(model, batch) -> loss, got "
                        f"{type(step_fn).__name__}.")
    if step_fn is None and not callable(loss_fn):
        raise TypeError(
            f"`loss_fn` must be callable as loss_fn(model(inputs), targets), got "
            f"{type(loss_fn).__name__}; or pass step_fn=lambda model, batch: loss."
        )
    steps = check_int("steps", steps, minimum=1)
    max_trials = check_int("max_trials", max_trials, minimum=0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
    if lang is not None and lang not in LANGS:
        raise ValueError(f"`lang` must be one of {LANGS} or None, got {lang!r}.")
    if not isinstance(try_remedies, bool):
        raise TypeError(f"`try_remedies` must be a bool, got {type(try_remedies).__name__}.")
    if clip is not None and not (isinstance(clip, (int, float)) and not isinstance(clip, bool)
                                 and math.isfinite(clip) and clip > 0):
        raise ValueError(f"`clip` must be a positive number (the max_norm you clip at) or None, "
                         f"got {clip!r}.")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float))
                                        and max_seconds > 0):
        raise ValueError(f"`max_seconds` must be a positive number or None, got {max_seconds!r}.")
    model = unwrap_compiled(model)  # torch.compile's wrapper: its copies need no compilation
    check_optimizer(model, optimizer)
    check_scheduler(scheduler, optimizer)
    n = steps if optimizer is not None else min(steps, EXAM_BATCHES)
    t0 = time.perf_counter()
    deadline = t0 + max_seconds if max_seconds is not None else math.inf
    py_state = random.getstate()
    np_state = _numpy_state()
    devices = [p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"][:1]
    try:
        with torch.random.fork_rng(devices=devices):
            # inside the fork: a shuffling DataLoader draws from the global RNG
            batches = collect_batches(data, n, pairs=step_fn is None)
            recipe = Recipe(model, batches, loss_fn, step_fn, optimizer, scheduler,
                            float(clip) if clip is not None else None)
            report = _diagnose(recipe, try_remedies, seed, max_trials, progress, deadline)
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


def data_stats(batches: Sequence[Any]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None:
    """Per-feature mean and standard deviation of 2-D floating inputs over the batches, and of
    floating regression targets when they are far from unit scale (else None for those)."""
    xs = [b[0] for b in batches[:16] if isinstance(b, (tuple, list)) and isinstance(b[0], Tensor)]
    if not xs or not all(x.is_floating_point() and x.ndim == 2 for x in xs):
        return None
    x = torch.cat([v.detach().float() for v in xs])
    mx, sx = x.mean(0), x.std(0).clamp_min(1e-8)
    ys = [b[1] for b in batches[:16]]
    ym = ysd = None
    if all(isinstance(y, Tensor) and y.is_floating_point() for y in ys):
        y = torch.cat([v.detach().float().reshape(v.shape[0], -1) for v in ys])
        if float(y.abs().mean()) > UNSCALED_FEATURE:  # [sync] once per diagnosis
            ym, ysd = y.mean(0), y.std(0).clamp_min(1e-8)
    return mx, sx, ym, ysd


def unscaled(stats: tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None) -> bool:
    """Whether the inputs (or the regression targets) are far from unit scale."""
    if stats is None:
        return False
    mx, sx, ym, _ = stats
    live = sx > 1e-6  # constant features (a blank pixel) say nothing about scale
    if not bool(live.any()):  # [sync] once per diagnosis
        return ym is not None
    scale = (mx.abs() + sx)[live].tolist()
    big = max(scale) > UNSCALED_FEATURE or min(scale) < 1 / UNSCALED_FEATURE
    spread = max(scale) / max(min(scale), 1e-12) > UNSCALED_SPREAD
    return big or spread or ym is not None


def _output_layer(summary: ProbeSummary) -> str | None:
    """The weight layer that produced the model's output (the last one seen, in forward order)."""
    layers = [s for s in sorted(summary.sites, key=lambda s: s.order) if s.kind == "layer"]
    out = [s.module for s in layers if s.is_output]
    return out[-1] if out else (layers[-1].module if layers else None)


def _diagnose(recipe: Recipe, try_remedies: bool, seed: int, max_trials: int,
              progress: ProgressFn | None, deadline: float) -> Report:
    n = len(recipe.batches)

    def tick(stage: str) -> Callable[[int], None] | None:
        if progress is None:
            return None
        return lambda done: progress(stage, done, n)

    ctx: dict[str, Any] = {"loss_batch_ratio": loss_batch_ratio(recipe)}
    stats = data_stats(recipe.batches) if recipe.step_fn is None else None
    if stats is not None:
        ctx["data_stats"] = stats
    base, _ = run(recipe, seed, None, ctx, progress=tick("baseline"))
    facts = model_facts(recipe.model, recipe.optimizer, clip=recipe.clip, lrs=base.lrs,
                        unscaled_data=unscaled(stats))
    findings = base.findings
    fit_remedies(findings, facts)
    trials: list[Trial] = []
    if try_remedies and findings:
        ctx.update(_trial_context(base, recipe))
        trials = _try_remedies(recipe, seed, max_trials, base, ctx, progress, deadline)
    report = Report(findings=findings, history=summarise(base), trials=trials,
                    metadata=_metadata(recipe, base, n))
    best = report.prescription
    if best is not None:
        report.metadata["prescription"] = best.remedy
    return report


def _trial_context(base: _Run, recipe: Recipe) -> dict[str, Any]:
    """What the treatments may use from the baseline run: the traced activation map, the output
    layer, the measured update ratio of a learning-rate finding, a clipping threshold, and how
    many elements a summed loss adds up."""
    follow, follow_site, outputs = activation_map(base.probes)
    ctx: dict[str, Any] = {"follow": follow, "follow_site": follow_site, "output_sites": outputs,
                           "output_layer": _output_layer(base.probes),
                           "loss_elements": target_elements(recipe)}
    lr = next((f for f in base.findings if f.code == "learning_rate_too_high"), None)
    if lr is not None:
        ctx["update_ratio"] = float(lr.evidence.get("update_ratio", math.nan))
    ok = math.isfinite(base.early_norm) and base.early_norm > 0
    ctx["clip_norm"] = base.early_norm if ok else 1.0
    return ctx


def _candidates(findings: Sequence[Finding]) -> list[str]:
    out: list[str] = []
    # first remedies of every finding first, then the second ones, ...
    for k in range(max((len(f.remedies) for f in findings), default=0)):
        for f in findings:
            if k < len(f.remedies) and f.remedies[k] not in out:
                out.append(f.remedies[k])
    return out


def _try_remedies(recipe: Recipe, seed: int, max_trials: int, base: _Run, ctx: dict[str, Any],
                  progress: ProgressFn | None, deadline: float) -> list[Trial]:
    time_axis = any(f.evidence.get("axis") == "time" for f in base.findings)
    trials: list[Trial] = []
    tried = 0
    for code in _candidates(base.findings):
        t = TREATMENTS.get(code)
        if t is None:
            continue
        automatic = not t.manual and not (t.needs_optimizer and recipe.optimizer is None)
        if automatic:
            if tried >= max_trials:
                trials.append(Trial(code, applied=False, note="trial_limit"))
                continue
            if time.perf_counter() > deadline:
                trials.append(Trial(code, applied=False, note="time_budget"))
                continue
            tried += 1
        trials.append(_trial(recipe, seed, base, t, ctx, time_axis, progress))
    ordered = rank(trials)
    cannot = {t.remedy for t in ordered if t.note in ("not_applicable", "failed")}
    for f in base.findings:
        f.trials = [t for t in ordered if t.remedy in f.remedies]
        helped = [t.remedy for t in ordered if t.remedy in f.remedies and t.improved]
        worse = [t.remedy for t in ordered if t.remedy in f.remedies and t.verdict == "worse"]
        # a remedy that cannot apply to this model is listed with its trial, never offered; one
        # measured worse goes last
        rest = [r for r in f.remedies if r not in helped and r not in cannot and r not in worse]
        f.remedies = helped + rest + worse
    return ordered


def _trial(recipe: Recipe, seed: int, base: _Run, t: Treatment, ctx: dict[str, Any],
           time_axis: bool, progress: ProgressFn | None) -> Trial:
    """Run one remedy on a fresh copy and measure it against the baseline run; a learning-rate
    remedy searches its factors and keeps the best."""
    if t.manual:
        return Trial(t.code, applied=False, note="manual")
    if t.needs_optimizer and recipe.optimizer is None:
        return Trial(t.code, applied=False, note="needs_optimizer")
    if not t.lr_search:
        return _one_trial(recipe, seed, base, t, ctx, time_axis, progress)
    grid = list(t.lr_search)
    start = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / lr_factor(t, ctx))))
    done: dict[int, Trial] = {}

    def at(i: int) -> Trial:
        if i not in done:
            done[i] = _one_trial(recipe, seed, base, replace(t, lr_factor=grid[i],
                                                             lr_from_evidence=False),
                                 ctx, time_axis, progress)
            done[i].factor = grid[i]
        return done[i]

    best = start
    for step in (1, -1):  # walk away from the start while the loss keeps improving
        i = start
        while 0 <= i + step < len(grid) and at(i + step).score > at(best).score:
            i += step
            best = i
        if best != start:
            break
    return at(best)


def _one_trial(recipe: Recipe, seed: int, base: _Run, t: Treatment, ctx: dict[str, Any],
               time_axis: bool, progress: ProgressFn | None) -> Trial:
    cb = None
    if progress is not None:
        n = len(recipe.batches)
        cb = (lambda c: (lambda done: progress(c, done, n)))(t.code)
    try:
        tr, changed = run(recipe, seed, t, ctx, baseline=base, progress=cb)
    except Exception as e:  # a treatment can break a model's forward; say so, keep going
        log.info("remedy %s could not run on this model: %s", t.code, e)
        return Trial(t.code, applied=False, note="failed", changed=[str(e)[:200]])
    if t.model_fn is not None and not changed:
        return Trial(t.code, applied=False, note="not_applicable")
    base_codes = {f.code for f in base.findings}
    codes = [f.code for f in tr.findings]
    trial = Trial(
        t.code, applied=True, changed=changed, flow_ratio=flow(tr), final_loss=final_loss(tr),
        findings=codes, resolved=sorted(base_codes - set(codes)),
        introduced=sorted(set(codes) - base_codes), loss_curve=list(tr.history.loss),
        time_ratio=time_flow(tr),
    )
    if recipe.optimizer is not None:
        trial.verdict, trial.relative_loss = verdict(base.history.loss, tr.history.loss,
                                                     tr.stopped)
    else:
        trial.verdict = examine_verdict(base, trial, time_axis)
        bl, tl = final_loss(base), trial.final_loss
        trial.relative_loss = tl / bl if bl > 0 and math.isfinite(tl) else math.nan
    trial.improved = trial.verdict == "helps"
    trial.score = score(trial)
    return trial


def _metadata(recipe: Recipe, run: _Run, n: int) -> dict[str, Any]:
    from gradguard import __version__

    model, optimizer = recipe.model, recipe.optimizer
    md: dict[str, Any] = {
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "mode": "train" if optimizer is not None else "examine",
        "steps": len(run.history),
        "steps_requested": n,
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "scheduler": type(recipe.scheduler).__name__ if recipe.scheduler is not None else None,
        "clip": recipe.clip,
        "gradguard": __version__,
        "torch": torch.__version__,
    }
    md["baseline_loss"] = final_loss(run)
    if optimizer is not None:
        md["lr"] = [float(g["lr"]) for g in optimizer.param_groups if "lr" in g]
        if math.isfinite(run.early_norm) and run.early_norm > 0:
            md["clip_norm"] = run.early_norm
    md["baseline_flow"] = flow(run)
    md["baseline_time"] = time_flow(run)
    return md


def findings_from_history(history: History, probes: ProbeSummary | None = None) -> Report:
    """A :class:`Report` for a recorded run (e.g. a Guard's JSONL), with no trials."""
    findings = run_detectors(history, probes)
    run = _Run(history, probes or ProbeSummary(), findings, math.nan)
    md = {"mode": "history", "steps": len(history), "tensors": len(history.names)}
    return Report(findings=findings, history=summarise(run), metadata=md)


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
        warmup: whether it asks for a linear learning-rate warm-up.
        mean_loss: whether it asks for a mean-reduced loss.
    """

    remedy: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    changed: list[str]
    clip: bool = False
    skip_nonfinite: bool = False
    warmup: bool = False
    mean_loss: bool = False


def prescribe(model: nn.Module, remedy: str, example: tuple[Any, Any],
              optimizer: torch.optim.Optimizer | None = None, *,
              lr_factor: float | None = None) -> Prescription:
    """Apply remedy ``remedy`` to a deep copy of ``model``, as ``diagnose`` tries it.

    Args:
        model: the network (never modified).
        remedy: a remedy code with an automatic treatment (see :data:`gradguard.doctor.remedies.TREATMENTS`).
        example: one ``(inputs, targets)`` batch; one forward pass traces which activation follows
            each layer (for initialisations that depend on it).
        optimizer: the optimizer to clone onto the copy (optional).
        lr_factor: the learning-rate factor a search chose (``trial.factor``); default: the
            remedy's own.

    Returns:
        Prescription: the treated copy and what to change in the training loop.
    """
    t = TREATMENTS.get(remedy)
    if t is None or t.manual:
        auto = sorted(k for k, v in TREATMENTS.items() if not v.manual)
        raise ValueError(f"`remedy` {remedy!r} has no automatic treatment; choose one of {auto}.")
    if t.needs_optimizer and optimizer is None:
        raise ValueError(f"remedy {remedy!r} acts through the optimizer: pass `optimizer`.")
    check_optimizer(model, optimizer)
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
        ctx = {"follow": follow, "follow_site": follow_site, "output_sites": outputs,
               "output_layer": _output_layer(summary)}
        if isinstance(example[0], Tensor):
            ctx["data_stats"] = data_stats([example])
        changed = t.model_fn(m, ctx)
    opt = None
    if optimizer is not None:
        factor = lr_factor if lr_factor is not None and math.isfinite(lr_factor) else t.lr_factor
        opt = clone_optimizer(model, m, optimizer, lr_factor=factor, adam=t.adam)
    return Prescription(remedy, m, opt, changed, clip=t.clip, skip_nonfinite=t.skip_nonfinite,
                        warmup=t.warmup, mean_loss=t.mean_loss)
