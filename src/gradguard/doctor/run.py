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
from collections.abc import Callable, Iterable, Mapping
import warnings
from dataclasses import dataclass, field
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
    lrs: list[float] = field(default_factory=list)  # the first group's learning rate per step
    stopped: str = ""  # why the run ended early ("diverged", "losing"), "" when it ran through


@dataclass
class Recipe:
    """The user's training recipe as ``diagnose`` received it; every run copies from it.

    Attributes:
        model: the caller's model (never modified; each run deep-copies it).
        batches: the batches of every run, in order.
        loss_fn: ``loss_fn(model(inputs), targets)``, when no ``step_fn`` is given.
        step_fn: ``step_fn(model, batch) -> loss`` (or ``(logits, loss)``, or an object with a
            ``.loss``), for forwards that take more than one input or return the loss.
        optimizer: the caller's optimizer (cloned, never stepped), or None to examine only.
        scheduler: the caller's LR scheduler on ``optimizer`` (cloned per run), or None.
        clip: the caller's gradient-norm clipping threshold, or None.
    """

    model: nn.Module
    batches: list[Any]
    loss_fn: Callable[[Any, Any], Any] | None = None
    step_fn: Callable[[nn.Module, Any], Any] | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    clip: float | None = None

    def loss(self, model: nn.Module, batch: Any, step: int) -> Tensor:
        """The scalar training loss of ``model`` on ``batch``."""
        if self.step_fn is not None:
            return _scalar_loss(_loss_of(self.step_fn(model, batch)), step, "step_fn(model, batch)")
        x, y = batch
        return _scalar_loss(self.loss_fn(model(x), y), step,  # type: ignore[misc]
                            "loss_fn(model(inputs), targets)")


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


def _one_batch(x: Any) -> bool:
    """For ``step_fn`` data: a tensor, a dict, or a tuple/list of tensors is one batch."""
    if isinstance(x, (Tensor, dict)):
        return True
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(v, Tensor) for v in x)


def collect_batches(data: Any, n: int, *, pairs: bool = True) -> list[Any]:
    """``n`` batches from one batch (reused) or an iterable of batches (cycled if short).

    With ``pairs`` (a ``loss_fn``), every batch must be an ``(inputs, targets)`` pair; without
    (a ``step_fn``), a batch is whatever the data yields.
    """
    if pairs:
        one = _is_batch(data) and (isinstance(data[0], Tensor) or (
            isinstance(data, tuple) and isinstance(data[1], Tensor) and isinstance(data[0], dict)))
    else:
        one = _one_batch(data)
    if one:
        return [(data[0], data[1]) if pairs else data] * n
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"`data` must be one (inputs, targets) batch or an iterable of such batches (a list, "
            f"a DataLoader), got {type(data).__name__}."
        )
    out: list[Any] = []
    for b in data:
        if pairs and not (isinstance(b, (tuple, list)) and len(b) == 2):
            shape = f"a {type(b).__name__}" + (f" of length {len(b)}" if hasattr(b, "__len__") else "")
            raise ValueError(
                f"`data` must yield (inputs, targets) pairs; batch {len(out)} is {shape}. Wrap "
                "your loader, e.g. ((x, y) for x, y, *_ in loader), or pass step_fn=."
            )
        out.append((b[0], b[1]) if pairs else b)
        if len(out) >= n:
            break
    if not out:
        raise ValueError("`data` is empty: pass at least one batch.")
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


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
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


def check_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer | None) -> None:
    if scheduler is None:
        return
    if optimizer is None:
        raise ValueError("`scheduler` needs the optimizer it drives: pass `optimizer` as well.")
    if not callable(getattr(scheduler, "step", None)) or getattr(scheduler, "optimizer",
                                                                   None) is not optimizer:
        raise ValueError(
            f"`scheduler` must be a torch.optim.lr_scheduler built on `optimizer` (got a "
            f"{type(scheduler).__name__} whose .optimizer is not the optimizer passed)."
        )


def clone_optimizer(model: nn.Module, copy_model: nn.Module, optimizer: torch.optim.Optimizer,
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


def _clone_scheduler(scheduler: Any, old: torch.optim.Optimizer, new: torch.optim.Optimizer,
                     lr_factor: float) -> Any:
    """The caller's scheduler, in its current state, driving ``new`` (base LRs × ``lr_factor``)."""
    s = copy.deepcopy(scheduler, memo={id(old): new})
    if lr_factor != 1.0 and hasattr(s, "base_lrs"):
        s.base_lrs = [b * lr_factor for b in s.base_lrs]
    return s


def _loss_of(out: Any) -> Any:
    """The loss inside what a ``step_fn`` returned: the tensor, the last item of a tuple such as
    ``(logits, loss)``, or the ``.loss`` of a model output object."""
    if isinstance(out, (tuple, list)) and out:
        return out[-1]
    if not isinstance(out, Tensor) and isinstance(getattr(out, "loss", None), Tensor):
        return out.loss
    return out


def _scalar_loss(loss: Any, step: int, what: str = "loss_fn(model(inputs), targets)") -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"`{what}` must return a scalar tensor; got {type(loss).__name__} at step "
                        f"{step}.")
    if loss.numel() != 1:
        raise ValueError(
            f"`{what}` must return a scalar (one-element) tensor; got shape {tuple(loss.shape)}. "
            "Use a mean-reduced loss (reduction='mean') or call .mean() on it."
        )
    if not loss.requires_grad:
        raise ValueError(
            f"`{what}` returned a tensor that does not require grad: it does not depend on the "
            "model's parameters (was it computed under torch.no_grad() or from .detach()?)."
        )
    return loss.reshape(())


def _half_batch(batch: Any) -> Any:
    """The first half of a batch along dimension 0 of every tensor of that batch's leading size."""
    sizes = [t.shape[0] for t in _tensors(batch) if t.ndim >= 1]
    if not sizes or sizes[0] < 4:
        return None
    n = sizes[0]

    def cut(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x[: n // 2] if x.ndim >= 1 and x.shape[0] == n else x
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v) for v in x)
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        return x

    return cut(batch)


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def loss_batch_ratio(recipe: Recipe) -> float:
    """Loss of the first batch over the loss of its first half, at the starting weights, on a
    throw-away copy: about 2 when the loss is summed over the batch (or its tokens), about 1 for
    a mean. NaN when the batch cannot be halved or the losses are not positive and finite."""
    batch = recipe.batches[0]
    half = _half_batch(batch)
    if half is None:
        return math.nan
    m = copy.deepcopy(recipe.model)
    device = next(m.parameters()).device
    try:
        full_l = float(recipe.loss(m, _to(batch, device), 0).detach())  # [sync] once per diagnosis
        half_l = float(recipe.loss(m, _to(half, device), 0).detach())
    except Exception:  # a forward that needs the whole batch (a carried state...): not measured
        return math.nan
    if not (math.isfinite(full_l) and math.isfinite(half_l) and full_l > 0 and half_l > 0):
        return math.nan
    return full_l / half_l


def target_elements(recipe: Recipe) -> int:
    """How many elements the loss is summed over, as far as the data says: the targets' size for
    ``(inputs, targets)`` batches, the last tensor of a batch for a ``step_fn``."""
    b = recipe.batches[0]
    ts = [b[1]] if recipe.step_fn is None and isinstance(b[1], Tensor) else _tensors(b)[-1:]
    return max(1, ts[0].numel()) if ts else 1


# -- one instrumented run ------------------------------------------------------------------------
#: a trial stops early when its recent loss is this many times the untreated run's at that step
LOSING_FACTOR = 1.5


def run(recipe: Recipe, seed: int, treatment: Treatment | None = None,
        ctx: Mapping[str, Any] | None = None, *, baseline: _Run | None = None,
        progress: Callable[[int], None] | None = None) -> tuple[_Run, list[str]]:
    """Copy the model, apply ``treatment``, train (or examine) with the caller's recipe, detect.

    Returns the run and what the treatment changed. With ``baseline`` (the untreated run) a
    trial that is clearly losing to it (its recent loss :data:`LOSING_FACTOR` times the
    baseline's, from half-way on) stops early.
    """
    ctx = ctx or {}
    t = treatment or Treatment("baseline")
    torch.manual_seed(seed)
    m = copy.deepcopy(recipe.model)
    changed: list[str] = []
    if t.model_fn is not None:
        changed = t.model_fn(m, ctx)
    params = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("`model` has no parameter that requires grad: there is nothing to diagnose.")
    names = [n for n, _ in params]
    plist = [p for _, p in params]
    device = plist[0].device
    opt = sched = None
    clip_norm = recipe.clip
    batches = recipe.batches
    n = len(batches)
    warmup = max(2, n // 3)
    if recipe.optimizer is not None:
        factor = lr_factor(t, ctx)
        if factor != 1.0:
            changed = [*changed, f"lr x{factor:.3g}"]
        opt = clone_optimizer(recipe.model, m, recipe.optimizer, lr_factor=factor, adam=t.adam)
        if recipe.scheduler is not None and not t.adam:
            sched = _clone_scheduler(recipe.scheduler, recipe.optimizer, opt, factor)
        if t.clip and ctx.get("clip_norm"):
            clip_norm = float(ctx["clip_norm"])
            changed = [*changed, f"clip {clip_norm:.3g}"]
        if t.warmup:
            changed = [*changed, f"warm-up {warmup} steps"]
    scale = 1.0
    if t.mean_loss:
        scale = 1.0 / float(ctx.get("loss_elements", 1))
        changed = [*changed, f"loss / {int(round(1 / scale))}"]
    dstats = ctx.get("data_stats")
    if t.target_scale and changed and dstats is not None and dstats[3] is not None:
        scale = 1.0 / float((dstats[3] ** 2).mean())  # [sync] once per run
        changed = [*changed, f"loss / {1 / scale:.3g}"]
    buf = HistoryBuffer(names, capacity=n, device=device)
    init_params = param_infos(m)
    early_end = max(1, min(5, n // 4)) if opt is not None else n
    early: ProbeSummary | None = None
    bad_streak = 0
    running: list[float] = []
    losses: list[float] = []
    lrs: list[float] = []
    stopped = ""
    base_loss = baseline.history.loss if baseline is not None else []
    with Probe(m) as probe, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
        for step, batch in enumerate(batches):
            if opt is not None and step == early_end:
                early = probe.summary()
                probe.reset()
            loss = recipe.loss(m, _to(batch, device), step)
            m.zero_grad(set_to_none=True)
            (loss * scale if scale != 1.0 else loss).backward()
            grads = [p.grad for p in plist]
            stats = compute_stats(grads, 2.0)
            ratio = None
            skip = False
            if opt is not None:
                gn = float(stats.global_norm)  # [sync] the doctor decides per step; not a hot path
                if t.skip_nonfinite and not math.isfinite(gn):
                    skip = True
                if t.skip_spikes and math.isfinite(gn) and len(running) >= 5:
                    med = sorted(running[-20:])[len(running[-20:]) // 2]
                    skip = skip or gn > 10 * med
                if math.isfinite(gn):
                    running.append(gn)
                if clip_norm is not None:
                    clip_grad_norm_(plist, clip_norm)
                ramp = min(1.0, (step + 1) / warmup) if t.warmup else 1.0
                set_lrs = [g.get("lr") for g in opt.param_groups]
                if ramp != 1.0:
                    for g, lr in zip(opt.param_groups, set_lrs):
                        if isinstance(lr, float):
                            g["lr"] = lr * ramp
                lr0 = opt.param_groups[0].get("lr")
                lrs.append(float(lr0) if lr0 is not None else math.nan)
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
                if ramp != 1.0:
                    for g, lr in zip(opt.param_groups, set_lrs):
                        g["lr"] = lr
                if sched is not None:
                    sched.step()
            buf.record(step, global_norm=stats.global_norm, per_tensor_norm=stats.per_tensor_norm,
                       loss=loss.detach(), skipped=skip, update_ratio=ratio)
            if progress is not None:
                progress(step + 1)
            lv = float(loss.detach())  # [sync] stop a diverged run early
            losses.append(lv)
            bad_streak = bad_streak + 1 if not math.isfinite(lv) else 0
            if bad_streak >= MAX_BAD_STEPS:
                stopped = "diverged"
                break
            if base_loss and _losing(losses, base_loss, n):
                stopped = "losing"
                break
        late = probe.summary()
    hist = buf.flush()
    summary = _merge_windows(early, late, init_params)
    summary.loss_batch_ratio = float(ctx.get("loss_batch_ratio", math.nan))
    findings = run_detectors(hist, summary)
    finite = [v for v in hist.global_norm if math.isfinite(v)]
    early_norm = sorted(finite[:5])[len(finite[:5]) // 2] if finite else math.nan
    return _Run(hist, summary, findings, early_norm, lrs, stopped), changed


def _losing(trial: list[float], base: list[float], n: int) -> bool:
    """Whether a trial is clearly losing to the untreated run: from half-way on, its mean loss over
    the last eighth of the steps is :data:`LOSING_FACTOR` times the baseline's over the same
    steps (both finite and positive)."""
    i = len(trial)
    if i < max(4, n // 2) or i > len(base):
        return False
    k = max(3, n // 8)
    a, b = trial[i - k:i], base[i - k:i]
    if not all(math.isfinite(v) and v > 0 for v in a + b):
        return False
    return sum(a) > LOSING_FACTOR * sum(b)


def lr_factor(t: Treatment, ctx: Mapping[str, Any] | None) -> float:
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


def summarise(run: _Run) -> HistorySummary:
    view = layer_view(run.history, run.probes)
    ur = []
    for row in view.update:
        vals = sorted(v for v in row if math.isfinite(v))
        ur.append(vals[len(vals) // 2] if vals else math.nan)
    return HistorySummary(layers=list(view.layers), step=list(run.history.step),
                          loss=list(run.history.loss), global_norm=list(run.history.global_norm),
                          layer_norm=[list(r) for r in view.norms], update_ratio=ur)
