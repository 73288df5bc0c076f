"""Gradient flow across depth: vanishing or exploding from the output back to the input."""

from __future__ import annotations

import math

from gradguard.doctor.detectors._common import (
    DEAD_FRAC, DRIFT_DECADES, EXPLODE_RATIO, FORWARD_GROWTH, NAME_RATIO, VANISH_ERROR, VANISH_RATIO,
    _Ctx, _dedupe, _early_rows, _profile, _rel_grad, _sig, _theil_sen,
)
from gradguard.doctor.detectors.steps import _exploding_over_steps
from gradguard.findings import Finding, Severity


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
    if drift <= -DRIFT_DECADES / 2:
        causes.append("small_init")  # tiny signals also leave ReLUs dead: the scale comes first
    if dead_at_init:
        causes.append("dying_relu")
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
    elif sat or ctx.probes is None or not ctx.probes.forward:
        remedies = ["relu_family", "batch_norm", "xavier_init", "residual_connections"]
    else:
        remedies = [ctx.init_remedy(), "batch_norm", "residual_connections"]
    remedies.append("adaptive_optimizer")
    return causes, _dedupe(remedies)


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
    fwd = _forward_growth(ctx)
    by_rel = math.isfinite(fwd) and fwd > FORWARD_GROWTH
    if not (by_depth or by_rel):
        return None
    if not named:
        # homogeneous nets scale every layer alike, so depth ratios stay flat: name every layer
        # whose gradient/weight ratio is within 10x of the largest (relative: scale-free)
        j0 = rows[0]
        view = ctx.view
        ratios = {layer: view.norms[j0][view.layers.index(layer)] / view.weight_norm[layer]
                  for layer in view.weight_layers if view.weight_norm.get(layer, 0) > 0}
        top = max((v for v in ratios.values() if math.isfinite(v)), default=math.nan)
        named = [layer for layer, v in ratios.items() if v >= NAME_RATIO * top] or list(layers)
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
        "forward_growth": _sig(fwd),
        "depth": len(layers),
        "n_layers": len(named),
        "layer_norms": [_sig(v) for v in prof],
    }
    return Finding("exploding_gradients", Severity.ERROR, ctx.view.in_module_order(named), causes,
                   [ctx.init_remedy(), "batch_norm", "gradient_clipping"], ev)


def _forward_growth(ctx: _Ctx) -> float:
    """RMS of the last weight layer's output over the first's at the starting weights, when the
    outputs rise along the way (Theil-Sen slope > 0); NaN without a forward probe. Multiplying
    the loss leaves it unchanged, unlike a gradient/weight ratio."""
    src = ctx.initial()
    if src is None:
        return math.nan
    wl = set(ctx.view.weight_layers)
    sites = [s for s in sorted(src.sites, key=lambda s: s.order) if s.kind == "layer"
             and s.module in wl and math.isfinite(s.rms) and s.rms > 0]
    if len(sites) < 3:
        return math.nan
    logs = [math.log10(s.rms) for s in sites]
    if _theil_sen(logs) <= 0:
        return math.nan
    return sites[-1].rms / sites[0].rms
