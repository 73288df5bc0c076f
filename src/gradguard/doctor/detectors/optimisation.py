"""Optimisation: a learning rate too high, or training stalled."""

from __future__ import annotations

import math

from gradguard.doctor.detectors._common import (
    LR_UPDATE_RATIO, MIN_ROWS, STALL_LOSS_CHANGE, STALL_UPDATE, _Ctx, _dedupe, _loss_trend,
    _median, _sig, _theil_sen, _Trend,
)
from gradguard.doctor.detectors.depth import _vanishing_depth
from gradguard.doctor.detectors.time import _vanishing_time
from gradguard.findings import Finding, Severity


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
    # large updates that buy nothing: the loss rose, or swings without getting anywhere. A flat
    # start that is learning by the end (a plateau, then progress) is a slow start, not this.
    if not (went_bad or (trend is not None and _lr_symptom(ctx, trend, med))):
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
    # weights that do not move at all: what the loss does is batch-to-batch noise
    flat = flat or med == 0.0
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


def _lr_symptom(ctx: _Ctx, trend: _Trend, update: float) -> bool:
    """Large updates that buy nothing: the loss ends no lower than 0.9x where it started, *and*
    the updates are enormous (10x the threshold), or the loss blew up on the way (above twice its
    start), or rose beyond batch noise or oscillates hard without falling at the end. A plateau
    (flat within 10 %) or one that is learning by the end is a slow start."""
    loss = [v for v in ctx.hist.loss if math.isfinite(v)]
    ref = min(trend.first, trend.start)
    stuck = trend.last > 0.9 * ref
    went_up = trend.start > 0 and max(loss) > 2 * trend.start
    rose = trend.last > max(ref + 2 * trend.noise, 1.1 * ref)  # 10 % up, beyond noise
    d = [abs(b - a) for a, b in zip(loss, loss[1:])]
    swing = _median(d) / abs(trend.first) if trend.first else 0.0
    oscillating = trend.flips >= 0.6 and swing > 0.05
    half = loss[len(loss) // 2:]
    falling = _theil_sen(half) * len(half) < -max(2 * trend.noise, 0.05 * abs(trend.first))
    huge = update > 10 * LR_UPDATE_RATIO
    return stuck and (huge or went_up or ((rose or oscillating) and not falling))
