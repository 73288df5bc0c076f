"""``diagnose``: a short instrumented run on a copy of the model, the detectors, and remedy trials.

The caller's model, optimizer and random-number state are never touched: the doctor deep-copies
the model, builds a new optimizer of the same class and hyper-parameters on the copy, and runs
inside a forked RNG (torch, Python ``random`` and NumPy states are restored on the way out).

The run records, per step, the gradient norm of every parameter (one fused pass,
:func:`gradguard.stats.compute_stats`), the loss and, when an optimizer is given, each tensor's
update/weight ratio ``||Δw|| / ||w||`` into a :class:`~gradguard.history.HistoryBuffer`;
:class:`~gradguard.probe.Probe` samples saturation, dead units and activation scale on the way.
The doctor is not the hot path: it reads the loss back each step to stop a run that has diverged.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradguard._checks import check_int
from gradguard.clip import clip_grad_norm_
from gradguard.detect import layer_view, run_detectors
from gradguard.findings import Finding, HistorySummary, Report, Trial
from gradguard.history import History, HistoryBuffer
from gradguard.probe import Probe, ProbeSummary, param_infos
from gradguard.stats import compute_stats
from gradguard.treat import LR_TARGET_RATIO, TREATMENTS, Treatment

__all__ = ["Prescription", "activation_map", "diagnose", "prescribe"]

log = logging.getLogger(__name__)

#: forward/backward passes examined when no optimizer is given
EXAM_BATCHES = 4
#: a run stops after this many consecutive non-finite losses
MAX_BAD_STEPS = 3
LANGS = ("en", "ko")

ProgressFn = Callable[[str, int, int], None]


@dataclass
class _Run:
    history: History
    probes: ProbeSummary
    findings: list[Finding]
    early_norm: float  # median global norm of the first finite steps (clip threshold)


def activation_map(summary: ProbeSummary) -> tuple[dict[str, str | None], dict[str, str], set[str]]:
    """From a probe summary: the activation op after each weight layer, the site that holds it,
    and the activation sites that produce the model output.

    Returns:
        (follow, follow_site, output_sites): ``follow[layer]`` is the op (``None`` when no
        activation comes before the next layer), ``follow_site[layer]`` the site's module name,
        ``output_sites`` the module names of activations whose output is the model's output.
    """
    follow: dict[str, str | None] = {}
    follow_site: dict[str, str] = {}
    pending: list[str] = []
    for s in sorted(summary.sites, key=lambda s: s.order):
        if s.kind == "layer":
            for layer in pending:
                follow.setdefault(layer, None)
            pending = [s.module]
        elif pending:
            for layer in pending:
                follow[layer] = s.op
                follow_site[layer] = s.module
            pending = []
    for layer in pending:
        follow.setdefault(layer, None)
    outputs = {s.module for s in summary.sites if s.is_output and s.kind != "layer"}
    return follow, follow_site, outputs


# -- input checks --------------------------------------------------------------------------------
def _is_batch(x: Any) -> bool:
    return (isinstance(x, (tuple, list)) and len(x) == 2
            and not (isinstance(x[0], (tuple, list)) and len(x[0]) == 2
                     and isinstance(x[1], (tuple, list)) and len(x[1]) == 2))


def _collect_batches(data: Any, n: int) -> list[tuple[Any, Any]]:
    """``n`` batches from one batch (reused) or an iterable of batches (cycled if short)."""
    one = _is_batch(data) and (isinstance(data[0], Tensor) or (
        isinstance(data, tuple) and isinstance(data[1], Tensor) and isinstance(data[0], dict)))
    if one:
        return [(data[0], data[1])] * n
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"`data` must be one (inputs, targets) batch or an iterable of such batches (a list, "
            f"a DataLoader), got {type(data).__name__}."
        )
    out: list[tuple[Any, Any]] = []
    for b in data:
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            shape = f"a {type(b).__name__}" + (f" of length {len(b)}" if hasattr(b, "__len__") else "")
            raise ValueError(
                f"`data` must yield (inputs, targets) pairs; batch {len(out)} is {shape}. Wrap "
                "your loader, e.g. ((x, y) for x, y, *_ in loader)."
            )
        out.append((b[0], b[1]))
        if len(out) >= n:
            break
    if not out:
        raise ValueError("`data` is empty: pass at least one (inputs, targets) batch.")
    while len(out) < n:
        out.append(out[len(out) % max(1, len(out))])
    return out[:n]


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is None:
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}."
        )
    ids = {id(p) for p in model.parameters()}
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            if id(p) not in ids:
                raise ValueError(
                    f"`optimizer` param group {gi} holds a tensor of shape {tuple(p.shape)} that "
                    "is not a parameter of `model`; build the optimizer on model.parameters()."
                )


def _clone_optimizer(model: nn.Module, copy_model: nn.Module, optimizer: torch.optim.Optimizer,
                     *, lr_factor: float = 1.0, adam: bool = False) -> torch.optim.Optimizer:
    """Same class and hyper-parameters as ``optimizer``, on ``copy_model``'s parameters (fresh state)."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    copies = list(copy_model.parameters())
    if adam:
        return torch.optim.Adam([p for p in copies if p.requires_grad], lr=1e-3)
    groups = []
    for g in optimizer.param_groups:
        ng = {k: v for k, v in g.items() if k not in ("params", "initial_lr")}
        ng["params"] = [copies[index[id(p)]] for p in g["params"]]
        if "lr" in ng:
            lr = ng["lr"]
            ng["lr"] = lr * lr_factor if not isinstance(lr, Tensor) else lr.clone() * lr_factor
        groups.append(ng)
    cls = type(optimizer)
    try:
        return cls(groups, **optimizer.defaults)
    except TypeError:
        return cls(groups)


def _scalar_loss(loss: Any, step: int) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"`loss_fn(model(inputs), targets)` must return a scalar tensor; got "
            f"{type(loss).__name__} at step {step}."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"`loss_fn` must return a scalar (one-element) tensor; got shape {tuple(loss.shape)}. "
            "Use a mean-reduced loss (reduction='mean') or call .mean() on it."
        )
    if not loss.requires_grad:
        raise ValueError(
            "`loss_fn` returned a tensor that does not require grad: it does not depend on the "
            "model's parameters (was it computed under torch.no_grad() or from .detach()?)."
        )
    return loss.reshape(())


# -- one instrumented run ------------------------------------------------------------------------
def _run(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], batches: Sequence[tuple[Any, Any]],
         optimizer: torch.optim.Optimizer | None, seed: int, treatment: Treatment | None,
         clip_norm: float | None, original: nn.Module, ctx: Mapping[str, Any] | None,
         progress: Callable[[int], None] | None = None) -> tuple[_Run, list[str]]:
    """Copy ``model``, apply ``treatment``, run, detect. Returns the run and what was changed."""
    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    changed: list[str] = []
    if treatment is not None and treatment.model_fn is not None:
        changed = treatment.model_fn(m, ctx or {})
    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("`model` has no parameter that requires grad: there is nothing to diagnose.")
    names = [n for n, _ in params]
    plist = [p for _, p in params]
    device = plist[0].device
    opt = None
    if optimizer is not None:
        t = treatment or Treatment("baseline")
        factor = _lr_factor(t, ctx)
        if factor != 1.0:
            changed = [*changed, f"lr x{factor:.3g}"]
        opt = _clone_optimizer(original, m, optimizer, lr_factor=factor, adam=t.adam)
        base_lrs = [g.get("lr") for g in opt.param_groups]
    n = len(batches)
    buf = HistoryBuffer(names, capacity=n, device=device)
    init_params = param_infos(m)
    early_end = max(1, min(5, n // 4)) if opt is not None else n
    early: ProbeSummary | None = None
    bad_streak = 0
    running: list[float] = []
    warmup = max(1, n // 3)
    with Probe(m) as probe:
        for step, (x, y) in enumerate(batches):
            if opt is not None and step == early_end:
                early = probe.summary()
                probe.reset()
            x, y = _to(x, device), _to(y, device)
            loss = _scalar_loss(loss_fn(m(x), y), step)
            m.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in plist]
            stats = compute_stats(grads, 2.0)
            ratio = None
            skip = False
            if opt is not None:
                t = treatment
                gn = float(stats.global_norm)  # [sync] the doctor decides per step; not a hot path
                if t is not None and t.skip_nonfinite and not math.isfinite(gn):
                    skip = True
                if t is not None and t.skip_spikes and math.isfinite(gn) and len(running) >= 5:
                    med = sorted(running[-20:])[len(running[-20:]) // 2]
                    skip = skip or gn > 10 * med
                if math.isfinite(gn):
                    running.append(gn)
                if t is not None and t.clip and clip_norm is not None:
                    clip_grad_norm_(plist, clip_norm)
                if t is not None and t.warmup:
                    for g, lr in zip(opt.param_groups, base_lrs):
                        if lr is not None:
                            g["lr"] = lr * min(1.0, (step + 1) / warmup)
                if not skip:
                    before = [p.detach().clone() for p in plist]
                    opt.step()
                    with torch.no_grad():
                        delta = torch._foreach_sub([p.detach() for p in plist], before)
                        dn = torch.stack(torch._foreach_norm(delta)).float()
                        wn = torch.stack(torch._foreach_norm(before)).float()
                        ratio = torch.where(wn > 0, dn / wn.clamp_min(1e-30),
                                            torch.full_like(dn, math.nan))
                else:
                    ratio = torch.zeros(len(plist), device=device)
            buf.record(step, global_norm=stats.global_norm, per_tensor_norm=stats.per_tensor_norm,
                       loss=loss.detach(), skipped=skip, update_ratio=ratio)
            if progress is not None:
                progress(step + 1)
            lv = float(loss.detach())  # [sync] stop a diverged run early
            bad_streak = bad_streak + 1 if not math.isfinite(lv) else 0
            if bad_streak >= MAX_BAD_STEPS:
                break
        late = probe.summary()
    hist = buf.flush()
    summary = _merge_windows(early, late, init_params)
    findings = run_detectors(hist, summary)
    finite = [v for v in hist.global_norm if math.isfinite(v)]
    early_norm = sorted(finite[:5])[len(finite[:5]) // 2] if finite else math.nan
    return _Run(hist, summary, findings, early_norm), changed


def _lr_factor(t: Treatment, ctx: Mapping[str, Any] | None) -> float:
    """The treatment's learning-rate factor; a measured update ratio can lower it further."""
    ratio = (ctx or {}).get("update_ratio")
    if t.lr_from_evidence and isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0:
        return min(t.lr_factor, LR_TARGET_RATIO / ratio)
    return t.lr_factor


def _merge_windows(early: ProbeSummary | None, late: ProbeSummary, init_params: list[Any]
                   ) -> ProbeSummary:
    """The late window is the verdict; if it went non-finite, read the early one instead."""
    main = late
    if early is not None and (late.batches == 0 or any(
            s.nonfinite or not math.isfinite(s.rms) for s in late.sites)):
        bad = {s.name for s in late.sites if s.nonfinite}
        main = copy.deepcopy(early)
        for s in main.sites:
            s.nonfinite = s.nonfinite or s.name in bad
        main.sites += [s for s in late.sites if s.name not in {t.name for t in main.sites}]
    main.params = init_params
    main.loss_recorded = True
    main.initial = early
    if not main.module_order and early is not None:
        main.module_order = early.module_order
    return main


# -- metrics for trials --------------------------------------------------------------------------
def _flow(run: _Run) -> float:
    """Median first/last weight-layer gradient ratio (or first/last time step for an RNN)."""
    view = layer_view(run.history, run.probes)
    layers = view.weight_layers
    if len(layers) < 2:
        return math.nan
    j0, j1 = view.layers.index(layers[0]), view.layers.index(layers[-1])
    vals = [r[j0] / r[j1] for r in view.norms
            if math.isfinite(r[j0]) and math.isfinite(r[j1]) and r[j1] > 0]
    return sorted(vals)[len(vals) // 2] if vals else math.nan


def _time_flow(run: _Run) -> float:
    """Gradient at the first time step over the last's, read where the detectors read it."""
    src = run.probes.initial if run.probes.initial is not None and run.probes.initial.temporal \
        else run.probes
    for t in src.temporal:
        g = t.grad_norm
        if len(g) >= 2 and g[-1] > 0 and all(math.isfinite(v) for v in g):
            return g[0] / g[-1]
    return math.nan


def _final_loss(run: _Run) -> float:
    loss = run.history.loss
    if not loss:
        return math.nan
    k = max(3, len(loss) // 10)
    tail = loss[-k:]
    if any(not math.isfinite(v) for v in tail):
        return math.nan
    return sum(tail) / len(tail)


def _decades(x: float) -> float:
    return abs(math.log10(x)) if math.isfinite(x) and x > 0 else math.inf


def _flow_gain(base: float, trial: float) -> float:
    """Decades of the baseline's imbalance that the trial removed (toward a ratio of 1).

    A ratio above 1 (gradients growing toward the input) must come down, one below 1 must come
    up; moving past 1 earns nothing more (a problem on the other side shows up as a finding).
    """
    lb, lt = math.log10(base), math.log10(trial)
    return lb - max(lt, 0.0) if lb > 0 else min(lt, 0.0) - lb


# -- the public entry point ----------------------------------------------------------------------
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
    and hyper-parameters. The detectors of :mod:`gradguard.detect` then read the per-layer
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


def _score_trial(base: _Run, trial: Trial, time_axis: bool) -> tuple[float, bool]:
    """Ranking key and "measurably better" flag for one trial against the baseline run.

    Score: +2 per baseline finding resolved, -2 per finding introduced, + the decades of
    imbalance the first/last gradient ratio lost (:func:`_flow_gain`, clipped to ±3), + 3·log(baseline loss / trial loss)
    (clipped to ±3; ±3 when only one of them stayed finite). Without an optimizer the losses are
    those at the starting weights. "Improved" means a half-decade better gradient flow (from at
    least a decade off), a loss at least 5% lower, a run that stays finite where the baseline did
    not, or a baseline finding resolved without a new one.
    """
    score = 2.0 * len(trial.resolved) - 2.0 * len(trial.introduced)
    improved = False
    bf, tf = (_time_flow(base), trial.time_ratio) if time_axis else (_flow(base), trial.flow_ratio)
    bd, td = _decades(bf), _decades(tf)
    if math.isfinite(bd) and math.isfinite(td):
        gain = max(-3.0, min(3.0, _flow_gain(bf, tf)))
        score += gain
        improved = bd >= 1.0 and gain >= 0.5
    elif not math.isfinite(bd) and math.isfinite(td):
        score += 3.0
        improved = True
    bl, tl = _final_loss(base), trial.final_loss
    if math.isfinite(bl) and math.isfinite(tl) and bl > 0 and tl > 0:
        score += 3.0 * max(-1.0, min(1.0, math.log(bl / tl)))
        improved = improved or tl < 0.95 * bl
    elif not math.isfinite(bl) and math.isfinite(tl):
        score += 3.0
        improved = True
    elif math.isfinite(bl) and not math.isfinite(tl):
        score -= 3.0
    if trial.resolved and not trial.introduced:
        improved = True
    return score, improved


def _summarise(run: _Run) -> HistorySummary:
    view = layer_view(run.history, run.probes)
    ur = []
    for row in view.update:
        vals = sorted(v for v in row if math.isfinite(v))
        ur.append(vals[len(vals) // 2] if vals else math.nan)
    return HistorySummary(layers=list(view.layers), step=list(run.history.step),
                          loss=list(run.history.loss), global_norm=list(run.history.global_norm),
                          layer_norm=[list(r) for r in view.norms], update_ratio=ur)


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
        remedy: a remedy code with an automatic treatment (see :data:`gradguard.treat.TREATMENTS`).
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
