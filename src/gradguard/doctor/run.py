"""The instrumented run: the user's recipe on a copy of the model, recorded step by step.

The caller's model, optimizer and random-number state are never touched: the doctor deep-copies
the model, builds a new optimizer of the same class and hyper-parameters on the copy, and runs
inside a forked RNG (torch, Python ``random`` and NumPy states are restored on the way out).

The run records, per step, the gradient norm of every parameter (one fused pass,
:func:`gradguard.stats.compute_stats`), the loss and, when an optimizer is given, each tensor's
update/weight ratio ``||Δw|| / ||w||`` into a :class:`~gradguard.history.HistoryBuffer`;
:class:`~gradguard.doctor.probes.Probe` samples saturation, dead units and activation scale on the way.
The doctor is not the hot path: it reads the loss back each step to stop a run that has diverged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gradguard.clip import clip_grad_norm_
from gradguard.doctor.detectors import layer_view, run_detectors
from gradguard.doctor.probes import Probe, ProbeSummary, param_infos
from gradguard.doctor.remedies import LR_TARGET_RATIO, Treatment
from gradguard.findings import Finding, HistorySummary
from gradguard.history import History, HistoryBuffer
from gradguard.stats import compute_stats

__all__ = ["activation_map"]

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


def _summarise(run: _Run) -> HistorySummary:
    view = layer_view(run.history, run.probes)
    ur = []
    for row in view.update:
        vals = sorted(v for v in row if math.isfinite(v))
        ur.append(vals[len(vals) // 2] if vals else math.nan)
    return HistorySummary(layers=list(view.layers), step=list(run.history.step),
                          loss=list(run.history.loss), global_norm=list(run.history.global_norm),
                          layer_norm=[list(r) for r in view.norms], update_ratio=ur)
