"""Forward activations: saturation, dead units, activation scale drifting with depth."""

from __future__ import annotations

import math
import statistics

from collections.abc import Sequence
from gradguard.doctor.detectors._common import (
    DEAD_ERROR, DEAD_FRAC, DRIFT_DECADES, SATURATED_ERROR, SATURATED_FRAC, _Ctx, _dedupe,
    _monotone_share, _sig, _theil_sen,
)
from gradguard.doctor.probes import SiteStats
from gradguard.findings import Finding, Severity


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
