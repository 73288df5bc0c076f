"""Detectors: flushed :class:`~gradguard.history.History` (+ optional probe summary) → findings.

One detector per finding code. Every test is scale-free: ratios across depth (and the per-layer
decay factor fitted through them), ratios across time, robust z-scores against a running median,
update/weight ratios, and fractions from the forward probes. No detector fires on an absolute
gradient norm alone, and a healthy network gets no finding (a false alarm is a bug).

The thresholds are module constants, named and documented below; ``docs/doctor.md`` lists them
with the reasoning behind each.

Entry point: :func:`run_detectors`, which :func:`gradguard.diagnose` and ``Guard.findings()`` call.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gradguard.findings import Finding, Severity
from gradguard.history import History
from gradguard.probe import HARD_ZERO, ProbeSummary, SiteStats, TemporalStats

__all__ = ["CAUSES", "CODES", "DETECTORS", "REMEDIES", "LayerView", "layer_view", "run_detectors"]

# -- thresholds ----------------------------------------------------------------------------------
#: vanishing: the first weight layer's gradient is this far below the best-fed later layer.
VANISH_RATIO = 1e-2
#: ...and error severity below this.
VANISH_ERROR = 1e-4
#: a layer is named when its gradient is this far below the best-fed later layer.
NAME_RATIO = 1e-1
#: exploding across depth: the first layer's gradient this far above the weakest later layer.
EXPLODE_RATIO = 1e2
#: exploding at init: the median gradient/weight norm ratio over layers exceeds this.
EXPLODE_REL = 10.0
#: exploding over time: the global norm grows this much above its early median...
EXPLODE_GROWTH = 1e2
#: ...and stays at least this much above it at the end of the window.
EXPLODE_SUSTAIN = 1e1
#: temporal (recurrent) vanishing/exploding: gradient at the first time step over the last's.
TIME_VANISH = 1e-3
TIME_EXPLODE = 1e1  # healthy recurrent layers (any cell, any sane init) decay backward in time
#: a recurrent profile needs at least this many time steps to be judged.
TIME_MIN_STEPS = 8
#: saturation: share of a site's outputs pinned near a bound.
SATURATED_FRAC = 0.3
SATURATED_ERROR = 0.6
#: dead units: share of a ReLU site's units that are dead (positive on < 1% of the samples).
#: Half: a healthy 16-layer, 32-wide He-initialised ReLU net showed 44% in one deep layer at init.
DEAD_FRAC = 0.5
DEAD_ERROR = 0.8
DEAD_MIN_UNITS = 4
#: activation scale drift: last/first RMS of weight-layer outputs, in orders of magnitude.
DRIFT_DECADES = 2.0
DRIFT_MIN_LAYERS = 4
#: learning rate too high: median update/weight ratio (CS231n: ~1e-3 is healthy).
LR_UPDATE_RATIO = 1e-2
#: training stalled: loss changes by less than this share and updates are below STALL_UPDATE.
STALL_LOSS_CHANGE = 0.01
STALL_UPDATE = 1e-4
#: loss spike: robust z-score against the trailing window, and the loss ratio to its median.
SPIKE_Z = 6.0
SPIKE_RATIO = 2.0
SPIKE_NORM_RATIO = 10.0
SPIKE_WINDOW = 10
#: time-based detectors need this many recorded steps.
MIN_ROWS = 8

CODES = (
    "nonfinite_loss",
    "nonfinite_gradients",
    "exploding_gradients",
    "vanishing_gradients",
    "saturated_activations",
    "dead_units",
    "activation_scale_drift",
    "learning_rate_too_high",
    "loss_spike",
    "training_stalled",
)

#: every cause code a detector may name (each has text in gradguard.messages)
CAUSES = (
    "saturating_activation", "depth", "small_init", "large_init", "high_learning_rate",
    "low_learning_rate", "recurrence", "missing_normalization", "numerical_overflow",
    "dying_relu", "bad_bias_init", "outlier_batch",
)
#: every remedy code a detector may prescribe (each has text; most have a treatment to try)
REMEDIES = (
    "relu_family", "he_init", "xavier_init", "orthogonal_init", "batch_norm",
    "residual_connections", "gradient_clipping", "lower_learning_rate", "raise_learning_rate",
    "lr_schedule", "adaptive_optimizer", "gated_recurrence", "weight_decay",
    "skip_nonfinite_steps", "spike_skipping", "leaky_relu", "stable_loss",
)

_NORM_TOKEN = re.compile(r"(^|[._])(bn|ln|gn|norm|batchnorm|layernorm|groupnorm|rmsnorm)\w*$",
                         re.IGNORECASE)
_NORM_TYPES = re.compile(r"Norm", re.IGNORECASE)


def _layer_of(name: str) -> str:
    """The module owning a parameter; a parameter of the root module is its own layer."""
    return name.rsplit(".", 1)[0] if "." in name else name


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _is_bias(name: str) -> bool:
    leaf = _leaf(name)
    return leaf == "bias" or leaf.startswith("bias_")


def _median(xs: Sequence[float]) -> float:
    vals = [x for x in xs if math.isfinite(x)]
    return statistics.median(vals) if vals else math.nan


def _theil_sen(ys: Sequence[float]) -> float:
    """Robust slope of ys against their index (median of pairwise slopes)."""
    n = len(ys)
    slopes = [(ys[j] - ys[i]) / (j - i) for i in range(n) for j in range(i + 1, n)]
    return statistics.median(slopes) if slopes else 0.0


def _monotone_share(ys: Sequence[float], sign: int) -> float:
    """Share of consecutive differences with the given sign."""
    d = [b - a for a, b in zip(ys, ys[1:])]
    return sum(1 for x in d if x * sign > 0) / len(d) if d else 0.0


def _sig(x: float, digits: int = 3) -> float:
    """Round for evidence (keeps JSON short; exact values are not the point)."""
    if not math.isfinite(x) or x == 0:
        return x
    return round(x, -int(math.floor(math.log10(abs(x)))) + digits - 1)


@dataclass
class LayerView:
    """A history seen per layer (a module owning parameters), in depth order.

    Attributes:
        layers: every layer, in depth order (forward order when a probe saw it, else module order).
        weight_layers: the layers used for depth profiles (matrices/kernels; no norm layers).
        module_rank: each layer's position in module (parameter) order, for naming.
        norms: per row, each layer's gradient norm (root of the sum of its tensors' squares).
        update: per row, each layer's update/weight ratio (NaN where not measured).
        weight_norm: each layer's parameter norm (NaN without a probe summary).
        layer_type: each layer's module class ("" without a probe summary).
    """

    layers: list[str]
    weight_layers: list[str]
    module_rank: dict[str, int]
    norms: list[list[float]]
    update: list[list[float]]
    weight_norm: dict[str, float] = field(default_factory=dict)
    layer_type: dict[str, str] = field(default_factory=dict)

    def col(self, layer: str) -> list[float]:
        j = self.layers.index(layer)
        return [r[j] for r in self.norms]

    def in_module_order(self, names: Sequence[str]) -> list[str]:
        return sorted(set(names), key=lambda n: self.module_rank.get(n, 1 << 30))


def layer_view(history: History, probes: ProbeSummary | None = None) -> LayerView:
    """Aggregate per-tensor columns into per-layer ones, in depth order."""
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(history.names):
        groups.setdefault(_layer_of(name), []).append(i)
    rank = {layer: k for k, layer in enumerate(groups)}
    info = {p.name: p for p in probes.params} if probes is not None else {}
    order = list(groups)
    if probes is not None and probes.module_order:
        seen = [m for m in probes.module_order if m in groups]
        order = seen + [m for m in groups if m not in seen]
    weight_layers = []
    layer_type: dict[str, str] = {}
    weight_norm: dict[str, float] = {}
    for layer in order:
        idx = groups[layer]
        names = [history.names[i] for i in idx]
        if info and all(n in info for n in names):
            infos = [info[n] for n in names]
            layer_type[layer] = infos[0].module_type
            weight_norm[layer] = math.sqrt(sum(p.norm ** 2 for p in infos))
            is_weight = any(len(p.shape) >= 2 for p in infos) and not _NORM_TYPES.search(
                infos[0].module_type)
        else:
            is_weight = any(not _is_bias(n) for n in names) and not _NORM_TOKEN.search(
                _leaf(layer) if layer else "")
        if is_weight:
            weight_layers.append(layer)
    matrix_idx = {i for i, name in enumerate(history.names)
                  if (len(info[name].shape) >= 2 if name in info else not _is_bias(name))}
    norms, update = [], []
    for r, u in zip(history.layer_norm, history.update_ratio):
        row, urow = [], []
        for layer in order:
            vals = [r[i] for i in groups[layer]]
            row.append(math.sqrt(sum(v * v for v in vals)) if all(
                math.isfinite(v) for v in vals) else (math.nan if any(
                    math.isnan(v) for v in vals) else math.inf))
            # biases start at zero, so their ratio is meaningless early on: weights only
            us = [u[i] for i in groups[layer] if math.isfinite(u[i]) and i in matrix_idx]
            if not us:
                us = [u[i] for i in groups[layer] if math.isfinite(u[i])]
            urow.append(statistics.median(us) if us else math.nan)
        norms.append(row)
        update.append(urow)
    return LayerView(order, weight_layers, rank, norms, update, weight_norm, layer_type)


@dataclass
class _Ctx:
    hist: History
    probes: ProbeSummary | None
    view: LayerView
    finite_rows: list[int]
    first_bad_row: int | None  # first row with a non-finite gradient or loss

    @property
    def n(self) -> int:
        return len(self.hist)

    @property
    def trained(self) -> bool:
        """Whether updates were measured (an optimizer ran)."""
        return any(math.isfinite(x) for row in self.view.update for x in row)

    def sites(self, kind: str) -> list[SiteStats]:
        if self.probes is None:
            return []
        return [s for s in self.probes.sites if s.kind == kind and not s.is_output]

    def initial(self) -> ProbeSummary | None:
        """The probe window nearest the initial weights (init-scale questions are read there)."""
        if self.probes is None:
            return None
        return self.probes.initial if self.probes.initial is not None else self.probes

    def temporal(self) -> list[TemporalStats]:
        src = self.initial()
        return src.temporal if src is not None and src.temporal else (
            self.probes.temporal if self.probes is not None else [])

    def dead_sites(self) -> list[SiteStats]:
        return [s for s in self.sites("relu") if s.op in HARD_ZERO and s.units >= DEAD_MIN_UNITS
                and math.isfinite(s.dead) and s.dead > DEAD_FRAC and not s.nonfinite]

    def dominant_activation(self) -> str:
        """``"relu"``, ``"saturating"`` or ``"none"``: the hidden activations' family."""
        sat, relu = len(self.sites("saturating")), len(self.sites("relu"))
        if sat == relu == 0:
            return "none"
        return "saturating" if sat > relu else "relu"

    def has_norm_layers(self) -> bool:
        return any(_NORM_TYPES.search(t) for t in self.view.layer_type.values())

    def init_remedy(self) -> str:
        return "xavier_init" if self.dominant_activation() == "saturating" else "he_init"

    def drift(self) -> tuple[float, list[str], list[float]]:
        """(log10 last/first RMS, layers, rms) of weight-layer outputs in forward order."""
        src = self.initial()
        if src is None:
            return 0.0, [], []
        wl = set(self.view.weight_layers)
        layer_sites = [s for s in src.sites if s.kind == "layer" and s.module in wl
                       and s.op not in ("Embedding", "RNN", "LSTM", "GRU", "EmbeddingBag")]
        layer_sites = [s for s in layer_sites if math.isfinite(s.rms) and s.rms > 0]
        if len(layer_sites) < DRIFT_MIN_LAYERS:
            return 0.0, [], []
        # the output layer maps to the loss's scale; depth trends are read on hidden layers
        hidden = layer_sites[:-1] if len(layer_sites) > DRIFT_MIN_LAYERS else layer_sites
        rms = [s.rms for s in hidden]
        return math.log10(rms[-1] / rms[0]), [s.module for s in hidden], rms


def _profile(ctx: _Ctx, rows: Sequence[int]) -> tuple[list[str], list[float]]:
    """Median gradient norm of each weight layer over ``rows``, in depth order."""
    view = ctx.view
    out_l, out_v = [], []
    for layer in view.weight_layers:
        j = view.layers.index(layer)
        v = _median([view.norms[i][j] for i in rows])
        if math.isfinite(v):
            out_l.append(layer)
            out_v.append(v)
    return out_l, out_v


def _early_rows(ctx: _Ctx) -> list[int]:
    """Finite rows before anything went non-finite (all finite rows if nothing did)."""
    stop = ctx.first_bad_row if ctx.first_bad_row is not None else ctx.n
    return [i for i in ctx.finite_rows if i < stop]


def _rel_grad(ctx: _Ctx) -> float:
    """Median over weight layers of gradient norm / weight norm on the first finite row."""
    rows = _early_rows(ctx)
    if not rows or not ctx.view.weight_norm:
        return math.nan
    i = rows[0]
    vals = []
    for layer in ctx.view.weight_layers:
        w = ctx.view.weight_norm.get(layer, math.nan)
        g = ctx.view.norms[i][ctx.view.layers.index(layer)]
        if w > 0 and math.isfinite(g):
            vals.append(g / w)
    return _median(vals)


# -- detectors -----------------------------------------------------------------------------------
def detect_nonfinite_loss(ctx: _Ctx) -> Finding | None:
    if not _loss_recorded(ctx):
        return None
    bad = [i for i, v in enumerate(ctx.hist.loss) if not math.isfinite(v)]
    if not bad:
        return None
    first = bad[0]
    layers: list[str] = []
    origin = ""
    if ctx.probes is not None:
        sites = [s for s in ctx.probes.sites if s.nonfinite]
        if sites:
            origin = sites[0].module
            layers = [origin] if origin else []
    at_start = first == 0
    grew = _growth_before(ctx, first)
    if at_start:
        causes = ["numerical_overflow"]
        remedies = ["stable_loss", "lower_learning_rate", "skip_nonfinite_steps"]
    else:
        causes = ["high_learning_rate", "numerical_overflow"]
        remedies = ["lower_learning_rate", "gradient_clipping", "skip_nonfinite_steps"]
    ev = {
        "first_step": ctx.hist.step[first],
        "at_start": at_start,
        "steps": len(bad),
        "rows": ctx.n,
        "origin": origin,
        "growth_before": _sig(grew),
        "last_finite_loss": _sig(ctx.hist.loss[first - 1]) if first > 0 else math.nan,
    }
    return Finding("nonfinite_loss", Severity.ERROR, ctx.view.in_module_order(layers), causes,
                   remedies, ev)


def _loss_recorded(ctx: _Ctx) -> bool:
    """NaN also means "not recorded": a loss column counts if some value is not NaN, or if the
    caller said every loss was recorded."""
    if ctx.probes is not None and ctx.probes.loss_recorded:
        return True
    return any(not math.isnan(v) for v in ctx.hist.loss)


def _growth_before(ctx: _Ctx, row: int) -> float:
    """Largest finite global norm before ``row`` over the median of the first few rows."""
    gn = [v for v in ctx.hist.global_norm[:row] if math.isfinite(v)]
    if len(gn) < 3:
        return math.nan
    early = _median(gn[: max(3, len(gn) // 5)])
    return max(gn) / early if early > 0 else math.nan


def detect_nonfinite_gradients(ctx: _Ctx) -> Finding | None:
    view = ctx.view
    bad_rows = []
    for i, row in enumerate(view.norms):
        loss = ctx.hist.loss[i] if i < len(ctx.hist.loss) else math.nan
        loss_bad = _loss_recorded(ctx) and not math.isfinite(loss)
        if any(not math.isfinite(v) for v in row) and not loss_bad:
            bad_rows.append(i)
    gn_bad = [i for i, v in enumerate(ctx.hist.global_norm)
              if not math.isfinite(v) and not math.isnan(v)]
    bad_rows = sorted(set(bad_rows) | {i for i in gn_bad if _loss_recorded(ctx)
                                       and math.isfinite(ctx.hist.loss[i])})
    if not bad_rows:
        return None
    first = bad_rows[0]
    carried = [layer for j, layer in enumerate(view.layers) if not math.isfinite(view.norms[first][j])]
    # backward meets the problem first nearest the output: the deepest layer that carried it
    depth_order = [layer for layer in view.layers if layer in carried]
    origin = depth_order[-1] if depth_order else ""
    grew = _growth_before(ctx, first)
    causes = ["numerical_overflow"]
    if math.isfinite(grew) and grew > EXPLODE_SUSTAIN:
        causes = ["high_learning_rate", "numerical_overflow"]
    ev = {
        "first_step": ctx.hist.step[first],
        "steps": len(bad_rows),
        "rows": ctx.n,
        "origin": origin,
        "n_layers": len(carried),
        "growth_before": _sig(grew),
        "skipped": sum(1 for s in ctx.hist.skipped if s),
    }
    return Finding("nonfinite_gradients", Severity.ERROR, view.in_module_order(carried), causes,
                   ["skip_nonfinite_steps", "gradient_clipping", "lower_learning_rate"], ev)


def detect_vanishing_gradients(ctx: _Ctx) -> Finding | None:
    found = _vanishing_depth(ctx) or _vanishing_time(ctx)
    return found


def _vanishing_depth(ctx: _Ctx) -> Finding | None:
    rows = _early_rows(ctx)
    if not rows:
        return None
    layers, prof = _profile(ctx, rows)
    if len(layers) < 3 or min(prof) <= 0 and max(prof) <= 0:
        return None
    half = len(prof) // 2
    ref = max(prof[half:])
    if ref <= 0:
        return None
    ratio = prof[0] / ref
    logs = [math.log10(max(v, 1e-300)) for v in prof]
    peak = half + prof[half:].index(ref)
    slope = _theil_sen(logs[: peak + 1])  # decades per layer, growing toward the output
    rel = _rel_grad(ctx)
    drift, _, _ = ctx.drift()
    if not (ratio < VANISH_RATIO and slope > 0):
        return None
    if _exploding_over_steps(ctx) is not None:
        return None  # a diverging run's depth profile says nothing about vanishing
    named = [layer for layer, v in zip(layers, prof) if v < NAME_RATIO * ref]
    decay = 10 ** (-slope)
    act = ctx.dominant_activation()
    causes, remedies = _vanishing_causes(ctx, drift)
    ev = {
        "axis": "depth",
        "first_layer": layers[0],
        "last_layer": layers[-1],
        "ratio": _sig(ratio),
        "first_last_ratio": _sig(prof[0] / prof[-1]),
        "decay_per_layer": _sig(decay),
        "depth": len(layers),
        "n_layers": len(named),
        "layer_norms": [_sig(v) for v in prof],
        "rel_grad": _sig(rel),
        "activation": act,
    }
    sev = Severity.ERROR if ratio < VANISH_ERROR else Severity.WARNING
    return Finding("vanishing_gradients", sev, ctx.view.in_module_order(named), causes,
                   _dedupe(remedies), ev)


def _vanishing_causes(ctx: _Ctx, drift: float) -> tuple[list[str], list[str]]:
    """Ranked causes and remedies of vanishing gradients, from the forward evidence."""
    sat = ctx.sites("saturating")
    dead = ctx.dead_sites()
    initial = ctx.initial()
    dead_at_init = bool(dead) and initial is not None and any(
        s.dead > DEAD_FRAC for s in initial.sites if s.name in {d.name for d in dead})
    causes: list[str] = []
    if dead_at_init:
        causes.append("dying_relu")
    if drift <= -DRIFT_DECADES / 2:
        causes.append("small_init")
    if dead and not dead_at_init:
        causes.append("dying_relu")
    if sat:
        causes.append("saturating_activation")
    causes.append("depth")
    if ctx.probes is not None and not ctx.has_norm_layers():
        causes.append("missing_normalization")
    if causes[0] == "dying_relu":
        remedies = ["leaky_relu", "he_init", "batch_norm", "lower_learning_rate"]
    elif causes[0] == "small_init":
        remedies = [ctx.init_remedy(), "batch_norm", "residual_connections"]
        if ctx.dominant_activation() == "saturating":
            remedies.append("relu_family")
    elif sat or ctx.probes is None:
        remedies = ["relu_family", "batch_norm", "xavier_init", "residual_connections"]
    else:
        remedies = [ctx.init_remedy(), "batch_norm", "residual_connections"]
    remedies.append("adaptive_optimizer")
    return causes, _dedupe(remedies)


def _vanishing_time(ctx: _Ctx) -> Finding | None:
    if ctx.probes is None:
        return None
    for t in ctx.temporal():
        g = t.grad_norm
        # Gated cells (LSTM, GRU) decay at init too and learn to keep memory: only a plain RNN
        # is judged here.
        if t.op != "RNN" or len(g) < TIME_MIN_STEPS or not all(math.isfinite(v) for v in g):
            continue
        top = max(g)
        if top <= 0 or g[-1] <= 0:
            continue
        ratio = g[0] / g[-1]
        if ratio < TIME_VANISH and g[-1] >= 0.5 * top:
            decay = ratio ** (1 / (len(g) - 1))
            ev = {
                "axis": "time",
                "first_layer": t.module,
                "last_layer": t.module,
                "ratio": _sig(ratio),
                "first_last_ratio": _sig(ratio),
                "decay_per_layer": _sig(decay),
                "decay_per_step": _sig(decay),
                "time_steps": len(g),
                "depth": len(g),
                "n_layers": 1,
                "activation": "saturating",
            }
            sev = Severity.ERROR if ratio < VANISH_ERROR * 1e-2 else Severity.WARNING
            # An orthogonal recurrent matrix restores the flow from the first step; gates let it
            # be learned (and need training to show).
            return Finding("vanishing_gradients", sev, [t.module], ["recurrence", "depth"],
                           ["orthogonal_init", "gated_recurrence", "adaptive_optimizer"], ev)
    return None


def detect_exploding_gradients(ctx: _Ctx) -> Finding | None:
    return _exploding_time_rnn(ctx) or _exploding_over_steps(ctx) or _exploding_depth(ctx)


def _exploding_time_rnn(ctx: _Ctx) -> Finding | None:
    if ctx.probes is None:
        return None
    for t in ctx.temporal():
        g = t.grad_norm
        if len(g) < TIME_MIN_STEPS or g[-1] <= 0:
            continue
        finite = all(math.isfinite(v) for v in g)
        ratio = g[0] / g[-1] if finite else math.inf
        if ratio > TIME_EXPLODE:
            growth = ratio ** (1 / (len(g) - 1)) if finite else math.inf
            ev = {
                "axis": "time",
                "first_layer": t.module,
                "ratio": _sig(ratio),
                "growth_per_step": _sig(growth),
                "growth_per_layer": _sig(growth),
                "time_steps": len(g),
                "depth": len(g),
                "n_layers": 1,
            }
            # A run that diverged needs its steps bounded first (clipping); otherwise the
            # recurrent matrix itself is the fix.
            diverged = ctx.first_bad_row is not None or _exploding_over_steps(ctx) is not None
            remedies = (["gradient_clipping", "orthogonal_init"] if diverged
                        else ["orthogonal_init", "gradient_clipping"])
            ev["diverged"] = diverged
            return Finding("exploding_gradients", Severity.ERROR, [t.module],
                           ["recurrence", "large_init"],
                           [*remedies, "gated_recurrence", "lower_learning_rate"], ev)
    return None


def _exploding_depth(ctx: _Ctx) -> Finding | None:
    rows = _early_rows(ctx)
    if not rows:
        return None
    layers, prof = _profile(ctx, rows)
    rel = _rel_grad(ctx)
    drift, _, _ = ctx.drift()
    by_depth = False
    ratio = math.nan
    named: list[str] = []
    growth = math.nan
    if len(layers) >= 3:
        half = len(prof) // 2
        low = min(prof[half:])
        if low > 0:
            ratio = prof[0] / low
            logs = [math.log10(max(v, 1e-300)) for v in prof]
            slope = _theil_sen(logs)
            growth = 10 ** (-slope)
            if ratio > EXPLODE_RATIO and slope < 0:
                by_depth = True
                named = [layer for layer, v in zip(layers, prof) if v > low / NAME_RATIO]
    by_rel = math.isfinite(rel) and rel > EXPLODE_REL
    if not (by_depth or by_rel):
        return None
    if not named:
        # homogeneous nets scale every layer alike, so depth ratios stay flat: name every
        # layer whose gradient is larger than its weights
        j0 = rows[0]
        named = [layer for layer in ctx.view.weight_layers
                 if ctx.view.weight_norm.get(layer, 0) > 0
                 and ctx.view.norms[j0][ctx.view.layers.index(layer)]
                 > ctx.view.weight_norm[layer]] or list(layers)
    causes = ["large_init"]
    if drift < DRIFT_DECADES / 2 and ctx.sites("saturating"):
        causes = ["large_init", "saturating_activation"]
    causes.append("depth")
    if ctx.probes is not None and not ctx.has_norm_layers():
        causes.append("missing_normalization")
    ev = {
        "axis": "depth" if by_depth else "weights",
        "first_layer": layers[0] if layers else "",
        "ratio": _sig(ratio),
        "growth_per_layer": _sig(growth),
        "rel_grad": _sig(rel),
        "depth": len(layers),
        "n_layers": len(named),
        "layer_norms": [_sig(v) for v in prof],
    }
    return Finding("exploding_gradients", Severity.ERROR, ctx.view.in_module_order(named), causes,
                   [ctx.init_remedy(), "batch_norm", "gradient_clipping"], ev)


def _exploding_over_steps(ctx: _Ctx) -> Finding | None:
    gn = ctx.hist.global_norm
    idx = [i for i, v in enumerate(gn) if math.isfinite(v) and v > 0]
    if len(idx) < MIN_ROWS:
        return None
    k = max(3, len(idx) // 5)
    early = _median([gn[i] for i in idx[:k]])
    late = _median([gn[i] for i in idx[-k:]])
    peak = max(gn[i] for i in idx)
    went_bad = ctx.first_bad_row is not None
    if early <= 0:
        return None
    growth = peak / early
    sustained = late / early
    if not (growth > EXPLODE_GROWTH and (sustained > EXPLODE_SUSTAIN or went_bad)):
        return None
    # the layers whose norm grew most
    view = ctx.view
    grew = []
    for j, layer in enumerate(view.layers):
        col = [view.norms[i][j] for i in idx]
        e = _median(col[:k])
        if e > 0 and max(col) / e > EXPLODE_SUSTAIN:
            grew.append(layer)
    named = [layer for layer in grew if layer in view.weight_layers] or grew
    ev = {
        "axis": "steps",
        "ratio": _sig(growth),
        "growth": _sig(growth),
        "sustained": _sig(sustained),
        "early_norm": _sig(early),
        "peak_norm": _sig(peak),
        "rows": ctx.n,
        "n_layers": len(named),
        "went_nonfinite": went_bad,
    }
    causes = ["high_learning_rate", "numerical_overflow"] if ctx.trained else ["large_init"]
    return Finding("exploding_gradients", Severity.ERROR, view.in_module_order(named), causes,
                   ["gradient_clipping", "lower_learning_rate", "lr_schedule",
                    "adaptive_optimizer"], ev)


def detect_saturated_activations(ctx: _Ctx) -> Finding | None:
    sites = [s for s in ctx.sites("saturating") if math.isfinite(s.saturated)
             and s.saturated > SATURATED_FRAC]
    if not sites:
        return None
    worst = max(s.saturated for s in sites)
    ops = sorted({s.op for s in sites})
    drift, _, _ = ctx.drift()
    causes = ["large_init" if drift > -DRIFT_DECADES / 2 else "saturating_activation"]
    causes += ["saturating_activation", "missing_normalization"]
    if ctx.trained:
        causes.append("high_learning_rate")
    remedies = ["relu_family", "xavier_init", "batch_norm", "lower_learning_rate"]
    if "sigmoid" not in ops:  # tanh with a proper init is fine; sigmoid rarely is
        remedies = ["xavier_init", "relu_family", "batch_norm", "lower_learning_rate"]
    ev = {
        "worst": _sig(worst),
        "mean": _sig(statistics.mean(s.saturated for s in sites)),
        "ops": ", ".join(ops),
        "n_layers": len({s.module for s in sites}),
        "sites": {s.name: _sig(s.saturated) for s in sites},
        "threshold": SATURATED_FRAC,
    }
    sev = Severity.ERROR if worst > SATURATED_ERROR else Severity.WARNING
    layers = _site_layers(ctx, sites)
    return Finding("saturated_activations", sev, layers, _dedupe(causes), remedies, ev)


def _site_layers(ctx: _Ctx, sites: Sequence[SiteStats]) -> list[str]:
    """Site names ordered by module order (activation modules own no parameters: use forward order)."""
    return [s.name for s in sorted(sites, key=lambda s: s.order)]


def detect_dead_units(ctx: _Ctx) -> Finding | None:
    sites = ctx.dead_sites()
    if not sites:
        return None
    worst = max(s.dead for s in sites)
    initial: dict[str, float] = {}
    if ctx.probes is not None and ctx.probes.initial is not None:
        initial = {s.name: s.dead for s in ctx.probes.initial.sites}
    died_in_training = any(s.dead - initial.get(s.name, s.dead) > 0.2 for s in sites)
    if died_in_training and ctx.trained:
        causes = ["high_learning_rate", "dying_relu"]
        remedies = ["lower_learning_rate", "leaky_relu", "he_init", "batch_norm"]
    else:
        causes = ["dying_relu", "bad_bias_init"]
        remedies = ["leaky_relu", "he_init", "batch_norm", "lower_learning_rate"]
    ev = {
        "worst": _sig(worst),
        "mean": _sig(statistics.mean(s.dead for s in sites)),
        "n_layers": len(sites),
        "units": sum(s.units for s in sites),
        "sites": {s.name: _sig(s.dead) for s in sites},
        "died_in_training": died_in_training,
        "threshold": DEAD_FRAC,
    }
    sev = Severity.ERROR if worst > DEAD_ERROR else Severity.WARNING
    return Finding("dead_units", sev, _site_layers(ctx, sites), causes, remedies, ev)


def detect_activation_scale_drift(ctx: _Ctx) -> Finding | None:
    decades, layers, rms = ctx.drift()
    if abs(decades) < DRIFT_DECADES:
        return None
    sign = 1 if decades > 0 else -1
    logs = [math.log10(v) for v in rms]
    if _monotone_share(logs, sign) < 0.7:
        return None
    per_layer = 10 ** (_theil_sen(logs))
    named = [m for m, v in zip(layers, logs) if (v - logs[0]) * sign >= 1.0]
    shrink = decades < 0
    causes = ["small_init" if shrink else "large_init", "depth"]
    if not ctx.has_norm_layers():
        causes.append("missing_normalization")
    remedies = [ctx.init_remedy(), "batch_norm"]
    if ctx.dominant_activation() == "none":
        remedies = ["orthogonal_init", "batch_norm"]
    ev = {
        "direction": "shrinks" if shrink else "grows",
        "decades": _sig(decades),
        "ratio": _sig(10 ** decades),
        "factor_per_layer": _sig(per_layer),
        "first_rms": _sig(rms[0]),
        "last_rms": _sig(rms[-1]),
        "depth": len(rms),
        "n_layers": len(named),
        "activation": ctx.dominant_activation(),
    }
    sev = Severity.ERROR if abs(decades) >= 2 * DRIFT_DECADES else Severity.WARNING
    return Finding("activation_scale_drift", sev, ctx.view.in_module_order(named), causes,
                   remedies, ev)


@dataclass
class _Trend:
    first: float  # mean of the first quarter of the finite losses
    last: float  # mean of the last quarter
    start: float  # the lowest of the first three losses (the loss at the initial weights)
    noise: float  # standard error of last - first (batch-to-batch noise)
    flips: float  # share of sign changes between consecutive differences


def _loss_trend(ctx: _Ctx) -> _Trend | None:
    loss = [v for v in ctx.hist.loss if math.isfinite(v)]
    if len(loss) < MIN_ROWS:
        return None
    q = max(2, len(loss) // 4)
    a, b = loss[:q], loss[-q:]
    noise = math.sqrt(statistics.variance(a) / q + statistics.variance(b) / q)
    d = [y - x for x, y in zip(loss, loss[1:])]
    flips = sum(1 for x, y in zip(d, d[1:]) if x * y < 0) / max(1, len(d) - 1)
    return _Trend(statistics.mean(a), statistics.mean(b), min(loss[:3]), noise, flips)


def detect_learning_rate_too_high(ctx: _Ctx) -> Finding | None:
    if not ctx.trained:
        return None
    view = ctx.view
    went_bad = ctx.first_bad_row is not None
    # read the updates before anything went non-finite: afterwards they are NaN or frozen at 0
    rows = view.update[: ctx.first_bad_row] if went_bad else view.update
    per_row = [_median([u for u in row if math.isfinite(u)]) for row in rows]
    per_row = [v for v in per_row if math.isfinite(v)]
    if len(per_row) < 3 or (not went_bad and len(per_row) < MIN_ROWS // 2):
        return None
    med = _median(per_row)
    trend = _loss_trend(ctx)
    if not med > LR_UPDATE_RATIO:
        return None
    # large updates that buy nothing: the loss ends no lower than where it started
    rising = trend is not None and trend.last > 0.9 * min(trend.first, trend.start)
    if not (rising or went_bad):
        return None
    layer_med = {layer: _median([row[j] for row in rows])
                 for j, layer in enumerate(view.layers)}
    named = [layer for layer, v in layer_med.items() if v > LR_UPDATE_RATIO
             and layer in view.weight_layers] or [
        layer for layer, v in layer_med.items() if v > LR_UPDATE_RATIO]
    ev = {
        "update_ratio": _sig(med),
        "max_update_ratio": _sig(max(per_row)),
        "loss_first": _sig(trend.start) if trend else math.nan,
        "loss_last": _sig(trend.last) if trend else math.nan,
        "oscillation": _sig(trend.flips) if trend else math.nan,
        "went_nonfinite": went_bad,
        "n_layers": len(named),
    }
    return Finding("learning_rate_too_high", Severity.ERROR if went_bad else Severity.WARNING,
                   view.in_module_order(named), ["high_learning_rate"],
                   ["lower_learning_rate", "lr_schedule", "gradient_clipping",
                    "adaptive_optimizer"], ev)


def detect_training_stalled(ctx: _Ctx) -> Finding | None:
    if not ctx.trained or ctx.first_bad_row is not None:
        return None
    trend = _loss_trend(ctx)
    if trend is None:
        return None
    first, last = trend.first, trend.last
    change = (first - last) / abs(first) if first != 0 else 0.0
    view = ctx.view
    per_row = [_median([u for u in row if math.isfinite(u)]) for row in view.update]
    med = _median(per_row)
    flat = abs(first - last) < max(STALL_LOSS_CHANGE * abs(first), 2 * trend.noise)
    if not (flat and math.isfinite(med) and med < STALL_UPDATE):
        return None
    layer_med = {layer: _median([row[j] for row in view.update])
                 for j, layer in enumerate(view.layers)}
    named = [layer for layer in view.weight_layers if layer_med.get(layer, 1.0) < STALL_UPDATE]
    vanishing = _vanishing_depth(ctx) or _vanishing_time(ctx)
    if vanishing is not None:
        causes = [*vanishing.causes[:2], "low_learning_rate"]
        remedies = [*vanishing.remedies[:2], "adaptive_optimizer", "raise_learning_rate"]
    else:
        causes = ["low_learning_rate"]
        remedies = ["adaptive_optimizer", "raise_learning_rate", "lr_schedule"]
    ev = {
        "loss_first": _sig(first),
        "loss_last": _sig(last),
        "loss_change": _sig(change),
        "update_ratio": _sig(med),
        "rows": ctx.n,
        "n_layers": len(named),
    }
    return Finding("training_stalled", Severity.WARNING, view.in_module_order(named),
                   _dedupe(causes), _dedupe(remedies), ev)


def detect_loss_spike(ctx: _Ctx) -> Finding | None:
    loss = ctx.hist.loss
    gn = ctx.hist.global_norm
    n = ctx.n
    if n < MIN_ROWS or ctx.first_bad_row is not None:
        return None  # a run that went non-finite diverged; that is not a transient spike
    trend = _loss_trend(ctx)
    if trend is not None and trend.first > 0 and trend.last > 2 * trend.first:
        return None  # the loss ends far above where it started: divergence, not a spike
    spikes: list[tuple[int, float, float, str]] = []  # (row, z, ratio, series)
    for series_name, series, min_ratio in (("loss", loss, SPIKE_RATIO),
                                           ("grad_norm", gn, SPIKE_NORM_RATIO)):
        for i in range(5, n):
            v = series[i]
            if not math.isfinite(v):
                continue
            win = [x for x in series[max(0, i - SPIKE_WINDOW):i] if math.isfinite(x)]
            if len(win) < 5:
                continue
            med = statistics.median(win)
            mad = statistics.median(abs(x - med) for x in win) * 1.4826
            scale = max(mad, 1e-3 * abs(med), 1e-12)
            z = (v - med) / scale
            ratio = v / med if med > 0 else math.inf
            if z > SPIKE_Z and ratio > min_ratio:
                # a spike comes back down; a level that stays up is divergence, not a spike
                after = [x for x in series[i + 1:i + 6] if math.isfinite(x)]
                if i + 1 < n and (not after or _median(after) > med + 0.5 * (v - med)):
                    continue
                spikes.append((i, z, ratio, series_name))
    if not spikes:
        return None
    rows = sorted({s[0] for s in spikes})
    if len(rows) > max(2, n // 5):
        return None  # spikes everywhere: an unstable run (learning rate), not sudden spikes
    worst = max(spikes, key=lambda s: s[2])
    view = ctx.view
    r = worst[0]
    jumps = []
    for j, layer in enumerate(view.layers):
        col = view.norms
        prev = _median([col[i][j] for i in range(max(0, r - SPIKE_WINDOW), r)])
        cur = col[r][j]
        if prev > 0 and math.isfinite(cur):
            jumps.append((cur / prev, layer))
    top = max((j for j, _ in jumps), default=math.nan)
    named = [layer for j, layer in jumps if j >= 0.5 * top and j > 2] if jumps else []
    causes = ["outlier_batch", "high_learning_rate"] if len(rows) <= 2 else [
        "high_learning_rate", "outlier_batch"]
    ev = {
        "steps": [ctx.hist.step[i] for i in rows],
        "count": len(rows),
        "first_step": ctx.hist.step[rows[0]],
        "z": _sig(worst[1]),
        "ratio": _sig(worst[2]),
        "series": worst[3],
        "layer_jump": _sig(top),
        "n_layers": len(named),
    }
    return Finding("loss_spike", Severity.WARNING, view.in_module_order(named), causes,
                   ["gradient_clipping", "spike_skipping", "lr_schedule", "lower_learning_rate"],
                   ev)


def _dedupe(xs: Sequence[str]) -> list[str]:
    out: list[str] = []
    for x in xs:
        if x not in out:
            out.append(x)
    return out


DETECTORS: dict[str, Callable[[_Ctx], Finding | None]] = {
    "nonfinite_loss": detect_nonfinite_loss,
    "nonfinite_gradients": detect_nonfinite_gradients,
    "exploding_gradients": detect_exploding_gradients,
    "vanishing_gradients": detect_vanishing_gradients,
    "saturated_activations": detect_saturated_activations,
    "dead_units": detect_dead_units,
    "activation_scale_drift": detect_activation_scale_drift,
    "learning_rate_too_high": detect_learning_rate_too_high,
    "loss_spike": detect_loss_spike,
    "training_stalled": detect_training_stalled,
}


def run_detectors(history: History, probes: ProbeSummary | None = None) -> list[Finding]:
    """Every detector on a flushed history (and the forward probes' summary when available).

    Args:
        history (History): per-step gradient norms (per tensor), losses and, when an optimizer
            ran, update/weight ratios; e.g. ``HistoryBuffer.flush()`` or ``History.from_jsonl``.
        probes (ProbeSummary, optional): what :class:`gradguard.probe.Probe` saw (saturation, dead
            units, activation scale, parameter norms, recurrent time profiles). Without it the
            detectors that need the forward pass stay silent and the others work on the history.

    Returns:
        list[Finding]: most severe first; empty when nothing is wrong.

    Example:
        >>> from gradguard.history import History
        >>> from gradguard.detect import run_detectors
        >>> run_detectors(History(["w"]))
        []
    """
    if not isinstance(history, History):
        raise TypeError(
            f"`history` must be a gradguard History (HistoryBuffer.flush() or "
            f"History.from_jsonl(path)), got {type(history).__name__}."
        )
    if probes is not None and not isinstance(probes, ProbeSummary):
        raise TypeError(
            f"`probes` must be a ProbeSummary (Probe(model).summary()) or None, got "
            f"{type(probes).__name__}."
        )
    view = layer_view(history, probes)
    finite_rows, first_bad = [], None
    recorded = any(not math.isnan(v) for v in history.loss) or (
        probes is not None and probes.loss_recorded)
    for i, row in enumerate(view.norms):
        ok = all(math.isfinite(v) for v in row) and (
            not recorded or math.isfinite(history.loss[i]))
        if ok:
            finite_rows.append(i)
        elif first_bad is None:
            first_bad = i
    ctx = _Ctx(history, probes, view, finite_rows, first_bad)
    findings = []
    for det in DETECTORS.values():
        f = det(ctx)
        if f is not None:
            findings.append(f)
    order = {c: k for k, c in enumerate(CODES)}
    findings.sort(key=lambda f: (-f.severity.rank, order.get(f.code, 99)))
    return findings
